"""Concurrency under a KV memory cap: how many sequences each cache fits, and the decode throughput at that batch.

For the full cache and for headkv and snapkv at several budgets, on a Llama-3-shaped model built in code
(benchmarks/synthetic.py: 32 layers, 32 query / 8 KV heads) or a shipped alias (`--model smollm2-135m`), with
prompts of `--length` tokens:

- bytes per sequence: what one prompt's cache holds after `--new-tokens` decode steps (cache.held_bytes);
- fits: the largest batch whose caches stay under `--kv-cap-mb` (capped at `--max-batch`, marked "+");
- tok/s: aggregate greedy decode tokens per second at that batch (one forward pass per step for the batch);
- / dense: the per-step time against a dense cache holding the same tokens per sequence (a full cache of a prompt of
  the budget's length) at the same batch, the fastest of `--repeats` interleaved runs each; the target is >= 0.9 at
  batch 1, 8 and 32 (`--dense-batches`);
- per path (`torch`: strided views and a mask; `triton`: the kernel over each segment's bounds), computed from the
  layout on any device: the entries a decode step reads per entry held, the bytes held beside keys and values
  (masks, sliding layers' positions) per MB of keys and values, and how often the room regrew per 100 tokens (measured
  on the path that ran: `--backend`, or the device's default).

The sequences of a batch are copies of one prefilled prompt (`HeadKVCache.batch_select_indices` repeats its
segments): the decode cost does not depend on what the prompts say, and prefilling dozens of 4k-token prompts would
dominate a CPU run. Every figure comes from this one run.

    python benchmarks/bench_throughput.py [--length 4096] [--kv-cap-mb 512] [--budgets 64,128,256] [--device cuda]
        [--methods headkv,snapkv] [--backend triton|torch] [--head-dim 16] [--layers 32] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).parent))
import synthetic  # noqa: E402

from headprof import (
    capture,
    methods,  # noqa: E402
    models,
)
from headprof.compressing import generation  # noqa: E402
from headprof.kv import readers  # noqa: E402
from headprof.kv.cache import held_bytes  # noqa: E402
from headprof.kv.heads import free_slots  # noqa: E402
from headprof.models import with_cache  # noqa: E402


def prefilled(lm, ids: list[int], method, budget: int):
    """One prompt's cache after its prefill (compressed by `method`, or full) and its first token."""
    x = torch.tensor([ids], device=lm.model.device)
    if method is None:
        cache = DynamicCache(config=lm.model.config)
        return cache, lm.model(x, **with_cache(lm.model, cache)).logits[:, -1].argmax(-1)
    lay = lm.info.layout
    plan = generation.make_plan(method, lay, len(ids), budget, True)
    cache = generation.cache_for(lay, method, True, lm.model.config)
    with generation.compressing(cache, method.window, lambda _: plan):
        token = lm.model(x, **with_cache(lm.model, cache)).logits[:, -1].argmax(-1)
    return cache, token


def layout_figures(cache) -> dict[str, dict[str, float]]:
    """Per path: entries a decode step reads per entry held, and bytes held beside keys and values per byte of them,
    over the cache's compressed per-head layers, from their layout as it is now."""
    layers = [layer for layer in getattr(cache, "kinds", []) if getattr(layer, "seg", None) is not None]
    if not layers:
        return {}
    held = sum(layer.entries() for layer in layers)
    kv_bytes = sum(layer.entries() * layer.kv.shape[-1] * layer.kv.element_size() for layer in layers)
    out = {}
    for path in ("torch", "triton"):
        beside = 0
        for layer in layers:
            if layer.positions is not None:
                beside += layer.positions.numel() * layer.positions.element_size()
            if readers.masked(path) and not layer.uniform:
                beside += layer.heads * (layer.reach + layer.room)  # the bool mask, one byte per window and column
            beside += (layer.kv.shape[0] - layer.entries()) * layer.kv.shape[-1] * layer.kv.element_size()  # free
        out[path] = {"reads_per_held": sum(readers.entries_read(x, path) for x in layers) / held,
                     "beside_per_kv": beside / kv_bytes,
                     # tokens from one growth of the room to the next: the free slots it lays out, plus the one
                     "tokens_per_growth": 1 + free_slots(layers, 1, masked=readers.masked(path))}
    return out


