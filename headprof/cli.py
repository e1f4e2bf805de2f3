"""The `headprof` command: parse arguments, call the library, render results. No logic of its own."""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from headprof.errors import HeadprofError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find the attention heads that matter, and compress the KV cache with them.")
# when piped, rich would draw tables 80 columns wide and wrap their headers
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 140)


def main() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    app()


def friendly(fn):
    """One-line errors and exit codes instead of tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HeadprofError as e:
            err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted", highlight=False)
            raise typer.Exit(130) from None

    return wrapper


def parse_ints(text: str, what: str) -> list[int]:
    from headprof.errors import ProbeError

    try:
        values = [int(x) for x in re.split(r"[,\s]+", text.strip()) if x]
    except ValueError:
        raise ProbeError(f"{what} must be comma-separated integers, got '{text}'") from None
    if not values or any(v <= 0 for v in values):
        raise ProbeError(f"{what} must be positive integers, got '{text}'")
    return values


ModelArg = Annotated[str, typer.Argument(help="hub id, local directory, .gguf file, or alias "
                                               "(smollm2-135m, gemma3-270m)")]
Method = Annotated[str, typer.Option(help="retrieval (Wu et al.) or r2 (HeadKV retrieval-reasoning)")]
Lengths = Annotated[str | None, typer.Option(help="prompt lengths in tokens, e.g. 1000,2000 "
                                                   "[default: 5 lengths up to 4000 on CPU]")]
Depths = Annotated[int, typer.Option(help="needle depths per length, evenly spaced over 0-100%")]
Seed = Annotated[int, typer.Option(help="seed for needles and haystack")]
NeedlesOpt = Annotated[Path | None, typer.Option("--needles", help="your own needles, JSONL: needle, "
                                                  "question, answer[, distractor]")]
HaystackOpt = Annotated[Path | None, typer.Option("--haystack", help="your own haystack text file")]


def _probe_set(method, lengths, depths, seed, needles, haystack, max_positions=0, on_gpu=False):
    from headprof import probes

    hs = probes.Haystack(seed, haystack)
    user_needles = probes.load_needles(needles, method) if needles else None
    lens = parse_ints(lengths, "--lengths") if lengths else probes.default_lengths(
        max_positions, cap=32000 if on_gpu else 4000)
    return probes.build_probe_set(method, lens, depths, seed, user_needles, hs), hs


def _emit(text: str, out_path: Path | None, force: bool, what: str) -> None:
    """Write `text` atomically to `out_path`, or to stdout when there is none."""
    from headprof.files import write_atomic

    if out_path is None:
        sys.stdout.write(text)
        return
    write_atomic(out_path, text, force)
    out.print(f"wrote {out_path}: {what}", highlight=False)


def _default_out(spec: str, method: str) -> Path:
    name = Path(spec).stem if spec.endswith(".gguf") else spec.rstrip("/").split("/")[-1]
    return Path("profiles") / re.sub(r"[^a-z0-9._-]+", "-", name.lower()) / f"{method}.json"


@app.command()
@friendly
def score(
    model: ModelArg,
    method: Method = "r2",
    lengths: Lengths = None,
    depths: Depths = 10,
    seed: Seed = 0,
    out_path: Annotated[Path | None, typer.Option("--out", "-o", help="profile to write "
                                                  "[default: profiles/MODEL/METHOD.json]")] = None,
    force: Annotated[bool, typer.Option(help="overwrite an existing profile / discard a partial run")] = False,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run")] = False,
    no_filter: Annotated[bool, typer.Option("--no-filter", help="count every probe, answered or not")] = False,
    no_chat_template: Annotated[bool, typer.Option("--no-chat-template")] = False,
    needles: NeedlesOpt = None,
    haystack: HaystackOpt = None,
    margin: Annotated[int, typer.Option(help="decode steps beyond the answer's length")] = 10,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16")] = "auto",
    device_map: Annotated[str | None, typer.Option(help="'auto' to spread a large model (accelerate)")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Run needle probes and write per-head scores as a profile."""
    from headprof import models, profile, scoring

    target = profile.check_output(out_path or _default_out(model, method), force)
    partial = scoring.partial_path_for(target)
    if force and partial.exists():
        partial.unlink()
    lm = models.load(model, device=device, dtype=dtype, device_map=device_map)
    ps, hs = _probe_set(method, lengths, depths, seed, needles, haystack, lm.info.max_positions,
                        lm.device.startswith("cuda"))
    try:
        prof = _with_progress(quiet, len(ps.probes), lambda cb: scoring.score(
            lm, ps, method, hs, chat_template=not no_chat_template, filter_probes=not no_filter,
            margin=margin, partial=partial, resume=resume, progress=cb))
    except KeyboardInterrupt:
        err.print(f"interrupted: finished probes are kept in {partial}; rerun with --resume to continue",
                  highlight=False)
        raise typer.Exit(130) from None
    profile.save(prof, target, force=True)
    partial.unlink(missing_ok=True)
    p = prof.data["probe_set"]
    out.print(f"wrote {target}: {prof.method} scores for {p['count']} probes, {p['successes']} answered "
              f"correctly, {p['counted']} counted", highlight=False)
    if p["successes"] == 0 and not no_filter:
        err.print("warning: the model answered no probe; every probe was counted (as with --no-filter)",
                  highlight=False)


