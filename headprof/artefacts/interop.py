"""Import and export other projects' head-score files, with honest provenance.

- `headkv`: HeadKV / Retrieval_Head JSON, `{"layer-head": [score per successful probe, ...]}`, 0-based
  query heads even for GQA models. Each list is one head's per-probe scores.
- `duo`: DuoAttention `full_attention_heads.tsv`, layers (rows) x KV heads (columns) of gate values,
  clipped to [0, 1] on import. These are KV-head scores only: the profile has no query-head scores. Exported, it is
  what DuoAttention's `load_attn_pattern` and RLKV's SGLang fork (`--enable-rlkv-inference --adapter-load-path DIR`)
  read: the KV-head scores scaled into [0, 1] (both clip to it, then keep the heads above a quantile), beside a
  `config.json` with DuoAttention's `sink_size` and `recent_size` (`duo_folder`).
- `lukv`: NVIDIA kvpress's `LUKVPress` budget curve, a `.npy` of shape [99, layers, KV heads]: for compression
  ratios 0.01 ... 0.99, the share of each KV head's tokens HeadKV's allocation prunes on a prompt of a stated
  length (`lukv_curve`).

An imported profile says what is unknown (probe texts, revision, success counts) instead of guessing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from headprof.artefacts.profile import Profile, build, rounded
from headprof.errors import ProfileError
from headprof.files import read_text

FORMATS = ("headkv", "duo")  # text formats; `lukv` and a `duo` folder are files (`lukv_curve`, `duo_folder`)
FILE_FORMATS = ("lukv", "duo")


def _profile(model_id: str, layers: int, heads: int, kv_heads: int, method: str, query: np.ndarray | None,
             kv: dict, probes: list, source: dict) -> Profile:
    model = {"spec": model_id, "resolved": model_id, "revision": None, "weights_sha256": None, "architecture": None,
             "model_type": None, "num_layers": layers, "num_query_heads": heads, "num_kv_heads": kv_heads,
             "group_size": heads // kv_heads, "head_dim": None, "attention_kinds": None, "sliding_window": None,
             "max_positions": None, "chat_template": None}
    probe_set = {"name": f"imported-{source['format']}", "version": "unknown", "hash": source["sha256"],
                 "count": len(probes), "successes": len(probes), "counted": len(probes)}
    return build(model, method, {"imported": True}, probe_set, probes, query, {"imported": True}, kv=kv,
                 source=source)


def import_headkv(path: Path, model_id: str, kv_heads: int | None = None, method: str | None = None) -> Profile:
    text = read_text(path, 'file', ProfileError)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProfileError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(raw, dict) or not raw:
        raise ProfileError(f"{path}: expected an object of \"layer-head\": [scores]")
    cells = {}
    for key, values in raw.items():
        try:
            layer, head = (int(x) for x in key.split("-"))
        except ValueError:
            raise ProfileError(f"{path}: key '{key}' is not 'layer-head'") from None
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
            raise ProfileError(f"{path}: '{key}' must map to a list of numbers")
        cells[layer, head] = values
    layers = 1 + max(k[0] for k in cells)
    heads = 1 + max(k[1] for k in cells)
    missing = [f"{la}-{h}" for la in range(layers) for h in range(heads) if (la, h) not in cells]
    if missing:
        raise ProfileError(f"{path}: keys do not form a full {layers} x {heads} layer x head grid "
                           f"(missing {', '.join(missing[:3])}{'...' if len(missing) > 3 else ''})")
    kv = kv_heads or heads
    if heads % kv:
        raise ProfileError(f"--kv-heads {kv} does not divide the {heads} query heads")
    lengths = {len(v) for v in cells.values()}
    query = np.array([[np.mean(cells[la, h]) if cells[la, h] else 0.0 for h in range(heads)] for la in range(layers)])
    probes = []
    if len(lengths) == 1:  # one list entry per successful probe, aligned across heads
        n = lengths.pop()
        probes = [{"id": f"imported-{i}", "success": True, "counted": True,
                   "scores": rounded(np.array([[cells[la, h][i] for h in range(heads)] for la in range(layers)]))}
                  for i in range(n)]
    name = method or ("r2" if "reasoning" in path.name else "retrieval")
    unknown = ["probe texts and lengths", "failed probes (the format keeps successful ones only)",
               "model revision"] + ([] if kv_heads else ["KV heads (assumed equal to query heads; pass --kv-heads)"])
    source = {"format": "headkv", "file": path.name, "sha256": "sha256:" + hashlib.sha256(text.encode()).hexdigest(),
              "unknown": unknown, "note": "scores are the raw means of each list (HeadKV's loader also "
                                          "divides by their sum; allocation normalises anyway)"}
    return _profile(model_id, layers, heads, kv, name, query, Profile.kv_reduce(query, kv), probes, source)


def import_duo(path: Path, model_id: str, query_heads: int | None = None) -> Profile:
    text = read_text(path, 'file', ProfileError)
    rows = [line.split("\t") for line in text.strip().splitlines() if line.strip()]
    if not rows:
        raise ProfileError(f"{path} holds no rows")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        bad = next(i for i, r in enumerate(rows, 1) if len(r) != len(rows[0]))
        raise ProfileError(f"{path}: ragged rows (row 1 has {len(rows[0])} values, row {bad} has {len(rows[bad - 1])})")
    try:
        values = np.clip(np.array([[float(x) for x in r] for r in rows]), 0.0, 1.0)
    except ValueError:
        raise ProfileError(f"{path}: every value must be a number") from None
    layers, kv = values.shape
    heads = query_heads or kv
    if heads % kv:
        raise ProfileError(f"--query-heads {heads} is not a multiple of the {kv} KV heads")
    g = rounded(values)
    source = {"format": "duo", "file": path.name, "sha256": "sha256:" + hashlib.sha256(text.encode()).hexdigest(),
              "unknown": ["query-head scores (DuoAttention gates KV heads)", "training data and steps",
                          "model revision"] + ([] if query_heads else ["query heads (assumed equal to KV heads; "
                                                                       "pass --query-heads)"]),
              "note": "gate values clipped to [0, 1]; kv.mean and kv.max both hold the gate"}
    return _profile(model_id, layers, heads, kv, "duo", None, {"mean": g, "max": g, "note": source["note"]}, [],
                    source)


def import_file(path: Path, fmt: str, model_id: str, kv_heads: int | None = None,
                query_heads: int | None = None) -> Profile:
    if fmt == "headkv":
        return import_headkv(path, model_id, kv_heads)
    if fmt == "duo":
        return import_duo(path, model_id, query_heads)
    raise ProfileError(f"unknown format '{fmt}' (use {' or '.join(FORMATS)})")


def export_text(profile: Profile, fmt: str) -> str:
    """The profile in another project's format (per-probe lists when the profile has them)."""
    layers, heads = profile.shape
    if fmt == "headkv":
        if not profile.has_query_scores:
            raise ProfileError("this profile has KV-head scores only; the headkv format needs query heads")
        if len(set(profile.model.get("query_heads_per_layer") or [])) > 1:
            raise ProfileError("a headkv file has one number of query heads in every layer; this profile's layers "
                               f"have {sorted(set(profile.model['query_heads_per_layer']))}")
        per_probe = profile.per_probe() if profile.probes else None
        query = profile.query_scores()
        out = {f"{la}-{h}": (per_probe[:, la, h].tolist() if per_probe is not None and per_probe.size
                             else [float(query[la, h])]) for la in range(layers) for h in range(heads)}
        return json.dumps(out)
    if fmt == "duo":
        kv = profile.kv_scores("mean")
        return "\n".join("\t".join(f"{v:.18e}" for v in row) for row in kv) + "\n"
    raise ProfileError(f"unknown format '{fmt}' (use {' or '.join(FORMATS)})")


