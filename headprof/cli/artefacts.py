"""Commands that read profiles: show, heatmap, compare, import, export."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from headprof.cli.common import Force, ProfileArg, app, emit, family_lines, friendly, out
from headprof.defaults import BETA, WINDOW


@app.command()
@friendly
def show(profile_path: ProfileArg, top: Annotated[int, typer.Option(help="how many heads to list")] = 10) -> None:
    """Summary of a profile with uncertainty: bootstrap intervals, split-half stability, score mass."""
    from headprof import api

    prof, s = api.summarise(profile_path, top)
    m, p = prof.model, prof.probe_set
    for warning in prof.warnings:
        out.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    out.print(f"[bold]{m['spec']}[/bold] ({m['num_layers']} layers, {m['num_query_heads']} query heads, "
              f"{m['num_kv_heads']} KV heads), method {prof.method}", highlight=False)
    count = p.get("count", 0)
    out.print(f"probe set {p.get('name')} v{p.get('version')} {str(p.get('hash', ''))[:19]}: {count} probes, "
              f"{p.get('successes', 0)} answered ({p.get('successes', 0) / max(count, 1):.0%}), "
              f"{p.get('counted', count)} counted", highlight=False)
    for line in family_lines(p):
        out.print(line, highlight=False)
    if prof.source:
        out.print(f"imported from {prof.source['file']} ({prof.source['format']}); unknown: "
                  + "; ".join(prof.source["unknown"]), highlight=False)
    t = Table("rank", "head", "score", "95% interval (bootstrap over probes)")
    for r in s.top:
        t.add_row(str(r["rank"]), r["head"], f"{r['score']:.4f}",
                  f"{r['low']:.4f} - {r['high']:.4f}" if r["low"] is not None else "-")
    out.print(t)
    sh = s.split_half
    out.print(f"split-half stability (Spearman of two disjoint halves): {'-' if sh is None else f'{sh:.3f}'}"
              f"{'' if sh is None else f' (full size, Spearman-Brown: {s.split_half_full_size:.3f})'}",
              highlight=False)
    out.print(f"score mass held by the top 10% of heads: {s.mass_top10:.1%}", highlight=False)
    if s.layers_without_heads:
        out.print(f"layers without attention heads (not scored): {', '.join(map(str, s.layers_without_heads))}",
                  highlight=False)


@app.command()
@friendly
def heatmap(
    profile_path: ProfileArg,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="image file: .png, .svg or .pdf "
                                                "[default: draw in the terminal]")] = None,
    kv: Annotated[bool, typer.Option("--kv", help="KV-head scores (mean over each group)")] = False,
    top: Annotated[int, typer.Option(help="label the top-k heads")] = 10,
    diff: Annotated[Path | None, typer.Option(help="another profile: draw it minus PROFILE")] = None,
    force: Annotated[bool, typer.Option(help="overwrite an existing image")] = False,
) -> None:
    """Draw a profile as a layers x heads heatmap."""
    from headprof import api

    drawn = api.heatmap(profile_path, output, kv, top, diff, force)
    if output is None:
        out.print(drawn)
    else:
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
    from headprof import api

    c = api.compare_profiles(a, b, kv, keep, force)
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
    if c.provenance:
        out.print("provenance differs: " + "; ".join(c.provenance), highlight=False)
    m = Table("head", "rank A", "rank B", "score A", "score B", title="moved most")
    for r in c.moved:
        m.add_row(r["head"], str(r["rank_a"]), str(r["rank_b"]), f"{r['score_a']:.4f}", f"{r['score_b']:.4f}")
    out.print(m)


@app.command("import")
@friendly
def import_(
    file: Annotated[Path, typer.Argument(metavar="FILE")],
    fmt: Annotated[str, typer.Option("--format", help="headkv (JSON) or duo (TSV)")],
    model_id: Annotated[str, typer.Option("--model-id", help="the model these scores belong to")],
    out_path: Annotated[Path, typer.Option("--out", "-o")],
    kv_heads: Annotated[int | None, typer.Option(help="headkv: KV heads of the model (GQA)")] = None,
    query_heads: Annotated[int | None, typer.Option(help="duo: query heads of the model")] = None,
    force: Force = False,
) -> None:
    """Read HeadKV / Retrieval_Head JSON or DuoAttention TSV into a headprof profile."""
    from headprof import api

    prof = api.import_profile(file, fmt, model_id, out_path, kv_heads, query_heads, force)
    layers, heads = prof.shape
    out.print(f"wrote {out_path}: {layers} layers x {heads} query heads, {prof.model['num_kv_heads']} KV heads, "
              f"{len(prof.probes)} per-probe rows", highlight=False)


@app.command("export")
@friendly
def export_(
    profile_path: ProfileArg,
    fmt: Annotated[str, typer.Option("--format", help="headkv (JSON), duo (DuoAttention / RLKV: TSV, or with --out DIR "
                                                      "a pattern folder) or lukv (kvpress LUKVPress curve, .npy)")],
    out_path: Annotated[Path | None, typer.Option("--out", "-o", help="[default: stdout]")] = None,
    prompt_length: Annotated[int | None, typer.Option(help="lukv: the prompt length the curve is for")] = None,
    window: Annotated[int, typer.Option(help="lukv: HeadKV's observation window")] = WINDOW,
    beta: Annotated[float, typer.Option(help="lukv: HeadKV's beta")] = BETA,
    group_reduce: Annotated[str, typer.Option(help="lukv: query heads -> KV head: mean or max")] = "mean",
    sink: Annotated[int, typer.Option(help="duo folder: sink_size in its config.json")] = 128,
    recent: Annotated[int, typer.Option(help="duo folder: recent_size in its config.json")] = 256,
    force: Force = False,
) -> None:
    """Write a profile for another tool: HeadKV / Retrieval_Head JSON, DuoAttention / RLKV head table, kvpress LU-KV."""
    from headprof import api

    folder = fmt == "duo" and out_path is not None and out_path.suffix != ".tsv"
    if fmt == "lukv" or folder:
        if out_path is None:
            raise api.HeadprofError("--format lukv writes a binary .npy: give --out FILE")
        written = api.export_files(profile_path, fmt, out_path, force, prompt_length=prompt_length, window=window,
                                   beta=beta, reduction=group_reduce, sink=sink, recent=recent)
        out.print(f"wrote {written}: {fmt}{' folder (full_attention_heads.tsv, config.json)' if folder else ''}",
                  highlight=False)
        return
    if out_path:
        api.check_writable(out_path, force)
    emit(api.export_profile(profile_path, fmt), out_path, force, fmt)
