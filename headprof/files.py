"""Reading users' files and writing outputs safely, with one-line typed errors.

Reads turn a missing file, an unreadable one or one that is not UTF-8 into the caller's error type.
Writes go to a temp file in the same directory and are renamed into place, so no reader ever sees half
a file, and an existing output is only replaced with `force`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from headprof.errors import HeadprofError, OutputError


def read_text(path: Path, what: str, error: type[HeadprofError] = HeadprofError) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"cannot read {what} {path}: {type(e).__name__}") from None


T = TypeVar("T")


def read_jsonl(path: Path, what: str, noun: str, fields: str, parse: Callable[[dict[str, Any]], T],
               error: type[HeadprofError] = HeadprofError) -> list[tuple[int, T]]:
    """(line number, `parse` of it) for every non-blank JSON line; a line that is not JSON or lacks a field
    is named in a one-line error."""
    records = []
    for i, line in enumerate(read_text(path, what, error).splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((i, parse(json.loads(line))))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise error(f"{path}:{i}: expected JSON with {fields} ({type(e).__name__})") from None
        except HeadprofError as e:
            raise error(f"{path}:{i}: {e}") from None
    if not records:
        raise error(f"{what} {path} holds no {noun}")
    return records


def read_prompt(path: Path) -> str:
    """A prompt file's text: UTF-8, not binary, not empty."""
    try:
        data = Path(path).read_bytes()
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


def read_prompts(paths: list[Path]) -> list[tuple[str, str]]:
    """(name, text) of every prompt: a text file is one prompt; a .jsonl file holds one per line, a JSON string or
    an object with a "prompt" string (named FILE:LINE). Every prompt is read and checked before any is run."""
    import json

    out = []
    for path in paths:
        if Path(path).suffix != ".jsonl":
            out.append((str(path), read_prompt(path)))
            continue
        for n, line in enumerate(read_prompt(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise HeadprofError(f"{path}:{n}: not JSON (one prompt per line: a string or {{\"prompt\": ...}})"
                                    ) from None
            text = record.get("prompt") if isinstance(record, dict) else record
            if not isinstance(text, str):
                raise HeadprofError(f"{path}:{n}: not a prompt (a JSON string or an object with a \"prompt\" "
                                    "string)")
            if not text.strip():
                raise HeadprofError(f"{path}:{n}: the prompt is empty")
            out.append((f"{path}:{n}", text))
    if not out:
        raise HeadprofError(f"no prompt in {', '.join(map(str, paths))}")
    return out


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


def write_atomic(path: str | Path, text: str | bytes, force: bool = False) -> Path:
    """Write via a temp file in the same directory and rename, so no reader sees a partial file (text, or bytes)."""
    p = check_output(path, force)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8") if isinstance(text, str) else text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def write_dir_atomic(path: str | Path, force: bool, write: Callable[[Path], None]) -> Path:
    """Fill a temp directory beside `path` with `write(tmp)`, then put it in place: a reader sees the old
    directory or the whole new one, never half of it."""
    out = Path(path)
    if out.exists() and not force:
        raise OutputError(f"{out} exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        write(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def replace_with(path: str | Path, write: Callable[[Path], None], error: type[HeadprofError] = OutputError) -> Path:
    """`write(tmp)` to a temp file beside `path` (same suffix, for writers that go by it), then rename."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp{p.suffix}")
    try:
        write(tmp)
        tmp.replace(p)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise error(f"cannot write {p}: {e.strerror}") from None
    return p

