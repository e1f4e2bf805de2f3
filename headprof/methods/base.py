"""The interface every compression method implements, and the registry the CLI, `run`, `eval` and the
docs read. A method answers two questions, as in NVIDIA kvpress where what is scored is separate from
how the cache is cut:

- `allocate`: how many prompt tokens each KV head keeps, decided before prefill;
- `choose`: which prefix positions each head of a layer keeps, from the observation window's attention
  as its `scorer` turns it into per-position scores.

A method is a small dataclass: its parameters are its fields (`HeadKV(beta=1.5, profile=prof)`), built by
name with `build("headkv", beta=1.5)` or from a spec `"headkv:beta=1.5,profile=r2"` (`parse_spec`).
Adding a method is one module in this package: subclass `Method` as a dataclass, decorate it with
`@register`, import it in `headprof/methods/__init__.py`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from headprof.defaults import DECAY, KERNEL, SPREAD, WINDOW
from headprof.errors import MethodError
from headprof.methods import allocate

REGISTRY: dict[str, type[Method]] = {}


class PlanView(Protocol):
    """What a method reads of one prompt's compression plan (`compress.Plan` is one)."""

    budget: int  # tokens per KV head asked for, window included
    budgets: np.ndarray  # [layer, kv_head] prefix tokens each head keeps (decided before prefill)

    def group(self, layer: int) -> int: ...  # query heads per KV head of `layer`

    @property
    def prefix(self) -> int: ...  # prompt tokens before the observation window

    def first_candidate(self, layer: int) -> int: ...  # the oldest prefix position a head of `layer` may keep


# A token scorer: (plan, layer, window attention rows (1, query_heads, window, keys)) -> (kv_heads, prefix)
# scores, -inf where a head may not keep a position. AdaKV and HeadKV take one as a parameter.
Scorer = Callable[["Method", PlanView, int, torch.Tensor], torch.Tensor]


