"""The image commands: generate, vary, blend, edit, nudge, mix, compose.

Each command body builds a request (`unclip_cli.requests`, where every check lives), and `Job` does the
rest: merge a stored recipe (--from), load the inputs and check the output folder before any model work,
run the engine under progress bars, write the results atomically and report them. Results go to stdout
(one path per line, or JSON with --json); notes, warnings and progress go to stderr.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from unclip_cli.cli.options import P_FAMILY, FitOpt, NOpt, RecipeOpt, image_command, resolve_weights
from unclip_cli.errors import InputError, UsageError
from unclip_cli.requests import (DEFAULT_FEATHER, FEATHER_SIDE, MAX_FRAMES, BlendRequest, ComposeRequest, EditRequest, GenerateRequest, MixRequest,
                                 NudgeRequest, Request, VaryRequest, printable, request_from_recipe, source_name)

DEFAULT_FPS = 6.0  # blend's animation
INPUTS = {"generate": "", "vary": "IMAGE", "blend": "A B", "edit": "IMAGE --mask MASK", "nudge": "IMAGE", "mix": "IMAGE...", "compose": ""}


def rerun_command(path: Path, recipe: dict) -> str:
    """The command line that reruns a stored recipe (only known operations and flags; names quoted), with its inputs
    where they can be found (`_paste_inputs`), else as placeholders said in words after it."""
    op = recipe.get("op")
    if op not in INPUTS:
        return "unclip info " + shlex.quote(str(path))
    need_mask = op == "edit" and recipe.get("box") is None  # a box is in the recipe; a mask file is not
    inputs, unsaid = _paste_inputs(path, recipe, need_mask)
    flags = " --invert-mask" if op == "edit" and recipe.get("invert_mask") is True else ""
    return " ".join(["unclip", op, *inputs, "--from", shlex.quote(str(path))]) + flags + unsaid


def _located(name: str, recipe_path: Path) -> str | None:
    """Where an input a recipe names is now, found cheaply and safely: a file of that name beside the recipe's PNG, else
    in the current folder; None if neither (or the name, untrusted text, is no plain file name)."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\0") or name != printable(name):
        return None
    for where in (recipe_path.parent / name, Path(name)):
        try:
            if where.is_file():
                return str(where)
        except (OSError, ValueError):  # a name too long for the file system
            pass
    return None


def _paste_inputs(path: Path, recipe: dict, need_mask: bool) -> tuple[list[str], str]:
    """The input arguments of a command that reruns `path`'s recipe, ready to paste: a recipe records only its inputs'
    file names (`cat.png`, not where it was), so each is the file of that name beside the recipe or in the current
    folder (`_located`), else a placeholder (IMAGE, A, B, MASK) that the returned note says in words: ` (IMAGE: the
    image named cat.png, wherever it is now)`."""
    op = recipe["op"]
    names = _recorded_names(recipe)
    if op == "mix":  # a mix of texts alone takes no image
        holders = [f"IMAGE{j + 1}" for j in range(len(names))] if len(names) > 1 else ["IMAGE"] * len(names)
    else:
        holders = INPUTS[op].split()[:len(_INPUT_FIELDS.get(op, []))]
        names = names if len(names) == len(holders) else [None] * len(holders)
    pairs = list(zip(names, holders))
    if need_mask:
        mask = recipe.get("mask")
        pairs.append((printable(mask)[:80] if isinstance(mask, str) and mask else None, "MASK"))
    args, unsaid = [], []
    for name, holder in pairs:
        found = _located(name, path) if name else None
        args.append(shlex.quote(found) if found else holder)
        if not found and name:
            unsaid.append(f"{holder}: the {'mask' if holder == 'MASK' else 'image'} named {name}")
    if need_mask:
        args[-1:] = ["--mask", args[-1]]
    return args, f" ({', '.join(unsaid)}, wherever {'they are' if len(unsaid) > 1 else 'it is'} now)" if unsaid else ""


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def _emit(text: str) -> None:
    """Write a result to stdout; a closed stdout or a reader that went away loses only the listing."""
    if sys.stdout is None:
        return
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except (BrokenPipeError, OSError, ValueError):
        pass


# -- file names ---------------------------------------------------------------------------------------
# A run's files are named by what they show: the subject (the input images' names, the texts), a tag for each setting
# that changes the pixels and is not the default, then the first seed: `cat-sun-mask-inv-fast-3-0.png`. What a name
# cannot say (a text cut short or not all in its slug, compose's boxes, an old recipe's sampling) adds a short hash of
# it, `-h3f9c`. So two runs share a name only when they make the same pictures, and `-run2` marks a true repeat. Names
# come from the request that ran, so a --from replay is named by the settings it replays. Batch size, precision and
# device change pixels only by rounding and are left out; the recipe inside has them all.
_SUBJECTS: dict[str, Callable[[Any], list]] = {
    "generate": lambda r: [("text", r.prompt, 40)],
    "vary": lambda r: [("file", r.image, 16), "vary", *([("text", r.prompt, 16)] if r.prompt else [])],
    "blend": lambda r: [("file", r.image_a, 16), ("file", r.image_b, 16), "blend"],
    "edit": lambda r: [("file", r.image, 16), ("text", r.prompt, 40)],
    "nudge": lambda r: [("file", r.image, 16), *(["from", ("text", r.from_, 16)] if r.from_ else []), "to", ("text", r.to, 40)],
    "mix": lambda r: ["mix", *[("file", p, 12) for p in r.images], *[("text", t, 16) for t in r.prompts]],
    "compose": lambda r: ["compose", ("text", r.prompt or " ".join(p for p, _ in r.objects), 40)],
}
# Settings shown by value when they differ from the operation's default, in this order after the quality and steps; each
# named by its option (blend's frames by --steps)
_VALUE_TAGS = (("strength", "strength{}"), ("amount", "amount{}"), ("frames", "steps{}"), ("fit", "{}"), ("noise_level", "noise{}"),
               ("feather", "feather{}"), ("method", "{}"))
