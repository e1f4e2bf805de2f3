"""Score a model's heads on a probe set and build a profile.

Per probe: prefill the prompt minus its last token with plain attention (no capture), then decode
greedily from the last prompt token, capturing one attention row per layer at each step, until the
answer's line ends (or an end token, or `max_new_tokens`); the probe's family (`families/`) turns each
step's top-k (position, weight) pairs per head into score increments, summed over the steps.

Finished probes are appended to a partial file as they complete, so an interrupted run keeps its work
and `resume=True` continues it; per-probe work is deterministic and independent, so a resumed run
gives the same profile as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from headprof.artefacts import profile as profile_mod
from headprof.artefacts.profile import Profile, rounded
from headprof.distributed import World
from headprof.errors import ProbeError, out_of_memory
from headprof.models import LoadedModel, end_tokens
from headprof.partial import PartialRun
from headprof.probing import answers, presets
from headprof.probing import families as fam
from headprof.probing import probes as probes_mod
from headprof.probing.decode import MAX_NEW_TOKENS, Decoder, ProbeJob, ProbeRun, forced_tokens, score_batch
from headprof.probing.haystack import Haystack
from headprof.progress import Callback, Progress

MIN_ANSWERED = 30  # the default target of answered, counted probes for generated probe sets
MAX_DRAWN_FACTOR = 6  # default cap on probes drawn: this many times the target


def check_lengths(probe_set: probes_mod.ProbeSet, max_positions: int, new_tokens: int) -> None:
    if not max_positions:
        return
    for n in probe_set.lengths:
        if n + new_tokens + 16 > max_positions:
            raise ProbeError(f"length {n} does not fit the model: it handles at most {max_positions} positions")


@dataclass(frozen=True)
class Settings:
    """How probes are scored and counted; recorded in the profile and in the partial run's fingerprint."""

    protocol: str
    chat_template: bool = True
    filter_probes: bool = True
    span: str = "fact"  # families.SPANS: the correct-fact sentence, or only the answer value
    max_new_tokens: int = MAX_NEW_TOKENS
    margin: int | None = None  # profiles made before: at most span tokens + margin decode steps
    rule: str | None = None  # answer check (answers.RULES); None: the family's own rule
    min_answered: int | None = None
    max_drawn: int | None = None  # default MAX_DRAWN_FACTOR x min_answered
    teacher_forced: bool = False
    keep_chance: bool = False  # count answered probes of families that stay at chance
    preset: str | None = None  # presets.PRESETS: the official protocol

    def resolved(self, probe_set: probes_mod.ProbeSet, lm: LoadedModel) -> Settings:
        if self.protocol not in fam.PROTOCOLS:
            raise ProbeError(f"unknown scoring method '{self.protocol}' (use {' or '.join(fam.PROTOCOLS)})")
        if self.span not in fam.SPANS:
            raise ProbeError(f"unknown span '{self.span}' (use {' or '.join(fam.SPANS)})")
        if self.min_answered is not None and self.min_answered < 1:
            raise ProbeError(f"--min-answered must be at least 1, got {self.min_answered}")
        if self.max_drawn is not None and self.max_drawn < 1:
            raise ProbeError(f"--max-drawn must be at least 1, got {self.max_drawn}")
        if self.max_new_tokens < 1:
            raise ProbeError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.rule is not None and self.rule not in answers.RULES:
            raise ProbeError(f"unknown answer check '{self.rule}' (use {', '.join(answers.RULES)})")
        cap = self.max_drawn or (MAX_DRAWN_FACTOR * self.min_answered if self.min_answered else None)
        template = self.chat_template and lm.info.chat_template and self.preset is None
        return replace(self, chat_template=template, max_drawn=cap)

    def family(self, probe: probes_mod.Probe, probe_set: probes_mod.ProbeSet) -> fam.Family:
        """The family that scores and checks a probe: its own, the version's only one, or the user's needles."""
        if probe.kind in fam.FAMILIES:
            return fam.FAMILIES[probe.kind]
        if probe_set.preset is None and probe_set.name != "custom":
            return fam.get(fam.for_version(probe_set.family, probe_set.version)[0])
        preset_rule = presets.get(probe_set.preset).rule if probe_set.preset else "answer_f1"
        return fam.UserNeedles(self.protocol, preset_rule, 1 + len(probe.distractors))

    def rule_for(self, family: fam.Family) -> str:
        return self.rule or family.rule

    def decoder(self, lm: LoadedModel, rendered: probes_mod.RenderedProbe, probe: probes_mod.Probe) -> Decoder:
        stops = end_tokens(lm)
        if self.preset is not None:
            preset = presets.get(self.preset)
            answer = None
            if preset.stop_at_answer:
                answer = len(lm.tokenizer(probe.answer, add_special_tokens=False)["input_ids"])
            ends, newlines = presets.stop_ids(lm.tokenizer, lm.model.config, preset)
            return Decoder(lm.tokenizer, ends, self.max_new_tokens, official=True, answer_tokens=answer,
                           newlines=frozenset(newlines))
        start, end = rendered.answer_span
        cap = end - start + self.margin if self.margin is not None else self.max_new_tokens
        return Decoder(lm.tokenizer, stops, cap)

    def params(self, probe_set: probes_mod.ProbeSet) -> dict[str, Any]:
        """The rules as a profile records them (read back by `from_params`)."""
        if self.teacher_forced:
            decode = "the gold answer's tokens, fed (teacher-forced)"
        elif self.margin is not None:
            decode = f"greedy, span tokens + {self.margin}, stopping at a newline or end token"
        elif self.preset is not None:
            preset = presets.get(self.preset)
            decode = (f"greedy, official: stop after a step whose token is '{presets.NEWLINE_TOKEN}' or id "
                      f"{presets.LLAMA2_NEWLINE}" + (", the config's end token, or the answer's token length"
                                                     if preset.end_test else " (no end-token test)")
                      + f", at most {self.max_new_tokens} tokens")
        else:
            decode = (f"greedy, until the answer's line ends (a line ending in ':' goes on) or an end token, at most "
                      f"{self.max_new_tokens} tokens")
        rules = sorted({self.rule_for(self.family(p, probe_set)) for p in probe_set.probes})
        rule = rules[0] if len(rules) == 1 else ",".join(rules)
        prompt = ("raw, official: context + 'Based on the content of the book, Question: ...\\nAnswer:'"
                  if self.preset else "chat template, question after the context" if self.chat_template
                  else "raw, question after the context")
        return {"span": self.span if self.preset is None else "real_needle (token overlap)",
                "topk": self.family(probe_set.probes[0], probe_set).topk_rule if probe_set.probes else None,
                "decode": decode, "max_new_tokens": self.max_new_tokens,
                **({"margin": self.margin} if self.margin is not None else {}),
                "greedy": not self.teacher_forced, "teacher_forced": self.teacher_forced,
                "success_metric": rule, "success_rule": "; ".join(answers.RULES[r][1] for r in rules),
                "success_threshold": answers.THRESHOLD, "filter": self.filter_probes,
                "keep_chance_families": self.keep_chance, "chat_template": self.chat_template,
                "prompt": prompt, **({"preset": self.preset} if self.preset else {}),
                "aggregate": "per probe: sum over decode steps; profile: mean over counted probes"}

    @classmethod
    def from_params(cls, protocol: str, params: dict[str, Any]) -> Settings:
        """The settings a profile records (older profiles: the value span and answer tokens + margin)."""
        legacy = "span" not in params
        rule = params.get("success_metric")
        return cls(protocol, params.get("chat_template", True), params.get("filter", True),
                   span="value" if legacy else ("fact" if params["span"] not in fam.SPANS else params["span"]),
                   max_new_tokens=int(params.get("max_new_tokens", MAX_NEW_TOKENS)),
                   margin=params.get("margin", 10) if legacy else params.get("margin"),
                   rule=rule if rule in answers.RULES else None, teacher_forced=params.get("teacher_forced", False),
                   keep_chance=params.get("keep_chance_families", legacy), preset=params.get("preset"))


