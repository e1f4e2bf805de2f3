"""The head layout of a causal LM: its layers, their kinds (transformers' own table) and their heads.

One [layer, head] grid per model: a profile's scores and a compressed cache's budgets are indexed by it. Read from
the config (`layout_of`); the attached model's tensors refine it (`capture.verify`: layers without heads, MLA
latents).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from headprof.errors import ModelError


@dataclass(frozen=True)
class HeadLayout:
    """Where the heads are. Query head h of layer l reads KV head h // group(l)."""

    num_layers: int
    num_query_heads: int
    num_kv_heads: int
    head_dim: int
    attention_kinds: tuple[str, ...]  # transformers' layer type per layer (`layer_kinds`)
    sliding_window: int | None  # the sliding layers' window
    layer_windows: tuple[int | None, ...] = ()  # per layer: its sliding window or attention chunk, else None
    no_heads: tuple[int, ...] = ()  # layers with no attention heads (Mamba, linear attention, MLP-only): not scored
    latent: tuple[int, ...] = ()  # layers whose cache holds one latent shared by all their heads (MLA)
    latent_dim: int = 0  # numbers per token in such a layer's cache (latent + shared rotary key)
    reused_index: tuple[int, ...] = ()  # sparse-attention layers that reuse an earlier layer's top-k (GLM-5)
    # per layer, where layers cache different numbers of KV heads (MiMo-V2-Flash's sliding layers cache twice its
    # full layers'); `num_kv_heads` is then the widest layer's, the [layer, kv_head] grid's width, and a layer's
    # KV heads beyond its own count are absent (no score, no budget)
    layer_kv_heads: tuple[int, ...] = ()
    # per layer, where layers differ in query heads (dots.3's sliding layers: half its indexed layers'); the grid is
    # then `num_query_heads` (the widest layer's) wide and a layer's query heads beyond its own count are absent
    layer_query_heads: tuple[int, ...] = ()
    # per layer, where layers' heads differ in size (Gemma 4's full-attention layers: 512 beside 256); `head_dim` is
    # then the most common size. A layer's segments never share a buffer with another layer's, so each layer is
    # compressed with its own size.
    layer_head_dims: tuple[int, ...] = ()
    # layers whose attention adds a learned sink logit per query head (gpt-oss's `s_aux`): scored and run on the
    # full cache and compressed alike, with the explicit softmax (`attention.explicit_attention`, `readers.sdpa`)
    sinks: tuple[int, ...] = ()
    # layers whose attention a compressed cache cannot serve, with why (`capture.verify`: values changed after the
    # cache update, keys other than the cache's, one softmax run twice): scored from their rows, never compressed
    # (kept as the model keeps them beside layers that are; a model with no other layer is refused compression)
    barred: tuple[tuple[str, tuple[int, ...]], ...] = ()
    # layers that cache one tensor read as both keys and values (DeepSeek-V4's windows)
    keys_are_values: tuple[int, ...] = ()
    # layers whose attention is written inline as matmuls, read from their softmax (`legacy.InlineRows`); compressed,
    # their cache returns keys by position and their softmax hides what each head dropped (`kv.inline`)
    inline: tuple[int, ...] = ()

    @property
    def group_size(self) -> int:
        return self.num_query_heads // self.num_kv_heads

    def query_heads(self, layer: int) -> int:
        """The query heads of layer `layer`."""
        return self.layer_query_heads[layer] if self.layer_query_heads else self.num_query_heads

    def kv_heads(self, layer: int) -> int:
        """The KV heads layer `layer` caches."""
        return self.layer_kv_heads[layer] if self.layer_kv_heads else self.num_kv_heads

    def head_size(self, layer: int) -> int:
        """The size of one head's key (and value) in layer `layer`."""
        return self.layer_head_dims[layer] if self.layer_head_dims else self.head_dim

    def entry_size(self, layer: int) -> int:
        """Numbers one cached token of one KV head (or of an MLA latent) takes in layer `layer`: key and value (the
        key alone where it is the value too)."""
        if self.is_latent(layer):
            return self.latent_dim
        return (1 if layer in self.keys_are_values else 2) * self.head_size(layer)

    def group(self, layer: int) -> int:
        """Query heads per KV head in layer `layer`: query head h reads KV head h // group."""
        return self.query_heads(layer) // self.kv_heads(layer)

    def present(self) -> np.ndarray:
        """[layer, kv_head] bool: the KV heads each layer really has (all, unless layers differ)."""
        counts = np.array([self.kv_heads(i) for i in range(self.num_layers)])
        return np.arange(self.num_kv_heads)[None, :] < counts[:, None]

    def has_heads(self, layer: int) -> bool:
        return layer not in self.no_heads

    def is_latent(self, layer: int) -> bool:
        return layer in self.latent


