"""The Python API: what the CLI calls, for users' own code (a notebook, an eval harness, a generate loop).

Every function takes a model spec (hub id, directory, .gguf file, shipped alias) or a model already
loaded with `load_model`, returns values (dataclasses, `Profile`), raises `HeadprofError` subclasses
with one-line messages, reports long work through a `progress` callback, and never prints.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from headprof import distributed, models
from headprof import partial as partial_mod
from headprof.artefacts import compare
from headprof.artefacts import profile as profile_mod
from headprof.artefacts.profile import Profile, shipped
from headprof.compression import generation, methods
from headprof.compression.selection import Kept, kept_positions, span_positions
from headprof.defaults import BETA, KERNEL, WINDOW
from headprof.errors import BatchOutOfMemory, HeadprofError, NothingAnswered, OutputError, ProfileError, out_of_memory
from headprof.evaluation import evaluate as evaluate_mod
from headprof.files import check_output, write_atomic, write_dir_atomic
from headprof.models import LoadedModel
from headprof.probing import answers, presets, probes, scoring
from headprof.progress import Callback

CPU_LENGTH = 2000  # the longest default probe on CPU (small models answer r2 probes less often beyond)
DEFAULT_EVAL_METHODS = "full,streaming,snapkv,pyramidkv,adakv,headkv-retrieval,headkv-r2"


def load_model(spec: str | LoadedModel, device: str = "auto", dtype: str = "auto",
               device_map: str | None = None) -> LoadedModel:
    """Load a causal LM (or pass a loaded one through), attached to headprof's attention function."""
    if isinstance(spec, LoadedModel):
        return spec
    return models.load(spec, device=device, dtype=dtype, device_map=device_map)


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


def _load_on_every_process(world: distributed.World, model: str | LoadedModel, device: str, dtype: str = "auto",
                           device_map: str | None = None) -> LoadedModel:
    """Load on this process; if any process fails, every process raises its error, none waits for the others."""
    lm, failure = None, None
    try:
        lm = load_model(model, world.device(device), dtype, device_map)
    except HeadprofError as e:
        failure = e
    world.agree(failure)
    assert lm is not None
    return lm


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
class GenerationReport:
    """A compressed generation next to the full-cache one (`runs[1]`, unless `baseline=False`)."""

    model: str
    prompt_tokens: int
    method: str
    budget: int
    window: int
    kernel: int
    beta: float
    group_reduce: str
    compress_sliding: bool
    profile: str | None
    runs: list[generation.RunResult]
    agreement: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("runs", "agreement")}
        d["runs"] = [r.to_dict() for r in self.runs]
        if self.agreement is not None:
            d["agreement"] = self.agreement
        return d


def _profile(profile: Profile | str | Path | None, model: str, name: str = "r2",
             named: bool = False) -> tuple[Profile, str]:
    """The profile a profile-driven method uses: given, or the one headprof ships for the model alias as `name`
    (`named`: the method spec asked for that name, e.g. headkv-retrieval)."""
    if isinstance(profile, Profile):
        return profile, "(in memory)"
    path = Path(profile) if profile is not None else shipped(model, name)
    if path is None:
        if named:
            raise ProfileError(f"no shipped profile '{name}' for {model} (the method names it): pass --profile, or "
                               "use a shipped one (r2, retrieval) or a model alias that has one")
        raise ProfileError(f"headkv needs a profile for {model}: pass --profile (make one with headprof score)")
    return Profile.load(path), str(path)


