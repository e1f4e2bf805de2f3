"""Needle-in-a-haystack probe sets (seed, version, hash) and rendering; the needles come from `families/`.

A probe is model independent (text, target length in tokens, depth). `render` fits the haystack to the
target length with a given tokenizer, so the same probe set serves every model. Probe sets can be drawn
again in further *rounds* (same seed stream, new needles in the same grid), which `score
--min-answered` uses until enough probes were answered; a round may leave out families that stayed at
chance.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from headprof.artefacts.profile import Profile
from headprof.errors import ProbeError
from headprof.files import read_jsonl
from headprof.probing import families as fam
from headprof.probing.haystack import ESSAYS, Haystack

__all__ = ["Haystack", "ProbeSet", "Probe", "build_probe_set", "render"]

INSTRUCTION = "Answer the question using only the text above. Reply with a short answer."


@dataclass(frozen=True)
class Probe:
    id: str
    family: str  # the scoring method: retrieval or r2
    length: int
    depth: float
    needle: str
    question: str
    answer: str
    distractors: tuple[str, ...] = ()
    kind: str | None = None  # the family that made the needle (disambiguation, comparison, ...)
    fact: str = ""  # the correct-fact sentence; "" on probe sets made before probes carried it
    part: int | None = None  # a preset folder's needle index (its haystack is DIR/part{i})

    @property
    def distractor(self) -> str | None:
        return self.distractors[0] if self.distractors else None

    def as_needle(self) -> fam.Needle:
        return fam.Needle(self.needle, self.question, self.answer, self.fact, self.distractors, self.kind)

    def to_dict(self) -> dict[str, Any]:
        d = {"id": self.id, "family": self.family, "length": self.length, "depth": self.depth,
             "needle": self.needle, "question": self.question, "answer": self.answer, "distractor": self.distractor}
        if self.kind is not None or len(self.distractors) > 1:  # version-1 probes keep their old shape (and hash)
            d.update(distractors=list(self.distractors), kind=self.kind)
        if self.fact:
            d["fact"] = self.fact
        if self.part is not None:
            d["part"] = self.part
        return d

    @classmethod
    def from_dict(cls, r: dict[str, Any], family: str) -> Probe:
        ds = r.get("distractors") or ([r["distractor"]] if r.get("distractor") else [])
        return cls(id=r["id"], family=r.get("family", family), length=int(r["length"]), depth=float(r["depth"]),
                   needle=r["needle"], question=r["question"], answer=r["answer"], distractors=tuple(ds),
                   kind=r.get("kind"), fact=r.get("fact", ""), part=r.get("part"))


@dataclass(frozen=True)
class ProbeSet:
    name: str
    version: str
    family: str  # the scoring method
    seed: int
    lengths: tuple[int, ...]
    depths: int
    haystack: str
    probes: tuple[Probe, ...]
    families: tuple[str, ...] | None = None  # the families mixed (versions that mix them)
    rounds: int = 1
    preset: str | None = None  # an official protocol (presets.py)

    @property
    def hash(self) -> str:
        body = json.dumps({"version": self.version, "haystack": self.haystack,
                           "probes": [p.to_dict() for p in self.probes]}, sort_keys=True)
        return "sha256:" + hashlib.sha256(body.encode()).hexdigest()

    def header(self) -> dict[str, Any]:
        extra: dict[str, Any] = {} if self.families is None else {"families": list(self.families)}
        extra.update({} if self.rounds == 1 else {"rounds": self.rounds})
        extra.update({} if self.preset is None else {"preset": self.preset})
        return {"name": self.name, "version": self.version, "hash": self.hash, "family": self.family,
                "seed": self.seed, "lengths": list(self.lengths), "depths": self.depths,
                "haystack": self.haystack, "count": len(self.probes), **extra}

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

    def redraw(self, r: int, families: Sequence[str] | None = None) -> ProbeSet:
        """Round r (>= 1) of this generated set: the same grid with new needles from the same seed stream,
        from `families` (default: this set's). A set of the user's own needles has no further rounds; the
        caller refuses that up front."""
        drawn = build_probe_set(self.family, self.lengths, self.depths, self.seed, version=self.version,
                                families=families or self.families, draw=r)
        return replace(drawn, name=self.name, haystack=self.haystack, families=self.families)

    def joined(self, others: Sequence[ProbeSet]) -> ProbeSet:
        """This set followed by further rounds of it, as one set."""
        probes = self.probes + tuple(p for o in others for p in o.probes)
        return replace(self, probes=probes, rounds=self.rounds + len(others))


def depth_grid(count: int) -> list[float]:
    """`count` depths evenly spaced over 0-100% of the context."""
    if count < 1:
        raise ProbeError(f"depths must be a positive count, got {count}")
    return [0.5] if count == 1 else [round(i / (count - 1), 4) for i in range(count)]


def default_lengths(max_positions: int, cap: int = 4000) -> list[int]:
    """Five lengths up to a cap that fits the model (and, on CPU, the machine)."""
    top = min(cap, max_positions - 64) if max_positions else cap
    return [max(100, round(top * i / 5 / 100) * 100) for i in range(1, 6)]


def load_needles(path: Path, protocol: str) -> list[fam.Needle]:
    """A user's needles (JSONL: needle, question, answer; optionally fact or real_needle, the correct-fact
    sentence; r2 also distractor or distractors)."""
    def parse(d: dict[str, Any]) -> fam.Needle:
        ds = d.get("distractors") or ([d["distractor"]] if d.get("distractor") else [])
        if fam.needs_distractors(protocol) and not ds:
            raise ProbeError(f"an {protocol} needle needs a 'distractor' (a wrong fact of the same kind, inside the "
                             "needle)")
        fact = str(d.get("fact") or d.get("real_needle") or "")
        return fam.Needle(str(d["needle"]), str(d["question"]), str(d["answer"]), fact,
                          tuple(str(x) for x in ds)).check()

    return [n for _, n in read_jsonl(path, "needles file", "needles", "needle, question, answer", parse,
                                     ProbeError)]


def build_probe_set(protocol: str, lengths: Sequence[int], depths: int, seed: int = 0,
                    needles: Sequence[fam.Needle] | None = None, haystack: Haystack | None = None,
                    exclude: frozenset[str] = frozenset(), version: str | None = None,
                    families: Sequence[str] | str | None = None, draw: int = 0) -> ProbeSet:
    """The grid lengths x depths, one needle per cell, deterministic from the seed.

    Generated needles whose text or question is in `exclude` are drawn again (eval items must not
    repeat a profile's probes). `version` picks the probe-set version (families.VERSIONS); `families`
    the families a mixing version draws from; `draw` > 0 draws the grid again with new needles.
    """
    if protocol not in fam.PROTOCOLS:
        raise ProbeError(f"unknown probe family '{protocol}' (use {' or '.join(fam.PROTOCOLS)})")
    version = version or fam.VERSIONS[protocol][0]
    chosen = fam.parse(families, protocol, version)
    if not lengths:
        raise ProbeError("at least one length is needed")
    for n in lengths:
        if n <= 0:
            raise ProbeError(f"lengths must be positive token counts, got {n}")
    haystack = haystack or Haystack(seed)
    mixed = fam.mixes(protocol, version)
    with_fact = fam.carries_fact(protocol, version)

    def make(rng: random.Random) -> fam.Needle:
        nd = fam.get(rng.choice(list(chosen)) if mixed else chosen[0]).make(rng).check()
        return nd if with_fact else replace(nd, fact="")

    suffix = f"-R{draw}" if draw else ""
    probes = []
    for li, length in enumerate(lengths):
        for di, depth in enumerate(depth_grid(depths)):
            if needles:
                nd = needles[(li * depths + di) % len(needles)]
            else:
                nd = make(random.Random(f"{protocol}-{seed}-{length}-{di}{suffix}"))
                for retry in range(1, 200):
                    if nd.needle not in exclude and nd.question not in exclude:
                        break
                    nd = make(random.Random(f"{protocol}-{seed}-{length}-{di}{suffix}-{retry}"))
            probes.append(Probe(id=f"{protocol}-L{length}-D{round_pct(depth)}{suffix}", family=protocol,
                                length=int(length), depth=depth, needle=nd.needle, question=nd.question,
                                answer=nd.answer, distractors=nd.distractors,
                                kind=nd.kind if mixed or with_fact else None, fact=nd.fact))
    name = "headprof-default" if needles is None and haystack.path is None else "custom"
    return ProbeSet(name=name, version=version, family=protocol, seed=seed, lengths=tuple(lengths),
                    depths=depths, haystack=haystack.identity, probes=tuple(probes),
                    families=chosen if mixed and needles is None else None)


def round_pct(depth: float) -> str:
    return f"{round(depth * 100):03d}"


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


def render(probe: Probe, tokenizer, haystack: Haystack, chat_template: bool = True,
           span: str = "fact") -> RenderedProbe:
    """Fit haystack sentences around the needle so the prompt has about `probe.length` tokens; the span
    is the correct-fact sentence (`span="fact"`) or only the answer value (`"value"`) in token positions."""
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
    nd = probe.as_needle()
    fact = nd.fact_sentence
    at = probe.needle.index(fact) + (0 if span == "fact" else fact.index(probe.answer))
    start = text.index(context) + context.index(probe.needle) + at
    end = start + len(fam.span_text(nd, span))
    positions = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > start and a < end and b > a]
    if not positions:
        raise ProbeError(f"probe {probe.id}: answer not found among the prompt's tokens")
    return RenderedProbe(input_ids=list(enc["input_ids"]), answer_span=(positions[0], positions[-1] + 1), text=text)


_SENTENCE_TOKENS: dict[tuple[int, str], int] = {}


def _sentence_tokens(tokenizer, sentence: str) -> int:
    key = (id(tokenizer), sentence)
    if key not in _SENTENCE_TOKENS:
        _SENTENCE_TOKENS[key] = len(tokenizer(" " + sentence, add_special_tokens=False)["input_ids"])
    return _SENTENCE_TOKENS[key]


def from_profile(profile: Profile, max_probes: int | None = None) -> tuple[ProbeSet, Haystack]:
    """Rebuild (a subset of) a profile's own probe set from the probes it stores."""
    ps = profile.probe_set
    rows = [r for r in profile.probes if "needle" in r]
    if not rows:
        raise ProbeError("the profile stores no probe texts (an imported profile?); it cannot be re-scored")
    hay = str(ps.get("haystack", ""))
    if ps.get("preset"):
        raise ProbeError(f"the profile's probes come from a needles folder; re-score with headprof score "
                         f"--preset {ps['preset']} --haystack DIR")
    if not hay.startswith(("generated:v1:seed=", "essays:")):
        raise ProbeError("the profile's probes used your own haystack file; re-score with headprof score --haystack")
    if max_probes is not None and max_probes < len(rows):
        if max_probes < 1:
            raise ProbeError(f"--max-probes must be positive, got {max_probes}")
        rows = [rows[round(i * (len(rows) - 1) / max(max_probes - 1, 1))] for i in range(max_probes)]
    family = ps.get("family", "r2")
    probes = tuple(Probe.from_dict(r, family) for r in rows)
    haystack = Haystack(0, Path(ESSAYS)) if hay.startswith("essays:") else Haystack(int(hay.split("=")[1]))
    if haystack.identity != hay:
        raise ProbeError(f"the installed essays differ from the profile's ({hay}); its probes cannot be rebuilt")
    return ProbeSet(name=ps.get("name", "profile"), version=ps.get("version", "1"), family=family,
                    seed=int(ps.get("seed") or 0),
                    lengths=tuple(sorted({p.length for p in probes})), depths=int(ps.get("depths") or 1),
                    haystack=haystack.identity, probes=probes,
                    families=tuple(ps["families"]) if ps.get("families") else None), haystack
