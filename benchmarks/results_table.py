"""Print an eval's results.json as markdown tables (used for docs/results.md).

    python benchmarks/results_table.py results/smollm2-135m/results.json [--by-task]

`--by-task` adds, per task (needle, reasoning), how many items each method's answer contains (a
reasoning answer that also names a distractor does not count) with its 95% interval, and F1.
"""

from __future__ import annotations

import json
import sys


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


if __name__ == "__main__":
    main(sys.argv[1])
    if "--by-task" in sys.argv[2:]:
        by_task(sys.argv[1])
