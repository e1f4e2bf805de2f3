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
import re
from dataclasses import dataclass, replace
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
from headprof.distributed import World
from headprof.errors import OutputError, ProbeError
from headprof.files import write_atomic
from headprof.haystack import Haystack
from headprof.models import LoadedModel, with_cache
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


def forced_tokens(tokenizer, answer: str) -> list[int]:
    """The gold answer as the response's first tokens (what `--teacher-forced` feeds)."""
    return list(tokenizer(answer, add_special_tokens=False)["input_ids"])


@torch.no_grad()
def score_probe(lm: LoadedModel, rendered: probes_mod.RenderedProbe, method: str,
                margin: int = DEFAULT_MARGIN, forced: list[int] | None = None) -> tuple[str, np.ndarray, bool]:
    """(response, [layer, head] scores, followed) of one rendered probe.

    Greedy decoding for at most answer tokens + margin steps; or, with `forced` answer tokens, exactly
    those steps with the gold tokens fed (teacher forcing), `followed` saying whether greedy decoding
    would have produced every one of them.
    """
    layout = lm.info.layout
    start, end = rendered.answer_span
    k = scores.topk_for(method, end - start)
    device = lm.model.device
    ids = torch.tensor([rendered.input_ids], device=device)
    cache = DynamicCache()  # full per-layer cache: key index == position, also on sliding layers
    if ids.shape[1] > 1:
        lm.model(ids[:, :-1], **with_cache(lm.model, cache), use_cache=True)
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
    predicted: list[torch.Tensor] = []
    for step in range(len(forced) if forced is not None else end - start + margin):
        with AttentionCapture(sink):
            logits = lm.model(step_input, **with_cache(lm.model, cache), use_cache=True).logits
        if forced is not None:  # no host sync: whether greedy agrees is read once at the end
            predicted.append(logits[0, -1].argmax())
            token = forced[step]
        else:
            token = int(logits[0, -1].argmax())
        if method == "retrieval":
            total += scores.retrieval_step(top_idx, tokens, token, (start, end))
        else:
            total += scores.r2_step(top_vals, top_idx, (start, end))
        if forced is None and answer_done(lm.tokenizer, token, generated, stops):
            break
        tokens = torch.cat([tokens, torch.tensor([token], device=device)])
        step_input = torch.tensor([[token]], device=device)
    if forced is not None:
        followed = bool(torch.equal(torch.stack(predicted).cpu(), torch.tensor(forced))) if forced else False
        return lm.tokenizer.decode(forced, skip_special_tokens=True).strip(), total.double().cpu().numpy(), followed
    response = lm.tokenizer.decode(generated, skip_special_tokens=True).strip()
    return response, total.double().cpu().numpy(), True


def check_lengths(probe_set: probes_mod.ProbeSet, max_positions: int, margin: int) -> None:
    if not max_positions:
        return
    for n in probe_set.lengths:
        if n + margin + 16 > max_positions:
            raise ProbeError(f"length {n} does not fit the model: it handles at most {max_positions} positions")


@dataclass(frozen=True)
class Settings:
    """How probes are scored and counted; recorded in the profile and in the partial run's fingerprint."""

    method: str
    chat_template: bool = True
    filter_probes: bool = True
    margin: int = DEFAULT_MARGIN
    rule: str | None = None  # answer check (scores.RULES); None: the method's default for the probe set
    min_answered: int | None = None
    max_drawn: int | None = None  # default 4 x min_answered
    teacher_forced: bool = False

    def resolved(self, probe_set: probes_mod.ProbeSet, lm: LoadedModel) -> Settings:
        if self.method not in scores.METHODS:
            raise ProbeError(f"unknown scoring method '{self.method}' (use {' or '.join(scores.METHODS)})")
        if self.min_answered is not None and self.min_answered < 1:
            raise ProbeError(f"--min-answered must be at least 1, got {self.min_answered}")
        if self.max_drawn is not None and self.max_drawn < 1:
            raise ProbeError(f"--max-drawn must be at least 1, got {self.max_drawn}")
        legacy = self.method == "r2" and probe_set.version == "1"
        rule = self.rule or ("token_f1" if legacy else scores.DEFAULT_RULE[self.method])
        if rule not in scores.RULES:
            raise ProbeError(f"unknown answer check '{rule}' (use {', '.join(scores.RULES)})")
        cap = self.max_drawn or (4 * self.min_answered if self.min_answered else None)
        return replace(self, chat_template=self.chat_template and lm.info.chat_template, rule=rule, max_drawn=cap)


