"""Options shared by the commands, defined once, and `image_command`, which gives every image command the
common ones without repeating them in each signature.

Limits and defaults come from `unclip_cli.requests`, so help texts say what the validation enforces.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import typing
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

import unclip_cli
from unclip_cli.cli import app
from unclip_cli.errors import WeightsError
from unclip_cli.requests import DEFAULT_BATCH, DEFAULT_GUIDANCE, DEFAULT_PRIOR_GUIDANCE, MAX_N, PRECISIONS, QUALITY

P_MODEL, P_SAMPLING, P_OUTPUT = "Model", "Sampling", "Output"
# Options for one model family only, in a panel of their own shown last, so that what applies to the shipped emoji set
# (and Karlo) comes first
P_FAMILY = "Stable unCLIP sets only"

Quality = Enum("Quality", {q: q for q in QUALITY}, type=str)
DeviceChoice = Enum("DeviceChoice", {d: d for d in ("auto", "cpu", "cuda", "mps")}, type=str)
Fit = Enum("Fit", {f: f for f in ("crop", "pad")}, type=str)



def _weights_dir(value) -> Path:
    """--weights as given: an empty value is a mistake (a variable that was not set), not the current folder."""
    if not str(value).strip():
        raise WeightsError("--weights is empty", hint="pass a model-set folder, or leave --weights out for the shipped one")
    return Path(value)


WeightsOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--weights", "-w", envvar="UNCLIP_WEIGHTS", metavar="DIR", show_default="the shipped weights/emoji", parser=_weights_dir,
        help="Model set folder (clip, prior, decoder, upsampler .safetensors).", rich_help_panel=P_MODEL,
    ),
]
DeviceOpt = Annotated[
    DeviceChoice, typer.Option("--device", help="Where to run: auto picks cuda, then mps, then cpu.", rich_help_panel=P_MODEL)
]
Offload = Enum("Offload", {m: m for m in ("auto", "on", "off")}, type=str)
OffloadOpt = Annotated[
    Offload, typer.Option("--offload", rich_help_panel=P_MODEL,
                          help="Keep only the network in use in memory, reading each stage again when it runs (slower, far less "
                               "memory: how a multi-gigabyte set runs on a small GPU or a 16 GB machine); auto: when the set "
                               "would take over 70% of the free memory.")
]
Precision = Enum("Precision", {m: m for m in PRECISIONS}, type=str)
PrecisionOpt = Annotated[
    Optional[Precision], typer.Option("--precision", rich_help_panel=P_MODEL, show_default="auto",
                                      help="CPU arithmetic of the networks: bf16 is faster where the CPU has it natively (recent "
                                           "Intel Xeon, AMD Zen 4, Arm v8.6) and rounds differently; auto picks it there when "
                                           "the set's card measured its quality as fp32's. Recorded; --from reruns the recorded "
                                           "one. GPUs run fp16 either way.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON result on stdout instead of file paths.", rich_help_panel=P_OUTPUT)]
JsonShowOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]  # commands that write no files
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or notes on stderr (warnings still show).",
                                        rich_help_panel=P_OUTPUT)]
NOpt = Annotated[Optional[int], typer.Option("-n", "--num", show_default=False, help=f"How many images (1-{MAX_N}, default 1), from consecutive seeds.")]
FitOpt = Annotated[Optional[Fit], typer.Option("--fit", show_default=False,
                                               help="Make a non-square input square by cropping its centre (default) or padding it with white.")]
_RECIPE_HELP = "Rerun the recipe stored in a PNG written by unclip; options given here override it."
RecipeOpt = Annotated[Optional[Path], typer.Option("--from", "--recipe", metavar="PNG", show_default=False, help=_RECIPE_HELP)]


def _sampling(flag: str, kind, help: str, show_default=None, *names: str):
    return Annotated[Optional[kind], typer.Option(flag, *names, show_default=show_default, help=help, rich_help_panel=P_SAMPLING)]


SeedOpt = _sampling("--seed", int, "Seed of the first image; image i uses seed+i, so each reproduces on its own.",
                    "random, printed and recorded", "-s")
# No show_default: Typer shows a text default in parentheses, and "[default: (default)]" reads as a mistake
QualityOpt = Annotated[Optional[Quality], typer.Option("--quality", show_default=False, rich_help_panel=P_SAMPLING,
                                                       help="Sampling-step preset: fast, default (when not given) or best.")]
PriorStepsOpt = _sampling("--prior-steps", int, "Prior sampling steps (instead of the quality preset's).")
DecoderStepsOpt = _sampling("--decoder-steps", int, "Decoder sampling steps (instead of the quality preset's).")
UpsamplerStepsOpt = _sampling("--upsampler-steps", int, "Upsampler sampling steps (instead of the quality preset's).")
GuidanceOpt = _sampling("--guidance", float, "Decoder classifier-free guidance scale (1 = none).",
                        f"the model set's: {DEFAULT_GUIDANCE:g} for emoji, 8 for Karlo", "-g")
PriorGuidanceOpt = _sampling("--prior-guidance", float, "Prior classifier-free guidance scale (1 = none).",
                             f"the model set's: {DEFAULT_PRIOR_GUIDANCE:g} for emoji, 4 for Karlo")
BatchSizeOpt = _sampling("--batch-size", int, "Images per model call; lower it if memory runs out. Another batch size changes "
                         "pixels only by rounding; --from reruns the recorded one.", str(DEFAULT_BATCH))
SizeOpt = Annotated[Optional[int], typer.Option("--size", show_default="the model set's", rich_help_panel=P_FAMILY,
                                                help="Output size in pixels, for a set that decodes at several sizes (a latent "
                                                     "decoder: Stable unCLIP at 512 as well as its native 768, at 0.4 of the "
                                                     "FLOPs per step); the emoji and Karlo sets have one size.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="Folder for the results (created if needed).", rich_help_panel=P_OUTPUT)]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite files of the same name instead of adding -run2, -run3... to this run's names.",
                                        rich_help_panel=P_OUTPUT)]
NoMetadataOpt = Annotated[bool, typer.Option("--no-metadata", help="Do not store the recipe in the PNG files.", rich_help_panel=P_OUTPUT)]


@dataclasses.dataclass
class Common:
    """The options every image command shares; `image_command` adds them to each command's signature."""

    weights: WeightsOpt = None
    device: DeviceOpt = DeviceChoice.auto
    offload: OffloadOpt = Offload.auto
    precision: PrecisionOpt = None
    seed: SeedOpt = None
    quality: QualityOpt = None
    prior_steps: PriorStepsOpt = None
    decoder_steps: DecoderStepsOpt = None
    upsampler_steps: UpsamplerStepsOpt = None
    guidance: GuidanceOpt = None
    prior_guidance: PriorGuidanceOpt = None
    batch_size: BatchSizeOpt = None
    size: SizeOpt = None
    out: OutOpt = Path("outputs")
    force: ForceOpt = False
    json: JsonOpt = False
    quiet: QuietOpt = False
    no_metadata: NoMetadataOpt = False

    def sampling(self) -> dict:
        """The request fields given on the command line (None = not given)."""
        return {"seed": self.seed, "quality": self.quality.value if self.quality else None, "prior_steps": self.prior_steps,
                "decoder_steps": self.decoder_steps, "upsampler_steps": self.upsampler_steps, "guidance": self.guidance,
                "prior_guidance": self.prior_guidance, "batch_size": self.batch_size, "size": self.size,
                "precision": self.precision.value if self.precision else None}


