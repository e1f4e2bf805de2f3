"""Where HeadKV-r2 fails at 3% of the KV on the 1.5B: which KV heads keep the answer's tokens (kept positions, not
generation). Items rebuilt exactly as eval builds them (seed 1000), budget as eval's ratio 0.97.

Run at commit 0f7e165 (its compression code is that of the eval rows, ff723ec), one core:
    OMP_NUM_THREADS=1 python look.py && python summ.py > summary.txt
"""
import json
import sys
from pathlib import Path

from headprof import api
from headprof.api import load_model
from headprof.evaluation.evaluate import ratio_budget, ruler_items

lm = load_model("qwen2.5-coder-1.5b", "cpu", "float32")
out = []
for task, first, methods in [("niah_single_3", 3, ["headkv-r2", "headkv-retrieval"]),
                             ("niah_multikey_3", 2, ["headkv-r2"])]:
    item = ruler_items(lm, f"ruler:{task}", [4096], 1, 1000, first=first)[0]
    budget = ratio_budget(item, 0.97, 16)
    for m in methods:
        k = api.kept_span(lm, item.prompt_ids, item.answers[0], m, budget)
        cov = [c for row in k["coverage"] if row is not None for c in row]
        row = {"item": item.id, "method": m, "budget": budget, "answer": item.answers[0],
               "answer_tokens": len(k["positions"]), "heads": k["heads"], "whole": k["whole"],
               "any": sum(c > 0 for c in cov), "best": max(cov), "coverage": k["coverage"]}
        out.append(row)
        print(json.dumps({x: row[x] for x in row if x != "coverage"}), file=sys.stderr, flush=True)
json.dump(out, open(Path(__file__).with_name("kept.json"), "w"))
