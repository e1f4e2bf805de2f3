"""Print an eval's results.json as a markdown table (used for docs/results.md).

    python benchmarks/results_table.py results/smollm2-135m/results.json
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


if __name__ == "__main__":
    main(sys.argv[1])
