"""Per-head scores for one decoding step, and the answer checks that decide whether a probe counts.

Both scores read, per layer and query head, the top-k attended positions of the step's query (from the
capture mechanism); they are vectorised over layers and heads.

- `retrieval` (Wu et al. 2024): +1/N when a head's top-1 position lies in the answer span and the token
  there equals the token generated at this step. N = answer-span tokens.
- `r2` (HeadKV Eq. 2): k = N; + attention weight / N for each of a head's top-k positions that lies in
  the correct-answer span (no token test).

Answer checks (recorded by name in every profile, so a re-score uses the same rule):
- `rouge1_recall` (retrieval): more than half of the answer's words are in the response.
- `answer_not_distractor` (r2, probe-set version 2): the response holds every word of the answer and no
  word that only a distractor has. It accepts "The oldest of them collects tin soldiers." and rejects a
  response naming two candidates, which token F1 gets wrong both ways on sentence-long responses.
- `token_f1` (r2, version 1 profiles): token F1 > 0.5, as the official HeadKV script.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import torch

METHODS = ("retrieval", "r2")


def topk_for(method: str, span_tokens: int) -> int:
    """How many top positions per head a method needs at each step."""
    return 1 if method == "retrieval" else span_tokens


def retrieval_step(top_idx: torch.Tensor, tokens: torch.Tensor, generated: int,
                   span: tuple[int, int]) -> torch.Tensor:
    """top_idx (layers, heads, k>=1) -> (layers, heads) increments."""
    start, end = span
    top1 = top_idx[..., 0]
    in_span = (top1 >= start) & (top1 < end)
    same_token = tokens[top1.clamp(max=tokens.numel() - 1)] == generated
    return (in_span & same_token).float() / (end - start)


def r2_step(top_vals: torch.Tensor, top_idx: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
    """top_vals/top_idx (layers, heads, N) -> (layers, heads) increments."""
    start, end = span
    in_span = (top_idx >= start) & (top_idx < end)
    return (top_vals * in_span).sum(-1) / (end - start)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge1_recall(response: str, answer: str) -> float:
    """Share of the answer's words (with multiplicity) that the response contains."""
    ref = Counter(words(answer))
    if not ref:
        return 0.0
    overlap = sum((Counter(words(response)) & ref).values())
    return overlap / sum(ref.values())


def token_f1(response: str, answer: str) -> float:
    pred, ref = Counter(words(response)), Counter(words(answer))
    overlap = sum((pred & ref).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / sum(pred.values()), overlap / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


_STOP = frozenset("a an the of and in on at to".split())


def answer_not_distractor(response: str, answer: str, distractors: Sequence[str] = ()) -> float:
    """1.0 when the response has all of the answer's words and none that only a distractor has, else 0.0."""
    said, wanted = set(words(response)), set(words(answer))
    wrong = {w for d in distractors for w in words(d)} - wanted - _STOP
    return float(bool(wanted) and wanted <= said and not (wrong & said))


RULES = {"rouge1_recall": "more than half of the answer's words are in the response",
         "token_f1": "token F1 of response and answer > 0.5",
         "answer_not_distractor": "the response has every word of the answer and no word that only a distractor has"}
DEFAULT_RULE = {"retrieval": "rouge1_recall", "r2": "answer_not_distractor"}
SUCCESS_THRESHOLD = 0.5


def answer_check(rule: str, response: str, answer: str, distractors: Sequence[str] = ()) -> tuple[bool, float]:
    """(counts, metric value) under the named rule (RULES)."""
    if rule == "answer_not_distractor":
        value = answer_not_distractor(response, answer, distractors)
    elif rule in ("rouge1_recall", "token_f1"):
        value = (rouge1_recall if rule == "rouge1_recall" else token_f1)(response, answer)
    else:
        raise ValueError(f"unknown answer check '{rule}'")
    return value > SUCCESS_THRESHOLD, value
