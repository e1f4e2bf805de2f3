"""Commands that make and check profiles: score, probes, info, check."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from headprof.cli.common import (
    BadInput,
    Depths,
    Device,
    Dtype,
    FamiliesOpt,
    Force,
    HaystackOpt,
    ModelArg,
    NeedlesOpt,
    ProbeVersionOpt,
    ProfileArg,
    Quiet,
    ScoringMethod,
    Seed,
    app,
    emit,
    err,
    family_lines,
    friendly,
    keeps_partial,
    out,
    parse_ints,
    with_progress,
)


@app.command()
@friendly
def score(
    model: ModelArg,
    method: ScoringMethod = "r2",
    lengths: Annotated[str | None, typer.Option(help="prompt lengths in tokens, e.g. 1000,2000 "
                                                     "[default: 5 lengths up to 2000 on CPU]")] = None,
    depths: Annotated[int | None, typer.Option(help="needle depths per length, evenly spaced over 0-100% "
                                                    "[default: 10]")] = None,
    seed: Seed = 0,
    out_path: Annotated[Path | None, typer.Option("--out", "-o", help="profile to write "
                                                  "[default: profiles/MODEL/METHOD.json]")] = None,
    force: Annotated[bool, typer.Option(help="overwrite an existing profile / discard a partial run")] = False,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run")] = False,
    no_filter: Annotated[bool, typer.Option("--no-filter", help="count every probe, answered or not")] = False,
    no_chat_template: Annotated[bool, typer.Option("--no-chat-template")] = False,
    needles: NeedlesOpt = None,
    haystack: HaystackOpt = None,
    span: Annotated[str, typer.Option(help="the scored span: fact (the correct-fact sentence, as HeadKV) or "
                                           "value (only the answer's words)")] = "fact",
    max_new_tokens: Annotated[int, typer.Option(help="decode at most this many tokens per probe")] = 50,
    preset: Annotated[str | None, typer.Option(help="an official protocol end to end: headkv or retrieval-head "
                                                    "(needles folder from --haystack DIR)")] = None,
    write_if_none_succeed: Annotated[bool, typer.Option(help="--preset: write a profile even when no probe "
                                                             "succeeds (the official scripts write none; exit 1)"
                                                        )] = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
    device_map: Annotated[str | None, typer.Option(help="'auto' to spread a large model (accelerate)")] = None,
    families: FamiliesOpt = None,
    probe_version: ProbeVersionOpt = None,
    min_answered: Annotated[int | None, typer.Option(help="draw further rounds of probes until this many were "
                                                          "answered and counted [default: 30 for generated "
                                                          "probes]")] = None,
    max_drawn: Annotated[int | None, typer.Option(help="cap on probes drawn for --min-answered "
                                                       "[default: 6x --min-answered]")] = None,
    one_round: Annotated[bool, typer.Option("--one-round", help="score the grid once, draw no further "
                                                                "rounds")] = False,
    keep_chance_families: Annotated[bool, typer.Option(help="count answered probes of families that are not "
                                                            "clearly above chance")] = False,
    teacher_forced: Annotated[bool, typer.Option(help="feed the gold answer and score every probe")] = False,
    batch_size: Annotated[int | None, typer.Option(help="probes scored at once, grouped by length; the profile "
                                                        "does not depend on it [default: 8]")] = None,
    quiet: Quiet = False,
) -> None:
    """Run needle probes and write per-head scores as a profile."""
    from headprof import api

    if one_round and min_answered is not None:
        raise BadInput("--one-round and --min-answered contradict each other")
    target = out_path or api.default_profile_path(model, preset or method)
    main = api.main_process()  # under torchrun / accelerate launch, only the first shows progress and results
    with keeps_partial("probes", api.partial_path(target)):
        prof = with_progress(quiet or not main, 0, lambda cb: api.score(
            model, method, lengths=parse_ints(lengths, "--lengths") if lengths else None, depths=depths, seed=seed,
            needles=needles, haystack=haystack, chat_template=not no_chat_template, filter_probes=not no_filter,
            span=span, max_new_tokens=max_new_tokens, out=target, force=force, resume=resume, progress=cb,
            device=device, dtype=dtype, device_map=device_map, families=families, version=probe_version,
            min_answered=None if one_round else (min_answered if min_answered is not None else "auto"),
            max_drawn=max_drawn, teacher_forced=teacher_forced, keep_chance_families=keep_chance_families,
            preset=preset, batch_size=batch_size, write_if_none_succeed=write_if_none_succeed,
            notice=lambda message: err.print(f"note: {message}", highlight=False)))
    if not main:
        return
    p = prof.probe_set
    out.print(f"wrote {target}: {prof.method} scores for {p['count']} probes, {p['successes']} answered "
              f"correctly, {p['counted']} counted", highlight=False)
    for line in family_lines(p):
        out.print(line, highlight=False)
    for warning in prof.warnings:
        err.print(f"warning: {warning}", highlight=False)


@app.command()
@friendly
def probes(
    method: ScoringMethod = "r2",
    lengths: Annotated[str, typer.Option(help="prompt lengths in tokens, e.g. 1000,2000")] = "1000",
    depths: Depths = 10,
    seed: Seed = 0,
    out_path: Annotated[Path | None, typer.Option("--out", "-o", help="JSONL file [default: stdout]")] = None,
    force: Force = False,
    needles: NeedlesOpt = None,
    haystack: HaystackOpt = None,
    model: Annotated[str | None, typer.Option(help="also render each prompt for this model's tokenizer")] = None,
    families: FamiliesOpt = None,
    probe_version: ProbeVersionOpt = None,
) -> None:
    """Write a probe set as JSONL (header line, then one probe per line) to inspect it."""
    from headprof import api

    if out_path:
        api.check_writable(out_path, force)
    ps, hs = api.probe_set(method, parse_ints(lengths, "--lengths"), depths, seed, needles, haystack,
                           families=families, version=probe_version)
    tokenizer = api.load_model(model).tokenizer if model else None
    emit(ps.to_jsonl(tokenizer, hs), out_path, force, f"{len(ps.probes)} probes, {ps.hash}")


@app.command()
@friendly
def info(model: ModelArg,
         path: Annotated[bool, typer.Option("--path", help="print only where the model's Hugging Face files are "
                                                            "(a GGUF model: its dequantised copy)")] = False) -> None:
    """Show a model's head layout: layers, query heads, KV heads, group size, attention kinds."""
    from headprof import api

    if path:
        out.print(api.model_path(model), highlight=False, soft_wrap=True)
        return
    i = api.describe_model(model)
    lay = i.layout
    kinds = sorted(set(lay.attention_kinds))
    t = Table(show_header=False, box=None)
    for k, v in [("model", i.resolved), ("architecture", f"{i.architecture} ({i.model_type})"),
                 ("layers", lay.num_layers), ("query heads", _by_layer(lay.layer_query_heads, lay.num_query_heads)),
                 ("KV heads", _by_layer(lay.layer_kv_heads, lay.num_kv_heads)),
                 ("group size", _by_layer(tuple(lay.group(i) for i in range(lay.num_layers)), lay.group_size)),
                 ("head dim", _by_layer(lay.layer_head_dims, lay.head_dim)),
                 ("attention kinds", ", ".join(f"{k} x{lay.attention_kinds.count(k)}" for k in kinds)),
                 ("layers without heads", ", ".join(map(str, lay.no_heads)) or "-"),
                 ("sliding window", lay.sliding_window or "-"), ("max positions", i.max_positions or "no limit"),
                 ("chat template", "yes" if i.chat_template else "no"),
                 ("weights sha256", i.weights_sha256 or i.revision or "-")]:
        t.add_row(f"[bold]{k}[/bold]", str(v))
    out.print(t)


