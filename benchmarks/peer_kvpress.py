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
the papers; `run --no-compress-questions` is kvpress's leaderboard protocol instead (the context prefilled and
compressed alone, then the question read through the compressed cache and the answer decoded), to merge into a
headprof eval run with `--no-compress-questions`. Each press runs with
kvpress's own defaults for everything but the ratio (SnapKV: window 64, kernel 5; headprof's SnapKV
uses window 16, kernel 7); a press named `snapkv-w16` (or `adakv-w16`, `pyramidkv-w16`) runs with headprof's
window. By default all cells of an item (every press and ratio) come from one prefill: kvpress compresses a
layer's cache after that layer's attention has run, so the prefill does not depend on the press, and
each press's own `compress` runs on the inputs its hook would have received; cells whose caches have the
same shapes then read the question (kvpress's protocol) and decode as one batch (`shared`). KVzip, which replays
the context through the cache after the prefill, runs as kvpress runs it, one prefill and replay per item, its
scores (which do not depend on the ratio) drawn at each ratio (`replayed`). `--per-cell` runs
kvpress's own hooks, one prefill per press and ratio, the reference the shared path is checked against
(docs/results/ruler.md: same responses).
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


LUKV_CURVE: str | None = None  # `--lukv-curve`: the budget curve the `lukv` press runs with


def presses(names: list[str], ratio: float):
    """kvpress presses by name; a name ending in `-wW` runs a SnapKV-style press with observation window W. `lukv`:
    LUKVPress around SnapKV with headprof's window (16), its budget curve from `--lukv-curve` (a headprof profile's
    HeadKV allocation: `headprof export --format lukv`)."""
    import logging

    import kvpress

    logging.getLogger("kvpress").setLevel(logging.ERROR)  # KVzip warns of its cost at every construction

    def make(name: str):
        base, _, w = name.partition("-w")
        win = {"window_size": int(w)} if w.isdigit() else {}  # SnapKV-style presses: kvpress's default is 64
        table = {
            "snapkv": lambda: kvpress.SnapKVPress(compression_ratio=ratio, **win),
            "pyramidkv": lambda: kvpress.PyramidKVPress(compression_ratio=ratio, **win),
            "streaming": lambda: kvpress.StreamingLLMPress(compression_ratio=ratio),
            "adakv": lambda: kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio, **win)),
            "expected_attention": lambda: kvpress.ExpectedAttentionPress(compression_ratio=ratio),
            "adakv_expected_attention": lambda: kvpress.AdaKVPress(
                kvpress.ExpectedAttentionPress(compression_ratio=ratio)),
            "keydiff": lambda: kvpress.KeyDiffPress(compression_ratio=ratio),
            "kvzip": lambda: kvpress.KVzipPress(compression_ratio=ratio),  # its own replay passes after the prefill
            "lukv": lambda: _lukv(kvpress, ratio),
        }
        windowed = {"snapkv", "pyramidkv", "adakv"}
        if base not in table or (w and (not w.isdigit() or base not in windowed)):
            raise SystemExit(f"unknown press {name} (use {', '.join(table)}; -wW after {', '.join(sorted(windowed))})")
        return table[base]()

    return [(n, make(n)) for n in names]


def _lukv(kvpress, ratio: float):
    import numpy as np

    if LUKV_CURVE is None:
        raise SystemExit("the lukv press needs --lukv-curve FILE (headprof export PROFILE --format lukv)")
    press = kvpress.LUKVPress(kvpress.SnapKVPress(window_size=16), compression_ratio=ratio)
    press._budget_curves = np.load(LUKV_CURVE)  # set before the model's context: kvpress then fetches no URL
    return press


def counts(args) -> None:
    """Per item, layer and KV head, the keys LUKVPress keeps (the prompt's length minus the keys it masks) at
    `--ratio` with `--lukv-curve`, in kvpress's own hooks (run in .venv-kvpress)."""
    global LUKV_CURVE
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    LUKV_CURVE = args.lukv_curve
    torch.set_grad_enabled(False)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    items = [json.loads(line) for line in Path(args.items).read_text().splitlines() if line.strip()][:args.n]
    attn = [layer.self_attn for layer in model.model.layers]
    out = []
    for item in items:
        (_, press), = presses(["lukv"], args.ratio)
        seen: dict[int, list[int]] = {}

        def keep(module, *_, n=len(item["prompt_ids"]), seen=seen):
            masked = getattr(module, "masked_key_indices", None)
            heads = model.config.num_key_value_heads
            pruned = [0] * heads if masked is None else torch.bincount(masked[1], minlength=heads).tolist()
            seen[module.layer_idx] = [n - p for p in pruned]

        with press(model):
            hooks = [a.register_forward_hook(keep) for a in attn]  # after the press's own hook has compressed
            try:
                model(torch.tensor([item["prompt_ids"]]), past_key_values=DynamicCache(), use_cache=True)
            finally:
                for h in hooks:
                    h.remove()
        out.append({"item": item["id"], "prompt_tokens": len(item["prompt_ids"]),
                    "kept": [seen[i] for i in range(len(attn))]})
        print(f"{item['id']}: {len(item['prompt_ids'])} tokens", flush=True)
    Path(args.out).write_text(json.dumps({"ratio": args.ratio, "curve": args.lukv_curve, "items": out}))