def _with_progress(quiet: bool, total: int, run, label: str = "scoring"):
    """Run `run(callback)`; the bar appears with the first finished step, so early errors stay one line."""
    if quiet:
        return run(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]}/s"), TimeRemainingColumn(),
                   TextColumn("{task.fields[ok]}"), console=err)
    task = bar.add_task(label, total=total or None, rate="-", ok="")

    def update(p) -> None:
        if not bar.live.is_started:
            bar.start()
        bar.update(task, completed=p.done, total=p.total)
        speed = bar.tasks[task].speed
        ok = f"answered {p.successes}/{p.done}" if hasattr(p, "successes") else ""
        bar.update(task, rate=f"{speed:.2f}" if speed else "-", ok=ok)

    try:
        return run(update)
    finally:
        bar.stop()


@app.command()
@friendly
def probes(
    method: Method = "r2",
    lengths: Annotated[str, typer.Option(help="prompt lengths in tokens, e.g. 1000,2000")] = "1000",
    depths: Depths = 10,
    seed: Seed = 0,
    out_path: Annotated[Path | None, typer.Option("--out", "-o", help="JSONL file [default: stdout]")] = None,
    force: Annotated[bool, typer.Option()] = False,
    needles: NeedlesOpt = None,
    haystack: HaystackOpt = None,
    model: Annotated[str | None, typer.Option(help="also render each prompt for this model's tokenizer")] = None,
) -> None:
    """Write a probe set as JSONL (header line, then one probe per line) to inspect it."""
    from headprof import models, profile
    from headprof import probes as probes_mod

    if out_path:
        profile.check_output(out_path, force)
    ps, hs = _probe_set(method, lengths, depths, seed, needles, haystack)
    lines = [json.dumps({"probe_set": ps.header()})]
    tok = models.load(model).tokenizer if model else None
    for p in ps.probes:
        row = p.to_dict()
        if tok is not None:
            r = probes_mod.render(p, tok, hs)
            row.update(prompt_tokens=len(r.input_ids), answer_span=list(r.answer_span), prompt=r.text)
        lines.append(json.dumps(row))
    _emit("\n".join(lines) + "\n", out_path, force, f"{len(ps.probes)} probes, {ps.hash}")


@app.command()
@friendly
def info(model: ModelArg) -> None:
    """Show a model's head layout: layers, query heads, KV heads, group size, attention kinds."""
    from headprof import models

    i = models.describe(model)
    lay = i.layout
    kinds = sorted(set(lay.attention_kinds))
    t = Table(show_header=False, box=None)
    for k, v in [("model", i.resolved), ("architecture", f"{i.architecture} ({i.model_type})"),
                 ("layers", lay.num_layers), ("query heads", lay.num_query_heads),
                 ("KV heads", lay.num_kv_heads), ("group size", lay.group_size), ("head dim", lay.head_dim),
                 ("attention kinds", ", ".join(f"{k} x{lay.attention_kinds.count(k)}" for k in kinds)),
                 ("sliding window", lay.sliding_window or "-"), ("max positions", i.max_positions),
                 ("chat template", "yes" if i.chat_template else "no"),
                 ("weights sha256", i.weights_sha256 or i.revision or "-")]:
        t.add_row(f"[bold]{k}[/bold]", str(v))
    out.print(t)


