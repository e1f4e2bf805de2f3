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
    """What to keep per KV head, decided before prefill except for `adakv` (decided per layer from scores).

    Sliding-window layers keep their whole window as the model does, unless `compress_sliding`: then they
    take part in the budget and keep their best tokens from inside their window.
    """

    method: str
    layout: HeadLayout
    budget: int
    window: int
    kernel: int
    prompt_len: int
    budgets: np.ndarray  # [layer, kv_head] prefix tokens to keep (adakv: filled in per layer)
    compressible: np.ndarray  # [layer, kv_head] bool: heads that take part in the budget
    compress_sliding: bool = False

    @property
    def prefix(self) -> int:
        return self.prompt_len - self.window

    def sliding(self, layer: int) -> bool:
        return self.layout.attention_kinds[layer] == "sliding_attention" and bool(self.layout.sliding_window)

    def first_candidate(self, layer: int) -> int:
        """The oldest prefix position a head of this layer may keep (inside the window on sliding layers)."""
        if self.sliding(layer):
            return min(self.prefix, max(0, self.prompt_len - self.layout.sliding_window + 1))
        return 0

    def capacity(self) -> np.ndarray:
        """[layer, kv_head] how many prefix positions each head can choose from."""
        caps = [self.prefix - self.first_candidate(layer) for layer in range(self.layout.num_layers)]
        return np.repeat(np.array(caps, dtype=np.int64)[:, None], self.layout.num_kv_heads, axis=1)

    def cache_kinds(self) -> tuple[list[str], list[int | None]]:
        """Per layer: "compress" or "sliding" (kept as the model keeps it), and its window."""
        lay = self.layout
        kinds = ["compress" if self.compressible[layer].any() else "sliding" for layer in range(lay.num_layers)]
        windows = [lay.sliding_window if self.sliding(layer) else None for layer in range(lay.num_layers)]
        return kinds, windows

    def select(self, layer: int, probs: torch.Tensor) -> list[torch.Tensor]:
        """Kept positions (prefix picks + window) per KV head of one layer, from its window rows."""
        window_pos = torch.arange(self.prefix, self.prompt_len, device=probs.device)
        kv_heads = self.layout.num_kv_heads
        lo = self.first_candidate(layer)
        if self.method == "streaming":
            keep = [streaming_positions(self.prefix - lo, int(b)).to(probs.device) + lo for b in self.budgets[layer]]
        else:
            scores = pooled_scores(probs, self.layout.group_size, self.kernel)
            if lo:
                scores[:, :lo] = float("-inf")
            if self.method == "adakv":
                self.budgets[layer] = allocate.adakv_layer(scores.float().cpu().numpy(), self.budget, self.window,
                                                           self.prefix - lo)
            keep = [top_positions(scores[h], int(self.budgets[layer, h])) for h in range(kv_heads)]
        return [torch.cat([k, window_pos]) for k in keep]


def make_plan(method: str, layout: HeadLayout, prompt_len: int, budget: int, window: int = 8, kernel: int = 7,
              kv_scores: np.ndarray | None = None, beta: float = 1.2, compress_sliding: bool = False) -> Plan:
    """Allocate budgets for `method`. Raises BudgetError for budgets the prompt cannot honour."""
    if method not in allocate.METHODS:
        raise allocate.BudgetError(f"unknown method '{method}' (use {', '.join(allocate.METHODS)})")
    compressible = np.array([[kind != "sliding_attention" or compress_sliding] * layout.num_kv_heads
                             for kind in layout.attention_kinds])
    shape = (layout.num_layers, layout.num_kv_heads)
    plan = Plan(method, layout, budget, window, kernel, prompt_len, np.zeros(shape, dtype=np.int64), compressible,
                compress_sliding)
    caps = plan.capacity()
    if method == "full":
        compressible[:] = False
    elif method == "headkv":
        if kv_scores is None:
            raise allocate.BudgetError("headkv needs a profile")
        plan.budgets = allocate.headkv(kv_scores, budget, window, caps, compressible, beta)
    elif method == "pyramidkv":
        plan.budgets = allocate.pyramid(budget, window, caps, compressible)
    elif method == "adakv":
        allocate.uniform(budget, window, caps, compressible)  # validates the budget
    else:
        plan.budgets = allocate.uniform(budget, window, caps, compressible)
    return plan
