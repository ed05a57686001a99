"""`unclip train clip|prior|decoder|upsampler` and `unclip train export`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from unclip_cli.cli import app
from unclip_cli.cli.options import DeviceChoice, DeviceOpt, QuietOpt

train_app = typer.Typer(
    help="Train the stack stage by stage (CLIP first), resumably; export the result as a model set.\n\n"
    "Example: unclip train clip --data ~/.cache/unclip/emoji --run ~/unclip-runs/emoji --max-minutes 30",
    no_args_is_help=True,
)
app.add_typer(train_app, name="train")

DataOpt = Annotated[str, typer.Option("--data", help="Shards: a folder, a glob, or a brace range like data/train-{000000..000009}.tar")]
RunDirOpt = Annotated[Path, typer.Option("--run", "--run-dir", help="Run folder (keep it outside the repo), shared by all stages of one stack; under torchrun spell it --run-dir (torchrun claims --run as an abbreviation of its --run-path)")]
PresetOpt = Annotated[str, typer.Option("--preset", help="tiny, emoji, emoji256, base, or a .json file")]
MaxMinutesOpt = Annotated[Optional[float], typer.Option("--max-minutes", help="Stop (with a checkpoint) after this many minutes")]
MaxStepsOpt = Annotated[Optional[int], typer.Option("--max-steps", help="Stop after this many optimiser steps in total")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the stage's saved state: step, optimiser, EMA, data position, RNG")]
InitFromOpt = Annotated[Optional[Path], typer.Option("--init-from", metavar="SET", help="Start a new run from a model set's weights (e.g. weights/emoji), to train it further or on your own images")]
ClipFromOpt = Annotated[Optional[Path], typer.Option("--clip-from", metavar="SET", help="Prior or decoder: train new weights (another architecture, say) against a model set's CLIP; export --base SET completes the set")]
DataOnDeviceOpt = Annotated[Optional[bool], typer.Option("--data-on-device/--data-on-host", help="Decoder, upsampler: keep the image cache and text states on the training device as tensors, and draw random numbers there (default: on a GPU)")]
TrainBatchOpt = Annotated[Optional[int], typer.Option("--batch-size", help="Per-process batch size (default: the preset's)")]
LrOpt = Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (default: the preset's)")]
CkptMinutesOpt = Annotated[float, typer.Option("--checkpoint-minutes", help="Minutes between checkpoints")]
TrainSeedOpt = Annotated[int, typer.Option("--seed")]


def _run_stage(stage: str, quiet: bool, **options):
    from rich.console import Console

    from unclip_cli.cli.progress import Bars
    from unclip_cli.progress import Tick
    from unclip_cli.train.loop import TrainOptions, train

    o = options
    opts = TrainOptions(stage=stage, run=o["run"].expanduser(), data=str(Path(o["data"]).expanduser()), preset=o["preset"],
                        max_minutes=o["max_minutes"], max_steps=o["max_steps"], resume=o["resume"],
                        init_from=o["init_from"] and o["init_from"].expanduser(), clip_from=o["clip_from"] and o["clip_from"].expanduser(),
                        batch_size=o["batch_size"], lr=o["lr"], checkpoint_minutes=o["checkpoint_minutes"], seed=o["seed"],
                        device=o["device"].value, data_on_device=o["data_on_device"])
    console = Console(stderr=True)
    show = not quiet and console.is_terminal
    with Bars(console, enabled=show) as bars:
        def on_progress(p):
            # The bar counts steps when --max-steps bounds the run, else seconds of --max-minutes.
            total = p.max_steps or (round(p.max_seconds) if p.max_seconds else p.step)
            done = p.step if p.max_steps else (round(p.elapsed) if p.max_seconds else p.step)
            rate = f", {p.images_per_s:.1f} img/s" if p.images_per_s else ""
            bars(Tick(stage, min(done, total), max(total, 1), note=f"step {p.step}, loss {p.loss:.4f}{rate}"))
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
        data: DataOpt, run: RunDirOpt, preset: PresetOpt = "emoji", max_minutes: MaxMinutesOpt = None, max_steps: MaxStepsOpt = None,
        resume: ResumeOpt = False, init_from: InitFromOpt = None, clip_from: ClipFromOpt = None, batch_size: TrainBatchOpt = None,
        lr: LrOpt = None, checkpoint_minutes: CkptMinutesOpt = 10.0, seed: TrainSeedOpt = 0, device: DeviceOpt = DeviceChoice.auto,
        data_on_device: DataOnDeviceOpt = None, quiet: QuietOpt = False,
    ):
        _run_stage(stage, quiet, data=data, run=run, preset=preset, max_minutes=max_minutes, max_steps=max_steps, resume=resume,
                   init_from=init_from, clip_from=clip_from, batch_size=batch_size, lr=lr, checkpoint_minutes=checkpoint_minutes,
                   seed=seed, device=device, data_on_device=data_on_device)

    command.__doc__ = doc
    train_app.command(stage)(command)


_register("clip", "Train CLIP with open_clip's ClipLoss on (image, caption) pairs.")
_register("prior", "Train the diffusion prior (text -> CLIP image embedding) against the run's frozen CLIP.")
_register("decoder", "Train the decoder (CLIP image embedding -> base image, with inpainting) against the run's frozen CLIP.")
_register("upsampler", "Train the upsampler on random crops with a blurred low-resolution condition.")
_register("classifier", "Train the concept classifier that `unclip eval` uses as an independent yardstick (no CLIP, no model set).")


@train_app.command("export-classifier")
def export_classifier_cmd(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="Training run folder with a classifier stage")],
    to: Annotated[Path, typer.Option("--to", help="Checkpoint to write, e.g. weights/classifier/emoji-concepts.safetensors")],
):
    """Write the run's classifier (EMA weights, fp16) as the checkpoint `unclip eval --classifier` reads."""
    from unclip_cli.train.classifier import export_classifier

    typer.echo(str(export_classifier(run.expanduser(), to.expanduser())))


@train_app.command("export")
def export_cmd(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="Training run folder")],
    to: Annotated[Path, typer.Option("--to", help="Destination model-set folder, e.g. weights/emoji")],
    fp32: Annotated[bool, typer.Option("--fp32", help="Keep float32 weights (default: fp16, small tensors fp32)")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing model set")] = False,
    base: Annotated[Optional[Path], typer.Option("--base", metavar="SET", help="Take the stages the run has not trained from this model set (the one given to --init-from)")] = None,
    append_upsampler: Annotated[bool, typer.Option("--append-upsampler", help="Write only the run's upsampler, as one more stage after "
                                                   "the last of --base (which --to may name, to add the stage in place)")] = False,
):
    """Write the run's EMA weights as an inference model set (clip/prior/decoder/upsampler .safetensors)."""
    import torch

    from unclip_cli.errors import InputError
    from unclip_cli.train import export as ex

    dtype = torch.float32 if fp32 else torch.float16
    if append_upsampler:
        if base is None:
            raise InputError("--append-upsampler needs --base SET, the set the stage is added to")
        paths = ex.append_upsampler(run.expanduser(), base.expanduser(), to.expanduser(), dtype=dtype, force=force)
    else:
        paths = ex.export(run.expanduser(), to.expanduser(), dtype=dtype, force=force, base=base and base.expanduser())
    for path in paths:
        typer.echo(str(path))
