"""Per-head scores for one decoding step, and the answer checks that decide whether a probe counts.

Both scores read, per layer and query head, the top-k attended positions of the step's query (from the
capture mechanism); they are vectorised over layers and heads.

- `retrieval` (Wu et al. 2024): +1/N when a head's top-1 position lies in the answer span and the token
  there equals the token generated at this step. N = answer-span tokens.
- `r2` (HeadKV Eq. 2): k = N; + attention weight / N for each of a head's top-k positions that lies in
  the correct-answer span (no token test).
"""

from __future__ import annotations

import re
from collections import Counter

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


SUCCESS = {"retrieval": ("rouge1_recall", rouge1_recall), "r2": ("token_f1", token_f1)}
SUCCESS_THRESHOLD = 0.5


def answer_check(method: str, response: str, answer: str) -> tuple[bool, float]:
    """(counts, metric value): retrieval uses ROUGE-1 recall, r2 token F1, both > 0.5."""
    value = SUCCESS[method][1](response, answer)
    return value > SUCCESS_THRESHOLD, value
