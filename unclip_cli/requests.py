"""Requests: everything one run of an operation needs, validated in one place.

Every front end (the CLI, `unclip eval`, a server) builds a request, and every limit lives here, next
to the field it limits: the CLI's help and errors, a server's 400s and a recipe read from a PNG all come
from the same checks. A recipe is a serialised request plus the index of one image in it, so
`--from img.png` rebuilds the request that made the image and reruns the batch the image was made in
(`index`): batched kernels round differently by batch size, so recomputing the same batch is what
makes the pixels identical.

    req = GenerateRequest(prompt="cat face", n=4).validated()   # draws the seed, checks every field
    result = engine.run(req)                                     # images + one recipe per image
    again = request_from_recipe(result.recipes[2])               # the request, replaying image 2

What a request leaves open (step counts of a `quality`, guidance scales) is resolved against the model set
it runs on: each set carries its own sampling recipe (`unclip_cli.diffusion.recipe`), and the engine
attaches it (`Request.under`) before running, so recipes record the steps and scales that actually ran.
Unattached, a request resolves against the default recipe, the emoji set's.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Union

from PIL import Image

from unclip_cli.diffusion.recipe import DEFAULT as DEFAULT_RECIPE
from unclip_cli.diffusion.recipe import MAX_TIMESTEP, QUALITIES, SamplingRecipe
from unclip_cli.errors import InputError

# -- limits: each defined once ----------------------------------------------------------------------
MAX_N = 64  # images per request; more is almost always a typo, and a grid of 64 is already large
MAX_FRAMES = 64
MAX_STEPS = 1000  # the training schedule's length: no sampler can take more distinct steps
MAX_GUIDANCE = 30.0
MAX_CANDIDATES = 16
MAX_SEED = 2**63 - 1 - MAX_N  # image i uses seed + i, which must stay a valid torch seed
MAX_BATCH = 256
MAX_PROMPT_CHARS = 4000  # CLIP reads 77 tokens (some 300 characters) and truncates with a warning; far longer is a paste error
DEFAULT_BATCH = 8
# The emoji set's defaults (a set's own recipe may say otherwise; a converted Karlo set uses 8 and 4):
DEFAULT_GUIDANCE = DEFAULT_RECIPE.guidance  # 3.0, decoder; the paper shows 1.0-4.0 (Fig. 9)
DEFAULT_PRIOR_GUIDANCE = DEFAULT_RECIPE.prior_guidance  # 1.5: "we found that guiding the prior hurt results" at large scales
DEFAULT_STRENGTH = 0.5
DEFAULT_AMOUNT = 0.3
DEFAULT_FRAMES = 5
# Edits blend the result into the kept image over a band this wide *inside* the mask (in the output's
# pixels), so unmasked pixels stay exactly as they were. 0 pastes with a hard edge. By default the band scales with
# the image, DEFAULT_FEATHER px of every FEATHER_SIDE px of its long side (`default_feather`), so an edit looks the
# same at every size: a fixed 8 px was a third of one of the model's 256 px across a 6028 px photo, whose enlarged
# edit then showed its edge. An explicit --feather stays in the output's pixels.
DEFAULT_FEATHER = 8
FEATHER_SIDE = 256
MAX_FEATHER = 256


def default_feather(size: tuple[int, int]) -> int:
    """The feather an edit of an image of `size` (w, h) gets when none is given: at least 1 px (0 would be the hard,
    unmatched paste), at most MAX_FEATHER (from 8192 px on), so that its recipe replays as a --feather would."""
    return min(MAX_FEATHER, max(1, round(DEFAULT_FEATHER * max(size) / FEATHER_SIDE)))


FITS = ("crop", "pad")
# Noise augmentation of the image embedding (decoders that take a noised z_i, Stable unCLIP's): the DDPM level it is
# noised to, 0 (none) to 999 (ComfyUI's noise_augmentation x 999); None: the set's own (Stable unCLIP's: 0)
MAX_NOISE_LEVEL = MAX_TIMESTEP
MAX_SIZE = 2048  # pixels along a side of a set that decodes at several sizes (a latent decoder); the engine checks the set's own limits
NOISE_LEVEL_HINT = "0 keeps the image's embedding as it is; higher levels (200-600) let the result wander further from it"


def _noise_level_field(self, label) -> dict:
    return {"noise_level": None if self.noise_level is None else check_whole(label("noise_level"), self.noise_level, 0, MAX_NOISE_LEVEL,
                                                                              hint=NOISE_LEVEL_HINT)}
PRECISIONS = ("auto", "fp32", "bf16")  # of the denoising networks on a CPU (device.resolve_precision)


@dataclass(frozen=True)
class Steps:
    """The sampling work per stage: each sampler's steps, and how many decoder samples text-to-image
    and edit draw per image (the one whose CLIP embedding is closest to the prior's z_i is kept)."""

    prior: int
    decoder: int
    upsampler: int
    decoder_candidates: int = 1  # 1 in recipes written before it existed, so they reproduce exactly


# The emoji set's step tables: fast (8, 10, 3, 1), default (16, 20, 4, 3), best (32, 50, 8, 4). Other sets carry
# their own (`SamplingRecipe.steps_*`); the quality names are the same everywhere.
QUALITY = {q: Steps(*DEFAULT_RECIPE.table(q)) for q in QUALITIES}
# Blends decode through the DDIM inversion of both end images, whose error grows with the step size: at
# the presets' decoder steps the end frames drift from their images and mid frames wobble. On 12
# training-split pairs × 8 frames at default quality, twice the steps raised the share of frame steps
# moving toward B from 0.905 to 0.964 and the end frames' cosine to their images from 0.92 / 0.95 to
# 0.95 / 0.98 (evaluate.blend_progress; the held-out pairs of `unclip eval` were not used to choose).
BLEND_DECODER_STEP_FACTOR = DEFAULT_RECIPE.blend_decoder_step_factor  # 2


def quality_steps(quality: str, op: str = "generate", recipe: SamplingRecipe = DEFAULT_RECIPE, inverts: bool = False) -> Steps:
    """The sampler steps of a --quality preset for an operation under a set's recipe (blends take more decoder steps,
    and an operation that decodes through a DDIM inversion at least the recipe's `inversion_steps_min`)."""
    steps = Steps(*recipe.table(quality))
    if op == "blend":
        steps = dataclasses.replace(steps, decoder=steps.decoder * recipe.blend_decoder_step_factor)
    if inverts:
        steps = dataclasses.replace(steps, decoder=max(steps.decoder, recipe.inversion_steps_min))
    return steps


def draw_seed() -> int:
    """The one place a random seed is drawn (printed and recorded, so the run reproduces)."""
    return secrets.randbelow(2**32)


# -- checks ------------------------------------------------------------------------------------------
def shown(value: Any, limit: int = 40) -> str:
    """A value as it may appear in a message: repr (so control characters are escaped), shortened."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def printable(text: str) -> str:
    """Untrusted text (from a file) made safe for a terminal: control characters shown escaped."""
    return "".join(repr(c)[1:-1] if (unicodedata.category(c) == "Cc" and c not in "\n\t") or c in _BIDI else c for c in str(text))


_BIDI = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")  # direction overrides can disguise text


def check_whole(label: str, value: Any, lo: int, hi: int, *, hint: str | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{label} must be a whole number between {lo} and {hi}, not {shown(value)}", hint=hint)
    if not lo <= value <= hi:
        raise InputError(f"{label} must be between {lo} and {hi}, not {shown(value)}", hint=hint)
    return value


def check_number(label: str, value: Any, lo: float, hi: float, *, above: bool = False, hint: str | None = None) -> float:
    """A finite number in [lo, hi] ((lo, hi] with `above`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{label} must be a number, not {shown(value)}", hint=hint)
    if not ((lo < value) if above else (lo <= value)) or value > hi:
        span = f"more than {lo:g} and at most {hi:g}" if above else f"between {lo:g} and {hi:g}"
        raise InputError(f"{label} must be {span}, not {float(value):g}", hint=hint)
    return float(value)


def check_text(label: str, value: Any, *, hint: str | None = None, allow_empty: bool = False) -> str:
    """Text as a prompt: a string, not blank, at most MAX_PROMPT_CHARS, no control characters."""
    if value is None and not allow_empty:
        raise InputError(f"{label} is missing", hint=hint)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(f"{label} must be text, not {shown(value)}", hint=hint)
    text = value.strip()
    if not text and not allow_empty:
        raise InputError(f"{label} is empty", hint=hint)
    if len(text) > MAX_PROMPT_CHARS:
        raise InputError(f"{label} is {len(text):,} characters long; the limit is {MAX_PROMPT_CHARS:,}",
                         hint="CLIP reads about 75 words at most: shorten it")
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text):
        raise InputError(f"{label} contains control characters (such as a newline or an escape)",
                         hint="write it on one line, in plain text")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        # Bytes that are not UTF-8 (a shell passes them as lone surrogates) and lone surrogates (JSON's
        # "\ud800") are not text: they would fail only when the result's recipe is written, after the run.
        raise InputError(f"{label} is not valid Unicode text (it holds bytes that are not UTF-8, or a lone surrogate)",
                         hint="send the text as UTF-8")
    return text


def check_box(label: str, value: Any) -> tuple[float, float, float, float]:
    """A rectangle as fractions of the image: (left, top, right, bottom), each 0-1, left < right, top < bottom.
    Text "0,0.5,1,1" (the command line's form) is read as four numbers."""
    hint = "four fractions of the image, left,top,right,bottom: 0,0.5,1,1 is the lower half"
    if isinstance(value, str):
        try:
            value = tuple(float(v) for v in value.replace(" ", "").split(","))
        except ValueError:
            raise InputError(f"{label} must be four numbers separated by commas, not {shown(value)}", hint=hint) from None
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise InputError(f"{label} must be four numbers (left, top, right, bottom), not {shown(value)}", hint=hint)
    box = tuple(check_number(label, v, 0, 1, hint=hint) for v in value)
    if not (box[0] < box[2] and box[1] < box[3]):
        raise InputError(f"{label} must have left < right and top < bottom, not {','.join(f'{v:g}' for v in box)}", hint=hint)
    return box


def check_choice(label: str, value: Any, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise InputError(f"{label} must be one of {', '.join(choices)}, not {shown(value)}")
    return value


def check_flag(label: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{label} must be true or false, not {shown(value)}")
    return value


# -- inputs ------------------------------------------------------------------------------------------
ImageSource = Union[str, Path, bytes, Image.Image]


class Upload(bytes):
    """An uploaded image's bytes and the file name its client gave it (a plain name, checked by the server), so that
    messages and recipes name it as they name a file of the command line."""

    def __new__(cls, data: bytes, name: str = "image"):  # a default for pickle and copy, which restore the name after
        self = super().__new__(cls, data)
        self.name = name
        return self


def source_name(src: ImageSource | None, default: str = "image") -> str:
    """The name a source is known by in messages and recipes (a file name, never a whole path)."""
    if isinstance(src, (str, Path)):
        return Path(src).name
    if isinstance(src, Upload):
        return src.name
    return default


@dataclass
class Inputs:
    """The decoded inputs of a request: images (RGB), the edit mask (L, 255 = repaint) and notes that say
    in words what was done to them (first frame taken, cropped, mask resized...)."""

    images: list[Image.Image]
    mask: Image.Image | None = None
    mask_fraction: float | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _load(src: ImageSource, fit: str | None, what: str = "image"):
    from unclip_cli import imageio

    if src is None:
        raise InputError(f"the {what} is missing")
    if not isinstance(src, (str, Path, bytes, bytearray, Image.Image)):
        raise InputError(f"the {what} must be a file, bytes or an image, not {type(src).__name__}")
    return imageio.load_image(src, fit=fit, what=what)


# -- requests ----------------------------------------------------------------------------------------
OPTION = {"n": "-n", "frames": "--steps", "from_": "--from-text", "to": "--to", "prompt": "the prompt", "prompts": "text", "weights": "--mix-weights",
          "objects": "--obj"}


def _option(name: str) -> str:
    """A request field's command-line option, as messages name it by default."""
    return OPTION.get(name, "--" + name.replace("_", "-"))


@dataclass(kw_only=True)
class Request:
    """What every operation shares. `seed` is the first image's seed (image i uses seed + i, except in
    blends, whose frames share it); None draws one in `validated`. Explicit step counts override the
    `quality` preset stage by stage. `index` replays one image of the request: the batch it was made in
    is recomputed and only that image returned (what `--from` does)."""

    op: ClassVar[str]
    uses_prior: ClassVar[bool] = False
    n: int = 1
    seed: int | None = None
    quality: str = "default"
    prior_steps: int | None = None
    decoder_steps: int | None = None
    upsampler_steps: int | None = None
    decoder_candidates: int | None = None
    guidance: float | None = None
    prior_guidance: float | None = None
    batch_size: int | None = None
    # Pixels along the output's side, for sets that decode at several sizes (a latent decoder: Stable unCLIP at 512 below
    # its native 768); None: the set's own size. The engine checks it against the set.
    size: int | None = None
    # CPU precision of the denoising networks: auto, fp32 or bf16 (device.PRECISIONS); None: the engine's default
    precision: str | None = None
    index: int | None = None
    _inputs: Inputs | None = field(default=None, init=False, repr=False, compare=False)
    _sampling: SamplingRecipe | None = field(default=None, init=False, repr=False, compare=False)
    _label: Any = field(default=None, init=False, repr=False, compare=False)  # how `validated` was told to name fields

    # -- the facts an engine needs
    @property
    def count(self) -> int:
        """Images the request makes."""
        return self.n

    @property
    def sampling(self) -> SamplingRecipe:
        """The sampling recipe this request resolves against: its model set's once attached (`under`), else the default."""
        return self._sampling or DEFAULT_RECIPE

    def under(self, recipe: SamplingRecipe) -> "Request":
        """A copy that resolves quality and default scales with a model set's recipe (the engine calls this)."""
        out = dataclasses.replace(self)
        out._inputs, out._sampling, out._label = self._inputs, recipe, self._label
        return out

    def name(self, field: str) -> str:
        """How messages name a field: as the front end that validated the request does (the CLI's option,
        the API's field), so that problems found later (by the engine) speak the caller's language."""
        return (self._label or _option)(field)

    @property
    def steps(self) -> Steps:
        base = quality_steps(self.quality, self.op, self.sampling, self.inverts)
        return Steps(prior=self.prior_steps or base.prior, decoder=self.decoder_steps or base.decoder,
                     upsampler=self.upsampler_steps or base.upsampler,
                     decoder_candidates=self.decoder_candidates or base.decoder_candidates)

    @property
    def inverts(self) -> bool:
        """Whether the operation decodes through the DDIM inversion of its input (vary below strength 1, nudge, blend)."""
        return False

    @property
    def guidance_scale(self) -> float:
        return self.sampling.guidance if self.guidance is None else self.guidance

    @property
    def prior_guidance_scale(self) -> float:
        return self.sampling.prior_guidance if self.prior_guidance is None else self.prior_guidance

    @property
    def effective_batch(self) -> int:
        return self.batch_size or DEFAULT_BATCH

    def item_seed(self, i: int) -> int:
        return self.seed + i

    def shared(self) -> tuple:
        """What requests run in one batch must agree on (the engine samples a batch with one setting)."""
        return (self.op, self.steps, self.guidance_scale, self.prior_guidance_scale if self.uses_prior else None, self.precision,
                self.size, *self._shared_own())

    def _shared_own(self) -> tuple:
        return ()

    def sources(self) -> list:
        """The input images as given (paths, bytes or PIL), in the order of `inputs().images`."""
        return []

    def texts(self) -> list[tuple[str, str]]:
        """The request's texts, each with how messages name it."""
        return []

    def wanted(self) -> list[int]:
        """The indices of the images to return."""
        return list(range(self.count)) if self.index is None else [self.index]

    # -- validation
    def validated(self, label=None) -> "Request":
        """A checked copy with a seed drawn if none was given. `label(field)` names a field in messages
        (default: the command-line option)."""
        label = label or self._label or _option
        changes: dict[str, Any] = {"quality": check_choice(label("quality"), self.quality, tuple(QUALITY))}
        if self.op != "blend":
            changes["n"] = check_whole(label("n"), self.n, 1, MAX_N, hint=f"for more than {MAX_N} images, run again with another --seed")
        seed = draw_seed() if self.seed is None else check_whole(label("seed"), self.seed, 0, MAX_SEED)
        changes["seed"] = seed
        for name in ("prior_steps", "decoder_steps", "upsampler_steps"):
            v = getattr(self, name)
            changes[name] = None if v is None else check_whole(label(name), v, 1, MAX_STEPS)
        if self.decoder_candidates is not None:
            changes["decoder_candidates"] = check_whole(label("decoder_candidates"), self.decoder_candidates, 1, MAX_CANDIDATES)
        for name in ("guidance", "prior_guidance"):
            v = getattr(self, name)
            changes[name] = None if v is None else check_number(label(name), v, 0, MAX_GUIDANCE, hint="1 means no guidance; 1.5-5 is typical")
        if self.batch_size is not None:
            changes["batch_size"] = check_whole(label("batch_size"), self.batch_size, 1, MAX_BATCH)
        if self.size is not None:
            changes["size"] = check_whole(label("size"), self.size, 8, MAX_SIZE, hint="pixels along a side, e.g. 512")
        if self.precision is not None:
            changes["precision"] = check_choice(label("precision"), self.precision, PRECISIONS)
        changes.update(self._validate_own(label))
        out = dataclasses.replace(self, **changes)
        if out.index is not None:
            out.index = check_whole(label("index"), out.index, 0, out.count - 1)
        out._inputs, out._sampling, out._label = self._inputs, self._sampling, label
        return out

    def _validate_own(self, label) -> dict:
        return {}

    # -- inputs
    def inputs(self) -> Inputs:
        """Decode the request's images (once); every problem is an InputError naming the input."""
        if self._inputs is None:
            self._inputs = self._load_inputs()
        return self._inputs

    def _load_inputs(self) -> Inputs:
        return Inputs(images=[])

    # -- recipes
    def to_recipe(self, i: int) -> dict:
        """What reproduces image i: the request's fields, the image's own seed and its index."""
        steps = dataclasses.asdict(self.steps)
        if not self.uses_prior:  # neither the prior nor decoder candidates take part
            steps = {k: steps[k] for k in ("decoder", "upsampler")}
        recipe = {"op": self.op, "seed": self.item_seed(i), "index": i, "n": self.count, "batch_size": self.effective_batch,
                  "quality": self.quality, "steps": steps, "guidance": self.guidance_scale}
        if self.uses_prior:
            recipe["prior_guidance"] = self.prior_guidance_scale
        if self.size is not None:
            recipe["image_size"] = self.size
        return {**recipe, **self._recipe_own(i)}

    def _recipe_own(self, i: int) -> dict:
        return {}

    @classmethod
    def _from_recipe_own(cls, recipe: dict) -> dict:
        return {}


@dataclass(kw_only=True)
class GenerateRequest(Request):
    op: ClassVar[str] = "generate"
    uses_prior: ClassVar[bool] = True
    prompt: str | None = None

    def _validate_own(self, label) -> dict:
        return {"prompt": check_text(label("prompt"), self.prompt, hint='say what to draw, e.g. unclip generate "red apple" (`unclip concepts` lists what it can draw)')}

    def texts(self):
        return [("the prompt", self.prompt)]

    def _recipe_own(self, i):
        return {"prompt": self.prompt}

    @classmethod
    def _from_recipe_own(cls, r):
        return {"prompt": r.get("prompt")}


def _fit_field(self, label) -> dict:
    return {"fit": check_choice(label("fit"), self.fit, FITS)}


@dataclass(kw_only=True)
class VaryRequest(Request):
    op: ClassVar[str] = "vary"
    image: ImageSource | None = None
    strength: float = DEFAULT_STRENGTH
    fit: str = "crop"
    guidance_ramp: bool = True  # invert unguided, guide in proportion to strength (False: recipes from before it)
    # strength 1 from fresh noise instead of DDIM eta 1 from the inverted noise (True: recipes from before 2026-12-05's fix,
    # whose strength 1 landed closer to the input than 0.8); sets whose recipe's vary_sampler is "decoder" always do
    fresh_at_one: bool = False
    # DDIM inversion up to the set's decoder start (the emoji set's t = 800, where its decoding from noise starts) and
    # decoding from there (False: recipes from before 2026-12-05's fix, inverted to t = 999)
    invert_to_start: bool = True
    noise_level: int | None = None  # MAX_NOISE_LEVEL's; the engine records the level that ran
    # A caption for the decoder (its text encoder's; Stable unCLIP's img2img prompt), "" for none: the image alone
    prompt: str = ""

    @property
    def inverts(self) -> bool:
        return self.strength < 1 or not (self.fresh_at_one or self.sampling.vary_sampler == "decoder")

    def _shared_own(self):
        return (self.strength, self.guidance_ramp, self.fresh_at_one, self.invert_to_start, self.noise_level, bool(self.prompt))

    def _validate_own(self, label):
        return {"strength": check_number(label("strength"), self.strength, 0, 1, hint="0 reconstructs the input, 1 moves furthest"),
                "prompt": check_text(label("prompt"), self.prompt, allow_empty=True),
                **_fit_field(self, label), **_noise_level_field(self, label)}

    def texts(self):
        return [("--prompt", self.prompt)] if self.prompt else []

    def _load_inputs(self):
        image, notes = _load(self.image, self.fit)
        return Inputs([image], notes=notes)

    def sources(self):
        return [self.image]

    def _recipe_own(self, i):
        return {"strength": self.strength, "input": source_name(self.image), "fit": self.fit, "guidance_ramp": self.guidance_ramp,
                "fresh_at_one": self.fresh_at_one, "invert_to_start": self.invert_to_start, **({"prompt": self.prompt} if self.prompt else {})}

    @classmethod
    def _from_recipe_own(cls, r):
        return {"strength": r.get("strength", DEFAULT_STRENGTH), "fit": r.get("fit", "crop"), "guidance_ramp": r.get("guidance_ramp", False) is True,
                "fresh_at_one": r.get("fresh_at_one", True) is not False, "invert_to_start": r.get("invert_to_start", False) is True,
                "noise_level": r.get("noise_level"), "prompt": r.get("prompt", "")}


@dataclass(kw_only=True)
class BlendRequest(Request):
    """`frames` images from A to B, both included; all frames share the seed, so they differ only by blend."""

    op: ClassVar[str] = "blend"
    image_a: ImageSource | None = None
    image_b: ImageSource | None = None
    frames: int = DEFAULT_FRAMES
    fit: str = "crop"
    # invert unguided, guide each frame in proportion to its distance from the nearer end (False: recipes from before it)
    guidance_ramp: bool = True
    # DDIM inversion up to the set's decoder start (the emoji set's t = 800, where its decoding from noise starts) and
    # decoding from there (False: recipes from before 2026-12-05's fix, inverted to t = 999)
    invert_to_start: bool = True
    inverts = True

    def _shared_own(self):
        return (self.guidance_ramp, self.invert_to_start)

    @property
    def count(self) -> int:
        return self.frames

    def item_seed(self, i: int) -> int:
        return self.seed

    def theta(self, i: int) -> float:
        return i / (self.frames - 1)

    def _validate_own(self, label):
        return {"frames": check_whole(label("frames"), self.frames, 2, MAX_FRAMES), **_fit_field(self, label)}

    def _load_inputs(self):
        a, notes_a = _load(self.image_a, self.fit)
        b, notes_b = _load(self.image_b, self.fit)
        return Inputs([a, b], notes=notes_a + notes_b)

    def sources(self):
        return [self.image_a, self.image_b]

    def _recipe_own(self, i):
        return {"frame": i, "frames": self.frames, "theta": self.theta(i), "fit": self.fit,
                "inputs": [source_name(self.image_a), source_name(self.image_b)], "guidance_ramp": self.guidance_ramp,
                "invert_to_start": self.invert_to_start}

    @classmethod
    def _from_recipe_own(cls, r):
        return {"frames": r.get("frames", DEFAULT_FRAMES), "fit": r.get("fit", "crop"), "guidance_ramp": r.get("guidance_ramp", False) is True,
                "invert_to_start": r.get("invert_to_start", False) is True}


@dataclass(kw_only=True)
class EditRequest(Request):
    """`mask`: white (or, with real transparency, transparent) = repaint; `invert_mask` swaps the two."""

    op: ClassVar[str] = "edit"
    uses_prior: ClassVar[bool] = True
    image: ImageSource | None = None
    mask: ImageSource | None = None
    box: tuple[float, float, float, float] | None = None  # instead of a mask: left, top, right, bottom as fractions of the image
    prompt: str | None = None
    invert_mask: bool = False
    feather: int | None = None  # px; None: the default, scaled to the image (`default_feather`), resolved once it is known
    harmonise: bool = True  # match the result's colours to the kept image's along the border (recipes from before: False)

    def _validate_own(self, label):
        if self.mask is None and self.box is None:
            raise InputError("edit needs a mask: --mask MASK, or --box LEFT,TOP,RIGHT,BOTTOM",
                             hint='e.g. unclip edit photo.png --box 0,0.5,1,1 "a red hat" (the lower half)')
        if self.mask is not None and self.box is not None:
            raise InputError("give either a mask or a box, not both", hint="--box marks a rectangle to repaint without a mask file")
        return {"prompt": check_text(label("prompt"), self.prompt,
                                     hint='say what to paint in the masked area, e.g. unclip edit photo.png --mask m.png "a red hat"'),
                "invert_mask": check_flag(label("invert_mask"), self.invert_mask),
                "harmonise": check_flag(label("harmonise"), self.harmonise),
                "feather": None if self.feather is None else check_whole(
                    label("feather"), self.feather, 0, MAX_FEATHER,
                    hint=f"pixels of the result; the default is {DEFAULT_FEATHER} per {FEATHER_SIDE} px of the image's long side"),
                "box": None if self.box is None else check_box(label("box"), self.box)}

    def _load_inputs(self):
        from unclip_cli import imageio

        image, notes = _load(self.image, None)
        source = self.mask if self.box is None else imageio.box_mask(self.box, image.size)
        mask, fraction, mask_notes = imageio.load_mask(source, image.size, invert=self.invert_mask)
        warnings = [m for m in mask_notes if "resized" in m]
        notes += [m for m in mask_notes if m not in warnings]
        notes.append(f"Repainting {fraction:.0%} of {source_name(self.image)} ({image.size[0]}×{image.size[1]})")
        return Inputs([image], mask=mask, mask_fraction=fraction, notes=notes, warnings=warnings)

    def sources(self):
        return [self.image]

    def texts(self):
        return [("the prompt", self.prompt)]

    @property
    def scaled_feather(self) -> int:
        """The default feather for this request's image, in its pixels (`default_feather`)."""
        return default_feather(self.inputs().images[0].size)

    @property
    def feather_px(self) -> int:
        """The feather that runs, in the output's pixels: as given, or the default for the image's size."""
        return self.scaled_feather if self.feather is None else self.feather

    def _recipe_own(self, i):
        inputs = self._inputs
        mask = {"mask": source_name(self.mask, "mask")} if self.box is None else {"box": list(self.box)}
        return {"prompt": self.prompt, "input": source_name(self.image), **mask, "invert_mask": self.invert_mask,
                "feather": self.feather_px, "harmonise": self.harmonise,
                "mask_fraction": round(inputs.mask_fraction, 4) if inputs and inputs.mask_fraction is not None else None}

    @classmethod
    def _from_recipe_own(cls, r):
        # Recipes from before feathering pasted with a hard edge: feather 0 remakes them; from before harmonising, without it.
        # A recipe's feather is the one that ran, in pixels (the scaled default too): a replay pastes as it did.
        box = r.get("box")
        return {"prompt": r.get("prompt"), "invert_mask": r.get("invert_mask", False), "feather": r.get("feather", 0),
                "harmonise": r.get("harmonise", False),
                "box": tuple(box) if isinstance(box, list) else box}


@dataclass(kw_only=True)
class NudgeRequest(Request):
    """Text diffs: the n images turn the image's z_i toward normalize(z_t(to) - z_t(from)) in even steps
    up to `amount` (image i by amount * (i + 1) / n)."""

    op: ClassVar[str] = "nudge"
    image: ImageSource | None = None
    to: str | None = None
    from_: str = ""
    amount: float = DEFAULT_AMOUNT
    fit: str = "crop"
    guidance_ramp: bool = True  # invert unguided, guide in proportion to amount (False: recipes from before it)
    # DDIM inversion up to the set's decoder start (the emoji set's t = 800, where its decoding from noise starts) and
    # decoding from there (False: recipes from before 2026-12-05's fix, inverted to t = 999)
    invert_to_start: bool = True

    inverts = True

    def _shared_own(self):
        return (self.amount if self.guidance_ramp else None, self.guidance_ramp, self.invert_to_start)

    def theta(self, i: int) -> float:
        return self.amount * (i + 1) / self.n

    def _validate_own(self, label):
        to = check_text(label("to"), self.to, hint='say what the image should become, e.g. --to "a tiger"')
        from_ = check_text(label("from_"), self.from_, allow_empty=True)
        if " ".join(to.lower().split()) == " ".join(from_.lower().split()):  # CLIP reads both alike: no direction
            raise InputError(f"{label('to')} and {label('from_')} are the same text, so there is no direction to move in",
                             hint="use texts that differ in meaning")
        return {"to": to, "from_": from_,
                "amount": check_number(label("amount"), self.amount, 0, 1, above=True, hint="with the emoji model 0.2-0.4 keeps the image's layout"),
                **_fit_field(self, label)}

    def _load_inputs(self):
        image, notes = _load(self.image, self.fit)
        return Inputs([image], notes=notes)

    def sources(self):
        return [self.image]

    def texts(self):
        return [(self.name("to"), self.to), (self.name("from_"), self.from_)]

    def _recipe_own(self, i):
        return {"to": self.to, "from": self.from_, "amount": self.amount, "theta": self.theta(i),
                "input": source_name(self.image), "fit": self.fit, "guidance_ramp": self.guidance_ramp,
                "invert_to_start": self.invert_to_start}

    @classmethod
    def _from_recipe_own(cls, r):
        # Recipes written before they held the request have n = 1 and this image's own amount: the same image.
        return {"to": r.get("to"), "from_": r.get("from", ""), "amount": r.get("amount", DEFAULT_AMOUNT), "fit": r.get("fit", "crop"),
                "guidance_ramp": r.get("guidance_ramp", False) is True, "invert_to_start": r.get("invert_to_start", False) is True}


MAX_MIX = 8  # images and texts in one mix
MAX_MIX_WEIGHT = 10.0


@dataclass(kw_only=True)
class MixRequest(Request):
    """A weighted mix of images' CLIP embeddings and texts' (`prompts`, through the prior), renormalised as the
    set's embeddings are and decoded from fresh noise. `weights` follow `images` then `prompts`; None: equal.
    Weights need not sum to one, and a negative one subtracts its concept."""

    op: ClassVar[str] = "mix"
    uses_prior: ClassVar[bool] = True
    images: list = field(default_factory=list)
    prompts: list = field(default_factory=list)
    weights: list | None = None
    fit: str = "crop"
    noise_level: int | None = None  # as VaryRequest's

    @property
    def parts(self) -> int:
        return len(self.images) + len(self.prompts)

    def mix_weights(self) -> list[float]:
        return list(self.weights) if self.weights is not None else [1.0 / self.parts] * self.parts

    def _shared_own(self):  # a batch encodes each image position and runs the prior once per text position
        return (len(self.images), len(self.prompts), self.noise_level)

    def _validate_own(self, label):
        if not isinstance(self.images, (list, tuple)) or not isinstance(self.prompts, (list, tuple)):
            raise InputError("mix takes lists of images and texts")
        if not 2 <= self.parts <= MAX_MIX:
            raise InputError(f"mix takes 2 to {MAX_MIX} images and texts, not {self.parts}",
                             hint='e.g. unclip mix a.png b.png "a tiger" --mix-weights 0.5,0.3,0.2')
        prompts = [check_text(f"{label('prompts')} {j + 1}", t) for j, t in enumerate(self.prompts)]
        weights = self.weights
        if weights is not None:
            if not isinstance(weights, (list, tuple)) or len(weights) != self.parts:
                got = len(weights) if isinstance(weights, (list, tuple)) else shown(weights)
                raise InputError(f"{label('weights')} must give one weight per image and text ({self.parts}), not {got}",
                                 hint="weights follow the images, then the texts")
            weights = [check_number(f"{label('weights')} {j + 1}", w, -MAX_MIX_WEIGHT, MAX_MIX_WEIGHT) for j, w in enumerate(weights)]
            if not any(weights):
                raise InputError(f"{label('weights')} are all zero", hint="give at least one weight other than 0")
        return {"prompts": prompts, "weights": weights, "images": list(self.images), **_fit_field(self, label), **_noise_level_field(self, label)}

    def _load_inputs(self):
        images, notes = [], []
        for j, src in enumerate(self.images):
            image, more = _load(src, self.fit, what=f"image {j + 1}" if len(self.images) > 1 else "image")
            images.append(image)
            notes += more
        return Inputs(images, notes=notes)

    def sources(self):
        return list(self.images)

    def texts(self):
        return [(f"text {j + 1}", t) for j, t in enumerate(self.prompts)]

    def _recipe_own(self, i):
        return {"inputs": [source_name(s, f"image {j + 1}") for j, s in enumerate(self.images)], "prompts": list(self.prompts),
                "weights": self.mix_weights(), "fit": self.fit}

    @classmethod
    def _from_recipe_own(cls, r):
        return {"prompts": r.get("prompts", []), "weights": r.get("weights"), "fit": r.get("fit", "crop"), "noise_level": r.get("noise_level")}


COMPOSE_METHODS = ("fuse", "paste")


@dataclass(kw_only=True)
class ComposeRequest(Request):
    """Objects put where the user says: `objects` as [phrase, [left, top, right, bottom]] (fractions of the canvas),
    or read from `prompt` by `unclip_cli.layout.parse` ("a cat face left of a red heart"). `background` (default:
    the prompt, or the phrases joined by "and") is the global path's text. `method`: "fuse" (each object's
    path drawn in its box and fused with the global path at every decoder step) or "paste" (each object drawn
    alone, pasted into its box, the whole re-noised halfway and denoised with the global text)."""

    op: ClassVar[str] = "compose"
    uses_prior: ClassVar[bool] = True
    prompt: str | None = None
    objects: list | None = None
    background: str | None = None
    # paste: the method that most often draws two separate objects. By the strict check (each object wins its box, the boxes
    # apart), on 217 held-out prompts x 4 seeds: paste 8.8%, fuse 0.8%, generate 0.8%; fuse's 53.8% box by box is one
    # shape with a half in each box (benchmarks/bench_compose.py, RESULTS.md). Recipes without a method ran fuse.
    method: str = "paste"

    def _shared_own(self):  # a batch runs one prior and one decoder path per object position
        return (len(self.objects or ()), self.method)

    def global_text(self) -> str:
        return self.background or self.prompt or " and ".join(p for p, _ in self.objects)

    def _validate_own(self, label):
        from unclip_cli.layout import MAX_OBJECTS, parse

        prompt = None if self.prompt is None else check_text(label("prompt"), self.prompt)
        objects = self.objects
        if objects is None:
            if prompt is None:
                raise InputError("say what to draw: a sentence, or objects with boxes",
                                 hint='e.g. unclip compose "a cat face left of a red heart", or --obj "cat face:0,0.2,0.5,0.8"')
            objects = [[phrase, list(box)] for phrase, box in parse(prompt)]
        if not isinstance(objects, (list, tuple)) or not 1 <= len(objects) <= MAX_OBJECTS:
            raise InputError(f"{label('objects')} must list 1 to {MAX_OBJECTS} objects, not {shown(objects)}")
        checked = []
        for j, o in enumerate(objects):
            if not isinstance(o, (list, tuple)) or len(o) != 2:
                raise InputError(f"{label('objects')} {j + 1} must be a phrase and a box, not {shown(o)}")
            checked.append([check_text(f"{label('objects')} {j + 1}", o[0]), list(check_box(f"{label('objects')} {j + 1}'s box", o[1]))])
        background = None if self.background is None else check_text(label("background"), self.background, allow_empty=True) or None
        return {"prompt": prompt, "objects": checked, "background": background,
                "method": check_choice(label("method"), self.method, COMPOSE_METHODS)}

    def texts(self):
        return [(f"object {j + 1}", p) for j, (p, _) in enumerate(self.objects or [])] + (
            [("the background", self.background)] if self.background else [("the prompt", self.prompt)] if self.prompt else [])

    def _recipe_own(self, i):
        return {"prompt": self.prompt, "objects": self.objects, "background": self.background, "method": self.method}

    @classmethod
    def _from_recipe_own(cls, r):
        return {"prompt": r.get("prompt"), "objects": r.get("objects"), "background": r.get("background"), "method": r.get("method", "fuse")}


REQUESTS: dict[str, type[Request]] = {c.op: c for c in (GenerateRequest, VaryRequest, BlendRequest, EditRequest, NudgeRequest, MixRequest,
                                                        ComposeRequest)}


def request_from_recipe(recipe: Any, source: str = "the recipe", **inputs) -> Request:
    """The validated request a recipe describes, replaying its one image (`index`); `inputs` supply the
    images (recipes name them but do not hold them). Every field is checked as the command line checks
    it, with messages that name `source` and the recipe's field."""
    if not isinstance(recipe, dict):
        raise InputError(f"{source} is not a recipe (a JSON object)")
    op = recipe.get("op")
    if not isinstance(op, str) or op not in REQUESTS:
        raise InputError(f"{source} has an unknown operation {shown(op)}", hint=f"recipes are made by unclip {', '.join(REQUESTS)}")
    cls = REQUESTS[op]
    steps = recipe.get("steps")
    need = ("prior", "decoder", "upsampler") if cls.uses_prior else ("decoder", "upsampler")
    if steps is not None and (not isinstance(steps, dict) or not all(k in steps for k in need)):
        raise InputError(f"{source}: recipe field 'steps' must hold {', '.join(need)} step counts, not {shown(steps)}")
    steps = steps or {}
    has_index = "index" in recipe
    seed, index = recipe.get("seed"), recipe.get("index") if has_index else None
    if has_index and op != "blend":
        # "seed" is the image's own; the request's first seed is that minus its index.
        index = check_whole(f"{source}: recipe field 'index'", index, 0, MAX_FRAMES - 1)
        seed = check_whole(f"{source}: recipe field 'seed'", seed, 0, MAX_SEED + MAX_N) - index
    fields = {
        "seed": seed, "quality": recipe.get("quality", "default"), "guidance": recipe.get("guidance"),
        "prior_steps": steps.get("prior"), "decoder_steps": steps.get("decoder"), "upsampler_steps": steps.get("upsampler"),
        # A recipe from before decoder candidates existed has none: it was made with one.
        "decoder_candidates": steps.get("decoder_candidates", 1) if steps and cls.uses_prior else None,
        "batch_size": recipe.get("batch_size"), "index": index if op != "blend" else None, "size": recipe.get("image_size"),
        # A recipe records the precision that ran; one from before that field ran fp32 on a CPU. A GPU's fp16 (or
        # float64 in tests) is not a CPU choice: such a recipe runs as the engine would by default.
        "precision": _recorded_precision(recipe.get("precision", "fp32")),
    }
    if op != "blend":
        fields["n"] = recipe.get("n", 1)
    if cls.uses_prior:
        fields["prior_guidance"] = recipe.get("prior_guidance")
    fields.update(cls._from_recipe_own(recipe))
    req = cls(**fields, **inputs)
    return req.validated(label=lambda f: f"{source}: recipe field '{_RECIPE_KEY.get(f, f)}'")


def _recorded_precision(value: Any) -> str | None:
    return None if value in ("fp16", "fp64") else value


_RECIPE_KEY = {"size": "image_size", "prior_steps": "steps.prior", "decoder_steps": "steps.decoder", "upsampler_steps": "steps.upsampler",
               "decoder_candidates": "steps.decoder_candidates", "from_": "from", "n": "n"}