# transformers' names for what each layer's cache holds (the layer-type table of `transformers.cache_utils`), and
# what headprof does with each:
# - attention with keys and values per KV head: scored, and compressed per head (`cache.HeadKVLayer`); "hybrid"
#   layers also hold a linear-attention state, which stays as transformers keeps it;
# - state that is not keys and values (Mamba, linear attention, convolution): no heads to score, no budget, left
#   exactly as the model's own cache keeps it (`native.py`);
# - "dummy": no KV of its own (KV shared with an earlier layer, or an MLP/MoE-only layer): transformers' own layer;
# - "chunked_attention" (Llama 4's local layers): scored, and kept as the model keeps them (transformers' own layer,
#   which never holds more than one chunk); the budget goes to the other layers;
# - "indexed_attention" (DeepSeek sparse attention): compressed where its cache is an MLA latent (`latent.py`, the
#   indexer's keys cut with it);
# - "local_attention" (headprof's name, GPT-Neo's local layers): treated as a sliding layer whose own cache keeps
#   every token (its window is in its attention: `legacy.py`);
# - any other kind: scored, but compressing methods refuse the model in one line.
# Layers whose cache holds one latent shared by all heads (MLA) are found from the tensors (`latent.py`).
LOCAL_KIND = "local_attention"  # headprof's name: attention inside a window over a cache of every token (GPT-Neo)
COMPRESSIBLE_KINDS = ("full_attention", "sliding_attention", "hybrid", "hybrid_sliding", LOCAL_KIND)
STATE_KINDS = ("linear_attention", "conv")
CACHELESS_KINDS = ("dummy",)
KEPT_KINDS = ("chunked_attention",)  # attention layers a compressed cache leaves as the model keeps them
INDEXED_KINDS = ("indexed_attention",)  # compressible where the layer's cache is an MLA latent
SLIDING_KINDS = ("sliding_attention", "hybrid_sliding", LOCAL_KIND)
# attention that reads compressed blocks of tokens appended after its cache's window (DeepSeek-V4's compressed-sparse
# and heavily compressed layers): scored with each block's attention shared by its tokens, compressed in the window
# (`kv/blocks.py`)
BLOCK_KINDS = ("compressed_sparse_attention", "heavily_compressed_attention")


def layer_kinds(config) -> tuple[list[str], list[int | None]]:
    """Per layer: transformers' layer type and its window (sliding window or attention chunk), read from
    transformers' own table, so that a kind headprof does not know is never taken for full attention."""
    text = config.get_text_config()
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
    except ImportError:  # a transformers without the table: its explicit layer_types, or one kind for all
        window = getattr(text, "sliding_window", None)
        kinds = getattr(text, "layer_types", None) or [
            "sliding_attention" if window else "full_attention"] * text.num_hidden_layers
        return list(kinds), [window if k == "sliding_attention" else None for k in kinds]
    local = getattr(text, "attention_layers", None)
    if getattr(text, "window_size", None) and isinstance(local, list) and "local" in local:
        # GPT-Neo's "local" layers: a window in their attention over a cache that keeps every token
        return ([LOCAL_KIND if k == "local" else "full_attention" for k in local],
                [text.window_size if k == "local" else None for k in local])
    kinds, kwargs = get_layer_types_and_kwargs(text)
    return list(kinds), [kw.get("sliding_window") for kw in kwargs]


