"""Needle-in-a-haystack probes: the two families, probe sets with seed/version/hash, and rendering.

`retrieval` (Wu et al.): one fact in a needle sentence; the question asks for it.
`r2` (HeadKV-R2): the needle holds two candidate facts and what is needed to choose between them;
the question needs one reasoning step ("the older one"). The answer span is the correct fact only;
the other fact is recorded as the distractor.

A probe is model independent (text, target length in tokens, depth). `render` fits the haystack to the
target length with a given tokenizer, so the same probe set serves every model.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from headprof.errors import ProbeError
from headprof.files import read_jsonl
from headprof.haystack import Haystack

__all__ = ["Haystack", "ProbeSet", "Probe", "Needle", "build_probe_set", "render"]

FAMILIES = ("retrieval", "r2")
PROBE_SET_VERSION = "1"
INSTRUCTION = "Answer the question using only the text above. Reply with a short answer."

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
# (needle, question, (word if the larger number wins, word if the smaller wins), facts, number range)
_R2 = [
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


@dataclass(frozen=True)
class Needle:
    needle: str
    question: str
    answer: str
    distractor: str | None = None

    def check(self) -> Needle:
        if not self.needle or not self.question or not self.answer:
            raise ProbeError("needle, question and answer must be non-empty")
        if self.answer not in self.needle:
            raise ProbeError(f"the answer '{self.answer}' does not occur in the needle")
        if self.distractor is not None and self.distractor not in self.needle:
            raise ProbeError(f"the distractor '{self.distractor}' does not occur in the needle")
        return self


@dataclass(frozen=True)
class Probe:
    id: str
    family: str
    length: int
    depth: float
    needle: str
    question: str
    answer: str
    distractor: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ProbeSet:
    name: str
    version: str
    family: str
    seed: int
    lengths: tuple[int, ...]
    depths: int
    haystack: str
    probes: tuple[Probe, ...]

    @property
    def hash(self) -> str:
        body = json.dumps({"version": self.version, "haystack": self.haystack,
                           "probes": [p.to_dict() for p in self.probes]}, sort_keys=True)
        return "sha256:" + hashlib.sha256(body.encode()).hexdigest()

    def header(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "hash": self.hash, "family": self.family,
                "seed": self.seed, "lengths": list(self.lengths), "depths": self.depths,
                "haystack": self.haystack, "count": len(self.probes)}

    def to_jsonl(self, tokenizer=None, haystack: Haystack | None = None) -> str:
        """Header line, then one probe per line; with a tokenizer, each rendered prompt and answer span too."""
        lines = [json.dumps({"probe_set": self.header()})]
        for p in self.probes:
            row = p.to_dict()
            if tokenizer is not None:
                r = render(p, tokenizer, haystack or Haystack(self.seed))
                row.update(prompt_tokens=len(r.input_ids), answer_span=list(r.answer_span), prompt=r.text)
            lines.append(json.dumps(row))
        return "\n".join(lines) + "\n"


def retrieval_needle(rng: random.Random) -> Needle:
    needle, question, facts = rng.choice(_RETRIEVAL)
    name, city, x = rng.choice(_NAMES), rng.choice(_CITIES), rng.choice(facts)
    return Needle(needle.format(name=name, city=city, x=x), question.format(name=name, city=city), x)


def r2_needle(rng: random.Random) -> Needle:
    needle, question, words, facts, (lo, hi) = rng.choice(_R2)
    a_name, b_name = rng.sample(_NAMES, 2)
    x, y = rng.sample(facts, 2)
    a, b = rng.sample(range(lo, hi + 1), 2)
    larger_wins = rng.random() < 0.5
    a_wins = (a > b) == larger_wins
    return Needle(needle.format(A=a_name, B=b_name, a=a, b=b, x=x, y=y),
                  question.format(A=a_name, B=b_name, cmp=words[0] if larger_wins else words[1]),
                  answer=x if a_wins else y, distractor=y if a_wins else x)


def depth_grid(count: int) -> list[float]:
    """`count` depths evenly spaced over 0-100% of the context."""
    if count < 1:
        raise ProbeError(f"depths must be a positive count, got {count}")
    return [0.5] if count == 1 else [round(i / (count - 1), 4) for i in range(count)]


def default_lengths(max_positions: int, cap: int = 4000) -> list[int]:
    """Five lengths up to a cap that fits the model (and, on CPU, the machine)."""
    top = min(cap, max_positions - 64) if max_positions else cap
    return [max(100, round(top * i / 5 / 100) * 100) for i in range(1, 6)]


def load_needles(path: Path, family: str) -> list[Needle]:
    def parse(d: dict[str, Any]) -> Needle:
        return Needle(str(d["needle"]), str(d["question"]), str(d["answer"]),
                      str(d["distractor"]) if d.get("distractor") else None).check()

    needles = [n for _, n in read_jsonl(path, "needles file", "needles", "needle, question, answer", parse,
                                        ProbeError)]
    if family == "r2" and any(n.distractor is None for n in needles):
        raise ProbeError(f"{path}: r2 needles need a 'distractor' (the other candidate fact)")
    return needles


def build_probe_set(family: str, lengths: Sequence[int], depths: int, seed: int = 0,
                    needles: Sequence[Needle] | None = None, haystack: Haystack | None = None,
                    exclude: frozenset[str] = frozenset()) -> ProbeSet:
    """The grid lengths x depths, one needle per cell, deterministic from the seed.

    Generated needles whose text or question is in `exclude` are drawn again (eval items must not
    repeat a profile's probes).
    """
    if family not in FAMILIES:
        raise ProbeError(f"unknown probe family '{family}' (use {' or '.join(FAMILIES)})")
    if not lengths:
        raise ProbeError("at least one length is needed")
    for n in lengths:
        if n <= 0:
            raise ProbeError(f"lengths must be positive token counts, got {n}")
    haystack = haystack or Haystack(seed)
    make = retrieval_needle if family == "retrieval" else r2_needle
    probes = []
    for li, length in enumerate(lengths):
        for di, depth in enumerate(depth_grid(depths)):
            if needles:
                nd = needles[(li * depths + di) % len(needles)]
            else:
                nd = make(random.Random(f"{family}-{seed}-{length}-{di}"))
                for retry in range(1, 200):
                    if nd.needle not in exclude and nd.question not in exclude:
                        break
                    nd = make(random.Random(f"{family}-{seed}-{length}-{di}-{retry}"))
            probes.append(Probe(id=f"{family}-L{length}-D{round(depth * 100):03d}", family=family,
                                length=int(length), depth=depth, needle=nd.needle, question=nd.question,
                                answer=nd.answer, distractor=nd.distractor))
    name = "headprof-default" if needles is None and haystack.path is None else "custom"
    return ProbeSet(name=name, version=PROBE_SET_VERSION, family=family, seed=seed, lengths=tuple(lengths),
                    depths=depths, haystack=haystack.identity, probes=tuple(probes))


@dataclass(frozen=True)
class RenderedProbe:
    """Token ids of the whole prompt and the answer span [start, end) in token positions."""

    input_ids: list[int]
    answer_span: tuple[int, int]
    text: str


def chat_text(tokenizer, content: str, chat_template: bool, suffix: str = "") -> str:
    """The user message as the model sees it: in its chat template (with the assistant's turn opened),
    or raw with `suffix` when there is no template or it is not wanted."""
    if chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    return content + suffix


def encode(tokenizer, text: str, chat_template: bool, offsets: bool = False):
    """Token ids of a rendered prompt (the template brings its own special tokens)."""
    return tokenizer(text, add_special_tokens=not chat_template, return_offsets_mapping=offsets)


def question_text(tokenizer, context: str, question: str, chat_template: bool) -> str:
    return chat_text(tokenizer, f"{context}\n\n{INSTRUCTION}\nQuestion: {question}", chat_template, "\nAnswer:")


def prompt_ids(tokenizer, content: str, chat_template: bool = True, suffix: str = "") -> list[int]:
    """Token ids of a user message, in the tokenizer's chat template when it has one and it is wanted."""
    chat_template = chat_template and bool(getattr(tokenizer, "chat_template", None))
    return list(encode(tokenizer, chat_text(tokenizer, content, chat_template, suffix), chat_template)["input_ids"])


def render(probe: Probe, tokenizer, haystack: Haystack, chat_template: bool = True) -> RenderedProbe:
    """Fit haystack sentences around the needle so the prompt has about `probe.length` tokens."""
    chat_template = chat_template and bool(getattr(tokenizer, "chat_template", None))
    overhead = len(encode(tokenizer, question_text(tokenizer, probe.needle, probe.question, chat_template),
                          chat_template)["input_ids"])
    budget = probe.length - overhead
    sentences: list[str] = []
    if budget > 0:
        pool = haystack.sentences(budget // 8 + 16)
        while sum(_sentence_tokens(tokenizer, s) for s in pool) < budget:
            pool = haystack.sentences(2 * len(pool))
        used = 0
        for s in pool:
            cost = _sentence_tokens(tokenizer, s)
            if used + cost > budget:
                break
            sentences.append(s)
            used += cost
    while True:
        k = round(probe.depth * len(sentences))
        context = " ".join(sentences[:k] + [probe.needle] + sentences[k:])
        text = question_text(tokenizer, context, probe.question, chat_template)
        enc = encode(tokenizer, text, chat_template, offsets=True)
        if len(enc["input_ids"]) <= probe.length or not sentences:
            break
        sentences.pop()
    start = text.index(context) + context.index(probe.needle) + probe.needle.index(probe.answer)
    end = start + len(probe.answer)
    span = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > start and a < end and b > a]
    if not span:
        raise ProbeError(f"probe {probe.id}: answer not found among the prompt's tokens")
    return RenderedProbe(input_ids=list(enc["input_ids"]), answer_span=(span[0], span[-1] + 1), text=text)


_SENTENCE_TOKENS: dict[tuple[int, str], int] = {}


def _sentence_tokens(tokenizer, sentence: str) -> int:
    key = (id(tokenizer), sentence)
    if key not in _SENTENCE_TOKENS:
        _SENTENCE_TOKENS[key] = len(tokenizer(" " + sentence, add_special_tokens=False)["input_ids"])
    return _SENTENCE_TOKENS[key]


def from_profile(data: dict[str, Any], max_probes: int | None = None) -> tuple[ProbeSet, Haystack]:
    """Rebuild (a subset of) a profile's own probe set from the probes it stores."""
    ps = data.get("probe_set", {})
    rows = [r for r in data.get("probes", []) if "needle" in r]
    if not rows:
        raise ProbeError("the profile stores no probe texts (an imported profile?); it cannot be re-scored")
    hay = str(ps.get("haystack", ""))
    if not hay.startswith("generated:v1:seed="):
        raise ProbeError("the profile's probes used your own haystack file; re-score with headprof score --haystack")
    if max_probes is not None and max_probes < len(rows):
        if max_probes < 1:
            raise ProbeError(f"--max-probes must be positive, got {max_probes}")
        rows = [rows[round(i * (len(rows) - 1) / max(max_probes - 1, 1))] for i in range(max_probes)]
    probes = tuple(Probe(id=r["id"], family=ps.get("family", "r2"), length=int(r["length"]), depth=float(r["depth"]),
                         needle=r["needle"], question=r["question"], answer=r["answer"],
                         distractor=r.get("distractor")) for r in rows)
    haystack = Haystack(int(hay.split("=")[1]))
    return ProbeSet(name=ps.get("name", "profile"), version=ps.get("version", PROBE_SET_VERSION),
                    family=ps.get("family", "r2"), seed=int(ps.get("seed") or 0),
                    lengths=tuple(sorted({p.length for p in probes})), depths=int(ps.get("depths") or 1),
                    haystack=haystack.identity, probes=probes), haystack
