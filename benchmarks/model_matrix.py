"""The support matrix: every causal-LM architecture of the installed transformers, built as a tiny random model
offline, run through headprof as a user would, and classified.

    python benchmarks/model_matrix.py                      # all architectures -> docs/models.md
    python benchmarks/model_matrix.py llama jamba bloom    # some, printed only

For each architecture in transformers' `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` that builds from its config offline
(4 layers, hidden 64, 4 query / 2 KV heads, a character tokenizer), saved to a folder and loaded by headprof as a
local model:

- `info`: the head layout from the config;
- `score`: an r2 profile from two teacher-forced probes (a head scores the weight of its top keys that fall on the
  fact sentence);
- `run`: headkv (with that profile), snapkv and full, at a budget above the prompt and at a small one.

Status: *works* when headprof's capture hands over every full-attention layer's softmax rows (each sums to 1; a
random model's profile may still be zero where no head's top keys fall on the fact), the compressed answers at a
budget above the prompt equal the full cache's token for token, at the small budget the compressed caches hold
fewer bytes, and headprof's attention gives the model's eager logits; *scores only* when all of that holds but the
compressing methods, which are refused in one line (the reason column): `info`, `score` and `run --method full`
work; *refused* when headprof stops with its own one-line error (what the command prints, exit 2) before that;
*fails* otherwise (a traceback, or a result that looks right and is not: a silent failure).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MAX_PARAMS = 20_000_000
L = 4  # layers: enough for every hybrid pattern below to hold attention and something else

COMMON = dict(num_hidden_layers=L, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, vocab_size=128, max_position_embeddings=1024, n_layer=L, n_embd=64, n_head=4,
              is_decoder=True, decoder_layers=L, encoder_layers=L, decoder_attention_heads=4, encoder_attention_heads=4,
              d_model=64, decoder_ffn_dim=96, encoder_ffn_dim=96,
              moe_intermediate_size=32, num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
              n_shared_experts=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
              v_head_dim=16, first_k_dense_replace=0, n_group=1, topk_group=1, pad_token_id=0, bos_token_id=1,
              eos_token_id=2, unpadded_vocab_size=128)
# sizes a config keeps apart from a shared one (Inkling's sliding layers): scaled as the shared size was, so that a
# layer kind with heads of its own keeps them
SCALED = {"swa_num_attention_heads": "num_attention_heads", "swa_num_key_value_heads": "num_key_value_heads",
          "swa_head_dim": "head_dim"}
# the layer pattern of hybrids whose pattern is not a list of layer types
PATTERNS = {"jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
            "bamba": dict(attn_layer_indices=[1, 3]),
            "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"] * 2),
            "gemma3n_text": dict(num_kv_shared_layers=2, vocab_size_per_layer_input=128, hidden_size_per_layer_input=8,
                                 layer_types=["sliding_attention", "full_attention"] * 2),
            "gemma4": dict(vocab_size_per_layer_input=128, hidden_size_per_layer_input=8, global_head_dim=32),
            "gemma4_text": dict(vocab_size_per_layer_input=128, hidden_size_per_layer_input=8, global_head_dim=32),
            "gpt_neo": dict(attention_types=[[["global", "local"], 2]]),
            "lfm2": dict(layer_types=["conv", "full_attention"] * 2),
            "lfm2_moe": dict(layer_types=["conv", "full_attention"] * 2),
            "zaya": dict(num_experts_per_tok=1), "dbrx": dict(attn_config=dict(kv_n_heads=2, rope_theta=10000.0)),
            "codegen": dict(rotary_dim=8), "gptj": dict(rotary_dim=8), "xlnet": dict(d_head=16),
            "kolibri1_1": dict(index_layers=[1], kv_source_layers=[0, 1, 2, 1], mlp_only_layers=[0],
                               layer_types=["sliding_attention", "indexed_attention"] * 2)}
# sizes a config names its own way (its layer pattern still cycled)
SIZES = {"blt": dict(encoder_hash_byte_group_vocab=64),
         "kolibri1_1": dict(index_num_heads=2, index_head_dim=16, mlp_only_intermediate_size=96,
                            shared_expert_intermediate_size=32),
         "dots3_note_text": dict(head_dim=20, index_n_heads=2, index_head_dim=16,  # sliding: nope 12 + rope 8
                                 shared_experts_intermediate_size=32),
         "mamba2": dict(num_heads=8, head_dim=16, n_groups=1),
         "reformer": dict(axial_pos_embds_dim=[32, 32], axial_pos_shape=[32, 32])}
# what a config may refuse, least needed first: dropped one by one until it builds
OPTIONAL = ("max_position_embeddings", "head_dim", "is_decoder", "num_key_value_heads", "moe_intermediate_size",
            "n_shared_experts", "first_k_dense_replace", "n_group", "topk_group", "q_lora_rank")
PATTERN_LISTS = ("layer_types", "layers_block_type", "block_types", "hybrid_override_pattern")


def _shrunk(cls, default, model_type: str):
    """`cls` built with the shared sizes where `default` (a config of it) has them, its layer pattern cycled over
    `L` layers so that a hybrid keeps each of its kinds; keys the config refuses are dropped one by one."""
    kwargs = {k: v for k, v in COMMON.items() if _has(default, k)}
    known = default.to_dict()  # global values, per-layer attributes included
    if _has(default, "kv_lora_rank"):  # MLA: the rotary part is its own head size; every head expands the latent
        kwargs.pop("head_dim", None)
        kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        if known.get("head_dim") is not None and known.get("head_dim") == known.get("qk_rope_head_dim"):
            kwargs["head_dim"] = COMMON["qk_rope_head_dim"]  # LongCat: head_dim names the rotary part
    for name, base in SCALED.items():
        if isinstance(known.get(name), int) and known.get(base) and base in kwargs:
            kwargs[name] = max(1, round(kwargs[base] * known[name] / known[base]))
    kwargs.update(PATTERNS.get(model_type, {}))
    kwargs.update(SIZES.get(model_type) or SIZES.get(getattr(default, "model_type", ""), {}))
    patterns = {}
    for name in PATTERN_LISTS:
        pattern = getattr(default, name, None) if _has(default, name) else None
        kinds = list(dict.fromkeys(pattern)) if isinstance(pattern, (list, str)) else []
        if len(kinds) > 1 and model_type not in PATTERNS:
            cycled = [kinds[i % len(kinds)] for i in range(L)]
            patterns[name] = "".join(cycled) if isinstance(pattern, str) else cycled
    default_types = list(known.get("layer_types") or [])
    types = kwargs.get("layer_types") or patterns.get("layer_types") or default_types[:L]
    per_layer = _per_layer(known, default_types, types, kwargs)
    if per_layer:  # exactly as scaled, or not at all (Gemma 4 derives its own from global_head_dim)
        try:
            return cls(**kwargs, **patterns, **per_layer)
        except Exception:
            pass
    for attempt in ({**kwargs, **patterns}, kwargs):
        for _ in range(len(OPTIONAL) + 1):
            try:
                return cls(**attempt)
            except Exception as e:
                named = [k for k in attempt if f"'{k}'" in str(e) or f"`{k}`" in str(e)]
                drop = named or [k for k in OPTIONAL if k in attempt][:1]
                if not drop:
                    break
                attempt = {k: v for k, v in attempt.items() if k != drop[0]}
    # some configs refuse a size; keep only the depth and width
    return cls(**{k: kwargs[k] for k in ("num_hidden_layers", "hidden_size", "vocab_size") if k in kwargs})


def _per_layer(known: dict, pattern: list, types: list, kwargs: dict) -> dict:
    """Per-layer overrides (transformers' `per_layer_config`) for the tiny model's layers of `types`: each takes
    the overrides of the default's first layer of its kind, every size scaled as the shared size was (dots.3's
    sliding layers keep half the heads of its indexed ones)."""
    overrides = {int(k): v for k, v in (known.get("per_layer_config") or {}).items()}
    out = {}
    for i, kind in enumerate(types):
        first = pattern.index(kind) if kind in pattern else None
        if first is None or not overrides.get(first):
            continue
        out[str(i)] = {k: max(1, round(kwargs[k] * v / known[k])) if k in kwargs and isinstance(v, int) and known.get(k)
                       else v for k, v in overrides[first].items()}
    return {"per_layer_config": out} if out else {}


def _has(config, name: str) -> bool:
    """Whether `config` has `name`; a per-layer attribute (Gemma 4's head_dim), which transformers refuses to read
    globally, counts: the shared size then applies where the config takes it."""
    try:
        return hasattr(config, name)
    except Exception:  # AmbiguousGlobalPerLayerAttributeError
        return True


def tiny_config(model_type: str, towers: bool = True):
    """A small config of `model_type`; a composite config (a text model inside a multimodal one) gets a small
    text config and, with `towers`, small vision or audio configs (the same widths and depth)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    default = cls()
    text = getattr(default, "text_config", None)
    if text is None or text is default:
        config = _shrunk(cls, default, model_type)
    else:
        small = _shrunk(type(text), text, model_type)
        # towers given with the text config where the config checks that their widths meet (dots.3's adapter)
        subs = {name: _shrunk(type(sub), sub, model_type).to_dict() for name in getattr(default, "sub_configs", {})
                if name != "text_config" and hasattr(sub := getattr(default, name, None), "to_dict")} if towers else {}
        for attempt in ({"text_config": small.to_dict(), **subs}, {"text_config": small.to_dict()}, None):
            try:
                config = cls(**attempt) if attempt is not None else _shrunk(cls, default, model_type)
                break
            except Exception:
                if attempt is None:
                    raise
    for name in getattr(default, "sub_configs", {}) if towers else ():
        sub = getattr(config, name, None)
        if name != "text_config" and sub is not None and hasattr(sub, "to_dict"):
            setattr(config, name, _shrunk(type(sub), sub, model_type))
    return config


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i - 32 + 3 for i in range(32, 127)}
    vocab.update({"<pad>": 0, "<s>": 1, "</s>": 2})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<pad>", pad_token="<pad>")


