"""The compression plan: a method's budgets for one prompt, and SnapKV-style pooling of the window rows.

At prefill, the capture mechanism hands each layer the attention of the last `window` prompt queries
(fp32 softmax rows). Per KV head: average over the window queries and over the query heads of the
group, max-pool over positions (`kernel`) so neighbours of a strong token come along. The method
(`headprof/methods`) decides how many positions each head keeps and which; the window is always kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from headprof import methods
from headprof.defaults import BETA, KERNEL, WINDOW
from headprof.models import HeadLayout


def pooled_scores(probs: torch.Tensor, group: int, kernel: int) -> torch.Tensor:
    """probs (1, query_heads, window, keys) -> (kv_heads, prefix) selection scores."""
    _, heads, window, keys = probs.shape
    prefix = keys - window
    s = probs[0, :, :, :prefix].mean(dim=1)  # over window queries -> (heads, prefix)
    s = s.reshape(heads // group, group, prefix).mean(dim=1)  # over the group -> (kv_heads, prefix)
    if kernel > 1 and prefix > 0:
        s = F.max_pool1d(s[:, None], kernel_size=kernel, stride=1, padding=kernel // 2)[:, 0, :prefix]
    return s


@dataclass(frozen=True)
class Plan:
    """What `method` keeps per KV head of one prompt. `budgets` are decided before prefill (adaptive
    methods decide theirs per layer in `select`).

    Sliding-window layers keep their whole window as the model does, unless `compress_sliding`: then they
    take part in the budget and keep their best tokens from inside their window.
    """

    method: methods.Method
    layout: HeadLayout
    budget: int
    window: int
    kernel: int
    prompt_len: int
    budgets: np.ndarray  # [layer, kv_head] prefix tokens to keep
    compressible: np.ndarray  # [layer, kv_head] bool: heads that take part in the budget
    compress_sliding: bool = False

    @property
    def prefix(self) -> int:
        return self.prompt_len - self.window

    def first_candidate(self, layer: int) -> int:
        """The oldest prefix position a head of this layer may keep (inside the window on sliding layers)."""
        return first_candidate(self.layout, layer, self.prompt_len, self.window)

    def pooled(self, layer: int, probs: torch.Tensor) -> torch.Tensor:
        """(kv_heads, prefix) selection scores; positions a head may not keep score -inf."""
        scores = pooled_scores(probs, self.layout.group_size, self.kernel)
        lo = self.first_candidate(layer)
        if lo:
            scores[:, :lo] = float("-inf")
        return scores

    def select(self, layer: int, probs: torch.Tensor) -> list[torch.Tensor]:
        """Kept positions (the method's prefix picks + the window) per KV head of one layer."""
        window_pos = torch.arange(self.prefix, self.prompt_len, device=probs.device)
        return [torch.cat([k, window_pos]) for k in self.method.choose(self, layer, probs)]


def is_sliding(layout: HeadLayout, layer: int) -> bool:
    return layout.attention_kinds[layer] == "sliding_attention" and bool(layout.sliding_window)


def first_candidate(layout: HeadLayout, layer: int, prompt_len: int, window: int) -> int:
    """The oldest prefix position a head of `layer` may keep: 0, or the window's start on sliding layers."""
    if is_sliding(layout, layer):
        return min(prompt_len - window, max(0, prompt_len - layout.sliding_window + 1))
    return 0


def compressed_layers(layout: HeadLayout, method: methods.Method, compress_sliding: bool) -> list[bool]:
    """Per layer: does `method` compress it (sliding layers only with `compress_sliding`)?"""
    return [method.compresses and (compress_sliding or not is_sliding(layout, layer))
            for layer in range(layout.num_layers)]


def capacity(layout: HeadLayout, prompt_len: int, window: int) -> np.ndarray:
    """[layer, kv_head] how many prefix positions each head can choose from (sliding layers: its window)."""
    caps = [prompt_len - window - first_candidate(layout, layer, prompt_len, window)
            for layer in range(layout.num_layers)]
    return np.repeat(np.array(caps, dtype=np.int64)[:, None], layout.num_kv_heads, axis=1)


def make_plan(method: str | methods.Method, layout: HeadLayout, prompt_len: int, budget: int, window: int = WINDOW,
              kernel: int = KERNEL, kv_scores: np.ndarray | None = None, beta: float = BETA,
              compress_sliding: bool = False) -> Plan:
    """Allocate budgets for `method`. Raises BudgetError for budgets the prompt cannot honour."""
    m = methods.get(method) if isinstance(method, str) else method
    compressible = np.repeat(np.array(compressed_layers(layout, m, compress_sliding))[:, None],
                             layout.num_kv_heads, axis=1)
    budgets = (m.allocate(budget, window, capacity(layout, prompt_len, window), compressible, kv_scores, beta)
               if m.compresses else np.zeros(compressible.shape, dtype=np.int64))
    return Plan(m, layout, budget, window, kernel, prompt_len, budgets, compressible, compress_sliding)
