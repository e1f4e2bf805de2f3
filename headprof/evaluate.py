"""Quality versus budget: every method at every budget on the same items, next to the full cache.

Items are needle (retrieval) and reasoning (r2) probes drawn from a seed and checked to be disjoint from
the profiles' own probes, or a user's long-context QA file. Per item: contains-match, token F1 and
agreement (token F1) with the full-cache answer; per method x budget: means with bootstrap 95%
intervals, KV bytes held (measured) and wall time. With several betas, HeadKV's beta is chosen per
budget on a validation half of the items and every method is reported on the other half.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from headprof import generation, methods, probes
from headprof.answers import answer_not_distractor, token_f1, words
from headprof.compare import bootstrap_ci
from headprof.defaults import BETA, KERNEL, WINDOW
from headprof.distributed import World
from headprof.errors import HeadprofError, ProbeError
from headprof.files import read_jsonl
from headprof.models import LoadedModel
from headprof.profile import Profile
from headprof.progress import Callback, Progress

RESULTS_VERSION = 1
FULL = next(n for n in methods.names() if not methods.REGISTRY[n].compresses)  # the reference: no compression


@dataclass
class Item:
    id: str
    task: str
    prompt_ids: list[int]
    answers: list[str]
    split: str = "test"
    distractors: tuple[str, ...] = ()  # reasoning items: a response naming one of these is not correct


def contains(response: str, answers: Sequence[str], distractors: Sequence[str] = ()) -> float:
    """1.0 when the response contains an answer (and, with distractors, names none of them)."""
    if distractors:
        return max(answer_not_distractor(response, a, distractors) for a in answers)
    text = " ".join(words(response))
    return float(any(" ".join(words(a)) in text for a in answers if words(a)))


def best_f1(response: str, answers: Sequence[str]) -> float:
    return max(token_f1(response, a) for a in answers)


def parse_methods(text: str, profiles: dict[str, Profile]) -> list[str]:
    """Method specs of the grid: registered names, and NAME-PROFILE for profile-driven ones (headkv-r2)."""
    specs = [m.strip() for m in text.split(",") if m.strip()]
    for spec in specs:
        try:
            m, profile = methods.parse_spec(spec)
        except HeadprofError:
            examples = [f"{n}-{p}" for n in methods.names() if methods.REGISTRY[n].needs_profile for p in profiles]
            known = [n for n in methods.names() if not methods.REGISTRY[n].needs_profile] + examples
            raise HeadprofError(f"unknown method '{spec}' (use {', '.join(known)})") from None
        if m.needs_profile and profile not in profiles:
            raise HeadprofError(f"method {spec} needs a profile (e.g. {m.name}-r2 with a profile r2.json)")
    if not specs:
        raise HeadprofError("no methods given")
    return specs


def overlapping(profile: Profile, probe_set: probes.ProbeSet) -> list[str]:
    """Eval items whose needle or question also occurs among the profile's probes."""
    seen = used_texts([profile])
    return [p.id for p in probe_set.probes if p.needle in seen or p.question in seen]


def used_texts(profiles: Sequence[Profile]) -> frozenset[str]:
    """Needles and questions of the profiles' probes, which eval items must avoid."""
    texts = {r.get(k) for p in profiles for r in p.data["probes"] for k in ("needle", "question")}
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


def bootstrap(values: Sequence[float]) -> tuple[float, float]:
    """95% bootstrap interval of the mean of per-item values."""
    if len(values) < 2:
        return (float(np.mean(values)), float(np.mean(values))) if len(values) else (float("nan"), float("nan"))
    lo, hi = bootstrap_ci(np.asarray(values, dtype=float))
    return float(lo), float(hi)


