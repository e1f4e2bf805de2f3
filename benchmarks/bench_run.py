"""Compressed vs full-cache generation on SmolLM2-135M (CPU): memory held and decode speed.

For 2k and 4k-token needle prompts and budgets 64/128/256 tokens per KV head (HeadKV with the shipped
r2 profile) it prints KV bytes held (measured from the cache tensors) next to the full cache and the
ideal (budgets + window + generated tokens), decode tokens/s compressed/full (target >= 1.0) and peak
RSS compressed/full. Every run is its own process so peak RSS belongs to that run; every run decodes
exactly `--new-tokens` tokens.

    python benchmarks/bench_run.py [--lengths 2000,4000] [--budgets 64,128,256] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def child(model: str, length: int, method: str, budget: int, new_tokens: int, profile_path: str) -> dict:
    from headprof import methods, models
    from headprof.artefacts import profile
    from headprof.compressing import generation
    from headprof.probing import probes

    lm = models.load(model, device="cpu")
    p = probes.build_probe_set("retrieval", [length], 1, seed=5).probes[0]
    ids = probes.render(p, lm.tokenizer, probes.Haystack(5)).input_ids
    m = methods.resolve(method, profile.load(profile_path))
    generation.generate(lm, ids[:200], m, min(budget, 100), max_new_tokens=4)  # warm-up
    r = generation.generate(lm, ids, m, budget, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return {**r.to_dict(), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--profile", default="profiles/smollm2-135m/r2.json")
    ap.add_argument("--lengths", default="2000,4000")
    ap.add_argument("--budgets", default="64,128,256")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--child", nargs=3, metavar=("LENGTH", "METHOD", "BUDGET"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.model, int(a.child[0]), a.child[1], int(a.child[2]), a.new_tokens, a.profile)))
        return

    def run(length: int, method: str, budget: int) -> dict:
        out = subprocess.run([sys.executable, __file__, "--model", a.model, "--profile", a.profile, "--new-tokens",
                              str(a.new_tokens), "--child", str(length), method, str(budget)],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    print(f"model {a.model}, headkv with {a.profile}, {a.new_tokens} new tokens, CPU")
    print(f"{'prompt':>6} {'budget':>6} {'held MB':>8} {'full MB':>8} {'ideal MB':>8} {'held/ideal':>10} "
          f"{'kept':>6} {'tok/s':>6} {'full tok/s':>10} {'speed ratio':>11} {'RSS MB':>7} {'full RSS MB':>11}")
    for length in [int(x) for x in a.lengths.split(",")]:
        full = run(length, "full", 0)
        for budget in [int(x) for x in a.budgets.split(",")]:
            c = run(length, "headkv", budget)
            print(f"{c['prompt_tokens']:>6} {budget:>6} {c['kv_bytes'] / 1e6:>8.2f} {full['kv_bytes'] / 1e6:>8.2f} "
                  f"{c['kv_bytes_ideal'] / 1e6:>8.2f} {c['kv_bytes'] / c['kv_bytes_ideal']:>10.3f} "
                  f"{c['kv_bytes'] / full['kv_bytes']:>6.1%} {c['decode_tokens_per_s']:>6.1f} "
                  f"{full['decode_tokens_per_s']:>10.1f} "
                  f"{c['decode_tokens_per_s'] / full['decode_tokens_per_s']:>11.2f} "
                  f"{c['peak_rss_mb']:>7.0f} {full['peak_rss_mb']:>11.0f}", flush=True)


if __name__ == "__main__":
    from headprof import quiet

    quiet.third_party()  # the figures only (HEADPROF_VERBOSE=1 shows third-party bars and logs)
    main()
