"""Needle generators: what a probe asks, seeded and versioned; `probes.py` places them in a haystack.

`retrieval` (Wu et al.): one fact in a needle sentence; the question asks for it.

`r2` (HeadKV-R2) needles hold the correct fact and same-kind distractors; answering needs a step
beyond copying. Probe-set version 1 has one form, the paper's (one sentence, two candidates, a
two-step question); small models answer it at chance or not at all. Version 2 grades the difficulty
in four families, each with 3 candidates so that luck is rare (chance = 1/3):

- `disambiguation`: three people, three facts of one kind, ask for one person's fact;
- `comparison`: facts and numbers in separate short sentences, ask for the oldest/tallest one's fact;
- `paper`: the paper's form (one sentence, facts and numbers interleaved), with three candidates;
- `two-hop`: a relation and three facts, ask for the fact of the person the relation points to.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from headprof.errors import ProbeError

R2_FAMILIES = ("disambiguation", "comparison", "paper", "two-hop")
LEGACY = "paper-v1"  # version 1's only r2 form

_NAMES = ["Mara", "Tobias", "Ines", "Kofi", "Linnea", "Ravi", "Odile", "Mateo", "Yuki", "Priya", "Henrik",
          "Amara", "Dmitri", "Sofia", "Jonah", "Leila", "Emeka", "Greta", "Anselm", "Noor"]
_CITIES = ["Port Elsworth", "Brackenford", "Kestrel Bay", "Dunmarrow", "Ashcombe", "Vellmouth"]
_RETRIEVAL = [
    ("{name}'s secret ingredient for the harvest pie is {x}.",
     "What is {name}'s secret ingredient for the harvest pie?",
     ["smoked cinnamon", "black cardamom", "orange blossom honey", "toasted fennel seeds", "wild thyme"]),
    ("The code for {name}'s bicycle lock is {x}.", "What is the code for {name}'s bicycle lock?",
     ["4729", "8116", "3052", "9941", "6283"]),
    ("{name} hid the spare key {x}.", "Where did {name} hide the spare key?",
     ["under the blue flowerpot", "inside the broken lantern", "behind the loose brick", "in the tin of buttons"]),
    ("The best thing to do in {city} is {x}.", "What is the best thing to do in {city}?",
     ["eat a sandwich in the harbour park", "ride the night ferry", "visit the glass museum",
      "climb the lighthouse stairs"]),
    ("{name}'s favourite painting shows {x}.", "What does {name}'s favourite painting show?",
     ["a red kite over the sea", "three pears on a plate", "a lighthouse in a storm", "a fox asleep in snow"]),
]
# Version 1: (needle, question, (word if the larger number wins, word if the smaller wins), facts, range)
_R2_V1 = [
    ("{A} is {a} years old and collects {x}; {B} is {b} years old and collects {y}.",
     "What does the {cmp} of {A} and {B} collect?", ("older", "younger"),
     ["old postage stamps", "glass marbles", "seashells", "vintage maps", "tin soldiers", "pressed flowers",
      "copper coins", "jazz records"], (19, 80)),
    ("{A} was born in {a} and plays the {x}, while {B} was born in {b} and plays the {y}.",
     "Which instrument does the one of {A} and {B} who was born {cmp} play?", ("later", "earlier"),
     ["cello", "oboe", "banjo", "harp", "trumpet", "accordion", "violin", "flute"], (1950, 2005)),
    ("{A} is {a} centimetres tall and owns a {x}; {B} is {b} centimetres tall and owns a {y}.",
     "What pet does the {cmp} of {A} and {B} own?", ("taller", "shorter"),
     ["tortoise", "parrot", "ferret", "goldfish", "beagle", "rabbit", "hamster", "cockatiel"], (150, 199)),
    ("{A} runs {a} kilometres every week and grows {x}; {B} runs {b} kilometres every week and grows {y}.",
     "What does the one of {A} and {B} who runs {cmp} kilometres every week grow?", ("more", "fewer"),
     ["tomatoes", "sunflowers", "pumpkins", "lavender", "strawberries", "runner beans", "garlic", "roses"],
     (5, 60)),
]

# Version 2. Fact kinds: (fact sentence, question about one person's fact, facts). No fact's words
# overlap another's, so the answer check can tell them apart.
_KINDS = [
    ("{P} collects {x}.", "What does {P} collect?",
     ["postage stamps", "glass marbles", "seashells", "old maps", "tin soldiers", "copper coins", "jazz records"]),
    ("{P} plays the {x}.", "Which instrument does {P} play?",
     ["cello", "oboe", "banjo", "harp", "trumpet", "accordion", "violin", "flute"]),
    ("{P} owns a {x}.", "What pet does {P} own?",
     ["tortoise", "parrot", "ferret", "goldfish", "beagle", "rabbit", "hamster"]),
    ("{P} lives in {x}.", "Which town does {P} live in?",
     ["Port Elsworth", "Brackenford", "Kestrel Bay", "Dunmarrow", "Ashcombe", "Vellmouth", "Larchmere"]),
    ("{P} grows {x}.", "What does {P} grow?",
     ["tomatoes", "sunflowers", "pumpkins", "lavender", "strawberries", "garlic", "roses"]),
]
# Comparisons: (number sentence, (superlative if the largest wins, if the smallest wins), range)
_NUMBERS = [
    ("{P} is {n} years old.", ("oldest", "youngest"), (19, 80)),
    ("{P} is {n} centimetres tall.", ("tallest", "shortest"), (150, 199)),
]
_RELATIONS = ["neighbour", "cousin", "teacher", "landlord"]


@dataclass(frozen=True)
class Needle:
    """A needle text, its question, the correct fact (`answer`) and the same-kind facts that are wrong."""

    needle: str
    question: str
    answer: str
    distractors: tuple[str, ...] = ()
    kind: str | None = None  # the r2 family (version 2); None for retrieval, version 1 and user needles

    def check(self) -> Needle:
        if not self.needle or not self.question or not self.answer:
            raise ProbeError("needle, question and answer must be non-empty")
        if self.answer not in self.needle:
            raise ProbeError(f"the answer '{self.answer}' does not occur in the needle")
        for d in self.distractors:
            if not d or d not in self.needle:
                raise ProbeError(f"the distractor '{d}' does not occur in the needle")
            if d == self.answer:
                raise ProbeError(f"the distractor '{d}' equals the answer")
        return self


def retrieval_needle(rng: random.Random) -> Needle:
    needle, question, facts = rng.choice(_RETRIEVAL)
    name, city, x = rng.choice(_NAMES), rng.choice(_CITIES), rng.choice(facts)
    return Needle(needle.format(name=name, city=city, x=x), question.format(name=name, city=city), x)


def r2_v1_needle(rng: random.Random) -> Needle:
    """Version 1 (the paper's form, two candidates): kept so old profiles' probe sets rebuild exactly."""
    needle, question, words, facts, (lo, hi) = rng.choice(_R2_V1)
    a_name, b_name = rng.sample(_NAMES, 2)
    x, y = rng.sample(facts, 2)
    a, b = rng.sample(range(lo, hi + 1), 2)
    larger_wins = rng.random() < 0.5
    a_wins = (a > b) == larger_wins
    return Needle(needle.format(A=a_name, B=b_name, a=a, b=b, x=x, y=y),
                  question.format(A=a_name, B=b_name, cmp=words[0] if larger_wins else words[1]),
                  answer=x if a_wins else y, distractors=(y if a_wins else x,))


def _cast(rng: random.Random, people: int = 3) -> tuple[list[str], list[str], tuple[str, str, list[str]]]:
    """`people` distinct names, 3 distinct facts of one kind, and the kind."""
    kind = rng.choice(_KINDS)
    return rng.sample(_NAMES, people), rng.sample(kind[2], 3), kind


def _sentence(template: str, person: str, **kw: object) -> str:
    return template.format(P=person, **kw)


def disambiguation(rng: random.Random) -> Needle:
    people, facts, (fact, question, _) = _cast(rng)
    i = rng.randrange(len(people))
    text = " ".join(_sentence(fact, p, x=x) for p, x in zip(people, facts, strict=True))
    return Needle(text, question.format(P=people[i]), facts[i], tuple(f for j, f in enumerate(facts) if j != i),
                  "disambiguation")


def _superlative(rng: random.Random) -> tuple[list[str], list[str], str, list[int], str, str, int]:
    people, facts, (fact, question, _) = _cast(rng)
    numbers, words, (lo, hi) = rng.choice(_NUMBERS)
    values = rng.sample(range(lo, hi + 1), len(people))
    largest = rng.random() < 0.5
    winner = values.index(max(values) if largest else min(values))
    who = f"the {words[0] if largest else words[1]} of {', '.join(people[:-1])} and {people[-1]}"
    ask = question.format(P=who)
    return people, facts, fact, values, numbers, ask, winner


def comparison(rng: random.Random) -> Needle:
    people, facts, fact, values, numbers, ask, w = _superlative(rng)
    text = " ".join([_sentence(fact, p, x=x) for p, x in zip(people, facts, strict=True)]
                    + [_sentence(numbers, p, n=n) for p, n in zip(people, values, strict=True)])
    return Needle(text, ask, facts[w], tuple(f for j, f in enumerate(facts) if j != w), "comparison")


def paper(rng: random.Random) -> Needle:
    people, facts, fact, values, numbers, ask, w = _superlative(rng)
    clauses = [_sentence(numbers, p, n=n).rstrip(".") + " and" + _sentence(fact, "", x=x).rstrip(".")
               for p, n, x in zip(people, values, facts, strict=True)]
    text = "; ".join(clauses) + "."
    return Needle(text, ask, facts[w], tuple(f for j, f in enumerate(facts) if j != w), "paper")


def two_hop(rng: random.Random) -> Needle:
    people, facts, (fact, question, _) = _cast(rng, 4)
    relation = rng.choice(_RELATIONS)
    asker, owners = people[0], people[1:]
    i = rng.randrange(len(owners))
    other = owners[(i + 1) % len(owners)]
    text = " ".join([f"{asker}'s {relation} is {owners[i]}.", f"{other}'s {relation} is {asker}."]
                    + [_sentence(fact, p, x=x) for p, x in zip(owners, facts, strict=True)])
    return Needle(text, question.format(P=f"{asker}'s {relation}"), facts[i],
                  tuple(f for j, f in enumerate(facts) if j != i), "two-hop")


_R2_MAKERS: dict[str, Callable[[random.Random], Needle]] = {
    "disambiguation": disambiguation, "comparison": comparison, "paper": paper, "two-hop": two_hop}


def parse_families(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """The r2 families to mix (default: all four), validated."""
    if text is None:
        return R2_FAMILIES
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    unknown = [n for n in names if n not in R2_FAMILIES]
    if unknown or not names:
        raise ProbeError(f"unknown r2 family '{unknown[0] if unknown else text}' "
                         f"(use {', '.join(R2_FAMILIES)})")
    return tuple(dict.fromkeys(names))


def r2_needle(rng: random.Random, families: Sequence[str] = R2_FAMILIES) -> Needle:
    """A version-2 r2 needle from one of `families`, chosen by the same seeded stream."""
    return _R2_MAKERS[rng.choice(list(families))](rng).check()