def generate(model: str | LoadedModel, prompt: str | Sequence[int], method: str | methods.Method = "headkv",
             budget: int = 128, *,
             profile: Profile | str | Path | None = None, window: int = WINDOW, kernel: int = KERNEL,
             beta: float = BETA,
             group_reduce: str = "mean", max_new_tokens: int = 64, baseline: bool = True,
             chat_template: bool = True, compress_sliding: bool = True, device: str = "auto",
             dtype: str = "auto") -> GenerationReport:
    """Generate greedily with `method` at `budget` tokens per KV head, next to the full cache.

    `prompt` is the user message (wrapped in the chat template when the model has one) or token ids; a list of
    prompts (strings or id lists) is decoded in batches by `generate_many`, and a list of reports comes back.
    `method`: a name or spec (`headkv:beta=1.5`; `headkv-r2` uses the alias's shipped r2 profile); `window`,
    `kernel`, `beta`, `group_reduce` apply to the methods that have them unless the spec sets them.
    `profile` (headkv): a Profile, a path, or None for the shipped profile of a model alias.
    """
    if not isinstance(prompt, str) and prompt and not isinstance(prompt[0], int):
        return generate_many(model, prompt, method, budget, profile=profile, window=window,  # type: ignore[return-value]
                             kernel=kernel, beta=beta, group_reduce=group_reduce, max_new_tokens=max_new_tokens,
                             baseline=baseline, chat_template=chat_template, compress_sliding=compress_sliding,
                             device=device, dtype=dtype)
    if max_new_tokens < 1:
        raise HeadprofError("--max-new-tokens must be at least 1")
    m, where, label = _method(model, method, budget, profile, window, kernel, beta, group_reduce)
    lm = load_model(model, device, dtype)
    if getattr(m, "profile", None) is not None and hasattr(m.profile, "check_fits"):
        m.profile.check_fits(lm.info.layout)
    ids = list(prompt) if not isinstance(prompt, str) else probes.prompt_ids(lm.tokenizer, prompt, chat_template)
    runs = [generation.generate(lm, ids, m, budget, max_new_tokens, compress_sliding=compress_sliding)]
    if baseline and m.compresses:
        runs.append(generation.generate(lm, ids, "full", budget, max_new_tokens=max_new_tokens))
    return _report(lm, m, label, where, budget, beta, group_reduce, compress_sliding, len(ids), runs)


def kept(model: str | LoadedModel, prompt: str | Sequence[int], method: str | methods.Method = "headkv",
         budget: int = 128, *, profile: Profile | str | Path | None = None, window: int = WINDOW,
         kernel: int = KERNEL, beta: float = BETA, group_reduce: str = "mean", chat_template: bool = True,
         compress_sliding: bool = True, device: str = "auto", dtype: str = "auto") -> Kept:
    """The prompt positions `method` at `budget` keeps, per layer and KV head (what `generate` would hold), with
    `Kept.coverage(span)` for how much of a span (an answer's tokens) each head kept. Options as for `generate`."""
    m, _, _ = _method(model, method, budget, profile, window, kernel, beta, group_reduce)
    lm = load_model(model, device, dtype)
    if getattr(m, "profile", None) is not None and hasattr(m.profile, "check_fits"):
        m.profile.check_fits(lm.info.layout)
    ids = list(prompt) if not isinstance(prompt, str) else probes.prompt_ids(lm.tokenizer, prompt, chat_template)
    return kept_positions(lm, ids, m, budget, compress_sliding)


def kept_span(model: str | LoadedModel, prompt: str | Sequence[int], text: str, method: str | methods.Method = "headkv",
              budget: int = 128, **options: Any) -> dict[str, Any]:
    """How much of `text` (a span of the prompt, an answer) each KV head keeps: its positions, the [layer][kv_head]
    share kept (None for a layer that keeps every token), and how many compressed heads keep all of it. Options as
    for `kept`."""
    lm = load_model(model, options.pop("device", "auto"), options.pop("dtype", "auto"))
    k = kept(lm, prompt, method, budget, **options)
    positions = span_positions(lm.tokenizer, k.prompt_ids, text)
    cov = k.coverage(positions)
    rows = [None if layer is None else [round(float(c), 4) for c in cov[i, :len(layer)]]
            for i, layer in enumerate(k.positions)]
    heads = [c for row in rows if row is not None for c in row]
    return {"text": text, "method": k.method, "budget": budget, "positions": positions, "coverage": rows,
            "heads": len(heads), "whole": sum(c == 1.0 for c in heads)}