def _fingerprint(lm: LoadedModel, probe_set: probes_mod.ProbeSet, s: Settings) -> dict[str, Any]:
    return {"model": lm.info.resolved, "weights_sha256": lm.info.weights_sha256, "revision": lm.info.revision,
            "method": s.method, "probe_set": probe_set.hash, "chat_template": s.chat_template, "margin": s.margin,
            "dtype": lm.dtype, "device": lm.device, "rule": s.rule, "min_answered": s.min_answered,
            "max_drawn": s.max_drawn, "teacher_forced": s.teacher_forced}


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


def partial_path_for(out: Path, world: World | None = None) -> Path:
    """Where finished probes are kept while `out` is made: one file per process."""
    if world is None or world.size == 1:
        return out.with_name(out.name + ".partial.jsonl")
    return out.with_name(f"{out.name}.partial.rank{world.rank}of{world.size}.jsonl")


def foreign_partials(out: Path, world: World) -> list[Path]:
    """Partial files of `out` left by a run with another number of processes (never mixed in silently)."""
    mine = re.compile(re.escape(out.name) + (r"\.partial\.jsonl" if world.size == 1
                                            else rf"\.partial\.rank\d+of{world.size}\.jsonl"))
    return sorted(p for p in out.parent.glob(out.name + ".partial*.jsonl") if not mine.fullmatch(p.name))


def run_probe(lm: LoadedModel, probe: probes_mod.Probe, haystack: Haystack, s: Settings) -> dict[str, Any]:
    """One probe's record: response, answer check, per-head scores."""
    rendered = probes_mod.render(probe, lm.tokenizer, haystack, s.chat_template)
    forced = forced_tokens(lm.tokenizer, probe.answer) if s.teacher_forced else None
    response, head_scores, followed = score_probe(lm, rendered, s.method, s.margin, forced)
    assert s.rule is not None
    ok, metric = scores.answer_check(s.rule, response, probe.answer, probe.distractors)
    if s.teacher_forced:
        ok, metric = followed, float(followed)
    return {"id": probe.id, "success": ok, "metric": round(metric, 6), "response": response,
            "tokens": len(rendered.input_ids), "answer_span": list(rendered.answer_span),
            "scores": rounded(head_scores)}


def score(lm: LoadedModel, probe_set: probes_mod.ProbeSet, settings: Settings | str, haystack: Haystack,
          partial: Path | None = None, resume: bool = False, progress: Callback | None = None,
          world: World | None = None) -> Profile:
    """Run every probe (and, for `min_answered`, further rounds) and return the profile.

    See the module docstring for partial/resume. Launched over several processes (`world`), each runs
    every size-th probe of a round and keeps its own partial file; results are gathered after each
    round, so every process returns the same profile as a single process would.
    """
    world = world or World()
    s = (Settings(settings) if isinstance(settings, str) else settings).resolved(probe_set, lm)
    check_lengths(probe_set, lm.info.max_positions, s.margin)
    fingerprint = {**_fingerprint(lm, probe_set, s), "processes": world.size, "rank": world.rank}
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
    rounds = [probe_set]
    try:
        while True:
            drawn = [p for r in rounds for p in r.probes]
            mine = [p for r in rounds for p in world.shard(list(r.probes))]
            batch = world.shard(list(rounds[-1].probes))  # this process's share of the newest round
            for probe in batch:
                if probe.id not in done:
                    done[probe.id] = run_probe(lm, probe, haystack, s)
                    if writer is not None:
                        writer.write(json.dumps(done[probe.id]) + "\n")
                        writer.flush()
                        os.fsync(writer.fileno())
                if progress is not None:  # this process's share of the probes
                    progress(Progress(sum(p.id in done for p in mine), len(mine),
                                      sum(done[p.id]["success"] for p in mine if p.id in done), resumed))
            if world.size > 1:
                for part in world.gather([done[p.id] for p in batch]):
                    done.update((r["id"], r) for r in part)
            answered = sum(done[p.id]["success"] for p in drawn)
            if s.min_answered is None or answered >= s.min_answered or len(drawn) >= (s.max_drawn or 0):
                break
            rounds.append(probe_set.redraw(len(rounds)))
    finally:
        if writer is not None:
            writer.close()
    full_set = probe_set.joined(rounds[1:])
    prof = build_profile(lm, full_set, [done[p.id] for p in full_set.probes], s)
    prof.data["environment"]["processes"] = world.size
    return prof


