"""`unclip convert`: other projects' checkpoints into unclip model sets (`unclip_cli.convert`)."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from unclip_cli.cli import app
from unclip_cli.cli.options import JsonOpt, QuietOpt
from unclip_cli.errors import InputError, UnclipError

convert_app = typer.Typer(help="Convert another project's checkpoints into an unclip model set.", no_args_is_help=True)
app.add_typer(convert_app, name="convert")

DType = Enum("DType", {d: d for d in ("float16", "float32")}, type=str)
VerifyDevice = Enum("VerifyDevice", {d: d for d in ("auto", "cpu", "cuda")}, type=str)

KARLO_EPILOG = """\
[b]Examples[/b]

  unclip convert karlo karlo-v1-alpha --variation karlo-v1-alpha-image-variations --to weights/karlo
  unclip convert karlo karlo-v1-alpha --variation karlo-v1-alpha-image-variations --to weights/karlo --verify
  unclip convert karlo karlo-v1-alpha --variation karlo-v1-alpha-image-variations --check weights/karlo

SRC is a diffusers UnCLIPPipeline folder (kakaobrain/karlo-v1-alpha as downloaded); --variation adds the
image encoder of the UnCLIPImageVariationPipeline folder, which vary, blend and nudge need. --verify and
--check run every converted network beside its original on the same random inputs (they need
`pip install diffusers transformers`) and fail above a relative difference of 1e-4.
"""


def _err(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _report(results: dict[str, float], as_json: bool, limit: float, extra: dict) -> None:
    worst = max(results.values())
    if as_json:
        sys.stdout.write(json.dumps({**extra, "differences": results, "limit": limit, "ok": worst <= limit}, indent=2) + "\n")
    else:
        width = max(map(len, results))
        for name, d in results.items():
            print(f"{name:<{width}}  {d:.2e}  {'ok' if d <= limit else 'DIFFERS'}")
    if worst > limit:
        bad = ", ".join(f"{n} ({d:.1e})" for n, d in results.items() if d > limit)
        raise UnclipError(f"the converted networks differ from the originals: {bad}; the limit is {limit:.0e} relative",
                          hint="convert again from the original folders (a file was altered, or the conversion is wrong)")


def _convert(src, extra, to, check, verify, dtype, device, force, json_, quiet, prepare, check_set) -> None:
    """Every converter's command: check the options and the destination before any work, convert (`prepare`, then
    the shared writer), and/or check the set against its originals (`check_set`). `extra` is the second source
    folder (Karlo's image-variation folder, or Stable unCLIP's prior), or None."""
    import torch

    from unclip_cli.convert import common, verify as verifier

    if (to is None) == (check is None):
        raise typer.BadParameter("give either --to DIR (convert) or --check DIR (check a converted set)", param_hint="--to / --check")
    if verify and check is not None:
        raise typer.BadParameter("--verify checks what --to writes; --check checks an existing set", param_hint="--verify")
    if check is not None and not check.is_dir():
        raise InputError(f"--check {check}: no such model set folder")
    if verify or check is not None:
        verifier.require_diffusers()  # before any work: say how to install them
    dev = device.value
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    also = f" and {extra}" if extra else ""
    if to is not None:
        common.check_destination(to, (src, extra), force)  # before any work
        _err(f"Reading {src}{also}", quiet)
        plan = prepare(src, extra, dtype=torch.float16 if dtype is DType.float16 else torch.float32)
        total = plan.parameters
        _err(f"Converting {total / 1e6:,.1f} M parameters to {dtype.value}", quiet)
        common.write(plan, to, force=force, progress=lambda name: _err(f"  writing {to / name}", quiet))
        if not verify:
            sys.stdout.write(json.dumps({"model_set": str(to), "parameters": total}, indent=2) + "\n" if json_ else f"{to}\n")
            return
    target = to if to is not None else check
    _err(f"Checking {target} against {src}{also} on {dev} (float32)", quiet)
    results = check_set(src, target, extra, device=dev, progress=lambda name: _err(f"  {name}", quiet))
    _report(results, json_, verifier.LIMIT, {"model_set": str(target)})
    if to is not None and not json_:
        print(to)


# The options every family's command shares
ToOpt = Annotated[Optional[Path], typer.Option("--to", metavar="DIR", help="Write the model set here.", show_default=False)]
DTypeOpt = Annotated[DType, typer.Option("--dtype", help="Precision of the written weights (small tensors stay float32).")]
VerifyOpt = Annotated[bool, typer.Option("--verify", help="After converting, check every network against its original.")]
CheckOpt = Annotated[Optional[Path], typer.Option("--check", metavar="DIR", show_default=False,
                                                  help="Check a set converted earlier against SRC; writes nothing.")]
VerifyDeviceOpt = Annotated[VerifyDevice, typer.Option("--device", help="Where --verify / --check run the networks (float32).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Write into a --to folder that is not empty (replacing a set there).")]


@convert_app.command("karlo", epilog=KARLO_EPILOG)
def karlo_command(
    src: Annotated[Path, typer.Argument(metavar="SRC", help="The diffusers Karlo folder (model_index.json, prior/, decoder/, ...).",
                                        show_default=False)],
    to: ToOpt = None,
    variation: Annotated[Optional[Path], typer.Option("--variation", metavar="SRC2", show_default=False,
                                                      help="The image-variation folder: its image_encoder/ and feature_extractor/.")] = None,
    dtype: DTypeOpt = DType.float16,
    verify: VerifyOpt = False,
    check: CheckOpt = None,
    device: VerifyDeviceOpt = VerifyDevice.cpu,
    force: ForceOpt = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Convert Karlo (kakaobrain/karlo-v1-alpha, diffusers layout) into an unclip model set, or check one."""
    from unclip_cli.convert import karlo, verify as verifier

    _convert(src, variation, to, check, verify, dtype, device, force, json_, quiet, karlo.prepare, verifier.check)


