"""Reading users' files and writing outputs safely, with one-line typed errors.

Reads turn a missing file, an unreadable one or one that is not UTF-8 into the caller's error type.
Writes go to a temp file in the same directory and are renamed into place, so no reader ever sees half
a file, and an existing output is only replaced with `force`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from headprof.errors import HeadprofError, OutputError


def read_text(path: Path, what: str, error: type[HeadprofError] = HeadprofError) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"cannot read {what} {path}: {type(e).__name__}") from None


def check_output(path: str | Path, force: bool) -> Path:
    """Refuse early (before hours of work) when the output cannot or must not be written."""
    p = Path(path)
    if p.exists() and not force:
        raise OutputError(f"{p} exists; pass --force to overwrite it")
    if p.exists() and p.is_dir():
        raise OutputError(f"{p} is a directory")
    parent = p.parent if str(p.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create directory {parent}: {e.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output directory {parent} is not writable")
    return p


def write_atomic(path: str | Path, text: str, force: bool = False) -> Path:
    """Write via a temp file in the same directory and rename, so no reader sees a partial file."""
    p = check_output(path, force)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p
