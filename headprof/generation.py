"""Greedy generation with a compressed KV cache (or the full one), measured; and compression inside a
user's own `model.generate`.

`model.generate` runs as usual with a `HeadKVCache`; an `AttentionCapture` of the last `window` prompt
queries is active during prefill, and its sink compresses each layer as soon as that layer's rows exist
(the layer's output still uses every prompt token). After the last layer the capture stops, so decoding
computes no extra rows. Bytes held are read off the cache's tensors after generation, not computed
from the plan.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache, StoppingCriteria

from headprof import capture, methods
from headprof.cache import HeadKVCache, HeadKVLayer
from headprof.capture import AttentionCapture
from headprof.compress import Plan, compressed_layers, make_plan
from headprof.errors import HeadprofError
from headprof.models import HeadLayout, LoadedModel, layout_of


@dataclass
class RunResult:
    method: str
    text: str
    tokens: list[int]
    prompt_tokens: int
    prefill_s: float
    decode_tokens_per_s: float | None
    kv_entries: int  # tokens x KV heads held at the end
    kv_bytes: int  # bytes of the K/V tensors allocated at the end
    kv_entries_full: int  # what the uncompressed cache of this model holds for the same sequence
    kv_entries_ideal: int  # budgets + window + appended tokens (sliding layers: their window)
    bytes_per_entry: int
    budgets: list[list[int]] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def kv_bytes_full(self) -> int:
        return self.kv_entries_full * self.bytes_per_entry

    @property
    def kv_bytes_ideal(self) -> int:
        return self.kv_entries_ideal * self.bytes_per_entry

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kv_bytes_full": self.kv_bytes_full, "kv_bytes_ideal": self.kv_bytes_ideal}


def cache_for(layout: HeadLayout, method: methods.Method, compress_sliding: bool = False) -> HeadKVCache:
    """An empty cache whose layers the method compresses (sliding layers stay the model's own unless
    `compress_sliding`)."""
    kinds = ["compress" if c else "keep" for c in compressed_layers(layout, method, compress_sliding)]
    windows = [layout.sliding_window if kind == "sliding_attention" else None for kind in layout.attention_kinds]
    return HeadKVCache(kinds, windows)


@contextmanager
def compressing(cache: HeadKVCache, window: int, plan_for: Callable[[int], Plan]) -> Iterator[HeadKVCache]:
    """Around a prefill (or a whole `generate`): compress each layer of `cache` as soon as the rows of its
    last `window` queries exist, by the plan `plan_for(prompt_len)`, then stop capturing, so decoding
    pays nothing for it."""
    todo = {i for i, layer in enumerate(cache.layers) if isinstance(layer, HeadKVLayer)}
    made: list[Plan] = []

    def sink(layer: int, probs: torch.Tensor) -> None:
        if layer in todo:
            if not made:  # the first layer's rows tell the prompt length
                made.append(plan_for(probs.shape[-1]))
            cache.compress(layer, made[0].select(layer, probs))
            todo.discard(layer)
        if not todo:
            cap.stop()

    with AttentionCapture(sink, last_n=window) as cap, capture.compressed(cache):
        yield cache


@contextmanager
def compression(model, method: str = "headkv", budget: int = 128, profile=None, window: int = 8,
                kernel: int = 7, beta: float = 1.2, group_reduce: str = "mean",
                compress_sliding: bool = True) -> Iterator[HeadKVCache]:
    """Head-level KV compression inside your own `model.generate` (batch size 1), on any HF causal LM:

        with headprof.compression(model, "headkv", budget=128, profile=prof) as cache:
            out = model.generate(ids, past_key_values=cache, max_new_tokens=64)

    The model's attention is routed through headprof's attention function (it computes what SDPA
    computes). One generation per context: the prompt is compressed at prefill, then it decodes.
    """
    m = methods.get(method)
    layout = layout_of(model.config)
    kv_scores = None
    if m.needs_profile:
        if profile is None:
            raise HeadprofError(f"{m.name} needs a profile (headprof.Profile.load or headprof.score)")
        profile.check_fits(layout)
        kv_scores = profile.kv_scores(group_reduce)
    capture.attach(model)
    cache = cache_for(layout, m, compress_sliding)

    def plan_for(prompt_len: int) -> Plan:
        return make_plan(m, layout, prompt_len, budget, window, kernel, kv_scores, beta, compress_sliding)

    with compressing(cache, window, plan_for):
        yield cache


class _Clock(StoppingCriteria):
    """Records when each new token exists (generate calls stopping criteria once per token)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _full_entries(layout: HeadLayout, seq: int) -> int:
    per_layer = [min(seq, layout.sliding_window) if k == "sliding_attention" and layout.sliding_window else seq
                 for k in layout.attention_kinds]
    return sum(per_layer) * layout.num_kv_heads


