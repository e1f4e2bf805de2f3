"""Print an eval's results.json as markdown tables (used for docs/results.md).

    python benchmarks/results_table.py results/smollm2-135m/results.json [--by-task]
    python benchmarks/results_table.py results/ruler4k-smollm2-all/results.json   # a ratio grid (RULER)
    python benchmarks/results_table.py results/ruler4k-smollm2-all/results.json --paired headkv-r2-snapkv,headkv-r2-full

`--by-task` adds, per task (needle, reasoning), how many items each method's answer contains (a
reasoning answer that also names a distractor does not count) with its 95% interval, and F1.
`--paired A-B,...` (or `A-B;C-D` where names hold commas; ratio grids) compares two methods on the same items:
the mean of the per-item score differences A - B with its 95% bootstrap interval, and on how many items A is
better / worse, of the items both ran ("-": none).
"""

from __future__ import annotations

import json
import sys

from headprof.evaluation.evaluate import bootstrap


def main(path: str) -> None:
    r = json.load(open(path))
    budgets = r["budgets"]
    print(f"{r['model']}, {r['items']} items" + (f" (+{r['validation_items']} for choosing beta)"
                                                 if r["validation_items"] else ""))
    print()
    print("| method | " + " | ".join(f"F1 @ {b}" for b in budgets) + " |")
    print("| --- |" + " --- |" * len(budgets))
    for m in r["methods"]:
        cells = []
        for b in budgets:
            s = next((x for x in r["summary"] if x["method"] == m and x["budget"] == b), None)
            cells.append("-" if s is None else f"{s['f1']:.2f} [{s['f1_low']:.2f}, {s['f1_high']:.2f}]")
        print(f"| {m} | " + " | ".join(cells) + " |")
    print()
    print("| method | " + " | ".join(f"agrees w/ full @ {b}" for b in budgets) + " | KV MB @ " + str(budgets[0])
          + " | KV MB @ " + str(budgets[-1]) + " |")
    print("| --- |" + " --- |" * (len(budgets) + 2))
    for m in r["methods"]:
        rows = {x["budget"]: x for x in r["summary"] if x["method"] == m}
        print(f"| {m} | " + " | ".join(f"{rows[b]['agreement']:.2f}" for b in budgets) + " | "
              + f"{rows[budgets[0]]['kv_bytes'] / 1e6:.2f} | {rows[budgets[-1]]['kv_bytes'] / 1e6:.2f} |")


def by_task(path: str) -> None:
    r = json.load(open(path))
    budgets = r["budgets"]
    for task, summary in r.get("by_task", {}).items():
        n = next(x["n"] for x in summary)
        print()
        print(f"{task}: {n} items; answers containing the answer (95% interval of the rate), then F1")
        print()
        print("| method | " + " | ".join(f"found @ {b}" for b in budgets) + " | "
              + " | ".join(f"F1 @ {b}" for b in budgets) + " |")
        print("| --- |" + " --- |" * (2 * len(budgets)))
        for m in r["methods"]:
            rows = {x["budget"]: x for x in summary if x["method"] == m}
            found = [f"{round(rows[b]['contains'] * n)} / {n} [{rows[b]['contains_low']:.2f}, "
                     f"{rows[b]['contains_high']:.2f}]" for b in budgets]
            print(f"| {m} | " + " | ".join(found) + " | " + " | ".join(f"{rows[b]['f1']:.2f}" for b in budgets)
                  + " |")


