"""The cache headprof hands a model: one layer per model layer, each of a kind (`base.LayerKind`), and the cache's
accounting.

The kinds live in this package, a module each: per-KV-head segments (`heads.py`, with its hybrid variant), the MLA
latent (`latent.py`), layers left to transformers (`native.py`), a model's own cache class (`own_cache.py`) and the
reserved full cache that scoring decodes with (`decode_cache.py`). `HeadKVCache` picks each layer's kind when it is
made and from then on hands every operation to its layers' kinds, never asking which they are.
"""

from __future__ import annotations

import contextvars

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from headprof.errors import ModelError
from headprof.kv.base import LayerKind
from headprof.kv.blocks import BlockWindowLayer
from headprof.kv.heads import SLACK, HeadKVLayer, HybridHeadKVLayer, free_slots
from headprof.kv.inline import InlineHeadKVLayer
from headprof.kv.latent import IndexedLatentLayer, LatentLayer
from headprof.kv.native import kind_of
from headprof.kv.split import HybridSplitLayer, SplitLayer
from headprof.layout import BLOCK_KINDS, LOCAL_KIND

# The layer whose cache was updated last: the layer an attention call belongs to when its module does not say
# (a block shared by several layers, as in Zamba, carries layer_idx -1 and hands the real one to the cache).
LAST_UPDATE: contextvars.ContextVar[int | None] = contextvars.ContextVar("headprof_last_update", default=None)
# The layer and key count the last update of a scoring cache returned, until attention written inline reads it: the
# softmax over that many keys that follows is that layer's attention (`legacy.InlineRows`)
LAST_KEYS: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("headprof_last_keys", default=None)
# A compressed inline layer's mask of held keys (`LayerKind.softmax_mask`), until that softmax hides the rest
PENDING_MASK: contextvars.ContextVar[tuple[int, torch.Tensor] | None] = contextvars.ContextVar(
    "headprof_pending_mask", default=None)


def check_masked() -> None:
    """Refuse a step in which a compressed inline layer's keys were read without its mask (the model's attention
    would have read zeros for the keys its heads dropped), and clear the mask."""
    pending = PENDING_MASK.get()
    if pending is not None:
        PENDING_MASK.set(None)
        raise ModelError(f"layer {pending[0]}'s inline attention did not run the softmax headprof masks its "
                         "compressed keys in; its result would be wrong")


def layer_of(module) -> int | None:
    """The layer index an attention call belongs to: its module's, or the last cache update's."""
    idx = getattr(module, "layer_idx", None)
    return idx if isinstance(idx, int) and idx >= 0 else LAST_UPDATE.get()


def _transformers_layer(kind: str, window: int | None):
    """The cache layer transformers makes for a layer of this kind (its table), with the layer's window."""
    try:
        from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING
    except ImportError:
        return DynamicSlidingWindowLayer(window) if window else DynamicLayer()
    cls = DYNAMIC_LAYER_TYPE_MAPPING.get(kind, DynamicLayer)
    return cls(sliding_window=window) if window else cls()


def _compressed_layer_for(kind: str, window: int | None, slack: float, latent: bool, native_layer,
                          holder: str = "heads", inline: bool = False, blocks: bool = False) -> DynamicLayer:
    """The compressed layer of a model layer of `kind`: an MLA latent's, or the method's kind (`holder`: "heads",
    per-head segments; "split", full and streaming pools), with a hybrid layer's state beside it; a layer whose
    attention is written inline holds per-head segments read by position (`inline.py`); a block layer (and a sliding
    layer of a model with block layers, `blocks`) its window, read by position, beside the model's blocks."""
    if kind in BLOCK_KINDS or (blocks and kind == "sliding_attention"):  # (a block model has one mask for all)
        if holder != "heads" or native_layer is None or not window:
            raise ModelError(f"headprof cannot hold a {holder} cache for {kind} layers beside the model's own blocks; "
                             "per-head methods can")
        return BlockWindowLayer(native_layer, window, slack)
    if inline:
        if holder != "heads" or latent or kind != "full_attention":
            raise ModelError(f"headprof cannot hold a {holder} cache for attention written inline as matmuls "
                             f"({kind} layers); per-head methods can")
        return InlineHeadKVLayer(window, slack)
    if latent:
        return IndexedLatentLayer() if kind == "indexed_attention" else LatentLayer()
    if holder == "split":
        if kind in ("hybrid", "hybrid_sliding"):
            return HybridSplitLayer(getattr(native_layer, "number_of_states", 1))
        return SplitLayer()
    if holder != "heads":
        raise ValueError(f"unknown cache-layer kind {holder!r}")
    if kind in ("hybrid", "hybrid_sliding"):
        return HybridHeadKVLayer(window, slack, getattr(native_layer, "number_of_states", 1))
    return HeadKVLayer(window, slack)


