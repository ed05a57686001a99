"""The image commands: generate, vary, blend, edit, nudge.

Each command parses its options, checks every input and the output folder before any model work,
calls the engine, and writes the results atomically (`unclip_cli.imageio.OutputSet`). Results go to
stdout (one path per line, or JSON with --json); notes, warnings and progress bars go to stderr.
No model math happens here.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

import unclip_cli
from unclip_cli.cli import app
from unclip_cli.errors import InputError, WeightsError

MAX_N = 64  # images per command; more is almost always a typo, and a grid of 64 is already large
MAX_FRAMES = 64
MAX_STEPS = 1000
MAX_GUIDANCE = 30
MAX_SEED = 2**63 - 1 - MAX_N  # image i uses seed + i
P_MODEL, P_SAMPLING, P_OUTPUT = "Model", "Sampling", "Output"


class Quality(str, Enum):
    fast = "fast"
    default = "default"
    best = "best"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class Fit(str, Enum):
    crop = "crop"
    pad = "pad"


# ----------------------------------------------------------------------------------------------------
# Shared options, defined once

WeightsOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--weights", "-w", envvar="UNCLIP_WEIGHTS", metavar="DIR", show_default="the shipped weights/emoji",
        help="Model set folder (clip, prior, decoder, upsampler .safetensors).", rich_help_panel=P_MODEL,
    ),
]
DeviceOpt = Annotated[
    Device, typer.Option("--device", help="Where to run: auto picks cuda, then mps, then cpu.", rich_help_panel=P_MODEL)
]
SeedOpt = Annotated[
    Optional[int],
    typer.Option(
        "--seed", "-s", show_default="random, printed and recorded",
        help="Seed of the first image; image i uses seed+i, so each reproduces on its own.", rich_help_panel=P_SAMPLING,
    ),
]
QualityOpt = Annotated[
    Optional[Quality],
    typer.Option("--quality", show_default=False, help="Sampling-step preset (default: default).", rich_help_panel=P_SAMPLING),
]
PriorStepsOpt = Annotated[
    Optional[int], typer.Option("--prior-steps", help="Prior sampling steps (overrides --quality).", rich_help_panel=P_SAMPLING)
]
DecoderStepsOpt = Annotated[
    Optional[int], typer.Option("--decoder-steps", help="Decoder sampling steps (overrides --quality).", rich_help_panel=P_SAMPLING)
]
UpsamplerStepsOpt = Annotated[
    Optional[int],
    typer.Option("--upsampler-steps", help="Upsampler sampling steps (overrides --quality).", rich_help_panel=P_SAMPLING),
]
GuidanceOpt = Annotated[
    Optional[float],
    typer.Option("--guidance", "-g", show_default="the model's", help="Decoder classifier-free guidance scale (1 = none).",
                 rich_help_panel=P_SAMPLING),
]
PriorGuidanceOpt = Annotated[
    Optional[float],
    typer.Option("--prior-guidance", show_default="the model's", help="Prior classifier-free guidance scale (1 = none).",
                 rich_help_panel=P_SAMPLING),
]
BatchSizeOpt = Annotated[
    Optional[int],
    typer.Option("--batch-size", show_default="8",
                 help="Images per model call; lower it if memory runs out. Results do not depend on it.",
                 rich_help_panel=P_SAMPLING),
]
OutOpt = Annotated[
    Path, typer.Option("--out", "-o", metavar="DIR", help="Folder for the results (created if needed).", rich_help_panel=P_OUTPUT)
]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Overwrite files of the same name instead of picking the next free name.",
                       rich_help_panel=P_OUTPUT)
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print a JSON result on stdout instead of file paths.", rich_help_panel=P_OUTPUT)
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bars or notes on stderr (warnings still show).",
                       rich_help_panel=P_OUTPUT)
]
NoMetadataOpt = Annotated[
    bool, typer.Option("--no-metadata", help="Do not store the recipe in the PNG files.", rich_help_panel=P_OUTPUT)
]
NOpt = Annotated[
    Optional[int], typer.Option("-n", "--num", show_default=False, help=f"How many images (1-{MAX_N}, default 1), from consecutive seeds.")
]
FitOpt = Annotated[
    Optional[Fit],
    typer.Option("--fit", show_default=False,
                 help="Make a non-square input square by cropping its centre (default) or padding it with white."),
]
RecipeOpt = Annotated[
    Optional[Path],
    typer.Option("--from", "--recipe", metavar="PNG", show_default=False,
                 help="Rerun the recipe stored in a PNG written by unclip; options given here override it."),
]
# `nudge` uses --from for its text, so there the recipe option is only --recipe.
NudgeRecipeOpt = Annotated[
    Optional[Path],
    typer.Option("--recipe", metavar="PNG", show_default=False,
                 help="Rerun the recipe stored in a PNG written by unclip; options given here override it."),
]


@dataclasses.dataclass
class Common:
    """The options every image command shares."""

    weights: Optional[Path] = None
    device: Device = Device.auto
    seed: Optional[int] = None
    quality: Optional[Quality] = None
    prior_steps: Optional[int] = None
    decoder_steps: Optional[int] = None
    upsampler_steps: Optional[int] = None
    guidance: Optional[float] = None
    prior_guidance: Optional[float] = None
    batch_size: Optional[int] = None
    out: Path = Path("outputs")
    force: bool = False
    json: bool = False
    quiet: bool = False
    no_metadata: bool = False


# ----------------------------------------------------------------------------------------------------
# Weights


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


def rerun_command(path: Path, recipe: dict) -> str:
    """The command line that reruns a stored recipe."""
    op = recipe.get("op", "generate")
    if op == "generate":
        return f"unclip generate --from {path}"
    inputs = {"vary": "IMAGE", "blend": "A B", "edit": "IMAGE --mask MASK", "nudge": "IMAGE"}.get(op, "...")
    option = "--recipe" if op == "nudge" else "--from"  # nudge's --from is its text
    return f"unclip {op} {inputs} {option} {path}"


# ----------------------------------------------------------------------------------------------------
# One run of a command: checks, console output, the engine call, writing


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


class StageBars:
    """Rich progress bars, one per engine stage, fed by the engine's callback(stage, i, total).

    Drawn only when stderr is a terminal and --quiet is off. A stage runs once per batch (`passes`
    times; DDIM inversion once per input image, `inversions` times) and fills one bar over all runs.
    """

    def __init__(self, console, enabled: bool, passes: int = 1, inversions: int = 1):
        self.console = console
        self.enabled = enabled
        self.passes = {"invert": inversions}
        self.default_passes = passes
        self.progress = None
        self.tasks: dict[str, dict] = {}

    def __enter__(self) -> "StageBars":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("{task.description:>11}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=False,
            )
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def callback(self, stage: str, i: int, total: int) -> None:
        if self.progress is None:
            return
        t = self.tasks.get(stage)
        if t is None:
            expected = total * self.passes.get(stage, self.default_passes)
            t = self.tasks[stage] = {"id": self.progress.add_task(stage, total=expected), "base": 0, "last": -1,
                                     "total": total, "expected": expected}
        elif i <= t["last"]:  # the stage started again: the next batch, or the next input image
            t["base"] += t["total"]
            t["total"] = total
            if t["base"] + total > t["expected"]:
                t["expected"] = t["base"] + total
                self.progress.update(t["id"], total=t["expected"])
        t["last"] = i
        self.progress.update(t["id"], completed=t["base"] + min(i, total))


class Run:
    """Shared machinery of one image command."""

    def __init__(self, op: str, c: Common, recipe_path: Optional[Path] = None):
        self.op = op
        self.c = c
        self.err = _stderr_console()
        self.warnings: list[str] = []
        self.recipe: dict = {}
        if recipe_path is not None:
            from unclip_cli.imageio import read_recipe

            self.recipe = read_recipe(recipe_path)
            if self.recipe.get("op") != op:
                raise InputError(
                    f"{recipe_path} was made by `unclip {self.recipe.get('op')}`, not `unclip {op}`",
                    hint=f"rerun it with `{rerun_command(recipe_path, self.recipe)}`",
                )
        self._check_common()

    # -- console
    def note(self, msg: str) -> None:
        if not self.c.quiet:
            self.err.print(msg, markup=False)

    def warn(self, msg: str) -> None:
        if msg not in self.warnings:
            self.warnings.append(msg)
            self.err.print(f"Warning: {msg}", markup=False, style="yellow")

    # -- option resolution (command line > recipe > default)
    def pick(self, given: Any, key: str, default: Any = None) -> Any:
        if given is not None:
            return given
        return self.recipe.get(key, default)

    def _check_common(self) -> None:
        c = self.c
        for name, v in (("--prior-steps", c.prior_steps), ("--decoder-steps", c.decoder_steps),
                        ("--upsampler-steps", c.upsampler_steps)):
            if v is not None and not 1 <= v <= MAX_STEPS:
                raise InputError(f"{name} must be between 1 and {MAX_STEPS}, not {v}")
        for name, v in (("--guidance", c.guidance), ("--prior-guidance", c.prior_guidance)):
            if v is not None and not (0 <= v <= MAX_GUIDANCE):
                raise InputError(f"{name} must be between 0 and {MAX_GUIDANCE}, not {v:g}", hint="1 means no guidance; 1.5-5 is typical")
        if c.batch_size is not None and c.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, not {c.batch_size}")
        if c.seed is not None and not 0 <= c.seed <= MAX_SEED:
            raise InputError(f"--seed must be between 0 and {MAX_SEED}, not {c.seed}")
        from unclip_cli.imageio import check_out_dir

        check_out_dir(c.out)
        self.weights_dir = resolve_weights(c.weights)

    def check_n(self, n: Optional[int]) -> int:
        n = 1 if n is None else n
        if not 1 <= n <= MAX_N:
            raise InputError(f"-n must be between 1 and {MAX_N}, not {n}",
                             hint=f"for more than {MAX_N} images, run the command again with another --seed")
        return n

    @staticmethod
    def check_text(text: Optional[str], what: str, hint: str) -> str:
        if text is None:
            raise InputError(f"{what} is missing", hint=hint)
        if not text.strip():
            raise InputError(f"{what} is empty", hint=hint)
        return text.strip()

    @staticmethod
    def check_range(value: float, name: str, lo: float, hi: float) -> float:
        if not lo <= value <= hi:
            raise InputError(f"{name} must be between {lo:g} and {hi:g}, not {value:g}")
        return value

    def fit(self, fit: Optional[Fit]) -> str:
        """--fit, else the recipe's, else crop."""
        value = self.pick(fit.value if fit is not None else None, "fit", "crop")
        if value not in ("crop", "pad"):
            raise InputError(f"unknown fit {value!r}", hint="use --fit crop or --fit pad")
        return value

    def load_image(self, path: Path, fit: Optional[str]):
        from unclip_cli.imageio import load_image

        image, notes = load_image(path, fit=fit)
        for n in notes:
            self.note(n)
        return image

    # -- the engine
    def engine(self):
        from unclip_cli.engine import Engine

        status = self.err.status("Loading the model…") if (self.err.is_terminal and not self.c.quiet) else None
        if status is not None:
            status.start()
        try:
            eng = Engine.load(self.weights_dir, device=self.c.device.value)
        finally:
            if status is not None:
                status.stop()
        self.note(f"Model {eng.name} from {self.weights_dir} on {eng.device}")
        rm = self.recipe
        if rm.get("model_hash"):
            h = eng.info().get("model_hash")
            if h and h != rm["model_hash"]:
                self.warn(f"the recipe was made with model {rm.get('model')} ({rm['model_hash']}), "
                          f"not the loaded {eng.name} ({h}): the result will differ")
        self.eng = eng
        return eng

    def sampling(self) -> dict:
        """Keyword arguments common to every engine operation."""
        from unclip_cli.engine import QUALITY, Steps, quality_steps

        c, r = self.c, self.recipe
        seed = c.seed if c.seed is not None else r.get("seed")
        if seed is None:
            seed = secrets.randbelow(2**32)
        self.seed = int(seed)
        quality = c.quality.value if c.quality is not None else r.get("quality") or "default"
        if quality not in QUALITY:
            raise InputError(f"unknown quality {quality!r}", hint=f"use one of {', '.join(QUALITY)}")
        steps = None
        if c.quality is None and isinstance(r.get("steps"), dict):
            # A recipe from before decoder candidates existed has none: it was made with one.
            steps = Steps(**{k: int(r["steps"][k]) for k in ("prior", "decoder", "upsampler")},
                          decoder_candidates=int(r["steps"].get("decoder_candidates", 1)))
        if any(v is not None for v in (c.prior_steps, c.decoder_steps, c.upsampler_steps)):
            base = steps or quality_steps(quality, self.op)
            steps = dataclasses.replace(
                base,
                prior=c.prior_steps or base.prior,
                decoder=c.decoder_steps or base.decoder,
                upsampler=c.upsampler_steps or base.upsampler,
            )
        self.note(f"Seed: {self.seed}")
        return dict(
            seed=self.seed, quality=quality, steps=steps,
            guidance=self.pick(c.guidance, "guidance"), prior_guidance=self.pick(c.prior_guidance, "prior_guidance"),
            batch_size=c.batch_size,
        )

    def call(self, fn: Callable, *args, count: int = 1, inversions: int = 1, **kwargs):
        """Run an engine operation under the progress bars; show its warnings.

        `count` is the number of images (so the bars know how many batches there are) and `inversions`
        the number of input images the operation inverts."""
        from unclip_cli.engine import Engine

        show = self.err.is_terminal and not self.c.quiet
        passes = len(list(Engine._chunks(count, self.c.batch_size)))
        with StageBars(self.err, enabled=show, passes=passes, inversions=inversions) as bars:
            result = fn(*args, callback=bars.callback, **kwargs)
        for w in result.warnings:
            self.warn(w)
        return result

    # -- writing
    def write(self, write_fn: Callable) -> list[Path]:
        """Write the outputs all-or-nothing; `write_fn(outs)` adds the files to an OutputSet."""
        from unclip_cli.imageio import OutputSet

        with OutputSet(self.c.out, force=self.c.force, metadata=not self.c.no_metadata) as outs:
            write_fn(outs)
        return outs.paths

    def report(self, payload: dict, paths: list[Path]) -> None:
        payload = {"command": self.op, "model": self.eng.name, "device": str(self.eng.device), "seed": self.seed,
                   **payload, "files": [str(p) for p in paths], "warnings": self.warnings}
        if self.c.json:
            sys.stdout.write(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
        else:
            for p in paths:
                sys.stdout.write(f"{p}\n")
        sys.stdout.flush()


def _images_with_grid(run: Run, result, stem: str, extra: dict) -> None:
    """Write one PNG per image (plus a grid when there are several) and report them."""
    recipes = [{**r, **extra} for r in result.recipes]
    stem = f"{stem}-{run.seed}"
    image_paths: list[Path] = []
    grid_path: list[Path] = []

    def write(outs) -> None:
        from unclip_cli.imageio import grid

        for im, rec in zip(result.images, recipes):
            image_paths.append(outs.add_png(im, stem, index=True, recipe=rec))
        if len(result.images) > 1:
            grid_path.append(outs.add_png(grid(result.images), f"{stem}-grid"))

    paths = run.write(write)
    # The final names can differ from the planned ones if another process took a name meanwhile.
    final = dict(zip(image_paths + grid_path, paths))
    run.report(
        {
            "images": [{"path": str(final[p]), "seed": rec.get("seed"), "recipe": rec} for p, rec in zip(image_paths, recipes)],
            "grid": str(final[grid_path[0]]) if grid_path else None,
        },
        paths,
    )


def _stem(*parts: str, max_len: int = 40) -> str:
    from unclip_cli.imageio import slugify

    return slugify(" ".join(p for p in parts if p), max_len=max_len)


def _name_part(path: Path, max_len: int = 16) -> str:
    from unclip_cli.imageio import slugify

    return slugify(path.stem, max_len=max_len, fallback="image")


# ----------------------------------------------------------------------------------------------------
# Commands

GENERATE_EXAMPLES = """\
[b]Examples[/b]

  unclip generate "a red apple"
  unclip generate "a smiling cat" -n 4 --seed 42
  unclip generate "猫" --quality best --out cats
  unclip generate --from outputs/a-red-apple-42-0.png   [dim]# rerun a stored recipe[/dim]
"""


@app.command(epilog=GENERATE_EXAMPLES)
def generate(
    prompt: Annotated[Optional[str], typer.Argument(metavar="PROMPT", help="What to draw.", show_default=False)] = None,
    n: NOpt = None,
    recipe: RecipeOpt = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = Device.auto,
    seed: SeedOpt = None,
    quality: QualityOpt = None,
    prior_steps: PriorStepsOpt = None,
    decoder_steps: DecoderStepsOpt = None,
    upsampler_steps: UpsamplerStepsOpt = None,
    guidance: GuidanceOpt = None,
    prior_guidance: PriorGuidanceOpt = None,
    batch_size: BatchSizeOpt = None,
    out: OutOpt = Path("outputs"),
    force: ForceOpt = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    no_metadata: NoMetadataOpt = False,
) -> None:
    """Draw images from a text prompt (text → prior → decoder → upsampler)."""
    c = Common(weights=weights, device=device, seed=seed, quality=quality, prior_steps=prior_steps,
                decoder_steps=decoder_steps, upsampler_steps=upsampler_steps, guidance=guidance,
                prior_guidance=prior_guidance, batch_size=batch_size, out=out, force=force, json=json_,
                quiet=quiet, no_metadata=no_metadata)
    run = Run("generate", c, recipe)
    text = run.check_text(run.pick(prompt, "prompt"), "the prompt", 'say what to draw, e.g. unclip generate "a red apple"')
    n = run.check_n(n)
    eng = run.engine()
    result = run.call(eng.generate, text, n=n, count=n, **run.sampling())
    _images_with_grid(run, result, _stem(text), {})


VARY_EXAMPLES = """\
[b]Examples[/b]

  unclip vary painting.jpg
  unclip vary photo.png -n 4 --strength 0.3    [dim]# close to the input[/dim]
  unclip vary wide.jpg --fit pad               [dim]# keep the whole picture[/dim]
"""


@app.command(epilog=VARY_EXAMPLES)
def vary(
    image: Annotated[Path, typer.Argument(metavar="IMAGE", help="The image to vary (any size and common format).", show_default=False)],
    n: NOpt = None,
    strength: Annotated[
        Optional[float],
        typer.Option("--strength", show_default="0.5", help="0 reconstructs the input, 1 starts from fresh noise."),
    ] = None,
    fit: FitOpt = None,
    recipe: RecipeOpt = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = Device.auto,
    seed: SeedOpt = None,
    quality: QualityOpt = None,
    prior_steps: PriorStepsOpt = None,
    decoder_steps: DecoderStepsOpt = None,
    upsampler_steps: UpsamplerStepsOpt = None,
    guidance: GuidanceOpt = None,
    prior_guidance: PriorGuidanceOpt = None,
    batch_size: BatchSizeOpt = None,
    out: OutOpt = Path("outputs"),
    force: ForceOpt = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    no_metadata: NoMetadataOpt = False,
) -> None:
    """Make variations that keep the gist of an image (its CLIP embedding, decoded again)."""
    c = Common(weights=weights, device=device, seed=seed, quality=quality, prior_steps=prior_steps,
                decoder_steps=decoder_steps, upsampler_steps=upsampler_steps, guidance=guidance,
                prior_guidance=prior_guidance, batch_size=batch_size, out=out, force=force, json=json_,
                quiet=quiet, no_metadata=no_metadata)
    run = Run("vary", c, recipe)
    n = run.check_n(n)
    strength = run.check_range(float(run.pick(strength, "strength", 0.5)), "--strength", 0.0, 1.0)
    fit = run.fit(fit)
    img = run.load_image(image, fit)
    eng = run.engine()
    result = run.call(eng.vary, img, n=n, strength=strength, count=n, **run.sampling())
    _images_with_grid(run, result, _stem(_name_part(image), "vary"), {"input": image.name, "fit": fit})


BLEND_EXAMPLES = """\
[b]Examples[/b]

  unclip blend a.png b.png --steps 5
  unclip blend cat.png dog.jpg --steps 9 --fps 12 --seed 7
"""


@app.command(epilog=BLEND_EXAMPLES)
def blend(
    image_a: Annotated[Path, typer.Argument(metavar="A", help="The first image.", show_default=False)],
    image_b: Annotated[Path, typer.Argument(metavar="B", help="The last image.", show_default=False)],
    frames: Annotated[
        Optional[int],
        typer.Option("--steps", "--frames", "-k", show_default="5",
                     help=f"Frames from A to B, both included (2-{MAX_FRAMES})."),
    ] = None,
    fps: Annotated[float, typer.Option("--fps", help="Frames per second of the animation.")] = 6.0,
    fit: FitOpt = None,
    recipe: RecipeOpt = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = Device.auto,
    seed: SeedOpt = None,
    quality: QualityOpt = None,
    prior_steps: PriorStepsOpt = None,
    decoder_steps: DecoderStepsOpt = None,
    upsampler_steps: UpsamplerStepsOpt = None,
    guidance: GuidanceOpt = None,
    prior_guidance: PriorGuidanceOpt = None,
    batch_size: BatchSizeOpt = None,
    out: OutOpt = Path("outputs"),
    force: ForceOpt = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    no_metadata: NoMetadataOpt = False,
) -> None:
    """Morph one image into another: the frames, a strip and an animated GIF (and WebP)."""
    c = Common(weights=weights, device=device, seed=seed, quality=quality, prior_steps=prior_steps,
                decoder_steps=decoder_steps, upsampler_steps=upsampler_steps, guidance=guidance,
                prior_guidance=prior_guidance, batch_size=batch_size, out=out, force=force, json=json_,
                quiet=quiet, no_metadata=no_metadata)
    run = Run("blend", c, recipe)
    k = int(run.pick(frames, "frames", 5))
    if not 2 <= k <= MAX_FRAMES:
        raise InputError(f"--steps must be between 2 and {MAX_FRAMES} frames, not {k}")
    if not 0.1 <= fps <= 100:
        raise InputError(f"--fps must be between 0.1 and 100, not {fps:g}")
    fit = run.fit(fit)
    a = run.load_image(image_a, fit)
    b = run.load_image(image_b, fit)
    eng = run.engine()
    result = run.call(eng.blend, a, b, frames=k, count=k, inversions=2, **run.sampling())
    stem = _stem(_name_part(image_a), _name_part(image_b), "blend")
    seed_stem = f"{stem}-{run.seed}"
    extra = {"inputs": [image_a.name, image_b.name], "fit": fit}
    recipes = [{**r, **extra} for r in result.recipes]
    named: dict[str, Any] = {"frames": []}
    from unclip_cli.imageio import webp_supported

    def write(outs) -> None:
        from unclip_cli.imageio import strip

        for im, rec in zip(result.images, recipes):
            named["frames"].append(outs.add_png(im, seed_stem, index=True, recipe=rec))
        named["strip"] = outs.add_png(strip(result.images), f"{seed_stem}-strip")
        named["gif"] = outs.add_gif(result.images, seed_stem, fps=fps)
        named["webp"] = outs.add_webp(result.images, seed_stem, fps=fps) if webp_supported() else None

    if not webp_supported():
        run.note("This Pillow has no WebP support: writing the GIF only")
    paths = run.write(write)
    planned = named["frames"] + [named["strip"], named["gif"]] + ([named["webp"]] if named["webp"] else [])
    final = dict(zip(planned, paths))
    run.report(
        {
            "images": [{"path": str(final[p]), "seed": rec.get("seed"), "recipe": rec} for p, rec in zip(named["frames"], recipes)],
            "strip": str(final[named["strip"]]),
            "gif": str(final[named["gif"]]),
            "webp": str(final[named["webp"]]) if named["webp"] else None,
        },
        paths,
    )


EDIT_EXAMPLES = """\
[b]Examples[/b]

  unclip edit photo.png --mask mask.png "a red hat"
  unclip edit photo.png --mask keep.png --invert-mask "a starry sky" -n 4

A mask marks in white what to repaint (black is kept). A mask with transparency marks the
transparent area instead, as the DALL-E edits API does. The results have the input's size, and
pixels outside the mask are kept exactly.
"""


@app.command(epilog=EDIT_EXAMPLES)
def edit(
    image: Annotated[Path, typer.Argument(metavar="IMAGE", help="The image to edit.", show_default=False)],
    prompt: Annotated[Optional[str], typer.Argument(metavar="PROMPT", help="What to paint in the masked area.", show_default=False)] = None,
    mask: Annotated[
        Optional[Path],
        typer.Option("--mask", "-m", metavar="MASK", show_default=False,
                     help="White (or transparent) = repaint, black = keep (required)."),
    ] = None,
    invert_mask: Annotated[bool, typer.Option("--invert-mask", help="Repaint what the mask would keep.")] = False,
    n: NOpt = None,
    recipe: RecipeOpt = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = Device.auto,
    seed: SeedOpt = None,
    quality: QualityOpt = None,
    prior_steps: PriorStepsOpt = None,
    decoder_steps: DecoderStepsOpt = None,
    upsampler_steps: UpsamplerStepsOpt = None,
    guidance: GuidanceOpt = None,
    prior_guidance: PriorGuidanceOpt = None,
    batch_size: BatchSizeOpt = None,
    out: OutOpt = Path("outputs"),
    force: ForceOpt = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    no_metadata: NoMetadataOpt = False,
) -> None:
    """Repaint only the masked part of an image from a prompt; the rest stays pixel-for-pixel."""
    c = Common(weights=weights, device=device, seed=seed, quality=quality, prior_steps=prior_steps,
                decoder_steps=decoder_steps, upsampler_steps=upsampler_steps, guidance=guidance,
                prior_guidance=prior_guidance, batch_size=batch_size, out=out, force=force, json=json_,
                quiet=quiet, no_metadata=no_metadata)
    run = Run("edit", c, recipe)
    if mask is None:
        raise InputError("edit needs a mask: --mask MASK", hint='e.g. unclip edit photo.png --mask mask.png "a red hat"')
    text = run.check_text(run.pick(prompt, "prompt"), "the prompt",
                          'say what to paint in the masked area, e.g. unclip edit photo.png --mask m.png "a red hat"')
    n = run.check_n(n)
    img = run.load_image(image, None)
    from unclip_cli.imageio import load_mask

    m, fraction, notes = load_mask(mask, img.size, invert=invert_mask)
    for note in notes:
        if "resized" in note:
            run.warn(note)
        else:
            run.note(note)
    run.note(f"Repainting {fraction:.0%} of {image.name} ({img.size[0]}×{img.size[1]})")
    eng = run.engine()
    result = run.call(eng.edit, img, m, text, n=n, count=n, **run.sampling())
    extra = {"input": image.name, "mask": mask.name, "invert_mask": invert_mask, "mask_fraction": round(fraction, 4)}
    _images_with_grid(run, result, _stem(_name_part(image), text), extra)


NUDGE_EXAMPLES = """\
[b]Examples[/b]

  unclip nudge cat.png --to "a tiger"
  unclip nudge cat.png --from "a cat" --to "a dog" --amount 0.4 -n 4

The image's CLIP embedding is turned toward the difference between the two texts (the paper's
"text diffs"); a larger --amount moves further.
"""


@app.command(epilog=NUDGE_EXAMPLES)
def nudge(
    image: Annotated[Path, typer.Argument(metavar="IMAGE", help="The image to change.", show_default=False)],
    to_text: Annotated[
        Optional[str], typer.Option("--to", "-t", metavar="TEXT", show_default=False, help="What the image should become (required).")
    ] = None,
    from_text: Annotated[
        Optional[str], typer.Option("--from", metavar="TEXT", show_default=False,
                                    help="What the image shows now (a better anchor than nothing).")
    ] = None,
    amount: Annotated[
        Optional[float],
        typer.Option("--amount", "-a", show_default="0.3",
                     help="How far to turn, 0-1 (0.25-0.5 is typical); with -n, the images step up to it."),
    ] = None,
    n: NOpt = None,
    fit: FitOpt = None,
    recipe: NudgeRecipeOpt = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = Device.auto,
    seed: SeedOpt = None,
    quality: QualityOpt = None,
    prior_steps: PriorStepsOpt = None,
    decoder_steps: DecoderStepsOpt = None,
    upsampler_steps: UpsamplerStepsOpt = None,
    guidance: GuidanceOpt = None,
    prior_guidance: PriorGuidanceOpt = None,
    batch_size: BatchSizeOpt = None,
    out: OutOpt = Path("outputs"),
    force: ForceOpt = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    no_metadata: NoMetadataOpt = False,
) -> None:
    """Turn an image toward a text (the paper's text diffs), keeping what the text does not change."""
    c = Common(weights=weights, device=device, seed=seed, quality=quality, prior_steps=prior_steps,
                decoder_steps=decoder_steps, upsampler_steps=upsampler_steps, guidance=guidance,
                prior_guidance=prior_guidance, batch_size=batch_size, out=out, force=force, json=json_,
                quiet=quiet, no_metadata=no_metadata)
    run = Run("nudge", c, recipe)
    to = run.check_text(run.pick(to_text, "to"), "--to", 'say what the image should become, e.g. --to "a tiger"')
    frm = (run.pick(from_text, "from") or "").strip()
    amount = float(run.pick(amount, "amount", 0.3))
    if not 0 < amount <= 1:
        raise InputError(f"--amount must be more than 0 and at most 1, not {amount:g}", hint="0.25-0.5 is typical")
    n = run.check_n(n)
    fit = run.fit(fit)
    img = run.load_image(image, fit)
    eng = run.engine()
    result = run.call(eng.nudge, img, to_text=to, from_text=frm, amount=amount, n=n, count=n, **run.sampling())
    extra = {"input": image.name, "fit": fit}
    _images_with_grid(run, result, _stem(_name_part(image), "to", to), extra)