def _method(model: str | LoadedModel, method: str | methods.Method, budget: int, profile, window: int, kernel: int,
            beta: float, group_reduce: str) -> tuple[methods.Method, str | None, str]:
    """The built method (with its profile: given, or the alias's shipped one), where the profile came from, and the
    method's label in reports."""
    model_spec = model if isinstance(model, str) else model.info.spec
    built = isinstance(method, methods.Method)
    spec = None if built else methods.parse_spec(method)
    needs = (type(method).needs_profile and getattr(method, "profile", None) is None) if built \
        else spec.method_class.needs_profile
    named = spec is not None and spec.profile is not None
    prof, where = _profile(profile, model_spec, spec.profile if named else "r2", named) if needs else (None, None)
    if built:
        m = dataclasses.replace(method, profile=prof) if prof is not None else method
    else:
        m = spec.build(profile=prof, window=window, kernel=kernel, beta=beta, reduction=group_reduce)
    if m.compresses and budget <= m.window:
        raise HeadprofError(f"--budget {budget} must exceed --window {m.window}")
    return m, where, m.name if built else method


def _report(lm: LoadedModel, m: methods.Method, label: str, where: str | None, budget: int, beta: float,
            group_reduce: str, compress_sliding: bool, prompt_tokens: int,
            runs: list[generation.RunResult]) -> GenerationReport:
    runs[0].method = label
    agreement = None
    if len(runs) > 1:
        agreement = {"exact": runs[0].text == runs[1].text,
                     "token_f1": answers.agreement(runs[0].text, runs[1].text)}
    return GenerationReport(model=lm.info.resolved, prompt_tokens=prompt_tokens, method=label, budget=budget,
                            window=m.window, kernel=m.kernel, beta=getattr(m, "beta", beta),
                            group_reduce=getattr(m, "reduction", group_reduce),
                            compress_sliding=compress_sliding, profile=where, runs=runs, agreement=agreement)


def generate_many(model: str | LoadedModel, prompts: Sequence[str | Sequence[int]],
                  method: str | methods.Method = "headkv", budget: int = 128, *, batch_size: int = 8,
                  names: Sequence[str] | None = None, notice: Callable[[str], None] | None = None,
                  **options) -> list[GenerationReport]:
    """`generate` for several prompts, `batch_size` at a time: each batch one compressed cache (a segment per
    sequence and KV head) and one attention call per layer, each prompt the tokens it gets alone. A batch that
    runs out of memory is halved and retried (`notice` hears of it; finished batches are kept). Options as for
    `generate`. Every prompt is checked (empty, longer than the model's positions: named by `names`) before any
    work starts."""
    if batch_size < 1:
        raise HeadprofError(f"--batch-size must be at least 1, got {batch_size}")
    if not prompts:
        raise HeadprofError("no prompt given")
    names = list(names) if names is not None else [f"prompt {i + 1}" for i in range(len(prompts))]
    options = {"profile": None, "window": WINDOW, "kernel": KERNEL, "beta": BETA, "group_reduce": "mean",
               "max_new_tokens": 64, "baseline": True, "compress_sliding": True, **options}
    max_new = options["max_new_tokens"]
    if max_new < 1:
        raise HeadprofError("--max-new-tokens must be at least 1")
    m, where, label = _method(model, method, budget, options["profile"], options["window"], options["kernel"],
                              options["beta"], options["group_reduce"])
    lm = load_model(model, options.pop("device", "auto"), options.pop("dtype", "auto"))
    if getattr(m, "profile", None) is not None and hasattr(m.profile, "check_fits"):
        m.profile.check_fits(lm.info.layout)
    chat = options.pop("chat_template", True)
    ids = []
    for name, p in zip(names, prompts, strict=True):
        if isinstance(p, str) and not p.strip():
            raise HeadprofError(f"{name} is empty")
        one = list(p) if not isinstance(p, str) else probes.prompt_ids(lm.tokenizer, p, chat)
        if lm.info.max_positions and len(one) + max_new > lm.info.max_positions:
            raise HeadprofError(f"{name}: {len(one)} tokens + {max_new} new tokens exceed the model's "
                                f"{lm.info.max_positions} positions")
        ids.append(one)
    size = batch_size
    if lm.info.layout.latent and m.compresses and size > 1:  # one selection per MLA layer: one prompt at a time
        size = 1
        if notice is not None:
            notice("MLA latents are compressed one prompt at a time: --batch-size 1")
    compressed = _in_batches(lm, ids, m, budget, max_new, options["compress_sliding"], size, notice)
    full = (_in_batches(lm, ids, methods.build("full"), budget, max_new, True, size, notice)
            if options["baseline"] and m.compresses else [None] * len(ids))
    return [_report(lm, m, label, where, budget, options["beta"], options["group_reduce"], options["compress_sliding"],
                    len(prompt), [c] + ([f] if f is not None else []))
            for c, f, prompt in zip(compressed, full, ids, strict=True)]


