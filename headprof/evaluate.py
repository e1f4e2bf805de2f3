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
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from headprof import generation, probes
from headprof.errors import HeadprofError, ProbeError
from headprof.files import read_text
from headprof.models import LoadedModel
from headprof.profile import Profile
from headprof.scores import token_f1, words

BASELINES = ("full", "streaming", "snapkv", "pyramidkv", "adakv")
RESULTS_VERSION = 1


@dataclass
class Item:
    id: str
    task: str
    prompt_ids: list[int]
    answers: list[str]
    split: str = "test"


def contains(response: str, answers: Sequence[str]) -> float:
    text = " ".join(words(response))
    return float(any(" ".join(words(a)) in text for a in answers if words(a)))


def best_f1(response: str, answers: Sequence[str]) -> float:
    return max(token_f1(response, a) for a in answers)


def parse_methods(text: str, profiles: dict[str, Profile]) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    for m in methods:
        if m in BASELINES:
            continue
        if m.startswith("headkv-") and m.removeprefix("headkv-") in profiles:
            continue
        if m.startswith("headkv-"):
            raise HeadprofError(f"method {m} needs a profile for '{m.removeprefix('headkv-')}' (pass --profile)")
        raise HeadprofError(f"unknown method '{m}' (use {', '.join(BASELINES)}, headkv-retrieval, headkv-r2)")
    if not methods:
        raise HeadprofError("no methods given")
    return methods


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
    out = [Item(f"{task}-{p.id}", task, probes.render(p, lm.tokenizer, hs).input_ids, [p.answer]) for p in ps.probes]
    return out, ps


def file_items(lm: LoadedModel, path: Path) -> list[Item]:
    """Items from JSONL lines with context, question and answers (a list, or one string)."""
    lines = read_text(path, "tasks file", ProbeError).splitlines()
    items = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            context, question, answers = str(d["context"]), str(d["question"]), d["answers"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ProbeError(f"{path}:{i}: expected JSON with context, question, answers ({type(e).__name__})"
                             ) from None
        answers = [answers] if isinstance(answers, str) else [str(a) for a in answers]
        if not answers or not context.strip() or not question.strip():
            raise ProbeError(f"{path}:{i}: context, question and answers must be non-empty")
        content = f"{context}\n\n{probes.INSTRUCTION}\nQuestion: {question}"
        if lm.info.chat_template:
            ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=True)["input_ids"]
        else:
            ids = lm.tokenizer(content + "\nAnswer:")["input_ids"]
        items.append(Item(f"task-{i}", "tasks", list(ids), answers))
    if not items:
        raise ProbeError(f"tasks file {path} holds no items")
    return items


def bootstrap(values: Sequence[float], draws: int = 1000, seed: int = 0) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    if v.size < 2:
        return (float(v.mean()), float(v.mean())) if v.size else (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, (draws, v.size))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


@dataclass
class Progress:
    done: int
    total: int


def evaluate(lm: LoadedModel, items: list[Item], methods: list[str], budgets: list[int],
             profiles: dict[str, Profile], betas: Sequence[float] = (1.2,), window: int = 8, kernel: int = 7,
             max_new_tokens: int = 24, progress: Callable[[Progress], None] | None = None,
             compress_sliding: bool = False) -> dict[str, Any]:
    """Run the grid; returns the results document (see docs/results.md for its shape)."""
    if any(b <= window for b in budgets):
        raise HeadprofError(f"every budget must exceed the observation window ({window})")
    tune = len(betas) > 1
    for i, item in enumerate(items):
        item.split = "validation" if tune and i % 2 == 0 else "test"
    headkv = [m for m in methods if m.startswith("headkv-")]
    compressed = [m for m in methods if m != "full"]
    per_budget = len([m for m in compressed if not m.startswith("headkv-")]) + len(headkv) * len(betas)
    total = len(items) * (1 + per_budget * len(budgets))
    done = 0
    rows: list[dict[str, Any]] = []

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(Progress(done, total))

    def run(item: Item, method: str, budget: int, beta: float) -> generation.RunResult:
        kv = profiles[method.removeprefix("headkv-")].kv_scores("mean") if method.startswith("headkv-") else None
        base = "headkv" if kv is not None else method
        return generation.generate(lm, item.prompt_ids, base, budget, kv, window, kernel, beta, max_new_tokens,
                                   compress_sliding=compress_sliding)

    for item in items:
        t = time.perf_counter()
        full = run(item, "full", 0, 1.2)
        full_row = _row(item, "full", None, None, full, full.text, time.perf_counter() - t)
        tick()
        for budget in budgets:
            rows.append({**full_row, "budget": budget})
            for method in compressed:
                for beta in (betas if method.startswith("headkv-") else [None]):
                    t = time.perf_counter()
                    r = run(item, method, budget, beta or 1.2)
                    rows.append(_row(item, method, budget, beta, r, full.text, time.perf_counter() - t))
                    tick()
    chosen = _choose_betas(rows, headkv, budgets, betas) if tune else {}
    test = [r for r in rows if r["split"] == "test" and (r["beta"] is None or not tune
                                                        or r["beta"] == chosen[r["method"]][str(r["budget"])])]
    return {"results_version": RESULTS_VERSION, "model": lm.info.resolved, "methods": methods, "budgets": budgets,
            "betas": list(betas), "chosen_beta": chosen, "window": window, "kernel": kernel,
            **({"compress_sliding": True} if compress_sliding else {}),
            "items": len([i for i in items if i.split == "test"]),
            "validation_items": len([i for i in items if i.split == "validation"]),
            "summary": summarise(test, methods, budgets), "rows": rows}


def _row(item: Item, method: str, budget: int | None, beta: float | None, r: generation.RunResult, full_text: str,
         seconds: float) -> dict[str, Any]:
    return {"item": item.id, "task": item.task, "split": item.split, "method": method, "budget": budget,
            "beta": beta, "response": r.text, "contains": contains(r.text, item.answers),
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
            out.append({"method": m, "budget": b, "n": len(sel), "f1": float(np.mean(f1)), "f1_low": lo,
                        "f1_high": hi, "contains": float(np.mean([r["contains"] for r in sel])),
                        "agreement": float(np.mean([r["agreement"] for r in sel])),
                        "kv_bytes": float(np.mean([r["kv_bytes"] for r in sel])),
                        "seconds": float(np.mean([r["seconds"] for r in sel]))})
    return out


def to_csv(results: dict[str, Any]) -> str:
    buf = io.StringIO()
    fields = ["method", "budget", "n", "f1", "f1_low", "f1_high", "contains", "agreement", "kv_bytes", "seconds"]
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
        if m == "full":
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