def _refuse_unless_per_kv_head(profile: Profile, fmt: str, same_heads: bool = False) -> None:
    m = profile.model
    if m.get("latent_layers"):
        raise ProfileError(f"a {fmt} file holds one score per KV head; layers {m['latent_layers']} of this profile "
                           "cache an MLA latent shared by their heads")
    per_layer = m.get("kv_heads_per_layer") or []
    if same_heads and len(set(per_layer)) > 1:
        raise ProfileError(f"a {fmt} curve has one KV-head count for every layer; this profile's layers have "
                           f"{sorted(set(per_layer))} KV heads")


def duo_table(profile: Profile) -> np.ndarray:
    """[layer, kv_head] scores in [0, 1] (divided by the largest: the loaders clip to [0, 1] and rank by quantile)."""
    _refuse_unless_per_kv_head(profile, "duo")
    kv = np.clip(profile.kv_scores("mean"), 0, None)
    return kv / kv.max() if kv.max() > 0 else kv


def duo_folder(profile: Profile, folder: Path, sink: int, recent: int) -> None:
    """What DuoAttention's and RLKV's loaders read from a pattern folder: `full_attention_heads.tsv` (layers as rows,
    KV heads as columns, tab-separated) and `config.json` (`sink_size`, `recent_size`)."""
    table = duo_table(profile)
    (folder / "full_attention_heads.tsv").write_text(
        "\n".join("\t".join(f"{v:.18e}" for v in row) for row in table) + "\n")
    (folder / "config.json").write_text(json.dumps({"sink_size": sink, "recent_size": recent,
                                                    "source": "headprof", "model": profile.model.get("spec")}))


def lukv_curve(profile: Profile, prompt_len: int, window: int, beta: float, reduction: str = "mean") -> np.ndarray:
    """[99, layers, kv_heads] float32: at compression ratio (t + 1) / 100, the share of each KV head's tokens that
    HeadKV's allocation (Eq. 4, the profile's KV-head scores) prunes on a prompt of `prompt_len` tokens, the budget
    being what `eval --ratios` gives (`evaluate.ratio_budget`) and the observation window kept by every head."""
    from headprof.methods.headkv import headkv

    _refuse_unless_per_kv_head(profile, "lukv", same_heads=True)
    m = profile.model
    windows = [k for k in (m.get("attention_kinds") or []) if k not in ("full_attention", "hybrid")]
    if windows and m.get("sliding_window"):
        raise ProfileError("a lukv curve prunes every layer alike; this profile's model has sliding-window layers "
                           f"({', '.join(sorted(set(windows)))}), which HeadKV compresses inside their window")
    if prompt_len <= window + 1:
        raise ProfileError(f"--prompt-length {prompt_len} must exceed the observation window ({window}) + 1")
    scores = profile.kv_scores(reduction)
    compressible = np.ones(scores.shape, dtype=bool)
    compressible[list(profile.layers_without_heads), :] = False
    curve = np.zeros((99,) + scores.shape, dtype=np.float32)
    for t in range(99):
        budget = max(window + 1, round((1 - (t + 1) / 100) * prompt_len))
        kept = headkv(scores, budget, window, prompt_len - window, compressible, beta) + window
        curve[t] = np.where(compressible, 1 - kept / prompt_len, 0.0)
    return curve