def pooled_scores(probs: torch.Tensor, group: int, kernel: int, spread: int = 0, decay: float = 0.0) -> torch.Tensor:
    """probs (1, query_heads, window, keys) -> (kv_heads, prefix) selection scores: the mean over the window's
    queries and over the group's query heads, max-pooled over positions so a strong token's neighbours come.
    `spread` > 0 also hands each score on to the `spread` positions after it (a trailing max): the question
    points at the start of a value (a UUID, a number), and copying it later reads the tokens that follow.
    `decay` in (0, 1) hands it on to every later position, times `decay` per position (a trailing max that fades):
    how far a score reaches depends on how far it stands above its surroundings, not on a length."""
    _, heads, window, keys = probs.shape
    prefix = keys - window
    s = probs[0, :, :, :prefix].mean(dim=1)  # over window queries -> (heads, prefix)
    s = s.reshape(heads // group, group, prefix).mean(dim=1)  # over the group -> (kv_heads, prefix)
    if kernel > 1 and prefix > 0:
        s = F.max_pool1d(s[:, None], kernel_size=kernel, stride=1, padding=kernel // 2)[:, 0, :prefix]
    if spread > 0 and prefix > 0:
        s = F.max_pool1d(F.pad(s[:, None], (spread, 0), value=float("-inf")), kernel_size=spread + 1,
                         stride=1)[:, 0]
    if 0 < decay < 1 and prefix > 0:
        s = faded_max(s, decay)
    return s


def faded_max(s: torch.Tensor, decay: float) -> torch.Tensor:
    """(heads, n) scores >= 0 -> max over j <= t of s[j] * decay ** (t - j), per head: in the log domain a running
    maximum (cummax) of log s[j] - j log decay, so one pass whatever the length (float64: j log decay grows)."""
    t = torch.arange(s.shape[-1], device=s.device, dtype=torch.float64) * math.log(decay)
    shifted = torch.log(s.double()) - t
    return torch.exp(shifted.cummax(dim=-1).values + t).to(s.dtype)


def pooled_window(method: Method, plan: PlanView, layer: int, probs: torch.Tensor) -> torch.Tensor:
    """SnapKV's scorer: pooled window attention (`pooled_scores` with the method's kernel)."""
    scores = pooled_scores(probs, plan.group(layer), method.kernel, method.spread, method.decay)
    lo = plan.first_candidate(layer)
    if lo:
        scores[:, :lo] = float("-inf")
    return scores


def top_positions(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The `keep` best positions of one head, in position order."""
    keep = min(keep, scores.numel())
    if keep <= 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    return scores.topk(keep).indices.sort().values


@dataclass
class Method:
    """Uniform budgets and SnapKV selection (top pooled window attention); subclasses change either.

    `window`: the last prompt tokens whose attention scores the rest (always kept, counted in the budget);
    `kernel`: the max-pool width over positions of the default scorer; `spread`: how many positions after a
    token inherit its score (0, SnapKV's rule: none); `decay`: the share of a score each later position
    inherits, compounding (0: none; `pooled_scores`)."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for help texts and docs
    needs_profile: ClassVar[bool] = False  # budgets come from a head profile's KV-head scores
    compresses: ClassVar[bool] = True  # False: the model's own full cache
    rank: ClassVar[int] = 50  # where it is listed
    hard: ClassVar[dict[str, Any]] = {}  # a demanding setting of its own parameters (the method tests run it)
    cache_kind: ClassVar[str] = "heads"  # the cache-layer kind its layers need (`kv/`): per-head segments, or "split"
    compresses_sliding: ClassVar[bool] = True  # False: sliding-window layers stay as the model keeps them

    window: int = WINDOW
    kernel: int = KERNEL
    spread: int = SPREAD
    decay: float = DECAY

    def allocate(self, budget: int, caps: np.ndarray, compressible: np.ndarray) -> np.ndarray:
        """[layer, kv_head] prefix tokens to keep (the window is kept on top); caps bound each head."""
        return allocate.uniform(budget, self.window, caps, compressible)

    def score(self, plan: PlanView, layer: int, probs: torch.Tensor) -> torch.Tensor:
        """(kv_heads, prefix) scores of the positions a head of `layer` may keep."""
        return pooled_window(self, plan, layer, probs)

    def choose(self, plan: PlanView, layer: int, probs: torch.Tensor) -> list[torch.Tensor]:
        """Sorted prefix positions to keep per KV head of `layer`, from its window rows `probs`."""
        scores = self.score(plan, layer, probs)
        return [top_positions(scores[h], int(plan.budgets[layer, h])) for h in range(scores.shape[0])]

    @classmethod
    def options(cls) -> dict[str, Any]:
        """The parameters `build` accepts, with their defaults (what `--methods NAME:KEY=VALUE` may set)."""
        return {f.name: (f.default if f.default is not dataclasses.MISSING else None)
                for f in dataclasses.fields(cls) if f.init}

    def params(self) -> dict[str, Any]:
        """The parameters that differ from the defaults, for labels and results (the profile by name)."""
        out = {}
        for key, default in self.options().items():
            value = getattr(self, key)
            if key == "profile":
                continue
            if callable(value):
                value = getattr(value, "__name__", repr(value))
                default = getattr(default, "__name__", repr(default))
            if value != default:
                out[key] = value
        return out


def profile_scores(method: Method) -> np.ndarray:
    """[layer, kv_head] scores of a profile-driven method: its `profile` (a Profile, reduced over each GQA group by the
    method's `reduction`, or an array of KV-head scores). One-line errors for a missing profile or reduction."""
    if method.reduction not in ("mean", "max"):
        raise MethodError(f"reduction must be mean or max, got {method.reduction}")
    if method.profile is None:
        raise allocate.BudgetError(f"{method.name} needs a profile ({method.name}:profile=NAME, or --profile FILE)")
    if isinstance(method.profile, np.ndarray):
        return method.profile
    return method.profile.kv_scores(method.reduction)


def register(cls: type[Method]) -> type[Method]:
    REGISTRY[cls.name] = cls
    return cls


def names() -> tuple[str, ...]:
    """Registered methods, the full cache first, then by how much they adapt to the model."""
    return tuple(sorted(REGISTRY, key=lambda n: REGISTRY[n].rank))


def build(name: str, **options: Any) -> Method:
    """The method called `name` with `options` (its dataclass fields); one-line errors for unknown names
    and options, naming what is known."""
    if name not in REGISTRY:
        raise MethodError(f"unknown method '{name}' (use {', '.join(names())})")
    cls = REGISTRY[name]
    unknown = sorted(set(options) - set(cls.options()))
    if unknown:
        known = ", ".join(cls.options()) or "none"
        raise MethodError(f"{name} has no option '{unknown[0]}' (its options: {known})")
    try:
        method = cls(**options)
    except (TypeError, ValueError) as e:
        raise MethodError(f"{name}: {e}") from None
    if method.spread < 0:
        raise MethodError(f"{name}: spread must be >= 0, got {method.spread}")
    if not 0 <= method.decay < 1:
        raise MethodError(f"{name}: decay must lie in [0, 1), got {method.decay}")
    return method


def get(name: str) -> Method:
    """The method called `name` with its default parameters."""
    return build(name)