def decode(lm, prefill, batch: int, steps: int, repeats: int = 1) -> tuple[float, int]:
    """Seconds per decode step for `batch` copies of a prefilled cache (the fastest of `repeats` runs), and the
    bytes the batch then holds."""
    return decode_cache(lm, prefill, batch, steps, repeats)[:2]


def decode_cache(lm, prefill, batch: int, steps: int, repeats: int = 1):
    """`decode`, also returning the last run's cache and how often its layers regrew per 100 tokens."""
    best = float("inf")
    for _ in range(repeats):
        cache = copy.deepcopy(prefill[0])
        cache.batch_select_indices(torch.zeros(batch, dtype=torch.long, device=prefill[1].device))
        tok = prefill[1].repeat(batch)[:, None]
        kw = with_cache(lm.model, cache)
        sync = torch.cuda.synchronize if tok.is_cuda else (lambda: None)
        with capture.compressed(cache) if hasattr(cache, "reader") else contextlib.nullcontext():
            tok = lm.model(tok, **kw).logits[:, -1:].argmax(-1)  # warm-up step (and the room's first growth)
            sync()
            grown = _growths(cache)
            start = time.perf_counter()
            for _ in range(steps):
                tok = lm.model(tok, **kw).logits[:, -1:].argmax(-1)
            sync()
        best = min(best, (time.perf_counter() - start) / steps)
        regrew = _growths(cache) - grown
    layers = max(1, sum(1 for k in getattr(cache, "kinds", []) if getattr(k, "seg", None) is not None))
    return best, held_bytes(cache), cache, 100 * regrew / layers / steps


