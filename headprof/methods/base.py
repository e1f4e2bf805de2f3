"""The interface every compression method implements, and the registry the CLI, `run`, `eval` and the
docs read. A method answers two questions, as in NVIDIA kvpress where what is scored is separate from
how the cache is cut:

- `allocate`: how many prompt tokens each KV head keeps, decided before prefill;
- `choose`: which prefix positions each head of a layer keeps, from the observation window's attention.

Adding a method is one module in this package: subclass `Method`, decorate it with `@register`, import it
in `headprof/methods/__init__.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from headprof import allocate
from headprof.defaults import BETA

if TYPE_CHECKING:
    from headprof.compress import Plan

REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    REGISTRY[cls.name] = cls
    return cls


def names() -> tuple[str, ...]:
    """Registered methods, the full cache first, then by how much they adapt to the model."""
    return tuple(sorted(REGISTRY, key=lambda n: REGISTRY[n].rank))


def get(name: str) -> Method:
    """An instance of the method called `name`; a one-line error naming the known ones otherwise."""
    if name not in REGISTRY:
        raise allocate.BudgetError(f"unknown method '{name}' (use {', '.join(names())})")
    return REGISTRY[name]()


def top_positions(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The `keep` best positions of one head, in position order."""
    keep = min(keep, scores.numel())
    if keep <= 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    return scores.topk(keep).indices.sort().values


class Method:
    """Uniform budgets and SnapKV selection (top pooled window attention); subclasses change either."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for help texts and docs
    needs_profile: ClassVar[bool] = False  # budgets come from a head profile's KV-head scores
    compresses: ClassVar[bool] = True  # False: the model's own full cache
    rank: ClassVar[int] = 50  # where it is listed

    def allocate(self, budget: int, window: int, caps: np.ndarray, compressible: np.ndarray,
                 kv_scores: np.ndarray | None = None, beta: float = BETA) -> np.ndarray:
        """[layer, kv_head] prefix tokens to keep (the window is kept on top); caps bound each head."""
        return allocate.uniform(budget, window, caps, compressible)

    def choose(self, plan: Plan, layer: int, probs: torch.Tensor) -> list[torch.Tensor]:
        """Sorted prefix positions to keep per KV head of `layer`, from its window rows `probs`."""
        scores = plan.pooled(layer, probs)
        return [top_positions(scores[h], int(plan.budgets[layer, h])) for h in range(scores.shape[0])]
