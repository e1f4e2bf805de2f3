"""NVIDIA kvpress's presses on headprof's eval items: the peer measured on the same items, model, ratios,
greedy decoding and scoring, with the KV bytes each press really holds after prefill.

kvpress 0.5.5 pins transformers < 5.3, so it runs in a virtual environment of its own, made once with
`bash benchmarks/peer_kvpress_venv.sh` (.venv-kvpress). Three steps:

    headprof eval qwen2.5-coder-0.5b --suite ruler --lengths 4096 --items 5 --ratios 0.5,0.75,0.9 \\
        --export-items runs/ruler-items.jsonl                          # 1. the items, as token ids
    .venv-kvpress/bin/python benchmarks/peer_kvpress.py run --items runs/ruler-items.jsonl \\
        --model-dir "$(headprof info qwen2.5-coder-0.5b --path)" --ratios 0.5,0.75,0.9 --out runs/kvpress-rows.jsonl
                                                                       # 2. kvpress, in its own environment
    python benchmarks/peer_kvpress.py merge --results results/results.json --items runs/ruler-items.jsonl \\
        --rows runs/kvpress-rows.jsonl --out results-with-kvpress   # 3. in headprof's environment

The `run` step imports kvpress and transformers only (never headprof); `merge` scores the responses
with headprof's own functions (evaluate.item_score, token F1, agreement with headprof's full-cache
answer) and writes results.json/results.csv/quality_vs_budget.png with the presses as methods
`kvpress-NAME`. The prompt holds the question, so the question is compressed with the context, as in
the papers (kvpress's pipeline would keep the question out of the compression). Each press runs with
kvpress's own defaults for everything but the ratio (SnapKV: window 64, kernel 5; headprof's SnapKV
uses window 16, kernel 7); `--window 16` runs the SnapKV-style presses with headprof's window.
DuoAttention is left out: offline it runs neither with its published patterns nor with
`on_the_fly_scoring` (which loads the booksum dataset from the hub).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no third-party bars or warnings in the figures
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def presses(names: list[str], ratio: float, window: int | None = None):
    import kvpress

    w = {} if window is None else {"window_size": window}  # SnapKV-style presses: kvpress's default is 64
    make = {
        "snapkv": lambda: kvpress.SnapKVPress(compression_ratio=ratio, **w),
        "pyramidkv": lambda: kvpress.PyramidKVPress(compression_ratio=ratio, **w),
        "streaming": lambda: kvpress.StreamingLLMPress(compression_ratio=ratio),
        "adakv": lambda: kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio, **w)),
        "expected_attention": lambda: kvpress.ExpectedAttentionPress(compression_ratio=ratio),
        "adakv_expected_attention": lambda: kvpress.AdaKVPress(kvpress.ExpectedAttentionPress(compression_ratio=ratio)),
        "keydiff": lambda: kvpress.KeyDiffPress(compression_ratio=ratio),
    }
    unknown = [n for n in names if n not in make]
    if unknown:
        raise SystemExit(f"unknown press {unknown[0]} (use {', '.join(make)})")
    return [(n, make[n]()) for n in names]


def run(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_grad_enabled(False)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    gen = model.generation_config.eos_token_id
    stops = set(gen if isinstance(gen, list) else [gen]) - {None}
    items = [json.loads(line) for line in Path(args.items).read_text().splitlines() if line.strip()]
    ratios = [float(r) for r in args.ratios.split(",")]
    names = args.presses.split(",")
    done = set()
    out = Path(args.out)
    if out.exists():  # resume: rows already written are kept
        done = {(r["item"], r["method"], r["ratio"]) for r in map(json.loads, out.read_text().splitlines())}
    with out.open("a", encoding="utf-8") as f:
        for item in items:
            ids = torch.tensor([item["prompt_ids"]])
            for ratio in ratios:
                for name, press in presses(names, ratio, args.window):
                    name = name if args.window is None else f"{name}-w{args.window}"
                    if (item["id"], f"kvpress-{name}", ratio) in done:
                        continue
                    t = time.perf_counter()
                    cache = DynamicCache()
                    with press(model):
                        logits = model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
                        held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
                        tokens: list[int] = []
                        for _ in range(item["max_new_tokens"] or args.max_new_tokens):
                            token = int(logits.argmax(-1))
                            if token in stops:
                                break
                            tokens.append(token)
                            # the cache holds fewer entries than positions: pass the true position, as
                            # kvpress's own pipeline does
                            position = torch.tensor([[ids.shape[1] + len(tokens) - 1]])
                            logits = model(torch.tensor([[token]]), past_key_values=cache, position_ids=position,
                                           use_cache=True).logits[:, -1]
                    row = {"item": item["id"], "task": item["task"], "method": f"kvpress-{name}", "ratio": ratio,
                           "budget": round((1 - ratio) * len(item["prompt_ids"])),
                           "response": tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                           "kv_bytes": held, "seconds": time.perf_counter() - t,
                           "prompt_tokens": len(item["prompt_ids"])}
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                    print(f"{item['id']} {name} {ratio}: {len(tokens)} tokens, {held / 1e6:.1f} MB", flush=True)


def merge(args) -> None:
    from headprof import evaluate
    from headprof.answers import token_f1
    from headprof.api import EvalReport

    results = json.loads(Path(args.results).read_text())
    items = {x["id"]: x for x in map(json.loads, Path(args.items).read_text().splitlines())}
    full = {r["item"]: r["response"] for r in results["rows"] if r["method"] == "full"}
    peer_rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines() if line.strip()]
    missing = sorted({r["item"] for r in peer_rows} - set(full))
    if missing and args.common:  # items headprof has not run yet: left out of both sides
        print(f"left out {len(missing)} kvpress items that {args.results} does not hold (e.g. {missing[0]})")
        peer_rows = [r for r in peer_rows if r["item"] in full]
    elif missing:
        raise SystemExit(f"{len(missing)} kvpress items are not in {args.results} (e.g. {missing[0]}): run headprof's "
                         "eval with the same --suite, --lengths, --items and --seed")
    for r in peer_rows:
        x = items[r["item"]]
        item = evaluate.Item(x["id"], x["task"], x["prompt_ids"], x["answers"],
                             metric=None if x["metric"] == "contains" else x["metric"])
        text = r["response"]
        reference = full[r["item"]]
        results["rows"].append({
            "item": r["item"], "task": r["task"], "split": "test", "method": r["method"], "budget": r["budget"],
            "ratio": r["ratio"], "beta": None, "response": text, "contains": evaluate.contains(text, item.answers),
            "score": evaluate.item_score(item, text), "f1": evaluate.best_f1(text, item.answers),
            "agreement": token_f1(text, reference) if reference or text else 1.0, "kv_bytes": r["kv_bytes"],
            "seconds": r["seconds"], "prompt_tokens": r["prompt_tokens"]})
    if args.common:  # only the items kvpress ran, so that every method is averaged over the same items
        ran = {r["item"] for r in peer_rows}
        results["rows"] = [r for r in results["rows"] if r["item"] in ran]
        results["items"] = len(ran)
    peers = list(dict.fromkeys(r["method"] for r in peer_rows))
    results["methods"] = [m for m in results["methods"] if m not in peers] + peers
    evaluate.resummarise(results)
    results["peer"] = {"kvpress_rows": str(args.rows), "note": "kvpress presses with their own defaults but the ratio"}
    EvalReport(results).save(args.out, force=args.force)
    print(f"wrote {args.out}/results.json with {len(peer_rows)} kvpress rows ({', '.join(peers)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="step", required=True)
    r = sub.add_parser("run", help="run kvpress's presses on exported items (in .venv-kvpress)")
    r.add_argument("--items", required=True)
    r.add_argument("--model-dir", required=True, help="the model as a Hugging Face directory")
    r.add_argument("--ratios", default="0.5,0.75,0.9")
    r.add_argument("--presses", default="snapkv,pyramidkv,streaming,adakv,expected_attention,keydiff")
    r.add_argument("--max-new-tokens", type=int, default=32)
    r.add_argument("--window", type=int, help="observation window of the SnapKV-style presses [default: kvpress's "
                                              "64]; methods are then named kvpress-NAME-wW")
    r.add_argument("--out", required=True)
    m = sub.add_parser("merge", help="score kvpress's rows with headprof and merge them into results.json")
    m.add_argument("--results", required=True)
    m.add_argument("--items", required=True)
    m.add_argument("--rows", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--force", action="store_true")
    m.add_argument("--common", action="store_true", help="keep only the items both ran (every method on "
                                                          "the same items)")
    args = ap.parse_args()
    run(args) if args.step == "run" else merge(args)


if __name__ == "__main__":
    main()
