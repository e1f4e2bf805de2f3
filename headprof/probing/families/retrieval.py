"""`retrieval` (Wu et al.): one fact in a needle sentence; the question asks for it. The fact is the
whole needle sentence, which instruct models restate when they answer."""

from __future__ import annotations

import random

from headprof.probing.families.base import Needle, RetrievalFamily
from headprof.probing.families.vocab import CITIES, NAMES

_NEEDLES = [
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


class Retrieval(RetrievalFamily):
    name = "retrieval"

    def make(self, rng: random.Random) -> Needle:
        needle, question, facts = rng.choice(_NEEDLES)
        name, city, x = rng.choice(NAMES), rng.choice(CITIES), rng.choice(facts)
        text = needle.format(name=name, city=city, x=x)
        return Needle(text, question.format(name=name, city=city), x, fact=text, kind=self.name)


FAMILY = Retrieval()
