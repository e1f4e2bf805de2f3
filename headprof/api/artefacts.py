"""What is made from a profile: its summary, heatmap, comparison, and other tools' formats."""

from __future__ import annotations

from pathlib import Path

from headprof.artefacts import compare
from headprof.artefacts.profile import Profile
from headprof.defaults import BETA, WINDOW
from headprof.errors import HeadprofError
from headprof.files import check_output, write_atomic, write_dir_atomic


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


def export_files(profile: Profile | str | Path, fmt: str, out: str | Path, force: bool = False, *,
                 prompt_length: int | None = None, window: int = WINDOW, beta: float = BETA,
                 reduction: str = "mean", sink: int = 128, recent: int = 256) -> Path:
    """Write a profile where another tool reads it: `lukv`, kvpress's LUKVPress budget curve (`.npy`, for a prompt
    of `prompt_length` tokens, HeadKV's allocation with `window`, `beta`, `reduction`); `duo`, a pattern folder
    DuoAttention and RLKV's SGLang fork load (`full_attention_heads.tsv` and `config.json` with `sink` and
    `recent`). Nothing is written when the profile cannot be held."""
    import io

    import numpy as np

    from headprof.artefacts import interop

    prof = profile if isinstance(profile, Profile) else Profile.load(profile)
    if fmt == "lukv":
        if prompt_length is None:
            raise HeadprofError("--format lukv needs --prompt-length: the curve is HeadKV's allocation for a prompt "
                                "of that many tokens")
        buf = io.BytesIO()
        np.save(buf, interop.lukv_curve(prof, prompt_length, window, beta, reduction), allow_pickle=False)
        return write_atomic(Path(out), buf.getvalue(), force)
    if fmt == "duo":
        interop.duo_table(prof)  # refused before anything is written
        return write_dir_atomic(Path(out), force, lambda tmp: interop.duo_folder(prof, tmp, sink, recent))
    raise HeadprofError(f"unknown file format '{fmt}' (use {' or '.join(interop.FILE_FORMATS)})")
