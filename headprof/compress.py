"""SnapKV-style token selection inside each KV head, and the plan that applies a method to a prompt.

At prefill, the capture mechanism hands each layer the attention of the last `window` prompt queries
(fp32 softmax rows). Per KV head: average over the window queries and over the query heads of the
group, max-pool over positions (`kernel`) so neighbours of a strong token come along, keep the top
budget_h prefix positions in position order, plus the window itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from headprof import allocate
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


def top_positions(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The `keep` best positions of one head, in position order."""
    keep = min(keep, scores.numel())
    if keep <= 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    return scores.topk(keep).indices.sort().values


def streaming_positions(prefix: int, keep: int, sink: int = 4) -> torch.Tensor:
    """StreamingLLM: the first `sink` tokens and the most recent ones before the window."""
    keep = min(keep, prefix)
    first = min(sink, keep)
    return torch.cat([torch.arange(first), torch.arange(prefix - (keep - first), prefix)]).long()


@dataclass
class Plan:
    """What to keep per KV head, decided before prefill except for `adakv` (decided per layer from scores)."""

    method: str
    layout: HeadLayout
    budget: int
    window: int
    kernel: int
    prompt_len: int
    budgets: np.ndarray  # [layer, kv_head] prefix tokens to keep (adakv: filled in per layer)
    compressible: np.ndarray  # [layer, kv_head] bool: full-attention layers when compressing

    @property
    def prefix(self) -> int:
        return self.prompt_len - self.window

    def select(self, layer: int, probs: torch.Tensor) -> list[torch.Tensor]:
        """Kept positions (prefix picks + window) per KV head of one layer, from its window rows.

        Sliding-window layers keep their last window whatever the method (docs/run.md).
        """
        window_pos = torch.arange(self.prefix, self.prompt_len, device=probs.device)
        kv_heads = self.layout.num_kv_heads
        sliding = self.layout.sliding_window
        if self.layout.attention_kinds[layer] == "sliding_attention" and sliding:
            # a sliding-window layer keeps what the model's own cache keeps: its last window
            last = torch.arange(max(0, self.prompt_len - sliding + 1), self.prompt_len, device=probs.device)
            return [last] * kv_heads
        if self.method == "streaming":
            keep = [streaming_positions(self.prefix, int(b)).to(probs.device) for b in self.budgets[layer]]
        else:
            scores = pooled_scores(probs, self.layout.group_size, self.kernel)
            if self.method == "adakv":
                self.budgets[layer] = allocate.adakv_layer(scores.float().cpu().numpy(), self.budget, self.window,
                                                           self.prefix)
            keep = [top_positions(scores[h], int(self.budgets[layer, h])) for h in range(kv_heads)]
        return [torch.cat([k, window_pos]) for k in keep]


def make_plan(method: str, layout: HeadLayout, prompt_len: int, budget: int, window: int = 8, kernel: int = 7,
              kv_scores: np.ndarray | None = None, beta: float = 1.2) -> Plan:
    """Allocate budgets for `method`. Raises BudgetError for budgets the prompt cannot honour."""
    if method not in allocate.METHODS:
        raise allocate.BudgetError(f"unknown method '{method}' (use {', '.join(allocate.METHODS)})")
    compressible = np.array([[kind != "sliding_attention"] * layout.num_kv_heads
                             for kind in layout.attention_kinds])
    prefix = prompt_len - window
    shape = (layout.num_layers, layout.num_kv_heads)
    if method == "full":
        budgets = np.zeros(shape, dtype=np.int64)
        compressible[:] = False
    elif method == "headkv":
        if kv_scores is None:
            raise allocate.BudgetError("headkv needs a profile")
        budgets = allocate.headkv(kv_scores, budget, window, prefix, compressible, beta)
    elif method == "pyramidkv":
        budgets = allocate.pyramid(budget, window, prefix, compressible)
    elif method == "adakv":
        allocate.uniform(budget, window, prefix, compressible)  # validates the budget
        budgets = np.zeros(shape, dtype=np.int64)
    else:
        budgets = allocate.uniform(budget, window, prefix, compressible)
    return Plan(method, layout, budget, window, kernel, prompt_len, budgets, compressible)
