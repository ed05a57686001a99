"""Samplers: plain functions with one signature.

    sample_x(denoise, x, timesteps, diffusion, *, randn=None, eta=..., callback=None) -> x_start

`denoise(x_t, t) -> (pred_x_start, pred_eps[, v])` (see `gaussian.make_denoiser`; guidance and clamping
live there; v, the learned variance interpolation, only for learned-range diffusions), `x` is the starting noise at `timesteps[0]`, `timesteps` a descending list of the
original training timesteps (respacing is only the choice of this list), `randn()` draws fresh noise
shaped like x (from per-image generators, so an image does not depend on its batch), and
`callback(i, total)` reports progress.
"""

from __future__ import annotations

from typing import Callable

import torch

from unclip_cli.diffusion.gaussian import Denoiser, GaussianDiffusion

Callback = Callable[[int, int], None] | None


def _next(timesteps: list[int], i: int) -> int:
    return timesteps[i + 1] if i + 1 < len(timesteps) else -1  # -1: the clean image


@torch.no_grad()
def sample_ddpm(denoise: Denoiser, x, timesteps, diffusion: GaussianDiffusion, *, randn=None, eta=1.0, callback: Callback = None):
    """Ancestral sampling from the DDPM posterior q(x_s | x_t, x_start) (Ho et al. 2020), on respaced steps."""
    for i, t in enumerate(timesteps):
        s = _next(timesteps, i)
        x_start = denoise(x, t)[0]
        a_t, a_s = diffusion.abar(t, x), diffusion.abar(s, x)
        if s < 0:
            x = x_start
        else:
            beta = 1 - a_t / a_s
            mean = (a_s.sqrt() * beta / (1 - a_t)) * x_start + ((1 - beta).sqrt() * (1 - a_s) / (1 - a_t)) * x
            var = beta * (1 - a_s) / (1 - a_t)
            x = mean + var.sqrt() * randn()
        if callback:
            callback(i + 1, len(timesteps))
    return x


