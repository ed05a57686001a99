"""Reading the user's images and masks, writing outputs (PNG with the recipe, grids, strips, GIF/WebP).

Everything here is plain Pillow and file handling; no model code. Reading turns any common file into an
RGB image (or an L mask) and every problem into an `InputError` naming the file. Writing is atomic and
never overwrites: see `OutputSet`.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import signal
import struct
import tempfile
import threading
import unicodedata
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import ExifTags, Image, PngImagePlugin, UnidentifiedImageError

from unclip_cli.errors import InputError

RECIPE_KEY = "unclip"  # PNG text chunk holding our recipe as JSON
# PNG text chunk of a grid or strip: which images it shows ({"op", "seed", "images"}), as JSON. It holds no recipe:
# each image's own PNG carries that.
SHEET_KEY = "unclip-sheet"
PARAMETERS_KEY = "parameters"  # PNG text chunk in the form other image tools read
MAX_RECIPE_CHARS = 64 * 1024
WHITE = (255, 255, 255)


# ----------------------------------------------------------------------------------------------------
# Reading


def _name(src, what: str) -> str:
    """The short name of a source in notes: its file name (an upload's too: requests.Upload), or `what` for bytes and PIL
    images."""
    if isinstance(src, bytes) and isinstance(getattr(src, "name", None), str):
        return src.name
    return Path(src).name if isinstance(src, (str, Path)) else what


def _open(src, what: str) -> Image.Image:
    """Open and fully decode one image (a path, bytes or a PIL image), or raise a one-line InputError naming it."""
    if isinstance(src, Image.Image):
        return src
    if isinstance(src, (bytes, bytearray)):
        fp, path = io.BytesIO(src), what
    else:
        path = fp = Path(src)
        try:
            found, is_dir = path.exists(), path.is_dir()
        except OSError as e:  # a name the filesystem refuses: too long, say
            raise InputError(f"{what} {path} cannot be read ({e.strerror or e})") from None
        if not found:
            raise InputError(f"{what} {path} does not exist", hint="check the path and the spelling")
        if is_dir:
            raise InputError(f"{what} {path} is a folder, not an image file")
        path = f"{what} {path}"
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and errors at twice that; we refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            _quiet_exif()  # a JPEG's EXIF block is parsed on opening
            im = Image.open(fp)
            im.load()  # decode now, so a truncated file fails here and not halfway through the model
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(
            f"{path} is too large to open safely (possible decompression bomb)",
            hint=f"use an image of at most {Image.MAX_IMAGE_PIXELS:,} pixels",
        ) from None
    except UnidentifiedImageError:
        raise InputError(
            f"{path} is not an image file that can be read",
            hint="use a PNG, JPEG, WebP, GIF, BMP or TIFF file",
        ) from None
    except PermissionError:
        raise InputError(f"{path} cannot be read (permission denied)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # Pillow reports truncated and corrupt data as OSError ("image file is truncated"), SyntaxError
        # (broken headers) or ValueError, depending on the format.
        raise InputError(
            f"{path} is truncated or corrupt ({e})", hint="re-export or re-download the file"
        ) from None
    return im


def _to_rgb(im: Image.Image, background: tuple[int, int, int] = WHITE, name: str = "image") -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is flattened onto `background`.

    A float image ("F", as in TIFF) with NaN or infinite pixels is refused: such pixels have no colour,
    and any we picked (black, say) would pass a broken export off as a picture."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if not np.isfinite(a).all():
            raise InputError(f"{name} has NaN or infinite pixel values", hint="save it as an 8- or 16-bit image")
        hi = 65535.0 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        if im.mode == "F" and a.max(initial=0) <= 1.0:
            hi = 1.0
        im = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" or im.mode == "PA":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "La", "RGBa"):
        im = im.convert("RGBA")
        flat = Image.new("RGBA", im.size, background + (255,))
        flat.alpha_composite(im)
        return flat.convert("RGB")
    if im.mode != "RGB":
        im = im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    return im


# EXIF orientation (EXIF 2.3, tag 274) -> the transposition that shows the image upright.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
}
# What Pillow's EXIF parser raises for a damaged block (found by corrupting EXIF bytes in JPEG, PNG and
# WebP files): a bad TIFF header is a SyntaxError, an IFD cut short a struct.error.
_EXIF_ERRORS = (SyntaxError, struct.error)


def _upright(im: Image.Image, name: str) -> tuple[Image.Image, list[str]]:
    """Apply the EXIF orientation tag, as viewers do. A damaged EXIF block does not make the pixels
    unusable: they are kept as stored, with a note. Only the tag is read (not ImageOps.exif_transpose,
    which also rewrites the EXIF block and fails on more kinds of damage), as no EXIF is passed on."""
    try:
        with warnings.catch_warnings():
            _quiet_exif()
            orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
    except _EXIF_ERRORS:
        return im, [f"{name} has a damaged EXIF block: its orientation is ignored, the pixels are used as stored"]
    method = _UPRIGHT.get(orientation)  # other values (0, 9, text) mean "as stored", as in Pillow
    return (im if method is None else im.transpose(method)), []


def _quiet_exif() -> None:
    """Inside `warnings.catch_warnings()`: silence Pillow's warnings about damaged EXIF tags (its TIFF
    parser reads EXIF), which would print source lines on the terminal; `_upright` notes what matters."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")


