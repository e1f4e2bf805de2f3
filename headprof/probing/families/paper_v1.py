"""`paper-v1`: probe-set version 1's only r2 form (the paper's, two candidates), kept so that profiles
made with it rebuild their probe sets exactly. Small models answer it at chance or not at all."""

from __future__ import annotations

import random
import re

from headprof.probing.families.base import Needle, ReasoningFamily
from headprof.probing.families.vocab import NAMES

# (needle, question, (word if the larger number wins, word if the smaller wins), facts, range)
_FORMS = [
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


class PaperV1(ReasoningFamily):
    name = "paper-v1"
    candidates = 2
    rule = "token_f1"

    def make(self, rng: random.Random) -> Needle:
        needle, question, words, facts, (lo, hi) = rng.choice(_FORMS)
        a_name, b_name = rng.sample(NAMES, 2)
        x, y = rng.sample(facts, 2)
        a, b = rng.sample(range(lo, hi + 1), 2)
        larger_wins = rng.random() < 0.5
        a_wins = (a > b) == larger_wins
        text = needle.format(A=a_name, B=b_name, a=a, b=b, x=x, y=y)
        first, second = re.split(r"; |, while ", text.rstrip("."))
        return Needle(text, question.format(A=a_name, B=b_name, cmp=words[0] if larger_wins else words[1]),
                      answer=x if a_wins else y, fact=first if a_wins else second, distractors=(y if a_wins else x,))


FAMILY = PaperV1()
