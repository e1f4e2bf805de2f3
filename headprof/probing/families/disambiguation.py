"""`disambiguation`: three people, three facts of one kind; the question asks for one person's fact."""

from __future__ import annotations

import random

from headprof.probing.families.base import Needle, ReasoningFamily
from headprof.probing.families.vocab import cast, others


class Disambiguation(ReasoningFamily):
    name = "disambiguation"

    def make(self, rng: random.Random) -> Needle:
        people, facts, (fact, question, _) = cast(rng)
        i = rng.randrange(len(people))
        sentences = [fact.format(P=p, x=x) for p, x in zip(people, facts, strict=True)]
        return Needle(" ".join(sentences), question.format(P=people[i]), facts[i], sentences[i],
                      others(facts, i), self.name)


FAMILY = Disambiguation()
