"""Names, places and fact kinds that the generated families draw from (none occurs in the haystack)."""

from __future__ import annotations

import random

NAMES = ["Mara", "Tobias", "Ines", "Kofi", "Linnea", "Ravi", "Odile", "Mateo", "Yuki", "Priya", "Henrik",
         "Amara", "Dmitri", "Sofia", "Jonah", "Leila", "Emeka", "Greta", "Anselm", "Noor"]
CITIES = ["Port Elsworth", "Brackenford", "Kestrel Bay", "Dunmarrow", "Ashcombe", "Vellmouth"]

# Fact kinds: (fact sentence, question about one person's fact, facts). No fact's words overlap
# another's, so the answer check can tell them apart.
KINDS = [
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
NUMBERS = [
    ("{P} is {n} years old.", ("oldest", "youngest"), (19, 80)),
    ("{P} is {n} centimetres tall.", ("tallest", "shortest"), (150, 199)),
]
RELATIONS = ["neighbour", "cousin", "teacher", "landlord"]


def cast(rng: random.Random, people: int = 3) -> tuple[list[str], list[str], tuple[str, str, list[str]]]:
    """`people` distinct names, 3 distinct facts of one kind, and the kind."""
    kind = rng.choice(KINDS)
    return rng.sample(NAMES, people), rng.sample(kind[2], 3), kind


def superlative(rng: random.Random) -> tuple[list[str], list[str], str, list[int], str, str, int]:
    """Three people with facts and numbers, the superlative question, and the winner's index."""
    people, facts, (fact, question, _) = cast(rng)
    numbers, words, (lo, hi) = rng.choice(NUMBERS)
    values = rng.sample(range(lo, hi + 1), len(people))
    largest = rng.random() < 0.5
    winner = values.index(max(values) if largest else min(values))
    who = f"the {words[0] if largest else words[1]} of {', '.join(people[:-1])} and {people[-1]}"
    return people, facts, fact, values, numbers, question.format(P=who), winner


def others(facts: list[str], i: int) -> tuple[str, ...]:
    return tuple(f for j, f in enumerate(facts) if j != i)