def evaluate(lm: LoadedModel, items: list[Item], method_specs: list[str], budgets: list[int],
             profiles: dict[str, Profile], betas: Sequence[float] = (BETA,), window: int = WINDOW, kernel: int = KERNEL,
             max_new_tokens: int = 24, progress: Callback | None = None,
             compress_sliding: bool = True, share_prefill: bool = True, world: World | None = None) -> dict[str, Any]:
    """Run the grid; returns the results document (see docs/results.md for its shape).

    Under torchrun / accelerate launch (`world`), each process runs every size-th item and the rows are
    gathered in item order, so every process returns the document a single process would have made.

    Each item is prefilled once (`share_prefill`) and every method and budget starts from that prefill:
    the answers are the same as prefilling per cell, and prefill is most of the time. A cell's
    `seconds` then counts its decode only; the prefill's time is in the item's full-cache row."""
    if any(b <= window for b in budgets):
        raise HeadprofError(f"every budget must exceed the observation window ({window})")
    tune = len(betas) > 1
    for i, item in enumerate(items):
        item.split = "validation" if tune and i % 2 == 0 else "test"
    by_profile = [m for m in method_specs if methods.parse_spec(m)[1]]
    compressed = [m for m in method_specs if methods.parse_spec(m)[0].compresses]
    per_budget = len([m for m in compressed if not methods.parse_spec(m)[1]]) + len(by_profile) * len(betas)
    world = world or World()
    mine = world.shard(items)
    total = len(mine) * (1 + per_budget * len(budgets))
    done = 0
    rows: list[dict[str, Any]] = []

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(Progress(done, total))

    def run(item: Item, method: str, budget: int, beta: float) -> generation.RunResult:
        m, profile = methods.parse_spec(method)
        kv = profiles[profile].kv_scores("mean") if profile else None
        return generation.generate(lm, item.prompt_ids, m.name, budget, kv, window, kernel, beta, max_new_tokens,
                                   compress_sliding=compress_sliding, shared=shared)

    shared: generation.Prefill | None = None
    for item in mine:
        t = time.perf_counter()
        shared = generation.prefill(lm, item.prompt_ids, window) if share_prefill else None
        full = run(item, FULL, 0, BETA)
        full_row = _row(item, FULL, None, None, full, full.text, time.perf_counter() - t)
        tick()
        for budget in budgets:
            rows.append({**full_row, "budget": budget})
            for method in compressed:
                for beta in (betas if methods.parse_spec(method)[1] else [None]):
                    t = time.perf_counter()
                    r = run(item, method, budget, beta or BETA)
                    rows.append(_row(item, method, budget, beta, r, full.text, time.perf_counter() - t))
                    tick()
    if world.size > 1:  # every process's rows, in the order one process would have produced them
        order = {item.id: i for i, item in enumerate(items)}
        rows = sorted((r for part in world.gather(rows) for r in part), key=lambda r: order[r["item"]])
    chosen = _choose_betas(rows, by_profile, budgets, betas) if tune else {}
    test = [r for r in rows if r["split"] == "test" and (r["beta"] is None or not tune
                                                        or r["beta"] == chosen[r["method"]][str(r["budget"])])]
    return {"results_version": RESULTS_VERSION, "model": lm.info.resolved, "methods": method_specs,
            "budgets": budgets,
            "betas": list(betas), "chosen_beta": chosen, "window": window, "kernel": kernel,
            **({} if compress_sliding else {"keep_sliding_window": True}),
            **({"processes": world.size} if world.size > 1 else {}),
            "items": len([i for i in items if i.split == "test"]),
            "validation_items": len([i for i in items if i.split == "validation"]),
            "summary": summarise(test, method_specs, budgets),
            "by_task": {task: summarise([r for r in test if r["task"] == task], method_specs, budgets)
                        for task in dict.fromkeys(r["task"] for r in test)}, "rows": rows}


def _row(item: Item, method: str, budget: int | None, beta: float | None, r: generation.RunResult, full_text: str,
         seconds: float) -> dict[str, Any]:
    return {"item": item.id, "task": item.task, "split": item.split, "method": method, "budget": budget,
            "beta": beta, "response": r.text, "contains": contains(r.text, item.answers, item.distractors),
            "f1": best_f1(r.text, item.answers), "agreement": token_f1(r.text, full_text) if full_text or r.text
            else 1.0, "kv_bytes": r.kv_bytes, "seconds": seconds, "prompt_tokens": r.prompt_tokens}


def _choose_betas(rows, headkv, budgets, betas) -> dict[str, dict[str, float]]:
    chosen: dict[str, dict[str, float]] = {}
    for m in headkv:
        chosen[m] = {}
        for b in budgets:
            scores = [np.mean([r["f1"] for r in rows if r["method"] == m and r["budget"] == b and r["beta"] == beta
                               and r["split"] == "validation"] or [0.0]) for beta in betas]
            chosen[m][str(b)] = float(betas[int(np.argmax(scores))])
    return chosen


def summarise(rows: list[dict[str, Any]], methods: list[str], budgets: list[int]) -> list[dict[str, Any]]:
    out = []
    for m in methods:
        for b in budgets:
            sel = [r for r in rows if r["method"] == m and r["budget"] == b]
            if not sel:
                continue
            f1 = [r["f1"] for r in sel]
            lo, hi = bootstrap(f1)
            c_lo, c_hi = bootstrap([r["contains"] for r in sel])
            out.append({"method": m, "budget": b, "n": len(sel), "f1": float(np.mean(f1)), "f1_low": lo,
                        "f1_high": hi, "contains": float(np.mean([r["contains"] for r in sel])),
                        "contains_low": c_lo, "contains_high": c_hi,
                        "agreement": float(np.mean([r["agreement"] for r in sel])),
                        "kv_bytes": float(np.mean([r["kv_bytes"] for r in sel])),
                        "seconds": float(np.mean([r["seconds"] for r in sel]))})
    return out


def to_csv(results: dict[str, Any]) -> str:
    buf = io.StringIO()
    fields = ["method", "budget", "n", "f1", "f1_low", "f1_high", "contains", "contains_low", "contains_high",
              "agreement", "kv_bytes", "seconds"]
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for row in results["summary"]:
        w.writerow({k: row[k] for k in fields})
    return buf.getvalue()


def plot(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    budgets = results["budgets"]
    for m in results["methods"]:
        rows = sorted((r for r in results["summary"] if r["method"] == m), key=lambda r: r["budget"])
        if not rows:
            continue
        if not methods.parse_spec(m)[0].compresses:
            ax.axhline(np.mean([r["f1"] for r in rows]), color="black", linestyle="--", label="full cache")
            continue
        x = [r["budget"] for r in rows]
        ax.errorbar(x, [r["f1"] for r in rows], yerr=[[r["f1"] - r["f1_low"] for r in rows],
                                                     [r["f1_high"] - r["f1"] for r in rows]],
                    marker="o", capsize=3, label=m)
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("KV budget (tokens per KV head)")
    ax.set_ylabel("token F1 (95% bootstrap interval)")
    ax.set_ylim(-0.02, 1.02)
    import textwrap

    ax.set_title(textwrap.fill(f"{results['model']}: quality vs budget ({results['items']} items)", 80), fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