def build(model_type: str, folder: Path) -> str | None:
    """Save a tiny random `model_type` with the tokenizer to `folder`; None, or why it does not build offline."""
    from transformers import AutoModelForCausalLM

    why = None
    for towers in (True, False):  # small vision/audio towers where the model takes them, else its own
        model = None
        try:
            config = tiny_config(model_type, towers)
            with torch.device("meta"):  # sizes the config does not let us shrink build no tiny model
                size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
            if size > MAX_PARAMS:
                why = why or f"not tiny: {size / 1e6:.0f}M parameters from its config's own sizes"
                continue
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
            model.generation_config.eos_token_id = None
            if hasattr(model, "set_default_language"):  # X-MOD: one language adapter for every input
                model.set_default_language(next(iter(config.languages)))
            ids = torch.randint(3, 98, (1, 12))
            with torch.no_grad():
                model.generate(ids, max_new_tokens=2, do_sample=False)
            model.save_pretrained(folder)
            char_tokenizer().save_pretrained(folder)
            return None
        except Exception as e:
            # a tiny model that transformers builds but cannot generate with: its own reason, ahead of any other
            if model is not None and not (why or "").startswith("transformers'"):
                why = f"transformers' own generate fails on the tiny model: {_why(e)}"
            else:
                why = why or _why(e)
    try:  # whose reason: a default config transformers itself cannot build is not the matrix's doing
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        with torch.device("meta"):
            AutoModelForCausalLM.from_config(CONFIG_MAPPING[model_type]())
    except Exception as e:
        return f"transformers' own default config does not build: {_why(e)}"
    return why


