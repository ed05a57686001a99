"""The one progress display of every command: rich bars on stderr, one per stage, fed `Tick`s."""

from __future__ import annotations

from unclip_cli.progress import Tick


class Bars:
    """Progress bars for the Ticks of a run, drawn only when `enabled` (stderr is a terminal and --quiet is
    off). A stage that runs once per batch fills one bar over all its batches."""

    def __init__(self, console, enabled: bool):
        self.console, self.enabled, self.progress, self.tasks = console, enabled, None, {}

    def __enter__(self) -> "Bars":
        if self.enabled:
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
        if self.progress is None:
            return
        total = tick.total * tick.batches
        if tick.stage not in self.tasks:
            self.tasks[tick.stage] = self.progress.add_task(tick.stage, total=total, note="")
        done = (tick.batch - 1) * tick.total + tick.step
        self.progress.update(self.tasks[tick.stage], completed=min(done, total), total=total, note=tick.note)


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
