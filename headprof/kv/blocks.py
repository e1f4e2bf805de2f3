"""Layers that attend over compressed blocks of tokens beside their window's tokens (DeepSeek-V4's compressed-sparse
and heavily compressed attention), read as attention over tokens so that their heads can be scored.

Such a layer's cache is the model's own (transformers' `DeepseekV4CSACache` / `DeepseekV4HCACache`): a sliding
window of the last tokens plus a compressor that turns every `compress_rate` tokens into one entry. Its attention
reads the window's keys and then one key per entry, so a row's columns are not token positions. `token_rows`
hands each entry's attention to the tokens it was compressed from, shared evenly: a heavily compressed entry to its
`rate` tokens, a compressed-sparse entry to the `2 * rate` tokens of its two overlapping windows (entry 0: its own
window only, the earlier slot being empty). A row stays a distribution over tokens (its mass is kept), and a head
scores on a token as far as its attention singles that token out: attention on a block of 128 tokens that holds the
answer counts 1/128 of it per token. Compressing these layers is refused (`layout.check_compressible`).
"""

from __future__ import annotations

import torch


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
