"""The OpenAI Images API mapped onto unclip's requests, and unclip's results back onto OpenAI's responses.

No web framework here: the app (`serve.app`) hands this module the fields of a request body (JSON values,
or the strings and files of a multipart form) and gets back an unclip request plus how to deliver its
images. Every rule about a run (prompts, seeds, steps, images, masks) is checked by the request itself
(`unclip_cli.requests`), with messages that name the API's field; this module adds only what is the
server's own policy or the API's vocabulary:

| API field | unclip |
| --- | --- |
| `model`, `style`, `user`, `moderation`, unknown fields | accepted and ignored (clients hard-code model names) |
| `n` | 1–10 (the API's limit; the CLI allows more); blends take `frames`, 2–10 |
| `quality` | `low` → fast; `standard`, `medium`, `auto` → default; `high`, `hd`, `xhigh`, `max` → best (our names work too) |
| `size` | `auto` or the native size (e.g. 128x128); a larger square (256, 512, 1024) is made natively and upscaled (Lanczos) |
| `response_format` | `url` (default, kept an hour) or `b64_json` |
| `output_format`, `output_compression` | png (default, with the recipe), webp or jpeg (0–100, the encoder's quality) |
| `background` | `auto` and `opaque` only; `transparent` is refused |
| `stream: true`, `markup` | refused on every endpoint: unclip answers once every image is ready |
| `seed` (extension) | the first image's seed, as `--seed` |
| `strength` (variations, extension) | as `unclip vary --strength` |
| `noise_level` (variations and mix, extension) | as `unclip vary --noise-level` (Stable unCLIP sets: 0-999) |
| `prompt` (variations, extension) | as `unclip vary --prompt`: a caption for the decoder as well as the image |
| `feather` (edits, extension) | as `unclip edit --feather` (pixels; default 8 per 256 px of the image's long side) |

A request returns at most `max_output_pixels` (n × the pixels of each image; 4096² by default): an edit keeps
its upload's size, so ten edits of a large image are refused with a 400 naming `n` rather than filling memory.

Edits: `mask` marks in transparent pixels what to repaint (as OpenAI); a mask without transparency
marks it in white (as the CLI). Without a mask, the image's own transparent pixels are repainted. The
mask must have the image's size. Multipart values arrive as text and are converted here; file names and
content types are ignored (formats are detected from the bytes).
"""

from __future__ import annotations

import base64
import io
import re
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from PIL import ExifTags, Image, UnidentifiedImageError

from unclip_cli import imageio
from unclip_cli.errors import InputError
from unclip_cli.requests import (BlendRequest, ComposeRequest, EditRequest, GenerateRequest, MixRequest, NudgeRequest, Request, Upload,
                                 VaryRequest, check_choice, check_whole, shown)

MAX_API_N = 10  # OpenAI's limit per request; a server policy, below the requests' own MAX_N
UPSCALE_SIDES = (256, 512, 1024)  # the square sizes OpenAI clients ask for; made natively, then upscaled
API_QUALITY = {"low": "fast", "standard": "default", "medium": "default", "auto": "default", "high": "best", "hd": "best",
           "xhigh": "best", "max": "best", "fast": "fast", "default": "default", "best": "best"}
RESPONSE_FORMATS = ("url", "b64_json")
OUTPUT_FORMATS = {"png": ("PNG", "image/png"), "webp": ("WEBP", "image/webp"), "jpeg": ("JPEG", "image/jpeg")}
BACKGROUNDS = ("auto", "opaque")
NATIVE_SIZE_HEADER = "x-unclip-native-size"

# The API's names for the request fields that differ from ours.
API_FIELD = {"from_": "from", "image_a": "image", "image_b": "image", "prompts": "prompt", "background": "background_prompt"}