class HeadKVCache(Cache):
    """One layer per model layer: a compressible kind where heads are compressed, transformers' own otherwise.

    `kinds[i]`: transformers' layer type (`layout.layer_kinds`); `compress[i]`: whether the layer's heads are
    compressed (a full-attention layer, or a sliding one compressed inside its window `windows[i]`). Every
    other layer is `native[i]`, the layer transformers makes for the model (`native.model_layers`), or else the
    cache layer transformers makes for its kind, with its window. `latent`: layers whose cache is an MLA latent;
    `holder`: the kind a method's compressed layers take (its `cache_kind`); `sinks`: layers whose attention adds
    learned sink logits (their compressed kinds are told, and read them); `inline`: layers whose attention is written
    inline as matmuls (their compressed kind returns keys by position and a mask for their softmax).
    """

    def __init__(self, kinds: list[str], compress: list[bool], windows: list[int | None],
                 slack: float = SLACK, native: list | None = None, latent: tuple[int, ...] = (),
                 holder: str = "heads", sinks: tuple[int, ...] = (), inline: tuple[int, ...] = ()) -> None:
        native = native if native and len(native) == len(kinds) else [None] * len(kinds)
        blocks = any(kind in BLOCK_KINDS for kind in kinds)
        layers = [_compressed_layer_for(kind, w, slack, i in latent, own, holder, i in inline, blocks) if squeeze
                  else own if own is not None else _transformers_layer(kind, w)
                  for i, (kind, squeeze, w, own) in enumerate(zip(kinds, compress, windows, native, strict=True))]
        super().__init__(layers=layers)
        self.kinds: list[LayerKind] = [kind_of(layer) for layer in layers]
        for i in sinks:
            if compress[i]:
                self.kinds[i].sinks = True
        self._last = len(layers)  # the last layer updated: a lower one starts a forward pass
        self._owners: dict[int, LayerKind] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx <= self._last:  # a forward pass starts (its first layer with keys need not be layer 0)
            self._grow(key_states.shape[-2])
            self._owners = {}
        self._last = layer_idx
        LAST_UPDATE.set(layer_idx)
        check_masked()  # the previous inline layer's softmax took its mask
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        kind = self.kinds[layer_idx]
        LAST_KEYS.set((layer_idx, out[0].shape[-2]))  # attention written inline reads its rows from its softmax
        mask = kind.softmax_mask()
        if mask is not None:
            PENDING_MASK.set((layer_idx, mask))
        if kind.reads(out[0]):
            self._owners[id(out[0])] = kind  # layers that share this layer's KV attend with what it returned
        return out

    def _grow(self, q: int) -> None:
        """When the `q` new tokens overflow any layer's room, lay out every layer that grows with the others again,
        in one go, with the same free slots per head (`heads.free_slots`): they then run out together again. A
        growth is one burst of work every few tokens, not one layer's bookkeeping interrupting the forward pass at
        every token, and the free room is sized on the whole cache's bytes."""
        if not any(kind.overflows(q) for kind in self.kinds):
            return
        free = free_slots(self.kinds, q)
        for kind in self.kinds:
            kind.grow(q, free)

    def compressible(self) -> list[int]:
        """The layers a method's plan compresses (at prefill, as their attention rows exist)."""
        return [i for i, kind in enumerate(self.kinds) if kind.compressible]

    def row_limit(self) -> tuple[int, str] | None:
        """(the most sequences this cache can hold once compressed, the kind that limits it), or None: any batch."""
        limits = [(kind.max_rows, kind.name) for kind in self.kinds if kind.compressible and kind.max_rows is not None]
        return min(limits) if limits else None

    def reader(self, layer_idx: int | None, key: torch.Tensor):
        """The compressed layer that reads itself for attention over `key` (what an `update` just returned): layer
        `layer_idx`'s own, or, for a layer that reuses an earlier layer's KV (Gemma 3n), that layer; else None."""
        kind = self.kinds[layer_idx] if layer_idx is not None and layer_idx < len(self.kinds) else None
        if kind is not None and kind.reads(key):
            return kind
        owner = getattr(self, "_owners", {}).get(id(key))
        return owner if owner is not None and owner.reads(key) else None

    def compress(self, layer: int, keep: list[torch.Tensor]) -> None:
        self.kinds[layer].compress(keep)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the batch's sequences `indices` (the others ended) in every layer, whatever it holds."""
        for kind in self.kinds:
            kind.select_rows(indices)

    def entries(self) -> int:
        return held_entries(self)

    def nbytes(self) -> int:
        return held_bytes(self)

    def kept_counts(self, layout, window: int, row: int = 0, batch: int = 1) -> list[list[int]]:
        """Per layer and KV head, the prompt tokens row `row` kept beyond the observation window (0 for a layer
        that is not compressed; an MLA latent's one selection counts for each of its heads)."""
        out = []
        for i, kind in enumerate(self.kinds):
            kept = kind.kept_counts(row, batch)
            heads = layout.kv_heads(i)
            out.append([0] * heads if kept is None else
                       [n - window for n in kept] * (heads // len(kept) if len(kept) < heads else 1))
        return out

    def ideal_counts(self, layout, seq: int, appended: int, row: int = 0, batch: int = 1) -> list[int]:
        """Per layer, what row `row` would hold with no free room: each compressed head its kept prompt tokens and
        the `appended` ones; every other layer what the model's own layer holds after `seq` tokens."""
        return [kind.ideal(full, appended, row, batch)
                for kind, full in zip(self.kinds, full_layer_counts(layout, seq), strict=True)]


def leave(cache: Cache, active: list, ended: list[int], device) -> tuple[list, torch.Tensor | None]:
    """Rows `ended` of a batch leave `cache` (any cache: each layer drops them as its kind does). Returns what
    `active` (one entry per row) keeps and the kept rows' indices, or None when no row is left."""
    keep = [r for r in range(len(active)) if r not in ended]
    if not keep:
        return [], None
    index = torch.tensor(keep, device=device)
    cache.batch_select_indices(index)
    return [active[r] for r in keep], index


# The cache's accounting, one owner for generation, eval, `run --json` and the benchmarks. "Held" is what the
# tensors of a cache occupy now (a compressed layer's keys, values, slot positions and masks); "full" is what the
# model's own cache holds for the same sequence; "ideal" is what a compressed cache would hold with no slack.

def layer_bytes(layer) -> int:
    """Bytes of the tensors a cache layer holds for its tokens, of any cache (headprof's or transformers')."""
    return kind_of(layer).nbytes()


def held_entries(cache: Cache) -> int:
    return sum(kind_of(layer).entries() for layer in cache.layers)


def row_entries(cache: Cache, row: int, batch: int) -> int:
    """KV entries row `row` of a batch holds, in any cache: its own segments in compressed layers, its rows (with
    their padding) in every other layer."""
    return sum(kind_of(layer).row_entries(row, batch) for layer in cache.layers)


def held_bytes(cache: Cache) -> int:
    """Bytes the cache's tensors hold now (what `run` and `eval` report as KV bytes)."""
    return sum(layer_bytes(layer) for layer in cache.layers)


def full_layer_entries(kind: str, window: int | None, seq: int, kv_heads: int) -> int:
    """Entries the model's own cache layer of this kind holds after `seq` tokens (a sliding layer: its window)."""
    if kind in ("dummy", "linear_attention", "conv"):  # no KV of its own (shared, or a state that is not KV)
        return 0
    return (min(seq, window) if window and kind not in ("full_attention", "hybrid", LOCAL_KIND) else seq) * kv_heads


def full_layer_counts(layout, seq: int) -> list[int]:
    """Per layer, the entries the model's own cache holds after `seq` tokens (one latent per token in an MLA
    layer, else one per KV head)."""
    windows = layout.layer_windows or [layout.sliding_window if k == "sliding_attention" else None
                                       for k in layout.attention_kinds]
    return [full_layer_entries(kind, w, seq, 1 if i in getattr(layout, "latent", ()) else layout.kv_heads(i))
            for i, (kind, w) in enumerate(zip(layout.attention_kinds, windows, strict=True))]


def state_bytes(cache: Cache) -> int:
    """Bytes of what the model keeps beside its KV and no method compresses (`LayerKind.state_nbytes`), the same in
    a compressed cache and the full one: part of the full and ideal bytes as of the held ones."""
    return sum(kind_of(layer).state_nbytes() for layer in cache.layers)


def counts_bytes(layout, counts: list[int], elem: int) -> int:
    """Bytes of per-layer entry `counts` at `elem` bytes a number, each layer at its own entry size (layers' heads
    may differ in size, and an MLA latent's entry is the latent)."""
    return sum(n * layout.entry_size(i) * elem for i, n in enumerate(counts))
