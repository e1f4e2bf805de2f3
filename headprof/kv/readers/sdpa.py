"""`torch`: PyTorch's fused scaled-dot-product attention over the per-head layer's strided views, for any device and
dtype; with soft-capping (which SDPA lacks) one explicit matmul and softmax instead. Every layer can be read so: it is
the reader the others fall back to on the layers they do not take."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from headprof.kv.readers.views import by_bucket

NAME = "torch"
MASKED = True
SINKS = True
DEVICES = None
SLIDING = True


def unavailable(device: str, dtype: torch.dtype) -> str | None:
    return None


def handles(layer) -> bool:
    return True


def entries_read(layer) -> int:
    """Entries a decode step reads: every column of every window of each bucket's view (a masked layer's whole
    room), whatever its segment holds."""
    return sum((b.hi - b.lo) * layer.width(i) for i, b in enumerate(layer.buckets))


def read(layer, rows: torch.Tensor, q: int, scaling: float, softcap: float | None,
         sinks: torch.Tensor | None = None) -> torch.Tensor:
    """(1, heads, group * q, dim) rows in window order -> their outputs, one fused call per bucket."""
    return by_bucket(layer, rows, q, scaling, softcap, _bucket, masked=True, sinks=sinks)


def _bucket(layer, bucket: int, view, rows: torch.Tensor, q: int, scaling: float,
                  softcap: float | None, sinks: torch.Tensor | None = None) -> torch.Tensor:
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
    return dense(rows, k, v, scaling, softcap, mask, sinks)


def dense(rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, softcap: float | None,
          mask: torch.Tensor | None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """(b, heads, rows, d) over (b, heads, keys, d) with an additive mask: fused SDPA, or with soft-capping or learned
    sinks (b or 1, heads, rows), which SDPA lacks, one explicit matmul and softmax."""
    if softcap is None and sinks is None:
        return F.scaled_dot_product_attention(rows, k, v, scale=scaling, attn_mask=mask)
    logits = torch.matmul(rows * scaling, k.transpose(-1, -2)).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if mask is not None:
        logits = logits + mask
    if sinks is None:
        probs = torch.softmax(logits, dim=-1)
    else:  # the sink joins the softmax and reads no value
        sink = sinks.float()[..., None].expand(*logits.shape[:-1], 1)
        probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)