class ApiError(Exception):
    """An answer other than images, in OpenAI's error shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers or {})
        if status >= 500 and status != 503:
            # A failed or abandoned job costs as much again if repeated: tell clients not to retry it.
            self.headers.setdefault("x-should-retry", "false")

    @property
    def type(self) -> str:
        return "server_error" if self.status >= 500 else "invalid_request_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def input_error(e: InputError, fields: list[str]) -> ApiError:
    """A request's InputError as a 400, `param` being the field its message names first. Hints that
    speak of command-line options are left out."""
    cli_hint = not e.hint or "--" in e.hint or "unclip " in e.hint
    message = str(e) + ("" if cli_hint else f" ({e.hint})")
    param = next((f for f in fields if re.match(rf"{re.escape(f)}\b", str(e))), None)
    return ApiError(400, message, param=param, code="invalid_value" if param else None)


# -- the fields of a request body --------------------------------------------------------------------
class Fields:
    """The values of a JSON body or a multipart form. In a form every value is text: numbers and flags
    are converted here when they read as one, and otherwise left as text, so that the request's
    validation names the field and the value (`n must be a whole number …, not 'two'`)."""

    def __init__(self, values: dict[str, Any], files: dict[str, list[bytes]] | None = None, form: bool = False):
        self.values, self.files, self.form = values, files or {}, form

    def has(self, name: str) -> bool:
        return self.values.get(name) is not None or name in self.files

    def text(self, name: str) -> Any:
        return self.values.get(name)

    def whole(self, name: str) -> Any:
        v = self.values.get(name)
        if self.form and isinstance(v, str) and re.fullmatch(r"\s*[+-]?\d{1,30}\s*", v):
            return int(v)
        return v

    def number(self, name: str) -> Any:
        v = self.values.get(name)
        if self.form and isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                return v
        return v

    def flag(self, name: str) -> Any:
        v = self.values.get(name)
        if self.form and isinstance(v, str) and v.strip().lower() in ("true", "false"):
            return v.strip().lower() == "true"
        return v

    def image_parts(self, *names: str) -> list[bytes]:
        """The uploaded files under any of `names`, in order (`image` and `image[]` are one field). A text
        value where a file belongs is refused."""
        parts: list[bytes] = []
        for name in names:
            if name in self.values and self.values[name] is not None:
                raise ApiError(400, f"{name} must be an uploaded file (multipart/form-data), not text", param=name.removesuffix("[]"),
                               code="invalid_value")
            parts += self.files.get(name, [])
        return parts


def label(name: str) -> str:
    """How a request field is named in messages: the API's name for it."""
    return API_FIELD.get(name, name)


# -- output ------------------------------------------------------------------------------------------
@dataclass
class Output:
    """How to deliver a result's images."""

    response_format: str = "url"
    size: tuple[int, int] | None = None  # None: as made (the native size; an edit's input size)
    format: str = "png"
    compression: int = 100


def parse_size(value: Any, native: int, extra: tuple[tuple[int, int], ...] = ()) -> tuple[int, int] | None:
    """`size` as (w, h), None for auto/absent. Accepted: the native square, larger squares of
    UPSCALE_SIDES, and `extra` sizes (an edit's input size)."""
    if value is None or value == "auto":
        return None
    accepted = list(dict.fromkeys([(native, native), *((s, s) for s in UPSCALE_SIDES if s > native), *extra]))
    names = [f"{w}x{h}" for w, h in accepted]
    m = re.fullmatch(r"(\d{1,6})x(\d{1,6})", value) if isinstance(value, str) else None
    wanted = (int(m.group(1)), int(m.group(2))) if m else None
    if wanted not in accepted:
        shape = "" if wanted is None or wanted[0] == wanted[1] else " (non-square sizes are not made)"
        raise ApiError(400, f"size must be one of auto, {', '.join(names)}, not {shown(value)}{shape}; this model draws "
                            f"{native}x{native} images, and larger squares are upscaled from them", param="size", code="invalid_value")
    return wanted


def parse_output(f: Fields, native: int, *, sizes: bool = True) -> Output:
    fmt = f.text("output_format") or "png"
    out = Output(response_format=_choice("response_format", f.text("response_format") or "url", RESPONSE_FORMATS),
                 format=_choice("output_format", fmt, tuple(OUTPUT_FORMATS)))
    if f.has("output_compression"):
        out.compression = _check(check_whole, "output_compression", f.whole("output_compression"), 0, 100)
    if sizes:
        out.size = parse_size(f.text("size"), native)
    return out


def refuse_unsupported(f: Fields) -> None:
    """The API's features that unclip does not have: a clear 400 rather than a silent difference."""
    if f.flag("stream") is True:
        raise ApiError(400, "stream is not supported: unclip answers once all images are ready; leave stream out or set it "
                            "to false", param="stream", code="unsupported_value")
    if f.has("stream") and not isinstance(f.flag("stream"), bool):
        raise ApiError(400, f"stream must be true or false, not {shown(f.text('stream'))}", param="stream", code="invalid_value")
    background = f.text("background")
    if background == "transparent":
        raise ApiError(400, "background 'transparent' is not supported: unclip draws opaque images; use auto or opaque",
                       param="background", code="unsupported_value")
    if background is not None:
        _choice("background", background, BACKGROUNDS)
    if f.has("markup"):
        raise ApiError(400, "markup is not supported by unclip; send the image and a mask instead", param="markup",
                       code="unsupported_value")