def _growths(cache) -> int:
    return sum(getattr(k, "growths", 0) for k in getattr(cache, "kinds", []))


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a model spec or alias [default: the Llama-3-shaped stack]")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--budgets", default="64,128,256")
    ap.add_argument("--kv-cap-mb", type=float, default=512.0, help="the KV memory all sequences share")
    ap.add_argument("--max-batch", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=8, help="decode steps timed per cell")
    ap.add_argument("--dense-batches", default="1,8,32")
    ap.add_argument("--repeats", type=int, default=3, help="per-step comparisons: the fastest of this many runs, "
                                                             "each side, interleaved")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--methods", default="headkv,snapkv", help="compressing methods, each at every budget")
    ap.add_argument("--backend", default=None, help="the per-head attention backend (HEADPROF_ATTENTION) [default: "
                                                     "the device's]")
    ap.add_argument("--head-dim", type=int, default=16, help="head size of the Llama-3-shaped stack (128: the real)")
    ap.add_argument("--layers", type=int, default=32, help="layers of the Llama-3-shaped stack")
    ap.add_argument("--json", default=None, help="also write every figure to this file")
    args = ap.parse_args()
    if args.backend:
        os.environ["HEADPROF_ATTENTION"] = args.backend
    if args.model:
        lm = models.load(args.model, device=args.device, dtype=args.dtype)
    else:
        tmp = tempfile.mkdtemp()
        path = synthetic.save(Path(tmp) / "llama3-shaped", layers=args.layers, head_dim=args.head_dim,
                              max_positions=args.length + 4 * args.new_tokens + 64)
        lm = models.load(str(path), device=args.device, dtype=args.dtype)
    lay = lm.info.layout
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 96, args.length).tolist()
    profile = rng.random((lay.num_layers, lay.num_kv_heads)) ** 4  # skewed, as bench_scale.py
    cap = args.kv_cap_mb * 1e6
    print(f"model {lm.info.resolved}, device {lm.device}, dtype {lm.dtype}, threads {torch.get_num_threads()}, "
          f"prompts of {args.length} tokens, KV cap {args.kv_cap_mb:.0f} MB, "
          f"per-head backend {args.backend or 'the default'}")
    cells = [("full", None, 0)] + [(f"{name} @ {b}", methods.resolve(name, profile), b)
                                   for b in map(int, args.budgets.split(",")) for name in args.methods.split(",")]
    rows, full_fit, full_rate = [], None, None
    for name, method, budget in cells:
        pre = prefilled(lm, ids, method, budget)
        _, per_seq = decode(lm, pre, 1, args.new_tokens)
        fits = min(int(cap // per_seq), args.max_batch)
        step, _, batch_cache, regrew = decode_cache(lm, pre, max(fits, 1), args.new_tokens)
        paths = layout_figures(batch_cache)
        del batch_cache
        rate = max(fits, 1) / step
        if name == "full":
            full_fit, full_rate = fits, rate
        dense = {}
        if method is not None:
            same = prefilled(lm, ids[-budget:], None, budget)  # a dense cache of the same tokens per sequence
            for b in map(int, args.dense_batches.split(",")):
                theirs, ours = float("inf"), float("inf")
                for _ in range(args.repeats):  # interleaved, so that the machine's drift hits both alike
                    theirs = min(theirs, decode(lm, same, b, args.new_tokens)[0])
                    ours = min(ours, decode(lm, pre, b, args.new_tokens)[0])
                dense[b] = theirs / ours
        rows.append((name, per_seq, fits, rate, dense, paths, regrew))
        capped = "+" if fits == args.max_batch else ""
        print(f"  {name}: {per_seq / 1e6:.2f} MB per sequence, fits {fits}{capped}, {rate:.1f} tok/s", flush=True)
    print()
    print("| cache | MB per sequence | fits under the cap | x full | decode tok/s at that batch | x full | "
          + " | ".join(f"per step / dense, batch {b}" for b in args.dense_batches.split(",")) + " |")
    print("| --- " * (6 + len(args.dense_batches.split(","))) + "|")
    for name, per_seq, fits, rate, dense, _, _ in rows:
        capped = "+" if fits == args.max_batch else ""
        ratios = " | ".join(f"{dense[b]:.2f}" if b in dense else "-" for b in map(int, args.dense_batches.split(",")))
        print(f"| {name} | {per_seq / 1e6:.2f} | {fits}{capped} | {fits / max(full_fit, 1):.1f} | {rate:.1f} | "
              f"{rate / full_rate:.1f} | {ratios} |")
    print()
    print("| cache, at the batch that fits | reads per entry held: torch | triton | bytes beside K/V per byte of them: "
          "torch | triton | tokens between growths: torch | triton | regrowths per 100 tokens (the path that ran) |")
    print("| --- " * 8 + "|")
    for name, _, fits, _, _, paths, regrew in rows:
        if paths:
            t, k = paths["torch"], paths["triton"]
            print(f"| {name} ({fits}) | {t['reads_per_held']:.2f} | {k['reads_per_held']:.2f} | "
                  f"{t['beside_per_kv']:.3f} | {k['beside_per_kv']:.3f} | {t['tokens_per_growth']} | "
                  f"{k['tokens_per_growth']} | {regrew:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": str(lm.device), "dtype": str(lm.dtype), "backend": args.backend, "length": args.length,
            "kv_cap_mb": args.kv_cap_mb, "head_dim": lay.head_dim, "layers": lay.num_layers,
            "rows": [{"cache": name, "mb_per_sequence": per_seq / 1e6, "fits": fits, "tok_s": rate,
                      "x_full_fits": fits / max(full_fit, 1), "x_full_tok_s": rate / full_rate,
                      "per_step_over_dense": {str(b): v for b, v in dense.items()}, "paths": paths,
                      "regrowths_per_100_tokens": regrew}
                     for name, per_seq, fits, rate, dense, paths, regrew in rows]}, indent=1))


if __name__ == "__main__":
    from headprof import quiet

    quiet.third_party()
    main()
