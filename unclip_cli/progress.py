"""Progress reports: the library (engine, evaluation, trainer) calls a callback with Ticks and never draws;
front ends decide how to show them (`unclip_cli.cli.progress.Bars` on a terminal). The engine also hands the
callback a run's `Warnings`, before its first Tick."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Tick:
    """Step `step` of `total` in `stage`, in batch `batch` of `batches` (of `size` images; 0: not said); `note` is a
    short status (a loss); `part`: which part of the picture the stage draws when it runs for several (compose's
    objects: "object 1 of 2 (cat face)", "the whole picture"), else ""."""

    stage: str
    step: int
    total: int
    batch: int = 1
    batches: int = 1
    note: str = ""
    size: int = 0
    part: str = ""


@dataclass(frozen=True)
class Warnings:
    """What a run warns of, all known from its request before any sampling (an image or text far from the set, words
    it never saw, a cut prompt, a resized mask...): the engine sends it once, before the first Tick and only when there
    is something to say, so that a front end shows it while the work goes on rather than after. `request`: which of
    `Engine.run_many`'s requests (0 for `run`). The run's results carry the same lines."""

    lines: tuple[str, ...]
    request: int = 0


Callback = Callable[[Tick | Warnings], None] | None
