"""Which of a RULER answer's context tokens each method keeps, per KV head, next to what it answered: why an exact
copy (a UUID) is lost at a compression ratio where the full cache gets it.

    python benchmarks/kept_positions.py qwen2.5-coder-0.5b --task niah_single_3 --items 8 --ratio 0.9 \\
        --methods headkv-r2,snapkv --results docs/results/grids/ruler4k-qwen05/items0-7/niah_single_3/results.json

For each item: the answer's tokens in the prompt (found by character offsets of the decoded tokens), and per method
the share of KV heads that kept each of them, over all heads and over the profile's top heads (`--top`, by the
method's own profile when it has one, else headkv-r2's), with the answer the method gave (from `--results`, the
grid's rows) and the first answer token it got wrong. Prints one markdown table per item and a pooled line.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from headprof import api
from headprof.artefacts.profile import Profile
from headprof.compressing.selection import span_positions
from headprof.evaluation import evaluate


def first_wrong(tokenizer, response: str, answer: str) -> int | None:
    """Index of the first answer token the response does not reproduce (None: the whole answer is there)."""
    if answer in response:
        return None
    got = response.strip(" :.\n")
    common = next((i for i, (a, b) in enumerate(zip(answer, got, strict=False)) if a != b), min(len(answer), len(got)))
    toks = tokenizer(answer, add_special_tokens=False)["input_ids"]
    ends = np.cumsum([len(tokenizer.decode([t])) for t in toks])
    return int(np.searchsorted(ends, common, side="right"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--task", default="niah_single_3")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--items", type=int, default=4)
    ap.add_argument("--first-item", type=int, default=0)
    ap.add_argument("--seed", type=int, default=1000, help="the RULER seed of the grid (results.json suite.seed)")
    ap.add_argument("--ratio", type=float, default=0.9)
    ap.add_argument("--methods", default="headkv-r2,snapkv")
    ap.add_argument("--top", type=int, default=20, help="how many of the profile's top KV heads to report apart")
    ap.add_argument("--results", help="the grid's results.json, for each method's answer")
    ap.add_argument("--json", help="write the per-item figures here")
    args = ap.parse_args()

    lm = api.load_model(args.model, device="cpu", dtype="float32")
    items = evaluate.ruler_items(lm, f"ruler:{args.task}", [args.length], args.items, args.seed, args.first_item)
    rows = json.load(open(args.results))["rows"] if args.results else []
    prof = Profile.shipped(args.model, "r2")
    top = np.argsort(-prof.kv_scores(), axis=None)[:args.top] if prof is not None else None
    pooled: dict[str, list] = {}
    out = []
    for item in items:
        answer = item.answers[0]
        pos = span_positions(lm.tokenizer, item.prompt_ids, answer)
        print(f"\n{item.id}: {answer!r}, {len(pos)} tokens at prompt positions {pos[0]}-{pos[-1]} "
              f"of {len(item.prompt_ids)}")
        print("| method | budget | kept by all heads (per answer token) | by top heads | heads keeping all | answer "
              "| first wrong token |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for method in evaluate.method_labels(args.methods):
            budget = evaluate.ratio_budget(item, args.ratio, 16)
            kept = api.kept(lm, item.prompt_ids, method, budget)
            per_token = np.stack([kept.coverage([p]) for p in pos], -1)  # [layer, head, answer token]
            valid = ~np.isnan(per_token[..., 0])
            all_heads = per_token[valid].mean(0)  # share of heads keeping answer token j
            top_heads = per_token.reshape(-1, len(pos))[top].mean(0) if top is not None else None
            whole = float((per_token[valid].min(-1) == 1).mean())
            row = next((r for r in rows if r["item"] == item.id and r["method"] == method
                        and r.get("ratio") == args.ratio), None)
            response = row["response"] if row else None
            wrong = first_wrong(lm.tokenizer, response, answer) if response is not None else None
            fmt = " ".join(f"{x:.2f}" for x in all_heads)
            tfmt = " ".join(f"{x:.2f}" for x in top_heads) if top_heads is not None else "-"
            print(f"| {method} | {budget} | {fmt} | {tfmt} | {whole:.2f} | {response!r} | "
                  f"{'-' if wrong is None else wrong} |")
            pooled.setdefault(method, []).append((all_heads.mean(), None if top_heads is None else top_heads.mean(),
                                                  whole, row["score"] if row else None))
            out.append({"item": item.id, "method": method, "budget": budget, "answer_positions": pos,
                        "kept_all_heads": all_heads.tolist(),
                        "kept_top_heads": None if top_heads is None else top_heads.tolist(),
                        "heads_keeping_all": whole, "response": response, "first_wrong_token": wrong})
    print("\n| method | answer tokens kept, all heads | top heads | heads keeping the whole answer | score |")
    print("| --- | --- | --- | --- | --- |")
    for method, vals in pooled.items():
        a = np.array([[np.nan if x is None else x for x in v] for v in vals], dtype=float)
        score = f"{np.nanmean(a[:, 3]):.2f}" if not np.isnan(a[:, 3]).all() else "-"  # no grid row: not scored
        print(f"| {method} | {np.nanmean(a[:, 0]):.2f} | {np.nanmean(a[:, 1]):.2f} | {np.nanmean(a[:, 2]):.2f} | "
              f"{score} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
