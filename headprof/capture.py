"""The one attention-capture mechanism, shared by scoring and compression.

`attach(model)` switches the model to an attention function registered with transformers'
`AttentionInterface`. That function computes the layer's output exactly as the model would (SDPA, or
flash-attn when asked for) and, only while an `AttentionCapture` is active, also computes the softmax
rows of the *last few queries* against all keys: the decode-step query when scoring, the observation
window when compressing. It honours the layer's scaling, GQA grouping, the mask transformers built for
the layer (causal, sliding window, padding) and logit soft-capping. No L x L matrix is ever formed,
no modelling code is copied, and nothing is changed at import time.
"""

from __future__ import annotations

import contextvars
import dataclasses
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, flash_attention_mask, sdpa_mask

from headprof import layout as layouts
from headprof import legacy
from headprof.attention import attention_probs, explicit_attention, official_attention
from headprof.calls import with_cache
from headprof.errors import ModelError
from headprof.kv import own_cache
from headprof.kv.cache import LAST_KEYS, LAST_UPDATE, PENDING_MASK, HeadKVCache, layer_of

SDPA = "headprof"
FLASH = "headprof_flash"
BLOCKS = "headprof_blocks"  # SDPA's function with transformers' eager (additive) masks: models with block layers

RowSink = Callable[[int, torch.Tensor], None]
"""Receives (layer_idx, probs) with probs shaped (batch, query_heads, n_rows, keys), float32."""


class AttentionCapture:
    """While active, hands every layer's attention rows for the last `last_n` queries to `sink`.

    Use as a context manager around a forward pass of a model prepared with `attach`.
    """

    def __init__(self, sink: RowSink, last_n: int = 1, official: bool = False) -> None:
        if last_n < 1:
            raise ValueError("last_n must be >= 1")
        self.sink = sink
        self.last_n = last_n
        self.official = official  # half-precision decode steps as the official modelling file computes them
        self._mask: tuple[torch.Tensor | None, int, int] = (None, 0, 1)  # the rows' mask, keys and sequences
        # per layer, the queries whose rows went to the sink last: a layer that runs one softmax twice (DiffLlama's
        # two halves of its values) hands its rows over once
        self._queries: dict[int | None, weakref.ref] = {}
        self.stopped = False
        self._token: contextvars.Token | None = None

    def pads(self) -> list[int]:
        """Per sequence of the rows just handed to the sink: how many leading keys are padding (a left-padded
        batch); read off the attention mask only when a sink asks (a compressing sink, once per layer)."""
        mask, k_len, batch = self._mask
        if mask is None:
            return [0] * batch
        if mask.dim() == 4:  # a key some query may read is no padding (a sliding layer's last rows read less)
            rows = mask[:, 0, :, :k_len]
            allowed = (rows if rows.dtype == torch.bool else rows > torch.finfo(rows.dtype).min / 2).any(1)
        else:  # a 2D padding mask (flash-attn)
            allowed = mask[:, -k_len:].bool()
        return allowed.int().argmax(-1).tolist()

    def fresh(self, layer: int | None, query: torch.Tensor) -> bool:
        """Whether these queries' rows are new for this layer (False: the layer runs the same softmax again)."""
        if layer in self._queries and self._queries[layer]() is query:
            return False
        self._queries[layer] = weakref.ref(query)
        return True

    def stop(self) -> None:
        """Compute no more rows (compression needs the prefill rows only, not every decode step)."""
        self.stopped = True

    def __enter__(self) -> AttentionCapture:
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._token is not None
        _ACTIVE.reset(self._token)
        self._token = None


_ACTIVE: contextvars.ContextVar[AttentionCapture | None] = contextvars.ContextVar(
    "headprof_capture", default=None
)
_CACHE: contextvars.ContextVar[HeadKVCache | None] = contextvars.ContextVar("headprof_cache", default=None)