def ratios(path: str) -> None:
    """A compression-ratio grid (eval --ratios, RULER): the suite's score per method and ratio with its 95%
    interval, KV MB held, then the score per task."""
    r = json.load(open(path))
    levels = r["ratios"]
    print(f"{r['model']}, {r['items']} items" + (f", suite {r['suite']['name']} v{r['suite']['version']}"
                                                 if r.get("suite") else ""))
    print()
    print("| method | " + " | ".join(f"score @ {x}" for x in levels) + " | "
          + " | ".join(f"KV MB @ {x}" for x in levels) + " |")
    print("| --- |" + " --- |" * (2 * len(levels)))
    for m in r["methods"]:
        rows = {x["ratio"]: x for x in r["summary"] if x["method"] == m and "ratio" in x}
        cells = [f"{rows[x]['score']:.2f} [{rows[x]['score_low']:.2f}, {rows[x]['score_high']:.2f}]" if x in rows
                 else "-" for x in levels]
        held = [f"{rows[x]['kv_bytes'] / 1e6:.1f}" if x in rows else "-" for x in levels]
        print(f"| {m} | " + " | ".join(cells) + " | " + " | ".join(held) + " |")
    tasks = list(r.get("by_task", {}))
    for level in levels:
        print()
        print(f"score per task at ratio {level} (items per task in the header)")
        print()
        ns = [next((x["n"] for x in r["by_task"][t] if x.get("ratio") == level), 0) for t in tasks]
        print("| method | " + " | ".join(f"{t} ({n})" for t, n in zip(tasks, ns, strict=True)) + " |")
        print("| --- |" + " --- |" * len(tasks))
        for m in r["methods"]:
            cells = []
            for t in tasks:
                row = next((x for x in r["by_task"][t] if x["method"] == m and x.get("ratio") == level), None)
                cells.append("-" if row is None else f"{row['score']:.2f}")
            print(f"| {m} | " + " | ".join(cells) + " |")


def paired(path: str, pairs: list[tuple[str, str]]) -> None:
    """Per ratio and pair of methods: mean of A - B over the items both ran, its interval, better / worse."""
    r = json.load(open(path))
    score = {(x["item"], x["method"], x["ratio"]): x["score"] for x in r["rows"] if x.get("ratio") is not None}
    print("| ratio | " + " | ".join(f"{a} - {b}" for a, b in pairs) + " |")
    print("| --- |" + " --- |" * len(pairs))
    for level in r["ratios"]:
        cells = []
        for a, b in pairs:
            items = sorted({i for i, m, x in score if m == a and x == level}
                           & {i for i, m, x in score if m == b and x == level})
            d = [score[i, a, level] - score[i, b, level] for i in items]
            if not d:
                cells.append("-")
                continue
            lo, hi = bootstrap(d)
            cells.append(f"{sum(d) / len(d):+.2f} [{lo:+.2f}, {hi:+.2f}], {sum(x > 0 for x in d)} / "
                         f"{sum(x < 0 for x in d)} of {len(d)}")
        print(f"| {level} | " + " | ".join(cells) + " |")


def _pairs(text: str, methods: list[str]) -> list[tuple[str, str]]:
    """'headkv-r2-snapkv' -> ('headkv-r2', 'snapkv'): split at the dash that leaves two known methods. Pairs are
    separated by commas, or by semicolons where method names hold commas ('headkv:profile=r2,spread=32-snapkv')."""
    out = []
    for spec in text.split(";" if ";" in text else ","):
        split = [(spec[:i], spec[i + 1:]) for i, c in enumerate(spec) if c == "-"]
        known = [(a, b) for a, b in split if a in methods and b in methods]
        if not known:
            raise SystemExit(f"--paired {spec}: name two of {', '.join(methods)} as A-B")
        out.append(known[0])
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        raise SystemExit("usage: results_table.py RESULTS.json [--by-task] [--paired A-B,C-D]")
    try:
        grid = json.load(open(sys.argv[1]))
    except (OSError, ValueError) as err:
        raise SystemExit(f"{sys.argv[1]}: not a readable results.json ({err})") from None
    if grid.get("budgets"):
        main(sys.argv[1])
        if "--by-task" in sys.argv[2:]:
            by_task(sys.argv[1])
    else:
        ratios(sys.argv[1])
    if "--paired" in sys.argv[2:]:
        paired(sys.argv[1], _pairs(sys.argv[sys.argv.index("--paired") + 1],
                                   json.load(open(sys.argv[1]))["methods"]))
