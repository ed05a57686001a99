"""Progress reports: the library (engine, evaluation, trainer) calls a callback with Ticks and never draws;
front ends decide how to show them (`unclip_cli.cli.progress.Bars` on a terminal)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Tick:
    """Step `step` of `total` in `stage`, in batch `batch` of `batches` (of `size` images; 0: not said); `note` is a
    short status (a loss)."""

    stage: str
    step: int
    total: int
    batch: int = 1
    batches: int = 1
    note: str = ""
    size: int = 0


Callback = Callable[[Tick], None] | None
