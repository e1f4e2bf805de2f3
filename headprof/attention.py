"""Attention of the new tokens over a compressed layer: one call per layer for all KV heads.

Each KV head is its own sequence: the query heads of its group attend over the prompt tokens the head
kept (the packed prefix) and over the generated tokens (the tail, causal among the new tokens). Three
backends compute the same thing:

- `flash`: flash-attn's varlen kernel over the packed prefix (every KV head a sequence, `cu_seqlens` per
  head, its group as the query heads), merged with the tail by log-sum-exp. CUDA, fp16/bf16.
- `torch-varlen`: the same with PyTorch's own varlen flash kernel (`torch.nn.attention.varlen`), when
  flash-attn is not installed. CUDA, fp16/bf16, no soft-capping.
- `torch`: a vectorised fallback for any device and dtype: one batched matmul and one softmax over the
  prefix (a (heads, len) view when all heads keep the same count, else the packed buffer with a mask of
  each head's own entries, so nothing is copied) and the tail.

`torch` is the default everywhere: on an H100 with Llama-3-8B-sized layers (bf16, 8k-32k prompts) the
varlen route, a kernel plus the tail plus the merge, was slower in every cell than the one matmul
(docs/results.md). Layers whose heads all keep the same count (SnapKV, PyramidKV, StreamingLLM) are a
dense (heads, len) view and always take it. `HEADPROF_ATTENTION=torch-varlen|flash` selects a varlen
kernel for layers with unequal counts (HeadKV, AdaKV) where it can run.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from headprof.cache import HeadKVLayer

BACKENDS = ("flash", "torch-varlen", "torch")


@functools.cache
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import AuxRequest, varlen_attn
    except ImportError:
        return None
    return varlen_attn, AuxRequest


def available(device: torch.device | str, dtype: torch.dtype, softcap: float | None = None,
              sliding: bool = False) -> list[str]:
    """Backends that can run here, the default first."""
    out = ["torch"]  # measured fastest, also on an H100 with Llama-3-8B-sized layers (docs/results.md)
    if torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16) and not sliding:
        if importlib.util.find_spec("flash_attn") is not None:
            out.append("flash")
        if softcap is None and _torch_varlen() is not None:
            out.append("torch-varlen")
    return out


def pick(device, dtype, softcap: float | None = None, sliding: bool = False) -> str:
    return _pick(torch.device(device).type, dtype, softcap, sliding, os.environ.get("HEADPROF_ATTENTION"))


@functools.cache
def _pick(device: str, dtype: torch.dtype, softcap: float | None, sliding: bool, wanted: str | None) -> str:
    options = available(device, dtype, softcap, sliding)
    if wanted:
        if wanted not in BACKENDS:
            raise ValueError(f"HEADPROF_ATTENTION={wanted}: use one of {', '.join(BACKENDS)}")
        if wanted in options:
            return wanted
    return options[0]


def attend(layer: HeadKVLayer, query: torch.Tensor, scaling: float, softcap: float | None,
           backend: str | None = None) -> torch.Tensor:
    """query (1, query_heads, q, dim) -> output (1, q, query_heads, dim), as transformers expects."""
    _, hq, q, d = query.shape
    heads = len(layer.lens)
    qg = query[0].reshape(heads, hq // heads, q, d)  # query head h reads KV head h // group
    if backend is None:  # equal lengths are a dense (heads, len) view: one bmm reads exactly what it needs
        sliding = layer.sliding_window is not None
        backend = "torch" if layer.uniform else pick(query.device, query.dtype, softcap, sliding)
    if backend == "torch":
        out = _torch_attention(layer, qg, scaling, softcap)
    else:
        out_p, lse_p = _varlen_prefix(layer, qg, scaling, softcap, backend)
        out_t, lse_t = _tail(layer, qg, scaling, softcap)
        out = _merge(out_p, lse_p, out_t, lse_t).to(query.dtype)
    return out.reshape(hq, q, -1).transpose(0, 1).unsqueeze(0)


def _capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def _tail_mask(layer: HeadKVLayer, q: int, device) -> torch.Tensor | None:
    """(q, t) keys each new query may see among the tail: causal, and inside the window if any."""
    t = layer.t
    if q == 1 and (layer.sliding_window is None or t <= layer.sliding_window):
        return None
    j = torch.arange(t, device=device)
    i = torch.arange(t - q, t, device=device)  # tail index of each query
    allowed = j[None, :] <= i[:, None]
    if layer.sliding_window is not None:
        allowed &= j[None, :] > i[:, None] - layer.sliding_window
    return allowed


def _torch_attention(layer: HeadKVLayer, qg: torch.Tensor, scaling: float, softcap: float | None) -> torch.Tensor:
    """Prefix and tail side by side, one softmax; returns (heads, group, q, dim).

    The group's query heads and the new tokens are the rows of one (heads, group * q, dim) batch.
    """
    heads, group, q, d = qg.shape
    rows = qg.reshape(heads, group * q, d) * scaling
    kp, vp, own, pos = layer.prefix_view()
    kt, vt = layer.tk[:, :layer.t], layer.tv[:, :layer.t]
    if own is None:
        logits_p = torch.bmm(rows, kp.transpose(1, 2))
    else:  # the packed buffer: every row against every kept token, then each head's own entries only
        logits_p = torch.matmul(rows, kp.T)
    logits_t = torch.bmm(rows, kt.transpose(1, 2))
    if softcap is not None:
        logits_p, logits_t = _capped(logits_p, softcap), _capped(logits_t, softcap)
    mask = own
    if pos is not None:  # sliding window: keys whose position is inside the window of each query
        qpos = (layer.seen - q + torch.arange(q, device=qg.device)).repeat(group)
        inside = pos > (qpos[:, None] - layer.sliding_window)
        mask = inside if mask is None else mask & inside
    if mask is not None and pos is None:  # other heads' entries: adding a (heads, 1, N) bias in place is
        zero = torch.zeros((), dtype=logits_p.dtype, device=qg.device)  # 3x cheaper than masked_fill
        logits_p = logits_p.add_(torch.where(mask, zero, float("-inf")))
    elif mask is not None:
        logits_p = logits_p.masked_fill(~mask, float("-inf"))
    mt = _tail_mask(layer, q, qg.device)
    if mt is not None:
        logits_t = logits_t.masked_fill(~mt.repeat(group, 1), float("-inf"))
    n = logits_p.shape[-1]
    probs = torch.softmax(torch.cat([logits_p, logits_t], dim=-1), dim=-1, dtype=torch.float32).to(vp.dtype)
    out = torch.matmul(probs[..., :n], vp) + torch.bmm(probs[..., n:], vt)
    return out.view(heads, group, q, -1)


def _tail(layer: HeadKVLayer, qg: torch.Tensor, scaling: float, softcap: float | None):
    """Attention over the tail alone, with its log-sum-exp: (heads, group, q, dim), (heads, group, q)."""
    kt, vt = layer.tk[:, :layer.t], layer.tv[:, :layer.t]
    logits = _capped(torch.matmul(qg.float(), kt.float().unsqueeze(1).transpose(-1, -2)) * scaling, softcap)
    mt = _tail_mask(layer, qg.shape[2], qg.device)
    if mt is not None:
        logits = logits.masked_fill(~mt, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.matmul(torch.exp(logits - lse[..., None]), vt.float().unsqueeze(1))
    return out, lse


def _varlen_prefix(layer: HeadKVLayer, qg: torch.Tensor, scaling: float, softcap: float | None, backend: str):
    """The prefix through a varlen kernel: KV head h is sequence h. Every new token attends to the whole
    prefix (no causal mask), so the group's query heads and the new tokens are that sequence's query rows,
    one head each: no GQA support is needed from the kernel."""
    heads, group, q, d = qg.shape
    rows = group * q
    qv = qg.reshape(heads * rows, 1, d)
    kv, vv = layer.pk.unsqueeze(1), layer.pv.unsqueeze(1)  # (N, 1, dim)
    cu_q = torch.arange(0, (heads + 1) * rows, rows, dtype=torch.int32, device=qg.device)
    longest = max(layer.lens)
    if backend == "flash":
        from flash_attn import flash_attn_varlen_func

        out, lse, _ = flash_attn_varlen_func(qv, kv, vv, cu_q, layer.cu_seqlens, rows, longest, dropout_p=0.0,
                                             softmax_scale=scaling, causal=False, softcap=softcap or 0.0,
                                             return_attn_probs=True)
    else:
        varlen_attn, aux = _torch_varlen()
        out, lse = varlen_attn(qv, kv, vv, cu_q, layer.cu_seqlens, rows, longest, scale=scaling,
                               return_aux=aux(lse=True))
    # out (heads * rows, 1, dim); lse (1, heads * rows) from flash-attn, (heads * rows, 1) from torch
    return out.reshape(heads, group, q, d).float(), lse.reshape(heads, group, q).float()


def _merge(out_a, lse_a, out_b, lse_b) -> torch.Tensor:
    """Combine two attentions over disjoint key sets from their outputs and log-sum-exps."""
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)
    return (out_a * wa[..., None] + out_b * wb[..., None]) / (wa + wb)[..., None]