STABLE_UNCLIP_EPILOG = """\
[b]Examples[/b]

  unclip convert stable-unclip stable-diffusion-2-1-unclip-small --prior karlo-v1-alpha --to weights/sd-unclip-small
  unclip convert stable-unclip stable-diffusion-2-1-unclip --to weights/sd-unclip --verify
  unclip convert stable-unclip stable-diffusion-2-1-unclip-small --prior karlo-v1-alpha --check weights/sd-unclip-small

SRC is a diffusers StableUnCLIPImg2ImgPipeline folder: the set varies, blends and edits images. --prior adds Karlo's
prior and CLIP text encoder (a diffusers UnCLIPPipeline folder), for generate and nudge; its embeddings must be the
image encoder's (CLIP ViT-L/14: the -small model). --verify and --check run every converted network beside its
original (they need `pip install diffusers transformers`).
"""


@convert_app.command("stable-unclip", epilog=STABLE_UNCLIP_EPILOG)
def stable_unclip_command(
    src: Annotated[Path, typer.Argument(metavar="SRC", help="The diffusers Stable unCLIP img2img folder (model_index.json, unet/, vae/, ...).",
                                        show_default=False)],
    to: ToOpt = None,
    prior: Annotated[Optional[Path], typer.Option("--prior", metavar="KARLO_SRC", show_default=False,
                                                  help="A diffusers Karlo folder: its prior and CLIP text encoder (for generate).")] = None,
    dtype: DTypeOpt = DType.float16,
    verify: VerifyOpt = False,
    check: CheckOpt = None,
    device: VerifyDeviceOpt = VerifyDevice.cpu,
    force: ForceOpt = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Convert Stable unCLIP 2.1 (stabilityai/stable-diffusion-2-1-unclip[-small], diffusers layout) into an unclip model set."""
    from unclip_cli.convert import stable_unclip, verify_stable_unclip

    _convert(src, prior, to, check, verify, dtype, device, force, json_, quiet, stable_unclip.prepare, verify_stable_unclip.check)
