"""The unCLIP pipeline: load a model set, then generate, vary, blend, edit and nudge.

The engine never prints and never exits: it returns images with the recipes that reproduce them,
raises `UnclipError`s for the CLI to report, and reports progress through a callback.

Stages, as in the paper (§2) and as visible blocks below:
  text -> CLIP text encoder -> z_t, token states -> prior -> z_i -> decoder -> 32 px -> upsampler(s)
Manipulations (§3) use the bipartite latent (z_i, x_T): z_i from the CLIP image encoder, x_T from DDIM
inversion of the decoder.

Every image has its own seed and its own noise generator, so an image reproduces alone (n = 1 with
its seed) whatever the batch it was made in.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import unclip_cli
from unclip_cli.diffusion.gaussian import make_denoiser
from unclip_cli.diffusion.guidance import guided
from unclip_cli.diffusion.samplers import SAMPLERS, ddim_invert, sample_ddim, slerp
from unclip_cli.diffusion.schedule import spaced_timesteps
from unclip_cli.errors import InputError, UnclipError
from unclip_cli.models.prior import pick_closest
from unclip_cli.modelset import ModelSet, load_model_set

Progress = Callable[[str, int, int], None] | None


@dataclass(frozen=True)
class Steps:
    """The sampling work per stage: each sampler's steps, and how many decoder samples text-to-image
    and edit draw per image (the one whose CLIP embedding is closest to the prior's z_i is kept)."""

    prior: int
    decoder: int
    upsampler: int
    decoder_candidates: int = 1  # 1 in recipes written before it existed, so they reproduce exactly


QUALITY = {
    "fast": Steps(prior=8, decoder=10, upsampler=3, decoder_candidates=1),
    "default": Steps(prior=16, decoder=20, upsampler=4, decoder_candidates=3),
    "best": Steps(prior=32, decoder=50, upsampler=8, decoder_candidates=4),
}
MAX_DECODER_CANDIDATES = 16
# Blends decode through the DDIM inversion of both end images, whose error grows with the step size: at
# the presets' decoder steps the end frames drift from their images and mid frames wobble. On 12
# training-split pairs × 8 frames at default quality, twice the steps raised the share of frame steps
# moving toward B from 0.905 to 0.964 and the end frames' cosine to their images from 0.92 / 0.95 to
# 0.95 / 0.98 (evaluate.blend_progress; the held-out pairs of `unclip eval` were not used to choose).
BLEND_DECODER_STEP_FACTOR = 2


def quality_steps(quality: str, op: str = "generate") -> Steps:
    """The sampler steps of a --quality preset for an operation (blends take more decoder steps)."""
    steps = QUALITY[quality]
    if op == "blend":
        steps = dataclasses.replace(steps, decoder=steps.decoder * BLEND_DECODER_STEP_FACTOR)
    return steps
# The upsampler starts from the upsampled low-resolution image noised to this timestep, not from pure
# noise: the low-res image already fixes the content, so only the detail needs sampling. Measured on the
# emoji upsampler (128 px, DDIM): starting at t=999 with 8 steps gave MSE 0.52 to the real image
# (textured backgrounds); starting at 400 with 4 steps gave 0.032, below the 0.047 of the bilinear input.
UPSAMPLER_T_START = 400
# Decoding from noise (generate, edit) starts at t = 800 (SNR 0.10) from the training images' mean
# noised to that level, not from pure noise at t = 999. Where SNR is ~0 an eps-predicting network says
# nothing about x_start (its estimate there is the eps error times 1/alpha, ~600x at t = 999; Lin et al.
# 2024, "Common diffusion noise schedules and sample steps are flawed", §3), so the first strided step
# committed every image to clamped noise: colour blobs. Measured on the emoji decoder, 50 held-out z_i,
# 10 DDPM steps, guidance 3: CLIP cosine of the decoded image to its z_i 0.52 from t = 999, 0.58 from
# t = 800 with zeros, 0.80 from t = 800 with the mean image.
DECODER_T_START = 800
# Decoding from noise samples ancestrally (DDPM on strided steps, as karlo does): with the same start
# it scored at or above DDIM and DPM-Solver++(2M) at 10 and 20 steps. Operations that start from
# DDIM-inverted noise keep DDIM over the full schedule.
DECODER_SAMPLER = "ddpm"
DEFAULT_GUIDANCE = 3.0  # decoder; the paper shows 1.0-4.0 (Fig. 9)
DEFAULT_PRIOR_GUIDANCE = 1.5  # "we found that guiding the prior hurt results" at large scales; karlo uses 4.0
PRIOR_CANDIDATES = 2  # §2.2: sample two z_i, keep the one closer to z_t
PRIOR_CLIP = 10.0  # clamp of the standardised x_start prediction, as karlo does
MAX_N = 64


@dataclass
class Result:
    images: list[Image.Image]
    recipes: list[dict]
    warnings: list[str] = field(default_factory=list)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but no CUDA GPU is available", hint="use --device cpu or auto")
    if device == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise InputError("--device mps was asked for, but MPS is not available", hint="use --device cpu or auto")
    if device not in ("cpu", "cuda", "mps"):
        raise InputError(f"unknown device {device!r}", hint="use auto, cpu, cuda or mps")
    return torch.device(device)


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


def noised_mean(diffusion, mean: list | None, eps: torch.Tensor, known: torch.Tensor | None = None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
    """q_sample at DECODER_T_START of the decoder's training mean image (nested lists (3, m, m), resized to
    eps' size; None, as in untrained sets: zeros), with `keep` * `known` pixels in its place when inpainting."""
    s = eps.shape[-1]
    mean = torch.zeros(1, 3, s, s) if mean is None else F.interpolate(torch.tensor(mean)[None], size=(s, s), mode="bilinear", align_corners=False)
    x_start = mean.to(eps) if known is None else keep * known + (1 - keep) * mean.to(eps)
    return diffusion.q_sample(x_start.expand_as(eps), torch.full((eps.shape[0],), DECODER_T_START), eps)


class Engine:
    def __init__(self, models: ModelSet, device: torch.device, dtype: torch.dtype):
        self.models = models
        self.device = device
        self.dtype = dtype

    @classmethod
    def load(cls, weights: str | Path, device: str = "auto") -> "Engine":
        dev = pick_device(device)
        # fp32 on CPU (fp16 there is slow and lossy); half precision on accelerators.
        dtype = torch.float16 if dev.type in ("cuda", "mps") else torch.float32
        return cls(load_model_set(weights, device=dev, dtype=dtype), dev, dtype)

    # -- facts ---------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.models.name

    @property
    def image_size(self) -> int:
        return self.models.image_size

    @property
    def base_size(self) -> int:
        return self.models.base_size

    def info(self) -> dict:
        m = self.models
        stages = {"clip": m.clip, "prior": m.prior, "decoder": m.decoder}
        stages.update({f"upsampler{i + 1 if i else ''}": s for i, s in enumerate(m.upsamplers)})
        return {
            "name": m.name,
            "path": str(m.root),
            "model_hash": m.model_hash,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "base_size": m.base_size,
            "image_size": m.image_size,
            "stages": {
                k: {
                    "file": s.path.name,
                    "parameters": sum(p.numel() for p in s.model.parameters()),
                    "config": dataclasses.asdict(s.model.cfg),
                    "diffusion": dataclasses.asdict(s.diffusion.cfg) if s.diffusion else None,
                    "extra": s.extra,
                }
                for k, s in stages.items()
            },
            "card": m.card,
            "version": unclip_cli.__version__,
        }

    # -- shared pieces -------------------------------------------------------------------------------
    def _settings(self, quality, steps, guidance, prior_guidance, op: str = "generate") -> tuple[Steps, float, float]:
        if steps is None:
            if quality not in QUALITY:
                raise InputError(f"unknown quality {quality!r}", hint=f"choose from {', '.join(QUALITY)}")
            steps = quality_steps(quality, op)
        for name, v in dataclasses.asdict(steps).items():
            if name == "decoder_candidates":
                if not 1 <= v <= MAX_DECODER_CANDIDATES:
                    raise InputError(f"decoder candidates must be between 1 and {MAX_DECODER_CANDIDATES}, got {v}")
            elif not 1 <= v <= 1000:
                raise InputError(f"{name} steps must be between 1 and 1000, got {v}")
        guidance = DEFAULT_GUIDANCE if guidance is None else float(guidance)
        prior_guidance = DEFAULT_PRIOR_GUIDANCE if prior_guidance is None else float(prior_guidance)
        if not (0 <= guidance <= 30 and 0 <= prior_guidance <= 30):
            raise InputError("guidance scales must be between 0 and 30")
        return steps, guidance, prior_guidance

    def _recipe(self, op: str, seed: int, steps: Steps, guidance: float, prior_guidance: float, quality: str, **kw) -> dict:
        return {
            "op": op, "seed": seed, "steps": dataclasses.asdict(steps), "quality": quality,
            "guidance": guidance, "prior_guidance": prior_guidance,
            "sampler": {"prior": "dpmpp_2m", "decoder": DECODER_SAMPLER if op in ("generate", "edit") else "ddim",
                        "upsampler": f"ddim from t={UPSAMPLER_T_START}"},
            "model": self.name, "model_hash": self.models.model_hash, "version": unclip_cli.__version__,
            "size": [self.image_size, self.image_size],
            **kw,
        }

    @staticmethod
    def _check_n(n: int) -> None:
        if not 1 <= n <= MAX_N:
            raise InputError(f"-n must be between 1 and {MAX_N}, got {n}")

    @staticmethod
    def _chunks(n: int, batch_size: int | None):
        bs = max(1, min(batch_size or 8, n))
        for start in range(0, n, bs):
            yield range(start, min(n, start + bs))

    def _model_fn(self, model, **cond):
        """Wrap a network so that it runs in the model's dtype and returns float32."""

        def fn(x, t, **kw):
            return model(x.to(self.dtype), t, **{**cond, **kw}).float()

        return fn

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
        """-> z_t (B, D), token states (B, L, W), mask (B, L), warnings."""
        for p in prompts:
            if not p or not p.strip():
                raise InputError("the prompt is empty", hint='describe what to draw, e.g. "cat face"')
        clip = self.models.clip.model
        tokens, truncated = clip.tokenize(prompts)
        warnings = []
        if any(truncated):
            warnings.append(f"prompt truncated to {clip.cfg.context_length - 2} tokens")
        z_t, states, mask = clip.encode_text(tokens.to(self.device))
        return z_t.float(), states, mask, warnings

    @torch.no_grad()
    def encode_image(self, img: Image.Image) -> torch.Tensor:
        x = to_tensor(img, self.models.clip.model.cfg.image_size)[None].to(self.device, self.dtype)
        return self.models.clip.model.encode_image(x).float()  # (1, D)

    def _text_dropped(self, B: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states and an all-False mask: 'no caption', as the decoder saw 50% of the time in training."""
        cfg = self.models.clip.model.cfg
        states = torch.zeros(B, cfg.context_length, cfg.text_width, device=self.device, dtype=self.dtype)
        return states, torch.zeros(B, cfg.context_length, dtype=torch.bool, device=self.device)

    # -- stage: prior (§2.2) ---------------------------------------------------------------------------
    @torch.no_grad()
    def run_prior(self, z_t, states, mask, noise: Noise, steps: int, scale: float, callback: Progress = None) -> torch.Tensor:
        """Text -> z_i (B, D) unit-norm, choosing the better of two candidates per image."""
        stage = self.models.prior
        prior, K = stage.model, PRIOR_CANDIDATES
        B, D = z_t.shape
        rep = lambda v: v.repeat_interleave(K, dim=0)  # noqa: E731  (B, ...) -> (B*K, ...)
        net = self._model_fn(prior, z_t=rep(z_t).to(self.dtype), text_states=rep(states), text_mask=rep(mask))

        def model_fn(x, t, keep):
            reps = x.shape[0] // (B * K)
            return net(x, t, z_t=rep(z_t).to(self.dtype).repeat(reps, 1), text_states=rep(states).repeat(reps, 1, 1),
                       text_mask=rep(mask).repeat(reps, 1), text_keep=keep)

        denoise = make_denoiser(stage.diffusion, guided(model_fn, scale), clip_x_start=PRIOR_CLIP)
        x = noise(K, D).view(B * K, D)
        ts = spaced_timesteps(stage.diffusion.num_timesteps, steps)
        x = SAMPLERS["dpmpp_2m"](denoise, x, ts, stage.diffusion, callback=callback and (lambda i, n: callback("prior", i, n)))
        z = F.normalize(prior.destandardize(x.to(self.dtype)).float(), dim=-1).view(B, K, D)
        return pick_closest(z, z_t)

    # -- stage: decoder (§2.1) -------------------------------------------------------------------------
    def _decoder_denoiser(self, z_i, states, mask, scale: float, known: torch.Tensor | None = None, keep: torch.Tensor | None = None):
        stage = self.models.decoder
        B = z_i.shape[0]
        extra = None
        if stage.model.cfg.extra_channels:
            extra = torch.zeros(B, stage.model.cfg.extra_channels, self.base_size, self.base_size, device=self.device)
            if known is not None:
                extra = torch.cat([known * keep, keep], dim=1)  # GLIDE §4.3: masked image + mask
        net = self._model_fn(stage.model)

        def model_fn(x, t, keep_cond):
            reps = x.shape[0] // B
            return net(x, t, extra=None if extra is None else extra.repeat(reps, 1, 1, 1).to(self.dtype),
                       z_i=z_i.repeat(reps, 1).to(self.dtype), z_keep=keep_cond,
                       text_states=states.repeat(reps, 1, 1), text_mask=mask.repeat(reps, 1) & keep_cond[:, None])

        denoise = make_denoiser(stage.diffusion, guided(model_fn, scale), clip_x_start=1.0)
        if known is None:
            return denoise

        def inpaint(x_t, t):
            # Besides the inpainting channels, keep the known pixels in every x_start prediction (as
            # GLIDE's inpainting notebook does), so unmasked areas stay fixed throughout sampling.
            x_start, _ = denoise(x_t, t)
            x_start = keep * known + (1 - keep) * x_start
            return x_start, stage.diffusion.eps_from_x_start(x_t, t, x_start)

        return inpaint

    def decoder_start(self, noise: Noise, known: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x at DECODER_T_START: the training mean image (its known pixels when inpainting), noised. (B, 3, s, s)"""
        stage = self.models.decoder
        return noised_mean(stage.diffusion, stage.extra.get("x_start_mean"), noise(3, self.base_size, self.base_size), known, keep)

    def run_decoder(self, denoise, x_T, steps: int, sampler: str = DECODER_SAMPLER, eta: float = 1.0, noise: Noise | None = None,
                    start: int | None = None, callback: Progress = None):
        """Sample base images from x_T at timestep `start` (default T - 1) down to 0."""
        stage = self.models.decoder
        ts = spaced_timesteps(stage.diffusion.num_timesteps, steps, start=start)
        randn = (lambda: noise(3, self.base_size, self.base_size)) if noise else None
        return SAMPLERS[sampler](denoise, x_T, ts, stage.diffusion, randn=randn, eta=eta,
                                 callback=callback and (lambda i, n: callback("decoder", i, n)))

    @torch.no_grad()
    def decode_from_noise(self, z_i, states, mask, noise: Noise, steps: Steps, guidance: float, known: torch.Tensor | None = None,
                          keep: torch.Tensor | None = None, callback: Progress = None) -> torch.Tensor:
        """Text-to-image and edit decoding: base images (B, 3, s, s) for z_i (B, D), sampled ancestrally from
        the noised mean at DECODER_T_START. With steps.decoder_candidates = K > 1, K samples per image are
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
        denoise = self._decoder_denoiser(rep(z_i), rep(states), rep(mask), guidance, known=rep(known), keep=rep(keep))
        x = self.run_decoder(denoise, self.decoder_start(flat, rep(known), rep(keep)), steps.decoder, noise=flat,
                             start=DECODER_T_START, callback=callback)
        if K == 1:
            return x
        clip = self.models.clip.model
        size = clip.cfg.image_size
        x_clip = x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        emb = F.normalize(clip.encode_image(x_clip.clamp(-1, 1).to(self.dtype)).float(), dim=-1).view(B, K, -1)
        best = (emb * F.normalize(z_i.float(), dim=-1)[:, None]).sum(-1).argmax(1)  # (B,)
        return x.view(B, K, *x.shape[1:])[torch.arange(B, device=x.device), best]

    def invert(self, denoise, x_start, steps: int, callback: Progress = None) -> torch.Tensor:
        """DDIM inversion of base-resolution images: (B, 3, s, s) -> x_T (§3)."""
        stage = self.models.decoder
        ts = spaced_timesteps(stage.diffusion.num_timesteps, steps)
        return ddim_invert(denoise, x_start, ts, stage.diffusion, callback=callback and (lambda i, n: callback("invert", i, n)))

    # -- stage: upsamplers (§2.1) ----------------------------------------------------------------------
    @torch.no_grad()
    def run_upsamplers(self, x, noise: Noise, steps: int, known: torch.Tensor | None = None, keep_full: torch.Tensor | None = None, callback: Progress = None):
        """Base images (B, 3, s, s) -> final images, each stage a DDIM run conditioned on the bilinearly
        upsampled previous image. With `known`, unmasked pixels are kept at every resolution."""
        for k, stage in enumerate(self.models.upsamplers):
            size = x.shape[-1] * stage.extra["scale"]
            low = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(-1, 1)
            net = self._model_fn(stage.model, extra=low.to(self.dtype))
            denoise = make_denoiser(stage.diffusion, net, clip_x_start=1.0)
            if known is not None:
                k_img = F.interpolate(known, size=(size, size), mode="area")
                k_keep = (F.interpolate(keep_full, size=(size, size), mode="area") > 0.999).float()
                base = denoise

                def denoise(x_t, t, base=base, k_img=k_img, k_keep=k_keep, diffusion=stage.diffusion):
                    x_start, _ = base(x_t, t)
                    x_start = k_keep * k_img + (1 - k_keep) * x_start
                    return x_start, diffusion.eps_from_x_start(x_t, t, x_start)

            ts = spaced_timesteps(stage.diffusion.num_timesteps, steps, start=UPSAMPLER_T_START)
            x_start = stage.diffusion.q_sample(low, torch.full((low.shape[0],), ts[0]), noise(3, size, size))
            name = "upsampler" if len(self.models.upsamplers) == 1 else f"upsampler {k + 1}"
            x = sample_ddim(denoise, x_start, ts, stage.diffusion,
                            callback=callback and (lambda i, n, name=name: callback(name, i, n)))
        return x

    def _finish(self, x: torch.Tensor) -> list[Image.Image]:
        if not torch.isfinite(x).all():
            raise UnclipError(
                "the model produced NaN or inf values",
                hint="try --device cpu (full precision), fewer guidance, or check the weights with `unclip info`",
            )
        return [to_pil(img) for img in x]

    # -- operations ------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt: str, n: int = 1, *, seed: int = 0, quality: str = "default", steps: Steps | None = None,
                 guidance: float | None = None, prior_guidance: float | None = None, batch_size: int | None = None,
                 callback: Progress = None) -> Result:
        """Text to image: CLIP text encoder -> prior -> decoder -> upsampler(s)."""
        self._check_n(n)
        steps, guidance, prior_guidance = self._settings(quality, steps, guidance, prior_guidance)
        z_t, states, mask, warnings = self.encode_text([prompt])
        images, recipes = [], []
        for idx in self._chunks(n, batch_size):
            B = len(idx)
            seeds = [seed + i for i in idx]
            noise = Noise(seeds, self.device)
            zt, st, mk = z_t.expand(B, -1), states.expand(B, -1, -1), mask.expand(B, -1)
            z_i = self.run_prior(zt, st, mk, noise, steps.prior, prior_guidance, callback)
            x = self.decode_from_noise(z_i, st, mk, noise, steps, guidance, callback=callback)
            x = self.run_upsamplers(x, noise, steps.upsampler, callback=callback)
            images += self._finish(x)
            recipes += [self._recipe("generate", s, steps, guidance, prior_guidance, quality, prompt=prompt) for s in seeds]
        return Result(images, recipes, warnings)

    @torch.no_grad()
    def vary(self, image: Image.Image, n: int = 1, strength: float = 0.5, *, seed: int = 0, quality: str = "default",
             steps: Steps | None = None, guidance: float | None = None, prior_guidance: float | None = None,
             batch_size: int | None = None, callback: Progress = None) -> Result:
        """Variations (§3): decode (z_i, x_T) with DDIM eta = strength, x_T from DDIM inversion of the image.
        strength 0 reconstructs the input; 1 starts from fresh noise and keeps only z_i."""
        self._check_n(n)
        if not 0 <= strength <= 1:
            raise InputError(f"--strength must be between 0 and 1, got {strength}")
        steps, guidance, prior_guidance = self._settings(quality, steps, guidance, prior_guidance)
        img = square(image.convert("RGB"))
        z_i = self.encode_image(img)
        x0 = to_tensor(img, self.base_size)[None].to(self.device)
        states, mask = self._text_dropped(1)
        x_T = None
        if strength < 1:
            x_T = self.invert(self._decoder_denoiser(z_i, states, mask, guidance), x0, steps.decoder, callback)
        images, recipes = [], []
        for idx in self._chunks(n, batch_size):
            B = len(idx)
            seeds = [seed + i for i in idx]
            noise = Noise(seeds, self.device)
            st, mk = self._text_dropped(B)
            denoise = self._decoder_denoiser(z_i.expand(B, -1), st, mk, guidance)
            if x_T is None:  # fresh noise: as text-to-image decoding starts
                x_init, t_init = self.decoder_start(noise), DECODER_T_START
            else:
                x_init, t_init = x_T.expand(B, -1, -1, -1), None
            x = self.run_decoder(denoise, x_init, steps.decoder, sampler="ddim", eta=strength, noise=noise, start=t_init, callback=callback)
            x = self.run_upsamplers(x, noise, steps.upsampler, callback=callback)
            images += self._finish(x)
            recipes += [self._recipe("vary", s, steps, guidance, prior_guidance, quality, strength=strength) for s in seeds]
        return Result(images, recipes, [])

    @torch.no_grad()
    def blend(self, image_a: Image.Image, image_b: Image.Image, frames: int = 5, *, seed: int = 0, quality: str = "default",
              steps: Steps | None = None, guidance: float | None = None, prior_guidance: float | None = None,
              batch_size: int | None = None, callback: Progress = None) -> Result:
        """Interpolation (§3): slerp the two images' z_i, and their DDIM-inverted x_T, so the end frames
        reconstruct the inputs. All frames share one seed for the upsampler, so they differ only by blend."""
        if not 2 <= frames <= MAX_N:
            raise InputError(f"--steps (frames) must be between 2 and {MAX_N}, got {frames}")
        steps, guidance, prior_guidance = self._settings(quality, steps, guidance, prior_guidance, op="blend")
        ends = []
        for img in (image_a, image_b):
            img = square(img.convert("RGB"))
            z = self.encode_image(img)
            st, mk = self._text_dropped(1)
            x0 = to_tensor(img, self.base_size)[None].to(self.device)
            ends.append((z, self.invert(self._decoder_denoiser(z, st, mk, guidance), x0, steps.decoder, callback)))
        (z_a, x_a), (z_b, x_b) = ends
        thetas = [i / (frames - 1) for i in range(frames)]
        images, recipes = [], []
        for idx in self._chunks(frames, batch_size):
            B = len(idx)
            z = torch.cat([slerp(z_a, z_b, thetas[i]) for i in idx])  # (B, D), unit norm
            x_T = torch.cat([slerp(x_a.flatten(1), x_b.flatten(1), thetas[i]).view_as(x_a) for i in idx])
            st, mk = self._text_dropped(B)
            x = self.run_decoder(self._decoder_denoiser(z, st, mk, guidance), x_T, steps.decoder, sampler="ddim", eta=0.0, callback=callback)
            x = self.run_upsamplers(x, Noise([seed] * B, self.device), steps.upsampler, callback=callback)
            images += self._finish(x)
            recipes += [self._recipe("blend", seed, steps, guidance, prior_guidance, quality, frame=i, frames=frames, theta=thetas[i]) for i in idx]
        return Result(images, recipes, [])

    @torch.no_grad()
    def nudge(self, image: Image.Image, to_text: str, from_text: str = "", amount: float = 0.3, n: int = 1, *, seed: int = 0,
              quality: str = "default", steps: Steps | None = None, guidance: float | None = None,
              prior_guidance: float | None = None, batch_size: int | None = None, callback: Progress = None) -> Result:
        """Text diffs (§3): z = slerp(z_i, normalize(z_t(to) - z_t(from)), theta), decoded from the image's
        DDIM-inverted x_T. The n images step theta evenly up to `amount`."""
        self._check_n(n)
        if not 0 < amount <= 1:
            raise InputError(f"--amount must be in (0, 1], got {amount}", hint="the paper uses 0.25 to 0.5")
        steps, guidance, prior_guidance = self._settings(quality, steps, guidance, prior_guidance)
        if not to_text or not to_text.strip():
            raise InputError("--to text is empty", hint='say what the image should become, e.g. --to "smiling"')
        texts = [to_text, from_text if from_text.strip() else ""]
        # An empty "from" caption: the paper notes that "a photo" or no caption also works as the origin.
        z_to, _, _, warnings = self.encode_text([texts[0]])
        z_from = self.models.clip.model.encode_text(self.models.clip.model.tokenize([texts[1]])[0].to(self.device))[0].float()
        if (z_to - z_from).norm() < 1e-6:
            raise InputError("--to and --from have the same CLIP embedding, so there is no direction to move in",
                             hint="use texts that differ in meaning")
        z_d = F.normalize(z_to - z_from, dim=-1)
        img = square(image.convert("RGB"))
        z_i = self.encode_image(img)
        st1, mk1 = self._text_dropped(1)
        x0 = to_tensor(img, self.base_size)[None].to(self.device)
        x_T = self.invert(self._decoder_denoiser(z_i, st1, mk1, guidance), x0, steps.decoder, callback)
        amounts = [amount * (i + 1) / n for i in range(n)]
        images, recipes = [], []
        for idx in self._chunks(n, batch_size):
            B = len(idx)
            seeds = [seed + i for i in idx]
            z = torch.cat([slerp(z_i, z_d, amounts[i]) for i in idx])
            st, mk = self._text_dropped(B)
            x = self.run_decoder(self._decoder_denoiser(z, st, mk, guidance), x_T.expand(B, -1, -1, -1), steps.decoder, sampler="ddim", eta=0.0, callback=callback)
            x = self.run_upsamplers(x, Noise(seeds, self.device), steps.upsampler, callback=callback)
            images += self._finish(x)
            recipes += [self._recipe("nudge", s, steps, guidance, prior_guidance, quality, to=to_text, **{"from": from_text}, amount=amounts[i]) for s, i in zip(seeds, idx)]
        return Result(images, recipes, warnings)

    @torch.no_grad()
    def edit(self, image: Image.Image, mask: Image.Image, prompt: str, n: int = 1, *, seed: int = 0, quality: str = "default",
             steps: Steps | None = None, guidance: float | None = None, prior_guidance: float | None = None,
             batch_size: int | None = None, callback: Progress = None) -> Result:
        """Masked editing: prompt -> prior -> z_i -> decoder with inpainting conditioning (GLIDE §4.3).
        `mask` is mode L at the image's size, 255 = repaint. The result has the input's size, and every
        unmasked pixel is copied from the input, so none of them changes."""
        self._check_n(n)
        steps, guidance, prior_guidance = self._settings(quality, steps, guidance, prior_guidance)
        image = image.convert("RGB")
        if mask.size != image.size:
            raise InputError(f"mask size {mask.size} differs from image size {image.size}")
        m = np.asarray(mask.convert("L")) >= 128  # (H, W) True = repaint
        if not m.any():
            raise InputError("the mask is empty: nothing to repaint", hint="paint the area to change white (or transparent)")
        if m.all():
            raise InputError("the mask covers the whole image", hint="use `unclip generate` to make a new image")
        z_t, states, tmask, warnings = self.encode_text([prompt])
        sq_img, sq_mask = square(image), square(Image.fromarray(m.astype(np.uint8) * 255, "L"))
        S = self.image_size
        known_full = to_tensor(sq_img, S)[None].to(self.device)  # (1, 3, S, S)
        repaint_full = torch.from_numpy(np.asarray(sq_mask.resize((S, S), Image.Resampling.BILINEAR), dtype=np.float32) / 255)
        keep_full = (repaint_full == 0).float()[None, None].to(self.device)  # 1 = known at full size
        known = F.interpolate(known_full, size=(self.base_size,) * 2, mode="area")
        keep = (F.interpolate(keep_full, size=(self.base_size,) * 2, mode="area") > 0.999).float()  # known only if fully unmasked
        images, recipes = [], []
        for idx in self._chunks(n, batch_size):
            B = len(idx)
            seeds = [seed + i for i in idx]
            noise = Noise(seeds, self.device)
            zt, st, mk = z_t.expand(B, -1), states.expand(B, -1, -1), tmask.expand(B, -1)
            z_i = self.run_prior(zt, st, mk, noise, steps.prior, prior_guidance, callback)
            x = self.decode_from_noise(z_i, st, mk, noise, steps, guidance, known=known.expand(B, -1, -1, -1),
                                       keep=keep.expand(B, -1, -1, -1), callback=callback)
            x = self.run_upsamplers(x, noise, steps.upsampler, known=known_full.expand(B, -1, -1, -1), keep_full=keep_full.expand(B, -1, -1, -1), callback=callback)
            for out in self._finish(x):
                images.append(self._paste_back(out, image, m))
            recipes += [self._recipe("edit", s, steps, guidance, prior_guidance, quality, prompt=prompt, size=list(image.size)) for s in seeds]
        return Result(images, recipes, warnings)

    @staticmethod
    def _paste_back(generated: Image.Image, original: Image.Image, repaint: np.ndarray) -> Image.Image:
        """Map a square result back onto the original canvas; take only masked pixels from it."""
        w, h = original.size
        side = max(w, h)
        gen = np.asarray(generated.resize((side, side), Image.Resampling.LANCZOS))
        left, top = (side - w) // 2, (side - h) // 2
        gen = gen[top : top + h, left : left + w]
        out = np.where(repaint[..., None], gen, np.asarray(original))
        return Image.fromarray(out.astype(np.uint8), "RGB")