@torch.no_grad()
def sample_ddim(denoise: Denoiser, x, timesteps, diffusion: GaussianDiffusion, *, randn=None, eta=0.0, callback: Callback = None):
    """DDIM (Song et al. 2021, eq. 12): deterministic at eta = 0, DDPM-like at eta = 1."""
    for i, t in enumerate(timesteps):
        s = _next(timesteps, i)
        x_start, eps = denoise(x, t)[:2]
        a_t, a_s = diffusion.abar(t, x), diffusion.abar(s, x)
        sigma = eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)).sqrt()
        x = a_s.sqrt() * x_start + (1 - a_s - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and s >= 0:
            x = x + sigma * randn()
        if callback:
            callback(i + 1, len(timesteps))
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoise: Denoiser, x, timesteps, diffusion: GaussianDiffusion, *, randn=None, eta=0.0, callback: Callback = None):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): second-order multistep in log-SNR, data prediction."""

    def lam(a):  # log(alpha / sigma)
        return 0.5 * (torch.log(a) - torch.log1p(-a))

    prev_x_start, h_prev = None, None
    for i, t in enumerate(timesteps):
        s = _next(timesteps, i)
        x_start = denoise(x, t)[0]
        if s < 0:
            x = x_start
        else:
            a_t, a_s = diffusion.abar(t, x), diffusion.abar(s, x)
            h = lam(a_s) - lam(a_t)
            d = x_start
            if prev_x_start is not None:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x_start - (1 / (2 * r)) * prev_x_start
            x = ((1 - a_s) / (1 - a_t)).sqrt() * x - a_s.sqrt() * torch.expm1(-h) * d
            prev_x_start, h_prev = x_start, h
        if callback:
            callback(i + 1, len(timesteps))
    return x


def ancestral_step(denoise: Denoiser, x, t: int, s: int, diffusion: GaussianDiffusion, randn, ratio: bool = False):
    """One step t -> s (s = -1: the clean image) of Karlo's ancestral sampler: the DDPM posterior mean from
    the clamped x_start, plus noise of the fixed small variance (log-clamped at 1e-20) or, for a learned-range
    diffusion, of exp(v' log beta + (1 - v') log beta~) with v' = (v + 1) / 2 (Nichol & Dhariwal 2021, eq. 15).
    The coefficients are computed in the schedule's own dtype and order of operations, as diffusers'
    UnCLIPScheduler.step does, so a float32 schedule reproduces its numbers. No noise is added at t = 0."""
    out = denoise(x, t)
    x_start = out[0]
    a_t, a_s = diffusion.abar(t, x), diffusion.abar(s, x)
    if ratio:  # diffusers' DDPMScheduler's order: alpha = abar_t / abar_s first (float32 rounding differs)
        alpha = a_t / a_s
        beta = 1 - alpha
    else:
        beta = diffusion.beta(t, s, x)
        alpha = 1 - beta
    mean = (a_s**0.5 * beta) / (1 - a_t) * x_start + (alpha**0.5 * (1 - a_s)) / (1 - a_t) * x
    if t <= 0 or s < 0:
        # A step straight to the clean image (s = -1, a single-step run) has posterior variance 0: its log is -inf,
        # which the learned range turns into inf or NaN wherever v' >= 1 (diffusers adds exp(-inf) = 0 where finite).
        return mean
    var = (1 - a_s) / (1 - a_t) * beta
    if len(out) > 2:  # learned range
        frac = (out[2] + 1) / 2
        log_var = frac * torch.log(beta) + (1 - frac) * torch.log(var)
    else:
        log_var = torch.log(torch.clamp(var, min=1e-20))
    return mean + torch.exp(0.5 * log_var) * randn()


@torch.no_grad()
def sample_ancestral(denoise: Denoiser, x, timesteps, diffusion: GaussianDiffusion, *, randn=None, eta=1.0, callback: Callback = None):
    """Karlo's sampler (its p_sample on respaced steps; diffusers' UnCLIPScheduler): ancestral DDPM steps with
    fixed-small or learned-range variance. `eta` is not used."""
    for i, t in enumerate(timesteps):
        x = ancestral_step(denoise, x, t, _next(timesteps, i), diffusion, randn)
        if callback:
            callback(i + 1, len(timesteps))
    return x


@torch.no_grad()
def sample_repaint(denoise: Denoiser, x, timesteps, diffusion: GaussianDiffusion, *, known, keep, randn, resample: int = 1,
                   callback: Callback = None):
    """RePaint (Lugmayr et al. 2022): ancestral sampling where, after every step t -> s, the known region is
    replaced by the known image noised to s (exactly the known image at the end), so a model without
    inpainting channels fills only the unknown region. `keep` (B, 1, H, W) is 1 where `known` (B, C, H, W)
    holds. With `resample` r > 1, each step is taken r times, jumping back to t (by renoising s -> t)
    between tries, which harmonises the filled region with the known one."""

    def paste(x_s, s):
        known_s = known if s < 0 else diffusion.q_sample(known, torch.full((known.shape[0],), s), randn())
        return keep * known_s + (1 - keep) * x_s

    x = paste(x, timesteps[0])
    for i, t in enumerate(timesteps):
        s = _next(timesteps, i)
        tries = resample if s >= 0 else 1  # the step to the clean image has nothing left to harmonise
        for r in range(tries):
            x_s = paste(ancestral_step(denoise, x, t, s, diffusion, randn), s)
            if r + 1 < tries:  # jump back: q(x_t | x_s)
                a = diffusion.abar(t, x_s) / diffusion.abar(s, x_s)
                x = a.sqrt() * x_s + (1 - a).sqrt() * randn()
        x = x_s
        if callback:
            callback(i + 1, len(timesteps))
    return x


@torch.no_grad()
def sample_ancestral_ddpm(denoise: Denoiser, x, timesteps, diffusion: GaussianDiffusion, *, randn=None, eta=1.0, callback: Callback = None):
    """The same ancestral steps in the arithmetic order of diffusers' DDPMScheduler (Stable unCLIP runs Karlo's prior
    under it), so a float32 schedule reproduces its numbers too."""
    for i, t in enumerate(timesteps):
        x = ancestral_step(denoise, x, t, _next(timesteps, i), diffusion, randn, ratio=True)
        if callback:
            callback(i + 1, len(timesteps))
    return x


SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim, "dpmpp_2m": sample_dpmpp_2m, "ancestral": sample_ancestral,
            "ancestral_ddpm": sample_ancestral_ddpm}


@torch.no_grad()
def ddim_invert(denoise: Denoiser, x_start, timesteps, diffusion: GaussianDiffusion, *, callback: Callback = None):
    """DDIM inversion (Dhariwal & Nichol 2021, App. F): run deterministic DDIM backwards, image -> x_T.

    `timesteps` is the same descending list the sampler will use; sampling the result with
    `sample_ddim(eta=0)` on that list reconstructs the image up to the model's error (unCLIP §3)."""
    ts = list(reversed(timesteps))
    x = x_start
    for i in range(len(ts) - 1):
        t, t_next = ts[i], ts[i + 1]
        pred_x_start, eps = denoise(x, t)[:2]
        a_next = diffusion.abar(t_next, x)
        x = a_next.sqrt() * pred_x_start + (1 - a_next).sqrt() * eps
        if callback:
            callback(i + 1, len(ts) - 1)
    return x


def slerp(a: torch.Tensor, b: torch.Tensor, theta: float) -> torch.Tensor:
    """Spherical interpolation along the last dimension (Shoemake 1985), as unCLIP §3 does for z_i and x_T.

    Unit-norm inputs give unit-norm outputs; other inputs are interpolated on the great circle
    through their directions, with their norms interpolated linearly."""
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua, ub = a / na, b / nb
    cos = (ua * ub).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.acos(cos)
    so = torch.sin(omega)
    # Nearly parallel vectors: fall back to the linear path, which is then the same curve.
    safe = so.abs() > 1e-6
    wa = torch.where(safe, torch.sin((1 - theta) * omega) / so.where(safe, torch.ones_like(so)), torch.full_like(so, 1 - theta))
    wb = torch.where(safe, torch.sin(theta * omega) / so.where(safe, torch.ones_like(so)), torch.full_like(so, theta))
    direction = wa * ua + wb * ub
    return direction / direction.norm(dim=-1, keepdim=True).clamp(min=1e-12) * ((1 - theta) * na + theta * nb)
