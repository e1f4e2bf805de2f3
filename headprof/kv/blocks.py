"""Layers that attend over compressed blocks of tokens beside their window's tokens (DeepSeek-V4's compressed-sparse
and heavily compressed attention), read as attention over tokens so that their heads can be scored.

Such a layer's cache is the model's own (transformers' `DeepseekV4CSACache` / `DeepseekV4HCACache`): a sliding
window of the last tokens plus a compressor that turns every `compress_rate` tokens into one entry. Its attention
reads the window's keys and then one key per entry, so a row's columns are not token positions. `token_rows`
hands each entry's attention to the tokens it was compressed from, shared evenly: a heavily compressed entry to its
`rate` tokens, a compressed-sparse entry to the `2 * rate` tokens of its two overlapping windows (entry 0: its own
window only, the earlier slot being empty). A row stays a distribution over tokens (its mass is kept), and a head
scores on a token as far as its attention singles that token out: attention on a block of 128 tokens that holds the
answer counts 1/128 of it per token.

Compressed, such a layer keeps what a method selects inside its window (`BlockWindowLayer`: its one KV head's
tokens, as a sliding layer compressed inside its window) and its compressed blocks as the model makes them (they are
already the compression of everything older). Its attention is the model's own call over the window's keys and then
the blocks, so the layer returns its window by position (`kv.inline`) with a mask of the tokens it holds, which
headprof's attention function applies to the model's mask before the softmax (`capture`).
"""

from __future__ import annotations

import torch

from headprof.kv.heads import SLACK
from headprof.kv.inline import InlineHeadKVLayer
from headprof.kv.native import BLOCK_STATE, block_state


class BlockWindowLayer(InlineHeadKVLayer):
    """A block layer's window, compressed per KV head (keys only: the layer reads its keys as its values), beside the
    model's own cache layer `own`, which keeps the compressors' state and answers the compressors' calls."""

    name = "per-head window (compressed blocks beside it)"
    key_fill = 0.0  # the keys are the values too: a masked key must stay finite (0 x NaN is NaN)
    max_rows = 1  # its compressors count windows per sequence, which a left-padded batch would shift

    def __init__(self, own, sliding_window: int, slack: float = SLACK) -> None:
        super().__init__(sliding_window, slack)
        self.own = own

    def __getattr__(self, name: str):
        # the compressors' calls (`store_compression_weights`, `entry_count`, ...) go to the model's own layer
        own = self.__dict__.get("own")
        if own is None:
            raise AttributeError(name)
        return getattr(own, name)

    @property
    def cumulative_length(self) -> int:
        return self.seen

    def update(self, key_states, value_states, *args, **kwargs):
        self._step = key_states.shape[-2]
        keys, _ = super().update(key_states, key_states[..., :0], *args, **kwargs)
        return keys, keys

    def first_returned(self) -> int:
        """As the model's own layer: the window's last `sliding_window - 1` tokens before this step, and its tokens."""
        return max(0, self.seen - self._step - self.sliding_window + 1)

    def token_rows(self, probs: torch.Tensor) -> torch.Tensor:
        return probs[..., :self.seen]  # at prefill the layer returned every token, then the model appended its blocks

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if not self.compressed:
            return self.seen + query_length, 0
        first = max(0, self.seen - self.sliding_window + 1)
        return self.seen - first + query_length, first

    def tensors(self) -> list[torch.Tensor]:
        return super().tensors() + block_state(self.own)

    def state_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in block_state(self.own))

    def select_rows(self, indices: torch.Tensor) -> None:
        super().select_rows(indices)
        for name in BLOCK_STATE:
            states = getattr(self.own, name, None) or {}
            for key, t in states.items():
                if isinstance(t, torch.Tensor):
                    states[key] = t.index_select(0, indices.to(t.device))


def token_rows(probs: torch.Tensor, layer, kind: str) -> torch.Tensor:
    """`probs` (batch, heads, rows, window keys + entries) of one sequence's block layer, as rows over its tokens
    (batch, heads, rows, tokens so far): window keys at their positions, each entry's attention shared by its
    tokens."""
    total = int(layer.cumulative_length)
    entries = int(layer.entry_count["compressor"])
    rate = int(layer.compress_rate)
    window = probs.shape[-1] - entries
    out = probs.new_zeros(*probs.shape[:-1], total)
    out[..., total - window:] = probs[..., :window]
    if entries:
        block = probs[..., window:]
        if kind == "heavily_compressed_attention":
            out[..., :entries * rate] += (block / rate).repeat_interleave(rate, -1)
        else:  # entry e: window e's tokens (its second series) and window e - 1's (its first)
            size = torch.full((entries,), 2.0 * rate, device=probs.device)
            size[0] = rate
            share = block / size
            out[..., :entries * rate] += share.repeat_interleave(rate, -1)
            out[..., :(entries - 1) * rate] += share[..., 1:].repeat_interleave(rate, -1)
    return out
