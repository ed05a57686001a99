"""Sampling policy shared by inference and training previews: where sampling starts, from what, and the
guided decoder denoiser. The engine and the trainer's sample grids both import it, so a preview shows
exactly what `unclip generate` would draw.

The constants below are the emoji set's policy, measured on it; they are the defaults of
`diffusion.recipe.SamplingRecipe`, which a model set may override (a converted Karlo set does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unclip_cli.diffusion.gaussian import Denoiser, GaussianDiffusion, make_denoiser
from unclip_cli.diffusion.guidance import guided
from unclip_cli.diffusion.samplers import slerp

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


def noised_mean(diffusion: GaussianDiffusion, mean: list | None, eps: torch.Tensor, known: torch.Tensor | None = None,
                keep: torch.Tensor | None = None, t_start: int = DECODER_T_START) -> torch.Tensor:
    """q_sample at `t_start` of the decoder's training mean image (nested lists (3, m, m), resized to
    eps' size; None, as in untrained sets: zeros), with `keep` * `known` pixels in its place when inpainting."""
    mean = mean_image(mean, eps)
    x_start = mean if known is None else keep * known + (1 - keep) * mean
    return diffusion.q_sample(x_start.expand_as(eps), torch.full((eps.shape[0],), t_start), eps)


def mean_image(mean: list | None, like: torch.Tensor) -> torch.Tensor:
    """The decoder's training mean image (nested lists (3, m, m); None: zeros, as many channels as `like`, a latent
    decoder's too) at `like`'s side. (1, C, s, s)"""
    s = like.shape[-1]
    if mean is None:
        return torch.zeros(1, like.shape[1], s, s).to(like)
    return F.interpolate(torch.tensor(mean)[None], size=(s, s), mode="bilinear", align_corners=False).to(like)


def toward_fresh(diffusion: GaussianDiffusion, mean: list | None, x_t: torch.Tensor, eps: torch.Tensor, t: int,
                 theta: float) -> torch.Tensor:
    """An image's DDIM-inverted x_t at the decoder's start `t`, written as the noised mean image (`noised_mean`) plus
    its own noise, with that noise turned toward fresh `eps` by `theta` (slerp, so it stays noise-sized): theta 0 is
    x_t itself (the image reconstructs), 1 the start text-to-image decoding takes (only z_i kept). (B, C, s, s)"""
    if theta <= 0:
        return x_t
    a = diffusion.abar(t, x_t)
    own = (x_t - a.sqrt() * mean_image(mean, x_t)) / (1 - a).sqrt()
    return noised_mean(diffusion, mean, slerp(own.flatten(1), eps.flatten(1), theta).view_as(x_t), t_start=t)