@contextmanager
def compressed(cache: HeadKVCache) -> Iterator[HeadKVCache]:
    """While active, layers that `cache` has compressed attend over their kept tokens (`LayerKind.attend`)."""
    token = _CACHE.set(cache)
    try:
        yield cache
    finally:
        _CACHE.reset(token)


def _reader(module, key):
    """The compressed layer (of any kind) that reads itself for this attention call, or None."""
    cache = _CACHE.get()
    return None if cache is None else cache.reader(layer_of(module), key)


_VERIFIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its layout, as the tensors showed it


def attach(model: torch.nn.Module, flash: bool = False) -> str:
    """Route the model's attention through the capture function and check, on one short forward pass, that it
    really runs for every layer that attends (`verify`); returns the implementation name."""
    _register()
    name = FLASH if flash and not legacy.adapt(model) else SDPA  # routed legacy modules take SDPA (`legacy.py`)
    if any(k in layouts.BLOCK_KINDS for k in layouts.layout_of(model.config).attention_kinds):
        name = BLOCKS  # flash-attn takes no additive mask per query: the explicit softmax, as for sinks
    try:
        _set_implementation(model, name)
    except (ValueError, NotImplementedError, AttributeError) as e:
        raise ModelError(f"{model.config.model_type} cannot switch its attention implementation "
                         f"({str(e).splitlines()[0][:100]}); headprof cannot see or compress it") from None
    if model not in _VERIFIED:
        _VERIFIED[model] = verify(model)
    lay = _VERIFIED[model]
    if lay.inline and all(i in lay.inline for i in range(lay.num_layers) if lay.has_heads(i)):
        # attention all written inline: headprof's function is never called, and the model's own code expects the
        # masks of its eager implementation (GIT adds them to its logits)
        _set_implementation(model, "eager")
        name = "eager"
    return name


def layout(model: torch.nn.Module) -> layouts.HeadLayout:
    """The head layout of an attached model: its config's, as one forward pass showed the tensors to be."""
    if model not in _VERIFIED:
        attach(model)
    return _VERIFIED[model]


class _Recorder(DynamicCache):
    """The model's own cache, remembering what each layer's update returned (what attention should then read)."""

    def __init__(self, config) -> None:
        super().__init__(config=config)
        self.returned: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.indexed: set[int] = set()  # layers that ran a sparse-attention indexer of their own

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        LAST_UPDATE.set(layer_idx)
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self.returned[layer_idx] = out
        LAST_KEYS.set((layer_idx, out[0].shape[-2]))
        return out

    def update_indexer(self, indexer_key_states, layer_idx):
        self.indexed.add(layer_idx)
        return super().update_indexer(indexer_key_states, layer_idx)


class _Seen:
    """What the attention function received per layer during `verify`."""

    def __init__(self, recorder: _Recorder) -> None:
        self.recorder = recorder
        self.keys: dict[int, tuple[int, ...]] = {}
        self.calls: dict[int, int] = {}
        self.own_keys: dict[int, bool] = {}
        self.own_values: dict[int, bool] = {}
        self.sinks: set[int] = set()  # layers whose attention adds a learned sink logit per head
        self.query_heads: dict[int, int] = {}
        self.first: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # a layer's first call's queries and keys
        self.repeated: dict[int, bool] = {}  # a layer called again: whether always on its first call's queries and keys
        self.inline: dict[int, tuple[int, ...]] = {}  # layers whose attention is written inline: their rows' shape

    def saw(self, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            sinks: torch.Tensor | None) -> None:
        layer = layer_of(module)
        if layer is None:
            return
        if sinks is not None:
            self.sinks.add(layer)
        self.query_heads[layer] = query.shape[1]
        self.keys[layer] = tuple(key.shape)
        self.calls[layer] = self.calls.get(layer, 0) + 1
        if layer in self.first:
            first = self.first[layer]
            self.repeated[layer] = self.repeated.get(layer, True) and query is first[0] and key is first[1]
            return  # the first call says what the layer attends over
        self.first[layer] = (query, key)
        returned = self.recorder.returned.get(layer)
        if returned is not None:
            self.own_keys[layer] = key is returned[0]
            self.own_values[layer] = value is returned[1]


