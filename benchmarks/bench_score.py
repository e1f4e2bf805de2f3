"""Scoring speed and memory on SmolLM2-135M (CPU): ours vs a plain SDPA forward vs the naive way.

For each prompt length it prints: seconds per probe with headprof's capture, the ratio of that to one
plain SDPA forward over the same tokens (prompt + generated answer; target <= 1.2), the ratio of the
naive eager + output_attentions implementation (headprof.reference) to ours, and peak RSS of each.
Each measurement runs in its own process so that peak RSS belongs to one implementation.

    python benchmarks/bench_score.py [--lengths 1000,2000,4000] [--probes 2] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(mode: str, model: str, length: int, n_probes: int, method: str) -> dict:
    import torch

    from headprof import capture, families, models, probes, scoring
    from headprof.reference import naive_scores

    torch.set_grad_enabled(False)
    lm = models.load(model, device="cpu")
    ps = probes.build_probe_set(method, [length], n_probes, seed=0)
    hs = probes.Haystack(0)
    rendered = [probes.render(p, lm.tokenizer, hs) for p in ps.probes]
    fams = [families.get(p.kind or method) for p in ps.probes]
    # warm-up on a short prompt so one-time costs are not timed
    warm = probes.build_probe_set(method, [200], 1).probes[0]
    scoring.score_probe(lm, probes.render(warm, lm.tokenizer, hs), families.get(warm.kind or method))
    times, tokens = [], []
    for r, fam in zip(rendered, fams, strict=True):
        if mode == "ours":
            t = time.perf_counter()
            response = scoring.score_probe(lm, r, fam).response
            times.append(time.perf_counter() - t)
            tokens.append(len(r.input_ids) + len(lm.tokenizer(response, add_special_tokens=False)["input_ids"]))
        elif mode == "naive":
            t = time.perf_counter()
            naive_scores(lm, r.input_ids, r.answer_span, fam.method == "r2", scoring.MAX_NEW_TOKENS)
            times.append(time.perf_counter() - t)
        else:  # one plain SDPA forward over prompt + the answer ours generated
            response = scoring.score_probe(lm, r, fam).response
            ids = r.input_ids + lm.tokenizer(response, add_special_tokens=False)["input_ids"]
            with capture.implementation(lm.model, "sdpa"):
                t = time.perf_counter()
                lm.model(torch.tensor([ids]))
                times.append(time.perf_counter() - t)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": sum(times) / len(times), "peak_rss_mb": rss,
            "tokens": sum(tokens) / len(tokens) if tokens else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="1000,2000,4000")
    ap.add_argument("--probes", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="r2")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "LENGTH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.model, int(args.child[1]), args.probes, args.method)))
        return
    import torch

    print(f"model {args.model}, method {args.method}, {args.probes} probes per length, CPU, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'length':>6} {'s/probe':>8} {'plain fwd s':>11} {'ours/plain':>10} {'naive s':>8} {'naive/ours':>10} "
          f"{'RSS ours MB':>11} {'RSS naive MB':>12}")
    for length in [int(x) for x in args.lengths.split(",")]:
        res = {}
        for mode in ("ours", "plain", "naive"):
            out = subprocess.run([sys.executable, __file__, "--model", args.model, "--probes", str(args.probes),
                                  "--method", args.method, "--child", mode, str(length)],
                                 capture_output=True, text=True, check=True)
            res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        o, p, n = res["ours"], res["plain"], res["naive"]
        print(f"{length:>6} {o['seconds']:>8.2f} {p['seconds']:>11.2f} {o['seconds'] / p['seconds']:>10.2f} "
              f"{n['seconds']:>8.2f} {n['seconds'] / o['seconds']:>10.2f} {o['peak_rss_mb']:>11.0f} "
              f"{n['peak_rss_mb']:>12.0f}", flush=True)


if __name__ == "__main__":
    main()