def _why(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[-1 if 'validation error' in str(e) else 0][:120] if lines else ''}"


STATUSES = ("works", "scores only", "refused", "fails")


@dataclass
class Row:
    model_type: str
    mechanism: str
    status: str  # one of STATUSES, or does not build
    reason: str
    seconds: float


def mechanism(folder: Path) -> str:
    """What kind of attention the architecture has, from headprof's reading of its config and weights."""
    from headprof import api
    from headprof.layout import BLOCK_KINDS

    try:
        lay = api.load_model(str(folder), device="cpu").info.layout
    except Exception as e:
        text = str(e)
        return ("attention-free" if "attention-free" in text else
                "legacy attention" if "attention interface" in text or "written inline" in text else "?")
    kinds = set(lay.attention_kinds)
    if lay.inline:  # read from its softmax (`legacy.InlineRows`)
        return "legacy attention"
    if kinds & set(BLOCK_KINDS):
        return "compressed blocks"
    if getattr(lay, "latent", False):
        return "MLA"
    if kinds - {"full_attention", "sliding_attention", "local_attention", "dummy", "chunked_attention"}:
        return "hybrid"
    if "dummy" in kinds:
        return "KV-shared"
    if kinds & {"sliding_attention", "local_attention", "chunked_attention"}:
        return "sliding"
    return "GQA" if lay.num_kv_heads < lay.num_query_heads else "dense"