@torch.no_grad()
def generate(lm: LoadedModel, prompt_ids: list[int], method: str = "headkv", budget: int = 128,
             kv_scores: np.ndarray | None = None, window: int = 8, kernel: int = 7, beta: float = 1.2,
             max_new_tokens: int = 64, min_new_tokens: int = 0, compress_sliding: bool = True) -> RunResult:
    """Generate greedily from `prompt_ids` with `method` at `budget` tokens per KV head.

    `compress_sliding` (default): sliding-window layers also take part in the budget, keeping their best
    tokens inside their window; False keeps their whole window as the model does (docs/run.md).
    """
    lay = lm.info.layout
    m = methods.get(method)
    n = len(prompt_ids)
    if lm.info.max_positions and n + max_new_tokens > lm.info.max_positions:
        raise HeadprofError(f"prompt of {n} tokens + {max_new_tokens} new tokens exceeds the model's "
                            f"{lm.info.max_positions} positions")
    if m.compresses and n <= window:
        raise HeadprofError(f"prompt of {n} tokens is not longer than the observation window ({window})")
    notes = []
    if m.compresses:
        plan = make_plan(m, lay, n, budget, window, kernel, kv_scores, beta, compress_sliding)
        if budget >= n:
            notes.append(f"budget {budget} >= prompt length {n}: every prompt token is kept")
        cache = cache_for(lay, m, compress_sliding)
    else:
        cache = DynamicCache(config=lm.model.config)
    ids = torch.tensor([prompt_ids], device=lm.model.device)
    clock = _Clock()
    kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False,
                  stopping_criteria=[clock], past_key_values=cache, pad_token_id=lm.tokenizer.eos_token_id,
                  top_p=None, top_k=None, temperature=None)
    start = time.perf_counter()
    with warnings.catch_warnings():  # transformers renames generate's cache argument; both spellings work
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
        if m.compresses:
            with compressing(cache, window, lambda _: plan):  # made before prefill: errors come first
                out = lm.model.generate(ids, **kwargs)
        else:
            out = lm.model.generate(ids, **kwargs)
    tokens = out[0, n:].tolist()
    appended = max(len(tokens) - 1, 0)  # the last token is produced but never fed back
    prefill_s = clock.times[0] - start if clock.times else time.perf_counter() - start
    decode = (len(clock.times) - 1) / (clock.times[-1] - clock.times[0]) if len(clock.times) > 1 else None
    budgets = None
    if not m.compresses:
        entries = sum(layer.keys.shape[1] * layer.keys.shape[2] for layer in cache.layers if layer.is_initialized)
        nbytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.is_initialized)
        ideal = _full_entries(lay, n + appended)
    else:
        entries, nbytes = cache.entries(), cache.nbytes()
        # what each head kept of the prompt beyond the window (adaptive methods decide it at prefill)
        kept = np.array([[n_kept - window for n_kept in layer.lens] if isinstance(layer, HeadKVLayer)
                         else [0] * lay.num_kv_heads for layer in cache.layers], dtype=np.int64)
        budgets = kept.tolist()
        compressed_layers = plan.compressible.any(axis=1)
        ideal = int(kept.sum()) + int(compressed_layers.sum()) * lay.num_kv_heads * (window + appended)
        ideal += sum(min(n + appended, lay.sliding_window or n + appended) * lay.num_kv_heads
                     for layer in range(lay.num_layers) if not compressed_layers[layer])
    elem = torch.finfo(lm.model.dtype).bits // 8
    return RunResult(method=method, text=lm.tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                     tokens=tokens, prompt_tokens=n, prefill_s=prefill_s, decode_tokens_per_s=decode,
                     kv_entries=entries, kv_bytes=nbytes, kv_entries_full=_full_entries(lay, n + appended),
                     kv_entries_ideal=ideal, bytes_per_entry=2 * lay.head_dim * elem, budgets=budgets, notes=notes)
