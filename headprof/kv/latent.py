"""The MLA latent: a layer whose cache holds one compressed latent per token, shared by all its heads.

DeepSeek-V2/V3, MiniCPM3, GLM-4-MoE-lite and kin cache, per token, a latent (`[batch, 1, seq, kv_lora_rank]`
as "keys" and the shared rotary key as "values") and expand it into every head's keys and values after the cache
update. Every head of such a layer reads the same tokens, so compression keeps one token selection per layer:
`shared_positions` turns the method's per-head picks into one list of the layer's mean budget (HeadKV: the layer's
share of the head scores), the positions most heads chose first. `LatentLayer` then holds only those tokens'
latents, so the memory is really freed; the heads' attention over them runs through headprof's attention function
(`attend`), causal among the new tokens by its own mask.

DeepSeek-V3.2's sparse attention (`indexed_attention`) adds an indexer that picks, for each query, the top keys by
its own per-token keys: `IndexedLatentLayer` cuts those keys to the same tokens and sizes the model's masks to the
tokens held, so the indexer picks among what the layer holds and its mask lines up with the latent. transformers
builds that mask once for all such layers, so they all keep the same number of tokens (`common_count`: the mean of
their budgets), each its own selection.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.cache_utils import DynamicIndexedLayer, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from headprof.attention import explicit_attention
from headprof.errors import HeadprofError
from headprof.kv import native
from headprof.kv.base import LayerKind


def shared_positions(picks: list[torch.Tensor], scores: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """One sorted list of `count` prefix positions for all heads (default: as many as the heads keep on average),
    the positions chosen by the most heads first, ties broken by the mean of the heads' scores."""
    prefix = scores.shape[-1]
    if count is None:
        count = round(sum(int(p.numel()) for p in picks) / max(len(picks), 1))
    if count <= 0 or prefix == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    votes = torch.bincount(torch.cat(picks).to(scores.device), minlength=prefix)[:prefix]
    tie = torch.nan_to_num(scores.float(), neginf=-1e30).mean(0)
    order = torch.argsort(tie, descending=True)
    order = order[torch.argsort(votes[order], descending=True, stable=True)]
    return order[:min(count, prefix)].sort().values


def common_count(budgets: np.ndarray, layers: list[int]) -> int:
    """The tokens every sparse-attention latent layer keeps: the mean per-head budget of `layers`."""
    return round(float(budgets[layers].mean())) if layers else 0


class LatentLayer(LayerKind, DynamicLayer):
    """transformers' dynamic layer for a latent, which `compress` cuts to one selection of tokens. Positions keep
    counting from the prompt length (`seen`), so RoPE and the masks continue where the prompt ended."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0
        self.kept = 0
        self.compressed = False

    def update(self, key_states, value_states, *args, **kwargs):
        self.seen += key_states.shape[-2]
        return super().update(key_states, value_states, *args, **kwargs)

    def compress(self, keep: list[torch.Tensor]) -> None:
        if len(keep) != 1:
            raise ValueError("a latent layer keeps one selection for all its heads")
        pos = keep[0].to(self.keys.device)
        self.keys, self.values = self.keys[:, :, pos].contiguous(), self.values[:, :, pos].contiguous()
        self.kept, self.compressed = int(pos.numel()), True

    @property
    def lens(self) -> list[int]:
        return [self.kept] if self.compressed else []

    # the kind's interface (`base.LayerKind`)
    name = "MLA latent"
    compressible = True
    max_rows = 1  # one selection per layer: a compressed latent holds one sequence

    def select_rows(self, indices: torch.Tensor) -> None:
        if self.compressed:
            raise HeadprofError("a compressed MLA latent holds one sequence")
        native.select_rows(self, indices)

    def entries(self) -> int:
        return native.dense_entries(self)

    def row_entries(self, row: int, batch: int) -> int:
        return native.dense_row_entries(self, batch)

    def nbytes(self) -> int:
        return native.dense_bytes(self)

    def ideal(self, full: int, appended: int, row: int = 0, batch: int = 1) -> int:
        return self.kept + appended if self.compressed else full

    def kept_counts(self, row: int = 0, batch: int = 1) -> list[int] | None:
        return [self.kept] if self.compressed else None

    def reads(self, key: torch.Tensor) -> bool:
        return self.compressed

    def attend(self, module, query, key, value, attention_mask, scaling: float, softcap: float | None,
               sinks: torch.Tensor | None = None):
        """Every head over the kept tokens' expanded keys, causal among the new tokens only (the model's mask counts
        every prompt position; this layer holds fewer). A mask sized to the tokens held (a sparse attention's
        top-k, `IndexedLatentLayer`) is applied as well."""
        q_len, k_len = query.shape[2], key.shape[2]
        mask = None
        if q_len > 1:
            mask = (torch.arange(k_len, device=key.device)[None, :]
                    <= torch.arange(k_len - q_len, k_len, device=key.device)[:, None])[None, None]
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 and attention_mask.shape[-1] == k_len:
            if mask is None:
                mask = attention_mask
            elif attention_mask.dtype == torch.bool:
                mask = mask & attention_mask
            else:
                mask = attention_mask.masked_fill(~mask, torch.finfo(attention_mask.dtype).min)
        if softcap is not None or sinks is not None:
            return explicit_attention(query, key, value, mask, scaling, None, softcap, sinks), None
        return sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, is_causal=False)

    def held(self) -> int:
        """Tokens held (kept and generated)."""
        return 0 if self.keys is None or self.keys.numel() == 0 else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0


class IndexedLatentLayer(LatentLayer, DynamicIndexedLayer):
    """A latent with a sparse-attention indexer's keys, cut to the same tokens; the model's masks cover the tokens
    held (the indexer scores them, and its top-k mask is then one column per held token)."""

    def compress(self, keep: list[torch.Tensor]) -> None:
        super().compress(keep)
        if self.indexer_keys is not None and self.indexer_keys.numel():
            self.indexer_keys = self.indexer_keys[:, keep[0].to(self.indexer_keys.device)].contiguous()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.held() + query_length, 0
