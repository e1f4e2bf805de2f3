"""Models whose forward takes only their own cache class (MiniMax's `MiniMaxCache`).

Such a model refuses any other cache, so every cache headprof hands it (`adapt`) becomes an instance of both
headprof's class and the model's. The model's own class keeps its linear-attention state in a list beside the
layers; here that state lives in transformers' linear-attention layer of the same index instead, where headprof
already joins, selects and copies linear states (`native.py`): batched scoring and eval's shared prefill then carry
it like any hybrid model's state.
"""

from __future__ import annotations

import functools
import inspect
import sys

from transformers.cache_utils import Cache, DynamicCache, LinearAttentionCacheLayerMixin

from headprof.kv import native


class _StateInLayers:
    """What the model's own cache class does with its linear state, done on transformers' layers."""

    def get_linear_cache(self, layer_idx: int):
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if isinstance(layer, LinearAttentionCacheLayerMixin) and layer.is_recurrent_states_initialized.get(0):
            return layer.recurrent_states[0]
        return None

    def set_linear_cache(self, layer_idx: int, state) -> None:
        layer = self.layers[layer_idx]
        if not isinstance(layer, LinearAttentionCacheLayerMixin):
            raise TypeError(f"layer {layer_idx} of this cache holds no linear-attention state")
        layer.update_recurrent_state(state, 0)

    def __len__(self) -> int:
        return Cache.__len__(self)

    def batch_repeat_interleave(self, repeats: int) -> None:
        Cache.batch_repeat_interleave(self, repeats)

    def batch_select_indices(self, indices) -> None:
        for layer in self.layers:
            native.kind_of(layer).select_rows(indices)


@functools.cache
def own_cache_class(model_type: str) -> type | None:
    """The cache class defined in the model's own modeling module (only MiniMax's in transformers 5.24), if any."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if not isinstance(name, str):
        return None
    try:
        import transformers

        module = sys.modules[getattr(transformers, name).__module__]
    except (AttributeError, KeyError, ImportError):
        return None
    own = [c for _, c in inspect.getmembers(module, inspect.isclass)
           if issubclass(c, DynamicCache) and c.__module__ == module.__name__]
    return own[0] if len(own) == 1 else None


@functools.cache
def _mixed(base: type, own: type) -> type:
    bases = (_StateInLayers, own) if issubclass(own, base) else (_StateInLayers, base, own)  # a plain DynamicCache
    return type(base.__name__, bases, {"__module__": base.__module__})


def adapt(cache, config):
    """`cache`, made an instance of the model's own cache class too where the model insists on one."""
    own = own_cache_class(getattr(config, "model_type", ""))
    if own is not None and not isinstance(cache, own):
        cache.__class__ = _mixed(type(cache), own)
    return cache
