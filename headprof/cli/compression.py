"""Commands that compress the KV cache: run (prompts, batched) and eval (quality versus budget)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from headprof.cli.common import (
    Device,
    Dtype,
    ModelArg,
    Quiet,
    app,
    err,
    friendly,
    keeps_partial,
    method_names,
    out,
    parse_floats,
    parse_ints,
    with_progress,
)
from headprof.defaults import BETA, KERNEL, WINDOW

CompressSliding = Annotated[bool, typer.Option("--compress-sliding/--keep-sliding-window", help="sliding-window "
                                               "layers (Gemma) keep only their best tokens inside their window, or "
                                               "their whole window (docs/run.md)")]


@app.command()
@friendly
def run(
    prompts: Annotated[list[Path], typer.Argument(help="UTF-8 text files, a prompt each (context and question), "
                                                       "or .jsonl files of prompts (a JSON string or "
                                                       "{\"prompt\": ...} per line)")],
    model: Annotated[str, typer.Option(help="model spec, as for `score`")] = "smollm2-135m",
    profile_path: Annotated[Path | None, typer.Option("--profile", help="head profile for headkv "
                                                      "[default: the shipped r2 profile of --model]")] = None,
    method: Annotated[str, typer.Option(help=f"one of: {method_names()}; with options as NAME:KEY=VALUE,... "
                                             "(e.g. adakv:safeguard=0.1, headkv:beta=1.5,reduction=max)")] = "headkv",
    budget: Annotated[int, typer.Option(help="KV tokens per KV head, observation window included")] = 128,
    window: Annotated[int, typer.Option(help="observation window: last prompt tokens, always kept")] = WINDOW,
    kernel: Annotated[int, typer.Option(help="max-pool width over positions")] = KERNEL,
    beta: Annotated[float, typer.Option(help="HeadKV: share of the budget that is guaranteed is 1 - 1/beta")] = BETA,
    group_reduce: Annotated[str, typer.Option(help="query heads -> KV head: mean or max")] = "mean",
    max_new_tokens: Annotated[int, typer.Option()] = 64,
    min_new_tokens: Annotated[int, typer.Option(help="no end token before this many new tokens (measuring a long "
                                                     "generation)")] = 0,
    compress_sliding: CompressSliding = True,
    no_baseline: Annotated[bool, typer.Option("--no-baseline", help="skip the full-cache run")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON report")] = False,
    no_chat_template: Annotated[bool, typer.Option("--no-chat-template")] = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
    batch_size: Annotated[int, typer.Option(help="prompts decoded at once, one compressed cache per batch "
                                                 "(halved when out of memory)")] = 8,
    kept_text: Annotated[str | None, typer.Option("--kept", help="text in the prompt (an answer): show the share of "
                                                  "its tokens each KV head kept (one prompt)")] = None,
) -> None:
    """Generate with a head-level compressed KV cache, next to the full-cache answer; several prompts in batches."""
    from headprof import api

    named = api.read_prompts(prompts)  # every prompt checked before any work
    if kept_text is not None and len(named) != 1:
        raise api.HeadprofError("--kept inspects one prompt: give one prompt file")
    options = dict(profile=profile_path, window=window, kernel=kernel, beta=beta, group_reduce=group_reduce,
                   max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, baseline=not no_baseline,
                   chat_template=not no_chat_template,
                   compress_sliding=compress_sliding, device=device, dtype=dtype)
    if len(named) == 1 and batch_size >= 1:
        reports = [api.generate(model, named[0][1], method, budget, **options)]
    else:
        reports = api.generate_many(model, [text for _, text in named], method, budget, batch_size=batch_size,
                                    names=[name for name, _ in named],
                                    notice=lambda m: err.print(f"note: {m}", highlight=False), **options)
    kept = None
    if kept_text is not None:
        kept = api.kept_span(model, named[0][1], kept_text, method, budget,
                             **{k: v for k, v in options.items()
                                if k not in ("max_new_tokens", "min_new_tokens", "baseline")})
    if as_json:
        docs = [{"prompt": name, **r.to_dict()} for (name, _), r in zip(named, reports, strict=True)]
        if kept is not None:
            docs[0]["kept"] = kept
        sys.stdout.write(json.dumps(docs[0] if len(docs) == 1 else docs, indent=1) + "\n")
        return
    for (name, _), report in zip(named, reports, strict=True):
        if len(named) > 1:
            out.rule(name)
        _print_report(report)
    if kept is not None:
        _print_kept(kept)


def _print_kept(kept: dict) -> None:
    cov = kept["coverage"]
    t = Table("layer", "share of the span kept, per KV head")
    for i, row in enumerate(cov):
        t.add_row(f"L{i}", "not compressed" if row is None else "  ".join(f"H{h} {c:.2f}" for h, c in enumerate(row)))
    out.print(t)
    out.print(f"'{kept['text']}' is {len(kept['positions'])} prompt tokens (positions {kept['positions'][0]}-"
              f"{kept['positions'][-1]}); {kept['whole']} of {kept['heads']} compressed KV heads kept all of them",
              highlight=False)


def _print_report(report) -> None:
    from rich.columns import Columns
    from rich.panel import Panel

    out.print(f"{report.model}: prompt of {report.prompt_tokens} tokens, {report.method} at {report.budget} tokens "
              "per KV head", highlight=False)
    for note in report.runs[0].notes:
        out.print(f"note: {note}", highlight=False)
    panels = [Panel(r.text or "(empty)", title=f"{r.method}" + (" (full cache)" if r is not report.runs[0] else ""),
                    expand=True) for r in report.runs]
    out.print(Columns(panels, equal=True, expand=True))
    if report.agreement is not None:
        a = report.agreement
        out.print(f"agreement: exact {'yes' if a['exact'] else 'no'}, token F1 {a['token_f1']:.2f}")
    t = Table("run", "KV entries", "KV MB held", "MB full", "MB ideal", "kept", "prefill s", "decode tok/s")
    for r in report.runs:
        t.add_row(r.method, f"{r.kv_entries:,}", f"{r.kv_bytes / 1e6:.2f}", f"{r.kv_bytes_full / 1e6:.2f}",
                  f"{r.kv_bytes_ideal / 1e6:.2f}", f"{r.kv_bytes / max(r.kv_bytes_full, 1):.1%}",
                  f"{r.prefill_s:.2f}", f"{r.decode_tokens_per_s:.1f}" if r.decode_tokens_per_s else "-")
    out.print(t)


@app.command("eval")
@friendly
def eval_(
    model: ModelArg = "smollm2-135m",
    budgets: Annotated[str | None, typer.Option(help="KV tokens per KV head, comma-separated "
                                                     "[default: 32,64,128,256 unless --ratios]")] = None,
    ratios: Annotated[str | None, typer.Option(help="compression ratios as kvpress reports them: the fraction "
                                                    "of each prompt's KV removed, e.g. 0.5,0.75,0.9")] = None,
    methods: Annotated[str, typer.Option(help=f"comma-separated: {method_names()}; options as NAME:KEY=VALUE,"
                                              "KEY=VALUE; profiles as headkv:profile=r2 or its short form headkv-r2 "
                                              "(PROFILE.json in --profile-dir, or shipped)")] =
        "full,streaming,snapkv,pyramidkv,adakv,headkv-retrieval,headkv-r2",
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="directory for results.json, results.csv, "
                                                              "quality_vs_budget.png")] = Path("results"),
    tasks: Annotated[Path | None, typer.Option(help="your own items, JSONL: context, question, answers "
                                                    "[default: needle and reasoning probes]")] = None,
    suite: Annotated[str | None, typer.Option(help="the items: probes (headprof's needle and reasoning "
                                                   "probes; probes:needle for needles only), ruler (RULER's 13 tasks) "
                                                   "or ruler:niah_single_1,vt,... (tasks; groups niah, qa) "
                                                   "[default: probes]")] = None,
    export_items: Annotated[Path | None, typer.Option(help="write the items (token ids, answers, metric) as JSONL "
                                                           "for another harness, and run nothing")] = None,
    items: Annotated[int, typer.Option(help="items per task and length")] = 5,
    first_item: Annotated[int, typer.Option(help="RULER: index of the first item per task and length, to add "
                                                 "items to an earlier run (benchmarks/combine_results.py joins "
                                                 "them)")] = 0,
    lengths: Annotated[str, typer.Option(help="probe lengths in tokens")] = "1500",
    seed: Annotated[int, typer.Option(help="seed of the eval items (the profiles use 0)")] = 1000,
    beta: Annotated[str, typer.Option(help="HeadKV beta, or a list to choose per budget on a validation half")]
        = str(BETA),
    profile_dir: Annotated[Path | None, typer.Option(help="where PROFILE.json profiles are "
                                                          "[default: the shipped profiles of MODEL]")] = None,
    allow_overlap: Annotated[bool, typer.Option(help="run even if eval items overlap the profiles' probes")] = False,
    window: Annotated[int, typer.Option(help="observation window")] = WINDOW,
    max_new_tokens: Annotated[int, typer.Option()] = 24,
    compress_sliding: CompressSliding = True,
    compress_questions: Annotated[bool, typer.Option(
        "--compress-questions/--no-compress-questions",
        help="compress the question with the context (the HeadKV paper's protocol), or compress the context alone "
             "and then ask the question (kvpress's leaderboard protocol; RULER only)")] = True,
    force: Annotated[bool, typer.Option(help="replace an existing output directory (and start a partial run "
                                              "over)")] = False,
    resume: Annotated[bool, typer.Option(help="continue an interrupted grid from OUT.partial.jsonl")] = False,
    quiet: Quiet = False,
    device: Device = "auto",
) -> None:
    """Quality versus budget for every method, with bootstrap intervals, measured KV bytes and a plot."""
    from headprof import api

    ratio_list = parse_floats(ratios, "--ratios") if ratios else []
    budget_list = parse_ints(budgets, "--budgets") if budgets else ([] if ratio_list else [32, 64, 128, 256])
    betas = parse_floats(beta, "--beta")
    main = api.main_process()  # under torchrun / accelerate launch, items are sharded; the first writes and prints
    with keeps_partial("items", api.partial_path(out_dir)):
        report = with_progress(quiet or not main, 0, lambda cb: api.evaluate(
            model, budget_list, methods, profile_dir=profile_dir, tasks=tasks, items=items,
            lengths=parse_ints(lengths, "--lengths"), seed=seed, betas=betas, allow_overlap=allow_overlap,
            window=window, max_new_tokens=max_new_tokens, compress_sliding=compress_sliding, device=device,
            progress=cb, suite=suite, ratios=ratio_list, export_items=export_items, force=force,
            first_item=first_item, out=out_dir, resume=resume, compress_questions=compress_questions),
        label="evaluating")
    if not main:
        return
    if export_items is not None:
        out.print(f"wrote {report.data['items']} items to {export_items}", highlight=False)
        return
    for warning in report.warnings:
        err.print(f"[bold red]WARNING[/bold red]: {warning}", highlight=False)
    results = report.data
    suite_score = "suite" in results
    t = Table("method", "budget", *(["ratio"] if ratio_list else []), "F1", "95% interval",
              "RULER score" if suite_score else "contains", "agrees w/ full", "KV MB", "s/item",
              title=f"{results['model']}: {results['items']} items" + (f", beta chosen on {results['validation_items']}"
                                                                     if results["chosen_beta"] else ""))
    for r in report.summary:
        shown = (f"{r['score']:.2f} ({r['score_low']:.2f}-{r['score_high']:.2f})" if suite_score
                 else f"{r['contains']:.2f}")
        t.add_row(r["method"], str(r["budget"]), *([str(r.get("ratio", "-"))] if ratio_list else []), f"{r['f1']:.2f}",
                  f"{r['f1_low']:.2f}-{r['f1_high']:.2f}", shown, f"{r['agreement']:.2f}",
                  f"{r['kv_bytes'] / 1e6:.2f}", f"{r['seconds']:.1f}")
    out.print(t)
    if results["chosen_beta"]:
        out.print(f"beta chosen per budget: {results['chosen_beta']}", highlight=False)
    out.print(f"wrote {out_dir}/results.json, results.csv, quality_vs_budget.png", highlight=False)