def _check(fn: Callable, name: str, *args):
    try:
        return fn(name, *args)
    except InputError as e:
        raise input_error(e, [name]) from None


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    return _check(check_choice, name, value, choices)


# -- requests ----------------------------------------------------------------------------------------
@dataclass
class Planned:
    """An unclip request built from an API request, with what must be checked once its images are
    decoded (off the event loop: `prepare`) and how to deliver the result."""

    request: Request
    output: Output
    fields: list[str]  # the API fields a validation message may name
    edit_size: Any = None  # an edit's `size` value, checked against the decoded input's size
    edit_mask_given: bool = True
    native: int = 0

    def prepare(self, max_output_pixels: int | None = None) -> Request:
        """Validate the request and decode its inputs. Problems are ApiErrors."""
        try:
            req = self.request.validated(label=label)
            if isinstance(req, EditRequest):  # its output has the upload's size: bounded before decoding it
                self._check_output(req, upright_size(req.image), max_output_pixels)
            inputs = req.inputs()
        except InputError as e:
            raise input_error(e, self.fields) from None
        if isinstance(req, EditRequest):
            self._check_edit(req, inputs.images[0].size)
        self._check_output(req, self.output.size or (inputs.images[0].size if isinstance(req, EditRequest) else (self.native,) * 2),
                           max_output_pixels)
        return req

    def _check_output(self, req: Request, size: tuple[int, int] | None, limit: int | None) -> None:
        """Refuse a request whose images would hold more than `limit` pixels in all."""
        if limit is None or size is None or req.count * size[0] * size[1] <= limit:
            return
        name = "frames" if isinstance(req, BlendRequest) else "n"
        raise ApiError(400, f"{name} {req.count} x {size[0]}x{size[1]} images would be {req.count * size[0] * size[1]:,} pixels, more "
                            f"than the {limit:,} this server returns for one request: ask for fewer images or smaller ones",
                       param=name, code="output_too_large")

    def _check_edit(self, req: EditRequest, size: tuple[int, int]) -> None:
        if self.edit_mask_given:
            mask_size = upright_size(req.mask)
            if mask_size is not None and mask_size != size:
                raise ApiError(400, f"mask is {mask_size[0]}x{mask_size[1]} but image is {size[0]}x{size[1]}: the mask must "
                                    "have the image's size", param="mask", code="invalid_value")
        wanted = parse_size(self.edit_size, self.native, extra=(size,))
        if wanted is not None and wanted != size and size[0] != size[1]:
            raise ApiError(400, f"size must be auto or {size[0]}x{size[1]} for this {size[0]}x{size[1]} image: edits keep "
                                "the image's shape", param="size", code="invalid_value")
        self.output.size = wanted


def _sampling(f: Fields, steps: dict) -> dict:
    """The fields every operation shares: n (the API's limit), seed, quality; `steps` are the server's
    own step counts (they override the quality preset, as --prior-steps and friends do)."""
    out: dict[str, Any] = dict(steps)
    if f.has("n"):
        out["n"] = _check(check_whole, "n", f.whole("n"), 1, MAX_API_N)
    if f.has("seed"):
        out["seed"] = f.whole("seed")
    quality = f.text("quality")
    if quality is not None:
        out["quality"] = API_QUALITY[_choice("quality", quality, tuple(API_QUALITY))]
    return out


def _one_image(f: Fields, what: str = "image") -> bytes:
    parts = f.image_parts("image", "image[]")
    if not parts:
        raise ApiError(400, f"{what} is missing: upload one image file as 'image'", param="image", code="missing_field")
    if len(parts) > 1:
        raise ApiError(400, f"unclip takes exactly one image here, not {len(parts)}", param="image", code="invalid_value")
    return parts[0]


def plan_generate(f: Fields, native: int, steps: dict) -> Planned:
    refuse_unsupported(f)
    req = GenerateRequest(prompt=f.text("prompt"), **_sampling(f, steps))
    return Planned(req, parse_output(f, native), ["prompt", "n", "seed", "quality"], native=native)