def _fingerprint(lm: LoadedModel, probe_set: probes_mod.ProbeSet, s: Settings) -> dict[str, Any]:
    return {"model": lm.info.resolved, "weights_sha256": lm.info.weights_sha256, "revision": lm.info.revision,
            "method": s.protocol, "decode": s.params(probe_set)["decode"], "probe_set": probe_set.hash,
            "chat_template": s.chat_template, "span": s.span,
            "max_new_tokens": s.max_new_tokens, "margin": s.margin, "dtype": lm.dtype, "device": lm.device,
            "rule": s.rule, "min_answered": s.min_answered, "max_drawn": s.max_drawn,
            "teacher_forced": s.teacher_forced, "keep_chance": s.keep_chance, "preset": s.preset,
            "drawing": DRAWING_RULE if s.min_answered is not None else None}


def probe_job(lm: LoadedModel, probe: probes_mod.Probe, probe_set: probes_mod.ProbeSet,
              haystack: Haystack | presets.Folder, s: Settings) -> ProbeJob:
    """A probe rendered for the model, with the family, decoder and fed tokens its settings give it."""
    if isinstance(haystack, presets.Folder):
        rendered = presets.render(probe, lm.tokenizer, haystack, presets.get(probe_set.preset or ""))
    else:
        rendered = probes_mod.render(probe, lm.tokenizer, haystack, s.chat_template, s.span)
    forced = forced_tokens(lm.tokenizer, probe.answer) if s.teacher_forced else None
    return ProbeJob(rendered, s.family(probe, probe_set), s.decoder(lm, rendered, probe), forced)


