"""Quality against budget or compression ratio, every method side by side (`evaluate`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from headprof import distributed, methods
from headprof import partial as partial_mod
from headprof.api.common import _load_on_every_process
from headprof.artefacts.profile import Profile, shipped
from headprof.defaults import BETA, WINDOW
from headprof.errors import HeadprofError, OutputError, ProfileError
from headprof.evaluation import evaluate as evaluate_mod
from headprof.files import check_output, write_atomic, write_dir_atomic
from headprof.layout import check_compressible
from headprof.models import LoadedModel
from headprof.progress import Callback

DEFAULT_EVAL_METHODS = "full,streaming,snapkv,pyramidkv,adakv,headkv-retrieval,headkv-r2"


@dataclass
class EvalReport:
    """Quality versus budget (`data` is results.json); `warnings` are for the user (overlapping items)."""

    data: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    @property
    def summary(self) -> list[dict[str, Any]]:
        return self.data["summary"]

    def save(self, out_dir: str | Path, force: bool = False) -> Path:
        """results.json, results.csv and quality_vs_budget.png, put in place all at once."""
        def write(tmp: Path) -> None:
            (tmp / "results.json").write_text(json.dumps(self.data, indent=1) + "\n")
            (tmp / "results.csv").write_text(evaluate_mod.to_csv(self.data))
            evaluate_mod.plot(self.data, tmp / "quality_vs_budget.png")

        return write_dir_atomic(out_dir, force, write)


def eval_profiles(model: str, method_specs: str, profile_dir: Path | None = None) -> dict[str, Profile]:
    """The profiles `headkv-NAME` methods need: PROFILE_DIR/NAME.json, or the shipped NAME profile."""
    wanted = sorted({name for label in evaluate_mod.method_labels(method_specs)
                     for name in [methods.parse_spec(label).profile] if name})
    profiles = {}
    for name in wanted:
        path = (profile_dir / f"{name}.json") if profile_dir else shipped(model, name)
        if path is None or not path.is_file():
            raise ProfileError(f"no {name} profile for {model}: pass --profile-dir (make one with headprof score)")
        profiles[name] = Profile.load(path)
    return profiles


def evaluate(model: str | LoadedModel, budgets: Sequence[int] = (32, 64, 128, 256),
             methods_spec: str = DEFAULT_EVAL_METHODS, *, profiles: dict[str, Profile] | None = None,
             profile_dir: Path | None = None, tasks: Path | None = None, items: int = 5,
             lengths: Sequence[int] = (1500,), seed: int = 1000, betas: Sequence[float] = (BETA,),
             allow_overlap: bool = False, window: int = WINDOW, max_new_tokens: int = 24, compress_sliding: bool = True,
             device: str = "auto", progress: Callback | None = None, suite: str | None = None,
             ratios: Sequence[float] = (), export_items: Path | None = None, force: bool = False,
             first_item: int = 0, out: Path | None = None, resume: bool = False,
             compress_questions: bool = True) -> EvalReport:
    """Every method at every budget (and compression ratio) on the same items, next to the full cache
    (docs/results.md). Items: a user's `tasks` file, or a `suite` at `lengths`, `items` per task and length:
    headprof's needle and reasoning probes ("probes", the default; "probes:needle" for needles only) or
    RULER's tasks ("ruler", "ruler:niah_single_1,vt").
    `first_item` starts RULER's items at that index, so a later run adds items to an earlier one (results that
    `combine` joins). `export_items` writes the items as JSONL (token ids, answers, metric) for a peer's harness
    and runs nothing else. With `out` the results are saved there (refused if it exists, unless `force`),
    finished items are kept in OUT.partial.jsonl while the grid runs, and `resume` continues an interrupted
    grid from them. `compress_questions=False` is kvpress's protocol: each RULER item's context is compressed
    alone, then its question asked (`evaluation.evaluate`)."""
    if suite is not None and tasks is not None:
        raise HeadprofError("--suite and --tasks both choose the items: pass one of them")
    if any(not 0 < r < 1 for r in ratios):
        raise HeadprofError(f"every ratio must lie between 0 and 1 (the fraction of the KV removed), got "
                            f"{', '.join(str(r) for r in ratios)}")
    own_tasks = evaluate_mod.probe_tasks(suite)  # headprof's probes (the default), or None for RULER
    if not compress_questions and (own_tasks is not None or tasks is not None):
        raise HeadprofError("--no-compress-questions asks the question after compressing the context: it needs "
                            "items with a separate question (--suite ruler); headprof's probes and --tasks files "
                            "have none")
    if first_item < 0 or (first_item and own_tasks is not None):
        raise HeadprofError("--first-item takes an index >= 0 and applies to --suite ruler")
    if own_tasks is None:
        from headprof.evaluation import ruler

        suite_tasks = ruler.parse(suite or "")  # a bad suite or task is refused before the model loads
        ruler.check_installed()
    if export_items is not None:
        check_output(export_items, force)
        out = None
    if out is not None and out.exists() and not force:
        raise OutputError(f"{out} exists; pass --force to replace it")
    spec = model if isinstance(model, str) else model.info.spec
    if profiles is None:
        profiles = eval_profiles(spec, methods_spec, profile_dir)
    method_list = evaluate_mod.parse_methods(methods_spec, profiles)
    world = distributed.world()  # torchrun / accelerate launch: items are sharded over the processes
    partial = partial_mod.prepare(out, world, force) if out is not None else None
    lm = _load_on_every_process(world, model, device)
    for p in profiles.values():
        p.check_fits(lm.info.layout)
    if any(methods.parse_spec(m).method_class.compresses for m in method_list):
        check_compressible(lm.info.layout)  # before the first item, so that no partial file is left
    warnings: list[str] = []
    suite_info = None
    if own_tasks is None:
        item_list = evaluate_mod.ruler_items(lm, suite, list(lengths), items, seed, first_item)
        suite_info = {"name": "ruler", "version": ruler.SUITE_VERSION, "tasks": [t.name for t in suite_tasks],
                      "lengths": list(lengths), "items_per_task": items, "first_item": first_item, "seed": seed,
                      "metric": "RULER string match: all (niah, vt, cwe, fwe), part (qa)"}
    elif tasks:
        item_list = evaluate_mod.file_items(lm, tasks)
    else:
        item_list = []
        for task in own_tasks:
            exclude = frozenset() if allow_overlap else evaluate_mod.used_texts(list(profiles.values()))
            its, ps = evaluate_mod.probe_items(lm, task, list(lengths), items, seed, exclude)
            for name, p in profiles.items():
                clash = evaluate_mod.overlapping(p, ps)
                if clash and not allow_overlap:
                    raise HeadprofError(f"{len(clash)} eval items overlap the {name} profile's probes "
                                        f"(e.g. {clash[0]}): use another --seed, or --allow-overlap")
                if clash:
                    warnings.append(f"{len(clash)} eval items overlap the {name} profile's probes; results are "
                                    "optimistic for headkv")
            item_list += its
    if export_items is not None:
        if world.main:
            write_atomic(export_items, "".join(json.dumps(evaluate_mod.export_row(it, suite_info)) + "\n"
                                               for it in item_list), force=force)
        return EvalReport({"exported": str(export_items), "items": len(item_list)}, warnings)
    data = evaluate_mod.evaluate(lm, item_list, method_list, list(budgets), profiles, betas, window,
                                 max_new_tokens=max_new_tokens, progress=progress, compress_sliding=compress_sliding,
                                 world=world, ratios=list(ratios), suite=suite_info, partial=partial, resume=resume,
                                 compress_questions=compress_questions)
    report = EvalReport(data, warnings)
    if out is not None and partial is not None:
        if world.main:
            report.save(out, force=True)
        world.barrier()  # the results are in place before any process drops its finished items
        partial.unlink(missing_ok=True)
    return report
