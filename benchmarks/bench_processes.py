"""Scoring throughput with 1 process and with N processes (torchrun, gloo on CPU / NCCL on GPUs).

Runs `headprof score` as a user would, once as a plain process and once under torchrun, and prints wall
time, probes per second, and what the merge costs (gathering every probe's record from the processes,
measured as pickling them the way all_gather_object does, plus building the profile). It checks that
both profiles hold the same scores.

    python benchmarks/bench_processes.py [--model smollm2-135m] [--processes 2] [--lengths 500,1000] [--depths 4]

On CPU the processes share the machine's cores (each gets cores / N threads), so the speed-up shows
how well probes parallelise, not what N GPUs would give.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="retrieval")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--lengths", default="500,1000")
    ap.add_argument("--depths", type=int, default=4)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        score = ["score", args.model, "--method", args.method, "--lengths", args.lengths, "--depths",
                 str(args.depths), "--no-filter", "--quiet", "--force"]
        one = Path(tmp) / "one.json"
        many = Path(tmp) / "many.json"
        t1 = run([sys.executable, "-m", "headprof", *score, "--out", str(one)], cores)
        tn = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.processes), "-m",
                  "headprof", *score, "--out", str(many)], max(1, cores // args.processes))
        a, b = json.loads(one.read_text()), json.loads(many.read_text())
        records = b["probes"]
        t = time.perf_counter()
        for _ in range(10):
            pickle.loads(pickle.dumps(records))
        gather_s = (time.perf_counter() - t) / 10
    n = len(records)
    print(f"model {args.model}, method {args.method}, {n} probes, lengths {args.lengths}, {cores} CPU cores")
    print(f"{'processes':>9} {'wall s':>8} {'probes/s':>9}   (wall includes loading the model in each process)")
    print(f"{1:>9} {t1:>8.1f} {n / t1:>9.3f}")
    print(f"{args.processes:>9} {tn:>8.1f} {n / tn:>9.3f}")
    print(f"merge: gathering {n} probe records costs about {gather_s * 1000:.1f} ms of pickling; "
          f"same scores as one process: {a['scores'] == b['scores'] and a['probes'] == b['probes']}")


if __name__ == "__main__":
    from headprof import quiet

    quiet.third_party()  # the figures only (HEADPROF_VERBOSE=1 shows third-party bars and logs)
    main()
