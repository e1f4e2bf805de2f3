"""The kept-position look (look.py) in one line per item and profile: the heads that keep most of the answer."""
import json
from pathlib import Path

rows = json.load(open(Path(__file__).with_name("kept.json")))
for r in rows:
    cov = r["coverage"]
    heads = [(f"L{i}K{j}", c) for i, row in enumerate(cov) if row for j, c in enumerate(row)]
    top = sorted(heads, key=lambda x: -x[1])[:8]
    print(r["item"], r["method"], r["budget"], "tokens", r["answer_tokens"], "whole", r["whole"], "any", r["any"],
          "mean %.2f" % (sum(c for _, c in heads) / len(heads)), "top", " ".join(f"{h}:{c:.2f}" for h, c in top))
