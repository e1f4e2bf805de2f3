"""How far a long step (scoring probes, an eval grid) has come. The library reports it through a callback;
the CLI renders it with rich."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Progress:
    done: int
    total: int
    successes: int | None = None  # probes answered so far (scoring)
    resumed: int = 0  # finished in an earlier, interrupted run


Callback = Callable[[Progress], None]