def where_kept(keep: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows of `a` where keep (B,) is True, else of `b` (broadcast over the batch)."""
    return torch.where(keep.view(-1, *([1] * (a.dim() - 1))), a, b.to(a.dtype))


def decoder_denoiser(diffusion: GaussianDiffusion, net, z_i: torch.Tensor, states: torch.Tensor, mask: torch.Tensor,
                     scale: float, known: torch.Tensor | None = None, keep: torch.Tensor | None = None, *,
                     z_t: torch.Tensor | None = None, uncond: tuple | None = None, clamp: float = 1.0) -> Denoiser:
    """The decoder's guided denoiser for z_i (B, D), token states (B, L, W) and mask (B, L).

    `net(x, t, cond=, z_i=, z_keep=, text_states=, text_mask=)` is the decoder call (returning float).
    Guidance drops z_i (learned null) and the caption together, as the decoder was trained to see both
    missing. With `known` (B, 3, s, s) and `keep` (B, 1, s, s; 1 = known), the inpainting channels carry
    the masked image and the mask (GLIDE §4.3), and every x_start prediction keeps the known pixels (as
    GLIDE's inpainting notebook does), so unmasked areas stay fixed throughout sampling.

    Karlo's decoder (`uncond` = the encoded empty caption (z_t (1, D), states (1, L, W), mask (1, L))) also
    reads the caption's CLIP text embedding `z_t` (B, D), and its unconditional branch is the learned null
    z_i with the empty caption instead of a dropped one. A network with learned variance is guided on its
    noise channels only."""
    B = z_i.shape[0]
    cond = None if known is None else torch.cat([known * keep, keep], dim=1)

    def model_fn(x, t, keep_cond):
        reps = x.shape[0] // B
        if uncond is None:
            return net(x, t, cond=None if cond is None else cond.repeat(reps, 1, 1, 1), z_i=z_i.repeat(reps, 1),
                       z_keep=keep_cond, text_states=states.repeat(reps, 1, 1), text_mask=mask.repeat(reps, 1) & keep_cond[:, None])
        u_z, u_states, u_mask = uncond
        return net(x, t, cond=None if cond is None else cond.repeat(reps, 1, 1, 1), z_i=z_i.repeat(reps, 1), z_keep=keep_cond,
                   text_states=where_kept(keep_cond, states.repeat(reps, 1, 1), u_states),
                   text_mask=where_kept(keep_cond, mask.repeat(reps, 1), u_mask), z_t=where_kept(keep_cond, z_t.repeat(reps, 1), u_z))

    channels = None
    if diffusion.cfg.variance == "learned_range":
        channels = 3  # the noise; the variance channels follow it
    denoise = make_denoiser(diffusion, guided(model_fn, scale, channels=channels), clip_x_start=clamp)
    if known is None:
        return denoise

    def inpaint(x_t, t):
        x_start = denoise(x_t, t)[0]
        x_start = keep * known + (1 - keep) * x_start
        return x_start, diffusion.eps_from_x_start(x_t, t, x_start)

    return inpaint


_AUGMENT: GaussianDiffusion | None = None


def noise_augment(z_i: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, level: int, eps: torch.Tensor) -> torch.Tensor:
    """Stable unCLIP's conditioning (its CLIPEmbeddingNoiseAugmentation): z_i (B, D) standardised with the training
    embeddings' mean and std, noised to `level` (0-999) on the cosine schedule (squaredcos_cap_v2, float32 values as
    diffusers' DDPMScheduler holds them) with `eps`, unstandardised, and the sinusoidal embedding of the level
    appended: (B, 2D). Higher levels keep less of the image, so the decoder varies more."""
    global _AUGMENT
    if _AUGMENT is None:
        from unclip_cli.diffusion.gaussian import DiffusionConfig

        _AUGMENT = GaussianDiffusion(DiffusionConfig(schedule="cosine", schedule_dtype="float32"))
    from unclip_cli.models.layers import timestep_embedding

    a = _AUGMENT.alphas_cumprod.to(z_i)[level]
    z = (z_i - mean) * 1.0 / std
    z = (a**0.5 * z + (1 - a) ** 0.5 * eps) * std + mean
    levels = torch.full((z_i.shape[0],), level, device=z_i.device)
    return torch.cat([z, timestep_embedding(levels, z_i.shape[-1]).to(z)], dim=1)


def fused_denoiser(diffusion: GaussianDiffusion, paths) -> Denoiser:
    """Region fusion (MultiDiffusion, Bar-Tal et al. 2023; composable diffusion, Liu et al. 2022): every path
    (a denoiser, and `weight(t)` -> (B or 1, 1, s, s)) predicts x_start for the whole canvas from the same x_t,
    and the fused x_start is their average weighted pixel by pixel; eps follows from it. A path may return
    x_start only (a fixed background). Learned variances are fused the same way where every path has one."""

    def denoise(x_t, t):
        outs = [d(x_t, t) for d, _ in paths]
        ws = [w(t) for _, w in paths]
        total = sum(ws).clamp(min=1e-8)
        x_start = sum(w * o[0] for w, o in zip(ws, outs)) / total
        eps = diffusion.eps_from_x_start(x_t, t, x_start)
        if all(len(o) > 2 for o in outs):
            return x_start, eps, sum(w * o[2] for w, o in zip(ws, outs)) / total
        return x_start, eps

    return denoise