def plan_edit(f: Fields, native: int, steps: dict) -> Planned:
    refuse_unsupported(f)
    image = _one_image(f)
    masks = f.image_parts("mask")
    if len(masks) > 1:
        raise ApiError(400, "send at most one mask", param="mask", code="invalid_value")
    if masks:
        mask = masks[0]
    elif has_transparency(image):
        mask = image  # the image's own transparent pixels mark what to repaint, as OpenAI's edits do
    else:
        raise ApiError(400, "mask is missing: send a mask (transparent or white = repaint), or an image whose transparent "
                            "pixels mark what to repaint", param="mask", code="missing_field")
    extra = {"feather": f.whole("feather")} if f.has("feather") else {}  # an extension: as `unclip edit --feather`
    req = EditRequest(image=image, mask=mask, prompt=f.text("prompt"), **extra, **_sampling(f, steps))
    return Planned(req, parse_output(f, native, sizes=False), ["prompt", "n", "seed", "quality", "feather", "mask", "image"],
                   edit_size=f.text("size"), edit_mask_given=bool(masks), native=native)


def plan_vary(f: Fields, native: int, steps: dict) -> Planned:
    refuse_unsupported(f)
    image = _one_image(f)
    extra = {"strength": f.number("strength")} if f.has("strength") else {}
    if f.has("noise_level"):
        extra["noise_level"] = f.whole("noise_level")
    if f.has("prompt"):
        extra["prompt"] = f.text("prompt")
    req = VaryRequest(image=image, **extra, **_sampling(f, steps))
    return Planned(req, parse_output(f, native), ["strength", "noise_level", "prompt", "n", "seed", "quality", "image"], native=native)


def plan_blend(f: Fields, native: int, steps: dict) -> Planned:
    refuse_unsupported(f)
    parts = f.image_parts("image", "image[]") or f.image_parts("image_a") + f.image_parts("image_b")
    if len(parts) != 2:
        raise ApiError(400, f"blend takes two images (image[] twice, or image_a and image_b), not {len(parts)}", param="image",
                       code="invalid_value")
    sampling = _sampling(f, steps)
    if "n" in sampling:
        raise ApiError(400, f"blend takes frames (2-{MAX_API_N}, both images included), not n", param="n", code="invalid_value")
    extra = {"frames": _check(check_whole, "frames", f.whole("frames"), 2, MAX_API_N)} if f.has("frames") else {}
    req = BlendRequest(image_a=parts[0], image_b=parts[1], **extra, **sampling)
    return Planned(req, parse_output(f, native), ["frames", "seed", "quality", "image"], native=native)


def plan_nudge(f: Fields, native: int, steps: dict) -> Planned:
    refuse_unsupported(f)
    image = _one_image(f)
    extra = {"amount": f.number("amount")} if f.has("amount") else {}
    if f.has("from"):
        extra["from_"] = f.text("from")
    req = NudgeRequest(image=image, to=f.text("to"), **extra, **_sampling(f, steps))
    return Planned(req, parse_output(f, native), ["to", "from", "amount", "n", "seed", "quality", "image"], native=native)


def plan_mix(f: Fields, native: int, steps: dict) -> Planned:
    """Multipart: image[] (0-8 files), prompt[] (repeated) or prompt, weights "0.5,0.3,0.2" (the images', then the
    texts'), as `unclip mix`."""
    refuse_unsupported(f)
    images = f.image_parts("image", "image[]")
    texts = [t for name in ("prompt", "prompt[]") for t in ([f.values[name]] if isinstance(f.values.get(name), str) else f.values.get(name) or [])]
    weights = f.text("weights")
    if weights is not None:
        try:
            weights = [float(w) for w in str(weights).split(",")]
        except ValueError:
            raise ApiError(400, f"weights must be numbers separated by commas, not {shown(weights)}", param="weights",
                           code="invalid_value") from None
    extra = {"noise_level": f.whole("noise_level")} if f.has("noise_level") else {}
    req = MixRequest(images=images, prompts=texts, weights=weights, **extra, **_sampling(f, steps))
    return Planned(req, parse_output(f, native), ["weights", "noise_level", "prompt", "n", "seed", "quality", "image"], native=native)


def plan_compose(f: Fields, native: int, steps: dict) -> Planned:
    """JSON: prompt (a sentence) and/or objects ([{"prompt", "box": [left, top, right, bottom]}] or [[phrase, box]]),
    background_prompt, method (fuse | paste), as `unclip compose`."""
    refuse_unsupported(f)
    objects = f.values.get("objects")
    if isinstance(objects, list):
        objects = [[o.get("prompt"), o.get("box")] if isinstance(o, dict) else o for o in objects]
    extra = {"method": f.text("method")} if f.has("method") else {}
    req = ComposeRequest(prompt=f.text("prompt"), objects=objects, background=f.text("background_prompt"), **extra, **_sampling(f, steps))
    return Planned(req, parse_output(f, native), ["prompt", "objects", "background_prompt", "method", "n", "seed", "quality"], native=native)