# Fields only old recipes change (how an earlier unclip sampled): named by the hash
_OLD_WAYS = ("guidance_ramp", "fresh_at_one", "invert_to_start", "harmonise")


def _fmt_number(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _subject(req: Request) -> tuple[str, list]:
    """The subject's part of a name, at most 40 characters, and what of it the name does not say exactly: a text whose
    slug leaves something out (CLIP reads texts lower-cased, spaces collapsed) and any part cut short."""
    from unclip_cli.imageio import slugify

    slugs, exact, whole = [], [], []
    for part in _SUBJECTS[req.op](req):
        if isinstance(part, str):
            slugs.append(part)
            continue
        kind, value, limit = part
        text = Path(value).stem if kind == "file" else value
        slug, full = slugify(text, max_len=limit, fallback="image"), slugify(text, max_len=10_000, fallback="image")
        said = slug == full and (kind == "file" or " ".join(text.split()).lower() == full.replace("-", " "))
        slugs.append(slug)
        whole.append(source_name(value) if kind == "file" else value)
        exact.append(said)
    if req.op == "mix" and len(slugs) > 1 and (slugs[1] == "mix" or slugs[1].startswith("mix-")):
        slugs = slugs[1:]  # mixing an earlier mix (mix-...) is not mix-mix-...
    stem = slugify(" ".join(slugs), max_len=40)
    if stem != "-".join(slugs):  # cut short: the whole subject goes into the hash
        return stem, whole
    return stem, [w for w, ok in zip(whole, exact) if not ok]


def run_name(req: Request, eng, shipped: bool, fps: float | None = None) -> str:
    """The file stem of a run of `req` on the engine's set: subject, tags, first seed (see above). `shipped`: the set
    is the shipped one (else its folder's name is a tag); `fps`: a blend's animation rate."""
    import dataclasses
    import hashlib

    from unclip_cli.imageio import slugify

    stem, unsaid = _subject(req)
    unsaid = {"texts": unsaid} if unsaid else {}
    sampling = eng.sampling
    r, default = req.under(sampling), type(req)()
    tags = []
    if req.op == "edit":  # the region repainted, then whether it was inverted: what the edit shows
        if req.box is not None:
            tags.append("box" + ",".join(_fmt_number(v) for v in req.box))
        elif isinstance(req.mask, (str, Path)):
            mask = slugify(Path(req.mask).stem, max_len=16, fallback="mask")
            tags.append(mask if "mask" in mask else f"mask-{mask}")
            if mask != slugify(Path(req.mask).stem, max_len=10_000, fallback="mask"):
                unsaid["mask"] = source_name(req.mask)
        if req.invert_mask:
            tags.append("inv")
    if not shipped:
        tags.append(slugify(eng.name, max_len=24, fallback="model"))
    if req.quality != "default":
        tags.append(req.quality)
    preset = dataclasses.replace(req, prior_steps=None, decoder_steps=None, upsampler_steps=None,
                                 decoder_candidates=None).under(sampling).steps
    stages = ("prior", "decoder", "upsampler", "decoder_candidates") if req.uses_prior else ("decoder", "upsampler")
    tags.append("".join(f"{'c' if s == 'decoder_candidates' else s[0]}{getattr(r.steps, s)}" for s in stages
                        if getattr(r.steps, s) != getattr(preset, s)))  # p20d10u5: the steps that are not the preset's
    if r.guidance_scale != sampling.guidance:
        tags.append(f"g{r.guidance_scale:g}")
    if req.uses_prior and r.prior_guidance_scale != sampling.prior_guidance:
        tags.append(f"pg{r.prior_guidance_scale:g}")
    if req.size is not None and req.size != eng.models.image_size:
        tags.append(f"{req.size}px")
    for name, form in _VALUE_TAGS:
        v = getattr(req, name, None)
        if name == "feather" and v is not None and v == req.scaled_feather:  # the default's pixels, the default's name
            continue
        if v is not None and v != (sampling.noise_level if name == "noise_level" else getattr(default, name)):
            tags.append(form.format(_fmt_number(v)))
        if name == "amount" and req.op == "nudge" and req.n > 1:
            tags.append(f"n{req.n}")  # a nudge's images step up to its amount: image i's amount depends on how many
    if req.op == "mix" and req.weights is not None and any(abs(w - 1 / req.parts) > 1e-9 for w in req.weights):
        tags.append("w" + ",".join(_fmt_number(w) for w in req.weights))  # images' then texts', as the subject lists them
    if fps is not None and fps != DEFAULT_FPS:
        tags.append(f"{fps:g}fps")
    if req.op == "compose":
        from unclip_cli.layout import parse

        if req.prompt is None or req.objects != [[p, list(b)] for p, b in parse(req.prompt)]:
            unsaid["objects"] = req.objects  # boxes given with --obj
        if req.background:
            unsaid["background"] = req.background
    unsaid.update({k: getattr(req, k) for k in _OLD_WAYS if hasattr(req, k) and getattr(req, k) != getattr(default, k)})
    if unsaid:
        tags.append("h" + hashlib.sha256(json.dumps(unsaid, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()[:4])
    return "-".join([stem, *(t for t in tags if t), str(req.seed)])


class Job:
    """One image command: its request, the engine run, the files and the report."""

    def __init__(self, op: str, common):
        self.op, self.c = op, common
        self.err = _stderr_console()
        self.warnings: list[str] = []
        self.recipe_model: tuple[Any, Any] | None = None
        self.recipe: dict | None = None  # the --from recipe, if any
        self.replay = False  # --from replays the recipe's own images (no -n or --seed given)
        self.recipe_req: Request | None = None  # the recipe's own request, with the inputs given here
        self.same_inputs = False  # the inputs given here are the ones the recipe records (by name, size and mask)
        self.rerun = False  # the files are named as reruns (`named` decides)

    def note(self, msg: str) -> None:
        if not self.c.quiet:
            self.err.print(msg, markup=False)

    def warn(self, msg: str) -> None:
        if msg not in self.warnings:
            self.warnings.append(msg)
            self.err.print(f"Warning: {msg}", markup=False, style="yellow")

    def request(self, cls: type[Request], recipe_path: Optional[Path], **given) -> Request:
        """The command's request: the recipe's fields (if --from), then the options given here, then the
        defaults; validated, inputs decoded and the output folder checked, all before any model work."""
        sampling = {k: v for k, v in self.c.sampling().items() if v is not None}
        given = {k: v for k, v in given.items() if v is not None}
        if recipe_path is None:
            _check_arguments(cls.op, given)
            req = cls(**sampling, **given)
        else:
            req = self._from_recipe(cls, recipe_path, sampling, given)
        try:  # the recipe's own fields were checked as they were read: what fails here was given on the command line
            req = req.validated()
        except InputError as e:
            raise UsageError(str(e), hint=e.hint) from None
        from unclip_cli.imageio import check_out_dir

        check_out_dir(self.c.out)
        self.weights_dir = resolve_weights(self.c.weights)
        inputs = req.inputs()
        for m in inputs.notes:
            self.note(m)
        for w in inputs.warnings:
            self.warn(w)
        if self.recipe is not None:
            differences = _differences(self.recipe, req)
            for w in differences:
                self.warn(w)
            self.same_inputs = not differences and _same_inputs(self.recipe, req)
        self.note(f"Seed: {req.seed}")
        return req

    def _from_recipe(self, cls, path: Path, sampling: dict, given: dict) -> Request:
        import dataclasses

        from unclip_cli.imageio import read_recipe

        recipe = read_recipe(path)
        if recipe.get("op") != cls.op:
            known = recipe.get("op") in INPUTS
            raise InputError(f"{path} was made by " + (f"`unclip {recipe['op']}`" if known else "an unknown operation")
                             + f", not `unclip {cls.op}`", hint=f"rerun it with `{rerun_command(path, recipe)}`")
        inputs = {k: given.pop(k) for k in ("image", "image_a", "image_b", "mask", "images") if k in given}
        _check_inputs(path, recipe, inputs)
        if "mask" in inputs:  # a mask given here replaces the recipe's box
            recipe = {**recipe, "box": None}
        req = self.recipe_req = request_from_recipe(recipe, source=str(path), **inputs)
        if "n" in given or "seed" in sampling:
            # A new run from this image's settings: it starts at the image's own seed unless --seed says otherwise.
            req = dataclasses.replace(req, index=None, seed=req.item_seed(req.index or 0))
        else:
            self.replay = True
        if "quality" in sampling:  # a preset replaces the recorded step counts
            req = dataclasses.replace(req, prior_steps=None, decoder_steps=None, upsampler_steps=None, decoder_candidates=None)
        self.recipe_model = (recipe.get("model"), recipe.get("model_hash"))
        self.recipe = recipe
        return dataclasses.replace(req, **sampling, **given)

    def engine(self, req: Request):
        from unclip_cli.engine import Engine

        status = self.err.status("Loading the model…") if (self.err.is_terminal and not self.c.quiet) else None
        if status is not None:
            status.start()
        try:
            eng = Engine.load(self.weights_dir, device=self.c.device.value, offload=self.c.offload.value)
        finally:
            if status is not None:
                status.stop()
        self.note(f"Model {eng.name} from {self.weights_dir} on {eng.device} ({eng.precision_of(req)})")
        if eng.models.offload:
            self.note(f"Running stage by stage (--offload): the set takes {eng.models.memory_needed() / 2**30:.1f} GiB "
                      f"on {eng.device}; only the network in use is kept")
        if self.recipe_model and self.recipe_model[1] and self.recipe_model[1] != eng.models.model_hash:
            self.warn(f"the recipe was made with another model set than the loaded {eng.name} ({eng.models.model_hash}): "
                      "the result will differ")
        return eng

    def named(self, req: Request, fps: float | None = None) -> str:
        """The run's file stem (`run_name`: `cat-face-fast-42`), and whether its files are reruns: a --from replay of
        the recipe's own images, inputs and settings is (`…-42-0-rerun.png`); one with another image or other settings
        is a run of its own, named as one."""
        from unclip_cli.errors import WeightsError

        try:
            shipped = self.weights_dir.resolve() == resolve_weights(None).resolve()
        except WeightsError:
            shipped = False
        stem = run_name(req, self.eng, shipped, fps)
        self.rerun = (self.replay and self.same_inputs and self.recipe_req is not None
                      and stem == run_name(self.recipe_req, self.eng, shipped, fps))
        return stem

    def run(self, req: Request):
        """Load the engine and run the request under the progress bars; show its warnings as soon as the engine
        has them, before the first step (`progress.Warnings`)."""
        from unclip_cli.cli.progress import Bars, Estimate
        from unclip_cli.progress import Warnings

        self.eng = self.engine(req)
        estimate = Estimate(self.note, min(req.count, req.effective_batch))

        def show(event) -> None:
            if isinstance(event, Warnings):
                for w in event.lines:
                    self.warn(w)
            else:
                bars(event)
                estimate(event)

        with Bars(self.err, enabled=not self.c.quiet) as bars:  # bars on a terminal, a line per stage elsewhere
            result = self.eng.run(req, callback=show)  # its warnings are the ones `show` was handed
        return result

    def write(self, write_fn: Callable) -> list[Path]:
        """Write the outputs all-or-nothing; `write_fn(outs)` adds the files to an OutputSet, which names a repeated
        run `-run2`, `-run3`... and a rerun (`named`) `-rerun`, `-rerun2`..., after each file's own name."""
        from unclip_cli.imageio import OutputSet

        with OutputSet(self.c.out, force=self.c.force, metadata=not self.c.no_metadata, rerun=self.rerun) as outs:
            write_fn(outs)
        return outs.paths

    def report(self, req: Request, payload: dict, paths: list[Path]) -> None:
        payload = {"command": self.op, "model": self.eng.name, "device": str(self.eng.device), "seed": req.seed,
                   **payload, "files": [str(p) for p in paths], "warnings": self.warnings}
        _emit(json.dumps(payload, indent=2, ensure_ascii=False) + "\n" if self.c.json else "".join(f"{p}\n" for p in paths))

    def images_with_grid(self, req: Request) -> None:
        """Run the request; write one PNG per image (plus a grid when there are several) and report them."""
        result = self.run(req)
        stem = self.named(req)
        planned: dict[str, list[Path]] = {"images": [], "grid": []}

        def write(outs) -> None:
            from unclip_cli.imageio import grid

            for im, rec in zip(result.images, result.recipes):
                if req.index is None:
                    planned["images"].append(outs.add_png(im, stem, index=True, recipe=rec))
                else:  # a --from replay of one image keeps its index (`…-42-3`), suffixed when it is a rerun
                    planned["images"].append(outs.add_png(im, f"{stem}-{rec['index']}", recipe=rec))
            if len(result.images) > 1:
                planned["grid"].append(outs.add_png(grid(result.images), f"{stem}-grid", sheet=_sheet(req, result.images)))

        paths = self.write(write)
        # The final names can differ from the planned ones if another process took a name meanwhile.
        final = dict(zip(planned["images"] + planned["grid"], paths))
        self.report(req, {"images": [{"path": str(final[p]), "seed": rec["seed"], "recipe": rec}
                                     for p, rec in zip(planned["images"], result.recipes)],
                          "grid": str(final[planned["grid"][0]]) if planned["grid"] else None}, paths)


def _sheet(req: Request, images: list) -> dict:
    """What a grid or strip stores about itself: the operation, the first seed and how many images it shows."""
    return {"op": req.op, "seed": req.seed, "images": len(images)}


# What a recipe records of its inputs: their file names (and an edit's size and mask area), not the images.
_INPUT_FIELDS = {"vary": ["image"], "nudge": ["image"], "edit": ["image"], "blend": ["image_a", "image_b"], "mix": ["images"]}


def _recorded_names(recipe: dict) -> list[str]:
    """The input file names a recipe records, made safe to print (the recipe is untrusted)."""
    from unclip_cli.requests import printable

    raw = recipe.get("inputs") if recipe.get("op") in ("blend", "mix") else [recipe.get("input")]
    return [printable(str(n))[:80] for n in (raw if isinstance(raw, list) else []) if isinstance(n, str) and n]


def _check_inputs(path: Path, recipe: dict, inputs: dict) -> None:
    """A --from rerun of an operation on images needs those images given again: a recipe names them, it does not
    hold them. One line saying which, and a command to paste (`_paste_inputs`), instead of a usage error about an
    argument or a count of none."""
    op = recipe["op"]
    fields = _INPUT_FIELDS.get(op)
    if not fields:
        return
    names = _recorded_names(recipe)
    given = len(inputs.get("images") or []) if op == "mix" else sum(inputs.get(f) is not None for f in fields)
    wanted = len(names) if op == "mix" else len(fields)
    need_mask = op == "edit" and recipe.get("box") is None and inputs.get("mask") is None
    if given == wanted and not need_mask:
        return
    what = f"{wanted} image{'s' if wanted != 1 else ''}" + (f" ({', '.join(names)})" if names else "") if wanted else "no image"
    args, unsaid = _paste_inputs(path, recipe, need_mask)
    command = " ".join(["unclip", op, *args, "--from", shlex.quote(str(path))]) + unsaid
    if given and given != wanted:
        problem = f"made from {what}, not {given}: give the same"
    elif given < wanted:
        problem = f"made from {what}: give {'them' if wanted > 1 else 'it'}" + (" and its mask" if need_mask else "") + " again"
    else:
        problem = f"made from {what} and a mask ({printable(str(recipe.get('mask') or 'mask'))[:80]}): give the mask again"
    raise UsageError(f"{path} is a recipe of `unclip {op}` {problem}, as in: {command}",
                     hint="a recipe records its inputs' names" + (" and the image's size" if op == "edit" else "") + ", not the images")


# A command line that gives each command's image arguments (mix takes any number: its own check counts them)
_EXAMPLES = {"vary": "unclip vary cat.png", "nudge": 'unclip nudge cat.png --to "dog face"',
             "edit": 'unclip edit cat.png --box 0,0,1,0.4 "red heart"', "blend": "unclip blend a.png b.png"}


def _check_arguments(op: str, given: dict) -> None:
    """Without --from, an image command needs its image arguments: one line naming the one missing (blend's B, not
    "the image"), with a command that gives them all."""
    if op not in _EXAMPLES:
        return
    arguments, example = list(zip(_INPUT_FIELDS[op], INPUTS[op].split())), _EXAMPLES[op]  # (field, usage line's name)
    missing = [name for field, name in arguments if given.get(field) is None]
    if missing:
        what = " and ".join(missing) + (" are" if len(missing) > 1 else " is")
        whole = f"{op} takes {len(arguments)} images, A and B: " if len(arguments) > 1 else f"{op} takes an image: "
        raise UsageError(f"{whole}{what} missing", hint=f"e.g. {example}; or --from PNG to rerun a recipe of `unclip {op}`")


def _differences(recipe: dict, req: Request) -> list[str]:
    """Warnings for a --from rerun whose inputs differ from what the recipe records (its inputs' names; an edit's
    image size and masked share): the result will then differ from the recipe's image."""
    from unclip_cli.requests import printable

    out = []
    names, sources = _recorded_names(recipe), req.sources()
    if len(names) == len(sources):
        for name, src in zip(names, sources):
            if isinstance(src, (str, Path)) and Path(src).name != name:
                out.append(f"the recipe was made from {name}, not {printable(Path(src).name)}: unless it is the same picture, "
                           "the result will differ from the recipe's image")
    if req.op == "edit":
        inputs = req.inputs()
        size, got = recipe.get("size"), list(inputs.images[0].size)
        if isinstance(size, list) and len(size) == 2 and size != got:
            out.append(f"the recipe's image was {printable(str(size[0]))}×{printable(str(size[1]))}, this one is {got[0]}×{got[1]}: "
                       "another image, so the result will differ")
        fraction = recipe.get("mask_fraction")
        if isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and inputs.mask_fraction is not None \
                and abs(fraction - inputs.mask_fraction) > 1e-4:
            out.append(f"the mask marks {inputs.mask_fraction:.1%} of the image where the recipe's marked {fraction:.1%}: "
                       "another mask, so the result will differ")
    return out


def _same_inputs(recipe: dict, req: Request) -> bool:
    """Whether a --from run's inputs have the names its recipe records (an edit's mask or box too)."""
    from unclip_cli.requests import printable

    if [printable(source_name(s))[:80] for s in req.sources()] != _recorded_names(recipe):
        return False
    if req.op == "edit":
        return recipe.get("box") == list(req.box) if req.box is not None else recipe.get("mask") == source_name(req.mask, "mask")
    return True


def _value(option):
    return None if option is None else option.value


# ----------------------------------------------------------------------------------------------------
# Commands

# Optional on the command line so that `--from` without it is told which image to give (a recipe does not hold it)
ImageArg = Annotated[Optional[Path], typer.Argument(metavar="IMAGE", help="The input image (any size and common format).", show_default=False)]
NoiseLevelOpt = Annotated[Optional[int], typer.Option(
    "--noise-level", metavar="0-999", show_default="the model's own", rich_help_panel=P_FAMILY,
    help="Noise added to the image embedding before decoding (ComfyUI's noise_augmentation x 999); higher strays further "
         "from the image. Only for decoders that read a noised embedding.")]


@image_command(epilog="""\
[b]Examples[/b]

  unclip generate "red apple"
  unclip generate "cat face" -n 4 --seed 42
  unclip generate "猫脸" --quality best --out cats
  unclip generate --from outputs/cat-face-42-0.png      [dim]# rerun a stored recipe[/dim]
""")
def generate(
    prompt: Annotated[Optional[str], typer.Argument(metavar="PROMPT", help="What to draw.", show_default=False)] = None,
    n: NOpt = None,
    recipe: RecipeOpt = None,
    *, common,
) -> None:
    """Draw images from a text prompt (text → prior → decoder → upsampler)."""
    job = Job("generate", common)
    req = job.request(GenerateRequest, recipe, prompt=prompt, n=n)
    job.images_with_grid(req)


@image_command(prior=None, epilog="""\
[b]Examples[/b]

  unclip vary painting.jpg
  unclip vary photo.png -n 4 --strength 0.3    [dim]# close to the input[/dim]
  unclip vary wide.jpg --fit pad               [dim]# keep the whole picture[/dim]
  unclip vary photo.png --noise-level 300      [dim]# Stable unCLIP: a looser take on the image[/dim]
  unclip vary photo.png -p "in winter"         [dim]# a caption for the decoder too[/dim]
""")
def vary(
    image: ImageArg = None,
    n: NOpt = None,
    strength: Annotated[Optional[float], typer.Option("--strength", show_default="0.5",
                                                      help="0 reconstructs the input; further from it as it grows to 1.")] = None,
    fit: FitOpt = None,
    noise_level: NoiseLevelOpt = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", show_default="none",
                                                  help="A caption the decoder reads beside the image (Stable unCLIP's img2img "
                                                       "prompt; the emoji set's decoder heeds it only slightly).")] = None,
    recipe: RecipeOpt = None,
    *, common,
) -> None:
    """Make variations that keep the gist of an image (its CLIP embedding, decoded again)."""
    job = Job("vary", common)
    req = job.request(VaryRequest, recipe, image=image, n=n, strength=strength, fit=_value(fit), noise_level=noise_level, prompt=prompt)
    job.images_with_grid(req)


@image_command(prior=None, epilog="""\
[b]Examples[/b]

  unclip blend a.png b.png --steps 5
  unclip blend cat.png dog.jpg --steps 9 --fps 12 --seed 7
""")
def blend(
    image_a: Annotated[Optional[Path], typer.Argument(metavar="A", help="The first image.", show_default=False)] = None,
    image_b: Annotated[Optional[Path], typer.Argument(metavar="B", help="The last image.", show_default=False)] = None,
    frames: Annotated[Optional[int], typer.Option("--steps", "--frames", "-k", show_default="5",
                                                  help=f"Frames from A to B, both included (2-{MAX_FRAMES}).")] = None,
    fps: Annotated[float, typer.Option("--fps", help="Frames per second of the animation (0.1-100).")] = DEFAULT_FPS,
    fit: FitOpt = None,
    recipe: RecipeOpt = None,
    *, common,
) -> None:
    """Morph one image into another: the frames, a strip and an animated GIF (and WebP)."""
    from unclip_cli.imageio import strip, webp_supported

    if not 0.1 <= fps <= 100:
        raise UsageError(f"--fps must be from 0.1 to 100, not {fps:g}")
    job = Job("blend", common)
    req = job.request(BlendRequest, recipe, image_a=image_a, image_b=image_b, frames=frames, fit=_value(fit))
    result = job.run(req)
    stem = job.named(req, fps=fps)
    named: dict[str, Any] = {"frames": []}
    if not webp_supported():
        job.note("This Pillow has no WebP support: writing the GIF only")

    def write(outs) -> None:
        for im, rec in zip(result.images, result.recipes):
            named["frames"].append(outs.add_png(im, stem, index=True, recipe=rec))
        named["strip"] = outs.add_png(strip(result.images), f"{stem}-strip", sheet=_sheet(req, result.images))
        named["gif"] = outs.add_gif(result.images, stem, fps=fps)
        named["webp"] = outs.add_webp(result.images, stem, fps=fps) if webp_supported() else None

    paths = job.write(write)
    planned = named["frames"] + [named["strip"], named["gif"]] + ([named["webp"]] if named["webp"] else [])
    final = dict(zip(planned, paths))
    job.report(req, {
        "images": [{"path": str(final[p]), "seed": rec["seed"], "recipe": rec} for p, rec in zip(named["frames"], result.recipes)],
        "strip": str(final[named["strip"]]), "gif": str(final[named["gif"]]),
        "webp": str(final[named["webp"]]) if named["webp"] else None,
    }, paths)


@image_command(epilog="""\
[b]Examples[/b]

  unclip edit cat.png --box 0,0,1,0.4 "red heart"      [dim]# repaint the top 40%[/dim]
  unclip edit cat.png --mask mask.png "red heart"
  unclip edit cat.png --mask keep.png --invert-mask "sun" -n 4

A mask marks in white what to repaint (black is kept). A mask with transparency marks the \
transparent area instead, as the DALL-E edits API does. --box marks a rectangle instead, as \
fractions of the image (left,top,right,bottom). The results have the input's size; pixels outside \
the mask are kept exactly; inside it, the result's colours are matched to theirs along the border \
and it blends into them over --feather pixels.
""")
def edit(
    image: ImageArg = None,
    prompt: Annotated[Optional[str], typer.Argument(metavar="PROMPT", help="What to paint in the masked area.", show_default=False)] = None,
    mask: Annotated[Optional[Path], typer.Option("--mask", "-m", metavar="MASK", show_default=False,
                                                 help="White (or transparent) = repaint, black = keep; the image's shape, any size (this or --box).")] = None,
    box: Annotated[Optional[str], typer.Option("--box", metavar="L,T,R,B", show_default=False,
                                               help="Repaint a rectangle instead of a mask: left,top,right,bottom as fractions "
                                                    "of the image, e.g. 0,0.5,1,1 for the lower half.")] = None,
    feather: Annotated[Optional[int], typer.Option("--feather", metavar="PX",
                                                   show_default=f"{DEFAULT_FEATHER} per {FEATHER_SIDE} px of the image's long side",
                                                   help="Blend the result into the kept image over this many pixels inside "
                                                        "the mask, its colours matched to the kept image's along the border "
                                                        "(0: a hard edge, unmatched). Unmasked pixels never change. The "
                                                        "default scales with the image, so a photo's edit looks as a small one's.")] = None,
    invert_mask: Annotated[Optional[bool], typer.Option("--invert-mask", help="Repaint what the mask would keep.",
                                                        show_default=False)] = None,
    n: NOpt = None,
    recipe: RecipeOpt = None,
    *, common,
) -> None:
    """Repaint only the masked part of an image from a prompt; the rest stays pixel-for-pixel. With the emoji model
    it seldom draws the prompt recognisably in the mask (measured in the model card)."""
    job = Job("edit", common)
    # the request reads --box's text as four numbers, checking it with the other options
    req = job.request(EditRequest, recipe, image=image, mask=mask, box=box, prompt=prompt, invert_mask=invert_mask, n=n, feather=feather)
    job.images_with_grid(req)


@image_command(prior=None, epilog="""\
[b]Examples[/b]

  unclip nudge cat.png --to "dog face"
  unclip nudge cat.png --from-text "cat face" --to "dog face" --amount 0.4 -n 4
  unclip nudge cat.png --from outputs/cat-to-dog-face-7-0.png  [dim]# rerun a recipe[/dim]

The image's CLIP embedding is turned toward the difference between the two texts (the paper's \
"text diffs"); a larger --amount moves further. With the emoji model the target seldom appears \
(measured with an independent classifier, scripts/measure_nudge.py): up to 0.4 the image keeps its \
layout and changes a little, but no source became its target there (cat face to dog face or tiger face, \
purple heart to green heart); from 0.7 the source is lost, and a target of another shape (cat face to \
red heart) replaces the image instead of turning it.
""")
def nudge(
    image: ImageArg = None,
    to_text: Annotated[Optional[str], typer.Option("--to", "-t", metavar="TEXT", show_default=False,
                                                   help="What the image should become (required).")] = None,
    from_text: Annotated[Optional[str], typer.Option("--from-text", metavar="TEXT", show_default=False,
                                                     help="What the image shows now (a better anchor than nothing).")] = None,
    amount: Annotated[Optional[float], typer.Option("--amount", "-a", show_default="0.3",
                                                    help="How far to turn, 0-1 (with the emoji model 0.2-0.4 keeps the image's layout; "
                                                         "from 0.7 it is lost); with -n, the images step up to it.")] = None,
    n: NOpt = None,
    fit: FitOpt = None,
    recipe: RecipeOpt = None,
    *, common,
) -> None:
    """Turn an image toward a text (the paper's text diffs), keeping what the text does not change."""
    job = Job("nudge", common)
    if recipe is not None and from_text is None and not recipe.is_file():
        # nudge's --from used to be its text; --from is a recipe PNG in every command now. A --from that
        # names no file is read the old way, so old command lines keep working.
        job.warn(f"`nudge --from TEXT` is deprecated: write --from-text {shlex.quote(str(recipe))} (--from now reruns a recipe PNG, "
                 "as in the other commands)")
        from_text, recipe = str(recipe), None
    req = job.request(NudgeRequest, recipe, image=image, to=to_text, from_=from_text, amount=amount, n=n, fit=_value(fit))
    job.images_with_grid(req)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def _weights(text: str | None) -> list[float] | None:
    """--mix-weights 0.5,0.3,-0.2 as numbers; the request checks how many and their range."""
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise typer.BadParameter("give numbers separated by commas, e.g. 0.5,0.3,0.2", param_hint="--mix-weights") from None


def _untyped():
    """A text argument whose help shows no type label (`<list[str]>`, `<str>`: the help says what it takes). Built on the
    click that Typer uses (recent Typer vendors its own copy), found through Typer's Argument class."""
    from typer.core import TyperArgument

    click_core = sys.modules[next(c for c in TyperArgument.__mro__ if c.__name__ in ("Argument", "Parameter")).__module__]

    class Untyped(click_core.types.StringParamType):
        def get_metavar(self, param, ctx=None):
            return ""

    return Untyped()


@image_command(prior="texts are mixed (the prior draws their embeddings)", epilog="""\
[b]Examples[/b]

  unclip mix cat.png heart.png                       [dim]# half of each[/dim]
  unclip mix a.png b.png "sunglasses" --mix-weights 0.5,0.3,0.2
  unclip mix cat.png "sunglasses" --mix-weights 1,0.6 -n 4
  unclip mix cat.png "cat face" "dog face" --mix-weights 1,-0.5,0.5   [dim]# subtract a concept[/dim]
  unclip mix a.png b.png --from outputs/mix-7-0.png  [dim]# rerun, images again[/dim]

Each argument that names an existing file is an image (its CLIP embedding); any other is a text (a CLIP image \
embedding drawn by the prior). The weights follow the images, then the texts; they need not sum to one. The \
weighted sum is renormalised as the model's embeddings are and decoded from fresh noise. `blend` is the \
two-image morph. A recipe names its images but does not hold them: with --from, give them again.
""")
def mix(
    sources: Annotated[Optional[list[str]], typer.Argument(metavar="IMAGE_OR_TEXT", show_default=False, click_type=_untyped(),
                                                           help="2-8 images (files) and texts to mix, in any order.")] = None,
    mix_weights: Annotated[Optional[str], typer.Option("--mix-weights", metavar="W1,W2,...", show_default="equal",
                                                       help="One weight per image and text, in the order given (negative subtracts).")] = None,
    # -m is --mask in edit; mix's old -m still works, with a note
    old_weights: Annotated[Optional[str], typer.Option("-m", hidden=True)] = None,
    n: NOpt = None,
    fit: FitOpt = None,
    noise_level: NoiseLevelOpt = None,
    recipe: RecipeOpt = None,
    *, common,
) -> None:
    """Mix images and texts with weights: their CLIP image embeddings, combined, decoded afresh."""
    job = Job("mix", common)
    if old_weights is not None:
        if mix_weights is not None:
            raise typer.BadParameter("give the weights once", param_hint="--mix-weights")
        job.warn("`mix -m` is deprecated (-m is --mask in edit): write --mix-weights")
        mix_weights = old_weights
    images, prompts, order = [], [], []
    for s in sources or []:
        path = Path(s)
        if path.is_file():
            images.append(path)
            order.append(("image", len(images) - 1))
        elif path.suffix.lower() in IMAGE_SUFFIXES and "\n" not in s:
            raise InputError(f"image {s} does not exist", hint="check the path; arguments that name no file are read as texts")
        else:
            prompts.append(s)
            order.append(("text", len(prompts) - 1))
    w = _weights(mix_weights)
    if w is not None and len(w) == len(order):  # the request's order: images first, then texts
        by_kind = dict(zip(order, w))
        w = [by_kind[("image", j)] for j in range(len(images))] + [by_kind[("text", j)] for j in range(len(prompts))]
    given = dict(images=images or None, prompts=prompts or None, weights=w, n=n, fit=_value(fit), noise_level=noise_level)
    job.images_with_grid(job.request(MixRequest, recipe, **given))


def _objects(specs: list[str] | None) -> list | None:
    """--obj "PHRASE:LEFT,TOP,RIGHT,BOTTOM" as [phrase, box]; the request checks the box."""
    if not specs:
        return None
    out = []
    for spec in specs:
        phrase, sep, box = spec.rpartition(":")
        if not sep or not phrase.strip():
            raise typer.BadParameter(f"{spec!r}: give a phrase and a box, e.g. \"cat face:0,0.2,0.5,0.8\"", param_hint="--obj")
        out.append([phrase.strip(), box])
    return out


@image_command(epilog="""\
[b]Examples[/b]

  unclip compose "a cat face left of a red heart"
  unclip compose "two stars" -n 4
  unclip compose --obj "cat face:0,0.2,0.5,0.8" --obj "red heart:0.5,0.3,1,0.7"
  unclip compose "a star above a moon" --method paste

The sentence grammar: A left of / right of / above / below / next to / and B, and "two X". Boxes are fractions \
of the canvas (left,top,right,bottom). --method paste (the default) draws each object alone, pastes it into its \
box and harmonises the canvas; fuse draws each object in its box and fuses it with the whole picture at every \
decoder step.

Checked by the independent classifier on 217 held-out emoji prompts x 4 seeds, each object winning \
its box with the boxes apart: paste 8.8%, fuse 0.8%, generate 0.8% (fuse draws one shape with a different half in \
each box, which a box-by-box check passes 53.8% of the time). Expect two separate objects rarely.
""")
def compose(
    prompt: Annotated[Optional[str], typer.Argument(metavar="SENTENCE", show_default=False,
                                                    help="What to draw and where (optional with --obj).")] = None,
    obj: Annotated[Optional[list[str]], typer.Option("--obj", metavar="PHRASE:L,T,R,B", show_default=False,
                                                     help="An object and its box (repeatable); replaces the sentence's layout.")] = None,
    background: Annotated[Optional[str], typer.Option("--background", metavar="TEXT", show_default="the sentence",
                                                      help="The text of the whole picture.")] = None,
    method: Annotated[Optional[str], typer.Option("--method", metavar="fuse|paste", show_default="paste",
                                                  help="Fuse the objects' paths at every step, or paste each and harmonise.")] = None,
    n: NOpt = None,
    recipe: RecipeOpt = None,
    *, common,
) -> None:
    """Put objects where you say: a sentence's layout, or boxes, one path per object."""
    job = Job("compose", common)
    req = job.request(ComposeRequest, recipe, prompt=prompt, objects=_objects(obj), background=background, method=method, n=n)
    job.images_with_grid(req)
