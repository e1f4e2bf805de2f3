"""How headprof hands a cache and its options to a model's forward, across transformers versions."""

from __future__ import annotations

import functools
import inspect
from typing import Any


def with_cache(model, cache) -> dict[str, Any]:
    """The keyword that hands `cache` to `model`'s forward and generate: transformers renamed
    `past_key_values` to `cache` (the old name is deprecated, and removed in 5.40); older 5.x only know the
    old one. Read off the model class's forward, which wrappers (accelerate hooks) leave alone."""
    return {_cache_keyword(type(model)): cache}


def last_logits_only(model) -> dict[str, Any]:
    """The keyword that makes a forward compute logits for the last position only (a batch of long
    prompts would otherwise hold batch x length x vocabulary floats); {} for a model without it."""
    return {"logits_to_keep": 1} if _keeps_logits(type(model)) else {}


@functools.cache
def _keeps_logits(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


@functools.cache
def _cache_keyword(model_class: type) -> str:  # once per class: scoring asks at every decoded token
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"
