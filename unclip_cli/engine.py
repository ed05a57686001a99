"""The unCLIP pipeline: load a model set, then run requests (generate, vary, blend, edit, nudge).

The engine never prints and never exits: it returns images with the recipes that reproduce them,
raises `UnclipError`s for a front end to report, and reports progress through a callback. What a request
warns of is known from the request alone: the callback gets it (`progress.Warnings`) before any sampling. It is the
only code that knows how the stages call each other; the CLI, `unclip eval` and any server hand it
requests (`unclip_cli.requests`).

Stages, as in the paper (§2) and as visible blocks below:
  text -> CLIP text encoder -> z_t, token states -> prior -> z_i -> decoder -> base image -> upsampler(s)
Manipulations (§3) use the bipartite latent (z_i, x_T): z_i from the CLIP image encoder, x_T from DDIM
inversion of the decoder.

Each model set carries its sampling recipe (`diffusion.recipe.SamplingRecipe`: samplers, start timesteps,
guidance defaults, candidates, upsampling filter, inpainting method); the engine reads every such choice
from `self.sampling`, so our emoji set samples as it was tuned and a converted Karlo set as Karlo does.

Every image has its own seed and its own noise generator, so its noise never depends on its batch.
Batched kernels still round differently by batch size, so a recipe records its request and the index
of its image, and a replay recomputes the batch that image was made in (see `run_many`).

Threads: one `run` or `run_many` at a time per engine. Calls from several threads are serialised by a
lock (the networks are not re-entrant and one call already uses every core). A callback may raise to
stop a run between sampler steps; the exception propagates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import unclip_cli
from unclip_cli.device import pick_device, precision_reason, resolve_precision, set_allows_bf16
from unclip_cli.diffusion.gaussian import make_denoiser
from unclip_cli.diffusion.guidance import guided
from unclip_cli.diffusion.policy import DECODER_T_START, decoder_denoiser, noise_augment, noised_mean, toward_fresh, where_kept  # noqa: F401  (DECODER_T_START: the emoji start, re-exported)
from unclip_cli.diffusion.recipe import DEFAULT as DEFAULT_RECIPE
from unclip_cli.diffusion.samplers import SAMPLERS, ddim_invert, sample_ddim, sample_repaint, slerp
from unclip_cli.diffusion.schedule import spaced_timesteps
from unclip_cli.domain import FAR, concept_note, image_warning, load_concepts, load_domain, prompt_warning, unknown_words
from unclip_cli.errors import InputError, UnclipError
from unclip_cli.models.prior import pick_closest
from unclip_cli.modelset import ModelSet, load_model_set
from unclip_cli.progress import Callback, Tick, Warnings
from unclip_cli.requests import ComposeRequest, Request, Steps, source_name
from unclip_cli.diffusion.policy import fused_denoiser
from unclip_cli.layout import box_masks

# The emoji set's values; a set's own recipe may say otherwise (`self.sampling`).
PRIOR_CANDIDATES = DEFAULT_RECIPE.prior_candidates  # 2, §2.2: sample two z_i, keep the one closer to z_t
PRIOR_CLIP = DEFAULT_RECIPE.prior_clamp  # 10, clamp of the standardised x_start prediction
CPU_WARN_PARAMETERS = 1_000_000_000  # a set this large takes minutes per image on a CPU: say so
# compose: the global path's share inside the objects' boxes (fuse), and where paste's harmonising starts (of 1000)
COMPOSE_HARMONY = 0.25
COMPOSE_HARMONISE_T = 500


@dataclass
class Result:
    images: list[Image.Image]
    recipes: list[dict]
    warnings: list[str] = field(default_factory=list)
    z_i: list[torch.Tensor] = field(default_factory=list)  # generate, edit: the prior's image embedding per image (D,)


class Noise:
    """Per-image CPU generators: image i's noise depends only on its own seed, not on its batch."""

    def __init__(self, seeds: list[int], device: torch.device):
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.device = device

    def __call__(self, *shape: int) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in self.gens]).to(self.device)  # (B, *shape)


# -- images <-> tensors ------------------------------------------------------------------------------
def to_tensor(img: Image.Image, size: int | None = None) -> torch.Tensor:
    """PIL -> (3, H, W) float in [-1, 1], resized (antialiased) to size x size if given."""
    img = img.convert("RGB")
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None)
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())  # (H, W, 3)
    return arr.permute(2, 0, 1) / 127.5 - 1


def to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> PIL RGB."""
    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, "RGB")


def square(img: Image.Image) -> Image.Image:
    """Pad to a square on white (the training background), centred."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), "white" if img.mode == "RGB" else 0)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def feather_weights(repaint: np.ndarray, feather: int) -> np.ndarray:
    """(H, W) float weights of the generated image: 0 outside the mask, rising smoothly (smoothstep) over the
    `feather` pixels of the mask nearest its border, 1 deeper inside. The band lies inside the mask, so
    unmasked pixels stay exactly the input's. Distances alternate square and cross steps (an octagonal
    approximation of Euclidean distance); a mask too thin for the band gets a band of about half its depth,
    so its centre still shows the generated image. The image's edge is not a border."""
    inside_np = np.ascontiguousarray(repaint, dtype=bool)
    inside = torch.from_numpy(inside_np)
    if feather <= 0 or not inside_np.any() or inside_np.all():
        return inside_np.astype(np.float32)
    # Boolean shifts, not max-pooling: the default feather of a large photo takes ~190 steps over megapixels (20x faster)
    reached, missed = ~inside_np, np.zeros(inside_np.shape, np.int32)  # a pixel's distance: 1 + the steps that missed it
    for k in range(1, feather + 1):
        grown = reached.copy()
        if k % 2:  # square: left and right, then up and down of that
            grown[:, 1:] |= reached[:, :-1]
            grown[:, :-1] |= reached[:, 1:]
            row = grown.copy()
            grown[1:] |= row[:-1]
            grown[:-1] |= row[1:]
        else:  # cross: the four neighbours
            grown[1:] |= reached[:-1]
            grown[:-1] |= reached[1:]
            grown[:, 1:] |= reached[:, :-1]
            grown[:, :-1] |= reached[:, 1:]
        reached = grown
        missed += ~reached
        if reached.all():  # the later steps miss nothing
            break
    dist = torch.from_numpy((1 + missed).astype(np.float32))  # feather + 1 where no step reached
    depth = float(dist[inside].max())
    band = feather if depth > feather else max(1.0, (depth - 1) // 2)
    t = (dist / (band + 1)).clamp(max=1.0)
    w = t * t * (3 - 2 * t)
    return torch.where(inside, w, torch.zeros(())).numpy().astype(np.float32)


# How far into the mask an edit's colours are matched to the kept image, in pixels of the decoder's base image: the base
# decides each region's colour at its own coarse scale, so a mismatch at the border spans several base pixels.
HARMONY_BASE_PX = 4


def membrane(diff: torch.Tensor, fixed: torch.Tensor, iters: int = 40) -> torch.Tensor:
    """The smooth (harmonic) fill of `diff` (C, H, W) from the pixels where `fixed` (H, W bool): equal to `diff`
    there, elsewhere the solution of Laplace's equation that meets it (Jacobi iterations from coarse to fine, each
    level starting from the coarser one's answer; the image's edge is not a border)."""
    known = fixed.to(diff.dtype)[None, None]  # (1, 1, H, W)
    d = (diff * known[0])[None]  # (1, C, H, W)
    sizes = [tuple(fixed.shape)]
    while min(sizes[-1]) > 8:
        sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))
    c = None
    for size in reversed(sizes):
        k = F.adaptive_avg_pool2d(known, size)
        d_k = F.adaptive_avg_pool2d(d, size) / k.clamp(min=1e-6)  # the fixed pixels' mean in each coarse pixel
        free = k == 0
        x = d_k if c is None else torch.where(free, F.interpolate(c, size=size, mode="bilinear", align_corners=False), d_k)
        for _ in range(iters):
            p = F.pad(x, (1, 1, 1, 1), mode="replicate")
            x = torch.where(free, (p[..., :-2, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :-2] + p[..., 1:-1, 2:]) / 4, d_k)
        c = x
    return c[0]


def colour_match(gen: np.ndarray, orig: np.ndarray, repaint: np.ndarray, reach: int) -> np.ndarray:
    """What matches the generated pixels' (H, W, 3) colours to the kept image's along the mask border, to be added to
    them: gradient-domain blending (Perez et al. 2003, "Poisson image editing"). The result keeps the generated image's
    gradients inside the mask but not the step across its border: the correction is the membrane that takes each
    first pixel inside to its kept neighbours (the sampled image already equals the kept one outside, so the step
    is all the mismatch there is). It fades out over `reach` px inside the mask, so the middle of the edit keeps
    the colours the prompt asked for. Float32, (H, W, 3); zeros where there is nothing to match."""
    inside = torch.from_numpy(np.ascontiguousarray(repaint))
    if reach <= 0 or not inside.any() or inside.all():
        return np.zeros(gen.shape, np.float32)
    g_t = torch.from_numpy(gen.astype(np.float32)).permute(2, 0, 1)[:, None]  # (3, 1, H, W)
    m = inside.float()[None, None]
    cross = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])[None, None]
    n_in = F.conv2d(m, cross, padding=1)[0]  # (1, H, W) neighbours inside the mask
    g_in = F.conv2d(g_t * m, cross, padding=1)[:, 0] / n_in.clamp(min=1)  # (3, H, W) their mean generated colour
    ring = ~inside & (n_in[0] > 0)  # kept pixels on the border
    diff = torch.from_numpy(orig.astype(np.float32)).permute(2, 0, 1) - g_in
    fade = 1 - torch.from_numpy(feather_weights(repaint, reach))  # 1 at the border, 0 from `reach` px in
    return (membrane(diff, ring) * fade).permute(1, 2, 0).numpy()