def _in_batches(lm: LoadedModel, ids: list[list[int]], m: methods.Method, budget: int, max_new: int,
                compress_sliding: bool, size: int, notice: Callable[[str], None] | None) -> list:
    """Every prompt's run, `size` at a time; a batch that runs out of memory is halved and retried with the prompts
    it had not finished (those that finished are kept)."""
    runs: list = [None] * len(ids)
    todo = list(range(len(ids)))
    while todo:
        chunk = todo[:size]
        try:
            made = dict(enumerate(generation.generate_batch(lm, [ids[i] for i in chunk], m, budget, max_new,
                                                            compress_sliding=compress_sliding)))
        except Exception as e:
            if not (isinstance(e, BatchOutOfMemory) or out_of_memory(e)):
                raise
            if size == 1:
                raise HeadprofError(f"out of memory on one prompt of {len(ids[chunk[0]])} tokens: use a shorter "
                                    "prompt, --dtype bfloat16 or a smaller --max-new-tokens") from None
            made, size = getattr(e, "finished", {}), max(1, len(chunk) // 2)
            if notice is not None:
                notice(f"out of memory on {len(chunk)} prompts at once ({len(made)} had finished and are kept): "
                       f"batches of {size} from now on")
            _free_device_memory()
        for j, run in made.items():
            runs[chunk[j]] = run
        todo = [i for i in todo if runs[i] is None]
    return runs


def _free_device_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
             first_item: int = 0, out: Path | None = None, resume: bool = False) -> EvalReport:
    """Every method at every budget (and compression ratio) on the same items, next to the full cache
    (docs/results.md). Items: a user's `tasks` file, or a `suite` at `lengths`, `items` per task and length:
    headprof's needle and reasoning probes ("probes", the default; "probes:needle" for needles only) or
    RULER's tasks ("ruler", "ruler:niah_single_1,vt").
    `first_item` starts RULER's items at that index, so a later run adds items to an earlier one (results that
    `combine` joins). `export_items` writes the items as JSONL (token ids, answers, metric) for a peer's harness
    and runs nothing else. With `out` the results are saved there (refused if it exists, unless `force`),
    finished items are kept in OUT.partial.jsonl while the grid runs, and `resume` continues an interrupted
    grid from them."""
    if suite is not None and tasks is not None:
        raise HeadprofError("--suite and --tasks both choose the items: pass one of them")
    if any(not 0 < r < 1 for r in ratios):
        raise HeadprofError(f"every ratio must lie between 0 and 1 (the fraction of the KV removed), got "
                            f"{', '.join(str(r) for r in ratios)}")
    own_tasks = evaluate_mod.probe_tasks(suite)  # headprof's probes (the default), or None for RULER
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
                                 world=world, ratios=list(ratios), suite=suite_info, partial=partial, resume=resume)
    report = EvalReport(data, warnings)
    if out is not None and partial is not None:
        if world.main:
            report.save(out, force=True)
        world.barrier()  # the results are in place before any process drops its finished items
        partial.unlink(missing_ok=True)
    return report


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


