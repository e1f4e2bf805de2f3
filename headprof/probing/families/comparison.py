"""`comparison`: facts and numbers in separate short sentences; the question asks for the fact of the
oldest (tallest, ...) one, so the answer needs the numbers compared first."""

from __future__ import annotations

import random

from headprof.probing.families.base import Needle, ReasoningFamily
from headprof.probing.families.vocab import others, superlative


class Comparison(ReasoningFamily):
    name = "comparison"

    def make(self, rng: random.Random) -> Needle:
        people, facts, fact, values, numbers, ask, w = superlative(rng)
        sentences = [fact.format(P=p, x=x) for p, x in zip(people, facts, strict=True)]
        text = " ".join(sentences + [numbers.format(P=p, n=n) for p, n in zip(people, values, strict=True)])
        return Needle(text, ask, facts[w], sentences[w], others(facts, w), self.name)


FAMILY = Comparison()
