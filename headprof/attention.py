"""Attention of the new tokens over a compressed layer: one call per layer (or per bucket) for all KV heads.

Each KV head reads its own segment of the layer's buffer (`cache.py`): the prompt tokens it kept and the
tokens generated since, causal among the new tokens. The layer hands over strided (heads, width, dim)
views, a window per head (one view, or one per bucket of heads of similar sizes: `cache.buckets_of`), and a mask of
what each window may read. Two backends compute the same thing:

- `torch`: PyTorch's fused scaled-dot-product attention over the view, for any device and dtype; with
  soft-capping (which SDPA lacks) one explicit matmul and softmax instead.
- `flash`: flash-attn's `flash_attn_with_kvcache` over the same view, each head a batch entry whose keys
  run from `cache_leftpad` to `cache_seqlens`, the group's query heads sharing its one KV head. CUDA,
  fp16/bf16, layers without a sliding window whose values are as wide as their keys; chosen with
  `HEADPROF_ATTENTION=flash` (its semantics read off flash-attn 2.8.4's sources: `cache_seqlens` is an
  end index, the kernel reads keys from `cache_leftpad` up to it).

Layers whose heads all keep the same count (SnapKV, StreamingLLM; PyramidKV where a layer's budget divides
evenly among its heads, else its heads differ by one token) are a plain dense view with no mask and always
take `torch`.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
import torch.nn.functional as F

from headprof.cache import HeadKVLayer
from headprof.errors import HeadprofError

BACKENDS = ("flash", "torch")


def available(device: torch.device | str, dtype: torch.dtype, softcap: float | None = None,
              sliding: bool = False) -> list[str]:
    """Backends that can run here, the default first."""
    out = ["torch"]
    if not sliding and unavailable("flash", torch.device(device).type, dtype) is None:
        out.append("flash")
    return out


def unavailable(backend: str, device: str, dtype: torch.dtype) -> str | None:
    """Why `backend` can run on no layer of a model on `device` in `dtype` (None: it runs on the layers it
    handles; the others take `torch`, as documented above)."""
    if backend != "flash":
        return None
    if device != "cuda":
        return f"flash-attn runs on CUDA only, not {device}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn needs float16 or bfloat16, not {str(dtype).removeprefix('torch.')}"
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed (pip install \"headprof[gpu]\")"
    return None


def pick(device, dtype, softcap: float | None = None, sliding: bool = False) -> str:
    return _pick(torch.device(device).type, dtype, softcap, sliding, os.environ.get("HEADPROF_ATTENTION"))


@functools.cache
def _pick(device: str, dtype: torch.dtype, softcap: float | None, sliding: bool, wanted: str | None) -> str:
    """The default backend, or the one `HEADPROF_ATTENTION` forces: refused in one line where it can run on no
    layer (a benchmark or a run labelled with a backend must have used it), left to `torch` on the layers it
    does not handle."""
    options = available(device, dtype, softcap, sliding)
    if wanted:
        if wanted not in BACKENDS:
            raise HeadprofError(f"HEADPROF_ATTENTION={wanted}: use one of {', '.join(BACKENDS)}")
        why = unavailable(wanted, device, dtype)
        if why:
            raise HeadprofError(f"HEADPROF_ATTENTION={wanted}: {why}; unset it to use the default backend")
        if wanted in options:
            return wanted
    return options[0]


def attend(layer: HeadKVLayer, query: torch.Tensor, scaling: float, softcap: float | None,
           backend: str | None = None) -> torch.Tensor:
    """query (batch, query_heads, q, dim) -> output (batch, q, query_heads, dim), as transformers expects.

    The group's query heads and the new tokens are the rows of one (1, segments, group * q, dim) batch, a segment
    per sequence and KV head, so each KV head of each sequence meets its own queries without repeating keys. A
    decode step is a handful of tensor operations whatever the number of heads or sequences (a test counts them)."""
    b, hq, q, d = query.shape
    heads = layer.heads
    rows = query.reshape(1, heads, hq * b // heads * q, d)  # sequence s's query head h reads its KV head h // group
    if not layer.in_order:  # window i belongs to KV head win.order[i]
        rows = rows.index_select(1, layer.order)
    if backend is None:
        if layer.backend is None:  # decided once per layer (equal counts are a dense view: always torch;
            # flash-attn wants values as wide as keys)
            torch_only = layer.uniform or layer.k.shape[-1] != layer.v.shape[-1]
            layer.backend = "torch" if torch_only else pick(query.device, query.dtype, softcap,
                                                            layer.sliding_window is not None)
        backend = layer.backend
    flash = backend == "flash"
    out = _by_bucket(layer, rows, q, scaling, softcap, _flash_bucket if flash else _torch_bucket, masked=not flash)
    if not layer.in_order:
        out = out.index_select(1, layer.unorder)
    if q == 1:
        return out.view(b, 1, hq, -1)
    return out.view(b, hq, q, -1).transpose(1, 2)


def _by_bucket(layer: HeadKVLayer, rows: torch.Tensor, q: int, scaling: float, softcap: float | None,
               one, masked: bool = True) -> torch.Tensor:
    """(1, heads, group * q, dim) in window order -> the same shape: `one` per bucket of windows (`cache.Bucket`),
    over that bucket's rows (`masked`: with the additive masks, which flash-attn does not read)."""
    views = layer.view(masked)
    if len(views) == 1:
        return one(layer, 0, views[0], rows, q, scaling, softcap)
    return torch.cat([one(layer, i, view, rows[:, b.lo:b.hi], q, scaling, softcap)
                      for i, (b, view) in enumerate(zip(layer.buckets, views, strict=True))], 1)