def probe_record(probe: probes_mod.Probe, job: ProbeJob, run: ProbeRun, s: Settings) -> dict[str, Any]:
    """One probe's record: response, answer check, why decoding stopped, per-head scores."""
    fact = probe.fact or probe.as_needle().fact_sentence
    ok, metric = answers.check(s.rule_for(job.family), run.response, probe.answer, fact, probe.distractors)
    if s.teacher_forced:
        ok, metric = run.followed, float(run.followed)
    return {"id": probe.id, "success": ok, "metric": round(metric, 6), "response": run.response, "stop": run.stop,
            "steps": run.steps, "tokens": len(job.rendered.input_ids), "answer_span": list(job.rendered.answer_span),
            "scores": rounded(run.scores)}


# Probes scored together when `--batch-size` is not given, on every device. On 2 CPU cores 8 was the fastest of
# 1, 4 and 8 (a decode step costs about the same for one sequence as for eight); on a GPU a lone sequence
# leaves the device idle, and a batch that runs out of memory is halved (benchmarks/bench_score.py).
BATCH_SIZE = 8




Work = tuple[probes_mod.Probe, ProbeJob]


def run_probes(lm: LoadedModel, work: list[Work], s: Settings, on_done: Callable[[dict[str, Any]], None]) -> None:
    """Score `work` as one batch; `on_done` gets each probe's record as soon as that probe is finished."""
    score_batch(lm, [job for _, job in work], lambda i, run: on_done(probe_record(*work[i], run, s)))


def batches(work: list[Work], size: int) -> list[list[Work]]:
    """`work` grouped by prompt length (little padding), at most `size` probes per batch."""
    ordered = sorted(work, key=lambda w: len(w[1].rendered.input_ids))
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]




def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a rate (95% by default)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# While rounds are drawn, a family stays in the draw while the upper end of its 80% interval reaches
# DRAW_FACTOR times chance: a family answered at 1.5x chance (50% of three candidates) clears chance at 95%
# after about 36 probes; one that is surely below that rate would need far more than a run draws.
DRAW_FACTOR = 1.5
DRAWING_RULE = f"a family is drawn again while the upper end of its 80% interval reaches {DRAW_FACTOR}x chance"