def classify(folder: Path) -> tuple[str, str]:
    """(status, reason) of headprof on the model in `folder`."""
    from headprof import api
    from headprof.calls import with_cache
    from headprof.capture import AttentionCapture, implementation
    from headprof.errors import HeadprofError
    from headprof.kv.decode_cache import alone

    spec = str(folder)
    try:
        api.describe_model(spec)
        prof = api.score(spec, "r2", lengths=[240], depths=2, filter_probes=False, teacher_forced=True,
                         chat_template=False, device="cpu", batch_size=2)
        scores = prof.query_scores()
        lm = api.load_model(spec, device="cpu")
        lay = lm.info.layout
        # every layer with heads and full attention must have seen the needle (a sliding layer may legitimately
        # not: its window can end before the fact sentence)
        full = [i for i in range(lay.num_layers) if lay.has_heads(i) and lay.attention_kinds[i] in ("full_attention",
                                                                                                   "hybrid")]
        ids = [1] + [3 + (i * 7) % 90 for i in range(119)]
        rows: dict[int, torch.Tensor] = {}
        with torch.no_grad(), AttentionCapture(rows.__setitem__, last_n=4):
            lm.model(input_ids=torch.tensor([ids]), **with_cache(lm.model, alone(lm.model.config)))
        def whole(i: int) -> bool:  # a row sums to 1, less a learned sink's share where the layer has sinks
            total = rows[i].sum(-1)
            if i in lay.sinks:
                return bool(((total > 0) & (total <= 1 + 1e-4)).all())
            return torch.allclose(total, torch.ones(()), atol=1e-4)

        unseen = [i for i in full if i not in rows or not whole(i)]
        if unseen or not np.isfinite(scores).all() or not (abs(scores) > 0).any() and not rows:
            return "fails", f"silent: no attention rows captured on layers {unseen[:6] or 'all'}"
        refusal = ""  # compression refused in one line: the heads are still scored
        try:
            for method in ("headkv", "snapkv"):
                big = api.generate(lm, ids, method, len(ids) + 8, profile=prof, max_new_tokens=6)
                if big.runs[0].tokens != big.runs[1].tokens:
                    return "fails", f"silent: {method} at a budget above the prompt differs from the full cache"
                small = api.generate(lm, ids, method, 24, profile=prof, max_new_tokens=6)
                if not small.runs[0].kv_bytes < small.runs[1].kv_bytes:
                    return "fails", f"silent: {method} at budget 24 holds the full cache's bytes"
        except HeadprofError as e:
            refusal = str(e).splitlines()[0]
        api.generate(lm, ids, "full", 24, max_new_tokens=4)
        # headprof's attention function computes what the model's own eager attention does (checked last: a
        # composite model may not switch back cleanly)
        with torch.no_grad():
            ours = lm.model(input_ids=torch.tensor([ids])).logits
            with implementation(lm.model, "eager"):
                theirs = lm.model(input_ids=torch.tensor([ids])).logits
        if not torch.allclose(ours, theirs, atol=1e-3, rtol=1e-3):
            return "fails", f"silent: headprof's attention differs from the model's eager attention by " \
                            f"{(ours - theirs).abs().max().item():.2g} in the logits"
    except HeadprofError as e:
        return "refused", str(e).splitlines()[0]
    except Exception as e:
        frame = traceback.extract_tb(e.__traceback__)[-1]
        where = f"{Path(frame.filename).name}:{frame.lineno}"
        return "fails", f"{type(e).__name__} at {where}: {str(e).splitlines()[0][:100] if str(e) else ''}"
    return ("scores only", refusal) if refusal else ("works", "")


def run(model_type: str) -> Row:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / model_type
        why = build(model_type, folder)
        if why is not None:
            return Row(model_type, "-", "does not build", why, time.perf_counter() - start)
        status, reason = classify(folder)
        return Row(model_type, mechanism(folder), status, reason, time.perf_counter() - start)