def _torch_bucket(layer: HeadKVLayer, bucket: int, view, rows: torch.Tensor, q: int, scaling: float,
                  softcap: float | None) -> torch.Tensor:
    """One bucket's (1, n, group * q, dim) rows over its view (batched 4-D: PyTorch's fused CPU kernel, not its
    math path)."""
    k, v, mask = view  # (1, n, width, d), mask (1, n, 1, width) additive
    if q > 1 or layer.sliding_window is not None:  # causal among the new tokens; the window, if any
        kpos = layer.view_positions(bucket)[None, :, None, :]
        group = rows.shape[2] // q
        qpos = (layer.seen - q + torch.arange(q, device=rows.device, dtype=kpos.dtype)).repeat(group)[:, None]
        hidden = kpos > qpos
        if layer.sliding_window is not None:
            hidden |= kpos <= qpos - layer.sliding_window
        mask = torch.where(hidden, float("-inf"), rows.new_zeros(()) if mask is None else mask)
    if softcap is None:
        return F.scaled_dot_product_attention(rows, k, v, scale=scaling, attn_mask=mask)
    logits = torch.matmul(rows * scaling, k.transpose(-1, -2))
    logits = torch.tanh(logits / softcap) * softcap
    if mask is not None:
        logits = logits + mask
    return torch.matmul(torch.softmax(logits, dim=-1, dtype=torch.float32).to(v.dtype), v)


def _flash_bucket(layer: HeadKVLayer, bucket: int, view, rows: torch.Tensor, q: int, scaling: float,
                  softcap: float | None) -> torch.Tensor:
    """flash-attn over one bucket's windows: head i is batch entry i with one KV head; its keys run from the
    window's own start (`cache_leftpad`) to its last filled slot (`cache_seqlens`, an end index)."""
    from flash_attn import flash_attn_with_kvcache

    k, v, _ = view
    _, heads, width, d = k.shape
    first, end = layer.window_bounds(bucket)
    qg = rows.view(heads, -1, q, rows.shape[-1]).transpose(1, 2)  # (heads, q, group, dim)
    out = flash_attn_with_kvcache(qg, k.view(heads, width, 1, d), v.view(heads, width, 1, d),
                                  cache_seqlens=end, cache_leftpad=first, softmax_scale=scaling,
                                  causal=q > 1, softcap=softcap or 0.0)
    return out.transpose(1, 2).reshape(1, heads, -1, out.shape[-1])  # back to (1, heads, group * q, dim)
