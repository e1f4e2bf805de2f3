"""Official protocols end to end: `--preset headkv` (HeadKV-R2) and `--preset retrieval-head` (Retrieval_Head).

A preset reads needles and haystacks from a folder in the official layout (`DIR/needles.jsonl` with
`needle`, `question`, `real_needle` and, for headkv, `answer`; `DIR/part{i}/*.txt` the i-th needle's
haystack), builds every prompt as the official scripts do (the haystack trimmed to the length, minus a
200-token buffer and the needle; the needle inserted at the sentence break before the depth; raw text
followed by "Based on the content of the book, Question: ...\\nAnswer:"), locates the correct-fact span
by token overlap, and decodes and counts probes by the official rules (`Settings.from_preset`). Where
headprof deliberately differs from the letter of the scripts, `docs/profiles.md` says so.
"""

from __future__ import annotations

import glob
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headprof.errors import ProbeError
from headprof.probing.probes import Probe, ProbeSet, RenderedProbe, depth_grid, round_pct

QUESTION = "Based on the content of the book, Question: {question}\nAnswer:"
BUFFER = 200  # tokens the official scripts leave off the context for the question and the answer


@dataclass(frozen=True)
class Preset:
    name: str
    method: str  # the per-step score (families.base)
    rule: str  # answers.RULES
    stop_at_answer: bool  # HeadKV-R2 stops decoding at the answer's token length
    needs_answer: bool
    min_overlap: float  # a real_needle found with less token overlap is bad input
    first_match: bool  # Retrieval_Head takes the first window above min_overlap; HeadKV-R2 the last best one
    first_part: int  # needle i's haystack is part{i + first_part} (Retrieval_Head reads part1..part3)
    end_test: bool  # HeadKV-R2 also stops at the config's end token; Retrieval_Head has no end test
    parts: int | None = None  # how many parts the script reads (Retrieval_Head: 3), None: one per needle


PRESETS = {
    "headkv": Preset("headkv", "r2", "qa_f1", stop_at_answer=True, needs_answer=True, min_overlap=0.5,
                     first_match=False, first_part=0, end_test=True),
    "retrieval-head": Preset("retrieval-head", "retrieval", "needle_rouge1_recall", stop_at_answer=False,
                             needs_answer=False, min_overlap=0.9, first_match=True, first_part=1, end_test=False,
                             parts=3),
}
MAX_NEW_TOKENS = 50  # both scripts' decode length
LLAMA2_NEWLINE = 144  # the scripts also stop at this id (Llama-2's newline byte token), in every vocabulary
NEWLINE_TOKEN = "<0x0A>"  # ... and at a token spelled so (SentencePiece's newline byte)


def stop_ids(tokenizer, config, preset: Preset) -> tuple[set[int], set[int]]:
    """(end ids, newline ids) at which the script's decode loop breaks, after counting the step: the literal token
    test and id 144 as the scripts write them (which in most vocabularies are not a newline), and for HeadKV-R2 the
    config's own end token (a list of them matches nothing there)."""
    newline = {LLAMA2_NEWLINE}
    found = tokenizer.convert_tokens_to_ids(NEWLINE_TOKEN)
    if isinstance(found, int) and found != tokenizer.unk_token_id and \
            tokenizer.convert_ids_to_tokens(found) == NEWLINE_TOKEN:
        newline.add(found)
    eos = getattr(config, "eos_token_id", None)
    return ({eos} if preset.end_test and isinstance(eos, int) else set()), newline


def get(name: str) -> Preset:
    if name not in PRESETS:
        raise ProbeError(f"unknown preset '{name}' (use {' or '.join(PRESETS)})")
    return PRESETS[name]


