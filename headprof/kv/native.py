"""Layers headprof leaves to transformers: state that is not keys and values (Mamba, linear attention,
convolution), layers with no KV of their own, and the state beside the keys in a hybrid layer.

Their cache layers are the ones transformers itself makes for the model (`model_layers`, from the model's config),
never copied key by key. Scoring decodes a batch of probes, each prefilled alone; `join` makes the batch's layer
from the rows' own layers (states stacked along the batch, keys left-padded) and `select_rows` drops finished rows.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import (
    DummyLayer,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionAndFullAttentionLayer,
    LinearAttentionAndSlidingWindowAttentionLayer,
    LinearAttentionCacheLayerMixin,
    LinearAttentionLayer,
)

from headprof.kv.base import LayerKind

# what a block layer's own cache (DeepSeek-V4's) keeps beside its window: the compressors' entries and buffers
BLOCK_STATE = ("compressed_kv", "buffer_kv", "buffer_gate", "overlap_kv", "overlap_gate")


def model_layers(config) -> list:
    """The cache layers transformers makes for `config`'s model, one per layer (empty when it infers them lazily)."""
    return list(DynamicCache(config=config).layers)


def full_layers(config) -> list:
    """The model's own layers, except that attention keeps every key (no window): scoring finds the answer span by
    position on every layer."""
    out = []
    for layer in model_layers(config):
        if isinstance(layer, LinearAttentionAndSlidingWindowAttentionLayer):
            layer = LinearAttentionAndFullAttentionLayer(number_of_states=layer.number_of_states)
        elif type(layer) is DynamicSlidingWindowLayer:
            layer = DynamicLayer()
        out.append(layer)
    return out


def is_plain(layer) -> bool:
    """A layer of keys and values only (what scoring copies into its reserved buffers)."""
    return type(layer) is DynamicLayer


def has_state(layer) -> bool:
    return isinstance(layer, LinearAttentionCacheLayerMixin)


def join(rows: list, pads: list[int]):
    """One layer for a batch from each row's own layer (prefilled alone): linear states stacked along the batch,
    keys and values (and an indexer's keys) left-padded by `pads`."""
    first = rows[0]
    if isinstance(first, DummyLayer):
        return first
    out = copy.copy(first)
    if has_state(first):
        out.conv_states, out.recurrent_states = dict(first.conv_states), dict(first.recurrent_states)
        for i in range(first.number_of_states):
            for name in ("conv_states", "recurrent_states"):
                parts = [getattr(r, name)[i] for r in rows]
                if all(p is not None for p in parts):
                    getattr(out, name)[i] = torch.cat(parts, 0)
        _copy_length(first, out, pads[0])  # the batch's rows are as long as the first one with its padding
    if isinstance(first, DynamicLayer) and getattr(first, "keys", None) is not None and first.keys.numel():
        out.keys = torch.cat([F.pad(r.keys, (0, 0, p, 0)) for r, p in zip(rows, pads, strict=True)], 0)
        out.values = torch.cat([F.pad(r.values, (0, 0, p, 0)) for r, p in zip(rows, pads, strict=True)], 0)
        if getattr(first, "indexer_keys", None) is not None and first.indexer_keys.numel():
            out.indexer_keys = torch.cat([F.pad(r.indexer_keys, (0, 0, p, 0)) for r, p in zip(rows, pads, strict=True)],
                                         0)
    return out


def select_rows(layer, indices: torch.Tensor) -> None:
    """Keep rows `indices` of a batch layer, whatever it holds."""
    if has_state(layer):
        layer.reorder_cache(indices)  # linear states (and a hybrid layer's keys) by index_select
    else:
        layer.batch_select_indices(indices)


def select_rows_of_state(layer, indices: torch.Tensor) -> None:
    """Keep (or repeat) rows `indices` of a layer's linear-attention state only, not of its keys."""
    LinearAttentionLayer.reorder_cache(layer, indices)


def copy_state(src, dst) -> None:
    """Give `dst` its own copy of the linear-attention state `src` holds (a shared prefill's, for one eval cell)."""
    for name in ("conv_states", "recurrent_states"):
        setattr(dst, name, {i: None if t is None else t.clone() for i, t in getattr(src, name).items()})
    for name in ("is_conv_states_initialized", "is_recurrent_states_initialized", "has_previous_state",
                 "conv_kernel_size"):
        setattr(dst, name, dict(getattr(src, name)))
    dst.device, dst.dtype = src.device, src.dtype
    _copy_length(src, dst)


def _copy_length(src, dst, extra: int = 0) -> None:
    """The tokens a linear-attention layer has seen (transformers >= 5.25 counts them on the layer, and the cache's
    length is read from layer 0, which a hybrid model may make linear): `dst` gets its own counter, so that
    generation feeds only the tokens after it."""
    length = getattr(src, "cumulative_length_linear", None)
    if isinstance(length, torch.Tensor):
        dst.cumulative_length_linear = length.clone() + extra


def copy_indexer(src, dst) -> None:
    """Give `dst` the sparse-attention indexer keys `src` holds (a shared prefill's), if it holds any."""
    keys = getattr(src, "indexer_keys", None)
    if isinstance(keys, torch.Tensor) and keys.numel() and hasattr(dst, "update_indexer"):
        dst.update_indexer(keys)


def dense_entries(layer) -> int:
    """KV entries (tokens x KV heads) of a layer that keeps its keys as transformers does (batch 1)."""
    keys = getattr(layer, "keys", None)
    return 0 if keys is None or keys.numel() == 0 else keys.shape[1] * keys.shape[2]


def dense_row_entries(layer, batch: int) -> int:
    """KV entries one row of a batch of `batch` holds in such a layer (its padding included)."""
    keys = getattr(layer, "keys", None)
    if isinstance(keys, torch.Tensor) and keys.dim() == 4 and keys.shape[0] == batch:
        return keys.shape[1] * keys.shape[2]
    return 0


def dense_bytes(layer) -> int:
    """Bytes of a layer's keys and values (once where they are one tensor, as DeepSeek-V4's), and of the compressors'
    state a block layer keeps beside them, of any cache (headprof's or transformers')."""
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    held = [keys] + ([] if values is keys else [values]) + block_state(layer)
    return sum(t.numel() * t.element_size() for t in held if isinstance(t, torch.Tensor))


def block_state(layer) -> list[torch.Tensor]:
    """The tensors a block layer's compressors hold (none for any other layer)."""
    return [t for name in BLOCK_STATE for t in (getattr(layer, name, None) or {}).values()
            if isinstance(t, torch.Tensor)]


class Native(LayerKind):
    """The kind of a layer transformers makes and headprof leaves alone: it holds every token it holds for the
    model, compresses nothing, and drops rows as transformers does."""

    name = "native"

    def __init__(self, layer) -> None:
        self.native = layer

    def select_rows(self, indices: torch.Tensor) -> None:
        select_rows(self.native, indices)

    def entries(self) -> int:
        return dense_entries(self.native)

    def row_entries(self, row: int, batch: int) -> int:
        return dense_row_entries(self.native, batch)

    def nbytes(self) -> int:
        return dense_bytes(self.native)

    def state_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in block_state(self.native))


def kind_of(layer) -> LayerKind:
    """The kind of a cache layer: headprof's layers are their own kind; any other is transformers' (`Native`)."""
    return layer if isinstance(layer, LayerKind) else Native(layer)
