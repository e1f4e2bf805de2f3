"""Scoring throughput and memory: headprof at several batch sizes vs plain SDPA prefills vs the naive way.

The probes are scored exactly as `headprof score` scores them (chat template, the fact span, decoding to
the end of the answer's line, at most 50 tokens). For each prompt length it prints probes per second
with headprof's capture at each batch size, the plain SDPA prefill of the same tokens (prompt + the
answer headprof generated, one forward per probe, no capture, no decoding), the ratio of the best
batch size to the plain prefills (target on CPU: <= 1.3), `model.generate` of the same prompts at the largest batch
size for the same number of steps as that batch decoded (plain SDPA, no capture: the limit of batched scoring; target on
a GPU: <= 1.3x at batch 16), the naive eager + output_attentions
scorer (headprof.probing.reference, one probe at a time), and the peak RSS of each. Every measurement runs in
its own process, so a peak RSS belongs to one configuration.

    python benchmarks/bench_score.py [--lengths 1000] [--probes 8] [--batch-sizes 1,4,8] [--model smollm2-135m]
                                     [--device cpu] [--no-naive]

On a GPU (`--device cuda`) the default batch sizes are 1, 4, 8 and 16 (16 probes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def measure(mode: str, model: str, length: int, n_probes: int, method: str, device: str, dtype: str) -> dict:
    import torch

    from headprof import capture, models
    from headprof.probing import probes, scoring
    from headprof.probing.reference import naive_scores

    torch.set_grad_enabled(False)
    lm = models.load(model, device=device, dtype=dtype)
    ps = probes.build_probe_set(method, [length], n_probes, seed=0)
    hs = probes.Haystack(0)
    s = scoring.Settings(method, filter_probes=False).resolved(ps, lm)
    work = [(p, scoring.probe_job(lm, p, ps, hs, s)) for p in ps.probes]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    # warm-up on a short prompt so that one-time costs are not timed
    warm = probes.build_probe_set(method, [200], 1, seed=1)
    scoring.score_batch(lm, [scoring.probe_job(lm, p, warm, hs, s) for p in warm.probes])
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    tokens = 0
    sync()
    t = time.perf_counter()
    if mode.startswith("batch"):
        size = int(mode[5:])
        for chunk in scoring.batches(work, size):
            runs = scoring.score_batch(lm, [job for _, job in chunk])
            tokens += sum(len(job.rendered.input_ids) + r.steps for (_, job), r in zip(chunk, runs, strict=True))
    elif mode.startswith("generate"):  # the limit: the same prompts, batched, decoded as long as scoring decoded them
        size = int(mode[8:])
        chunks = scoring.batches(work, size)
        steps = [max(r.steps for r in scoring.score_batch(lm, [job for _, job in chunk])) for chunk in chunks]
        pad = lm.tokenizer.eos_token_id if lm.tokenizer.eos_token_id is not None else 0
        batches = []
        for chunk in chunks:
            prompts = [job.rendered.input_ids for _, job in chunk]
            width = max(len(x) for x in prompts)
            ids = torch.tensor([[pad] * (width - len(x)) + x for x in prompts], device=lm.model.device)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in prompts], device=lm.model.device)
            batches.append((ids, mask))
        sync()
        with capture.implementation(lm.model, "sdpa"):
            t = time.perf_counter()
            for (ids, mask), n_steps in zip(batches, steps, strict=True):
                lm.model.generate(ids, attention_mask=mask, max_new_tokens=n_steps, min_new_tokens=n_steps,
                                  do_sample=False, pad_token_id=pad, top_p=None, top_k=None, temperature=None)
                tokens += int(mask.sum()) + n_steps * len(ids)
    elif mode == "naive":
        for _, job in work:
            naive_scores(lm, job.rendered.input_ids, job.rendered.answer_span, job.family.protocol == "r2",
                         scoring.MAX_NEW_TOKENS)
    else:  # one plain SDPA forward per probe over prompt + the answer headprof generated
        answers = [r.response for r in scoring.score_batch(lm, [job for _, job in work])]
        ids = [job.rendered.input_ids + lm.tokenizer(a, add_special_tokens=False)["input_ids"]
               for (_, job), a in zip(work, answers, strict=True)]
        sync()
        with capture.implementation(lm.model, "sdpa"):
            t = time.perf_counter()
            for x in ids:
                lm.model(torch.tensor([x], device=lm.model.device), logits_to_keep=1)
            tokens = sum(len(x) for x in ids)
    sync()
    seconds = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    return {"probes_per_s": n_probes / seconds, "seconds": seconds, "tokens": tokens, "peak_rss_mb": rss,
            "peak_gpu_mb": gpu}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="1000")
    ap.add_argument("--probes", type=int, default=None, help="probes per length [default: the largest batch]")
    ap.add_argument("--batch-sizes", default=None, help="[default: 1,4,8 on CPU, 1,4,8,16 on GPU]")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="r2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive scorer (slow on long prompts)")
    ap.add_argument("--json", default=None, help="also write every figure to this file")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "LENGTH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    sizes = [int(x) for x in (args.batch_sizes or ("1,4,8,16" if cuda else "1,4,8")).split(",")]
    n = args.probes or max(sizes)
    if args.child:
        print(json.dumps(measure(args.child[0], args.model, int(args.child[1]), n, args.method, args.device,
                                 args.dtype)))
        return
    import torch

    print(f"model {args.model}, method {args.method}, {n} probes per length, {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    modes = [f"batch{b}" for b in sizes] + ["plain", f"generate{max(sizes)}"] + ([] if args.no_naive else ["naive"])
    memory = "peak_gpu_mb" if cuda else "peak_rss_mb"
    print(f"{'length':>6} {'mode':>8} {'probes/s':>9} {'s/probe':>8} {'x plain':>8} {'tokens':>7} "
          f"{'peak GPU MB' if cuda else 'peak RSS MB':>11}")
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    every = {}
    for length in [int(x) for x in args.lengths.split(",")]:
        res = {}
        for mode in modes:
            cmd = [sys.executable, __file__, "--model", args.model, "--probes", str(n), "--method", args.method,
                   "--device", args.device, "--dtype", args.dtype, "--batch-sizes", ",".join(map(str, sizes)),
                   "--child", mode, str(length)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode:
                print(f"{length:>6} {mode:>8} failed: {out.stderr.strip().splitlines()[-1]}", flush=True)
                continue
            res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        plain = res.get("plain")
        for mode, r in res.items():
            ratio = f"{r['seconds'] / plain['seconds']:.2f}" if plain else "-"
            print(f"{length:>6} {mode:>8} {r['probes_per_s']:>9.3f} {r['seconds'] / n:>8.2f} {ratio:>8} "
                  f"{r['tokens'] or '-':>7} {r[memory]:>11.0f}", flush=True)
        batched = [m for m in res if m.startswith("batch")]
        if plain and batched:
            best = min(batched, key=lambda m: res[m]["seconds"])
            print(f"{length:>6} best {best}: {res[best]['seconds'] / plain['seconds']:.2f}x the plain prefills "
                  f"(target <= 1.3)", flush=True)
        limit, largest = res.get(f"generate{max(sizes)}"), f"batch{max(sizes)}"
        if limit and largest in res:
            print(f"{length:>6} {largest}: {res[largest]['seconds'] / limit['seconds']:.2f}x model.generate of the "
                  f"same prompts and steps at that batch (target on a GPU <= 1.3)", flush=True)
        every[str(length)] = res
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "device": args.device, "dtype": args.dtype,
                                               "probes": n, "by_length": every}, indent=1))


if __name__ == "__main__":
    from headprof import quiet

    quiet.third_party()  # the figures only (HEADPROF_VERBOSE=1 shows third-party bars and logs)
    main()