def _head_shapes(text, layers: list[int]) -> list[tuple[int, int, int]]:
    """(query heads, KV heads, head dim) of the given layers; models with per-layer configs may differ by layer."""
    configs = getattr(text, "per_layer_config", None) or [text] * text.num_hidden_layers
    shapes = []
    for i in layers:
        c = configs[i]
        decoder = getattr(c, "decoder_attention_heads", None)
        if decoder:  # the causal LM of an encoder-decoder config is its decoder (Whisper's, BART's): heads of its own
            shapes.append((decoder, decoder, c.d_model // decoder))
            continue
        heads = c.num_attention_heads
        shapes.append((heads, getattr(c, "num_key_value_heads", None) or heads,
                       getattr(c, "head_dim", None) or c.hidden_size // heads))
    return shapes


def _attribute(config, name: str):
    """`config.name`, None where it has none; a per-layer attribute (which transformers refuses to read as one value)
    reads as the first layer's."""
    try:
        return getattr(config, name, None)
    except Exception:  # AmbiguousGlobalPerLayerAttributeError
        return getattr(config.per_layer_config[0], name, None)


def layout_of(config) -> HeadLayout:
    """The model's head layout. Layers may differ in head size, KV heads and query heads (the [layer, head] grid is
    the widest layer's; each layer is compressed with its own size); a model with no attention is refused."""
    text = config.get_text_config()
    kinds, windows = layer_kinds(config)
    stateful = [i for i, k in enumerate(kinds) if k in STATE_KINDS]
    attending = [i for i in range(len(kinds)) if i not in stateful]
    if not _attribute(text, "num_attention_heads") or not attending:
        raise ModelError(f"{config.model_type} is attention-free (its layers are recurrent or linear-attention "
                         "state, with no attention heads): headprof scores and compresses attention heads")
    shapes = dict(zip(attending, _head_shapes(text, attending), strict=True))
    queries = {i: s[0] for i, s in shapes.items()}
    heads = max(queries.values())
    kv = {i: s[1] for i, s in shapes.items()}
    odd = [i for i, n in kv.items() if queries[i] % n]
    if odd:
        raise ModelError(f"the {kv[odd[0]]} KV heads of layers {layer_list(odd)} do not divide their "
                         f"{queries[odd[0]]} query heads; headprof cannot tell which query heads read them")
    # a block layer's window is the model's sliding window (transformers' table names none for it)
    windows = [w or (getattr(text, "sliding_window", None) if k in BLOCK_KINDS else None)
               for k, w in zip(kinds, windows, strict=True)]
    dims = {i: s[2] for i, s in shapes.items()}
    common = max(set(dims.values()), key=list(dims.values()).count)
    widest = max(kv.values())
    sliding = [w for k, w in zip(kinds, windows, strict=True) if k in SLIDING_KINDS and w]
    return HeadLayout(num_layers=text.num_hidden_layers, num_query_heads=heads, num_kv_heads=widest,
                      head_dim=common, attention_kinds=tuple(kinds),
                      sliding_window=sliding[0] if sliding else None, layer_windows=tuple(windows),
                      no_heads=tuple(stateful),
                      layer_kv_heads=_per_layer(kv, text.num_hidden_layers, widest),
                      layer_query_heads=_per_layer(queries, text.num_hidden_layers, heads),
                      layer_head_dims=_per_layer(dims, text.num_hidden_layers, common))


def one_value(shapes: dict[int, tuple[int, ...]], at: int, what: str, why: str) -> int:
    """The one value of field `at` the layers share, or a one-line ModelError naming the layers of each value."""
    seen: dict[int, list[int]] = {}
    for i, shape in shapes.items():
        seen.setdefault(shape[at], []).append(i)
    if len(seen) > 1:
        described = "; ".join(f"{n} {what} in layers {layer_list(ls)}" for n, ls in seen.items())
        raise ModelError(f"this model's layers differ in their {what} ({described}); {why}")
    return next(iter(seen))


def _per_layer(values: dict[int, int], layers: int, default: int) -> tuple[int, ...]:
    """Per layer (layers without heads take `default`), or () where every layer has the same value."""
    if len(set(values.values())) <= 1:
        return ()
    return tuple(values.get(i, default) for i in range(layers))


def layer_list(layers: list[int]) -> str:
    return ", ".join(map(str, layers[:6])) + (f" (+{len(layers) - 6})" if len(layers) > 6 else "")


def compressible(layout: HeadLayout, layer: int) -> bool:
    """Whether a compressing method can compress this layer's kind (heads aside)."""
    kind = layout.attention_kinds[layer]
    if any(layer in layers for _, layers in layout.barred):
        return False
    return kind in COMPRESSIBLE_KINDS + BLOCK_KINDS or (kind in INDEXED_KINDS and layout.is_latent(layer)
                                          and layer not in layout.reused_index)


def unsupported_kinds(layout: HeadLayout) -> dict[str, list[int]]:
    """Layer kinds a compressed cache cannot handle yet, with their layers (empty for every shipped model); a barred
    layer is kept as the model keeps it, whatever its kind."""
    out: dict[str, list[int]] = {}
    barred = {i for _, layers in layout.barred for i in layers}
    for i, kind in enumerate(layout.attention_kinds):
        if i in barred:
            continue
        if kind in INDEXED_KINDS and i in layout.reused_index:
            kind = "indexed_attention reusing an earlier layer's top-k"
        elif kind in INDEXED_KINDS and layout.is_latent(i):
            continue
        if kind not in COMPRESSIBLE_KINDS + BLOCK_KINDS + CACHELESS_KINDS + STATE_KINDS + KEPT_KINDS:
            out.setdefault(kind, []).append(i)
    return out


def check_compressible(layout: HeadLayout) -> None:
    """A one-line ModelError naming the layers a compressing method cannot handle yet, or saying that the model
    has no layer a method could compress (naming why, where its layers are barred). Barred layers beside layers a
    method can compress are kept as the model keeps them, and a run's notes say so (`barred_why`)."""
    bad = unsupported_kinds(layout)
    if bad:
        kinds = "; ".join(f"{kind} in layers {layer_list(ls)}" for kind, ls in bad.items())
        raise ModelError(f"headprof cannot compress this model's KV cache yet ({kinds}); only full and "
                         "sliding-window attention layers: run it with --method full, or score its heads only")
    if not any(layout.has_heads(i) and compressible(layout, i) for i in range(layout.num_layers)):
        if layout.barred:
            raise ModelError(f"headprof cannot compress this model's KV cache ({barred_why(layout)}): run it with "
                             "--method full, or score its heads only")
        raise ModelError("this model has no attention layer with a KV cache of its own to compress: run it with "
                         "--method full, or score its heads only")


def barred_why(layout: HeadLayout) -> str:
    return "; ".join(f"{reason} in layer{'s' * (len(ls) > 1)} {layer_list(list(ls))}" for reason, ls in layout.barred)