def check(args) -> None:
    """In headprof's environment: headprof's HeadKV keep counts (budgets + window) on the same items and ratio, next
    to LUKVPress's (`counts`); prints the heads whose counts differ."""
    from headprof import api, methods
    from headprof.compressing import generation
    from headprof.evaluation.evaluate import ratio_budget

    lm = api.load_model(args.model)
    got = json.loads(Path(args.counts).read_text())
    items = {json.loads(line)["id"]: json.loads(line) for line in Path(args.items).read_text().splitlines()
             if line.strip()}
    m = methods.build("headkv", profile=api.Profile.load(args.profile), window=args.window)
    worst = 0
    for row in got["items"]:
        item = items[row["item"]]
        budget = ratio_budget(type("I", (), {"prompt_ids": item["prompt_ids"]}), got["ratio"], args.window)
        run = generation.generate(lm, item["prompt_ids"], m, budget, max_new_tokens=1)
        ours = [[b + args.window for b in layer] for layer in run.budgets]
        diff = max(abs(a - b) for la, lb in zip(ours, row["kept"], strict=True) for a, b in zip(la, lb, strict=True))
        worst = max(worst, diff)
        print(f"{row['item']} ({row['prompt_tokens']} tokens): largest per-head difference {diff} "
              f"over {sum(len(x) for x in ours)} KV heads", flush=True)
    print(f"largest difference over {len(got['items'])} items: {worst} tokens")


def decode(model, cache, logits, start: int, steps: int, stops: set[int]) -> list[list[int]]:
    """Greedy decoding of a batch of sequences, each to its first end token or `steps` tokens. The cache holds
    fewer entries than positions, so every step passes the true position, as kvpress's own pipeline does."""
    import torch

    out, finished = [], torch.zeros(logits.shape[0], dtype=torch.bool)
    stop = torch.tensor(sorted(stops), dtype=torch.long)
    for step in range(steps):
        token = logits.argmax(-1)
        finished |= torch.isin(token, stop)
        if bool(finished.all()):
            break
        out.append(token)
        position = torch.full((token.shape[0], 1), start + step)
        logits = model(token[:, None], past_key_values=cache, position_ids=position, use_cache=True).logits[:, -1]
    rows = torch.stack(out, 1).tolist() if out else [[] for _ in range(logits.shape[0])]
    return [r[:next((i for i, t in enumerate(r) if t in stops), len(r))] for r in rows]