def read_prompt(path: Path) -> str:
    from headprof.errors import HeadprofError

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise HeadprofError(f"prompt file not found: {path}") from None
    except OSError as e:
        raise HeadprofError(f"cannot read prompt file {path}: {e.strerror}") from None
    if b"\x00" in data:
        raise HeadprofError(f"prompt file {path} is binary, not text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise HeadprofError(f"prompt file {path} is not UTF-8 text") from None
    if not text.strip():
        raise HeadprofError(f"prompt file {path} is empty")
    return text


@app.command()
@friendly
def run(
    prompt: Annotated[Path, typer.Argument(help="a UTF-8 text file: the prompt (context and question)")],
    model: Annotated[str, typer.Option(help="model spec, as for `score`")] = "smollm2-135m",
    profile_path: Annotated[Path | None, typer.Option("--profile", help="head profile for headkv "
                                                      "[default: the shipped r2 profile of --model]")] = None,
    method: Annotated[str, typer.Option(help="headkv, snapkv, pyramidkv, adakv, streaming or full")] = "headkv",
    budget: Annotated[int, typer.Option(help="KV tokens per KV head, observation window included")] = 128,
    window: Annotated[int, typer.Option(help="observation window: last prompt tokens, always kept")] = 8,
    kernel: Annotated[int, typer.Option(help="max-pool width over positions")] = 7,
    beta: Annotated[float, typer.Option(help="HeadKV: share of the budget that is guaranteed is 1 - 1/beta")] = 1.2,
    group_reduce: Annotated[str, typer.Option(help="query heads -> KV head: mean or max")] = "mean",
    max_new_tokens: Annotated[int, typer.Option()] = 64,
    compress_sliding: Annotated[bool, typer.Option("--compress-sliding", help="sliding-window layers (Gemma) "
                                                   "also keep only their best tokens inside their window")] = False,
    no_baseline: Annotated[bool, typer.Option("--no-baseline", help="skip the full-cache run")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON report")] = False,
    no_chat_template: Annotated[bool, typer.Option("--no-chat-template")] = False,
    device: Annotated[str, typer.Option()] = "auto",
    dtype: Annotated[str, typer.Option()] = "auto",
) -> None:
    """Generate with a head-level compressed KV cache, next to the full-cache answer."""
    from headprof import allocate, generation, models, profile
    from headprof.errors import HeadprofError, ProfileError
    from headprof.scores import token_f1

    text = read_prompt(prompt)
    if method not in allocate.METHODS:
        raise HeadprofError(f"unknown method '{method}' (use {', '.join(allocate.METHODS)})")
    if budget <= window and method != "full":
        raise HeadprofError(f"--budget {budget} must exceed --window {window}")
    if max_new_tokens < 1:
        raise HeadprofError("--max-new-tokens must be at least 1")
    kv_scores = None
    path = None
    if method == "headkv":
        path = profile_path or profile.shipped(model)
        if path is None:
            raise ProfileError(f"headkv needs a profile for {model}: pass --profile (make one with headprof score)")
        prof = profile.load(path)
    lm = models.load(model, device=device, dtype=dtype)
    lay = lm.info.layout
    if method == "headkv":
        profile.check_fits(prof, lay.num_layers, lay.num_query_heads, lay.num_kv_heads)
        kv_scores = prof.kv_scores(group_reduce)
    tok = lm.tokenizer
    if lm.info.chat_template and not no_chat_template:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"]
    else:
        ids = tok(text)["input_ids"]
    results = [generation.generate(lm, ids, method, budget, kv_scores, window, kernel, beta, max_new_tokens,
                                   compress_sliding=compress_sliding)]
    if not no_baseline and method != "full":
        results.append(generation.generate(lm, ids, "full", budget, max_new_tokens=max_new_tokens))
    ours = results[0]
    base = results[1] if len(results) > 1 else None
    report = {"model": lm.info.resolved, "prompt_tokens": len(ids), "method": method, "budget": budget,
              "window": window, "kernel": kernel, "beta": beta, "group_reduce": group_reduce,
              "compress_sliding": compress_sliding,
              "profile": str(path) if path else None,
              "runs": [r.to_dict() for r in results]}
    if base is not None:
        report["agreement"] = {"exact": ours.text == base.text, "token_f1": token_f1(ours.text, base.text)}
    if as_json:
        sys.stdout.write(json.dumps(report, indent=1) + "\n")
        return
    _print_run(report, results)


def _print_run(report: dict, results: list) -> None:
    from rich.columns import Columns
    from rich.panel import Panel

    out.print(f"{report['model']}: prompt of {report['prompt_tokens']} tokens, {report['method']} at "
              f"{report['budget']} tokens per KV head", highlight=False)
    for note in results[0].notes:
        out.print(f"note: {note}", highlight=False)
    panels = [Panel(r.text or "(empty)", title=f"{r.method}" + (" (full cache)" if r.method == "full" else ""),
                    expand=True) for r in results]
    out.print(Columns(panels, equal=True, expand=True))
    if "agreement" in report:
        a = report["agreement"]
        out.print(f"agreement: exact {'yes' if a['exact'] else 'no'}, token F1 {a['token_f1']:.2f}")
    t = Table("run", "KV entries", "KV MB held", "MB full", "MB ideal", "kept", "prefill s", "decode tok/s")
    for r in results:
        t.add_row(r.method, f"{r.kv_entries:,}", f"{r.kv_bytes / 1e6:.2f}", f"{r.kv_bytes_full / 1e6:.2f}",
                  f"{r.kv_bytes_ideal / 1e6:.2f}", f"{r.kv_bytes / max(r.kv_bytes_full, 1):.1%}",
                  f"{r.prefill_s:.2f}", f"{r.decode_tokens_per_s:.1f}" if r.decode_tokens_per_s else "-")
    out.print(t)


@app.command()
@friendly
def heatmap(
    profile_path: Annotated[Path, typer.Argument(metavar="PROFILE")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="image file: .png, .svg or .pdf "
                                                "[default: draw in the terminal]")] = None,
    kv: Annotated[bool, typer.Option("--kv", help="KV-head scores (mean over each group)")] = False,
    top: Annotated[int, typer.Option(help="label the top-k heads")] = 10,
    diff: Annotated[Path | None, typer.Option(help="another profile: draw it minus PROFILE")] = None,
    force: Annotated[bool, typer.Option(help="overwrite an existing image")] = False,
) -> None:
    """Draw a profile as a layers x heads heatmap."""
    from headprof import plots, profile

    prof = profile.load(profile_path)
    other = profile.load(diff) if diff else None
    if output is None:
        out.print(plots.terminal_heatmap(prof, kv, top, other))
        return
    plots.save_heatmap(prof, output, kv, top, other, force)
    out.print(f"wrote {output}", highlight=False)


@app.command()
@friendly
def compare(
    a: Annotated[Path, typer.Argument(metavar="A")],
    b: Annotated[Path, typer.Argument(metavar="B")],
    kv: Annotated[bool, typer.Option("--kv", help="compare KV-head scores")] = False,
    keep: Annotated[float, typer.Option(help="operating point: fraction of heads kept, for the Jaccard")] = 0.5,
    force: Annotated[bool, typer.Option(help="compare profiles of different methods")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Rank agreement of two profiles, the heads that moved, and whether it is within their noise."""
    from headprof import compare as cmp
    from headprof import profile

    c = cmp.compare(profile.load(a), profile.load(b), "kv" if kv else "query", keep, force)
    if as_json:
        sys.stdout.write(json.dumps(c.to_dict(), indent=1) + "\n")
        return
    t = Table(show_header=False, box=None)
    noise = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for k, v in [("level", c.level), ("Spearman", f"{c.spearman:.3f}"), ("Kendall tau-b", f"{c.kendall:.3f}"),
                 ("top-10% overlap", f"{c.top10_overlap:.2f}"), (f"Jaccard of kept heads at keep={c.keep}",
                                                                 f"{c.kept_jaccard:.2f}"),
                 ("self-agreement A (split half, full size)", noise(c.noise_a)),
                 ("self-agreement B", noise(c.noise_b)),
                 ("within the profiles' own noise", {None: "unknown (no per-probe data)", True: "yes",
                                                     False: "no"}[c.within_noise])]:
        t.add_row(f"[bold]{k}[/bold]", str(v))
    out.print(t)
    m = Table("head", "rank A", "rank B", "score A", "score B", title="moved most")
    for r in c.moved:
        m.add_row(r["head"], str(r["rank_a"]), str(r["rank_b"]), f"{r['score_a']:.4f}", f"{r['score_b']:.4f}")
    out.print(m)


@app.command()
@friendly
def show(
    profile_path: Annotated[Path, typer.Argument(metavar="PROFILE")],
    top: Annotated[int, typer.Option(help="how many heads to list")] = 10,
) -> None:
    """Summary of a profile with uncertainty: bootstrap intervals, split-half stability, score mass."""
    from headprof import compare as cmp
    from headprof import profile

    prof = profile.load(profile_path)
    m, p = prof.model, prof.data["probe_set"]
    out.print(f"[bold]{m['spec']}[/bold] ({m['num_layers']} layers, {m['num_query_heads']} query heads, "
              f"{m['num_kv_heads']} KV heads), method {prof.method}", highlight=False)
    count = p.get("count", 0)
    out.print(f"probe set {p.get('name')} v{p.get('version')} {str(p.get('hash', ''))[:19]}: {count} probes, "
              f"{p.get('successes', 0)} answered ({p.get('successes', 0) / max(count, 1):.0%}), "
              f"{p.get('counted', count)} counted", highlight=False)
    if "source" in prof.data:
        out.print(f"imported from {prof.data['source']['file']} ({prof.data['source']['format']}); unknown: "
                  + "; ".join(prof.data["source"]["unknown"]), highlight=False)
    has_query = prof.data["scores"].get("query") is not None
    scores = prof.query_scores() if has_query else prof.kv_scores("mean")
    heads = scores.shape[1]
    per_probe = prof.per_probe() if has_query and prof.data["probes"] else None
    lo = hi = None
    if per_probe is not None and per_probe.shape[0] >= 2:
        lo, hi = cmp.bootstrap_ci(per_probe)
    t = Table("rank", "head", "score", "95% interval (bootstrap over probes)")
    for rank, i in enumerate(np.argsort(-scores.ravel(), kind="stable")[:top], 1):
        ci = f"{lo.ravel()[i]:.4f} - {hi.ravel()[i]:.4f}" if lo is not None else "-"
        t.add_row(str(rank), cmp.head_name(int(i), heads), f"{scores.ravel()[i]:.4f}", ci)
    out.print(t)
    sh = cmp.split_half(per_probe) if per_probe is not None else None
    out.print(f"split-half stability (Spearman of two disjoint halves): {'-' if sh is None else f'{sh:.3f}'}"
              f"{'' if sh is None else f' (full size, Spearman-Brown: {cmp.full_size(sh):.3f})'}", highlight=False)
    out.print(f"score mass held by the top 10% of heads: {cmp.mass_in_top(scores):.1%}", highlight=False)


@app.command("import")
@friendly
def import_(
    file: Annotated[Path, typer.Argument(metavar="FILE")],
    fmt: Annotated[str, typer.Option("--format", help="headkv (JSON) or duo (TSV)")],
    model_id: Annotated[str, typer.Option("--model-id", help="the model these scores belong to")],
    out_path: Annotated[Path, typer.Option("--out", "-o")],
    kv_heads: Annotated[int | None, typer.Option(help="headkv: KV heads of the model (GQA)")] = None,
    query_heads: Annotated[int | None, typer.Option(help="duo: query heads of the model")] = None,
    force: Annotated[bool, typer.Option()] = False,
) -> None:
    """Read HeadKV / Retrieval_Head JSON or DuoAttention TSV into a headprof profile."""
    from headprof import interop, profile

    profile.check_output(out_path, force)
    prof = interop.import_file(file, fmt, model_id, kv_heads, query_heads)
    profile.save(prof, out_path, force)
    layers, heads = prof.shape
    out.print(f"wrote {out_path}: {layers} layers x {heads} query heads, {prof.model['num_kv_heads']} KV heads, "
              f"{len(prof.data['probes'])} per-probe rows", highlight=False)


@app.command("export")
@friendly
def export_(
    profile_path: Annotated[Path, typer.Argument(metavar="PROFILE")],
    fmt: Annotated[str, typer.Option("--format", help="headkv (JSON) or duo (TSV)")],
    out_path: Annotated[Path | None, typer.Option("--out", "-o", help="[default: stdout]")] = None,
    force: Annotated[bool, typer.Option()] = False,
) -> None:
    """Write a profile in HeadKV / Retrieval_Head JSON or DuoAttention TSV form."""
    from headprof import interop, profile

    if out_path:
        profile.check_output(out_path, force)
    _emit(interop.export_text(profile.load(profile_path), fmt), out_path, force, fmt)


@app.command()
@friendly
def check(
    profile_path: Annotated[Path, typer.Argument(metavar="PROFILE")],
    model: Annotated[str | None, typer.Option(help="model to re-score [default: the profile's model]")] = None,
    max_probes: Annotated[int | None, typer.Option(help="re-score only this many of the profile's probes")] = None,
    min_spearman: Annotated[float, typer.Option(help="fail below this rank correlation")] = 0.9,
    min_overlap: Annotated[float, typer.Option(help="fail below this top-10% overlap")] = 0.7,
    device: Annotated[str, typer.Option()] = "auto",
    dtype: Annotated[str, typer.Option()] = "auto",
    quiet: Annotated[bool, typer.Option()] = False,
) -> None:
    """Re-score the profile's model on the profile's own probes; exit 1 if the heads changed."""
    from headprof import compare as cmp
    from headprof import models, probes, profile, scoring

    prof = profile.load(profile_path)
    ps, hs = probes.from_profile(prof.data, max_probes)
    lm = models.load(model or prof.model["spec"], device=device, dtype=dtype)
    lay = lm.info.layout
    profile.check_fits(prof, lay.num_layers, lay.num_query_heads, lay.num_kv_heads)
    params = prof.data["method"].get("params", {})
    new = _with_progress(quiet, len(ps.probes), lambda cb: scoring.score(
        lm, ps, prof.method, hs, chat_template=params.get("chat_template", True),
        filter_probes=params.get("filter", True), margin=params.get("margin", scoring.DEFAULT_MARGIN), progress=cb))
    ids = [p.id for p in ps.probes]
    old_scores, new_scores = cmp.subset_scores(prof, ids), cmp.subset_scores(new, ids)
    rho = cmp.spearman(old_scores, new_scores)
    top = cmp.overlap(old_scores, new_scores, 0.1)
    failures = [f"Spearman {rho:.3f} < {min_spearman}"] if rho < min_spearman else []
    failures += [f"top-10% overlap {top:.2f} < {min_overlap}"] if top < min_overlap else []
    out.print(f"re-scored {len(ids)} probes of {profile_path} on {lm.info.resolved}: Spearman {rho:.3f}, "
              f"top-10% overlap {top:.2f}, answered {new.data['probe_set']['successes']}/{len(ids)} "
              f"(profile: {sum(r['success'] for r in prof.data['probes'] if r['id'] in ids)}/{len(ids)})",
              highlight=False)
    if failures:
        out.print("FAIL: " + "; ".join(failures), highlight=False)
        raise typer.Exit(1)
    out.print("OK: the heads that matter have not changed", highlight=False)


@app.command("eval")
@friendly
def eval_(
    model: ModelArg = "smollm2-135m",
    budgets: Annotated[str, typer.Option(help="KV tokens per KV head, comma-separated")] = "32,64,128,256",
    methods: Annotated[str, typer.Option(help="comma-separated: full, streaming, snapkv, pyramidkv, adakv, "
                                              "headkv-retrieval, headkv-r2")] =
        "full,streaming,snapkv,pyramidkv,adakv,headkv-retrieval,headkv-r2",
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="directory for results.json, results.csv, "
                                                              "quality_vs_budget.png")] = Path("results"),
    tasks: Annotated[Path | None, typer.Option(help="your own items, JSONL: context, question, answers "
                                                    "[default: needle and reasoning probes]")] = None,
    items: Annotated[int, typer.Option(help="items per task and length")] = 5,
    lengths: Annotated[str, typer.Option(help="probe lengths in tokens")] = "1500",
    seed: Annotated[int, typer.Option(help="seed of the eval items (the profiles use 0)")] = 1000,
    beta: Annotated[str, typer.Option(help="HeadKV beta, or a list to choose per budget on a validation half")]
        = "1.2",
    profile_dir: Annotated[Path | None, typer.Option(help="where METHOD.json profiles are "
                                                          "[default: the shipped profiles of MODEL]")] = None,
    allow_overlap: Annotated[bool, typer.Option(help="run even if eval items overlap the profiles' probes")] = False,
    window: Annotated[int, typer.Option()] = 8,
    max_new_tokens: Annotated[int, typer.Option()] = 24,
    compress_sliding: Annotated[bool, typer.Option("--compress-sliding", help="sliding-window layers also keep "
                                                   "only their best tokens inside their window")] = False,
    force: Annotated[bool, typer.Option(help="replace an existing output directory")] = False,
    quiet: Annotated[bool, typer.Option()] = False,
    device: Annotated[str, typer.Option()] = "auto",
) -> None:
    """Quality versus budget for every method, with bootstrap intervals, measured KV bytes and a plot."""
    import shutil
    import tempfile

    from headprof import evaluate, models, profile
    from headprof.errors import HeadprofError, OutputError, ProfileError

    budget_list = parse_ints(budgets, "--budgets")
    try:
        betas = [float(x) for x in beta.split(",") if x.strip()]
    except ValueError:
        raise HeadprofError(f"--beta must be numbers, got '{beta}'") from None
    if out_dir.exists() and not force:
        raise OutputError(f"{out_dir} exists; pass --force to replace it")
    wanted = {m.removeprefix("headkv-") for m in methods.split(",") if m.strip().startswith("headkv-")}
    profiles = {}
    for name in sorted(wanted):
        path = (profile_dir / f"{name}.json") if profile_dir else profile.shipped(model, name)
        if path is None or not path.is_file():
            raise ProfileError(f"no {name} profile for {model}: pass --profile-dir (make one with headprof score)")
        profiles[name] = profile.load(path)
    method_list = evaluate.parse_methods(methods, profiles)
    lm = models.load(model, device=device)
    lay = lm.info.layout
    for p in profiles.values():
        profile.check_fits(p, lay.num_layers, lay.num_query_heads, lay.num_kv_heads)
    if tasks:
        item_list = evaluate.file_items(lm, tasks)
    else:
        item_list = []
        for task in ("needle", "reasoning"):
            exclude = frozenset() if allow_overlap else evaluate.used_texts(list(profiles.values()))
            its, ps = evaluate.probe_items(lm, task, parse_ints(lengths, "--lengths"), items, seed, exclude)
            for name, p in profiles.items():
                clash = evaluate.overlapping(p, ps)
                if clash and not allow_overlap:
                    raise HeadprofError(f"{len(clash)} eval items overlap the {name} profile's probes "
                                        f"(e.g. {clash[0]}): use another --seed, or --allow-overlap")
                if clash:
                    err.print(f"[bold red]WARNING[/bold red]: {len(clash)} eval items overlap the {name} profile's "
                              "probes; results are optimistic for headkv", highlight=False)
            item_list += its
    results = _with_progress(quiet, 0, lambda cb: evaluate.evaluate(
        lm, item_list, method_list, budget_list, profiles, betas, window, max_new_tokens=max_new_tokens,
        compress_sliding=compress_sliding, progress=cb), label="evaluating")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        (tmp / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        (tmp / "results.csv").write_text(evaluate.to_csv(results))
        evaluate.plot(results, tmp / "quality_vs_budget.png")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    t = Table("method", "budget", "F1", "95% interval", "contains", "agrees w/ full", "KV MB", "s/item",
              title=f"{results['model']}: {results['items']} items" + (f", beta chosen on {results['validation_items']}"
                                                                     if results["chosen_beta"] else ""))
    for r in results["summary"]:
        t.add_row(r["method"], str(r["budget"]), f"{r['f1']:.2f}", f"{r['f1_low']:.2f}-{r['f1_high']:.2f}",
                  f"{r['contains']:.2f}", f"{r['agreement']:.2f}", f"{r['kv_bytes'] / 1e6:.2f}", f"{r['seconds']:.1f}")
    out.print(t)
    if results["chosen_beta"]:
        out.print(f"beta chosen per budget: {results['chosen_beta']}", highlight=False)
    out.print(f"wrote {out_dir}/results.json, results.csv, quality_vs_budget.png", highlight=False)
