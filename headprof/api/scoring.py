"""Scoring a model's heads into a profile, and checking a profile against a fresh scoring run (`check`)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from headprof import distributed
from headprof import partial as partial_mod
from headprof.api.common import _load_on_every_process, load_model
from headprof.artefacts import compare
from headprof.artefacts import profile as profile_mod
from headprof.artefacts.profile import Profile
from headprof.errors import HeadprofError, NothingAnswered
from headprof.files import check_output
from headprof.models import LoadedModel
from headprof.probing import presets, probes, scoring
from headprof.progress import Callback

CPU_LENGTH = 2000  # the longest default probe on CPU (small models answer r2 probes less often beyond)


def probe_set(method: str = "r2", lengths: Sequence[int] | None = None, depths: int = 10, seed: int = 0,
              needles: Path | None = None, haystack: Path | None = None, max_positions: int = 0,
              on_gpu: bool = False, families: str | Sequence[str] | None = None,
              version: str | None = None) -> tuple[probes.ProbeSet, probes.Haystack]:
    """The probe grid lengths x depths (default lengths: five up to 2000 tokens on CPU, 32000 on GPU).

    r2 probes mix the graded `families` (families.R2_FAMILIES, default all); `version` rebuilds an older
    probe-set version (families.VERSIONS). `haystack`: a text file, or `Path("essays")` for the Paul
    Graham essays of an installed package."""
    hs = probes.Haystack(seed, haystack)
    user_needles = probes.load_needles(needles, method) if needles else None
    if user_needles and families is not None:
        raise HeadprofError("--families draws generated probes; it cannot be used with --needles")
    lens = list(lengths) if lengths else probes.default_lengths(max_positions, cap=32000 if on_gpu else CPU_LENGTH)
    return probes.build_probe_set(method, lens, depths, seed, user_needles, hs, version=version, families=families), hs


def preset_probe_set(preset: str, folder: Path | None, lengths: Sequence[int] | None, depths: int | None,
                     max_positions: int) -> tuple[probes.ProbeSet, presets.Folder]:
    """An official protocol's probe grid over a needles folder in the official layout."""
    p = presets.get(preset)
    if folder is None:
        raise HeadprofError(f"--preset {preset} reads its needles from a folder: pass --haystack DIR (with "
                            "DIR/needles.jsonl and DIR/part0/, ...)")
    f = presets.Folder(folder, p)
    lens = list(lengths) if lengths else presets.official_lengths(max_positions)
    return presets.probe_set(f, p, lens, 10 if depths is None else depths), f


def default_profile_path(spec: str, method: str) -> Path:
    """profiles/MODEL/METHOD.json, MODEL a file-system-safe name of the spec."""
    name = Path(spec).stem if spec.endswith(".gguf") else spec.rstrip("/").split("/")[-1]
    return Path("profiles") / re.sub(r"[^a-z0-9._-]+", "-", name.lower()) / f"{method}.json"