def main() -> int:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from headprof import quiet

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("types", nargs="*", help="model types (default: all)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "models.md"))
    parser.add_argument("--update", action="store_true",
                        help="rerun the given types only and replace their rows in --out (totals recounted)")
    args = parser.parse_args()
    if args.update and not args.types:
        parser.error("--update needs the model types to rerun")
    types = args.types or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    rows = []
    quiet.third_party()
    for t in types:
        row = run(t)
        rows.append(row)
        print(f"{row.model_type:28s} {row.mechanism:15s} {row.status:15s} {row.reason}", flush=True)
        if not args.types:  # the page as far as the run has got, so an interrupted run still tells
            Path(args.out).write_text(page(rows, transformers.__version__, len(types)), encoding="utf-8")
    if args.update:
        text = Path(args.out).read_text(encoding="utf-8")
        at, old, reruns = read_page(text)
        new = {r.model_type: r for r in rows}
        listed = {r.model_type for r in old}
        merged = [new.get(r.model_type, r) for r in old] + [r for r in rows if r.model_type not in listed]
        reruns = [(c, [t for t in ts if t not in new]) for c, ts in reruns] + [(commit(), sorted(new))]
        Path(args.out).write_text(page(sorted(merged, key=lambda r: r.model_type), transformers.__version__,
                                       len(merged), at, reruns=[(c, ts) for c, ts in reruns if ts]),
                                  encoding="utf-8")
        rows = merged
    built = [r for r in rows if r.status != "does not build"]
    count = {s: sum(r.status == s for r in built) for s in STATUSES}
    silent = sum(r.reason.startswith("silent") for r in built)
    print(f"{len(built)} build of {len(rows)}: {count['works']} work, {count['scores only']} score only, "
          f"{count['refused']} refused, {count['fails']} fail ({silent} silently)")
    return 0


def commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def _failures(built: list[Row]) -> str:
    failed = [r for r in built if r.status == "fails"]
    silent = sum(r.reason.startswith("silent") for r in failed)
    if not failed:
        return "none silently, none with a traceback"
    return (f"{silent} silently ({', '.join(r.model_type for r in failed if r.reason.startswith('silent')) or '-'}), "
            f"{len(failed) - silent} with a traceback")


def read_page(text: str) -> tuple[str, list[Row], list[tuple[str, list[str]]]]:
    """The commit a page's full run was at, its rows, and the reruns of some rows since (for `--update`)."""
    import re

    at = re.search(r"run through headprof at commit (\w+)", text)
    reruns = [(c, ts.split(", ")) for ts, c in re.findall(r"The rows of ([^.]+?) are from `[^`]*` at commit (\w+)\.",
                                                            text.replace("\n", " "))]
    rows = []
    for line in text.split("| --- | --- | --- | --- |")[-1].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4:
            rows.append(Row(cells[0], cells[1], cells[2], cells[3], 0.0))
    return (at.group(1) if at else "?"), rows, reruns


def page(rows: list[Row], version: str, total: int, at: str | None = None,
         reruns: list[tuple[str, list[str]]] = ()) -> str:
    built = [r for r in rows if r.status != "does not build"]
    n = len(built)
    count = {s: sum(r.status == s for r in built) for s in STATUSES}
    by_kind: dict[str, dict[str, int]] = {}
    for r in built:
        by_kind.setdefault(r.mechanism, {}).setdefault(r.status, 0)
        by_kind[r.mechanism][r.status] += 1
    summary = [f"| mechanism | {' | '.join(STATUSES)} |", "| --- |" + " --- |" * len(STATUSES)] + [
        f"| {kind} | {' | '.join(str(c.get(s, 0)) for s in STATUSES)} |"
        for kind, c in sorted(by_kind.items(), key=lambda kv: -sum(kv[1].values()))]
    lines = ["# Supported models", "",
             f"Every causal-LM architecture of transformers {version} (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, "
             f"{len(rows)} entries), built as a tiny random model offline and run through headprof at commit "
             f"{at or commit()}: `python benchmarks/model_matrix.py` (its docstring says what each status means; "
             "`?` marks a model refused before its mechanism could be read)."
             + (f" This run covers the first {len(rows)} of the {total}, in name order." if len(rows) < total else "")
             + "".join(f" The rows of {', '.join(ts)} are from `python benchmarks/model_matrix.py --update "
                       f"{' '.join(ts)}` at commit {c}." for c, ts in reruns),
             "",
             f"Of the {n} that build offline: **{count['works']} work ({100 * count['works'] / n:.0f}%), "
             f"{count['scores only']} score their heads and refuse compression in one line, {count['refused']} are "
             f"refused in one line, {count['fails']} fail** ({_failures(built)}).", "", *summary, "",
             "Architectures that do not build as a tiny model offline are listed with why; they were not run.", "",
             "| architecture | mechanism | status | reason |", "| --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r.model_type} | {r.mechanism} | {r.status} | {r.reason.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
