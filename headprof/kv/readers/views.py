"""The per-head layer's strided views, read one bucket at a time (`segments.Bucket`): what the SDPA and flash-attn
readers share."""

from __future__ import annotations

import torch


def by_bucket(layer, rows: torch.Tensor, q: int, scaling: float, softcap: float | None,
              one, masked: bool = True, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """(1, heads, group * q, dim) in window order -> the same shape: `one` per bucket of windows (`segments.Bucket`),
    over that bucket's rows (`masked`: with the additive masks, which flash-attn does not read; `sinks`: the rows'
    learned sink logits (1, heads, group * q), handed on where given)."""
    views = layer.view(masked)
    if len(views) == 1:
        return one(layer, 0, views[0], rows, q, scaling, softcap, **({} if sinks is None else {"sinks": sinks}))
    return torch.cat([one(layer, i, view, rows[:, b.lo:b.hi], q, scaling, softcap,
                          **({} if sinks is None else {"sinks": sinks[:, b.lo:b.hi]}))
                      for i, (b, view) in enumerate(zip(layer.buckets, views, strict=True))], 1)
