"""`paper`: the HeadKV paper's form, facts and numbers interleaved in one sentence ("Mara is 31 years
old and collects seashells; Ines ..."), with three candidates; the correct fact is its clause."""

from __future__ import annotations

import random

from headprof.probing.families.base import Needle, ReasoningFamily
from headprof.probing.families.vocab import others, superlative


class Paper(ReasoningFamily):
    name = "paper"

    def make(self, rng: random.Random) -> Needle:
        people, facts, fact, values, numbers, ask, w = superlative(rng)
        clauses = [numbers.format(P=p, n=n).rstrip(".") + " and" + fact.format(P="", x=x).rstrip(".")
                   for p, n, x in zip(people, values, facts, strict=True)]
        return Needle("; ".join(clauses) + ".", ask, facts[w], clauses[w], others(facts, w), self.name)


FAMILY = Paper()