def score(model: str | LoadedModel, method: str = "r2", *, lengths: Sequence[int] | None = None,
          depths: int | None = None, seed: int = 0, needles: Path | None = None, haystack: Path | None = None,
          chat_template: bool = True, filter_probes: bool = True, span: str = "fact",
          max_new_tokens: int = scoring.MAX_NEW_TOKENS, out: str | Path | None = None, force: bool = False,
          resume: bool = False, progress: Callback | None = None, device: str = "auto", dtype: str = "auto",
          device_map: str | None = None, families: str | Sequence[str] | None = None, version: str | None = None,
          min_answered: int | None | str = "auto", max_drawn: int | None = None, teacher_forced: bool = False,
          keep_chance_families: bool = False, preset: str | None = None, batch_size: int | None = None,
          notice: Callable[[str], None] | None = None, write_if_none_succeed: bool = False) -> Profile:
    """Score every head on needle probes and return the profile.

    With `out`, the profile is written there atomically, and finished probes are kept in
    `OUT.partial.jsonl` while it runs: an interrupted run keeps its work and `resume=True` continues it.
    `min_answered` draws further rounds of the grid (at most `max_drawn` probes, default 6x) until that
    many answered probes count; "auto" means 30 for generated probes that are filtered, else none.
    `teacher_forced` feeds the gold answer instead. `preset` ("headkv", "retrieval-head") runs an
    official protocol over the needles folder `haystack` (docs/profiles.md); when no probe succeeds it
    raises NothingAnswered, as the scripts write no scores then (finished probes are kept), unless
    `write_if_none_succeed`. `batch_size` probes are scored at once (default: by device); the profile does not
    depend on it. `notice` hears of a batch halved for lack of memory.
    """
    if batch_size is not None and batch_size < 1:
        raise HeadprofError(f"--batch-size must be at least 1, got {batch_size}")
    if preset is not None:
        p = presets.get(preset)
        if method != p.method and method != "r2":
            raise HeadprofError(f"--preset {preset} scores with --method {p.method}")
        method = p.method
        if needles is not None or families is not None or version is not None or span != "fact":
            raise HeadprofError(f"--preset {preset} reads its needles from --haystack DIR; --needles, --families, "
                                "--probe-version and --span do not apply")
    generated = needles is None and preset is None
    if min_answered == "auto":
        min_answered = scoring.MIN_ANSWERED if generated and filter_probes and not teacher_forced else None
    elif min_answered is not None and not isinstance(min_answered, int):
        raise HeadprofError(f"--min-answered must be a number, got {min_answered!r}")
    if min_answered is not None and not filter_probes:
        raise HeadprofError("--min-answered counts answered probes; it cannot be used with --no-filter")
    if min_answered is not None and not generated:
        raise HeadprofError("--min-answered draws more generated probes; it cannot be used with --needles or --preset")
    world = distributed.world()
    target = check_output(out, force) if out is not None else None
    partial = partial_mod.prepare(target, world, force) if target is not None else None
    settings = scoring.Settings(method, chat_template, filter_probes, span, max_new_tokens, min_answered=min_answered,
                                max_drawn=max_drawn, teacher_forced=teacher_forced,
                                keep_chance=keep_chance_families, preset=preset)
    lm = _load_on_every_process(world, model, device, dtype, device_map)
    if preset is not None:
        ps, hs = preset_probe_set(preset, haystack, lengths, depths, lm.info.max_positions)
        presets.check_spans(ps, lm.tokenizer, hs, presets.get(preset))  # before anything is written
    else:
        ps, hs = probe_set(method, lengths, 10 if depths is None else depths, seed, needles, haystack,
                           lm.info.max_positions, lm.device.startswith("cuda"), families, version)
    prof = scoring.score(lm, ps, settings, hs, partial=partial, resume=resume,
                         progress=progress if world.main else None, world=world, batch_size=batch_size,
                         notice=notice)
    if preset is not None and not prof.probe_set["successes"] and not write_if_none_succeed:
        kept = f"; finished probes are kept in {partial}" if partial is not None else ""
        raise NothingAnswered(f"no probe of {prof.probe_set['count']} succeeded under --preset {preset}: the "
                              f"official script writes no scores then, so no profile was written{kept} "
                              "(--write-if-none-succeed writes one, counting every probe)")
    if target is not None:
        if world.main:
            prof.save(target, force=True)
        world.barrier()  # the profile is in place before any process drops its finished probes
        partial.unlink(missing_ok=True)
    return prof


@dataclass
class CheckResult:
    """A profile re-scored on its own probes: do the heads that matter still match?"""

    profile: str
    model: str
    probes: int
    spearman: float
    top10_overlap: float
    answered: int
    answered_before: int
    failures: list[str]
    provenance: list[str] = field(default_factory=list)  # what differs between the profile's run and this one

    @property
    def passed(self) -> bool:
        return not self.failures


def check(profile: Profile | str | Path, model: str | LoadedModel | None = None, *, max_probes: int | None = None,
          min_spearman: float = compare.MIN_SPEARMAN, min_overlap: float = compare.MIN_OVERLAP,
          device: str = "auto", dtype: str = "auto", progress: Callback | None = None) -> CheckResult:
    """Re-score the profile's model on (some of) the profile's own probes and compare (docs/ci.md)."""
    prof = profile if isinstance(profile, Profile) else Profile.load(profile)
    ps, hs = probes.from_profile(prof, max_probes)
    lm = load_model(model or prof.model["spec"], device, dtype)
    prof.check_fits(lm.info.layout)
    settings = scoring.Settings.from_params(prof.method, prof.params)
    new = scoring.score(lm, ps, settings, hs, progress=progress)
    ids = [p.id for p in ps.probes]
    old_scores, new_scores = compare.subset_scores(prof, ids), compare.subset_scores(new, ids)
    rho = compare.spearman(old_scores, new_scores)
    top = compare.overlap(old_scores, new_scores, 0.1)
    failures = [f"Spearman {rho:.3f} < {min_spearman}"] if rho < min_spearman else []
    failures += [f"top-10% overlap {top:.2f} < {min_overlap}"] if top < min_overlap else []
    return CheckResult(profile=str(profile) if not isinstance(profile, Profile) else "(in memory)",
                       model=lm.info.resolved, probes=len(ids), spearman=rho, top10_overlap=top,
                       answered=new.probe_set["successes"],
                       answered_before=sum(r["success"] for r in prof.probes if r["id"] in ids),
                       failures=failures, provenance=_check_provenance(prof, new, len(ps.probes)))


def _check_provenance(prof: Profile, new: Profile, rescored: int) -> list[str]:
    """What differs between the profile's run and the check's: a subset of the probes (--max-probes) has a hash of
    its own, so the probe set's hash is compared on the whole set the profile stores."""
    diff = profile_mod.provenance_diff(prof, new)
    if rescored == sum("needle" in r for r in prof.probes):
        return diff
    whole, recorded = probes.from_profile(prof)[0].hash, prof.probe_set.get("hash")
    return [d for d in diff if not d.startswith("probe_set.hash:")] + (
        [f"probe_set.hash: {recorded} vs {whole}"] if recorded and whole != recorded else [])