def _param(name: str, hints: dict, default, kind=inspect.Parameter.KEYWORD_ONLY) -> inspect.Parameter:
    return inspect.Parameter(name if name != "json" else "json_", kind, default=default, annotation=hints[name])


_COMMON = [_param(f.name, typing.get_type_hints(Common, include_extras=True), f.default) for f in dataclasses.fields(Common)]


def _panel(param: inspect.Parameter) -> str | None:
    """The help panel an Annotated option names, if any."""
    return next((m.rich_help_panel for m in getattr(param.annotation, "__metadata__", ()) if hasattr(m, "rich_help_panel")), None)


def _prior_option(param: inspect.Parameter, prior: str | None) -> inspect.Parameter:
    """--prior-steps or --prior-guidance as a command that runs the prior only sometimes shows it: its help says when
    (`prior`), or, for one that never does (None), hidden and still accepted, so that command lines written for
    every command (a script's shared step flags) keep working."""
    import copy

    kind, info = typing.get_args(param.annotation)[:2]
    info = copy.copy(info)
    if prior is None:
        info.hidden = True
    else:
        info.help = f"{info.help} Used only when {prior}."
    return param.replace(annotation=Annotated[kind, info])


def image_command(prior: str | None = "", **kwargs):
    """Register an image command whose function takes its own parameters plus `common: Common`; the common
    options are appended to its signature, so Typer shows them and each command lists only its own. `prior`: when
    the command runs the prior, for the help of its options: "" always, None never (they are hidden), else the case."""

    def register(fn):
        hints = typing.get_type_hints(fn, include_extras=True)  # resolved in the command's module
        own = [_param(p.name, hints, p.default, p.kind) for p in inspect.signature(fn).parameters.values() if p.name != "common"]
        common = [_prior_option(p, prior) if prior != "" and p.name in ("prior_steps", "prior_guidance") else p for p in _COMMON]

        @functools.wraps(fn)
        def command(**values):
            common = Common(**{f.name: values.pop(f.name if f.name != "json" else "json_") for f in dataclasses.fields(Common)})
            return fn(**values, common=common)

        params = own + common
        params = [p for p in params if _panel(p) != P_FAMILY] + [  # shown last
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params if _panel(p) == P_FAMILY]
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__  # Typer must read the new signature, not the wrapped function's
        return app.command(**kwargs)(command)

    return register


# -- weights -----------------------------------------------------------------------------------------
def shipped_weights_candidates() -> list[Path]:
    """Where the shipped model set may live: the source checkout, then an installed copy."""
    pkg = Path(unclip_cli.__file__).resolve().parent
    return [pkg.parent / "weights" / "emoji", pkg / "weights" / "emoji", Path(sys.prefix) / "share" / "unclip" / "weights" / "emoji"]


def resolve_weights(weights: Optional[Path]) -> Path:
    """The model-set folder to load: --weights / UNCLIP_WEIGHTS, else the shipped one. Checks it exists."""
    if weights is not None:
        if not weights.exists():
            raise WeightsError(
                f"weights folder {weights} does not exist",
                hint="pass a folder with clip/prior/decoder/upsampler .safetensors files via --weights DIR or UNCLIP_WEIGHTS",
            )
        if not weights.is_dir():
            raise WeightsError(f"--weights {weights} is a file; it must be a model-set folder",
                               hint="pass the folder that holds the .safetensors files")
        return weights
    for cand in shipped_weights_candidates():
        if cand.is_dir() and any(cand.glob("*.safetensors")):
            return cand
    raise WeightsError(
        "no trained model is shipped with this copy of unclip yet (weights/emoji has no model files)",
        hint="pass a model set with --weights DIR or the UNCLIP_WEIGHTS environment variable, "
        "e.g. one written by `unclip train export`",
    )