@app.command()
@friendly
def check(
    profile_path: ProfileArg,
    model: Annotated[str | None, typer.Option(help="model to re-score [default: the profile's model]")] = None,
    max_probes: Annotated[int | None, typer.Option(help="re-score only this many of the profile's probes")] = None,
    min_spearman: Annotated[float | None, typer.Option(help="fail below this rank correlation [default: 0.9]")]
        = None,
    min_overlap: Annotated[float | None, typer.Option(help="fail below this top-10% overlap [default: 0.7]")] = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    quiet: Quiet = False,
) -> None:
    """Re-score the profile's model on the profile's own probes; exit 1 if the heads changed."""
    from headprof import api

    thresholds = {k: v for k, v in (("min_spearman", min_spearman), ("min_overlap", min_overlap)) if v is not None}
    r = with_progress(quiet, 0, lambda cb: api.check(profile_path, model, max_probes=max_probes, device=device,
                                                     dtype=dtype, progress=cb, **thresholds))
    out.print(f"re-scored {r.probes} probes of {profile_path} on {r.model}: Spearman {r.spearman:.3f}, "
              f"top-10% overlap {r.top10_overlap:.2f}, answered {r.answered}/{r.probes} "
              f"(profile: {r.answered_before}/{r.probes})", highlight=False)
    if r.provenance:
        out.print("provenance differs from the profile's run: " + "; ".join(r.provenance), highlight=False)
    if not r.passed:
        out.print("FAIL: " + "; ".join(r.failures), highlight=False)
        raise typer.Exit(1)
    out.print("OK: the heads that matter have not changed", highlight=False)


def _by_layer(values: tuple[int, ...], common: int) -> str:
    """`common`, with the layers whose value differs ("16 (32 in layers 5, 11)")."""
    others: dict[int, list[int]] = {}
    for i, v in enumerate(values):
        if v != common:
            others.setdefault(v, []).append(i)
    return f"{common}" + "".join(f" ({v} in layers {', '.join(map(str, ls))})" for v, ls in others.items())
