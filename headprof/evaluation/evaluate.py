"""Quality versus budget: every method at every budget on the same items, next to the full cache.

Items are needle (retrieval) and reasoning (r2) probes drawn from a seed and checked to be disjoint from
the profiles' own probes, or a user's long-context QA file. Per item: contains-match, token F1 and
agreement (token F1) with the full-cache answer; per method x budget: means with bootstrap 95%
intervals, KV bytes held (measured) and wall time. With several betas, HeadKV's beta is chosen per
budget on a validation half of the items and every method is reported on the other half.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from headprof import methods
from headprof.artefacts.compare import bootstrap_ci
from headprof.artefacts.profile import Profile
from headprof.compressing import generation
from headprof.defaults import BETA, KERNEL, OLD_SELECTION, SELECTION, WINDOW
from headprof.distributed import World
from headprof.errors import HeadprofError, ProbeError, out_of_memory
from headprof.evaluation import ruler
from headprof.files import read_jsonl
from headprof.models import LoadedModel
from headprof.partial import PartialRun
from headprof.probing import probes
from headprof.probing.answers import agreement, answer_not_distractor, token_f1, words
from headprof.progress import Callback, Progress

RESULTS_VERSION = 1
PROBE_TASKS = ("needle", "reasoning")  # headprof's own items: retrieval needles and r2 reasoning probes
FULL = next(n for n in methods.names() if not methods.REGISTRY[n].compresses)  # the reference: no compression


@dataclass
class Item:
    id: str
    task: str
    prompt_ids: list[int]
    answers: list[str]
    split: str = "test"
    distractors: tuple[str, ...] = ()  # reasoning items: a response naming one of these is not correct
    metric: str | None = None  # a suite's own score ("all"/"part": RULER's string match); None: contains
    max_new_tokens: int | None = None  # the suite's answer length for this item; None: the grid's
    question_start: int | None = None  # where the question starts in prompt_ids (None: no separate question)


def item_score(item: Item, response: str) -> float:
    """The item's headline score: its suite's metric (RULER's string match), else contains."""
    if item.metric is None:
        return contains(response, item.answers, item.distractors)
    return ruler.string_match(item.metric, response, item.answers)


def ratio_budget(item: Item, ratio: float, window: int, compress_questions: bool = True) -> int:
    """Tokens per KV head that remove `ratio` of the compressed tokens' KV (kvpress's compression ratio: of the whole
    prompt, or of the context alone where the question is asked after compression), never fewer than the observation
    window needs."""
    compressed = len(item.prompt_ids) if compress_questions else item.question_start
    return max(window + 1, round((1 - ratio) * compressed))


def ruler_items(lm: LoadedModel, spec: str, lengths: Sequence[int], items: int, seed: int,
                first: int = 0) -> list[Item]:
    """RULER items (ruler.py) for the model's tokenizer, in its chat template with the answer prefix after it;
    `first` is the index of the first item per task and length."""
    chat = lm.info.chat_template

    def ids(text: str, prefix: str) -> list[int]:
        if not chat:
            return probes.prompt_ids(lm.tokenizer, text, False, prefix)
        return probes.prompt_ids(lm.tokenizer, text) + list(lm.tokenizer(prefix, add_special_tokens=False)["input_ids"])

    tasks = ruler.parse(spec)
    out = []
    for length in lengths:
        if lm.info.max_positions and length > lm.info.max_positions:
            raise HeadprofError(f"length {length} is above the model's {lm.info.max_positions} positions")
        for task in tasks:
            for it in ruler.generate(task, lambda t, p: len(ids(t, p)), length, items, seed, start=first):
                prompt = ids(it.text, it.answer_prefix)
                out.append(Item(it.id, it.task, prompt, it.answers, metric=it.metric,
                                max_new_tokens=it.max_new_tokens,
                                question_start=_shared_start(prompt, ids(it.context, it.answer_prefix))))
    return out


def _shared_start(prompt: list[int], context: list[int]) -> int:
    """How many leading tokens `prompt` shares with the same prompt made of its context alone: where its question
    starts (a token spanning the boundary belongs to the question)."""
    n = 0
    for a, b in zip(prompt, context, strict=False):
        if a != b:
            break
        n += 1
    return n


def probe_tasks(spec: str | None) -> list[str] | None:
    """`probes` (default) or `probes:needle`: which of headprof's own probe tasks to use; None for another suite."""
    suite, _, names = (spec or "probes").partition(":")
    if suite == "ruler":
        return None
    if suite != "probes":
        raise HeadprofError(f"unknown suite '{suite}' (use probes, probes:needle, ruler or ruler:TASK,TASK)")
    chosen = list(dict.fromkeys(n.strip() for n in names.split(",") if n.strip())) or list(PROBE_TASKS)
    for name in chosen:
        if name not in PROBE_TASKS:
            raise HeadprofError(f"unknown probe task '{name}' (use {', '.join(PROBE_TASKS)})")
    return chosen


def contains(response: str, answers: Sequence[str], distractors: Sequence[str] = ()) -> float:
    """1.0 when the response contains an answer (and, with distractors, names none of them)."""
    if distractors:
        return max(answer_not_distractor(response, a, distractors) for a in answers)
    text = " ".join(words(response))
    return float(any(" ".join(words(a)) in text for a in answers if words(a)))


def best_f1(response: str, answers: Sequence[str]) -> float:
    return max(token_f1(response, a) for a in answers)


def parse_methods(text: str, profiles: dict[str, Profile]) -> list[str]:
    """Method specs of the grid (`snapkv`, `adakv:safeguard=0.1`, `headkv:profile=r2,beta=1.5` or its short
    form `headkv-r2`), checked: every profile-driven method names a loaded profile."""
    specs = method_labels(text)
    if not specs:
        raise HeadprofError("no methods given")
    for label in specs:
        spec = methods.parse_spec(label)
        if spec.method_class.needs_profile and spec.profile not in profiles:
            example = next(iter(profiles), "r2")
            raise HeadprofError(f"method {label} needs a profile: {spec.name}:profile=NAME or {spec.name}-NAME "
                                f"with NAME.json in --profile-dir or shipped (e.g. {spec.name}-{example})")
    return specs


def method_labels(text: str) -> list[str]:
    """Split 'full,headkv:profile=r2,beta=1.5,snapkv' at the commas that start a new method."""
    out: list[str] = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        if out and "=" in part and ":" not in part:
            out[-1] += "," + part  # KEY=VALUE continues the previous method's options
        else:
            out.append(part)
    return out


def overlapping(profile: Profile, probe_set: probes.ProbeSet) -> list[str]:
    """Eval items whose needle or question also occurs among the profile's probes."""
    seen = used_texts([profile])
    return [p.id for p in probe_set.probes if p.needle in seen or p.question in seen]


def used_texts(profiles: Sequence[Profile]) -> frozenset[str]:
    """Needles and questions of the profiles' probes, which eval items must avoid."""
    texts = {r.get(k) for p in profiles for r in p.probes for k in ("needle", "question")}
    texts.discard(None)
    return frozenset(texts)


def probe_items(lm: LoadedModel, task: str, lengths: Sequence[int], items: int, seed: int,
                exclude: frozenset[str] = frozenset()) -> tuple[list[Item], probes.ProbeSet]:
    family = "retrieval" if task == "needle" else "r2"
    hs = probes.Haystack(seed)
    ps = probes.build_probe_set(family, lengths, items, seed, exclude=exclude)
    out = [Item(f"{task}-{p.id}", task, probes.render(p, lm.tokenizer, hs).input_ids, [p.answer],
                distractors=p.distractors) for p in ps.probes]
    return out, ps


def file_items(lm: LoadedModel, path: Path) -> list[Item]:
    """Items from JSONL lines with context, question and answers (a list, or one string)."""
    def parse(d: dict[str, Any]) -> tuple[str, str, list[str]]:
        context, question, answers = str(d["context"]), str(d["question"]), d["answers"]
        answers = [answers] if isinstance(answers, str) else [str(a) for a in answers]
        if not answers or not context.strip() or not question.strip():
            raise ProbeError("context, question and answers must be non-empty")
        return context, question, answers

    rows = read_jsonl(path, "tasks file", "items", "context, question, answers", parse, ProbeError)
    chat = lm.info.chat_template
    return [Item(f"task-{i}", "tasks", list(probes.encode(lm.tokenizer, probes.question_text(
        lm.tokenizer, context, question, chat), chat)["input_ids"]), answers)
        for i, (context, question, answers) in rows]


def export_row(item: Item, suite: dict[str, Any] | None) -> dict[str, Any]:
    """One item as another harness needs it: the exact token ids, answers, scoring and answer length."""
    return {"id": item.id, "task": item.task, "prompt_ids": item.prompt_ids, "answers": item.answers,
            "metric": item.metric or "contains", "max_new_tokens": item.max_new_tokens,
            **({} if item.question_start is None else {"question_start": item.question_start}),
            **({"suite": suite["name"], "suite_version": suite["version"]} if suite else {})}


def bootstrap(values: Sequence[float]) -> tuple[float, float]:
    """95% bootstrap interval of the mean of per-item values."""
    if len(values) < 2:
        return (float(np.mean(values)), float(np.mean(values))) if len(values) else (float("nan"), float("nan"))
    lo, hi = bootstrap_ci(np.asarray(values, dtype=float))
    return float(lo), float(hi)


def evaluate(lm: LoadedModel, items: list[Item], method_specs: list[str], budgets: list[int],
             profiles: dict[str, Profile], betas: Sequence[float] = (BETA,), window: int = WINDOW, kernel: int = KERNEL,
             max_new_tokens: int = 24, progress: Callback | None = None,
             compress_sliding: bool = True, share_prefill: bool = True, world: World | None = None,
             ratios: Sequence[float] = (), suite: dict[str, Any] | None = None, partial: Path | None = None,
             resume: bool = False, batch_cells: bool = True, compress_questions: bool = True) -> dict[str, Any]:
    """Run the grid; returns the results document (see docs/results.md for its shape).

    `compress_questions` (the default, as the HeadKV paper evaluates): the question is compressed with the context.
    False is kvpress's protocol (its leaderboard's `compress_questions=False`): each item's context is prefilled and
    compressed alone, then the question is read through the compressed cache; ratios count the context's tokens.
    Items need a separate question (RULER's have one).

    Each finished item's rows go to `partial` at once (partial.py): an interrupted grid keeps its items, and
    `resume` continues it (the settings, profiles and items must be the same) with the same rows.

    Under torchrun / accelerate launch (`world`), each process runs every size-th item and the rows are
    gathered in item order, so every process returns the document a single process would have made.

    Each item is prefilled once (`share_prefill`) and every method and budget starts from that prefill:
    the answers are the same as prefilling per cell, and prefill is most of the time. A cell's
    `seconds` then counts its decode only; the prefill's time is in the item's full-cache row. With
    `batch_cells` (the default) the compressing cells of an item decode as one batch from that prefill
    (`generation.generate_cells`: the same tokens, a cell leaving the batch when it ends); a cell's `seconds` is
    then its share of the batch's time, and its `kv_bytes` its share of the batch's bytes by entries.

    `ratios` are cells as kvpress reports them: the fraction of each prompt's KV removed, i.e. a budget
    per item of (1 - ratio) x its prompt tokens per KV head (rows keep the budget used and the ratio)."""
    if any(b <= window for b in budgets):
        raise HeadprofError(f"every budget must exceed the observation window ({window})")
    if any(not 0 < r < 1 for r in ratios):
        raise HeadprofError(f"every ratio must lie between 0 and 1 (the fraction of the KV removed), got "
                            f"{', '.join(str(r) for r in ratios)}")
    if not compress_questions:
        alone = [i.id for i in items if i.question_start is None]
        if alone:
            raise HeadprofError(f"--no-compress-questions needs items with a separate question; {alone[0]} has none "
                                "(RULER's items have one)")
    tune = len(betas) > 1
    for i, item in enumerate(items):
        item.split = "validation" if tune and i % 2 == 0 else "test"
    specs = {label: methods.parse_spec(label) for label in [FULL, *method_specs]}
    by_profile = [m for m in method_specs if _tuned(specs[m])]
    compressed = [m for m in method_specs if specs[m].method_class.compresses]
    per_budget = len([m for m in compressed if not _tuned(specs[m])]) + len(by_profile) * len(betas)
    world = world or World()
    mine = world.shard(items)
    total = len(mine) * (1 + per_budget * (len(budgets) + len(ratios)))
    done = 0
    rows: list[dict[str, Any]] = []

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(Progress(done, total))

    def run(item: Item, method: str, budget: int, beta: float) -> generation.RunResult:
        m = specs[method].build(profiles, window=window, kernel=kernel, beta=beta)
        return generation.generate(lm, item.prompt_ids, m, budget, item.max_new_tokens or max_new_tokens,
                                   compress_sliding=compress_sliding, shared=shared,
                                   question_start=None if compress_questions else item.question_start)

    shared: generation.Prefill | None = None
    if generation.fresh_prefill_only(lm.info.layout, compressed, specs):
        if not compress_questions:
            raise HeadprofError("kvpress's protocol reads the question over a compressed context: a DeepSeek-V4 "
                                "block layer's compressors cannot continue from another prefill; compress the "
                                "question with the context")
        share_prefill = False  # each cell prefills for itself (same tokens, more time)
    widest = max([window] + [int(s.options.get("window", window)) for s in specs.values()])  # rows every method reads
    fingerprint = {"results_version": RESULTS_VERSION, "model": lm.info.resolved,
                   "weights_sha256": lm.info.weights_sha256, "dtype": str(lm.dtype), "device": str(lm.device),
                   "methods": list(method_specs), "budgets": list(budgets), "ratios": list(ratios),
                   "betas": list(betas), "window": window, "kernel": kernel, "selection": SELECTION,
                   "compress_questions": compress_questions, "max_new_tokens": max_new_tokens,
                   "compress_sliding": compress_sliding, "share_prefill": share_prefill,
                   "profiles": {name: _digest(p.data) for name, p in sorted(profiles.items())},
                   "items": _digest([[i.id, [int(t) for t in i.prompt_ids], i.answers, i.distractors, i.metric,
                                      i.max_new_tokens, i.split] for i in items]),
                   "processes": world.size, "rank": world.rank}
    per_item = total // len(mine) if mine else 0
    with PartialRun(partial, fingerprint, resume, "item", "model, methods, budgets, profiles or items") as kept:
        resumed = sum(item.id in kept.done for item in mine)
        for item in mine:
            if item.id in kept.done:  # finished by an earlier, interrupted run
                rows += kept.done[item.id]["rows"]
                done += per_item
                if progress:
                    progress(Progress(done, total, resumed=resumed * per_item))
                continue
            item_rows: list[dict[str, Any]] = []
            t = time.perf_counter()
            context = item.prompt_ids if compress_questions else item.prompt_ids[:item.question_start]
            shared = generation.prefill(lm, context, widest) if share_prefill or not compress_questions else None
            full = run(item, FULL, 0, BETA)
            full_row = _row(item, FULL, None, None, full, full.text, time.perf_counter() - t)
            tick()
            cells = [(b, None) for b in budgets] + [(ratio_budget(item, r, window, compress_questions), r)
                                                    for r in ratios]
            grid = [(budget, ratio, method, beta) for budget, ratio in cells for method in compressed
                    for beta in (betas if _tuned(specs[method]) else [None])]
            batched: dict[int, tuple[generation.RunResult, float]] = {}
            if shared is not None and batch_cells and len(grid) > 1:  # one batch of every cell of the prefill
                t = time.perf_counter()
                try:
                    made = generation.generate_cells(
                        lm, shared, [(specs[m].build(profiles, window=window, kernel=kernel, beta=beta or BETA), b)
                                     for b, _, m, beta in grid], item.max_new_tokens or max_new_tokens,
                        compress_sliding, None if compress_questions else item.prompt_ids[item.question_start:])
                    share = (time.perf_counter() - t) / len(grid)  # a cell's seconds: its share of the batch's
                    batched = {i: (r, share) for i, r in enumerate(made)}
                except Exception as e:  # out of memory: this item's cells one by one (the same rows)
                    if not out_of_memory(e):
                        raise
            k = 0
            for budget, ratio in cells:
                level = {"ratio": ratio} if ratio is not None else {}
                item_rows.append({**full_row, "budget": budget, **level})
                for method in compressed:
                    for beta in (betas if _tuned(specs[method]) else [None]):
                        t = time.perf_counter()
                        r, seconds = batched.get(k) or (run(item, method, budget, beta or BETA), None)
                        seconds = time.perf_counter() - t if seconds is None else seconds
                        item_rows.append({**_row(item, method, budget, beta, r, full.text, seconds), **level})
                        k += 1
                        tick()
            kept.add({"item": item.id, "rows": item_rows})
            rows += item_rows
    if world.size > 1:  # every process's rows, in the order one process would have produced them
        order = {item.id: i for i, item in enumerate(items)}
        rows = sorted((r for part in world.gather(rows) for r in part), key=lambda r: order[r["item"]])
    levels = [str(b) for b in budgets] + [_ratio_level(r) for r in ratios]
    chosen = _choose_betas(rows, by_profile, levels, betas) if tune else {}
    return resummarise({"results_version": RESULTS_VERSION, "model": lm.info.resolved, "methods": method_specs,
            "budgets": budgets, **({"ratios": list(ratios)} if ratios else {}), **({"suite": suite} if suite else {}),
            "betas": list(betas), "chosen_beta": chosen, "window": window, "kernel": kernel, "selection": SELECTION,
            **({} if compress_questions else {"compress_questions": False}),
            **({} if compress_sliding else {"keep_sliding_window": True}),
            **({"processes": world.size} if world.size > 1 else {}),
            "items": len([i for i in items if i.split == "test"]),
            "validation_items": len([i for i in items if i.split == "validation"]), "rows": rows})


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def resummarise(results: dict[str, Any]) -> dict[str, Any]:
    """`summary` and `by_task` computed from a results document's rows: the test items, with each HeadKV
    method at the beta chosen for its cell when betas were tuned (also after rows were added or merged)."""
    chosen = results.get("chosen_beta") or {}

    def reported(r: dict[str, Any]) -> bool:
        return r["split"] == "test" and (r["beta"] is None or r["method"] not in chosen
                                         or r["beta"] == chosen[r["method"]][_level(r)])

    test = [r for r in results["rows"] if reported(r)]
    ratios = results.get("ratios", [])
    grid = (results["methods"], results["budgets"], ratios)
    results["summary"] = summarise(test, *grid)
    results["by_task"] = {task: summarise([r for r in test if r["task"] == task], *grid)
                          for task in dict.fromkeys(r["task"] for r in test)}
    return results


GRID_KEYS = ("model", "methods", "budgets", "ratios", "betas", "window", "kernel", "selection", "compress_questions",
             "keep_sliding_window")
# what a grid key meant in results made before it was recorded (or where it is left out at its default)
DEFAULTS_BEFORE = {"selection": OLD_SELECTION, "compress_questions": True}


def combine(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One results document from several runs of the same grid on different items (e.g. one RULER task per run,
    so a long grid keeps what finished): rows in order, summaries recomputed, suite tasks joined."""
    if not parts:
        raise HeadprofError("no results to combine")
    first = parts[0]
    for part in parts[1:]:
        differs = [k for k in GRID_KEYS
                   if part.get(k, DEFAULTS_BEFORE.get(k)) != first.get(k, DEFAULTS_BEFORE.get(k))]
        if differs:
            raise HeadprofError(f"results of different grids cannot be combined ({', '.join(differs)} differ)")
        if part.get("chosen_beta"):
            raise HeadprofError("results that chose beta on validation items cannot be combined")
    seen: dict[str, int] = {}
    for n, part in enumerate(parts):
        twice = sorted({r["item"] for r in part["rows"] if seen.get(r["item"], n) != n})
        if twice:
            raise HeadprofError(f"items {', '.join(twice[:3])}{' ...' if len(twice) > 3 else ''} occur in results "
                                f"{seen[twice[0]] + 1} and {n + 1}: combined runs must hold different items")
        seen.update((r["item"], n) for r in part["rows"])
    out = {k: v for k, v in first.items() if k not in ("rows", "summary", "by_task")}
    out["rows"] = [r for part in parts for r in part["rows"]]
    out["items"] = sum(p["items"] for p in parts)
    out["validation_items"] = sum(p["validation_items"] for p in parts)
    if first.get("suite"):
        out["suite"] = {**first["suite"], "tasks": list(dict.fromkeys(t for p in parts for t in p["suite"]["tasks"]))}
    return resummarise(out)


def _tuned(spec: methods.Spec) -> bool:
    """Does the grid's --beta list apply to this method (it has a beta the spec leaves unset)?"""
    return "beta" in spec.method_class.options() and "beta" not in spec.options


def _row(item: Item, method: str, budget: int | None, beta: float | None, r: generation.RunResult, full_text: str,
         seconds: float) -> dict[str, Any]:
    return {"item": item.id, "task": item.task, "split": item.split, "method": method, "budget": budget,
            "beta": beta, "response": r.text, "contains": contains(r.text, item.answers, item.distractors),
            "score": item_score(item, r.text),
            "f1": best_f1(r.text, item.answers), "agreement": agreement(r.text, full_text), "kv_bytes": r.kv_bytes,
            "seconds": seconds, "prompt_tokens": r.prompt_tokens}


def _ratio_level(ratio: float) -> str:
    return f"ratio {ratio}"


def _level(row: dict[str, Any]) -> str:
    """The grid cell of a row: its budget, or its compression ratio (whose budget differs per item)."""
    return str(row["budget"]) if row.get("ratio") is None else _ratio_level(row["ratio"])


def _choose_betas(rows, headkv, levels, betas) -> dict[str, dict[str, float]]:
    chosen: dict[str, dict[str, float]] = {}
    for m in headkv:
        chosen[m] = {}
        for level in levels:
            scores = [np.mean([r["f1"] for r in rows if r["method"] == m and _level(r) == level and r["beta"] == beta
                               and r["split"] == "validation"] or [0.0]) for beta in betas]
            chosen[m][level] = float(betas[int(np.argmax(scores))])
    return chosen


def summarise(rows: list[dict[str, Any]], methods: list[str], budgets: list[int],
              ratios: Sequence[float] = ()) -> list[dict[str, Any]]:
    out = []
    levels = [(str(b), b, None) for b in budgets] + [(_ratio_level(r), None, r) for r in ratios]
    for m in methods:
        for level, budget, ratio in levels:
            sel = [r for r in rows if r["method"] == m and _level(r) == level]
            if not sel:
                continue
            f1 = [r["f1"] for r in sel]
            lo, hi = bootstrap(f1)
            c_lo, c_hi = bootstrap([r["contains"] for r in sel])
            scores = [r.get("score", r["contains"]) for r in sel]
            s_lo, s_hi = bootstrap(scores)
            out.append({"method": m, "budget": budget if ratio is None else round(float(np.mean(
                        [r["budget"] for r in sel]))), **({"ratio": ratio} if ratio is not None else {}),
                        "n": len(sel), "f1": float(np.mean(f1)), "f1_low": lo,
                        "f1_high": hi, "contains": float(np.mean([r["contains"] for r in sel])),
                        "contains_low": c_lo, "contains_high": c_hi, "score": float(np.mean(scores)),
                        "score_low": s_lo, "score_high": s_hi,
                        "agreement": float(np.mean([r["agreement"] for r in sel])),
                        "kv_bytes": float(np.mean([r["kv_bytes"] for r in sel])),
                        "seconds": float(np.mean([r["seconds"] for r in sel]))})
    return out


def to_csv(results: dict[str, Any]) -> str:
    buf = io.StringIO()
    fields = ["method", "budget", "ratio", "n", "f1", "f1_low", "f1_high", "contains", "contains_low",
              "contains_high", "score", "score_low", "score_high", "agreement", "kv_bytes", "seconds"]
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for row in results["summary"]:
        w.writerow({k: row.get(k) for k in fields})
    return buf.getvalue()


def plot(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    budgets = results["budgets"]
    by_ratio = not budgets  # a ratio grid's budgets differ per item: plot against the ratio instead
    key = "score" if results.get("suite") else "f1"
    for m in results["methods"]:
        rows = sorted((r for r in results["summary"] if r["method"] == m and ("ratio" in r) == by_ratio),
                      key=lambda r: r["ratio"] if by_ratio else r["budget"])
        if not rows:
            continue
        if m == FULL:  # other methods may be a peer's (kvpress-NAME), unknown to headprof's registry
            ax.axhline(np.mean([r[key] for r in rows]), color="black", linestyle="--", label="full cache")
            continue
        x = [r["ratio"] if by_ratio else r["budget"] for r in rows]
        ax.errorbar(x, [r[key] for r in rows], yerr=[[r[key] - r[f"{key}_low"] for r in rows],
                                                     [r[f"{key}_high"] - r[key] for r in rows]],
                    marker="o", capsize=3, label=m)
    if by_ratio:
        ax.set_xlabel("compression ratio (fraction of the prompt's KV removed)")
    else:
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_xlabel("KV budget (tokens per KV head)")
    ax.set_ylabel(("RULER string match" if key == "score" else "token F1") + " (95% bootstrap interval)")
    ax.set_ylim(-0.02, 1.02)
    import textwrap

    ax.set_title(textwrap.fill(f"{results['model']}: quality vs budget ({results['items']} items)", 80), fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
