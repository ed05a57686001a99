"""`unclip train clip|prior|decoder|upsampler` and `unclip train export`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from unclip_cli.cli import app

train_app = typer.Typer(
    help="Train the stack stage by stage (CLIP first), resumably; export the result as a model set.\n\n"
    "Example: unclip train clip --data ~/.cache/unclip/emoji --run ~/unclip-runs/emoji --max-minutes 30",
    no_args_is_help=True,
)
app.add_typer(train_app, name="train")

Data = Annotated[str, typer.Option("--data", help="Shards: a folder, a glob, or a brace range like data/train-{000000..000009}.tar")]
Run = Annotated[Path, typer.Option("--run", "--run-dir", help="Run folder (keep it outside the repo), shared by all stages of one stack; under torchrun spell it --run-dir (torchrun claims --run as an abbreviation of its --run-path)")]
Preset = Annotated[str, typer.Option("--preset", help="tiny, emoji, base, or a .json file")]
MaxMinutes = Annotated[Optional[float], typer.Option("--max-minutes", help="Stop (with a checkpoint) after this many minutes")]
MaxSteps = Annotated[Optional[int], typer.Option("--max-steps", help="Stop after this many optimiser steps in total")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the stage's saved state: step, optimiser, EMA, data position, RNG")]
InitFrom = Annotated[Optional[Path], typer.Option("--init-from", metavar="SET", help="Start a new run from a model set's weights (e.g. weights/emoji), to train it further or on your own images")]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", help="Per-process batch size (default: the preset's)")]
Lr = Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (default: the preset's)")]
CkptMinutes = Annotated[float, typer.Option("--checkpoint-minutes", help="Minutes between checkpoints")]
Seed = Annotated[int, typer.Option("--seed")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar")]


def _run_stage(stage: str, data, run, preset, max_minutes, max_steps, resume, init_from, batch_size, lr, checkpoint_minutes, seed, device, quiet):
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from unclip_cli.train.loop import TrainOptions, train

    opts = TrainOptions(stage=stage, run=run.expanduser(), data=str(Path(data).expanduser()), preset=preset, max_minutes=max_minutes,
                        max_steps=max_steps, resume=resume, init_from=init_from and init_from.expanduser(), batch_size=batch_size, lr=lr, checkpoint_minutes=checkpoint_minutes,
                        seed=seed, device=device)
    console = Console(stderr=True)
    show = not quiet and console.is_terminal
    columns = [TextColumn(f"[bold]{stage}"), BarColumn(), TextColumn("step {task.fields[step]}"),
               TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[ips]:.1f} img/s"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, disable=not show) as bar:
        total = max_steps or (max_minutes * 60 if max_minutes else None)
        tid = bar.add_task(stage, total=total, step=0, loss=float("nan"), ips=0.0)

        def on_progress(p):
            done = p.step if max_steps else p.elapsed
            bar.update(tid, completed=done, step=p.step, loss=p.loss, ips=p.images_per_s or bar.tasks[0].fields["ips"])
            if p.event == "checkpoint" and not show and not quiet:
                console.print(f"{stage}: checkpoint at step {p.step}")

        summary = train(opts, on_progress)
    if summary["interrupted"]:
        console.print(f"{stage}: interrupted; state saved at step {summary['step']}. Resume with --resume.")
    import os

    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        typer.echo(json.dumps(summary))
    if summary["interrupted"]:
        sys.exit(130)


def _register(stage: str, doc: str) -> None:
    def command(
        data: Data, run: Run, preset: Preset = "emoji", max_minutes: MaxMinutes = None, max_steps: MaxSteps = None,
        resume: Resume = False, init_from: InitFrom = None, batch_size: BatchSize = None, lr: Lr = None, checkpoint_minutes: CkptMinutes = 10.0,
        seed: Seed = 0, device: Device = "auto", quiet: Quiet = False,
    ):
        _run_stage(stage, data, run, preset, max_minutes, max_steps, resume, init_from, batch_size, lr, checkpoint_minutes, seed, device, quiet)

    command.__doc__ = doc
    train_app.command(stage)(command)


_register("clip", "Train CLIP with open_clip's ClipLoss on (image, caption) pairs.")
_register("prior", "Train the diffusion prior (text -> CLIP image embedding) against the run's frozen CLIP.")
_register("decoder", "Train the decoder (CLIP image embedding -> base image, with inpainting) against the run's frozen CLIP.")
_register("upsampler", "Train the upsampler on random crops with a blurred low-resolution condition.")


@train_app.command("export")
def export_cmd(
    run: Annotated[Path, typer.Argument(help="Training run folder")],
    to: Annotated[Path, typer.Option("--to", help="Destination model-set folder, e.g. weights/emoji")],
    fp32: Annotated[bool, typer.Option("--fp32", help="Keep float32 weights (default: fp16, small tensors fp32)")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing model set")] = False,
    base: Annotated[Optional[Path], typer.Option("--base", metavar="SET", help="Take the stages the run has not trained from this model set (the one given to --init-from)")] = None,
):
    """Write the run's EMA weights as an inference model set (clip/prior/decoder/upsampler .safetensors)."""
    import torch

    from unclip_cli.train.export import export

    for path in export(run.expanduser(), to.expanduser(), dtype=torch.float32 if fp32 else torch.float16, force=force,
                       base=base and base.expanduser()):
        typer.echo(str(path))
