"""Answer checks: does a probe's response count as answered? Every rule is recorded by name in a profile.

- `answer_f1` (default, every generated family): the best QA-F1 (SQuAD normalisation: lower case, no
  punctuation or articles; plurals folded) of any stretch of the response against the answer is > 0.5,
  and higher than against any distractor. "Stamps." passes for "postage stamps" (0.67); "Kofi, who is
  45 years old, collects seashells" passes (1.0 against 0.67 for the distractor "old maps"); a correct
  answer inside a longer sentence or after its reasoning passes; an answer that names the correct fact
  and a distractor equally fails.
- `qa_f1` (HeadKV-R2's official rule): QA-F1 of the whole response against the answer > 0.5.
- `needle_rouge1_recall` (Retrieval_Head's official rule): ROUGE-1 recall of the correct-fact sentence
  (`real_needle`) in the response > 0.5 (unstemmed; the official scorer stems with Porter).
- legacy rules of older profiles, so `check` re-scores them as they were made: `rouge1_recall` (recall
  of the answer's words), `token_f1` (unnormalised F1 against the answer), `answer_not_distractor`.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

from headprof.errors import ProbeError

THRESHOLD = 0.5  # every rule: the probe counts when its metric is above this


def squad_normalize(text: str) -> str:
    """SQuAD's normalisation (lower case, punctuation and articles removed, spaces collapsed)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _fold(word: str) -> str:
    """Singular and plural read alike (stamps/stamp, strawberries/strawberry, tomatoes/tomato)."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith("oes"):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def _f1(pred: Sequence[str], gold: Sequence[str]) -> float:
    same = sum((Counter(pred) & Counter(gold)).values())
    if not same:
        return 0.0
    p, r = same / len(pred), same / len(gold)
    return 2 * p * r / (p + r)


def qa_f1(response: str, answer: str) -> float:
    """QA-F1 with SQuAD normalisation, as HeadKV's official script computes it."""
    return _f1(squad_normalize(response).split(), squad_normalize(answer).split())


def best_span_f1(response: str, answer: str) -> float:
    """The best QA-F1 of any contiguous stretch of the response against the answer (plurals folded)."""
    pred = [_fold(w) for w in squad_normalize(response).split()]
    gold = [_fold(w) for w in squad_normalize(answer).split()]
    if not pred or not gold:
        return 0.0
    wanted = set(gold)
    best = 0.0
    for i, w in enumerate(pred):
        if w not in wanted:
            continue  # a best stretch starts (and ends) on a word of the answer
        for j in range(i + 1, min(len(pred), i + 2 * len(gold)) + 1):
            best = max(best, _f1(pred[i:j], gold))
    return best


def answer_f1(response: str, answer: str, distractors: Sequence[str] = ()) -> float:
    """best_span_f1 against the answer, or 0.0 when a distractor scores as high (the response picked it)."""
    value = best_span_f1(response, answer)
    rival = max((best_span_f1(response, d) for d in distractors), default=0.0)
    return value if value > rival else 0.0


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge1_recall(response: str, reference: str) -> float:
    """Share of the reference's words (with multiplicity) that the response contains."""
    ref = Counter(words(reference))
    if not ref:
        return 0.0
    return sum((Counter(words(response)) & ref).values()) / sum(ref.values())


def token_f1(response: str, answer: str) -> float:
    """Unnormalised word F1 (the rule of version-1 profiles, and eval's agreement measure)."""
    return _f1(words(response), words(answer))


def agreement(response: str, reference: str) -> float:
    """How far a compressed answer agrees with the full cache's: token F1, and 1.0 for the same text (two answers
    without words, empty or punctuation only, are the same answer, not a disagreement)."""
    return 1.0 if response == reference else token_f1(response, reference)


_STOP = frozenset("a an the of and in on at to".split())


def answer_not_distractor(response: str, answer: str, distractors: Sequence[str] = ()) -> float:
    """1.0 when the response has all of the answer's words and none that only a distractor has, else 0.0."""
    said, wanted = set(words(response)), set(words(answer))
    wrong = {w for d in distractors for w in words(d)} - wanted - _STOP
    return float(bool(wanted) and wanted <= said and not (wrong & said))


# name -> (metric(response, answer, fact, distractors), wording recorded in profiles)
Rule = Callable[[str, str, str, Sequence[str]], float]
RULES: dict[str, tuple[Rule, str]] = {
    "answer_f1": (lambda r, a, f, d: answer_f1(r, a, d),
                  "best QA-F1 (SQuAD normalisation, plurals folded) of any stretch of the response against "
                  "the answer > 0.5, and higher than against every distractor"),
    "qa_f1": (lambda r, a, f, d: qa_f1(r, a), "QA-F1 (SQuAD normalisation) of the response against the answer "
                                                "> 0.5 (HeadKV-R2's official rule)"),
    "needle_rouge1_recall": (lambda r, a, f, d: rouge1_recall(r, f),
                             "ROUGE-1 recall of the correct-fact sentence in the response > 0.5 "
                             "(Retrieval_Head's official rule, unstemmed)"),
    "rouge1_recall": (lambda r, a, f, d: rouge1_recall(r, a),
                      "more than half of the answer's words are in the response"),
    "token_f1": (lambda r, a, f, d: token_f1(r, a), "token F1 of response and answer > 0.5"),
    "answer_not_distractor": (lambda r, a, f, d: answer_not_distractor(r, a, d),
                              "the response has every word of the answer and no word that only a distractor has"),
}


def check(rule: str, response: str, answer: str, fact: str = "", distractors: Sequence[str] = ()) -> tuple[bool, float]:
    """(counts, metric value) of a response under the named rule."""
    if rule not in RULES:
        raise ProbeError(f"unknown answer check '{rule}' (use {', '.join(RULES)})")
    value = RULES[rule][0](response, answer, fact or answer, distractors)
    return value > THRESHOLD, value
