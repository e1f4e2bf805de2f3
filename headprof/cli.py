"""The `headprof` command: parse arguments, call the library, render results. No logic of its own."""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated

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


def _with_progress(quiet: bool, total: int, run):
    """Run `run(callback)`; the bar appears with the first finished probe, so early errors stay one line."""
    if quiet:
        return run(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]} probes/s"), TimeRemainingColumn(),
                   TextColumn("answered {task.fields[ok]}"), console=err)
    task = bar.add_task("score", total=total, rate="-", ok="-")

    def update(p) -> None:
        if not bar.live.is_started:
            bar.start()
        bar.update(task, completed=p.done)
        speed = bar.tasks[task].speed
        bar.update(task, rate=f"{speed:.2f}" if speed else "-", ok=f"{p.successes}/{p.done}")

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
    text = "\n".join(lines) + "\n"
    if out_path:
        profile.write_atomic(out_path, text, force)
        out.print(f"wrote {out_path}: {len(ps.probes)} probes, {ps.hash}", highlight=False)
    else:
        sys.stdout.write(text)


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
    results = [generation.generate(lm, ids, method, budget, kv_scores, window, kernel, beta, max_new_tokens)]
    if not no_baseline and method != "full":
        results.append(generation.generate(lm, ids, "full", budget, max_new_tokens=max_new_tokens))
    ours = results[0]
    base = results[1] if len(results) > 1 else None
    report = {"model": lm.info.resolved, "prompt_tokens": len(ids), "method": method, "budget": budget,
              "window": window, "kernel": kernel, "beta": beta, "group_reduce": group_reduce,
              "profile": str(profile_path or (profile.shipped(model) if method == "headkv" else None)),
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