class Folder:
    """A needles folder in the official layout: records and, per needle, its haystack text."""

    def __init__(self, path: Path, preset: Preset) -> None:
        self.path = Path(path)
        needles = self.path / "needles.jsonl"
        first = preset.first_part
        if not needles.is_file():
            raise ProbeError(f"{needles} not found: a --preset {preset.name} haystack folder holds needles.jsonl "
                             f"and part{first}/, part{first + 1}/, ...")
        fields = ("needle", "question", "real_needle") + (("answer",) if preset.needs_answer else ())
        self.records: list[dict[str, str]] = []
        for n, line in enumerate(needles.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                raise ProbeError(f"{needles}:{n}: not a JSON object") from None
            missing = [f for f in fields if not isinstance(r, dict) or not str(r.get(f) or "").strip()]
            if missing:
                raise ProbeError(f"{needles}:{n}: the record has no '{missing[0]}'")
            self.records.append({f: str(r[f]) for f in fields})
        if not self.records:
            raise ProbeError(f"{needles} holds no needles")
        if preset.parts is not None and len(self.records) > preset.parts:
            raise ProbeError(f"{needles} holds {len(self.records)} needles; --preset {preset.name} reads "
                             f"{preset.parts}, one per part{first}..part{first + preset.parts - 1}")
        wanted = [f"part{i + first}" for i in range(len(self.records))]
        have = sorted(p.name for p in self.path.glob("part*") if p.is_dir() and list(p.glob("*.txt")))
        if [w for w in wanted if w not in have]:
            raise ProbeError(f"--preset {preset.name} reads {', '.join(wanted)} (one per needle) in {self.path}; "
                             f"the folder has {', '.join(have) or 'no part folder with .txt files'}")
        self.texts = []
        for i, part in enumerate(wanted):
            files = sorted(glob.glob(str(self.path / part / "*.txt")))
            try:
                self.texts.append("".join(Path(f).read_text(encoding="utf-8") for f in files))
            except (OSError, UnicodeDecodeError) as e:
                raise ProbeError(f"cannot read the haystack of needle {i} in {self.path / part}: {e}") from None

    @property
    def identity(self) -> str:
        body = json.dumps([self.records, self.texts])
        return "folder:" + hashlib.sha256(body.encode()).hexdigest()[:16]


def official_lengths(max_positions: int, low: int = 0, high: int = 10000) -> list[int]:
    """The official grid: five lengths, linspace(low, high) (`start.sh`: 0 to 10000; length 0 is the needle and the
    question alone, at every depth), capped by the model's positions."""
    top = min(high, max_positions - MAX_NEW_TOKENS) if max_positions else high
    return [int(x) for x in np.round(np.linspace(min(low, top), top, num=5))]


def official_depths(count: int = 10) -> list[float]:
    """Depths as the scripts round them: linspace(0, 100, count) to whole percents."""
    return [float(x) / 100 for x in np.round(np.linspace(0, 100, num=count))]


def probe_set(folder: Folder, preset: Preset, lengths: list[int], depths: int) -> ProbeSet:
    """Every needle of the folder at every (length, depth) cell, as the scripts loop."""
    probes = []
    for i, r in enumerate(folder.records):
        for length in lengths:
            for depth in (official_depths(depths) if depths > 1 else depth_grid(depths)):
                probes.append(Probe(id=f"{preset.name}-N{i}-L{length}-D{round_pct(depth)}", family=preset.method,
                                    length=int(length), depth=depth, needle=r["needle"], question=r["question"],
                                    answer=r.get("answer", r["real_needle"]), fact=r["real_needle"], part=i))
    return ProbeSet(name=f"preset-{preset.name}", version="1", family=preset.method, seed=0, lengths=tuple(lengths),
                    depths=depths, haystack=folder.identity, probes=tuple(probes), preset=preset.name)


def check_spans(probe_set: ProbeSet, tokenizer, folder: Folder, preset: Preset) -> None:
    """Render each needle's first probe, so a real_needle that cannot be found stops the run before it starts."""
    seen: set[int | None] = set()
    for probe in probe_set.probes:
        if probe.part not in seen:
            seen.add(probe.part)
            render(probe, tokenizer, folder, preset)


def _period_ids(tokenizer) -> set[int]:
    """Tokens that end a sentence, where the needle may go: what the scripts' generic branch takes, the encoding of
    '.' (their per-tokenizer lists name the same token for Llama 3)."""
    return set(tokenizer(".")["input_ids"])


def context(tokenizer, haystack: str, needle: str, length: int, depth: float) -> str:
    """The haystack trimmed to `length` tokens, less the buffer and the needle, with the needle inserted
    at the last sentence end before `depth` (at the very end for depth 1), as the scripts build it."""
    text = ""
    while len(text.split()) < length:
        text += haystack
    # the scripts' `enc.encode`: with the tokenizer's special tokens (a BOS, where it adds one, goes into the text)
    tokens = tokenizer(text)["input_ids"]
    if len(tokens) > length:  # the scripts trim by decoding the first tokens, then encode the text again
        tokens = tokenizer(tokenizer.decode(tokens[:length]))["input_ids"]
    needle_ids = tokenizer(needle)["input_ids"]
    keep = length - BUFFER
    if len(tokens) + len(needle_ids) > keep:  # Python's slice, as the scripts cut: a short length keeps what it keeps
        tokens = tokens[:keep - len(needle_ids)]
    percent = round(depth * 100)
    if percent == 100:
        return tokenizer.decode(tokens + needle_ids)
    at = int(len(tokens) * (percent / 100))
    periods = _period_ids(tokenizer)
    while at > 0 and tokens[at - 1] not in periods:
        at -= 1
    return tokenizer.decode(tokens[:at] + needle_ids + tokens[at:])


def find_span(prompt_ids: list[int], needle_ids: list[int], first_over: float | None) -> tuple[int, int, float]:
    """The window of len(needle_ids) prompt tokens whose token set overlaps the needle's most.

    `first_over` (Retrieval_Head): the first window whose overlap exceeds it; None (HeadKV-R2): the
    last window with the highest overlap. Returns (start, end, overlap)."""
    wanted = set(needle_ids)
    n = len(needle_ids)
    best = (0, n, -1.0)
    for i in range(len(prompt_ids)):
        overlap = len(set(prompt_ids[i:i + n]) & wanted) / len(wanted)
        if first_over is not None and overlap > first_over:
            return i, i + n, overlap
        if overlap >= best[2]:
            best = (i, i + n, overlap)
    return best


def render(probe: Probe, tokenizer, folder: Folder, preset: Preset) -> RenderedProbe:
    """The official prompt of a preset probe and its correct-fact span."""
    assert probe.part is not None
    text = context(tokenizer, folder.texts[probe.part], probe.needle, probe.length, probe.depth)
    text += QUESTION.format(question=probe.question)
    ids = list(tokenizer(text)["input_ids"])
    fact_ids = tokenizer(probe.fact, add_special_tokens=False)["input_ids"]
    start, end, overlap = find_span(ids, fact_ids, preset.min_overlap if preset.first_match else None)
    if overlap <= preset.min_overlap:
        raise ProbeError(f"probe {probe.id}: the real_needle '{probe.fact[:60]}' was not found in the prompt "
                         f"(best token overlap {max(overlap, 0):.2f}, more than {preset.min_overlap} needed)")
    return RenderedProbe(input_ids=ids, answer_span=(start, end), text=text)
