"""Compressed decoding at Llama-3 scale: one attention call per layer for all KV heads.

Builds a Llama-3-shaped model in code (32 layers, 32 query heads, 8 KV heads, hidden 512, head_dim 16,
random weights; benchmarks/synthetic.py) and prints, per prompt length: decode tokens/s of the compressed
cache (snapkv and headkv at --budget), of the full cache, and of a dense cache holding as many tokens as
the compressed one ("limit": full-cache decoding of a prompt of --budget tokens), with bytes held / ideal.
Targets: compressed >= 0.9 x limit and >= full. On CUDA every available attention backend is measured.

Two rates per run: over every decode step, and from the second decode step on ("steady"), beside the first
step's time. After a long prefill the first decode step is slower for every cache, full included (the
prefill's memory traffic evicted the weights decoding streams); the limit, whose prompt is short, never
pays it, so over few new tokens the first rate compares the prefill's aftermath as much as the caches.

HeadKV's budgets come from a skewed synthetic profile (random scores to the 4th power: a few heads keep
most of the pool, the hardest case for one call per layer) and, where `../shared` holds it, also from
HeadKV's published R2 head scores of Llama-3-8B-Instruct, whose head layout the model shares.

    python benchmarks/bench_scale.py [--lengths 4096,8192] [--budget 128] [--new-tokens 32] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import synthetic  # noqa: E402

from headprof import methods, models
from headprof.artefacts import interop
from headprof.compressing import generation
from headprof.kv import readers as attention  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="4096,8192")
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--repeats", type=int, default=3, help="decode runs per cell, interleaved; the best is reported")
    ap.add_argument("--real-layers", type=int, default=0, metavar="N",
                    help="instead: N layers of Llama-3-8B's real size (hidden 4096, head_dim 128), built in memory")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.real_layers:
        dtype = models.pick_dtype(args.dtype, args.device)
        config = synthetic.llama3_8b_layers(args.real_layers, max(lengths) + args.new_tokens + 64)
        lm = synthetic.loaded_in_memory(config, args.device, dtype)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = synthetic.save(Path(tmp) / "llama3-shaped", max_positions=max(lengths) + args.new_tokens + 64)
            lm = models.load(str(path), device=args.device, dtype=args.dtype)
    lay = lm.info.layout
    profiles = {"headkv": np.random.default_rng(0).random((lay.num_layers, lay.num_kv_heads)) ** 4}  # skewed
    published = Path(__file__).parents[2] / "shared/reference/Meta-Llama-3-8B-Instruct_retrieval_reasoning_heads.json"
    if published.exists() and (lay.num_layers, lay.num_kv_heads) == (32, 8):
        profiles["headkv (Llama-3-8B R2)"] = interop.import_headkv(published, "llama-3-8b", kv_heads=8).kv_scores()
    backends = attention.available(lm.device, lm.model.dtype)
    print(f"model {lm.info.resolved}, device {lm.device}, dtype {lm.dtype}, torch {torch.__version__}, "
          f"attention backends {backends}, threads {torch.get_num_threads()}")
    print("| prompt | run | backend | decode tok/s | / limit | / full | steady tok/s | / limit | / full | "
          "first step ms | KV MB held | held / ideal |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rng = np.random.default_rng(1)

    def run(ids, method, kv=None):
        return generation.generate(lm, ids, methods.resolve(method, kv), args.budget, max_new_tokens=args.new_tokens,
                                   min_new_tokens=args.new_tokens)

    generation.generate(lm, rng.integers(0, 96, 300).tolist(), "snapkv", 64, max_new_tokens=4)  # warm-up
    for length in lengths:
        ids = rng.integers(0, 96, length).tolist()
        limit_name = f"limit (dense {args.budget})"
        cells = [("full", "-", ids, "full", None), (limit_name, "-", ids[-args.budget:], "full", None)]
        for backend in backends:
            if backend == "torch":  # equal counts are a dense view: always the torch path
                cells.append((f"snapkv @ {args.budget}", backend, ids, "snapkv", None))
            for name, kv in profiles.items():
                cells.append((f"{name} @ {args.budget}", backend, ids, "headkv", kv))
        runs = {}
        for _ in range(args.repeats):  # cells interleaved, so that the machine's drift hits all alike
            for name, backend, cell_ids, method, kv in cells:
                os.environ["HEADPROF_ATTENTION"] = "torch" if backend == "-" else backend
                runs.setdefault((name, backend), []).append(run(cell_ids, method, kv))
        os.environ.pop("HEADPROF_ATTENTION", None)

        full, limit = ("full", "-"), (limit_name, "-")
        for name, backend, *_ in cells:
            rates = []
            for metric in ("decode_tokens_per_s", "steady_tokens_per_s"):
                tps = _best(runs[name, backend], metric)
                rates.append(f"{tps:.1f} | {tps / _best(runs[limit], metric):.2f} | "
                             f"{tps / _best(runs[full], metric):.2f}")
            r = runs[name, backend][-1]
            first_ms = 1e3 * min(x.first_step_s or 0.0 for x in runs[name, backend])
            print(f"| {length} | {name} | {backend} | {' | '.join(rates)} | {first_ms:.0f} | {r.kv_bytes / 1e6:.2f} | "
                  f"{r.kv_bytes / max(r.kv_bytes_ideal, 1):.3f} |", flush=True)


def _best(runs: list, metric: str) -> float:
    """Each figure is the best of its cell's repeats."""
    return max(getattr(r, metric) or 0.0 for r in runs)


if __name__ == "__main__":
    from headprof import quiet

    quiet.third_party()  # the figures only (HEADPROF_VERBOSE=1 shows third-party bars and logs)
    main()