def per_cell(model, ids, press, steps: int, stops: set[int], question_start: int | None = None):
    """kvpress's own way: the press's hooks compress the cache during a prefill of its own. With `question_start`
    (its pipeline's `compress_questions=False`) the hooks compress the context alone; the question is read after
    them, and the bytes held count it."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with press(model):  # decoding after it: a press that compresses as its context ends (KVzip) has then run
        logits = model(ids[:, :question_start], past_key_values=cache, use_cache=True).logits[:, -1]
    logits = read_question(model, cache, ids, question_start, logits)
    held = held_bytes(cache)  # before decoding: the bytes held for the prompt
    return decode(model, cache, logits, ids.shape[1], steps, stops)[0], held


def read_question(model, cache, ids, question_start: int | None, logits):
    """kvpress's protocol: the question's tokens read through the compressed context (every sequence of the batch
    in `cache`) at their true positions; the logits to decode from (`logits` when the question was compressed)."""
    import torch

    if question_start is None:
        return logits
    rows = logits.shape[0]
    question = ids[:, question_start:].expand(rows, -1)
    position = torch.arange(question_start, ids.shape[1])[None].expand(rows, -1)
    return model(question, past_key_values=cache, position_ids=position, use_cache=True).logits[:, -1]


def held_bytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def replayed(model, ids, cells, steps: int, stops: set[int], question_start: int | None = None):
    """KVzip's cells of an item from one prefill and one replay. Its scores come from replaying the context through
    the cache and do not depend on the ratio, so the first press runs as kvpress runs it and every other ratio's
    masks are its own `compress_post` over the same scores; the cache is cut back to the context after each
    cell. Returns {name: (tokens, bytes held, seconds)}, as `shared`."""
    from transformers import DynamicCache

    t0 = time.perf_counter()
    first = cells[0][1]
    scores = {}
    post = first.compress_post

    def keep(model):  # the replay's scores, before the first ratio's masks are drawn from them
        scores["val"] = first.score_val.clone()
        post(model)

    first.compress_post = keep
    cache = DynamicCache()
    context = ids.shape[1] if question_start is None else question_start
    with first(model):
        logits = model(ids[:, :context], past_key_values=cache, use_cache=True).logits[:, -1]
    share = (time.perf_counter() - t0) / len(cells)
    attn = [layer.self_attn for layer in model.model.layers]
    result = {}
    for name, press in cells:
        t = time.perf_counter()
        if press is not first:
            press.score_val = scores["val"].clone()
            press.compress_post(model)
        try:
            step = read_question(model, cache, ids, question_start, logits)
            held = held_bytes(cache)
            tokens = decode(model, cache, step, ids.shape[1], steps, stops)[0]
        finally:
            cache.crop(context)
            for a in attn:
                a.masked_key_indices = None
        result[name] = (tokens, held, share + time.perf_counter() - t)
    return result


def own_prefill(press) -> bool:
    """A press that runs passes of its own around the prefill (KVzip replays the context through the cache) has
    no `compress` to call on recorded inputs: it runs as kvpress runs it (`replayed`)."""
    from kvpress.presses.base_press import BasePress

    return type(press).__call__ is not BasePress.__call__


def shared(model, ids, cells, steps: int, stops: set[int], question_start: int | None = None):
    """All cells of an item from one prefill. The prefill's outputs do not depend on the press (kvpress
    compresses a layer's cache after that layer's attention has run), so one full-cache prefill records what
    kvpress's forward hook receives at every attention layer; each press's `compress` then runs on exactly
    those inputs, and cells whose compressed caches have the same shapes decode as one batch. AdaKV's masks
    (module.masked_key_indices, read by kvpress's attention patch) are kept per press and set, with batch
    offsets, only while that batch decodes. With `question_start` (kvpress's protocol) the prefill is the
    context's alone and each batch reads the question through its compressed caches before decoding, as
    `per_cell` does; the bytes held count the question. Returns {name: (tokens, bytes held, seconds)}."""
    import torch
    from transformers import DynamicCache

    context = ids if question_start is None else ids[:, :question_start]
    t0 = time.perf_counter()
    captured: dict[int, tuple] = {}

    def record(module, args, kwargs, output):
        captured[module.layer_idx] = (module, kwargs["hidden_states"], output[1], dict(kwargs))

    attn = [layer.self_attn for layer in model.model.layers]
    hooks = [a.register_forward_hook(record, with_kwargs=True) for a in attn]
    full = DynamicCache()
    try:
        logits = model(context, past_key_values=full, use_cache=True).logits[:, -1]
    finally:
        for h in hooks:
            h.remove()
    share = (time.perf_counter() - t0) / len(cells)
    compressed = {}
    for name, press in cells:
        t = time.perf_counter()
        layers, masks = [], []
        with press(model):  # the press's own set-up (post_init_from_model, rotary embedding); its hooks never fire
            for i in range(len(attn)):
                module, hidden, attentions, kwargs = captured[i]
                module.masked_key_indices = None
                layers.append(press.compress(module, hidden, full.layers[i].keys, full.layers[i].values,
                                             attentions, kwargs))
                masks.append(getattr(module, "masked_key_indices", None))
                module.masked_key_indices = None
        compressed[name] = (layers, masks, time.perf_counter() - t)
    groups: dict[tuple, list[str]] = {}
    for name, (layers, masks, _) in compressed.items():
        key = (tuple(k.shape for k, _ in layers), masks[0] is not None)
        groups.setdefault(key, []).append(name)
    result = {}
    for names in groups.values():
        t = time.perf_counter()
        cache = DynamicCache()
        for i in range(len(attn)):
            cache.update(torch.cat([compressed[n][0][i][0] for n in names]),
                         torch.cat([compressed[n][0][i][1] for n in names]), i)
            if compressed[names[0]][1][i] is not None:
                parts = [compressed[n][1][i] for n in names]
                attn[i].masked_key_indices = tuple(torch.cat([p[j] + (b if j == 0 else 0) for b, p in enumerate(parts)])
                                                   for j in range(3))
        try:
            first = read_question(model, cache, ids, question_start, logits.expand(len(names), -1))
            tokens = decode(model, cache, first, ids.shape[1], steps, stops)
        finally:
            for a in attn:
                a.masked_key_indices = None
        seconds = (time.perf_counter() - t) / len(names)
        read = ids.shape[1] - context.shape[1]  # the question's tokens, held whole after the context
        for n, toks in zip(names, tokens, strict=True):
            layers = compressed[n][0]
            held = sum(k.nbytes + v.nbytes + read * (k[:, :, :1].nbytes + v[:, :, :1].nbytes) for k, v in layers)
            result[n] = (toks, held, share + compressed[n][2] + seconds)
    return result


def run(args) -> None:
    global LUKV_CURVE
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    ratios = [float(r) for r in args.ratios.split(",")]
    names = args.presses.split(",")
    LUKV_CURVE = args.lukv_curve
    items = [json.loads(line) for line in Path(args.items).read_text().splitlines() if line.strip()]
    items = items[args.first_item:] if args.first_item else items
    lacking = [x["id"] for x in items if x.get("question_start") is None]
    if not args.compress_questions and lacking:  # refused before --out is opened: no empty rows file is left
        raise SystemExit(f"item {lacking[0]} has no separate question: --no-compress-questions needs items exported "
                         "from --suite ruler")
    uneven = [n for n in names if n.partition("-w")[0] == "pyramidkv"]
    if not args.compress_questions and uneven:
        raise SystemExit(f"{uneven[0]} cannot read a question after compression here: its layers keep different "
                         "lengths and transformers sizes the question's causal mask from layer 0's")
    presses(names, ratios[0])  # an unknown press is refused before the model loads
    hf_logging.disable_progress_bar()
    torch.set_grad_enabled(False)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    gen = model.generation_config.eos_token_id
    stops = set(gen if isinstance(gen, list) else [gen]) - {None}
    out = Path(args.out)
    with out.open("a", encoding="utf-8") as f:
        for item in items:
            # resume: rows already written are kept, re-read per item so that several processes can share --out
            done = {(r["item"], r["method"], r["ratio"]) for r in map(json.loads, out.read_text().splitlines())}
            ids = torch.tensor([item["prompt_ids"]])
            steps = item["max_new_tokens"] or args.max_new_tokens
            cells = [(f"{n}@{ratio}", ratio, press) for ratio in ratios for n, press in presses(names, ratio)
                     if (item["id"], f"kvpress-{n}", ratio) not in done]
            if not cells:
                continue
            after = None if args.compress_questions else item["question_start"]
            got, replays, rest, mode = {}, {}, [], {}
            for key, _, press in cells:
                if args.per_cell:  # the reference: kvpress's own way, a prefill (and KVzip's replay) per cell
                    t = time.perf_counter()
                    got[key] = (*per_cell(model, ids, press, steps, stops, after), time.perf_counter() - t)
                    mode[key] = "per-cell"
                elif own_prefill(press):  # KVzip: one replay per press name, its ratios drawn from it
                    replays.setdefault(key.rpartition("@")[0], []).append((key, press))
                    mode[key] = "replayed"
                else:
                    rest.append((key, press))
                    mode[key] = "shared"
            for named in replays.values():
                got |= replayed(model, ids, named, steps, stops, after)
            if rest:
                got |= shared(model, ids, rest, steps, stops, after)
            for key, ratio, _ in cells:
                tokens, held, seconds = got[key]
                name = key.rpartition("@")[0]
                row = {"item": item["id"], "task": item["task"], "method": f"kvpress-{name}", "ratio": ratio,
                       "budget": round((1 - ratio) * (after or len(item["prompt_ids"]))),
                       "response": tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                       "kv_bytes": held, "seconds": seconds, "prompt_tokens": len(item["prompt_ids"]),
                       "mode": mode[key],
                       **({} if after is None else {"compress_questions": False})}
                f.write(json.dumps(row) + "\n")
                f.flush()
                print(f"{item['id']} {name} {ratio}: {len(tokens)} tokens, {held / 1e6:.1f} MB, {seconds:.1f} s",
                      flush=True)


def merge(args) -> None:
    from headprof.api import EvalReport
    from headprof.evaluation import evaluate
    from headprof.probing.answers import agreement

    results = json.loads(Path(args.results).read_text())
    items = {x["id"]: x for x in map(json.loads, Path(args.items).read_text().splitlines())}
    full = {r["item"]: r["response"] for r in results["rows"] if r["method"] == "full"}
    peer_rows, seen = [], {}
    protocol = results.get("compress_questions", True)
    for r in (json.loads(line) for line in Path(args.rows).read_text().splitlines() if line.strip()):
        if r.get("compress_questions", True) != protocol:
            raise SystemExit(f"{args.rows} holds rows of the other protocol than {args.results} (compress_questions "
                             f"{r.get('compress_questions', True)} against {protocol})")
        key = (r["item"], r["method"], r["ratio"])  # two processes sharing --out may both run their last item
        if key in seen and seen[key] != r["response"]:
            raise SystemExit(f"{args.rows} holds {key} twice with different responses")
        if key not in seen:
            seen[key] = r["response"]
            peer_rows.append(r)
    missing = sorted({r["item"] for r in peer_rows} - set(full))
    if missing and args.common:  # items headprof has not run yet: left out of both sides
        print(f"left out {len(missing)} kvpress items that {args.results} does not hold (e.g. {missing[0]})")
        peer_rows = [r for r in peer_rows if r["item"] in full]
    elif missing:
        raise SystemExit(f"{len(missing)} kvpress items are not in {args.results} (e.g. {missing[0]}): run headprof's "
                         "eval with the same --suite, --lengths, --items and --seed")
    cells: dict[tuple, set] = {}  # what each press ran at each ratio: every method is averaged over the same items
    for r in peer_rows:
        cells.setdefault((r["method"], r["ratio"]), set()).add(r["item"])
    ran = set(full).intersection(*cells.values())
    short = [(m, ratio, len(got)) for (m, ratio), got in cells.items() if got != set(full)]
    if short and not args.common:
        m, ratio, n = short[0]
        raise SystemExit(f"{m} ran {n} of the {len(full)} items at ratio {ratio}: pass --common to keep only the "
                         "items every method ran")
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
            "agreement": agreement(text, reference), "kv_bytes": r["kv_bytes"],
            "seconds": r["seconds"], "prompt_tokens": r["prompt_tokens"]})
    if args.common:  # only the items every press ran at every ratio, headprof's methods too
        results["rows"] = [r for r in results["rows"] if r["item"] in ran]
        results["items"] = len(ran)
    if args.ratios:  # only the ratios kvpress ran, so that the tables hold no empty columns
        keep = [float(x) for x in args.ratios.split(",")]
        results["rows"] = [r for r in results["rows"] if r.get("ratio") in keep]
        results["ratios"] = [x for x in results["ratios"] if x in keep]
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
    r.add_argument("--presses", default="snapkv,snapkv-w16,adakv,adakv-w16,keydiff,expected_attention,pyramidkv,"
                                        "streaming", help="a name ending in -wW: a SnapKV-style press with "
                                                          "observation window W (kvpress's default: 64)")
    r.add_argument("--max-new-tokens", type=int, default=32)
    r.add_argument("--first-item", type=int, default=0, help="start at this line of --items")
    r.add_argument("--per-cell", action="store_true", help="kvpress's own hooks, one prefill per press and ratio "
                                                           "(slow; the reference the shared prefill is checked on)")
    r.add_argument("--lukv-curve", help="the lukv press's budget curve (headprof export --format lukv)")
    r.add_argument("--no-compress-questions", dest="compress_questions", action="store_false",
                   help="kvpress's leaderboard protocol: compress the context alone, then ask the question")
    r.add_argument("--out", required=True)
    c = sub.add_parser("counts", help="LUKVPress's per-head keep counts on exported items (in .venv-kvpress)")
    c.add_argument("--items", required=True)
    c.add_argument("--model-dir", required=True)
    c.add_argument("--lukv-curve", required=True)
    c.add_argument("--ratio", type=float, default=0.9)
    c.add_argument("--n", type=int, default=3, help="the first N items")
    c.add_argument("--out", required=True)
    k = sub.add_parser("check", help="headprof's HeadKV counts next to LUKVPress's (`counts`), in headprof's env")
    k.add_argument("--model", required=True)
    k.add_argument("--profile", required=True)
    k.add_argument("--items", required=True)
    k.add_argument("--counts", required=True)
    k.add_argument("--window", type=int, default=16)
    m = sub.add_parser("merge", help="score kvpress's rows with headprof and merge them into results.json")
    m.add_argument("--results", required=True)
    m.add_argument("--items", required=True)
    m.add_argument("--rows", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--force", action="store_true")
    m.add_argument("--ratios", help="keep only these ratios (e.g. the ones kvpress ran)")
    m.add_argument("--common", action="store_true", help="keep only the items every method ran (every method on "
                                                          "the same items)")
    args = ap.parse_args()
    {"run": run, "counts": counts, "check": check, "merge": merge}[args.step](args)


if __name__ == "__main__":
    main()
