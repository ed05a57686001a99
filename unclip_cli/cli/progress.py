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
