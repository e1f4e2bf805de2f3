"""What a probe family is: a needle generator with its spans, top-k, per-step head score and answer rule.

Two scoring protocols exist, and each family belongs to one:

- `retrieval` (Wu et al., Retrieval Head): at each decode step, +1/N for a head whose top-1 attended
  position lies in the span and holds the token generated at this step (N = span tokens);
- `r2` (HeadKV-R2, Eq. 2): at each decode step, + weight/N for each of a head's top-N positions that
  lies in the span (no token test).

The span is the needle's correct-fact sentence (`fact`, as the official `real_needle`) by default, or
only its answer value (`span="value"`, the narrower span of headprof's earlier profiles).
A family's `method` alone decides its per-step score (`step_rows`, vectorised over the probes of a batch, their
layers and heads); a probe's score is the sum over its decode steps.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

from headprof.errors import ProbeError

SPANS = ("fact", "value")


@dataclass(frozen=True)
class Needle:
    """A needle text, its question, the answer value, the correct-fact sentence that holds the answer, and
    the same-kind facts that are wrong."""

    needle: str
    question: str
    answer: str
    fact: str = ""  # the correct-fact sentence (official `real_needle`); "" -> the needle's sentence holding answer
    distractors: tuple[str, ...] = ()
    kind: str | None = None  # the family that made it; None for user needles and legacy sets

    def check(self) -> Needle:
        if not self.needle or not self.question or not self.answer:
            raise ProbeError("needle, question and answer must be non-empty")
        if self.answer not in self.needle:
            raise ProbeError(f"the answer '{self.answer}' does not occur in the needle")
        if self.fact and (self.fact not in self.needle or self.answer not in self.fact):
            raise ProbeError(f"the fact '{self.fact}' must occur in the needle and contain the answer")
        for d in self.distractors:
            if not d or d not in self.needle:
                raise ProbeError(f"the distractor '{d}' does not occur in the needle")
            if d == self.answer:
                raise ProbeError(f"the distractor '{d}' equals the answer")
        return self

    @property
    def fact_sentence(self) -> str:
        """The correct-fact sentence: given, or the needle's sentence that holds the answer."""
        if self.fact:
            return self.fact
        at = self.needle.index(self.answer)
        starts = [0] + [m.end() for m in re.finditer(r"[.!?;]\s+", self.needle) if m.end() <= at]
        start = starts[-1]
        stop = re.search(r"[.!?;](\s|$)", self.needle[at + len(self.answer):])
        end = len(self.needle) if stop is None else at + len(self.answer) + stop.start() + 1
        return self.needle[start:end].strip()


def span_text(needle: Needle, span: str) -> str:
    """The text whose tokens form the scored span."""
    if span not in SPANS:
        raise ProbeError(f"unknown span '{span}' (use {' or '.join(SPANS)})")
    return needle.fact_sentence if span == "fact" else needle.answer


class Family:
    """One probe family. Subclasses set `name`, `method`, `candidates` and implement `make`."""

    name: str = ""
    protocol: str = ""  # the scoring protocol, "retrieval" or "r2": which per-step score

    @property
    def top1(self) -> bool:
        """Whether its step scores the top-1 hit on the span (retrieval) rather than the top-k weight on it (r2)."""
        return self.protocol == "retrieval"
    candidates: int = 1  # how many same-kind facts the needle offers; chance = 1 / candidates
    rule: str = "answer_f1"  # the answer check (answers.RULES) of probes from this family
    topk_rule: str = ""  # how k is chosen, as profiles record it

    @property
    def chance(self) -> float | None:
        return 1 / self.candidates if self.candidates > 1 else None

    def make(self, rng: random.Random) -> Needle:
        raise NotImplementedError

    def topk(self, span_tokens: int) -> int:
        raise NotImplementedError


def step_rows(retrieval: torch.Tensor, top_vals: torch.Tensor, top_idx: torch.Tensor, k: torch.Tensor,
              spans: torch.Tensor, tokens: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """One decode step's head increments for a batch of probes at once (no loop over probes per token).

    Per row r: `retrieval[r]` picks the method; top_vals/top_idx (rows, layers, heads, K), positions being columns of
    `tokens` (rows, T: the ids fed so far), of which the first `k[r]` count; `spans[r]` = (start, end) in the same
    columns (a left-padded row's span shifted by its padding); `generated[r]` the token of this step.
    Returns (rows, layers, heads)."""
    lo, hi = spans[:, 0].view(-1, 1, 1, 1), spans[:, 1].view(-1, 1, 1, 1)
    width = (hi - lo).to(top_vals.dtype).view(-1, 1, 1)
    in_span = (top_idx >= lo) & (top_idx < hi)
    counted = torch.arange(top_idx.shape[-1], device=top_idx.device) < k.view(-1, 1, 1, 1)
    r2 = (top_vals * (in_span & counted)).sum(-1) / width
    top1 = top_idx[..., 0]  # retrieval: the top-1 position is in the span and holds the generated token
    same = tokens.gather(1, top1.clamp(max=tokens.shape[1] - 1).flatten(1)).view_as(top1) == generated.view(-1, 1, 1)
    hits = (in_span[..., 0] & same).to(top_vals.dtype) / width
    return torch.where(retrieval.view(-1, 1, 1), hits, r2)


def _one(protocol: str, top_vals: torch.Tensor, top_idx: torch.Tensor, tokens: torch.Tensor, generated: int,
         span: tuple[int, int]) -> torch.Tensor:
    """`step_rows` for one probe (layers, heads, k): the rule has one definition."""
    dev = top_idx.device
    return step_rows(torch.tensor([protocol == "retrieval"], device=dev), top_vals[None].float(), top_idx[None],
                     torch.tensor([top_idx.shape[-1]], device=dev), torch.tensor([span], device=dev), tokens[None],
                     torch.tensor([generated], device=dev))[0]


def retrieval_step(top_idx: torch.Tensor, tokens: torch.Tensor, generated: int,
                   span: tuple[int, int]) -> torch.Tensor:
    return _one("retrieval", torch.zeros(top_idx.shape, device=top_idx.device), top_idx, tokens, generated, span)


def r2_step(top_vals: torch.Tensor, top_idx: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
    return _one("r2", top_vals, top_idx, torch.zeros(1, dtype=torch.long, device=top_idx.device), -1, span)


class RetrievalFamily(Family):
    protocol = "retrieval"
    topk_rule = "1"

    def topk(self, span_tokens: int) -> int:
        return 1


class ReasoningFamily(Family):
    protocol = "r2"
    candidates = 3
    topk_rule = "span tokens"

    def topk(self, span_tokens: int) -> int:
        return span_tokens


class UserNeedles(Family):
    """Needles the user brings (`--needles`, or a preset's folder): scored with the method's step."""

    def __init__(self, protocol: str, rule: str, candidates: int = 1) -> None:
        self.name, self.protocol, self.rule, self.candidates = "user", protocol, rule, candidates
        self._base = next(b() for b in (RetrievalFamily, ReasoningFamily) if b.protocol == protocol)
        self.topk_rule = self._base.topk_rule

    def topk(self, span_tokens: int) -> int:
        return self._base.topk(span_tokens)