_SEEN: contextvars.ContextVar[_Seen | None] = contextvars.ContextVar("headprof_seen", default=None)


def _look(model: torch.nn.Module, ids: torch.Tensor) -> tuple[_Recorder, _Seen]:
    """One forward pass of `ids` with a recording cache: what the cache returned and what attention received."""
    config = model.config
    recorder = own_cache.adapt(_Recorder(config), config)
    seen = _Seen(recorder)
    token = _SEEN.set(seen)
    try:
        model(input_ids=ids, **with_cache(model, recorder), use_cache=True)
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"{config.model_type} does not run with a cache headprof hands it ({_error(e)}); headprof "
                         "cannot score or compress it") from None
    finally:
        _SEEN.reset(token)
    return recorder, seen


def _check_inline(model: torch.nn.Module, recorder: _Recorder, seen: _Seen, ids: torch.Tensor) -> None:
    """Layers whose attention is read from their softmax: one cached key per token (their rows' columns are token
    positions), and a decode step over the cache with a mask and positions (how a padded batch of probes decodes)."""
    name = model.config.model_type
    odd = [i for i in seen.inline if i not in recorder.returned or recorder.returned[i][0].shape[-2] != ids.shape[1]]
    if odd:
        raise ModelError(f"{name}'s layers {layouts.layer_list(sorted(odd))}, whose attention is written inline, "
                         "cache other than one key per token; headprof cannot tell which tokens they read")
    n = ids.shape[1]
    try:
        model(input_ids=ids[:, -1:], **with_cache(model, recorder), use_cache=True,
              attention_mask=torch.ones(1, n + 1, dtype=torch.long, device=ids.device),
              position_ids=torch.tensor([[n]], device=ids.device))
    except Exception as e:
        raise ModelError(f"{name}'s attention, written inline, does not decode over a cache with a mask "
                         f"({_error(e)}); headprof cannot score it") from None


def _masked_only(model: torch.nn.Module, recorder: _Recorder, seen: _Seen, ids: torch.Tensor) -> bool:
    """Whether the inline layers read their keys only through the softmax headprof masks: one decode step over a
    cache whose inline layers dropped their first key (NaN there, `kv.inline`) gives finite logits. A second reader
    of the keys (ProphetNet's predicting streams) would turn them to NaN, and a compressed cache would be wrong."""
    lay = layouts.layout_of(model.config)
    inline, n = sorted(seen.inline), ids.shape[1]
    cache = HeadKVCache(list(lay.attention_kinds), [i in seen.inline for i in range(lay.num_layers)],
                        [None] * lay.num_layers, inline=tuple(inline))
    try:
        with compressed(cache):
            model(input_ids=ids, **with_cache(model, cache), use_cache=True)
            for i in inline:
                cache.compress(i, [torch.arange(1, n, device=ids.device)] * recorder.returned[i][0].shape[1])
            out = model(input_ids=ids[:, -1:], **with_cache(model, cache), use_cache=True,
                        attention_mask=torch.ones(1, n + 1, dtype=torch.long, device=ids.device),
                        position_ids=torch.tensor([[n]], device=ids.device))
    except ModelError:
        return False
    return bool(torch.isfinite(out.logits).all())


def _error(e: Exception) -> str:
    """An exception in a few words: its type, and its message's first line where it has one."""
    first = str(e).splitlines()[0][:100] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