PLANS = {"generate": plan_generate, "edit": plan_edit, "vary": plan_vary, "blend": plan_blend, "nudge": plan_nudge, "mix": plan_mix,
         "compose": plan_compose}
JSON_OPS = ("generate", "compose")  # the others carry images: multipart forms


def prepare(op: str, f: Fields, native: int, steps: dict, max_pixels: int, max_output_pixels: int | None = None) -> Planned:
    """The validated request of an API call, its inputs decoded, and how to deliver its images. Blocking
    (it decodes images): run it in a thread. Every problem is an ApiError."""
    for name, parts in f.files.items():
        for data in parts:
            check_pixels(data, name.removesuffix("[]"), max_pixels)
    planned = PLANS[op](f, native, steps)
    planned.request = planned.prepare(max_output_pixels)
    return planned


# -- uploaded images: checks from the header, before decoding ------------------------------------------
def upload(data: bytes, filename: str | None) -> bytes:
    """An uploaded file's bytes, named (requests.Upload) as its client named it when that is a plain printable name of at
    most 100 characters (its folders dropped), so that a warning says "photo.jpg is far from ..."; else unnamed."""
    name = re.split(r"[\\/]", filename or "")[-1].strip()
    return Upload(data, name) if name and len(name) <= 100 and name.isprintable() else data


def _header(data: bytes) -> Image.Image | None:
    """The image's header (nothing decoded), or None when Pillow does not recognise it (the request's
    own decoding then says so)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        return None


def check_pixels(data: bytes, name: str, max_pixels: int) -> None:
    """Refuse an image whose header claims more than `max_pixels` (a decompression bomb: a few kB that
    decode to gigabytes) before anything is decoded."""
    try:
        im = _header(data)
    except Image.DecompressionBombError:
        im = None
        too_big = "far more than"
    else:
        too_big = None
    if im is not None and im.size[0] * im.size[1] > max_pixels:
        too_big = f"{im.size[0]}x{im.size[1]}, more than"
    if too_big:
        raise ApiError(400, f"{name} is {too_big} the {max_pixels:,} pixels this server decodes (a possible decompression "
                            "bomb); send a smaller image", param=name, code="image_too_large")


def upright_size(data: Any) -> tuple[int, int] | None:
    """An uploaded image's size as shown (its EXIF orientation applied), from its header."""
    if not isinstance(data, (bytes, bytearray)):
        return None
    im = _header(bytes(data))
    if im is None:
        return None
    w, h = im.size
    try:
        turned = im.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
    except Exception:  # a damaged EXIF block: the request's decoding ignores it too
        turned = False
    return (h, w) if turned else (w, h)


def has_transparency(data: bytes) -> bool:
    """Whether an uploaded image has pixels that are at least half transparent (decodes it)."""
    try:
        im = _header(data)
    except Image.DecompressionBombError:
        return False
    if im is None or not (im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info):
        return False
    try:
        return im.convert("RGBA").getchannel("A").getextrema()[0] < 128
    except (OSError, SyntaxError, ValueError, EOFError):
        return False


# -- results -----------------------------------------------------------------------------------------
@dataclass
class Encoded:
    data: bytes
    content_type: str
    extension: str
    recipe: dict


def encode(images: list[Image.Image], recipes: list[dict], output: Output) -> list[Encoded]:
    """Each image in the asked format and size (blocking: run it in a thread). An upscaled PNG says so
    in its recipe (`upscaled`), which replays the native image."""
    out = []
    for image, recipe in zip(images, recipes):
        if output.size is not None and image.size != output.size:
            recipe = {**recipe, "upscaled": {"size": list(output.size), "filter": "lanczos"}}
            image = image.resize(output.size, Image.Resampling.LANCZOS)
        pil_format, content_type = OUTPUT_FORMATS[output.format]
        if output.format == "png":
            data = imageio.png_bytes(image, recipe)
        else:
            buf = io.BytesIO()
            image.save(buf, format=pil_format, quality=output.compression)
            data = buf.getvalue()
        out.append(Encoded(data, content_type, output.format, recipe))
    return out


def images_response(encoded: list[Encoded], output: Output, url_of: Callable[[Encoded], str]) -> dict:
    """OpenAI's response: {"created": unix seconds, "data": [{"url"} or {"b64_json"}]}."""
    if output.response_format == "b64_json":
        data = [{"b64_json": base64.b64encode(e.data).decode("ascii")} for e in encoded]
    else:
        data = [{"url": url_of(e)} for e in encoded]
    return {"created": int(time.time()), "data": data}