def harmonise(gen: np.ndarray, orig: np.ndarray, repaint: np.ndarray, reach: int) -> np.ndarray:
    """The generated pixels (H, W, 3) with their colours matched to the kept image's along the border (`colour_match`). Float32."""
    return gen.astype(np.float32) + colour_match(gen, orig, repaint, reach)


# Outputs up to this side (or the result's) are colour-matched at their own pixels; larger ones at the result's: the
# exact solve's cost grows as the side cubed (its reach grows with the side), 10 minutes at 20 MP.
EXACT_PASTE_SIDE = 512


def paste_back(generated: Image.Image, original: Image.Image, repaint: np.ndarray, feather: int = 0,
               reach: int = 0) -> Image.Image:
    """Map a square result back onto the original canvas; take only masked pixels from it, blended with the
    original over a band `feather` px wide inside the mask (`feather_weights`), else wholesale. With `reach`, the
    result's colours are first matched to the original's along the border (`colour_match`).

    An output much larger than the result (a photo) costs little more than the result: the colour match is solved at
    the result's own pixels, where its detail is (the correction is smooth, so it is upsampled), and only the mask's
    bounding box is resampled and feathered at the output's size."""
    w, h = original.size
    side, S = max(w, h), generated.size[0]
    left, top = (side - w) // 2, (side - h) // 2
    orig = np.asarray(original)
    if not repaint.any():
        return original.copy()
    rows, cols = np.flatnonzero(repaint.any(1)), np.flatnonzero(repaint.any(0))
    # One kept pixel around the mask: feathering measures the way to the nearest one (the image's edge is no border).
    y0, y1, x0, x1 = max(0, rows[0] - 1), min(h, rows[-1] + 2), max(0, cols[0] - 1), min(w, cols[-1] + 2)
    if side <= max(S, EXACT_PASTE_SIDE):  # matched at every output pixel, as always (under a second at 512 px)
        full = np.asarray(generated.resize((side, side), Image.Resampling.LANCZOS))[top : top + h, left : left + w]
        gen = full[y0:y1, x0:x1]
        if reach > 0:
            gen = gen.astype(np.float32) + colour_match(full, orig, repaint, reach)[y0:y1, x0:x1]
    else:
        k = S / side  # result pixels per output pixel
        gen = np.asarray(generated.resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS,
                                          box=((left + x0) * k, (top + y0) * k, (left + x1) * k, (top + y1) * k)))
        if reach > 0:
            gen = gen.astype(np.float32) + _colour_match_upsampled(generated, original, repaint, reach, (y0, y1, x0, x1))
    box, kept = repaint[y0:y1, x0:x1, None], orig[y0:y1, x0:x1]
    if feather <= 0:
        part = np.where(box, gen, kept)
    else:
        weights = feather_weights(repaint[y0:y1, x0:x1], feather)[..., None]
        mixed = np.rint(weights * gen.astype(np.float32) + (1 - weights) * kept.astype(np.float32))
        part = np.where(box, mixed.clip(0, 255), kept)  # unmasked pixels: the input's, bit for bit
    out = orig.copy()
    out[y0:y1, x0:x1] = part.astype(np.uint8)
    return Image.fromarray(out, "RGB")


def _colour_match_upsampled(generated: Image.Image, original: Image.Image, repaint: np.ndarray, reach: int, bbox) -> np.ndarray:
    """`colour_match` for an output larger than the result, within `bbox` (y0, y1, x0, x1) at the output's size:
    solved in the output's frame scaled to the result's pixels (`reach` scaled alike), then upsampled (bilinear: the
    correction is a membrane, smooth but for its fade)."""
    w, h = original.size
    side, S = max(w, h), generated.size[0]
    left, top, f = (side - w) // 2, (side - h) // 2, S / side
    ws, hs = max(1, round(w * f)), max(1, round(h * f))
    gen = np.asarray(generated.resize((ws, hs), Image.Resampling.LANCZOS, box=(left * f, top * f, (left + w) * f, (top + h) * f)))
    orig = np.asarray(original.resize((ws, hs), Image.Resampling.BICUBIC, reducing_gap=3.0))
    small = np.asarray(Image.fromarray(repaint.astype(np.uint8) * 255, "L").resize((ws, hs), Image.Resampling.BOX)) >= 128
    corr = colour_match(gen, orig, small, max(1, round(reach * f)))  # (hs, ws, 3)
    y0, y1, x0, x1 = bbox
    at = (x0 * ws / w, y0 * hs / h, x1 * ws / w, y1 * hs / h)
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(corr[..., c]), "F").resize(
        (x1 - x0, y1 - y0), Image.Resampling.BILINEAR, box=at)) for c in range(3)], -1)


@dataclass
class _EditCanvas:
    """One edit request's inputs as the stages need them: the known image and mask at full and base size."""

    image: Image.Image  # the input, RGB, its own size
    repaint: np.ndarray  # (H, W) bool, True = repaint
    feather: int  # px inside the mask over which the result fades in (`feather_weights`), 0: pasted wholesale
    reach: int  # px inside the mask over which the result's colours are matched to the kept image's (`colour_match`), 0: none
    known_full: torch.Tensor  # (1, 3, S, S)
    keep_full: torch.Tensor  # (1, 1, S, S), 1 = known
    known: torch.Tensor  # (1, 3, s, s)
    keep: torch.Tensor  # (1, 1, s, s), 1 = known only where fully unmasked