@torch.no_grad()
def verify(model: torch.nn.Module) -> layouts.HeadLayout:
    """Run 4 tokens through the model and read off which layers' attention went through headprof's function and
    what their caches hold. Refused in one line (ModelError): attention that bypasses transformers' attention
    interface with no softmax after its cache update to read (headprof would see nothing), a layer attending more
    than once on other queries
    (a loop over shared weights: its heads cannot be told apart), KV heads other than the config's. Found: layers
    without heads (never attended), MLA layers (their cache holds one latent, expanded per head after the update),
    and layers that are scored but never compressed (`HeadLayout.barred`): keys or values other than those their
    cache returned (other than an MLA latent and a block layer's compressed entries after them), one softmax run
    twice over other values, attention written inline (its rows read from its softmax: `legacy.InlineRows`)."""
    config = model.config
    lay = layouts.layout_of(config)
    name = config.model_type
    vocab = getattr(config.get_text_config(), "vocab_size", None) or 4
    ids = (torch.arange(4) % max(1, min(vocab, 4) - 1) + 1)[None].to(model.device)
    recorder, seen = _look(model, ids)
    kinds = lay.attention_kinds
    attends = [i for i, k in enumerate(kinds) if k not in layouts.STATE_KINDS + layouts.CACHELESS_KINDS]
    # cross-attention layers (Mllama) attend over image states only: on text they neither cache nor attend
    cross = set(getattr(config.get_text_config(), "cross_attention_layers", None) or ())
    idle = [i for i in attends if i not in seen.keys and i in cross and i not in recorder.returned]
    missing = [i for i in attends if i not in seen.keys and i not in idle]
    barred: dict[str, list[int]] = {}  # layers scored from their rows that a compressed cache cannot serve
    if missing:  # attention written inline: read from the softmax that follows each layer's cache update
        inline = frozenset(missing)
        legacy.read_inline(model, _inline_rows, lay.query_heads, inline,
                           lambda: _ACTIVE.get() is not None or _SEEN.get() is not None or _CACHE.get() is not None)
        recorder, seen = _look(model, ids)
        missing = [i for i in missing if i not in seen.inline]
        if seen.inline and not missing:
            _check_inline(model, recorder, seen, ids)
            if not _masked_only(model, recorder, seen, ids):
                barred["keys read beyond the softmax headprof masks"] = sorted(seen.inline)
    if missing or not seen.keys and not seen.inline:
        where = "" if len(missing) == len(attends) else f" in layers {layouts.layer_list(missing)}"
        raise ModelError(f"{name}'s attention{where} does not go through transformers' attention interface; "
                         "headprof cannot see or compress it")
    seen.query_heads.update({i: shape[1] for i, shape in seen.inline.items()})
    twice = sorted(i for i, n in seen.calls.items() if n > 1)
    looped = [i for i in twice if not seen.repeated[i]]
    if looped:
        raise ModelError(f"{name} runs the attention of layers {layouts.layer_list(looped)} more than once per "
                         "forward pass (weights or cache shared across steps); headprof cannot tell its heads apart")
    if twice:  # one softmax over other values (DiffLlama's two halves): its rows are read once (`_capture`)
        barred["one softmax run twice over values other than the cache's"] = twice
    # the tensors' query heads (a config may name them per layer type in its own terms: Inkling's sliding layers)
    if any(n != lay.query_heads(i) for i, n in seen.query_heads.items()):
        per_query = tuple(seen.query_heads.get(i, lay.query_heads(i)) for i in range(lay.num_layers))
        lay = dataclasses.replace(lay, num_query_heads=max(per_query),
                                  layer_query_heads=per_query if len(set(per_query)) > 1 else ())
    no_heads = sorted(set(lay.no_heads) | set(idle)
                      | {i for i, k in enumerate(kinds) if k == "dummy" and i not in seen.keys})
    # a block layer (DeepSeek-V4) attends over its cache's keys and then its compressed entries (`kv/blocks.py`)
    blocks = {i for i in seen.own_keys if kinds[i] in layouts.BLOCK_KINDS}
    for i in blocks:
        if seen.keys[i][-2] < recorder.returned[i][0].shape[-2]:
            raise ModelError(f"{name}'s layer {i} attends over fewer keys than its cache returned; headprof cannot "
                             "read its rows")
        seen.own_keys[i] = seen.own_values[i] = True  # its cache's keys come first, as the rows read them
        seen.keys[i] = tuple(recorder.returned[i][0].shape)
    one_tensor: tuple[int, ...] = ()
    if blocks:  # a compressed block model's window holds its keys once, read as values too (`kv/blocks.py`)
        windows = blocks | {i for i in recorder.returned if kinds[i] == "sliding_attention"}
        apart = sorted(i for i in windows if recorder.returned[i][0] is not recorder.returned[i][1])
        if apart:
            barred["a block model's window whose values are not its keys"] = apart
        one_tensor = tuple(sorted(windows - set(apart)))
    cached = {i: seen.keys[i][1] for i in seen.own_keys if seen.own_keys[i]}
    inline_keys = {i: tuple(recorder.returned[i][0].shape) for i in seen.inline}  # what their softmax reads
    cached.update({i: shape[1] for i, shape in inline_keys.items()})
    if cached and all(lay.query_heads(i) % n == 0 for i, n in cached.items()):
        # follow the tensors where they differ from the config: every layer caching other KV heads than it says
        # (multi-query models that say so in their own terms), or layers caching different numbers of KV heads
        # (MiMo-V2-Flash's sliding layers)
        if len(set(cached.values())) == 1:
            lay = dataclasses.replace(lay, num_kv_heads=next(iter(cached.values())), layer_kv_heads=())
        else:
            per_layer = tuple(cached.get(i, lay.kv_heads(i)) for i in range(lay.num_layers))
            lay = dataclasses.replace(lay, num_kv_heads=max(per_layer), layer_kv_heads=per_layer)
    sizes = {i: seen.keys[i][-1] for i in seen.own_keys if seen.own_keys[i]}
    sizes.update({i: shape[-1] for i, shape in inline_keys.items()})
    if sizes and any(n != lay.head_size(i) for i, n in sizes.items()):  # the tensors' head sizes, as with KV heads
        per_size = tuple(sizes.get(i, lay.head_size(i)) for i in range(lay.num_layers))
        common = max(set(per_size), key=per_size.count)
        lay = dataclasses.replace(lay, head_dim=common,
                                  layer_head_dims=per_size if len(set(per_size)) > 1 else ())
    latent, latent_dim = [], 0
    for i, shape in sorted(seen.keys.items()):
        if i not in seen.own_keys:
            continue  # reads another layer's cache (KV sharing): it follows that layer
        cached_k, cached_v = recorder.returned[i]
        if seen.own_keys[i]:
            if shape[1] != lay.kv_heads(i):
                raise ModelError(f"{name}'s layer {i} caches {shape[1]} KV heads, which do not divide its "
                                 f"{lay.query_heads(i)} query heads; headprof cannot tell which heads read them")
            if not seen.own_values[i] and i not in twice:
                barred.setdefault("values changed after the cache update", []).append(i)
        elif cached_k.shape[1] == 1 and cached_k.shape[-2] == shape[-2]:
            latent.append(i)  # one latent for all heads, expanded after the update (MLA)
            latent_dim = cached_k.shape[-1] + cached_v.shape[-1]
        elif shape == tuple(cached_k.shape):  # keys changed after the cache (Kolibri's rounded keys), head by head
            barred.setdefault("keys other than those the cache returned", []).append(i)
        else:  # other heads than the cache's (JetMoE's keys tiled per routed expert): which head reads what is unknown
            raise ModelError(f"{name}'s layer {i} attends over keys other than those its cache returned; headprof "
                             "cannot tell which of its heads read them")
    windowed = [i for i in latent if kinds[i] in layouts.SLIDING_KINDS + ("chunked_attention",)]
    if windowed:  # headprof cuts MLA latents of full-attention layers only
        barred["an MLA latent inside a sliding window"] = windowed
    reused = tuple(i for i in latent if kinds[i] in layouts.INDEXED_KINDS and i not in recorder.indexed)
    return dataclasses.replace(lay, no_heads=tuple(no_heads), latent=tuple(latent), latent_dim=latent_dim,
                               reused_index=reused, sinks=tuple(sorted(seen.sinks)),
                               barred=tuple((why, tuple(ls)) for why, ls in barred.items()),
                               keys_are_values=one_tensor,
                               inline=tuple(sorted(seen.inline)))


