"""Attention computed from queries and keys, the way headprof's attention function needs it: fp32 softmax rows
of a few queries (what a capture hands its sink), outputs of soft-capped layers and of layers with learned attention
sinks in query chunks (SDPA has neither; no L x L matrix is formed), and one half-precision decode step as the
official HeadKV modelling file computes it. Plain tensor functions, with no state: capture.py and the cache kinds
call them.
"""

from __future__ import annotations

import torch


def official_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step the way the official HeadKV modelling file computes it (`forward_torch`): keys and values
    repeated per query head, QK^T divided by sqrt(d) in the model's dtype, the mask added, softmax in fp32 cast
    back to the dtype, then times the values. The layout matters, not only the order of operations: on CPU a
    half-precision matmul of grouped rows (the query heads of a KV head together) sometimes rounds the weighted sum
    of the values otherwise than one row per head does, and a late near-tie then decodes another token.
    Returns (output (batch, 1, heads, dim), probabilities in the model's dtype (batch, heads, 1, keys)); `--preset`
    scores half-precision runs with these, token for token the script's."""
    b, h, q_len, d = query.shape
    group = h // key.shape[1]
    key = key.repeat_interleave(group, dim=1) if group > 1 else key
    value = value.repeat_interleave(group, dim=1) if group > 1 else value
    logits = torch.matmul(query, key.transpose(-1, -2)) / (1.0 / scaling)
    if attention_mask is not None and attention_mask.dim() == 4:
        rows = attention_mask[:, :, -q_len:, :key.shape[2]]
        logits = (logits.masked_fill(~rows, torch.finfo(logits.dtype).min) if rows.dtype == torch.bool
                  else logits + rows.to(logits.dtype))
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2), probs


def attention_probs(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                    scaling: float, sliding_window: int | None, softcap: float | None,
                    start: int, stop: int, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax rows (fp32) of queries [start, stop) over all keys, (batch, query_heads, rows, keys).

    Keys are grouped, not repeated: query head h reads KV head h // group. `sinks` (query_heads,): a learned logit
    per head (gpt-oss's `s_aux`) that joins every row's softmax and reads no value, so a row sums to less than 1.
    """
    b, h, q_len, d = query.shape
    hkv, k_len = key.shape[1], key.shape[2]
    # (b, hkv, group * rows, d) @ (b, hkv, d, keys): one matmul per KV head, the keys never copied per group
    q = query[:, :, start:stop, :].float().reshape(b, hkv, h // hkv * (stop - start), d)
    logits = torch.matmul(q, key.float().transpose(-1, -2)) * scaling
    logits = logits.reshape(b, h, stop - start, k_len)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if attention_mask is not None and attention_mask.dim() == 4:
        rows = attention_mask[:, :, start:stop, :k_len]
        if rows.dtype == torch.bool:
            logits = logits.masked_fill(~rows, float("-inf"))
        else:
            logits = logits + rows.float()
    else:  # no 4D mask: causal, aligned bottom-right, optional window and 2D padding mask
        qpos = torch.arange(start, stop, device=key.device) + (k_len - q_len)
        kpos = torch.arange(k_len, device=key.device)
        allowed = kpos[None, :] <= qpos[:, None]
        if sliding_window is not None:
            allowed &= (qpos[:, None] - kpos[None, :]) < sliding_window
        allowed = allowed[None, None]
        if attention_mask is not None and attention_mask.dim() == 2:
            allowed = allowed & attention_mask[:, None, None, -k_len:].bool()
        logits = logits.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        sink = sinks.float().reshape(1, h, 1, 1).expand(b, h, stop - start, 1)
        return torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :k_len]
    return torch.softmax(logits, dim=-1)


def explicit_attention(query, key, value, attention_mask, scaling, sliding_window, softcap,
                       sinks: torch.Tensor | None = None, chunk: int = 512) -> torch.Tensor:
    """Attention output for soft-capped layers and layers with learned sinks (`attention_probs`) without an L x L
    matrix; returns (b, q, h, d)."""
    b, h, q_len, _ = query.shape
    hkv = key.shape[1]
    v = value.unsqueeze(2)  # (b, hkv, 1, k, d)
    out = []
    for start in range(0, q_len, chunk):
        stop = min(start + chunk, q_len)
        p = attention_probs(query, key, attention_mask, scaling, sliding_window, softcap, start, stop, sinks)
        if attention_mask is not None:  # a left-padding row sees no key: zeros, not NaN, as SDPA gives
            p = p.nan_to_num(0.0)
        p = p.to(value.dtype).reshape(b, hkv, h // hkv, stop - start, -1)
        out.append(torch.matmul(p, v).reshape(b, h, stop - start, -1))
    return torch.cat(out, dim=2).transpose(1, 2).contiguous()
