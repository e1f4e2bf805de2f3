"""Partial runs: the finished pieces of a long job (scored probes, evaluated items) kept as they finish.

A partial file is one JSON line fingerprinting the run's settings, then one line per finished piece.
An interrupted run keeps its work; a resumed run reads it back and continues; a run with other
settings is refused rather than mixed in. A line cut off by a kill is dropped and its piece redone.
Under torchrun each process keeps its own file, named with its rank and the number of processes, so
a run is resumed with the same number of processes or started over.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from headprof.distributed import World
from headprof.errors import OutputError
from headprof.files import write_atomic


def path_for(out: Path, world: World | None = None) -> Path:
    """Where finished pieces are kept while `out` is made: one file per process."""
    if world is None or world.size == 1:
        return out.with_name(out.name + ".partial.jsonl")
    return out.with_name(f"{out.name}.partial.rank{world.rank}of{world.size}.jsonl")


def foreign(out: Path, world: World) -> list[Path]:
    """Partial files of `out` left by a run with another number of processes (never mixed in silently)."""
    mine = re.compile(re.escape(out.name) + (r"\.partial\.jsonl" if world.size == 1
                                            else rf"\.partial\.rank\d+of{world.size}\.jsonl"))
    return sorted(p for p in out.parent.glob(out.name + ".partial*.jsonl") if not mine.fullmatch(p.name))


def prepare(out: Path, world: World, force: bool) -> Path:
    """This process's partial file for `out`: with `force` every earlier one is removed; without it, one
    left by another number of processes is refused."""
    mine = path_for(out, world)
    others = foreign(out, world)
    if force:
        for p in [*others, mine]:
            p.unlink(missing_ok=True)
    elif others:
        raise OutputError(f"{others[0].name} is from a run with another number of processes: resume it "
                          "with the same number, or pass --force to start over")
    return mine


class PartialRun:
    """This run's partial file, opened for appending; `done` holds what an earlier run finished (by `key`).

    `settings` names what the fingerprint covers, for the message that refuses a run with other settings."""

    def __init__(self, path: Path | None, fingerprint: dict[str, Any], resume: bool, key: str, settings: str) -> None:
        self.key = key
        self.done: dict[str, dict[str, Any]] = {}
        self._file = None
        if path is None:
            return
        if path.exists():
            if not resume:
                raise OutputError(f"a partial run exists at {path}; pass --resume to continue it or --force "
                                  "to start over")
            self.done = _read(path, fingerprint, key, settings)
        # rewritten cleanly: a line cut off by a kill must not absorb the next one
        lines = [json.dumps({"run": fingerprint})] + [json.dumps(r) for r in self.done.values()]
        write_atomic(path, "\n".join(lines) + "\n", force=True)
        self._file = path.open("a", encoding="utf-8")

    def add(self, record: dict[str, Any]) -> None:
        """Keep one finished piece, on disk before this returns."""
        self.done[record[self.key]] = record
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> PartialRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read(path: Path, fingerprint: dict[str, Any], key: str, settings: str) -> dict[str, dict[str, Any]]:
    done: dict[str, dict[str, Any]] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        return done
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError:
        raise OutputError(f"partial run {path} is unreadable; remove it or pass --force") from None
    if header.get("run") != fingerprint:
        raise OutputError(f"partial run {path} was made with other settings ({settings}); remove it or pass "
                          "--force to start over")
    for line in lines[1:]:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            break  # the run was killed while writing this line; that piece is redone
        done[r[key]] = r
    return done
