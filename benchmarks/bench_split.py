"""A long generation with the full/streaming split against HeadKV: the KV bytes each holds after `--short` and after
`--long` new tokens (every step forced on: `min_new_tokens`), on a shipped model and its r2 profile.

The split's streaming heads hold a constant sink + window, so from `--short` to `--long` tokens its bytes grow by the
full heads' new tokens alone; HeadKV's grow by every head's. Printed per method: the full heads (KV heads that kept the
whole prompt), the bytes at both lengths, the growth, and the growth the full heads alone account for.

    python benchmarks/bench_split.py [--model smollm2-135m] [--prompt-tokens 1000] [--ratio 0.75] [--short 100]
                                     [--long 2000] [--methods "split:profile=r2,recent=64;headkv-r2"]
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt-tokens", type=int, default=1000)
    ap.add_argument("--ratio", type=float, default=0.75, help="the fraction of the prompt's KV removed")
    ap.add_argument("--short", type=int, default=100)
    ap.add_argument("--long", type=int, default=2000)
    ap.add_argument("--methods", default="split:profile=r2,recent=64;headkv-r2", help="';'-separated specs")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from headprof import api
    from headprof.probing.haystack import Haystack

    lm = api.load_model(args.model)
    text = " ".join(Haystack(0, "essays").sentences(args.prompt_tokens // 10)) + " Summarise the essay above."
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"][-args.prompt_tokens:]
    budget = round((1 - args.ratio) * len(ids))
    layout = lm.info.layout
    per_token = 2 * layout.head_dim * (4 if lm.dtype == "float32" else 2)  # key + value of one head
    rows = []
    for spec in args.methods.split(";"):
        runs = [api.generate(lm, ids, spec, budget, max_new_tokens=n, min_new_tokens=n, baseline=False).runs[0]
                for n in (args.short, args.long)]
        kept = np.array(runs[0].budgets) + 16
        whole = int((kept >= len(ids)).sum())
        grew = runs[1].kv_bytes - runs[0].kv_bytes
        rows.append({"method": spec, "prompt_tokens": len(ids), "budget": budget, "full_heads": whole,
                     "kv_heads": int(kept.size), f"kv_bytes_{args.short}": runs[0].kv_bytes,
                     f"kv_bytes_{args.long}": runs[1].kv_bytes, "growth": grew,
                     "full_heads_growth": whole * (args.long - args.short) * per_token,
                     "every_head_growth": int(kept.size) * (args.long - args.short) * per_token})
    print(f"model {lm.info.resolved}, prompt {len(ids)} tokens, budget {budget} per KV head (ratio {args.ratio}), "
          f"{args.short} then {args.long} new tokens")
    print(f"| method | full heads / KV heads | KV MB after {args.short} | after {args.long} | growth MB | "
          "full heads' new tokens, MB | every head's, MB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['method']} | {r['full_heads']} / {r['kv_heads']} | {r[f'kv_bytes_{args.short}'] / 1e6:.2f} | "
              f"{r[f'kv_bytes_{args.long}'] / 1e6:.2f} | {r['growth'] / 1e6:.2f} | {r['full_heads_growth'] / 1e6:.2f} "
              f"| {r['every_head_growth'] / 1e6:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    from headprof import quiet

    quiet.third_party()
    main()
