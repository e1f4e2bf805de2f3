"""`two-hop`: a relation and three facts; the question asks for the fact of the person the relation
points to ("Which town does Sofia's landlord live in?")."""

from __future__ import annotations

import random

from headprof.probing.families.base import Needle, ReasoningFamily
from headprof.probing.families.vocab import RELATIONS, cast, others


class TwoHop(ReasoningFamily):
    name = "two-hop"

    def make(self, rng: random.Random) -> Needle:
        people, facts, (fact, question, _) = cast(rng, 4)
        relation = rng.choice(RELATIONS)
        asker, owners = people[0], people[1:]
        i = rng.randrange(len(owners))
        other = owners[(i + 1) % len(owners)]
        sentences = [fact.format(P=p, x=x) for p, x in zip(owners, facts, strict=True)]
        text = " ".join([f"{asker}'s {relation} is {owners[i]}.", f"{other}'s {relation} is {asker}."] + sentences)
        return Needle(text, question.format(P=f"{asker}'s {relation}"), facts[i], sentences[i], others(facts, i),
                      self.name)


FAMILY = TwoHop()
