"""The per-head kind for attention written inline as matmuls (Bloom, MPT, XGLM, the BERT family as decoders).

Such a layer computes its attention in the model's own code from what its cache returns: there is no call to hand
the compressed segments to. So once compressed, `update` returns keys and values as long as the sequence, each
held entry at its own position, and `softmax_mask` says which keys each head holds; the first softmax over those
keys (`legacy.InlineRows`) hides the others. Every position-dependent term the model computes from the key index
(ALiBi, relative buckets, its causal and padding masks) then sees each kept key where it was. A model that reads
the keys elsewhere too (ProphetNet's predicting streams) is found by `capture.verify` and not compressed.

What the layer holds is the per-head segments and each slot's position (`HeadKVLayer` with `keeps_positions`);
the full-length tensors exist for one layer's attention call, as the model's own layer would hold them. A
compressed step whose mask no softmax took is an error, never a full-cache result (`kv.cache.HeadKVCache`).
"""

from __future__ import annotations

import numpy as np
import torch

from headprof.kv.heads import SLACK, HeadKVLayer, _on


class InlineHeadKVLayer(HeadKVLayer):
    """`HeadKVLayer`, read by the model's own inline attention: full-length keys and values by position, and the
    mask of what each head holds."""

    name = "per-head (inline attention)"
    keeps_positions = True
    key_fill = float("nan")  # a key no head holds: whatever reads it unmasked turns to NaN

    def __init__(self, sliding_window: int | None = None, slack: float = SLACK) -> None:
        super().__init__(sliding_window, slack)
        # per filled-or-free slot of the segments (laid out by `_ready`): its buffer row, its segment, its offset in
        # the segment and its segment's kept tokens (device arrays; a step compares offsets with kept + generated)
        self._slots = self._owner = self._offset = self._kept = None
        self._held: torch.Tensor | None = None

    def _ready(self) -> None:
        super()._ready()
        size = self.seg.kept_w + self.room  # per window, in window order: its segment's kept and room slots
        offset = np.arange(size.sum()) - np.repeat(np.cumsum(size) - size, size)
        device = self.kv.device
        self._slots = _on(np.repeat(np.asarray(self.win.start, dtype=np.int64), size) + offset, device)
        self._owner = _on(np.repeat(self.seg.order.astype(np.int64), size), device)
        self._offset = _on(offset.astype(np.int64), device)
        self._kept = _on(np.repeat(self.seg.kept_w.astype(np.int64), size), device)

    def update(self, key_states, value_states, *args, **kwargs):
        out = super().update(key_states, value_states, *args, **kwargs)
        if not self.compressed:
            self._held = None
            return out
        return self._by_position()

    def first_returned(self) -> int:
        """The first position `update` returns (every position from it to the last is returned)."""
        return 0

    def _by_position(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, KV heads, seen, dim) keys and values with every held entry at its position; elsewhere NaN keys
        (read only through the mask, else the result shows it: `capture.verify` checks this) and zero values (the
        masked probabilities are 0). The mask of held keys goes to `softmax_mask`. A few tensor operations, whatever
        the number of heads."""
        segs, first = self.heads, self.first_returned()
        span = self.seen - first
        pos = self.positions.index_select(0, self._slots).long() - first
        held = (self._offset < self._kept + self.generated) & (pos >= 0)
        spare = segs * span  # one row past the others: where free slots are written, then dropped
        target = torch.where(held, self._owner * span + pos, spare)
        entries = self.kv.index_select(0, self._slots)
        dense = entries.new_zeros((spare + 1, entries.shape[-1]))
        dense[:, :self.key_dim] = self.key_fill
        dense = dense.index_copy_(0, target, entries)[:spare]
        mask = torch.zeros(spare + 1, dtype=torch.bool, device=entries.device).index_fill_(0, target, True)
        shape = (self.batch, segs // self.batch, span)
        self._held = mask[:spare].view(shape)
        dense = dense.view(*shape, -1)
        return dense[..., :self.key_dim].contiguous(), dense[..., self.key_dim:].contiguous()

    def softmax_mask(self) -> torch.Tensor | None:
        return self._held
