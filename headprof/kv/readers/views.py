"""The per-head layer's strided views, read one bucket at a time (`segments.Bucket`): what the SDPA and flash-attn
readers share."""

from __future__ import annotations

import torch


def by_bucket(layer, rows: torch.Tensor, q: int, scaling: float, softcap: float | None,
              one, masked: bool = True) -> torch.Tensor:
    """(1, heads, group * q, dim) in window order -> the same shape: `one` per bucket of windows (`segments.Bucket`),
    over that bucket's rows (`masked`: with the additive masks, which flash-attn does not read)."""
    views = layer.view(masked)
    if len(views) == 1:
        return one(layer, 0, views[0], rows, q, scaling, softcap)
    return torch.cat([one(layer, i, view, rows[:, b.lo:b.hi], q, scaling, softcap)
                      for i, (b, view) in enumerate(zip(layer.buckets, views, strict=True))], 1)
