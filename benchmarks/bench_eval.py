"""Eval grid time three ways: a prefill per (item, method, budget); one prefill per item with its cells decoded
one after another; and one prefill per item with its cells decoded as one batch (the default).

Runs the same grid each way on one loaded model and prints the wall time of each, the ratios, and whether the
rows of results.json are identical (responses, F1, agreement; the batched cells' KV bytes are their share of the
batch's, so those are compared within the cache's slack).

    python benchmarks/bench_eval.py [--model smollm2-135m] [--items 5] [--lengths 1500] [--budgets 32,64,128,256]
"""

from __future__ import annotations

import argparse
import time

from headprof import api


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--items", type=int, default=5)
    ap.add_argument("--lengths", default="1500")
    ap.add_argument("--budgets", default="32,64,128,256")
    ap.add_argument("--methods", default=api.DEFAULT_EVAL_METHODS)
    args = ap.parse_args()
    from headprof.evaluation import evaluate

    lm = api.load_model(args.model)
    profiles = api.eval_profiles(args.model, args.methods)
    method_list = evaluate.parse_methods(args.methods, profiles)
    items = []
    exclude = evaluate.used_texts(list(profiles.values()))
    for task in ("needle", "reasoning"):
        items += evaluate.probe_items(lm, task, [int(x) for x in args.lengths.split(",")], args.items, 1000,
                                      exclude)[0]
    budgets = [int(b) for b in args.budgets.split(",")]
    times, rows, kv = {}, {}, {}
    ways = {"per cell": dict(share_prefill=False), "per item": dict(batch_cells=False), "batched": {}}
    for way, kw in ways.items():
        t = time.perf_counter()
        res = evaluate.evaluate(lm, items, method_list, budgets, profiles, **kw)
        times[way] = time.perf_counter() - t
        rows[way] = [{k: v for k, v in r.items() if k not in ("seconds", "kv_bytes")} for r in res["rows"]]
        kv[way] = [r["kv_bytes"] for r in res["rows"]]
    slack = max(abs(a - b) / max(b, 1) for a, b in zip(kv["batched"], kv["per item"], strict=True))
    print(f"model {args.model}, {len(items)} items, {len(method_list)} methods, budgets {args.budgets}")
    print(f"one prefill per cell: {times['per cell']:.1f} s; one prefill per item: {times['per item']:.1f} s "
          f"({times['per item'] / times['per cell']:.2f}x); its cells in one batch: {times['batched']:.1f} s "
          f"({times['batched'] / times['per item']:.2f}x of one prefill per item)")
    print(f"identical rows: {rows['per item'] == rows['per cell'] == rows['batched']}; KV bytes: per item = per "
          f"cell {kv['per item'] == kv['per cell']}, batched within {slack:.1%}")


if __name__ == "__main__":
    from headprof import quiet

    quiet.third_party()  # the figures only (HEADPROF_VERBOSE=1 shows third-party bars and logs)
    main()