@contextmanager
def implementation(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Temporarily run the model with another attention implementation (e.g. `eager` for checks)."""
    previous = legacy.routed(model) or model.config._attn_implementation
    _set_implementation(model, name)
    try:
        yield
    finally:
        _set_implementation(model, previous)


def _set_implementation(model: torch.nn.Module, name: str) -> None:
    """transformers' switch, or, for a model whose modules compute attention in a method of their own (GPT-Neo,
    where transformers' switch does nothing), the config's name that `legacy.py`'s routing reads."""
    if legacy.adapt(model):
        ours = name in (SDPA, FLASH, BLOCKS)
        legacy.route(model, SDPA if ours else None, "sdpa" if ours else name)
    else:
        model.set_attn_implementation(name)


def _register() -> None:
    AttentionInterface.register(SDPA, _sdpa_attention)
    AttentionMaskInterface.register(SDPA, sdpa_mask)
    AttentionInterface.register(FLASH, _flash_attention)
    AttentionMaskInterface.register(FLASH, flash_attention_mask)
    # DeepSeek-V4's block layers append their entries' causality to the mask only when there is a mask (with SDPA's
    # boolean masks, inverted): they get transformers' eager masks, additive and never skipped
    AttentionInterface.register(BLOCKS, _sdpa_attention)
    AttentionMaskInterface.register(BLOCKS, eager_mask)


def _capture(module, query, key, attention_mask, scaling, sliding_window, softcap, sinks) -> None:
    cap = _ACTIVE.get()
    if cap is None or cap.stopped:
        return
    layer = layer_of(module)
    if not cap.fresh(layer, query):
        return
    n = min(cap.last_n, query.shape[2])
    q_len = query.shape[2]
    probs = attention_probs(query, key, attention_mask, scaling, sliding_window, softcap, q_len - n, q_len, sinks)
    cap._mask = (attention_mask, key.shape[2], query.shape[0])
    cap.sink(layer, probs)


def _inline_rows(layer: int, probs: torch.Tensor, padding: torch.Tensor | None = None) -> None:
    """The rows of a layer whose attention is written inline (`legacy.InlineRows`), with the forward pass's 2D
    padding mask: to verify, and to the capture."""
    seen = _SEEN.get()
    if seen is not None:
        seen.inline[layer] = tuple(probs.shape)
    cap = _ACTIVE.get()
    if cap is None or cap.stopped or not cap.fresh(layer, probs):
        return
    n = min(cap.last_n, probs.shape[2])
    cap._mask = (padding, probs.shape[-1], probs.shape[0])
    cap.sink(layer, probs[:, :, -n:].float())


def _observe(module, query, key, value, sinks) -> None:
    seen = _SEEN.get()
    if seen is not None:
        seen.saw(module, query, key, value, sinks)


def _causal(module, attention_mask, kwargs: dict) -> None:
    """A causal LM's mask left to SDPA's causal flag (transformers builds none for a plainly causal prompt) is read
    through the module's `is_causal`, which some decoders leave False (BigBirdPegasus: they never ran on SDPA), and
    their prompts would then attend to later tokens. headprof's rows assume causal without a mask; so does this."""
    if attention_mask is None and not getattr(module, "is_causal", True) and kwargs.get("is_causal") is None:
        kwargs["is_causal"] = True


def _window(module, sliding_window: int | None) -> int | None:
    """A block layer's keys (DeepSeek-V4) are its cache's window and then compressed entries, not positions: its
    cache keeps the window, and a window counted over its keys would hide the window's tokens behind the entries."""
    return None if getattr(module, "layer_type", None) in layouts.BLOCK_KINDS else sliding_window


def _held_only(module, attention_mask):
    """The model's additive mask, hiding the keys a compressed layer returned by position but does not hold (a block
    layer's window, `kv/blocks.py`: its blocks follow, all read)."""
    pending = PENDING_MASK.get()
    if pending is None or pending[0] != layer_of(module):
        return attention_mask
    PENDING_MASK.set(None)
    held = pending[1]
    if attention_mask is None or attention_mask.dtype == torch.bool:
        raise ModelError(f"layer {pending[0]} reads a window by position but was given no additive mask to hide "
                         "what it dropped")
    allowed = torch.nn.functional.pad(held, (0, attention_mask.shape[-1] - held.shape[-1]), value=True)
    return attention_mask.masked_fill(~allowed[:, :, None, :], float("-inf"))


def _attend_compressed(module, reader, query, key, value, attention_mask, scaling, softcap, sinks):
    if sinks is not None and not reader.sinks:  # the cache marks its layers from the verified layout
        raise ModelError(f"layer {layer_of(module)} adds learned attention sinks that its compressed cache was not "
                         "told of; headprof would read it without them")
    return reader.attend(module, query, key, value, attention_mask, scaling, softcap, sinks)


def _sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                    sliding_window=None, softcap=None, **kwargs):
    sliding_window = _window(module, sliding_window)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    sinks = kwargs.pop("s_aux", None)  # gpt-oss's learned sink logit per head: SDPA would drop it silently
    _observe(module, query, key, value, sinks)
    reader = _reader(module, key)
    if reader is not None:  # a compressed layer reads itself (each KV head its own kept tokens, or one latent)
        return _attend_compressed(module, reader, query, key, value, attention_mask, scaling, softcap, sinks)
    attention_mask = _held_only(module, attention_mask)
    cap = _ACTIVE.get()
    if (cap is not None and cap.official and not cap.stopped and query.shape[2] == 1 and softcap is None
            and sinks is None and sliding_window is None and query.dtype in (torch.bfloat16, torch.float16)):
        out, probs = official_attention(query, key, value, attention_mask, scaling)
        if cap.fresh(layer_of(module), query):
            cap.sink(layer_of(module), probs.float())
        return out, None
    _capture(module, query, key, attention_mask, scaling, sliding_window, softcap, sinks)
    if softcap is not None or sinks is not None:  # SDPA has neither: compute the same thing in query chunks
        return explicit_attention(query, key, value, attention_mask, scaling, sliding_window, softcap, sinks), None
    _causal(module, attention_mask, kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                  dropout=dropout, sliding_window=sliding_window, **kwargs)


def _flash_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     sliding_window=None, softcap=None, **kwargs):
    from transformers.integrations.flash_attention import flash_attention_forward

    sliding_window = _window(module, sliding_window)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    sinks = kwargs.pop("s_aux", None)
    _observe(module, query, key, value, sinks)
    reader = _reader(module, key)
    if reader is not None:  # a compressed layer reads itself (each KV head its own kept tokens, or one latent)
        return _attend_compressed(module, reader, query, key, value, attention_mask, scaling, softcap, sinks)
    _capture(module, query, key, attention_mask, scaling, sliding_window, softcap, sinks)
    if sinks is not None:  # flash-attn's kernel takes no sinks: the explicit computation, exact
        return explicit_attention(query, key, value, attention_mask, scaling, sliding_window, softcap, sinks), None
    _causal(module, attention_mask, kwargs)
    return flash_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                   dropout=dropout, sliding_window=sliding_window, softcap=softcap,
                                   **kwargs)
