"""The one progress display of every command: rich bars on stderr, one per stage, fed `Tick`s."""

from __future__ import annotations

from unclip_cli.progress import Tick
from unclip_cli.requests import printable


class Bars:
    """Progress for the Ticks of a run, shown only when `enabled` (--quiet is off): rich bars when stderr is a
    terminal, one per stage (a stage that runs once per batch fills one bar over all its batches); elsewhere (a log
    file, a pipe, a CI job) one line per stage when it ends, with its measured time, so a long run is never silent."""

    def __init__(self, console, enabled: bool, clock=None):
        import time

        self.console, self.enabled, self.progress, self.tasks = console, enabled, None, {}
        self.lines = enabled and not console.is_terminal
        self.clock = clock or time.monotonic
        self.spent: dict[str, float] = {}  # seconds per stage (and part): the time since the previous Tick goes to this one's
        self.last = 0.0

    def __enter__(self) -> "Bars":
        self.last = self.clock()
        if self.enabled and not self.lines:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("{task.description:>11}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[note]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                     console=self.console)
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def __call__(self, tick: Tick) -> None:
        # A stage that runs for several parts of the picture (compose's objects) is one bar or line per part, named by it
        name = tick.stage + (f", {printable(tick.part)}" if tick.part else "")
        if self.lines:
            now = self.clock()
            self.spent[name] = self.spent.get(name, 0.0) + now - self.last
            self.last = now
            if tick.batch == tick.batches and tick.step == tick.total:
                steps = f"{tick.batches} batches of {tick.total} steps" if tick.batches > 1 else f"{tick.total} steps"
                self.console.print(f"{name}: {steps} in {self.spent[name]:.1f} s", markup=False, highlight=False)
            return
        if self.progress is None:
            return
        total = tick.total * tick.batches
        if name not in self.tasks:
            from rich.markup import escape  # the bar's description is read as markup; a phrase is the user's text

            self.tasks[name] = self.progress.add_task(escape(name), total=total, note="")
        done = (tick.batch - 1) * tick.total + tick.step
        self.progress.update(self.tasks[name], completed=min(done, total), total=total, note=tick.note)


class Estimate:
    """The one-line time estimate of a long stage (a full-size set on a CPU: minutes per image), from the stage's own
    measured seconds per step: said once per stage, after its second step (the first carries one-off costs), when the
    steps still to come would take LONG_S or more. `images` is how many images one batch's step computes."""

    LONG_S = 60.0

    def __init__(self, say, images: int, clock=None):
        import time

        self.say, self.images, self.clock = say, max(1, images), clock or time.monotonic
        self.started: dict[str, float] = {}
        self.said: set[str] = set()

    def __call__(self, tick: Tick) -> None:
        if tick.batch != 1 or tick.stage in self.said or tick.step > 2:
            return
        now = self.clock()
        if tick.step == 1:
            self.started[tick.stage] = now
            return
        if tick.stage not in self.started:
            return
        self.said.add(tick.stage)
        per_step = now - self.started[tick.stage]
        steps = tick.total * tick.batches
        if per_step * (steps - 2) >= self.LONG_S:
            per_image = per_step * tick.total / self.images
            self.say(f"{tick.stage}: {per_step:.1f} s per step (measured), {tick.total} steps: about {per_image / 60:.1f} min per "
                     f"image in this stage, {per_step * (steps - 2) / 60:.0f} min to go")