def family_stats(rows: list[dict[str, Any]], chances: dict[str, float | None]) -> dict[str, dict[str, Any]]:
    """Per family: drawn, answered, the answered rate with its 95% interval, chance, and whether the
    family is clearly above chance (the interval's lower end above it) and still worth drawing."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        f = out.setdefault(r["kind"], {"drawn": 0, "answered": 0, "capped_failures": 0})
        f["drawn"] += 1
        f["answered"] += bool(r["success"])
        f["capped_failures"] += (not r["success"]) and r.get("stop") == "cap"
    for name, f in out.items():
        chance = chances.get(name)
        lo, hi = wilson(f["answered"], f["drawn"])
        rate = f["answered"] / f["drawn"]
        f.update(chance=None if chance is None else round(chance, 4), answered_rate=round(rate, 4),
                 interval=[round(lo, 4), round(hi, 4)], above_chance=chance is None or lo > chance,
                 drawing=chance is None or wilson(f["answered"], f["drawn"], 1.2816)[1] >= DRAW_FACTOR * chance)
    return out


def _kind(probe: probes_mod.Probe, probe_set: probes_mod.ProbeSet, s: Settings) -> tuple[str, float | None]:
    family = s.family(probe, probe_set)
    return probe.kind or family.name, family.chance


def score(lm: LoadedModel, probe_set: probes_mod.ProbeSet, settings: Settings | str,
          haystack: Haystack | presets.Folder, partial: Path | None = None, resume: bool = False,
          progress: Callback | None = None, world: World | None = None, batch_size: int | None = None,
          notice: Callable[[str], None] | None = None) -> Profile:
    """Run every probe (and, for `min_answered`, further rounds) and return the profile.

    See the module docstring for partial/resume. With `min_answered`, whole rounds of the grid are drawn
    until that many answered probes count (families clearly above chance), at most `max_drawn`; a family
    that stays at chance is no longer drawn. Launched over several processes (`world`), each runs every
    size-th probe of a round and keeps its own partial file; results are gathered after each round, so
    every process returns the same profile as a single process would.

    Each process scores its probes `batch_size` at a time (default: `BATCH_SIZE`), grouped by
    length; the profile does not depend on it. A batch that runs out of memory is halved and retried
    (probes it finished are kept), and `notice` hears of it once.
    """
    world = world or World()
    if batch_size is not None and batch_size < 1:
        raise ProbeError(f"--batch-size must be at least 1, got {batch_size}")
    s = (Settings(settings) if isinstance(settings, str) else settings).resolved(probe_set, lm)
    if s.preset is not None and lm.dtype in ("bfloat16", "float16"):
        batch_size = 1  # the scripts run one probe at a time, and in half precision a batch rounds otherwise
    size = batch_size or BATCH_SIZE
    check_lengths(probe_set, lm.info.max_positions, s.max_new_tokens)
    fingerprint = {**_fingerprint(lm, probe_set, s), "processes": world.size, "rank": world.rank}
    kept = PartialRun(partial, fingerprint, resume, "id", "model, method, probes, dtype or device")
    done = kept.done
    resumed = len(done)
    rounds = [probe_set]
    try:
        while True:
            drawn = [p for r in rounds for p in r.probes]
            mine = [p for r in rounds for p in world.shard(list(r.probes))]
            batch = world.shard(list(rounds[-1].probes))  # this process's share of the newest round

            def report(mine: list[probes_mod.Probe] = mine) -> None:
                if progress is not None:  # this process's share of the probes
                    progress(Progress(sum(p.id in done for p in mine), len(mine),
                                      sum(done[p.id]["success"] for p in mine if p.id in done), resumed))

            def keep(record: dict[str, Any]) -> None:
                kept.add(record)
                report()

            if any(p.id in done for p in mine):  # a resumed run shows its work at once
                report()
            work = [(p, probe_job(lm, p, probe_set, haystack, s)) for p in batch if p.id not in done]
            queue = batches(work, size)
            while queue:
                chunk = queue.pop(0)
                try:
                    run_probes(lm, chunk, s, keep)
                except (torch.OutOfMemoryError, RuntimeError) as e:
                    if not out_of_memory(e):
                        raise
                    if len(chunk) == 1:
                        raise ProbeError(f"out of memory scoring probe {chunk[0][0].id} "
                                         f"({len(chunk[0][1].rendered.input_ids)} tokens) on its own: use shorter "
                                         "--lengths, --dtype bfloat16 or --device-map auto; finished probes are "
                                         "kept (--resume)") from None
                    if notice is not None and size == (batch_size or BATCH_SIZE):
                        notice(f"out of memory on {len(chunk)} probes at once: halving the batch until it fits "
                               "(finished probes are kept)")
                    size = max(1, len(chunk) // 2)
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    queue = batches([w for c in [chunk, *queue] for w in c if w[0].id not in done], size)
            if world.size > 1:
                for part in world.gather([done[p.id] for p in batch]):
                    done.update((r["id"], r) for r in part)
            if s.min_answered is None or len(drawn) >= (s.max_drawn or 0):
                break
            kinds = {p.id: _kind(p, probe_set, s) for p in drawn}
            stats = family_stats([{**done[p.id], "kind": kinds[p.id][0]} for p in drawn],
                                 dict(kinds.values()))
            counted = sum(done[p.id]["success"] and (s.keep_chance or stats[kinds[p.id][0]]["above_chance"])
                          for p in drawn)
            active = [f for f in (probe_set.families or ()) if stats.get(f, {}).get("drawing", True)]
            if counted >= s.min_answered or (probe_set.families and not active):
                break
            rounds.append(probe_set.redraw(len(rounds), active or None))
    finally:
        kept.close()
    full_set = probe_set.joined(rounds[1:])
    prof = build_profile(lm, full_set, [done[p.id] for p in full_set.probes], s)
    prof.environment["processes"] = world.size
    prof.environment["batch_size"] = batch_size or BATCH_SIZE
    if size < prof.environment["batch_size"]:
        prof.environment["batch_size_after_out_of_memory"] = size
    return prof


FEW_COUNTED = 20  # a rule of thumb: fewer counted probes make a noisy profile


def build_profile(lm: LoadedModel, probe_set: probes_mod.ProbeSet, results: list[dict[str, Any]],
                  settings: Settings) -> Profile:
    s = settings
    layout = lm.info.layout
    by_id = {p.id: p for p in probe_set.probes}
    kinds = {p.id: _kind(p, probe_set, s) for p in probe_set.probes}
    stats = family_stats([{**r, "kind": kinds[r["id"]][0]} for r in results], dict(kinds.values()))
    filtering = s.filter_probes and not s.teacher_forced
    luck = [k for k, f in stats.items() if not f["above_chance"]] if filtering and not s.keep_chance else []

    def counts(r: dict[str, Any]) -> bool:
        return bool(r["success"]) and kinds[r["id"]][0] not in luck

    # A model that answers no probe would get an all-zero profile; count every probe instead, and say so.
    fallback = filtering and not any(counts(r) for r in results)
    counting = ("every probe (teacher-forced)" if s.teacher_forced else "every probe" if not filtering else
                "every probe: none was answered correctly above chance, so the filter was dropped" if fallback
                else "answered probes of families above chance" if luck or any(f["chance"] for f in stats.values())
                else "answered probes only")
    probe_rows = [{**r, "counted": bool(counts(r) or not filtering or fallback),
                   **{k: v for k, v in by_id[r["id"]].to_dict().items() if k != "id"}} for r in results]
    counted = [r["scores"] for r in probe_rows if r["counted"]]
    for name, f in stats.items():
        f["counted"] = sum(r["counted"] for r in probe_rows if kinds[r["id"]][0] == name)
        f["left_out_at_chance"] = name in luck
    query = (np.mean(np.asarray(counted, dtype=float), axis=0) if counted
             else np.zeros((layout.num_layers, layout.num_query_heads)))
    answered = sum(r["success"] for r in probe_rows)
    capped = sum((not r["success"]) and r.get("stop") == "cap" for r in probe_rows)
    warnings = []
    target = None
    for name in luck:
        f = stats[name]
        warnings_note = (f"{name}: {f['answered']} of {f['drawn']} answered ({f['answered_rate']:.0%}, 95% interval "
                         f"{f['interval'][0]:.0%}-{f['interval'][1]:.0%}) is not clearly above chance "
                         f"({f['chance']:.0%}); its probes are not counted (--keep-chance-families counts them)")
        if f["answered"]:
            warnings.append(warnings_note)
    if s.min_answered is not None:
        target = {"min_answered": s.min_answered, "max_drawn": s.max_drawn,
                  "reached": len(counted) >= s.min_answered and not fallback, "drawing": DRAWING_RULE}
        if not target["reached"]:
            warnings.append(f"only {len(counted) if not fallback else 0} of the {s.min_answered} counted probes "
                            f"asked for: drawing stopped after {len(probe_rows)} probes (the cap is {s.max_drawn}, "
                            "and families at chance are not drawn again)")
    elif fallback:
        warnings.append(f"no probe of {len(probe_rows)} was answered above chance, so every probe was counted: the "
                        "scores show where the model looked while failing (docs/profiles.md)")
    elif filtering and len(counted) < FEW_COUNTED:
        warnings.append(f"only {len(counted)} of {len(probe_rows)} probes were answered and counted: a noisy "
                        f"profile; --min-answered 30 draws more until 30 are (docs/profiles.md)")
    return profile_mod.build(
        {**lm.info.to_dict()}, s.protocol, {**s.params(probe_set), "counted_probes": counting},
        {**probe_set.header(), "successes": answered, "counted": len(counted), "capped_failures": capped,
         "by_family": stats, **({"target": target} if target else {})},
        probe_rows, query, environment(lm), warnings=warnings)


def environment(lm: LoadedModel) -> dict[str, Any]:
    return profile_mod.provenance(lm.device, lm.dtype, lm.attn_implementation)