# Reading and writing profiles and models: what `show`, `heatmap`, `compare`, `import`, `export`, `info` and
# `probes` do, so that the CLI only parses, calls this module and prints.

def summarise(profile: Profile | str | Path, top: int = 10) -> tuple[Profile, compare.Summary]:
    """The profile and what `show` prints of it: top heads with bootstrap intervals, split-half stability, mass."""
    prof = profile if isinstance(profile, Profile) else Profile.load(profile)
    return prof, compare.summarise(prof, top)


def heatmap(profile: Profile | str | Path, output: str | Path | None = None, kv: bool = False, top: int = 10,
            diff: Profile | str | Path | None = None, force: bool = False) -> str | Path:
    """Draw a profile (minus `diff`, if given) as a layers x heads heatmap: to an image file at `output`, or
    as text for a terminal when there is none (returned)."""
    from headprof.artefacts import plots

    prof = profile if isinstance(profile, Profile) else Profile.load(profile)
    other = diff if isinstance(diff, Profile) or diff is None else Profile.load(diff)
    if output is None:
        return plots.terminal_heatmap(prof, kv, top, other)
    return plots.save_heatmap(prof, Path(output), kv, top, other, force)


def compare_profiles(a: Profile | str | Path, b: Profile | str | Path, kv: bool = False, keep: float = 0.5,
                     force: bool = False) -> compare.Comparison:
    """Rank agreement of B with A, the heads that moved, whether it is within their noise, what provenance differs."""
    pa, pb = (p if isinstance(p, Profile) else Profile.load(p) for p in (a, b))
    return compare.compare(pa, pb, "kv" if kv else "query", keep, force)


def import_profile(file: str | Path, fmt: str, model_id: str, out: str | Path, kv_heads: int | None = None,
                   query_heads: int | None = None, force: bool = False) -> Profile:
    """Read another project's head scores (HeadKV / Retrieval_Head JSON, DuoAttention TSV) and save a profile."""
    from headprof.artefacts import interop

    check_output(Path(out), force)
    prof = interop.import_file(Path(file), fmt, model_id, kv_heads, query_heads)
    prof.save(out, force)
    return prof


def export_profile(profile: Profile | str | Path, fmt: str) -> str:
    """A profile as HeadKV / Retrieval_Head JSON or DuoAttention TSV text."""
    from headprof.artefacts import interop

    return interop.export_text(profile if isinstance(profile, Profile) else Profile.load(profile), fmt)


def write_output(path: str | Path, text: str, force: bool = False) -> Path:
    """Write `text` atomically; an existing file is only replaced with `force`."""
    return write_atomic(Path(path), text, force)


def check_writable(path: str | Path, force: bool = False) -> None:
    """Refuse, before any work, an output that exists (without `force`) or cannot be written."""
    check_output(Path(path), force)


def describe_model(model: str) -> models.ModelInfo:
    """A model's head layout, kinds, positions and provenance, from its config (no weights loaded)."""
    return models.describe(model)


def model_path(model: str) -> str:
    """Where a model's Hugging Face files are (a GGUF model: its dequantised copy), for other tools."""
    return models.local_path(model)


def method_names() -> tuple[str, ...]:
    return methods.names()


def read_prompt(path: str | Path) -> str:
    from headprof.files import read_prompt as read

    return read(Path(path))


def read_prompts(paths: Sequence[str | Path]) -> list[tuple[str, str]]:
    """(name, text) of the prompts in text files and JSONL files (one prompt per line), all checked first."""
    from headprof.files import read_prompts as read

    return read([Path(p) for p in paths])


def partial_path(out: str | Path) -> Path:
    """Where a scoring run keeps its finished probes (this process's file under torchrun / accelerate)."""
    return partial_mod.path_for(Path(out), distributed.world())


def main_process() -> bool:
    """False in every process but the first under torchrun / accelerate launch (which alone prints)."""
    return distributed.world().main
