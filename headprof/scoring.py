"""Score a model's heads on a probe set and build a profile.

Per probe: prefill the prompt minus its last token with plain attention (no capture), then decode
greedily, capturing one attention row per layer at each step, for at most answer tokens + margin
steps. Only top-k (position, weight) pairs per head are kept from each row.

Finished probes are appended to a partial file as they complete, so an interrupted run keeps its work
and `resume=True` continues it; per-probe work is deterministic and independent, so a resumed run
gives the same profile as an uninterrupted one.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import DynamicCache

import headprof
from headprof import probes as probes_mod
from headprof import scores
from headprof.capture import AttentionCapture
from headprof.errors import OutputError, ProbeError
from headprof.files import write_atomic
from headprof.haystack import Haystack
from headprof.models import LoadedModel
from headprof.profile import SCHEMA_VERSION, Profile, rounded
from headprof.progress import Callback, Progress

DEFAULT_MARGIN = 10


def answer_done(tokenizer, token: int, generated: list[int], stops: set[int]) -> bool:
    """Greedy decoding of an answer stops at an end token, or at a newline once some text exists.
    Appends `token` to `generated` unless it is an end token."""
    if token in stops:
        return True
    generated.append(token)
    return "\n" in tokenizer.decode([token]) and bool(tokenizer.decode(generated).strip())


def stop_token_ids(lm: LoadedModel) -> set[int]:
    ids = {lm.tokenizer.eos_token_id}
    gen = getattr(lm.model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos])
    return {i for i in ids if i is not None}


@torch.no_grad()
def score_probe(lm: LoadedModel, rendered: probes_mod.RenderedProbe, method: str,
                margin: int = DEFAULT_MARGIN) -> tuple[str, np.ndarray]:
    """(response, [layer, head] scores) of one rendered probe."""
    layout = lm.info.layout
    start, end = rendered.answer_span
    k = scores.topk_for(method, end - start)
    device = lm.model.device
    ids = torch.tensor([rendered.input_ids], device=device)
    cache = DynamicCache()  # full per-layer cache: key index == position, also on sliding layers
    if ids.shape[1] > 1:
        lm.model(ids[:, :-1], past_key_values=cache, use_cache=True)
    tokens = ids[0].clone()
    step_input = ids[:, -1:]
    top_vals = torch.zeros(layout.num_layers, layout.num_query_heads, k, device=device)
    top_idx = torch.zeros(layout.num_layers, layout.num_query_heads, k, dtype=torch.long, device=device)

    def sink(layer: int, probs: torch.Tensor) -> None:
        kk = min(k, probs.shape[-1])
        v, i = probs[0, :, -1, :].topk(kk, dim=-1)
        top_vals[layer, :, :kk], top_idx[layer, :, :kk] = v, i

    total = torch.zeros(layout.num_layers, layout.num_query_heads, device=device)
    stops = stop_token_ids(lm)
    generated: list[int] = []
    for _ in range(end - start + margin):
        with AttentionCapture(sink):
            logits = lm.model(step_input, past_key_values=cache, use_cache=True).logits
        token = int(logits[0, -1].argmax())
        if method == "retrieval":
            total += scores.retrieval_step(top_idx, tokens, token, (start, end))
        else:
            total += scores.r2_step(top_vals, top_idx, (start, end))
        if answer_done(lm.tokenizer, token, generated, stops):
            break
        tokens = torch.cat([tokens, torch.tensor([token], device=device)])
        step_input = torch.tensor([[token]], device=device)
    response = lm.tokenizer.decode(generated, skip_special_tokens=True).strip()
    return response, total.double().cpu().numpy()


def check_lengths(probe_set: probes_mod.ProbeSet, max_positions: int, margin: int) -> None:
    if not max_positions:
        return
    for n in probe_set.lengths:
        if n + margin + 16 > max_positions:
            raise ProbeError(f"length {n} does not fit the model: it handles at most {max_positions} positions")


def _fingerprint(lm: LoadedModel, probe_set: probes_mod.ProbeSet, method: str, chat_template: bool,
                 margin: int) -> dict[str, Any]:
    return {"model": lm.info.resolved, "weights_sha256": lm.info.weights_sha256, "revision": lm.info.revision,
            "method": method, "probe_set": probe_set.hash, "chat_template": chat_template, "margin": margin,
            "dtype": lm.dtype, "device": lm.device}


def _read_partial(path: Path, fingerprint: dict[str, Any]) -> dict[str, dict[str, Any]]:
    done: dict[str, dict[str, Any]] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        return done
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError:
        raise OutputError(f"partial run {path} is unreadable; remove it or pass --force") from None
    if header.get("run") != fingerprint:
        raise OutputError(f"partial run {path} was made with other settings (model, method, probes, dtype "
                          "or device); remove it or pass --force to start over")
    for line in lines[1:]:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            break  # the run was killed while writing this line; that probe is redone
        done[r["id"]] = r
    return done


def partial_path_for(out: Path) -> Path:
    return out.with_name(out.name + ".partial.jsonl")


def score(lm: LoadedModel, probe_set: probes_mod.ProbeSet, method: str, haystack: Haystack,
          chat_template: bool = True, filter_probes: bool = True, margin: int = DEFAULT_MARGIN,
          partial: Path | None = None, resume: bool = False,
          progress: Callback | None = None) -> Profile:
    """Run every probe and return the profile. See the module docstring for partial/resume."""
    if method not in scores.METHODS:
        raise ProbeError(f"unknown scoring method '{method}' (use {' or '.join(scores.METHODS)})")
    check_lengths(probe_set, lm.info.max_positions, margin)
    use_template = chat_template and lm.info.chat_template
    fingerprint = _fingerprint(lm, probe_set, method, use_template, margin)
    done: dict[str, dict[str, Any]] = {}
    if partial is not None and partial.exists():
        if not resume:
            raise OutputError(f"a partial run exists at {partial}; pass --resume to continue it or --force "
                              "to start over")
        done = _read_partial(partial, fingerprint)
    resumed = len(done)
    writer = None
    if partial is not None:  # rewrite cleanly: a line cut off by a kill must not absorb the next one
        lines = [json.dumps({"run": fingerprint})] + [json.dumps(r) for r in done.values()]
        write_atomic(partial, "\n".join(lines) + "\n", force=True)
        writer = partial.open("a", encoding="utf-8")
    try:
        for probe in probe_set.probes:
            if probe.id not in done:
                rendered = probes_mod.render(probe, lm.tokenizer, haystack, use_template)
                response, head_scores = score_probe(lm, rendered, method, margin)
                ok, metric = scores.answer_check(method, response, probe.answer)
                done[probe.id] = {"id": probe.id, "success": ok, "metric": round(metric, 6),
                                  "response": response, "tokens": len(rendered.input_ids),
                                  "answer_span": list(rendered.answer_span), "scores": rounded(head_scores)}
                if writer is not None:
                    writer.write(json.dumps(done[probe.id]) + "\n")
                    writer.flush()
                    os.fsync(writer.fileno())
            if progress is not None:
                progress(Progress(len(done), len(probe_set.probes),
                                  sum(r["success"] for r in done.values()), resumed))
    finally:
        if writer is not None:
            writer.close()
    return build_profile(lm, probe_set, method, [done[p.id] for p in probe_set.probes],
                         use_template, filter_probes, margin)


def build_profile(lm: LoadedModel, probe_set: probes_mod.ProbeSet, method: str,
                  results: list[dict[str, Any]], chat_template: bool, filter_probes: bool,
                  margin: int) -> Profile:
    layout = lm.info.layout
    by_id = {p.id: p for p in probe_set.probes}
    # A model that answers no probe would get an all-zero profile; count every probe instead, and say so.
    fallback = filter_probes and not any(r["success"] for r in results)
    counting = "every probe" if not filter_probes else (
        "every probe: none was answered correctly, so the filter was dropped" if fallback
        else "answered probes only")
    probe_rows = []
    for r in results:
        p = by_id[r["id"]]
        probe_rows.append({**r, "counted": bool(r["success"] or not filter_probes or fallback),
                           "length": p.length,
                           "depth": p.depth, "needle": p.needle, "question": p.question, "answer": p.answer,
                           "distractor": p.distractor})
    counted = [r["scores"] for r in probe_rows if r["counted"]]
    query = (np.mean(np.asarray(counted, dtype=float), axis=0) if counted
             else np.zeros((layout.num_layers, layout.num_query_heads)))
    metric_name = scores.SUCCESS[method][0]
    data = {
        "schema_version": SCHEMA_VERSION,
        "headprof_version": headprof.__version__,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {**lm.info.to_dict()},
        "method": {"name": method, "params": {
            "decode_steps": f"answer tokens + {margin}", "margin": margin, "greedy": True,
            "topk": 1 if method == "retrieval" else "answer tokens",
            "success_metric": metric_name, "success_threshold": scores.SUCCESS_THRESHOLD,
            "filter": filter_probes, "counted_probes": counting, "chat_template": chat_template,
            "aggregate": "mean over counted probes"}},
        "probe_set": {**probe_set.header(), "successes": sum(r["success"] for r in probe_rows),
                      "counted": len(counted)},
        "probes": probe_rows,
        "scores": {"query": rounded(query), "kv": Profile.kv_reduce(query, layout.num_kv_heads)},
        "environment": environment(lm),
    }
    return Profile(data)


def environment(lm: LoadedModel) -> dict[str, Any]:
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "device": lm.device,
            "dtype": lm.dtype, "attn_implementation": lm.attn_implementation}