def fit_square(im: Image.Image, fit: str, name: str = "image") -> tuple[Image.Image, list[str]]:
    """Make `im` square: "crop" keeps the centre, "pad" adds white bars. Returns notes saying what changed."""
    w, h = im.size
    if w == h:
        return im, []
    if fit == "crop":
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        out = im.crop((left, top, left + s, top + s))
        if w > h:
            cut = f"{left} px on the left and {w - s - left} px on the right"
        else:
            cut = f"{top} px at the top and {h - s - top} px at the bottom"
        return out, [f"{name} is {w}×{h}: cropped {cut} to a {s}×{s} square (use --fit pad to keep it all)"]
    if fit == "pad":
        s = max(w, h)
        out = Image.new("RGB", (s, s), WHITE)
        out.paste(im, ((s - w) // 2, (s - h) // 2))
        return out, [f"{name} is {w}×{h}: padded with white to a {s}×{s} square"]
    raise InputError(f"unknown fit {fit!r}", hint="use --fit crop or --fit pad")


def load_image(src, fit: str | None = "crop", what: str = "image") -> tuple[Image.Image, list[str]]:
    """Read an image (a path, bytes or a PIL image) of any common format and mode as RGB, upright,
    optionally fitted to a square.

    `fit`: "crop" (centre square), "pad" (white bars) or None (keep the shape). Returns (image, notes),
    where the notes say in words what was done to the input (first frame taken, square fitting).
    """
    im = _open(src, what)
    name = _name(src, what)
    notes: list[str] = []
    frames = getattr(im, "n_frames", 1)
    if frames > 1:
        im.seek(0)
        notes.append(f"{name} has {frames} frames: using the first")
    im, upright_notes = _upright(im, name)
    notes += upright_notes
    im = _to_rgb(im, name=name if name == what else f"{what} {name}")  # bytes are named by `what` alone
    if fit is not None:
        im, fit_notes = fit_square(im, fit, name)
        notes += fit_notes
    return im, notes


def box_mask(box, size: tuple[int, int]) -> Image.Image:
    """A mask ("L", 255 = repaint) of `size` that marks the rectangle `box` = (left, top, right, bottom), given
    as fractions of the image: the pixels whose centres fall inside it."""
    w, h = size
    xs, ys = (np.arange(w) + 0.5) / w, (np.arange(h) + 0.5) / h
    inside = ((ys >= box[1]) & (ys < box[3]))[:, None] & ((xs >= box[0]) & (xs < box[2]))[None, :]
    return Image.fromarray(inside.astype(np.uint8) * 255, "L")


def load_mask(src, size: tuple[int, int], invert: bool = False) -> tuple[Image.Image, float, list[str]]:
    """Read an edit mask: returns (mask "L" with 255 = repaint and 0 = keep, repainted fraction, notes).

    White marks what to repaint. A mask with real transparency (some pixels see-through) marks the
    transparent area instead, as the DALL-E edits API does. `invert` swaps the two. A mask of another
    size but the image's shape is resized (nearest neighbour) with a note; one of another shape, an empty
    or a full mask is an InputError.
    """
    name = f"mask {Path(src).name}" if isinstance(src, (str, Path)) else "mask"
    im, notes = _upright(_open(src, "mask"), name)
    alpha = None
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info):
        alpha = np.asarray(im.convert("RGBA").getchannel("A"))
        if alpha.min() >= 128:  # fully opaque: the alpha channel carries no mask
            alpha = None
    if alpha is not None:
        repaint = alpha < 128
        how = "its transparent area"
        notes.append(
            f"{name} has transparency: repainting its transparent area, as the DALL-E edits API does"
            + ("" if invert else " (use --invert-mask for the opposite)")
        )
    else:
        gray = np.asarray(_to_rgb(im, background=(0, 0, 0), name=name).convert("L"))
        repaint = gray >= 128
        how = "its white area"
    if invert:
        repaint = ~repaint
        how = "everything but " + how
    mask = Image.fromarray(repaint.astype(np.uint8) * 255, "L")
    if mask.size != tuple(size):
        (mw, mh), (w, h) = mask.size, size
        # A mask of the image's shape (to a pixel of rounding) maps onto it by scaling; any other would be stretched
        # over the image (or, in the model's padded square, fall partly outside it): neither is what it marked.
        if abs(mw * h - mh * w) > max(w, h):
            # The example is the image's shape made smaller (halved, then halved again while over 1024 px), never
            # from the mask's own size, which may be larger than the image.
            scale = 2
            while max(w, h) / scale > 1024:
                scale *= 2
            like = (max(1, round(w / scale)), max(1, round(h / scale)))
            raise InputError(
                f"{name} is {mw}×{mh} but the image is {w}×{h}: another shape, so it would be stretched",
                hint=f"make the mask {w}×{h} (or the same shape smaller, e.g. {like[0]}×{like[1]}), "
                "or mark a rectangle with --box LEFT,TOP,RIGHT,BOTTOM",
            )
        notes.append(f"{name} is {mw}×{mh} but the image is {w}×{h}: resized the mask (same shape, nearest neighbour)")
        mask = mask.resize(tuple(size), Image.Resampling.NEAREST)
    m = np.asarray(mask) > 127
    fraction = float(m.mean())
    if not m.any():
        raise InputError(
            f"{name} marks nothing to repaint ({how} is empty)",
            hint="paint the area to change white on black (or make it transparent)"
            + (", or drop --invert-mask" if invert else ", or add --invert-mask if you painted what to keep"),
        )
    if m.all():
        raise InputError(
            f"{name} marks the whole image: nothing would be kept",
            hint="leave some of the mask black (or opaque); for a whole new image use `unclip generate` or `unclip vary`"
            + (", or drop --invert-mask" if invert else ""),
        )
    return mask, fraction, notes


def read_png_text(path: str | Path) -> dict[str, str]:
    """All text chunks of a PNG (empty for other formats)."""
    im = _open(Path(path), "image")
    text = getattr(im, "text", None)
    return dict(text) if text else {}


def read_recipe(path: str | Path) -> dict:
    """The unclip recipe stored in a PNG, or an InputError saying it has none."""
    path = Path(path)
    text = read_png_text(path)
    raw = text.get(RECIPE_KEY)
    sheet = read_sheet(text) if raw is None else None
    if sheet is not None:
        kind = "strip" if sheet["op"] == "blend" else "grid"
        raise InputError(f"{path} is a {kind} of {sheet['images']} images written by unclip, not one image: it holds no recipe",
                         hint="each image's own PNG carries its recipe: pass one of them with --from")
    if raw is None:
        raise InputError(
            f"{path} holds no unclip recipe",
            hint="only PNGs written by unclip without --no-metadata carry one; see `unclip info FILE`",
        )
    if len(raw) > MAX_RECIPE_CHARS:  # ours are under 2 kB; a huge one is not ours, and must not cost minutes
        raise InputError(f"{path} has an unclip recipe of {len(raw):,} characters; recipes are at most {MAX_RECIPE_CHARS:,}")
    try:
        recipe = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        raise InputError(f"{path} has a damaged unclip recipe (not valid JSON)") from None
    if not isinstance(recipe, dict) or "op" not in recipe:
        raise InputError(f"{path} has a damaged unclip recipe (no 'op' field)")
    return recipe


# ----------------------------------------------------------------------------------------------------
# Names


def _word(ch: str) -> str:
    """One character of a slug: ASCII letters and digits as is, accented Latin without the accent,
    other letters and digits (Chinese, Cyrillic, ...) kept, symbols such as emoji by their Unicode name."""
    if ch.isascii():
        return ch.lower() if ch.isalnum() else " "
    base = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
    if base.isascii() and base.isalnum():
        return base.lower()
    if ch.isalnum():
        return ch.lower()
    if unicodedata.category(ch) == "So":  # emoji and other pictographs: 🐱 -> cat face
        return f" {unicodedata.name(ch, '').lower()} "
    return " "


def slugify(text: str, max_len: int = 40, fallback: str = "image") -> str:
    """A short, safe file-name stem: lower-case words joined by '-', at most `max_len` characters."""
    text = unicodedata.normalize("NFKC", text)
    words = "".join(_word(c) for c in text).split()
    slug = ""
    for w in words:
        cand = f"{slug}-{w}" if slug else w
        if len(cand) > max_len:
            if not slug:  # one very long word: cut it
                slug = w[:max_len]
            break
        slug = cand
    return slug or fallback


# ----------------------------------------------------------------------------------------------------
# Writing


def parameters_text(recipe: dict) -> str:
    """The recipe in the `parameters` form other image tools read: the prompt, then one line of fields."""
    steps = recipe.get("steps") or {}
    sampler = recipe.get("sampler")
    fields = [
        ("Steps", steps.get("decoder")),
        ("Sampler", sampler.get("decoder") if isinstance(sampler, dict) else sampler),
        ("CFG scale", recipe.get("guidance")),
        ("Seed", recipe.get("seed")),
        ("Size", "{0}x{1}".format(*recipe["size"]) if isinstance(recipe.get("size"), (list, tuple)) else recipe.get("size")),
        ("Model hash", recipe.get("model_hash")),
        ("Model", recipe.get("model")),
        ("Prior steps", steps.get("prior")),
        ("Prior CFG scale", recipe.get("prior_guidance")),
        ("Upsampler steps", steps.get("upsampler")),
        ("Operation", recipe.get("op")),
        ("Version", f"unclip {recipe['version']}" if recipe.get("version") else None),
    ]
    line = ", ".join(f"{k}: {v}" for k, v in fields if v is not None and v != "")
    prompt = recipe.get("prompt") or ""
    if recipe.get("op") == "nudge":  # the closest thing to a prompt
        prompt = recipe.get("to") or prompt
    return f"{prompt}\n{line}"


def _png_info(recipe: dict | None, sheet: dict | None = None) -> PngImagePlugin.PngInfo | None:
    if recipe is None and sheet is None:
        return None
    info = PngImagePlugin.PngInfo()
    if recipe is not None:
        info.add_text(RECIPE_KEY, json.dumps(recipe, ensure_ascii=False, sort_keys=True))
        info.add_text(PARAMETERS_KEY, parameters_text(recipe))  # becomes iTXt (UTF-8) when not Latin-1
    if sheet is not None:
        info.add_text(SHEET_KEY, json.dumps(sheet, ensure_ascii=False, sort_keys=True))
    return info


def read_sheet(text: dict[str, str]) -> dict | None:
    """What a grid or strip written by unclip says it shows ({"op", "seed", "images"}), from its PNG text
    chunks; None for any other file. The text is untrusted: anything but that shape counts as none."""
    raw = text.get(SHEET_KEY)
    if raw is None or len(raw) > MAX_RECIPE_CHARS:
        return None
    try:
        sheet = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        return None
    ok = isinstance(sheet, dict) and isinstance(sheet.get("op"), str) and all(
        isinstance(sheet.get(k), int) and not isinstance(sheet.get(k), bool) and sheet[k] >= 0 for k in ("seed", "images"))
    return sheet if ok else None


# zlib's level for every PNG written: 1, not the usual 6. Measured on this 2-core machine (issue 25): a `generate -n 4`
# at 256 px (four images and their grid, encoded one after another) takes 0.069 s instead of 0.171 s, for 1,056 kB
# instead of 946 kB (+12%); an edit of a 20 MP photo in 4 s instead of 21 s (29 MB instead of 26 MB).
PNG_LEVEL = 1


def png_bytes(image: Image.Image, recipe: dict | None = None) -> bytes:
    """A PNG in memory carrying the recipe as every output file does (`unclip info` reads it, `--from` reruns it)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=_png_info(recipe), compress_level=PNG_LEVEL)
    return buf.getvalue()


def grid(images: Sequence[Image.Image], cols: int | None = None, gap: int = 2) -> Image.Image:
    """A contact sheet: the images in rows of `cols` (default: about square), white gaps between."""
    if not images:
        raise ValueError("grid of no images")
    n = len(images)
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    sheet = Image.new("RGB", (cols * w + (cols - 1) * gap, rows * h + (rows - 1) * gap), WHITE)
    for k, im in enumerate(images):
        r, c = divmod(k, cols)
        sheet.paste(im.convert("RGB"), (c * (w + gap), r * (h + gap)))
    return sheet


def strip(images: Sequence[Image.Image], gap: int = 0) -> Image.Image:
    """The images side by side, left to right."""
    return grid(images, cols=len(images), gap=gap)


def _loop_frames(frames: Sequence[Image.Image]) -> list[Image.Image]:
    """A -> B -> A, so the animation loops without a jump."""
    frames = [f.convert("RGB") for f in frames]
    return frames + frames[-2:0:-1] if len(frames) > 2 else frames


def save_gif(frames: Sequence[Image.Image], fp, fps: float = 6.0) -> None:
    seq = _loop_frames(frames)
    seq[0].save(fp, format="GIF", save_all=True, append_images=seq[1:], duration=round(1000 / fps), loop=0)


def save_webp(frames: Sequence[Image.Image], fp, fps: float = 6.0) -> None:
    seq = _loop_frames(frames)
    seq[0].save(
        fp, format="WEBP", save_all=True, append_images=seq[1:], duration=round(1000 / fps), loop=0, lossless=True
    )


def webp_supported() -> bool:
    from PIL import features

    return bool(features.check("webp"))


def check_out_dir(out: str | Path) -> Path:
    """Make sure `out` is (or can become) a writable folder, before any work is done.

    Missing folders are created, a file is written in the innermost and everything is removed again,
    so whatever the filesystem refuses (a name too long, a read-only disk, a file in the way) is found
    now and not after minutes of sampling. Leaves nothing behind."""
    out = Path(out)
    made: list[Path] = []
    try:
        made = _make_dirs(out)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".unclip-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"cannot write to --out {out} ({_reason(e)})", hint=_out_hint(e)) from None
    finally:
        _remove_dirs(made)
    return out


def _make_dirs(out: Path) -> list[Path]:
    """Create folder `out` and its missing parents; returns those created, outermost first. Raises
    InputError when something that is not a folder is in the way, OSError when the filesystem refuses."""
    missing, d = [], out
    while not os.path.lexists(d):  # also False for a name too long: mkdir says why below
        missing.append(d)
        d = d.parent
    if not d.is_dir():
        where = f"--out {out}" if d == out else f"cannot create --out {out}: {d}"
        what = f"a link to {os.readlink(d)}, which does not exist" if d.is_symlink() and not d.exists() else "a file, not a folder"
        raise InputError(f"{where} is {what}", hint="pass another folder with --out DIR")
    made: list[Path] = []
    try:
        for m in reversed(missing):
            os.mkdir(m)
            made.append(m)
    except BaseException:
        _remove_dirs(made)
        raise
    return made


def _remove_dirs(dirs: list[Path]) -> None:
    """Remove folders made by `_make_dirs`, innermost first, stopping at one that is not empty."""
    for d in reversed(dirs):
        try:
            os.rmdir(d)
        except FileNotFoundError:
            continue
        except OSError:
            break


def _reason(e: OSError) -> str:
    """An OSError in words: "no space left on device"."""
    text = e.strerror or str(e)
    return text[:1].lower() + text[1:]


def _out_hint(e: OSError) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some space, or pass a folder on another disk with --out DIR"
    if e.errno == errno.ENAMETOOLONG:
        return "pass a shorter folder name with --out DIR"
    return "pass a writable folder with --out DIR"


def _interrupt(signum, frame):
    """The SIGTERM handler while an OutputSet is open: stop as Ctrl-C does, so that its cleanup runs."""
    raise KeyboardInterrupt


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT and SIGTERM until the block has run, then deliver the first (main thread only): a block that
    creates and records files, or undoes them, must not be cut halfway (an interrupt would leave files behind)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if caught:
            signal.raise_signal(caught[0])


class OutputSet:
    """The files of one run, written all-or-nothing, named together.

    Each `add_*` writes to a hidden temporary file in the output folder; leaving the `with` block
    normally moves them all to their final names, never replacing an existing file unless `force`.
    On any exception (Ctrl-C included) the temporary files, anything already moved and any folder
    created for the run are removed, so a failed run leaves nothing behind. While the set is open,
    SIGTERM (`kill`, a closing terminal) acts as Ctrl-C does, so that this cleanup runs; a write the
    filesystem refuses (a full disk) is an InputError naming the folder. Files are encoded and written on worker
    threads (PNG's zlib releases the GIL: a grid and its images compress side by side), all finished before
    anything is moved into place or cleaned up.

    Names: each file has its own name (`stem-<i>.png` for the i-th image of a stem, else `stem.ext`). A run
    whose names are taken is a repeated run, and every file of it gets the same suffix after its own name:
    `-run2`, else `-run3`, ... (the first free for all of them), so `cat-face-42-0-run2.png` is image 0 of
    seed 42, made a second time, and its grid `cat-face-42-grid-run2.png`. A `rerun` (what `--from` replays)
    is always suffixed: `-rerun`, then `-rerun2`, ... A number added to the name itself would read as another
    image (`cat-face-42-4.png` as seed 46).

        with OutputSet("outputs") as outs:
            outs.add_png(image, "a-red-apple-42", index=True, recipe=recipe)
        print(outs.paths)
    """

    def __init__(self, out_dir: str | Path, force: bool = False, metadata: bool = True, rerun: bool = False):
        self.out_dir = Path(out_dir)
        self.force = force
        self.metadata = metadata
        self.rerun = rerun
        self.paths: list[Path] = []  # final paths, in the order added, once committed
        self._staged: list[tuple[Path, Path]] = []  # (temporary file, the file's own name: before the run's suffix)
        self._reserved: set[Path] = set()
        self._next_index: dict[str, int] = {}
        self._made_dirs: list[Path] = []
        umask = os.umask(0)
        os.umask(umask)
        self._mode = 0o666 & ~umask
        self._pool: ThreadPoolExecutor | None = None
        self._writes: list[Future] = []

    # -- naming
    def _name(self, stem: str, ext: str, index: bool) -> Path:
        """The file's own name in this run: `stem-<i>.ext` for the i-th of a stem (index=True), else `stem.ext`
        (`stem-2.ext`... only if the run itself adds one stem twice)."""
        if index:
            i = self._next_index.get(stem, 0)
            self._next_index[stem] = i + 1
            p = self.out_dir / f"{stem}-{i}{ext}"
        else:
            p, k = self.out_dir / f"{stem}{ext}", 2
            while p in self._reserved:
                p, k = self.out_dir / f"{stem}-{k}{ext}", k + 1
        self._reserved.add(p)
        return p

    def suffix(self, k: int) -> str:
        """The k-th suffix of a run (k = 1, 2, ...): "", "-run2", "-run3"...; for a rerun "-rerun", "-rerun2"..."""
        if self.rerun:
            return "-rerun" + (str(k) if k > 1 else "")
        return f"-run{k}" if k > 1 else ""

    @staticmethod
    def _suffixed(own: Path, suffix: str) -> Path:
        return own.with_name(f"{own.stem}{suffix}{own.suffix}")

    def _run_number(self) -> int:
        """The first k whose suffix leaves every file of the run a free name (with force: 1, replacing)."""
        k = 1
        while not self.force and any(os.path.lexists(self._suffixed(own, self.suffix(k))) for _, own in self._staged):
            k += 1
        return k

    # -- staging
    def _ensure_dir(self) -> None:
        try:
            self._made_dirs += _make_dirs(self.out_dir)
        except OSError as e:
            raise InputError(f"cannot create --out {self.out_dir} ({_reason(e)})", hint=_out_hint(e)) from None

    def _stage(self, stem: str, ext: str, index: bool, write: Callable) -> Path:
        # Ctrl-C or SIGTERM can interrupt the main thread anywhere: a folder or a temporary file must be on record
        # (for abort to remove) the moment it exists, so an interrupt waits until both are.
        with signals_deferred():
            self._ensure_dir()
            final = self._name(stem, ext, index)  # the file's own name; the run's suffix is chosen on commit
            try:
                fd, tmp = tempfile.mkstemp(dir=self.out_dir, prefix=f".{final.name}.", suffix=".part")
            except OSError as e:
                raise InputError(f"cannot write {final.name} in {self.out_dir}: {_reason(e)}", hint=_out_hint(e)) from None
            self._staged.append((Path(tmp), final))
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="unclip-write")
        self._writes.append(self._pool.submit(self._write, fd, tmp, final, write))
        return final

    def _write(self, fd: int, tmp: str, final: Path, write: Callable) -> None:
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, self._mode)  # mkstemp makes 0600 files; outputs get the usual permissions
        except OSError as e:  # a full disk, a quota, a folder removed meanwhile
            raise InputError(f"cannot write {final.name} in {self.out_dir}: {_reason(e)}", hint=_out_hint(e)) from None

    def _finish_writes(self, raise_errors: bool = True) -> None:
        """Wait for every write; the first failure is raised (after all have ended) unless cleaning up."""
        errors = [f.exception() for f in self._writes]  # waits for each (an interrupt here: abort waits again)
        self._writes = []
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        first = next((e for e in errors if e is not None), None)
        if first is not None and raise_errors:
            raise first

    def add_png(self, image: Image.Image, stem: str, index: bool = False, recipe: dict | None = None,
                sheet: dict | None = None) -> Path:
        """An image (its recipe stored), or with `sheet` a grid or strip of a run's images (what it shows stored)."""
        info = _png_info(recipe, sheet) if self.metadata else None
        return self._stage(stem, ".png", index, lambda f: image.save(f, format="PNG", pnginfo=info, compress_level=PNG_LEVEL))

    def add_gif(self, frames: Sequence[Image.Image], stem: str, fps: float = 6.0) -> Path:
        return self._stage(stem, ".gif", False, lambda f: save_gif(frames, f, fps))

    def add_webp(self, frames: Sequence[Image.Image], stem: str, fps: float = 6.0) -> Path:
        return self._stage(stem, ".webp", False, lambda f: save_webp(frames, f, fps))

    # -- commit / abort
    def _place(self, tmp: Path, own: Path, k: int) -> Path:
        """Move `tmp` to `own` with the run's k-th suffix, atomically; without force, never replace a file: one that
        appeared meanwhile (another process) moves this file alone to the next free suffix."""
        while True:
            final = self._suffixed(own, self.suffix(k))
            if self.force:
                os.replace(tmp, final)
                return final
            try:
                os.link(tmp, final)  # fails if `final` exists: an atomic no-clobber rename
                os.unlink(tmp)
                return final
            except FileExistsError:
                k += 1
            except OSError:  # a filesystem without hard links
                if os.path.lexists(final):
                    k += 1
                    continue
                os.replace(tmp, final)
                return final

    def commit(self) -> list[Path]:
        self._finish_writes()
        done: list[Path] = []
        k = self._run_number()
        try:
            with signals_deferred():  # a file linked into place but not yet on record would outlive the undo below
                for tmp, own in self._staged:
                    done.append(self._place(tmp, own, k))
        except BaseException as e:
            for p in done:
                _unlink(p)
            if isinstance(e, OSError):
                raise InputError(f"cannot write {own.name} in {self.out_dir}: {_reason(e)}", hint=_out_hint(e)) from None
            raise
        self._staged = []
        self.paths = done
        return done

    def abort(self) -> None:
        with signals_deferred():  # a second Ctrl-C (or a write's SIGTERM) while the writers finish
            self._finish_writes(raise_errors=False)
            for tmp, _ in self._staged:
                _unlink(tmp)
            self._staged = []
            _remove_dirs(self._made_dirs)
            self._made_dirs = []

    def __enter__(self) -> "OutputSet":
        # SIGTERM would end the process on the spot, leaving hidden .part files and new folders behind.
        # Signal handlers can only be set from the main thread, and one set by the program is kept.
        self._old_sigterm = None
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            self._old_sigterm = signal.signal(signal.SIGTERM, _interrupt)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                self.abort()
                return
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        finally:
            if self._old_sigterm is not None:
                signal.signal(signal.SIGTERM, self._old_sigterm)


def _unlink(p: Path) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass
