"""`unclip info`: the recipe stored in a PNG, or the model set's facts and card."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from unclip_cli.cli import app
from unclip_cli.cli.images import INPUTS, rerun_command
from unclip_cli.cli.options import JsonShowOpt, WeightsOpt, resolve_weights
from unclip_cli.requests import printable, shown

INFO_EXAMPLES = """\
[b]Examples[/b]

  unclip info                               [dim]# the shipped model set, in short[/dim]
  unclip info --card                        [dim]# ... and its whole model card[/dim]
  unclip info --weights runs/my-model --json
  unclip info outputs/cat-face-42-0.png     [dim]# how an image was made[/dim]
"""

# Recipe fields in the order a person reads them; others follow alphabetically.
RECIPE_ORDER = ["op", "prompt", "to", "from", "input", "inputs", "mask", "box", "invert_mask", "feather", "mask_fraction", "seed",
                "strength", "amount", "frames", "frame", "theta", "quality", "steps", "guidance", "prior_guidance",
                "sampler", "size", "fit", "model", "model_hash", "version"]


def _json(value: Any) -> str:
    """JSON that every reader accepts: a recipe is untrusted and may hold NaN or infinities, which JSON has
    no numbers for; they are written as the strings "NaN", "Infinity" and "-Infinity"."""

    def finite(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return "NaN" if v != v else ("Infinity" if v > 0 else "-Infinity")
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return v

    return json.dumps(finite(value), indent=2, ensure_ascii=False, default=str, allow_nan=False)


def _fmt(v: Any) -> str:
    """A recipe value on one line; the recipe is untrusted text, so control characters are shown escaped."""
    if isinstance(v, dict):
        text = ", ".join(f"{k} {val}" for k, val in v.items())
    elif isinstance(v, list):
        text = "×".join(map(str, v)) if all(isinstance(x, int) for x in v) and len(v) == 2 else ", ".join(map(str, v))
    elif isinstance(v, float):
        text = f"{v:g}"
    elif isinstance(v, int) and not isinstance(v, bool):
        text = shown(v)  # repr, with a digit count for absurd ones
    else:
        text = str(v)
    return printable(text).replace("\n", "\\n").replace("\t", "\\t")


def _show_png(path: Path, as_json: bool) -> None:
    from unclip_cli.imageio import PARAMETERS_KEY, RECIPE_KEY, read_png_text, read_recipe, read_sheet

    text = read_png_text(path)
    recipe = read_recipe(path) if RECIPE_KEY in text else None
    params = text.get(PARAMETERS_KEY)
    sheet = read_sheet(text) if recipe is None else None
    if as_json:
        sys.stdout.write(_json({"file": str(path), "recipe": recipe, "parameters": params, "sheet": sheet}) + "\n")
        return
    if sheet is not None:
        op = sheet["op"]
        run = f"`unclip {op}`" if op in INPUTS else "unclip"
        kind = "strip" if op == "blend" else "grid"
        seeds = f"seed {sheet['seed']}" if op == "blend" or sheet["images"] < 2 else f"seeds {sheet['seed']}-{sheet['seed'] + sheet['images'] - 1}"
        print(f"{path} is a {kind} of the {sheet['images']} images of one {run} run ({seeds}): it holds no recipe "
              "itself; each image's own PNG carries its recipe (`unclip info IMAGE.png`, rerun with --from IMAGE.png).")
        return
    if recipe is None:
        if params:
            print(f"{path} has no unclip recipe; its `parameters` text (from another tool) reads:")
            print(printable(params))
        elif re.search(r"-(grid|strip)(-run\d+|-\d+)?$", path.stem):
            print(f"{path} has no stored recipe. If unclip wrote it, it is a grid or strip of a run's images (older versions "
                  "did not mark them), and each image's own PNG carries its recipe (`unclip info IMAGE.png`).")
        else:
            print(f"{path} has no stored recipe (it was not written by unclip, or was written with --no-metadata).")
        return
    shown_as = _explained(recipe)
    keys = [k for k in RECIPE_ORDER if k in recipe] + sorted(k for k in recipe if k not in RECIPE_ORDER)
    keys = [k for k in keys if shown_as.get(k, "") is not None]
    op = recipe.get("op")
    # nudge's text it turns from is the recipe's `from`, shown under its option's name: --from is the recipe PNG
    labels = {k: "from_text" if op == "nudge" and k == "from" else _fmt(k) for k in keys}
    width = max(len(label) for label in labels.values())
    print(f"{path}: made by `unclip {op}`" if op in INPUTS else f"{path}: a recipe of an unknown operation, {printable(shown(op))}")
    for k in keys:
        print(f"  {labels[k]:<{width}}  {shown_as.get(k) or _fmt(recipe[k])}")
    print(f"Rerun: {rerun_command(path, recipe)}")


def _explained(recipe: dict) -> dict[str, str | None]:
    """Recipe fields shown otherwise than as stored (None: not shown): the settings of the stages that ran
    (`_ran_only`), and `theta` as `_theta` says."""
    return {**_ran_only(recipe), **_theta(recipe)}


def _ran_only(recipe: dict) -> dict[str, str | None]:
    """Only the settings of the stages that ran, as the recipe's `steps` lists them (the page's recipes follow the same
    rule): a vary's recipe also names the prior's sampler, and vary runs no prior. A recipe without `steps` as a
    table of stages is shown as stored."""
    ran, sampler = recipe.get("steps"), recipe.get("sampler")
    if not isinstance(ran, dict):
        return {}
    out: dict[str, str | None] = {} if "prior" in ran else {"prior_guidance": None}
    if isinstance(sampler, dict):
        used = {stage: v for stage, v in sampler.items() if stage in ran}
        out["sampler"] = _fmt(used) if used else None
    return out


def _theta(recipe: dict) -> dict[str, str | None]:
    """A nudge's `theta` is its image's own amount: shown as the amount, with the run's (`amount`, which -n images
    step up to); a blend's, as the frame's place."""

    def number(k):
        v = recipe.get(k)
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None

    def whole(k):
        v = recipe.get(k)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    op, theta = recipe.get("op"), number("theta")
    if op == "nudge" and theta is not None and number("amount") is not None:
        n, i = whole("n"), whole("index")
        if n is None or i is None or not 0 <= i < n or n == 1:
            return {"theta": None, "amount": f"{theta:g}"}
        return {"theta": None, "amount": f"{theta:g} (image {i + 1} of {n}; the run's images step up to {number('amount'):g}: "
                                          f"--amount {number('amount'):g} -n {n})"}
    frame, frames = whole("frame"), whole("frames")
    if op == "blend" and theta is not None and frame is not None and frames is not None and 0 <= frame < frames:
        return {"theta": f"{theta:g} (frame {frame + 1} of {frames}'s place: 0 is A, 1 is B)"}
    return {}


def card_summary(card: str) -> list[tuple[str, str]]:
    """What `unclip info` shows of a model card without --card: the gist of each point of its section on what the
    model is good and not good at, as (label, text): the start of each point, up to its first parenthesis or
    semicolon ("Good", "text to image for the 1,948 emoji concepts ..."). A card without that section: its first
    paragraph, labelled "About"."""
    lines = [line.rstrip() for line in card.strip().splitlines()]
    start = next((i for i, line in enumerate(lines) if line.startswith("#") and "good at" in line.lower()), None)
    if start is None:
        body = []
        for line in lines[1:]:
            if line.startswith("#") or (not line.strip() and body):
                break
            if line.strip():
                body.append(line.strip())
        return [("About", " ".join(body))] if body else []
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("#")), len(lines))
    points: list[str] = []
    for line in lines[start + 1 : end]:
        if line.lstrip().startswith(("- ", "* ")):
            points.append(line.lstrip()[2:].strip())
        elif line.strip() and points:
            points[-1] += " " + line.strip()
    out = []
    for point in points:
        label, sep, text = point.partition(":")
        label = re.sub(r"\s*\(.*?\)", "", label)  # "Known failure cases (pictures in docs/GALLERY.md)"
        if not sep or len(label) > 30:
            label, text = "", point
        gist = re.split(r" \(|;|\. ", text.strip(), maxsplit=1)[0].rstrip(" .,:—-")
        out.append((label.strip(" *"), gist))
    return out


def recognised_share(root: str | Path) -> str | None:
    """How often a trained concept's name gives a recognisable picture, as the set's own evaluation measured it
    (metrics.json, written by `unclip eval`): the independent classifier's top-5 rate on images generated from
    held-out prompts, per language, beside the real images' rate. None when the set has no such measurement."""
    try:
        c = json.loads((Path(root) / "metrics.json").read_text(encoding="utf-8"))["metrics"]["classifier"]
        rates = {lang: float(c["generated"][lang]["top5"]) for lang in ("en", "zh") if lang in c["generated"]}
        real = float(c["real_for_the_same_prompts"]["en"]["top5"])
        counts = {lang: int(c["prompts"][lang]) for lang in rates}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not rates or not all(0 <= r <= 1 for r in [*rates.values(), real]) or not all(0 < k < 10**6 for k in counts.values()):
        return None
    names = {"en": "English", "zh": "Chinese"}
    shares = " and ".join(f"{rates[lang]:.0%} of {counts[lang]} {names[lang]}" for lang in rates)
    return (f"{shares} held-out prompts naming trained concepts drew the concept recognisably (the independent "
            f"classifier's top 5; real emoji {real:.0%}): a concept's name is no promise of a good picture")


def model_version(card: str | None) -> str | None:
    """The model's own version, as its card's title gives it ("# unclip `emoji` model — v0.3.1 (...)")."""
    title = (card or "").strip().splitlines()[0] if (card or "").strip() else ""
    m = re.search(r"\bv(\d+(?:\.\d+)+)\b", title)
    return f"v{m.group(1)}" if m else None


def shipped_set() -> str | None:
    """The shipped model set as `unclip info` names it ("emoji v0.3.1": its folder's name and its card's version), read
    from its folder without loading it (for --version, which must stay fast); None when this copy ships none."""
    from unclip_cli.errors import WeightsError

    try:
        root = resolve_weights(None)
    except WeightsError:
        return None
    try:
        with open(root / "MODEL_CARD.md", encoding="utf-8", errors="replace") as f:
            title = f.readline(1000)
    except OSError:
        title = ""
    version = model_version(title)
    return printable(root.name) + (f" {version}" if version else "")


def _show_model(weights: Optional[Path], as_json: bool, whole_card: bool = False) -> None:
    import shutil
    import textwrap

    from unclip_cli import __version__
    from unclip_cli.engine import Engine

    info = Engine.load(resolve_weights(weights), device="cpu").info()
    if as_json:
        sys.stdout.write(_json(info) + "\n")
        return
    card = info.get("card")
    if whole_card:
        if not card:
            print(f"The model set {printable(info['path'])} has no MODEL_CARD.md.")
            return
        from rich.console import Console

        out = Console(highlight=False, soft_wrap=True)
        if out.is_terminal:
            from rich.markdown import Markdown

            out.print(Markdown(card))
        else:
            print(card.rstrip())
        return
    width = max(60, min(shutil.get_terminal_size((100, 24)).columns, 110))

    summary = [(label or "Note", text) for label, text in card_summary(card or "")]

    def field(label: str, text: str) -> None:
        print(textwrap.fill(printable(text), width, initial_indent=f"{printable(label) + ':':<11} ", subsequent_indent=" " * 12))

    version = model_version(card)
    stages = info["stages"]
    total = sum(s["parameters"] for s in stages.values())
    # Two versions: the program's, and the model set's (from its card); each says which it is
    print(f"unclip {__version__} · model {printable(info['name'])}" + (f" {version}" if version else "")
          + f" (hash {info['model_hash']}, {printable(info['path'])})")
    field("Images", f"{info['image_size']}×{info['image_size']} (decoder at {info['base_size']} px), "
                    f"{total / 1e6:.2f} M parameters in {len(stages)} stages")
    for label, text in summary:
        field(label, text)
    recognised = recognised_share(info["path"])
    if recognised:
        field("Measured", recognised)
    gpu = "" if info["device"] != "cpu" else "; float16 on GPUs"
    field("Precision", f"{info['precision']} on {info['device']} ({info['precision_reason']}{gpu})")
    field("More", "unclip concepts QUERY (what it was trained on) · unclip info --card (the whole model card) · --json"
          if card else "unclip concepts QUERY · unclip info --json (this set has no MODEL_CARD.md)")


@app.command(epilog=INFO_EXAMPLES)
def info(
    file: Annotated[Optional[Path], typer.Argument(metavar="FILE.png", help="A PNG written by unclip.", show_default=False)] = None,
    weights: WeightsOpt = None,
    json_: JsonShowOpt = False,
    card: Annotated[bool, typer.Option("--card", help="Print the model set's whole model card.")] = False,
) -> None:
    """Show how a PNG was made (its stored recipe), or, without a file, the model set in short (--card: with its whole card)."""
    if file is not None:
        _show_png(file, json_)
    else:
        _show_model(weights, json_, whole_card=card)
