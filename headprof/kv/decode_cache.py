"""The full (uncompressed) KV cache that scoring decodes a batch of probes with.

Prompts are prefilled one at a time (a lone prompt keeps a CPU's working set small and needs no
padding, so each prompt's keys are exactly what it gets alone) and their keys and values are copied,
left-padded, into one buffer per layer that is reserved for the longest decode up front: a decode step
then writes one slot instead of copying the whole cache as `torch.cat` growth does, and dropping a
finished probe selects rows of the buffer. Key index = left padding + position, on every layer.

Layers that are not plain keys and values (a hybrid model's Mamba or linear-attention state, an indexer's keys, a
KV-shared layer) are the model's own layers (`native.py`), joined row by row.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from headprof.kv import native, own_cache
from headprof.kv.cache import LAST_KEYS, LAST_UPDATE


class ReservedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are views into buffers with room reserved to grow into.

    `keys`/`values` stay what transformers expects: (batch, kv_heads, length, head_dim) tensors."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        super().__init__()
        self._keys, self._values = keys, values  # (batch, kv_heads, reserved, head_dim)
        self.length = length
        self.is_initialized = True
        self.device, self.dtype = keys.device, keys.dtype
        self._expose()

    def _expose(self) -> None:
        self.keys = self._keys[:, :, :self.length]
        self.values = self._values[:, :, :self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[-2]
        if self.length + n > self._keys.shape[-2]:  # past the reservation: grow by doubling
            room = max(self.length + n, 2 * self._keys.shape[-2]) - self._keys.shape[-2]
            pad = (0, 0, 0, room)
            self._keys = torch.nn.functional.pad(self._keys, pad)
            self._values = torch.nn.functional.pad(self._values, pad)
        self._keys[:, :, self.length:self.length + n] = key_states
        self._values[:, :, self.length:self.length + n] = value_states
        self.length += n
        self._expose()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._keys, self._values = self._keys[indices], self._values[indices]
        self._expose()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a scoring cache is never cropped")


class PaddedPrefill:
    """Collects prompts prefilled one at a time into one left-padded cache of `rows` probes.

    `add(row, cache, pad)` copies a lone prompt's cache (`alone`) to row `row` after `pad` empty slots;
    `cache()` returns the joined cache, `reserve` slots longer than `width` for the decode steps."""

    def __init__(self, rows: int, width: int, reserve: int) -> None:
        self.rows, self.width, self.reserve = rows, width, reserve
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.others: dict[int, list] = {}  # layers that are not plain keys and values: each row's own
        self.pads: list[int] = []
        self.layers = 0
        self.cache_class: type = ScoringCache  # the rows' (a model's own cache class too, `own_cache`)

    def add(self, row: int, cache: DynamicCache, pad: int) -> None:
        self.layers = max(self.layers, len(cache.layers))
        self.pads.append(pad)
        self.cache_class = type(cache)
        for i, layer in enumerate(cache.layers):
            if not native.is_plain(layer) or layer.keys is None:  # never updated (a cross-attention layer on text)
                self.others.setdefault(i, []).append(layer)
                continue
            k, v = layer.keys, layer.values  # (1, kv_heads, n, head_dim)
            if i not in self.keys:
                shape = (self.rows, k.shape[1], self.width + self.reserve, k.shape[-1])
                self.keys[i] = torch.zeros(shape, dtype=k.dtype, device=k.device)
                self.values[i] = torch.zeros(shape[:-1] + (v.shape[-1],), dtype=v.dtype, device=v.device)
            self.keys[i][row, :, pad:pad + k.shape[-2]] = k[0]
            self.values[i][row, :, pad:pad + v.shape[-2]] = v[0]

    def cache(self) -> DynamicCache:
        cache = ScoringCache()
        cache.__class__ = self.cache_class
        cache.layers = [ReservedLayer(self.keys[i], self.values[i], self.width) if i in self.keys
                        else native.join(self.others[i], self.pads) for i in range(self.layers)]
        return cache


def alone(config) -> DynamicCache:
    """The cache one prompt is prefilled into: attention layers keep every key, other layers are the model's own."""
    cache = ScoringCache()
    layers = native.full_layers(config)
    if layers:
        cache.layers, cache.layer_class_to_replicate = layers, None
    return own_cache.adapt(cache, config)


class ScoringCache(DynamicCache):
    """The joined cache (and a lone prompt's): finished rows leave every kind of layer; each update says which layer
    the attention call that follows belongs to (`cache.layer_of`)."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        LAST_UPDATE.set(layer_idx)
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        LAST_KEYS.set((layer_idx, out[0].shape[-2]))
        return out

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for layer in self.layers:
            native.select_rows(layer, indices)
