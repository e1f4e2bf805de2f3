"""Eval grid time with one prefill per item (the default) against a prefill per (item, method, budget).

Runs the same grid both ways on one loaded model and prints the wall time of each, the ratio, and
whether every row of results.json (responses, F1, agreement, KV bytes) is identical.

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
    from headprof import evaluate

    lm = api.load_model(args.model)
    profiles = api.eval_profiles(args.model, args.methods)
    method_list = evaluate.parse_methods(args.methods, profiles)
    items = []
    exclude = evaluate.used_texts(list(profiles.values()))
    for task in ("needle", "reasoning"):
        items += evaluate.probe_items(lm, task, [int(x) for x in args.lengths.split(",")], args.items, 1000,
                                      exclude)[0]
    budgets = [int(b) for b in args.budgets.split(",")]
    times, rows = {}, {}
    for share in (True, False):
        t = time.perf_counter()
        res = evaluate.evaluate(lm, items, method_list, budgets, profiles, share_prefill=share)
        times[share] = time.perf_counter() - t
        rows[share] = [{k: v for k, v in r.items() if k != "seconds"} for r in res["rows"]]
    print(f"model {args.model}, {len(items)} items, {len(method_list)} methods, budgets {args.budgets}")
    print(f"one prefill per cell: {times[False]:.1f} s; one prefill per item: {times[True]:.1f} s "
          f"({times[True] / times[False]:.2f}x); identical rows: {rows[True] == rows[False]}")


if __name__ == "__main__":
    from headprof import quiet

    quiet.third_party()  # the figures only (HEADPROF_VERBOSE=1 shows third-party bars and logs)
    main()
