"""The compression plan: a method's budgets for one prompt, on the model's layer geometry.

At prefill, the capture mechanism hands each layer the attention of the last `window` prompt queries
(fp32 softmax rows). The method (`headprof/methods`) decides how many positions each head keeps and
which (its scorer turns the rows into per-position scores: SnapKV's pooled window attention by default);
the window is always kept. Which layers can be compressed, and the range of positions a head of a
sliding-window layer may keep, come from the layer kinds (`layout.layer_kinds`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from headprof.errors import ModelError
from headprof.kv import latent
from headprof.layout import BLOCK_KINDS, INDEXED_KINDS, SLIDING_KINDS, HeadLayout, check_compressible, compressible
from headprof.methods import Method


@dataclass(frozen=True)
class Plan:
    """What `method` keeps per KV head of one prompt. `budgets` are decided before prefill (adaptive
    methods decide theirs per layer in `choose`).

    Sliding-window layers keep their whole window as the model does, unless `compress_sliding`: then they
    take part in the budget and keep their best tokens from inside their window.
    """

    method: Method
    layout: HeadLayout
    budget: int
    prompt_len: int
    budgets: np.ndarray  # [layer, kv_head] prefix tokens to keep
    compressible: np.ndarray  # [layer, kv_head] bool: heads that take part in the budget
    compress_sliding: bool = False

    @property
    def window(self) -> int:
        return self.method.window

    def group(self, layer: int) -> int:
        return self.layout.group(layer)

    @property
    def prefix(self) -> int:
        return self.prompt_len - self.window

    def first_candidate(self, layer: int) -> int:
        """The oldest prefix position a head of this layer may keep (inside the window on sliding layers)."""
        return first_candidate(self.layout, layer, self.prompt_len, self.window)

    def select(self, layer: int, probs: torch.Tensor) -> list[torch.Tensor]:
        """Kept positions (the method's prefix picks + the window) per KV head of one layer; one list shared by all
        heads on a layer whose cache is one latent (MLA, `latent.shared_positions`)."""
        window_pos = torch.arange(self.prefix, self.prompt_len, device=probs.device)
        picks = self.method.choose(self, layer, probs)
        if self.layout.is_latent(layer):
            count = None
            if self.layout.attention_kinds[layer] in INDEXED_KINDS:  # one mask for all of them: one count
                count = latent.common_count(self.budgets, [i for i in range(self.layout.num_layers)
                                                           if self.layout.attention_kinds[i] in INDEXED_KINDS
                                                           and self.compressible[i].any()])
            picks = [latent.shared_positions(picks, self.method.score(self, layer, probs), count)]
        return [torch.cat([k, window_pos]) for k in picks]


def sliding_window(layout: HeadLayout, layer: int) -> int | None:
    """The window a compressed layer keeps its tokens inside: a sliding layer's, or a block layer's own (DeepSeek-V4:
    the window its blocks follow); None for every other layer."""
    kind = layout.attention_kinds[layer]
    if kind in BLOCK_KINDS:
        return layout.layer_windows[layer] if layout.layer_windows else None
    return layout.sliding_window if kind in SLIDING_KINDS else None


def is_sliding(layout: HeadLayout, layer: int) -> bool:
    return bool(sliding_window(layout, layer))


def first_candidate(layout: HeadLayout, layer: int, prompt_len: int, window: int) -> int:
    """The oldest prefix position a head of `layer` may keep: 0, or the window's start on sliding layers."""
    if is_sliding(layout, layer):
        return min(prompt_len - window, max(0, prompt_len - sliding_window(layout, layer) + 1))
    return 0


def compressed_layers(layout: HeadLayout, method: Method, compress_sliding: bool) -> list[bool]:
    """Per layer: does `method` compress it (full-attention layers; sliding ones only with `compress_sliding`;
    never a layer that holds no KV of its own, nor one whose state is not keys and values)? A model with layers of a
    kind headprof cannot compress yet is refused here with a one-line ModelError rather than treated as full
    attention."""
    if not method.compresses:
        return [False] * layout.num_layers
    check_compressible(layout)
    out = [compressible(layout, layer) and layout.has_heads(layer)
           and ((compress_sliding and method.compresses_sliding) or not is_sliding(layout, layer))
           for layer in range(layout.num_layers)]
    if not any(out):  # every layer with heads is windowed, and the method or --no-compress-sliding keeps windows
        raise ModelError(f"{method.name} would compress no layer of this model: its attention layers all keep a "
                         "window, which this run leaves whole (drop --no-compress-sliding)")
    return out


def capacity(layout: HeadLayout, prompt_len: int, window: int) -> np.ndarray:
    """[layer, kv_head] how many prefix positions each head can choose from (sliding layers: its window; none for
    a KV head the layer does not have)."""
    caps = [prompt_len - window - first_candidate(layout, layer, prompt_len, window)
            for layer in range(layout.num_layers)]
    return np.where(layout.present(), np.array(caps, dtype=np.int64)[:, None], 0)


def make_plan(method: Method, layout: HeadLayout, prompt_len: int, budget: int,
              compress_sliding: bool = False) -> Plan:
    """Allocate budgets for `method`. Raises BudgetError for budgets the prompt cannot honour."""
    compressible = np.array(compressed_layers(layout, method, compress_sliding))[:, None] & layout.present()
    budgets = (method.allocate(budget, capacity(layout, prompt_len, method.window), compressible)
               if method.compresses else np.zeros(compressible.shape, dtype=np.int64))
    return Plan(method, layout, budget, prompt_len, budgets, compressible, compress_sliding)