class Engine:
    def __init__(self, models: ModelSet, device: torch.device, dtype: torch.dtype, precision: str = "auto"):
        self.models = models
        self.sampling = models.sampling
        self.device = device
        self.dtype = dtype
        self.precision = precision  # a request's precision when it names none (`device.PRECISIONS`)
        self.bf16_ok = set_allows_bf16(models.root)  # the set's precision.json: bf16 measured within fp32's noise
        self._bf16 = False  # the run in progress computes its denoising networks under bfloat16 autocast
        # Sampling arithmetic runs in float32 (whatever the networks' dtype), or float64 for float64 networks.
        self.work_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self._lock = threading.Lock()
        self._size: int | None = None  # the running request's output size, when it names one (`_sized`)
        self._empty: tuple | None = None
        self._decoder_empty_cache: tuple | None = None
        self.domain = load_domain(models.root)  # None: the set has no calibrated out-of-domain checks
        self.concepts = load_concepts(models.root)  # None: the set lists no concepts
        self._concept_emb: torch.Tensor | None = None

    @classmethod
    def load(cls, weights: str | Path, device: str = "auto", dtype: torch.dtype | None = None, offload: str = "auto",
             precision: str = "auto") -> "Engine":
        """Load a model set (its networks are read on first use). `dtype` overrides the default: fp32 on CPU
        (fp16 there is slow and lossy), half precision on accelerators. `offload` (auto, on, off): whether only
        the network in use stays loaded (`ModelSet.set_offload`); auto turns it on when the set does not fit.
        `precision` (auto, fp32, bf16): the default of requests that name none; it matters on the CPU only."""
        dev = pick_device(device)
        resolve_precision(precision, torch.device("cpu"), torch.float32, False)  # an unknown name fails before loading
        if dtype is None:
            dtype = torch.float16 if dev.type in ("cuda", "mps") else torch.float32
        models = load_model_set(weights, device=dev, dtype=dtype)
        models.set_offload(offload)
        return cls(models, dev, dtype, precision)

    # -- facts ---------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.models.name

    @property
    def image_size(self) -> int:
        """The output's side: the set's own, or the size of the request running (`_sized`)."""
        return self._size or self.models.image_size

    @property
    def base_size(self) -> int:
        return self._size // self.models.latent_factor if self._size else self.models.base_size

    def sizes(self) -> list[int]:
        """The output sizes the set decodes at: its own and, for a latent decoder (no upsampler), every smaller
        multiple of the UNet's coarsest level (in pixels) down to a quarter of its own side."""
        m, own = self.models, self.models.image_size
        if m.vae is None or m.upsamplers:
            return [own]
        step = m.latent_factor * 2 ** (len(m.decoder.config.channel_mult) - 1)
        return [s for s in range(step, own + 1, step) if 4 * s >= own]

    @contextlib.contextmanager
    def _sized(self, req: Request):
        """Decode at the request's size (checked against `sizes`) while it runs."""
        if req.size is not None and req.size not in self.sizes():
            sizes = self.sizes()
            raise InputError(f"{req.name('size')} {req.size} is not a size {self.name} decodes at"
                             + (f": it takes {sizes[0]} to {sizes[-1]} in steps of {sizes[1] - sizes[0]}" if len(sizes) > 1 else
                                f" (only its own {sizes[0]})"), hint=f"leave {req.name('size')} out for {self.models.image_size}")
        self._size = req.size
        try:
            yield
        finally:
            self._size = None

    def info(self) -> dict:
        m = self.models
        stages = {"clip": m.clip, "prior": m.prior, "decoder": m.decoder}
        for i, s in enumerate(m.upsamplers):
            stages[f"upsampler{i + 1 if i else ''}"] = s
            if s.last is not None:  # the companion that takes the stage's final step
                stages[f"upsampler{i + 1 if i else ''}-last"] = s.last
        return {
            "name": m.name,
            "path": str(m.root),
            "model_hash": m.model_hash,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            # What a request that names no precision runs in here, and why (auto: the CPU's bf16 and the set's precision.json)
            "precision": resolve_precision(self.precision, self.device, self.dtype, self.bf16_ok),
            "precision_reason": precision_reason(self.precision, self.device, self.dtype, self.bf16_ok),
            "base_size": m.base_size,
            "image_size": m.image_size,
            "stages": {
                k: {
                    "file": s.path.name,
                    "parameters": s.parameters,
                    "config": dataclasses.asdict(s.config),
                    "diffusion": dataclasses.asdict(s.diffusion.cfg) if s.diffusion else None,
                    "extra": s.extra,
                }
                for k, s in stages.items()
            },
            "sampling": dataclasses.asdict(self.sampling),
            "card": m.card,
            "version": unclip_cli.__version__,
        }

    # -- requests --------------------------------------------------------------------------------------
    def run(self, request: Request, callback: Callback = None) -> Result:
        """Run one request: its images (all, or the one `request.index` replays) with their recipes."""
        request = request.validated()
        return self.run_many([request], batch_size=request.effective_batch, callback=callback)[0]

    def run_many(self, requests: Sequence[Request], batch_size: int | None = None, callback: Callback = None) -> list[Result]:
        """Run requests of one operation and one sampling setting together, batching across them: their
        images are cut into batches of `batch_size` (default: the first request's), in request order, and
        only batches holding a wanted image are computed. One Result per request."""
        reqs = [r.validated().under(self.sampling) for r in requests]
        if not reqs:
            return []
        if len({r.shared() for r in reqs}) > 1:
            raise ValueError("requests run together must share their operation and sampling settings")
        for r in reqs:
            r.inputs()  # decode every input before any model work
            if getattr(r, "noise_level", None) is not None and not self.models.decoder.config.noise_augment:
                raise InputError(f"{r.name('noise_level')} applies to decoders that read a noised image embedding (Stable unCLIP); "
                                 f"{self.name}'s does not", hint=f"leave {r.name('noise_level')} out")
        batch = batch_size or reqs[0].effective_batch
        items = [(k, i) for k, r in enumerate(reqs) for i in range(r.count)]
        wanted = {(k, i) for k, r in enumerate(reqs) for i in r.wanted()}
        chunks = [c for c in (items[s : s + batch] for s in range(0, len(items), batch)) if wanted & set(c)]
        # Warnings depend on the requests alone: said before the first step, not after minutes of sampling.
        warned = [self._warnings(r) for r in reqs]
        for k, lines in enumerate(warned):
            if lines and callback is not None:
                callback(Warnings(tuple(lines), k))
        with self._lock, self._precision(self.precision_of(reqs[0])), self._sized(reqs[0]):
            images, z_i = getattr(self, f"_{reqs[0].op}")(reqs, chunks, batch, callback)
        out = [Result([], [], lines) for lines in warned]
        for (k, i), img in images.items():
            if (k, i) in wanted:
                out[k].images.append(img)
                out[k].recipes.append(self.recipe(reqs[k], i))
                if (k, i) in z_i:
                    out[k].z_i.append(z_i[(k, i)])
        return out

    def _warnings(self, req: Request) -> list[str]:
        """What a validated request warns of, before any sampling: its inputs' own (a mask resized), a line for each
        input image or text far from what the set was trained on (see unclip_cli/domain.py), for a prompt (nudge: its
        --to) that names none of the concepts the set lists the closest ones, a text longer than the CLIP reads, and a
        set too large for the CPU."""
        found = list(req.inputs().warnings)
        unknown = {text: self.unknown_words(text) for _, text in req.texts() if text}  # tokenized once, for both below
        notes = {}  # the first text's note, which says it all when it finds the text far (its unknown words included)
        if self.concepts is not None:
            notes = {text: concept_note(self.concepts, text, lambda t: self.nearest_concepts(t, 3), what, layout=req.op == "generate",
                                        unknown=unknown[text])
                     for what, text in req.texts()[:1] if text}
        if self.domain is not None:
            found += [image_warning(self.domain, source_name(src), im) for src, im in zip(req.sources(), req.inputs().images)]
            found += [prompt_warning(what, unknown[text]) for what, text in req.texts()
                      if text and FAR not in (notes.get(text) or "")]
        found += notes.values()
        texts = [t for _, t in req.texts() if t] + ([req.global_text()] if isinstance(req, ComposeRequest) else [])
        if texts and self.models.clip.config.text and any(self.models.clip.model.tokenize(texts)[1]):
            found.append(f"prompt truncated to {self.models.clip.config.context_length - 2} tokens")
        if self.device.type == "cpu" and self.models.parameters >= CPU_WARN_PARAMETERS:
            found.append(f"this model set has {self.models.parameters / 1e9:.1f} B parameters: on a CPU each image takes many "
                         "minutes (a CUDA GPU with --device cuda takes seconds)")
        return list(dict.fromkeys(w for w in found if w))

    @torch.no_grad()
    def nearest_concepts(self, text: str, k: int = 5) -> list[tuple[float, dict]]:
        """The set's concepts nearest to a text, best first, as (cosine, entry): the cosine of the text's CLIP
        embedding to the concept's English or Chinese name, whichever is higher. Empty for a set without a
        concept list. The names are encoded once, on first use (about 4,000 short texts)."""
        if not self.concepts or not self.concepts.entries:
            return []
        with self._lock:
            if self._concept_emb is None:
                self._concept_emb = concept_embeddings(self.models, self.concepts, self.encode_text)
            z = F.normalize(self.encode_text([text], allow_empty=True)[0].float(), dim=-1)[0]
        cos = (self._concept_emb @ z).max(dim=1).values
        top = cos.topk(min(k, len(cos)))
        return [(float(v), self.concepts.entries[i]) for v, i in zip(top.values, top.indices.tolist())]

    def unknown_words(self, text: str) -> list[str]:
        """The words of a text the set's CLIP never saw in training (`domain.unknown_words`, with the characters its
        domain file lists); empty for a CLIP with a row for every token."""
        return unknown_words(self.models.clip.model, text, self.domain.chars if self.domain else None)

    def precision_of(self, req: Request) -> str:
        """The precision a request runs in: fp32 or bf16 on the CPU (its own, else the engine's default; auto
        resolved), the networks' dtype elsewhere."""
        return resolve_precision(req.precision or self.precision, self.device, self.dtype, self.bf16_ok)

    @contextlib.contextmanager
    def _precision(self, precision: str):
        """Run the block's denoising networks under bfloat16 autocast when `precision` is bf16 (CPU only)."""
        self._bf16 = precision == "bf16" and self.device.type == "cpu"
        try:
            yield
        finally:
            self._bf16 = False

    def recipe(self, req: Request, i: int) -> dict:
        """What reproduces image i of a validated request on this set: its request, samplers and model."""
        size = list(req.inputs().images[0].size) if req.op == "edit" else [req.size or self.image_size] * 2
        rec = self.sampling
        decoder = rec.decoder_sampler if req.uses_prior else "ddim"
        if req.op == "vary" and req.strength >= 1 and rec.vary_sampler == "decoder":
            decoder = rec.decoder_sampler
        if req.op == "edit" and rec.inpaint == "repaint":
            decoder = f"repaint ({rec.decoder_sampler})"
        upsampler = f"{rec.upsampler_sampler} from t={rec.upsampler_t_start}"
        level = getattr(req, "noise_level", None)
        if self.models.decoder.config.noise_augment and hasattr(req, "noise_level"):  # the level that ran, so --from replays it
            level = {"noise_level": rec.noise_level if level is None else level}
        else:
            level = {}
        return {
            **req.to_recipe(i), **level,
            "sampler": {"prior": rec.prior_sampler, "decoder": decoder, "upsampler": upsampler},
            "model": self.name, "model_hash": self.models.model_hash, "version": unclip_cli.__version__, "size": size,
            "precision": self.precision_of(req),
        }

    # -- operations: each takes the validated requests and the batches of (request, image) to compute --
    def _generate(self, reqs, chunks, batch, callback):
        return self._from_text(reqs, chunks, callback, canvases=None)

    def _edit(self, reqs, chunks, batch, callback):
        """Masked editing: prompt -> prior -> z_i -> decoder with inpainting conditioning (GLIDE §4.3). The
        result has the input's size, and every unmasked pixel is copied from the input."""
        return self._from_text(reqs, chunks, callback, canvases=[self._canvas(r) for r in reqs])

    def _from_text(self, reqs, chunks, callback, canvases):
        """Text-to-image and edit: CLIP text encoder -> prior -> decoder -> upsampler(s), batch by batch."""
        steps, guidance, prior_guidance = reqs[0].steps, reqs[0].guidance_scale, reqs[0].prior_guidance_scale
        images, embeddings = {}, {}
        for b, chunk in enumerate(chunks):
            tick = _ticker(callback, b, len(chunks), len(chunk))
            z_t, states, mask, _ = self._encode_distinct([reqs[k].prompt for k, _ in chunk])
            noise = Noise([reqs[k].item_seed(i) for k, i in chunk], self.device)
            z_i = self.run_prior(z_t, states, mask, noise, steps.prior, prior_guidance, tick)
            z_dec = z_t
            if self.models.text is not None:  # the decoder's own text encoder reads the prompts too
                z_dec, states, mask, _ = self._encode_decoder_text([reqs[k].prompt for k, _ in chunk])
            known = keep = known_full = keep_full = None
            if canvases is not None:
                known, keep, known_full, keep_full = (torch.cat([getattr(canvases[k], a) for k, _ in chunk])
                                                      for a in ("known", "keep", "known_full", "keep_full"))
            x = self.decode_from_noise(z_i, states, mask, noise, steps, guidance, known=known, keep=keep, tick=tick, z_t=z_dec)
            x = self.run_upsamplers(x, noise, steps.upsampler, known=known_full, keep_full=keep_full, tick=tick)
            for (k, i), img, z in zip(chunk, self.to_images(x), z_i):
                images[(k, i)] = img if canvases is None else paste_back(img, canvases[k].image, canvases[k].repaint, canvases[k].feather, canvases[k].reach)
                embeddings[(k, i)] = z
        return images, embeddings

    def _vary(self, reqs, chunks, batch, callback):
        """Variations (§3): decode (z_i, x_T) with DDIM eta = strength, x_T from DDIM inversion of the image.
        strength 0 reconstructs the input; 1 is eta 1 from the same x_T, as the paper's variations are (fresh noise,
        keeping only z_i, landed closer to the input than 0.8: the emoji decoder from fresh noise starts at the noised
        mean image, paler and nearer a clean emoji, so distance fell at the top; recipes written before keep it,
        `fresh_at_one`, and so do sets whose recipe's vary_sampler is "decoder", as diffusers' variation pipeline).

        The inversion runs without guidance, and the decoding is guided in proportion to strength (scale
        1 + (g - 1) * strength): DDIM retraces only the unguided model's path, so an inversion under guidance
        g = 3 decoded back under it gave a distorted "reconstruction" (the independent classifier's feature
        distance to the source 0.18 at strength 0, as far as at 0.8), and distance did not grow with strength
        (0.3 came out further than 0.5 on some images). Unguided, strength 0 reconstructs (0.056) and the
        distance grows with strength (scripts/measure_strength.py; the model card has the table). Recipes
        written before keep the constant scale (`guidance_ramp` false).

        The inversion stops at the set's decoder start (`invert_to_start`; the emoji set's t = 800, where its decoding
        from noise starts), and strength turns that x_t's noise toward fresh noise (`toward_fresh`, slerp by strength)
        besides being DDIM's eta, so strength 1 starts where text-to-image decoding does and keeps only z_i. Inverted to
        t = 999, images the decoder itself made did not come back: the 32 px base of 4 generated "cat face" and
        other images came back at RMSE 0.21 (a blue ear, dark outlines), held-out emoji at 0.037; inverted to 800,
        0.010 and 0.011 (the model card's table). Above its start the decoder's predictions are poor (the reason it
        starts there), and generated images, which never passed through them, lose the most. Recipes written before
        invert to 999 as they were made."""
        steps, guidance, strength = reqs[0].steps, reqs[0].guidance_scale, reqs[0].strength
        z_i, x0 = self.base_inputs([r.inputs().images[0] for r in reqs])
        ramp, to_start = reqs[0].guidance_ramp, reqs[0].invert_to_start
        fresh = strength >= 1 and (reqs[0].fresh_at_one or to_start or self.sampling.vary_sampler == "decoder")
        t_inv = self.sampling.decoder_t_start if to_start else None
        x_T = None if fresh else self.invert(z_i, x0, steps.decoder, 1.0 if ramp else guidance, batch, callback, start=t_inv)
        scale = 1 + (guidance - 1) * strength if ramp and x_T is not None else guidance
        images = {}
        for b, chunk in enumerate(chunks):
            tick = _ticker(callback, b, len(chunks), len(chunk))
            rows = [k for k, _ in chunk]
            noise = Noise([reqs[k].item_seed(i) for k, i in chunk], self.device)
            caption = (None, None, None)  # no caption: the set's (vary's default)
            if reqs[0].prompt:  # the decoder's caption, as Stable unCLIP's img2img pipeline takes one
                z_dec, states, mask, _ = self._encode_decoder_text([reqs[k].prompt for k in rows])
                caption = (z_dec, states, mask)
            denoise = self.decoder_denoiser(z_i[rows], scale, caption[1], caption[2], z_t=caption[0], noise=noise,
                                            noise_level=reqs[0].noise_level)
            sampler, eta = "ddim", strength
            if x_T is None:  # fresh noise: as text-to-image decoding starts
                x_init, t_init = self.decoder_start(noise), self.sampling.decoder_t_start
                if self.sampling.vary_sampler == "decoder":  # the decoder's own sampler, as diffusers' variation pipeline
                    sampler, eta = self.sampling.decoder_sampler, self.sampling.decoder_eta
            elif to_start:  # the inverted x_t's noise turned toward fresh noise by strength (0: the image itself)
                x_init, t_init = toward_fresh(self.models.decoder.diffusion, self.models.decoder.extra.get("x_start_mean"), x_T[rows],
                                              noise(*self.sample_shape).to(x_T), t_inv, strength), t_inv
            else:
                x_init, t_init = x_T[rows], None
            x = self.run_decoder(denoise, x_init, steps.decoder, sampler=sampler, eta=eta, noise=noise, start=t_init, tick=tick)
            x = self.run_upsamplers(x, noise, steps.upsampler, tick=tick)
            images.update(zip(chunk, self.to_images(x)))
        return images, {}

    def _blend(self, reqs, chunks, batch, callback):
        """Interpolation (§3): slerp the two images' z_i, and their DDIM-inverted x_T, so the end frames
        reconstruct the inputs. All frames share one seed for the upsampler, so they differ only by blend.
        As in `_vary`, the inversion is unguided (DDIM retraces only the unguided path: the guided inversion's end
        frames were not the inputs), and each frame is guided in proportion to its distance from the nearer end
        (1 at the ends, the full scale midway), one denoiser per scale. Old recipes keep the guided inversion.
        As in `_vary`, the inversion stops at the set's decoder start (`invert_to_start`; old recipes: t = 999)."""
        steps, guidance = reqs[0].steps, reqs[0].guidance_scale
        ramp = reqs[0].guidance_ramp
        t_inv = self.sampling.decoder_t_start if reqs[0].invert_to_start else None
        z, x0 = self.base_inputs([im for r in reqs for im in r.inputs().images])  # A, B of each request in turn
        x_T = self.invert(z, x0, steps.decoder, 1.0 if ramp else guidance, batch, callback, start=t_inv)
        images = {}
        for b, chunk in enumerate(chunks):
            tick = _ticker(callback, b, len(chunks), len(chunk))
            zs = torch.cat([slerp(z[2 * k : 2 * k + 1], z[2 * k + 1 : 2 * k + 2], reqs[k].theta(i)) for k, i in chunk])  # (B, D)
            xs = torch.cat([slerp(x_T[2 * k : 2 * k + 1].flatten(1), x_T[2 * k + 1 : 2 * k + 2].flatten(1), reqs[k].theta(i)).view_as(x_T[:1])
                            for k, i in chunk])
            scales = [1 + (guidance - 1) * (1 - abs(2 * reqs[k].theta(i) - 1)) if ramp else guidance for k, i in chunk]
            parts = [(rows, self.decoder_denoiser(zs[rows], s)) for s in dict.fromkeys(scales)
                     for rows in [[r for r, v in enumerate(scales) if v == s]]]
            x = self.run_decoder(_by_rows(parts), xs, steps.decoder, sampler="ddim", eta=0.0, start=t_inv, tick=tick)
            x = self.run_upsamplers(x, Noise([reqs[k].item_seed(i) for k, i in chunk], self.device), steps.upsampler, tick=tick)
            images.update(zip(chunk, self.to_images(x)))
        return images, {}

    def _nudge(self, reqs, chunks, batch, callback):
        """Text diffs (§3): z = slerp(z_i, normalize(z_t(to) - z_t(from)), theta), decoded from the image's
        DDIM-inverted x_T. An empty "from" caption: the paper notes that "a photo" or no caption also works
        as the origin. As in `_vary`, the inversion is unguided and the decoding guided in proportion to the
        request's amount (1 + (g - 1) * amount): with guidance in both, a small amount already moved the image
        far (the independent classifier's feature distance 0.20 at 0.1, its concept kept in top-5 for 3 of 8
        held-out emoji at 0.3); ramped, 0.05 at 0.1 and 5 of 8 at 0.3 (the model card has the table). As in `_vary`, the
        inversion stops at the set's decoder start (`invert_to_start`; old recipes: t = 999)."""
        steps, guidance = reqs[0].steps, reqs[0].guidance_scale
        z_d = []
        for r in reqs:
            z_to = self.encode_text([r.to])[0]
            z_from = self.encode_text([r.from_], allow_empty=True)[0]
            if (z_to - z_from).norm() < 1e-6:
                raise InputError(f"{r.name('to')} and {r.name('from_')} have the same CLIP embedding, so there is no direction "
                                 "to move in",
                                 hint="use texts that differ in meaning")
            z_d.append(F.normalize(z_to - z_from, dim=-1))
        z_i, x0 = self.base_inputs([r.inputs().images[0] for r in reqs])
        ramp = reqs[0].guidance_ramp
        t_inv = self.sampling.decoder_t_start if reqs[0].invert_to_start else None
        x_T = self.invert(z_i, x0, steps.decoder, 1.0 if ramp else guidance, batch, callback, start=t_inv)
        scale = 1 + (guidance - 1) * reqs[0].amount if ramp else guidance
        images = {}
        for b, chunk in enumerate(chunks):
            tick = _ticker(callback, b, len(chunks), len(chunk))
            # Raw embeddings (Karlo): the direction gets the image embedding's norm, so the slerp keeps |z_i|.
            raw = not self.models.clip.config.normalize
            z = torch.cat([slerp(z_i[k : k + 1], z_d[k] * z_i[k].norm() if raw else z_d[k], reqs[k].theta(i)) for k, i in chunk])
            x = self.run_decoder(self.decoder_denoiser(z, scale), x_T[[k for k, _ in chunk]], steps.decoder, sampler="ddim",
                                 eta=0.0, start=t_inv, tick=tick)
            x = self.run_upsamplers(x, Noise([reqs[k].item_seed(i) for k, i in chunk], self.device), steps.upsampler, tick=tick)
            images.update(zip(chunk, self.to_images(x)))
        return images, {}

    def _mix(self, reqs, chunks, batch, callback):
        """A weighted mix of embeddings: each image's z_i and each text's (sampled by the prior with the image's own
        noise), combined with the request's weights and renormalised as the set's embeddings are (unit norm; raw
        embeddings, Karlo's, get the weighted mean of the parts' norms), then decoded from fresh noise as
        text-to-image decodes the prior's z_i. The paper's interpolations (§3) with any number of parts."""
        steps, guidance, prior_guidance = reqs[0].steps, reqs[0].guidance_scale, reqs[0].prior_guidance_scale
        z_img = [torch.cat([self.encode_image(im) for im in r.inputs().images]) if r.images else None for r in reqs]  # (M, D)
        raw = not self.models.clip.config.normalize
        images, embeddings = {}, {}
        for b, chunk in enumerate(chunks):
            tick = _ticker(callback, b, len(chunks), len(chunk))
            noise = Noise([reqs[k].item_seed(i) for k, i in chunk], self.device)
            parts = [torch.stack([z_img[k][j] for k, _ in chunk]) for j in range(len(reqs[chunk[0][0]].images))]
            for j in range(len(reqs[chunk[0][0]].prompts)):
                z_t, states, mask, _ = self.encode_text([reqs[k].prompts[j] for k, _ in chunk])
                parts.append(self.run_prior(z_t, states, mask, noise, steps.prior, prior_guidance, tick))
            z_parts = torch.stack(parts, dim=1).to(self.work_dtype)  # (B, M, D)
            w = torch.tensor([reqs[k].mix_weights() for k, _ in chunk], dtype=self.work_dtype, device=z_parts.device)  # (B, M)
            z = (w[..., None] * (z_parts if raw else F.normalize(z_parts, dim=-1))).sum(1)  # (B, D)
            if bool((z.norm(dim=-1) < 1e-4).any()):
                k = chunk[int((z.norm(dim=-1) < 1e-4).nonzero()[0])][0]
                raise InputError(f"the weighted parts cancel out: their mix has no direction ({reqs[k].name('weights')} "
                                 f"{', '.join(f'{x:g}' for x in reqs[k].mix_weights())})", hint="change the weights")
            scale = (w.abs() * z_parts.norm(dim=-1)).sum(1, keepdim=True) / w.abs().sum(1, keepdim=True) if raw else 1.0
            z = F.normalize(z, dim=-1) * scale
            x = self.decode_from_noise(z, None, None, noise, steps, guidance, tick=tick, noise_level=reqs[0].noise_level)
            x = self.run_upsamplers(x, noise, steps.upsampler, tick=tick)
            for (k, i), img, z_k in zip(chunk, self.to_images(x), z):
                images[(k, i)] = img
                embeddings[(k, i)] = z_k
        return images, embeddings

    def _compose(self, reqs, chunks, batch, callback):
        """Objects where the user says (`ComposeRequest`): the global text and each object's phrase through the prior,
        then `_fuse` or `_paste` at the decoder's size; the upsamplers see only pixels, so the layout carries through."""
        steps, guidance, prior_guidance = reqs[0].steps, reqs[0].guidance_scale, reqs[0].prior_guidance_scale
        images, embeddings = {}, {}

        def encoded(texts, noise, tick):
            z_t, states, mask, _ = self.encode_text(texts)
            return self.run_prior(z_t, states, mask, noise, steps.prior, prior_guidance, tick), z_t, states, mask

        for b, chunk in enumerate(chunks):
            tick = _ticker(callback, b, len(chunks), len(chunk))
            rows = [k for k, _ in chunk]
            noise = Noise([reqs[k].item_seed(i) for k, i in chunk], self.device)
            # Each stage runs once per object and once for the whole: its Ticks say which (`Tick.part`)
            count = len(reqs[rows[0]].objects)
            parts = [f"object {j + 1} of {count}" + (f" ({phrases[0]})" if len(phrases) == 1 else "")
                     for j in range(count) for phrases in [list(dict.fromkeys(reqs[k].objects[j][0] for k in rows))]]
            whole = encoded([reqs[k].global_text() for k in rows], noise, _part(tick, "the whole picture"))
            objects = [(encoded([reqs[k].objects[j][0] for k in rows], noise, _part(tick, parts[j])),
                        [m.to(self.device, self.work_dtype) for m in box_masks([reqs[k].objects[j][1] for k in rows], self.base_size,
                                                                                soft=self.base_size / 16)])
                       for j in range(count)]
            if reqs[0].method == "fuse":
                x = self._fuse(whole, objects, noise, steps, guidance, _part(tick, "the whole picture, objects fused in"))
            else:
                x = self._paste(whole, objects, noise, steps, guidance, tick, parts)
            x = self.run_upsamplers(x, noise, steps.upsampler, tick=_part(tick, "the whole picture"))
            for (k, i), img, z in zip(chunk, self.to_images(x), whole[0]):
                images[(k, i)] = img
                embeddings[(k, i)] = z
        return images, embeddings

    def _background(self, like: torch.Tensor) -> torch.Tensor | None:
        """The set's background for layouts: its training mean image where the decoder carries one (the emoji
        set's: white around a tinted middle), at the decoder's size; None where it has none (Karlo)."""
        mean = self.models.decoder.extra.get("x_start_mean")
        if mean is None:
            return None
        s = like.shape[-1]
        return F.interpolate(torch.tensor(mean)[None], size=(s, s), mode="bilinear", align_corners=False).to(like).expand_as(like)

    def _object_denoiser(self, obj, guidance: float):
        """An object's path: its z_i and phrase; with inpainting channels, drawn inside its box against the set's
        background outside it (GLIDE §4.3's conditioning), else on the whole canvas (the fusion weights place it)."""
        (z_o, o_t, o_states, o_mask), (hard, _) = obj
        if self.sampling.inpaint == "repaint":
            return self.decoder_denoiser(z_o, guidance, o_states, o_mask, z_t=o_t)
        canvas = torch.ones(len(z_o), 3, self.base_size, self.base_size, device=self.device, dtype=self.work_dtype)
        bg = self._background(canvas)
        return self.decoder_denoiser(z_o, guidance, o_states, o_mask, known=canvas if bg is None else bg, keep=1 - hard, z_t=o_t)

    def _fuse(self, whole, objects, noise: Noise, steps: Steps, guidance: float, tick):
        """Region fusion: at every decoder step each object's prediction rules inside its (soft) box, mixed with the
        global path's by COMPOSE_HARMONY; outside the boxes the global path rules, except in the first half of
        sampling, where the set's background does (so objects stay in their boxes while the layout forms)."""
        stage = self.models.decoder
        z_g, g_t, g_states, g_mask = whole
        inside = torch.stack([soft for _, (_, soft) in objects]).amax(0)  # (B, 1, s, s)
        layout_until = stage.diffusion.num_timesteps // 2
        x_T = self.decoder_start(noise)
        bg = self._background(x_T)
        paths = [(self._object_denoiser(o, guidance), lambda t, w=o[1][1]: w) for o in objects]
        outside = (lambda t: 1 - inside if bg is None or t < layout_until else torch.zeros_like(inside))  # noqa: E731
        paths.append((self.decoder_denoiser(z_g, guidance, g_states, g_mask, z_t=g_t), lambda t: COMPOSE_HARMONY * inside + outside(t)))
        if bg is not None:
            paths.append((lambda x_t, t: (bg,), lambda t: (1 - inside) if t >= layout_until else torch.zeros_like(inside)))
        return self.run_decoder(fused_denoiser(stage.diffusion, paths), x_T, steps.decoder, noise=noise,
                                start=self.sampling.decoder_t_start, tick=tick)

    def _paste(self, whole, objects, noise: Noise, steps: Steps, guidance: float, tick, parts: list[str]):
        """Paste and harmonise, the baseline: each object drawn alone, shrunk into its box on the set's background,
        then the whole canvas noised to COMPOSE_HARMONISE_T and denoised with the global text (SDEdit, Meng et al. 2022).
        `parts`: each object's name in the progress Ticks."""
        stage, s = self.models.decoder, self.base_size
        z_g, g_t, g_states, g_mask = whole
        one = dataclasses.replace(steps, decoder_candidates=1)
        white = torch.ones(len(z_g), 3, s, s, device=self.device, dtype=self.work_dtype)
        bg = self._background(white)
        canvas = (white if bg is None else bg).clone()
        for ((z_o, o_t, o_states, o_mask), (hard, _)), part in zip(objects, parts):
            x_o = self.decode_from_noise(z_o, o_states, o_mask, noise, one, guidance, tick=_part(tick, part), z_t=o_t)
            for b in range(len(x_o)):
                ys, xs = hard[b, 0].nonzero(as_tuple=True)
                y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
                canvas[b, :, y0:y1, x0:x1] = F.interpolate(x_o[b : b + 1], size=(y1 - y0, x1 - x0), mode="bilinear", antialias=True,
                                                           align_corners=False)[0]
        t_h = min(COMPOSE_HARMONISE_T, stage.diffusion.num_timesteps - 1)
        x_t = stage.diffusion.q_sample(canvas, torch.full((len(canvas),), t_h), noise(3, s, s).to(canvas))
        return self.run_decoder(self.decoder_denoiser(z_g, guidance, g_states, g_mask, z_t=g_t), x_t, steps.decoder, noise=noise,
                                start=t_h, tick=_part(tick, "the whole picture, harmonised"))

    # -- shared pieces -------------------------------------------------------------------------------
    def _model_fn(self, stage, images_last: bool = False):
        """Wrap a stage's network so that it runs in the model's dtype (inputs and conditioning) and returns the
        work dtype. The network is looked up at each call, never held: with --offload, a denoiser kept by a caller
        does not keep its network in memory after another stage replaced it (it is read again if called).

        Under bf16 the network runs in CPU autocast: matrix products and convolutions in bfloat16, normalisations
        and softmax in float32 (torch's autocast lists); the sampler's arithmetic stays float32 either way.
        `images_last`: where it measured faster (the upsamplers, float32 on a CPU; issue 25) its image inputs are
        laid out channels-last, which oneDNN's convolutions take without reordering each one."""
        last = images_last and self.device.type == "cpu" and self.dtype == torch.float32 and not self._bf16

        def fn(x, t, **kw):
            kw = {k: v.to(self.dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kw.items()}
            if last:
                x, kw = _channels_last(x), {k: _channels_last(v) for k, v in kw.items()}
            with torch.autocast("cpu", dtype=torch.bfloat16) if self._bf16 else contextlib.nullcontext():
                out = stage.model(x.to(self.dtype), t, **kw)
            return out.to(self.work_dtype)

        return fn

    def timesteps(self, stage, steps: int, start: int | None = None) -> list[int]:
        """A stage's sampling timesteps, spaced as the set's recipe says."""
        spacing = self.sampling.timestep_spacing
        if stage is self.models.prior and self.sampling.prior_spacing != "same":
            spacing = self.sampling.prior_spacing
        return spaced_timesteps(stage.diffusion.num_timesteps, steps, start=start, spacing=spacing)

    @torch.no_grad()
    def encode_text(self, prompts: list[str], allow_empty: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[bool]]:
        """-> z_t (B, D), token states (B, L, W), mask (B, L), and whether each prompt was truncated."""
        if not allow_empty and any(not p or not p.strip() for p in prompts):
            raise InputError("the prompt is empty", hint='describe what to draw, e.g. "cat face"')
        return self._encode_with(self.models.clip, prompts)

    def _encode_with(self, stage, prompts: list[str]):
        if not stage.config.text:
            raise UnclipError(f"the model set {self.name} has no CLIP text encoder, which this operation needs",
                              hint="convert Stable unCLIP with --prior (Karlo's prior and its CLIP text encoder)")
        clip = stage.model
        tokens, truncated = clip.tokenize(prompts)
        z_t, states, mask = clip.encode_text(tokens.to(self.device))
        return z_t.to(self.work_dtype), states, mask, list(truncated)

    @torch.no_grad()
    def _encode_decoder_text(self, prompts: list[str]):
        """The decoder's text encoder (a set's text.safetensors; else the CLIP's), as encode_text returns."""
        return self._encode_with(self.models.text, prompts) if self.models.text is not None else self.encode_text(prompts, allow_empty=True)

    def _encode_distinct(self, prompts: list[str]):
        """encode_text of each distinct prompt once (in order of first appearance), indexed back to `prompts`."""
        distinct = list(dict.fromkeys(prompts))
        z_t, states, mask, truncated = self.encode_text(distinct)
        rows = [distinct.index(p) for p in prompts]
        if rows == list(range(len(distinct))):
            return z_t, states, mask, truncated
        return z_t[rows], states[rows], mask[rows], [truncated[r] for r in rows]

    @torch.no_grad()
    def encode_image(self, img: Image.Image) -> torch.Tensor:
        if not self.models.clip.config.vision:
            raise UnclipError(f"the model set {self.name} has no CLIP image encoder, which this operation needs",
                              hint="convert Karlo with its image-variation folder: unclip convert karlo SRC --variation SRC2 --to DIR")
        clip = self.models.clip.model
        if clip.cfg.preprocess == "openai":  # shortest side, centre crop, OpenAI's mean and std
            return clip.encode_pixels(clip.image_pixels(img).to(self.device, self.dtype)).to(self.work_dtype)  # (1, D)
        x = to_tensor(img, clip.cfg.image_size)[None].to(self.device, self.dtype)
        return clip.encode_image(x).to(self.work_dtype)  # (1, D)

    def base_inputs(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """z_i (B, D) and base-resolution tensors (B, 3, s, s) of images, each padded square on white."""
        sq = [square(im.convert("RGB")) for im in images]
        z_i = torch.cat([self.encode_image(im) for im in sq])
        x0 = torch.stack([to_tensor(im, self.base_size * self.models.latent_factor) for im in sq]).to(self.device)
        x0 = self.encode_latents(x0)
        return z_i, x0

    def _canvas(self, req: Request) -> _EditCanvas:
        inputs = req.inputs()
        image = inputs.images[0]
        repaint = np.asarray(inputs.mask.convert("L")) >= 128  # (H, W) True = repaint
        sq_img, sq_mask = square(image), square(Image.fromarray(repaint.astype(np.uint8) * 255, "L"))
        S, s = self.image_size, self.base_size
        known_full = to_tensor(sq_img, S)[None].to(self.device)
        repaint_full = torch.from_numpy(np.asarray(sq_mask.resize((S, S), Image.Resampling.BILINEAR), dtype=np.float32) / 255)
        keep_full = (repaint_full == 0).float()[None, None].to(self.device)
        known = F.interpolate(known_full, size=(s, s), mode="area")
        keep = (F.interpolate(keep_full, size=(s, s), mode="area") > 0.999).float()  # known only if fully unmasked
        if self.models.vae is not None:  # the known region as the decoder samples it: encoded (the pixels are pasted back)
            known = self.encode_latents(F.interpolate(known_full, size=(s * self.models.latent_factor,) * 2, mode="area"))
        # The colour match scales with the input (4 base pixels: 32 px of a 256 px image); --feather 0 pastes as before.
        feather = req.feather_px  # the default scales with the image (requests.default_feather)
        reach = round(HARMONY_BASE_PX * max(image.size) / s) if feather > 0 and req.harmonise else 0
        return _EditCanvas(image, repaint, feather, reach, known_full, keep_full, known, keep)

    def _text_dropped(self, B: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states and an all-False mask: 'no caption', as the decoder saw 50% of the time in training."""
        cfg = self.models.clip.config
        states = torch.zeros(B, cfg.context_length, cfg.text_width, device=self.device, dtype=self.dtype)
        return states, torch.zeros(B, cfg.context_length, dtype=torch.bool, device=self.device)

    def _empty_caption(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The encoded empty caption "" (z_t (1, D), states (1, L, W), mask (1, L)): the unconditional branch of
        sets whose recipe says `unconditional = "empty_caption"` (Karlo), computed once."""
        if self._empty is None:
            z_t, states, mask, _ = self.encode_text([""], allow_empty=True)
            self._empty = (z_t, states, mask)
        return self._empty

    def _no_caption(self, B: int) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(z_t, states, mask) for B images decoded without a caption (vary, blend, nudge): the dropped caption
        (z_t None), or the empty caption for sets guided with it."""
        if self.sampling.unconditional == "empty_caption":
            z_t, states, mask = self._decoder_empty()
            return z_t.expand(B, -1), states.expand(B, -1, -1), mask.expand(B, -1)
        return (None, *self._text_dropped(B))

    def _decoder_empty(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The empty caption as the decoder's text encoder gives it (the CLIP's, for sets without their own)."""
        if self.models.text is None:
            return self._empty_caption()
        if self._decoder_empty_cache is None:
            self._decoder_empty_cache = tuple(self._encode_decoder_text([""])[:3])
        return self._decoder_empty_cache

    # -- stage: prior (§2.2) ---------------------------------------------------------------------------
    @torch.no_grad()
    def run_prior(self, z_t, states, mask, noise: Noise, steps: int, scale: float, tick=None) -> torch.Tensor:
        """Text -> z_i (B, D) unit-norm, choosing the better of two candidates per image. `tick(stage, i, total)`
        reports progress (the stage methods take this per-batch form; see `_ticker`)."""
        stage, rec = self.models.prior, self.sampling
        if stage is None:
            raise UnclipError(f"the model set {self.name} has no prior, which text-to-image needs",
                              hint="convert Stable unCLIP with --prior (Karlo's prior)")
        # The empty caption first: encoding it reads the CLIP, which --offload swaps in for the prior.
        empty = self._empty_caption() if rec.unconditional == "empty_caption" else None
        K = rec.prior_candidates
        B, D = z_t.shape
        rep = lambda v: v.repeat_interleave(K, dim=0)  # noqa: E731  (B, ...) -> (B*K, ...)
        net = self._model_fn(stage)

        def model_fn(x, t, keep):
            reps = x.shape[0] // (B * K)
            zt, st, mk = rep(z_t).repeat(reps, 1), rep(states).repeat(reps, 1, 1), rep(mask).repeat(reps, 1)
            if empty is None:
                return net(x, t, z_t=zt, text_states=st, text_mask=mk, text_keep=keep)
            # Karlo: the unconditional rows read the encoded empty caption
            return net(x, t, z_t=where_kept(keep, zt, empty[0]), text_states=where_kept(keep, st, empty[1]),
                       text_mask=where_kept(keep, mk, empty[2]))

        denoise = make_denoiser(stage.diffusion, guided(model_fn, scale), clip_x_start=rec.prior_clamp)
        x = noise(K, D).view(B * K, D)
        ts = self.timesteps(stage, steps)
        x = SAMPLERS[rec.prior_sampler](denoise, x, ts, stage.diffusion, randn=lambda: noise(K, D).view(B * K, D),
                                        callback=_stage(tick, "prior"))
        z = stage.model.destandardize(x.to(self.dtype)).to(self.work_dtype)
        if self.models.clip.config.normalize:  # unit-norm CLIP space: the candidate closer to z_t
            return pick_closest(F.normalize(z, dim=-1).view(B, K, D), z_t)
        z = z.view(B, K, D)  # raw embeddings (Karlo): as the prior gives them; candidates compared by cosine
        if K == 1:
            return z[:, 0]
        best = torch.einsum("bkd,bd->bk", F.normalize(z, dim=-1), F.normalize(z_t, dim=-1)).argmax(dim=1)
        return z[torch.arange(B), best]

    # -- stage: decoder (§2.1) -------------------------------------------------------------------------
    def decoder_denoiser(self, z_i, scale: float, states=None, mask=None, known=None, keep=None, z_t=None, noise: Noise | None = None,
                         noise_level: int | None = None):
        """The guided decoder denoiser for z_i (B, D); without `states`, there is no caption (`_no_caption`).
        `z_t` (B, D): the caption's CLIP text embedding, which Karlo's decoder also reads. A decoder with noise
        augmentation reads z_i noised to `noise_level` (default: the recipe's) with `noise`'s draws (none: the
        noiseless path, for inversion and the deterministic decodes after it), its level embedding appended."""
        if states is None:
            z_t, states, mask = self._no_caption(z_i.shape[0])
        # Text encoders before the decoder is read: with --offload, each swaps the other out (nothing held across).
        uncond = self._decoder_empty() if self.sampling.unconditional == "empty_caption" else None
        net = self.models.decoder.model
        if net.cfg.noise_augment:
            eps = noise(z_i.shape[-1]).to(z_i) if noise is not None else torch.zeros_like(z_i)
            level = self.sampling.noise_level if noise_level is None else noise_level
            z_i = noise_augment(z_i, net.emb_mean.to(z_i), net.emb_std.to(z_i), level, eps)
        del net
        return decoder_denoiser(self.models.decoder.diffusion, self._model_fn(self.models.decoder), z_i, states, mask,
                                scale, known=known, keep=keep, z_t=z_t, uncond=uncond, clamp=self.sampling.decoder_clamp or None)

    def decoder_start(self, noise: Noise, known: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x at the recipe's decoder start: the training mean image (its known pixels when inpainting) noised
        to decoder_t_start, or pure noise. (B, 3, s, s)"""
        stage, rec = self.models.decoder, self.sampling
        eps = noise(*self.sample_shape)
        if rec.decoder_start == "noise":
            return eps.to(self.work_dtype)
        return noised_mean(stage.diffusion, stage.extra.get("x_start_mean"), eps, known, keep, t_start=rec.decoder_t_start)

    def run_decoder(self, denoise, x_T, steps: int, sampler: str | None = None, eta: float = 1.0, noise: Noise | None = None,
                    start: int | None = None, tick=None, known: torch.Tensor | None = None, keep: torch.Tensor | None = None):
        """Sample base images from x_T at timestep `start` (default T - 1) down to 0 (the recipe's sampler by
        default). With `known` and `keep`, RePaint keeps the known region (networks without inpainting channels)."""
        stage = self.models.decoder
        ts = self.timesteps(stage, steps, start=start)
        randn = (lambda: noise(*self.sample_shape)) if noise else None
        if known is not None:
            return sample_repaint(denoise, x_T, ts, stage.diffusion, known=known, keep=keep, randn=randn,
                                  resample=self.sampling.inpaint_resample, callback=_stage(tick, "decoder"))
        sampler = sampler or self.sampling.decoder_sampler
        return SAMPLERS[sampler](denoise, x_T, ts, stage.diffusion, randn=randn, eta=eta, callback=_stage(tick, "decoder"))

    @torch.no_grad()
    def decode_from_noise(self, z_i, states, mask, noise: Noise, steps: Steps, guidance: float, known: torch.Tensor | None = None,
                          keep: torch.Tensor | None = None, tick=None, z_t: torch.Tensor | None = None,
                          noise_level: int | None = None) -> torch.Tensor:
        """Text-to-image and edit decoding: base images (B, 3, s, s) for z_i (B, D), sampled from the recipe's
        decoder start (emoji: ancestrally from the noised mean at DECODER_T_START). With steps.decoder_candidates = K > 1, K samples per image are
        drawn (from that image's own noise generator) and the one whose CLIP image embedding is closest to
        z_i is kept: the decoder realises z_i unevenly from sample to sample, and CLIP can tell which did
        best. Measured on the emoji model (200 training-split prompts, default steps): K = 3 raised the
        generated images' CLIP z-score for their concept from 1.59 to 1.79 (English) and 0.95 to 1.05
        (Chinese), top-5 retrieval among 100 concepts from 0.49 to 0.65 (English)."""
        K, B = steps.decoder_candidates, z_i.shape[0]
        if K == 1:
            flat, rep = noise, (lambda v: v)
        else:
            flat = lambda *shape: noise(K, *shape).flatten(0, 1)  # noqa: E731  (B*K, *shape), candidates of image b together
            rep = lambda v: None if v is None else v.repeat_interleave(K, dim=0)  # noqa: E731
        repaint = known is not None and self.sampling.inpaint == "repaint"
        channels = None if repaint else (rep(known), rep(keep))
        denoise = self.decoder_denoiser(rep(z_i), guidance, rep(states), rep(mask), *(channels or (None, None)), z_t=rep(z_t), noise=flat,
                                        noise_level=noise_level)
        x = self.run_decoder(denoise, self.decoder_start(flat, rep(known), rep(keep)), steps.decoder, noise=flat, eta=self.sampling.decoder_eta,
                             start=self.sampling.decoder_t_start, tick=tick,
                             known=rep(known) if repaint else None, keep=rep(keep) if repaint else None)
        if K == 1:
            return x
        clip = self.models.clip.model
        size = clip.cfg.image_size
        x_clip = x if x.shape[-1] == size or clip.cfg.preprocess == "openai" else \
            F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        emb = F.normalize(clip.encode_image(x_clip.clamp(-1, 1).to(self.dtype)).to(self.work_dtype), dim=-1).view(B, K, -1)
        best = (emb * F.normalize(z_i.to(self.work_dtype), dim=-1)[:, None]).sum(-1).argmax(1)  # (B,)
        return x.view(B, K, *x.shape[1:])[torch.arange(B, device=x.device), best]

    @torch.no_grad()
    def invert(self, z_i, x_start, steps: int, guidance: float, batch: int | None = None, callback: Callback = None,
               start: int | None = None) -> torch.Tensor:
        """DDIM inversion of base-resolution images x_start (B, 3, s, s) under their z_i (B, D), without
        caption: -> x_T (§3), at timestep `start` (default T - 1). In batches of `batch` images (default: all at once)."""
        stage = self.models.decoder
        ts = self.timesteps(stage, steps, start=start)
        batch = batch or len(x_start)
        parts = range(0, len(x_start), batch)
        return torch.cat([
            ddim_invert(self.decoder_denoiser(z_i[s : s + batch], guidance), x_start[s : s + batch], ts, stage.diffusion,
                        callback=_stage(_ticker(callback, b, len(parts), len(x_start[s : s + batch])), "invert"))
            for b, s in enumerate(parts)
        ])

    @torch.no_grad()
    def reconstruct(self, images: Sequence[Image.Image], steps: int, guidance: float, callback: Callback = None):
        """DDIM inversion and deterministic decoding back at base resolution (a vary at strength 0 before
        the upsampler, inverted to the decoder's start): -> (x_start, reconstruction), both (B, 3, s, s). What inversion loses."""
        z_i, x0 = self.base_inputs(images)
        t_inv = self.sampling.decoder_t_start
        x_T = self.invert(z_i, x0, steps, guidance, callback=callback, start=t_inv)
        return x0, self.run_decoder(self.decoder_denoiser(z_i, guidance), x_T, steps, sampler="ddim", eta=0.0, start=t_inv,
                                    tick=_ticker(callback, 0, 1))

    # -- stage: upsamplers (§2.1) ----------------------------------------------------------------------
    @torch.no_grad()
    def run_upsamplers(self, x, noise: Noise, steps: int, known: torch.Tensor | None = None, keep_full: torch.Tensor | None = None,
                       tick=None):
        """Base images (B, 3, s, s) -> final images, each stage conditioned on the upsampled previous image. With
        `known`, unmasked pixels are kept at every resolution.

        The set's recipe says how: emoji, DDIM from the bilinearly upsampled image noised to t = 400 (unmasked
        pixels kept in every x_start prediction); Karlo, ancestral sampling from pure noise at t = 999 on the
        bicubic (antialiased) upsampled image, a stage's `-last` network taking the final step, and RePaint
        for edits. A latent decoder's samples are decoded to pixels first (such a set has no upsampler)."""
        rec = self.sampling
        if self.models.vae is not None:
            x = self.decode_latents(x)
        for k, stage in enumerate(self.models.upsamplers):
            low_res = stage.extra.get("low_res", x.shape[-1])
            if low_res != x.shape[-1]:  # the stage takes a smaller image: downsize as its training did (antialiased)
                x = F.interpolate(x.clamp(-1, 1), size=(low_res, low_res), mode="bilinear", antialias=True, align_corners=False)
            size = low_res * stage.extra["scale"]
            if rec.upsample_filter == "bilinear":
                low = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(-1, 1)
            else:  # clamp, then bicubic with antialiasing (what diffusers' UnCLIP pipelines do)
                low = F.interpolate(x.clamp(-1, 1), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
            ts = self.timesteps(stage, steps, start=rec.upsampler_t_start)
            net = self._model_fn(stage, images_last=True)
            if stage.last is None:
                model = lambda x_t, t, net=net, low=low: net(x_t, t, cond=low)  # noqa: E731
            else:
                last, final = self._model_fn(stage.last, images_last=True), ts[-1]
                model = lambda x_t, t, net=net, last=last, low=low, final=final: (last if int(t[0]) == final else net)(x_t, t, cond=low)  # noqa: E731
            denoise = make_denoiser(stage.diffusion, model, clip_x_start=rec.upsampler_clamp)
            k_img = k_keep = None
            if known is not None:
                k_img = F.interpolate(known, size=(size, size), mode="area")
                k_keep = (F.interpolate(keep_full, size=(size, size), mode="area") > 0.999).float()
            if known is not None and rec.inpaint == "channels":
                base = denoise

                def denoise(x_t, t, base=base, k_img=k_img, k_keep=k_keep, diffusion=stage.diffusion):
                    x_start = base(x_t, t)[0]
                    x_start = k_keep * k_img + (1 - k_keep) * x_start
                    return x_start, diffusion.eps_from_x_start(x_t, t, x_start)

            randn = lambda size=size: noise(3, size, size)  # noqa: E731
            if rec.upsampler_start == "noise":
                x_start = randn().to(self.work_dtype)
            else:
                x_start = stage.diffusion.q_sample(low, torch.full((low.shape[0],), ts[0]), randn())
            name = "upsampler" if len(self.models.upsamplers) == 1 else f"upsampler {k + 1}"
            if known is not None and rec.inpaint == "repaint":
                x = sample_repaint(denoise, x_start, ts, stage.diffusion, known=k_img, keep=k_keep, randn=randn,
                                   resample=rec.inpaint_resample, callback=_stage(tick, name))
            elif rec.upsampler_sampler == "ddim":
                x = sample_ddim(denoise, x_start, ts, stage.diffusion, callback=_stage(tick, name))
            else:
                x = SAMPLERS[rec.upsampler_sampler](denoise, x_start, ts, stage.diffusion, randn=randn, callback=_stage(tick, name))
        return x

    # -- latent space ------------------------------------------------------------------------------------
    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, s, s) of what the decoder samples: an image, or a latent of its autoencoder."""
        s = self.base_size
        return (self.models.decoder.config.in_channels, s, s)

    @torch.no_grad()
    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> what the decoder samples: the autoencoder's scaled latents, or the images themselves."""
        if self.models.vae is None:
            return x
        return self.models.vae.model.encode(x.to(self.dtype)).to(self.work_dtype)

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        return self.models.vae.model.decode(z.to(self.dtype)).to(self.work_dtype)

    def to_images(self, x: torch.Tensor) -> list[Image.Image]:
        """Final tensors (B, 3, H, W) in [-1, 1] -> PIL images; NaN or inf is an error with advice."""
        if not torch.isfinite(x).all():
            raise UnclipError(
                "the model produced NaN or inf values",
                hint="try --device cpu (full precision), fewer guidance, or check the weights with `unclip info`",
            )
        return [to_pil(img) for img in x]


def concept_embeddings(models: ModelSet, concepts, encode_text) -> torch.Tensor:
    """(N, 2, D) unit CLIP text embeddings of the concepts' English and Chinese names: read from the file the
    concept list names when it was made with this set's CLIP (scripts/write_concepts.py), else computed
    (some seconds on a CPU)."""
    import hashlib

    n = len(concepts.entries)
    saved = concepts.embeddings or {}
    path = Path(models.root) / str(saved.get("file", ""))
    if saved.get("file") and path.is_file() and path.suffix == ".npy" and path.parent == Path(models.root):
        clip_file = Path(models.clip.path)
        if hashlib.sha256(clip_file.read_bytes()).hexdigest()[:16] == saved.get("clip_sha256"):
            arr = np.load(path, allow_pickle=False)
            if arr.ndim == 3 and arr.shape[:2] == (n, 2) and np.isfinite(arr).all():
                return F.normalize(torch.from_numpy(arr.astype(np.float32)), dim=-1)
    names = [c[lang] or c["en"] for c in concepts.entries for lang in ("en", "zh")]
    emb = torch.cat([encode_text(names[s : s + 512], allow_empty=True)[0] for s in range(0, len(names), 512)])
    return F.normalize(emb.float(), dim=-1).view(n, 2, -1)


def _by_rows(parts):
    """One denoiser from several, each over its rows of the batch: [(rows, denoise)], the rows disjoint."""
    if len(parts) == 1:
        return parts[0][1]
    order = torch.tensor([r for rows, _ in parts for r in rows]).argsort()

    def denoise(x_t, t):
        outs = [d(x_t[rows], t) for rows, d in parts]
        return tuple(torch.cat(items)[order] for items in zip(*outs))

    return denoise


def _channels_last(v):
    """A batch of images (B, C, H, W) laid out channels-last; anything else as it is."""
    return v.contiguous(memory_format=torch.channels_last) if torch.is_tensor(v) and v.dim() == 4 else v


def _ticker(callback: Callback, b: int, batches: int, size: int = 0):
    """A per-batch callback (stage, step, total) -> Tick, or None; `size`: the batch's images (the page's estimate of
    the time left scales a smaller last batch by it)."""
    if callback is None:
        return None
    return lambda stage, i, n, part="": callback(Tick(stage, i, n, b + 1, batches, size=size, part=part))


def _part(tick, part: str):
    """A per-batch callback whose Ticks say which part of the picture they draw (compose's objects), or None."""
    return None if tick is None else (lambda stage, i, n: tick(stage, i, n, part))


def _stage(tick, stage: str):
    """A sampler callback (i, total) for one stage, or None."""
    return None if tick is None else (lambda i, n: tick(stage, i, n))