def _by_family(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per r2 family: drawn, answered, counted, and the chance of answering by luck."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        f = out.setdefault(r.get("kind") or r.get("family") or "probes",
                           {"drawn": 0, "answered": 0, "counted": 0, "candidates": 0})
        f["drawn"] += 1
        f["answered"] += bool(r["success"])
        f["counted"] += bool(r["counted"])
        f["candidates"] = max(f["candidates"], 1 + len(r.get("distractors") or ([1] if r.get("distractor") else [])))
    for f in out.values():
        f["chance"] = round(1 / f.pop("candidates"), 4) if f["candidates"] > 1 else None
        f["answered_rate"] = round(f["answered"] / f["drawn"], 4)
    return out


FEW_COUNTED = 20  # a rule of thumb: fewer counted probes make a noisy profile (shipped r2 ones count 36-41)


def build_profile(lm: LoadedModel, probe_set: probes_mod.ProbeSet, results: list[dict[str, Any]],
                  settings: Settings) -> Profile:
    s = settings
    layout = lm.info.layout
    by_id = {p.id: p for p in probe_set.probes}
    filtering = s.filter_probes and not s.teacher_forced
    # A model that answers no probe would get an all-zero profile; count every probe instead, and say so.
    fallback = filtering and not any(r["success"] for r in results)
    counting = ("every probe (teacher-forced)" if s.teacher_forced else "every probe" if not filtering else
                "every probe: none was answered correctly, so the filter was dropped" if fallback
                else "answered probes only")
    probe_rows = [{**r, "counted": bool(r["success"] or not filtering or fallback),
                   **{k: v for k, v in by_id[r["id"]].to_dict().items() if k != "id"}} for r in results]
    counted = [r["scores"] for r in probe_rows if r["counted"]]
    query = (np.mean(np.asarray(counted, dtype=float), axis=0) if counted
             else np.zeros((layout.num_layers, layout.num_query_heads)))
    answered = sum(r["success"] for r in probe_rows)
    warnings = []
    target = None
    if s.min_answered is not None:
        target = {"min_answered": s.min_answered, "max_drawn": s.max_drawn, "reached": answered >= s.min_answered}
        if not target["reached"]:
            warnings.append(f"only {answered} of the {s.min_answered} answered probes asked for: the cap of "
                            f"{s.max_drawn} drawn probes was reached ({len(probe_rows)} drawn)")
    elif fallback:
        warnings.append(f"no probe of {len(probe_rows)} was answered, so every probe was counted: the scores show "
                        "where the model looked while failing (docs/profiles.md)")
    elif filtering and len(counted) < FEW_COUNTED:
        warnings.append(f"only {len(counted)} of {len(probe_rows)} probes were answered and counted: a noisy "
                        f"profile; --min-answered 30 draws more until 30 are (docs/profiles.md)")
    data = {
        "schema_version": SCHEMA_VERSION,
        "headprof_version": headprof.__version__,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {**lm.info.to_dict()},
        "method": {"name": s.method, "params": {
            "decode_steps": "answer tokens (teacher-forced)" if s.teacher_forced else f"answer tokens + {s.margin}",
            "margin": s.margin, "greedy": not s.teacher_forced, "teacher_forced": s.teacher_forced,
            "topk": 1 if s.method == "retrieval" else "answer tokens",
            "success_metric": s.rule, "success_rule": scores.RULES[s.rule or ""],
            "success_threshold": scores.SUCCESS_THRESHOLD,
            "filter": s.filter_probes, "counted_probes": counting, "chat_template": s.chat_template,
            "aggregate": "mean over counted probes"}},
        "probe_set": {**probe_set.header(), "successes": answered, "counted": len(counted),
                      "by_family": _by_family(probe_rows), **({"target": target} if target else {})},
        "probes": probe_rows,
        "scores": {"query": rounded(query), "kv": Profile.kv_reduce(query, layout.num_kv_heads)},
        "environment": environment(lm),
        **({"warnings": warnings} if warnings else {}),
    }
    return Profile(data)


def environment(lm: LoadedModel) -> dict[str, Any]:
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "device": lm.device,
            "dtype": lm.dtype, "attn_implementation": lm.attn_implementation}
