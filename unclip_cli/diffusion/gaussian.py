"""Gaussian diffusion: forward noising, parameterisations and training losses (Ho et al. 2020).

The diffusion object is not a network: it holds the schedule (computed in float64) and takes the
model as an argument, so the prior, decoder and upsampler share it and differ only in configuration.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from unclip_cli.diffusion.schedule import make_betas


class Parameterization(str, enum.Enum):
    EPS = "eps"  # the network predicts the noise (decoder, upsampler: ADM, GLIDE)
    X0 = "x0"  # the network predicts x_start (the unCLIP prior, §2.2)
    V = "v"  # v = alpha * eps - sigma * x_start (Salimans & Ho 2022)


class Variance(str, enum.Enum):
    FIXED_SMALL = "fixed_small"  # the posterior variance beta~_t (DDPM's sigma_small; Karlo's prior and super-res)
    LEARNED_RANGE = "learned_range"  # the network's extra channels v interpolate log beta~_t .. log beta_t (Nichol & Dhariwal 2021 §3.1)


SCHEDULE_DTYPES = ("float64", "float32")
# alpha_bar after the last step: "one", the clean image; "first": alpha_bar at t = 0, where diffusers' DDIM with
# set_alpha_to_one=False (Stable Diffusion's scheduler) ends, a sigma of 0.03 short of it
FINAL_ALPHAS = ("one", "first")


@dataclass
class DiffusionConfig:
    timesteps: int = 1000
    schedule: str = "cosine"
    parameterization: str = "eps"
    # "float32": betas and alpha_bar computed in float32 and every per-step coefficient too, as diffusers'
    # UnCLIPScheduler does, so a converted Karlo set samples as it was made to (our float64 cosine values
    # differ from those by up to 1.3e-5 relative). "float64": computed in float64, applied in the sample's dtype.
    schedule_dtype: str = "float64"
    variance: str = "fixed_small"  # "learned_range": the network outputs 2C channels, eps then v in [-1, 1]
    final_alpha: str = "one"  # see FINAL_ALPHAS


class GaussianDiffusion:
    def __init__(self, cfg: DiffusionConfig):
        self.cfg = cfg
        self.num_timesteps = cfg.timesteps
        self.parameterization = Parameterization(cfg.parameterization)
        self.variance = Variance(cfg.variance)
        betas = make_betas(cfg.schedule, cfg.timesteps)
        self.exact32 = cfg.schedule_dtype == "float32"
        if self.exact32:  # as diffusers: float32 betas, alphas and their cumulative product
            self.betas = torch.tensor(betas, dtype=torch.float32)
            self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # float32, (T,)
        else:
            self.betas = torch.from_numpy(betas)
            self.alphas_cumprod = torch.from_numpy(np.cumprod(1.0 - betas))  # float64, (T,)

    def abar(self, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """alpha_bar at integer timesteps t (-1 means no noise), shaped to broadcast against `like`.

        In the sample's dtype, or, for a float32 schedule, in float32 (arithmetic on these values then rounds
        as diffusers' does, and a float64 sample promotes them exactly)."""
        t = torch.as_tensor(t, dtype=torch.long)
        one = torch.ones((), dtype=self.alphas_cumprod.dtype) if self.cfg.final_alpha == "one" else self.alphas_cumprod[0]
        a = torch.where(t < 0, one, self.alphas_cumprod[t.clamp(min=0)])
        a = a.to(device=like.device, dtype=torch.float32 if self.exact32 else like.dtype)
        return a.view(-1, *([1] * (like.dim() - 1))) if a.dim() else a

    def beta(self, t: int, s: int, like: torch.Tensor) -> torch.Tensor:
        """The beta of one sampling step t -> s: the trained beta_t for adjacent steps, else 1 - abar_t / abar_s."""
        if s == t - 1:
            return self.betas[t].to(device=like.device, dtype=torch.float32 if self.exact32 else like.dtype)
        return 1 - self.abar(t, like) / self.abar(s, like)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_start + sqrt(1 - abar_t) eps."""
        a = self.abar(t.cpu(), x_start)
        return a.sqrt() * x_start + (1 - a).sqrt() * noise

    def split(self, out: torch.Tensor, x_t: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's output at (x_t, t) -> (pred_x_start, pred_eps), whatever its parameterisation."""
        a = self.abar(t, x_t)
        alpha, sigma = a.sqrt(), (1 - a).sqrt()
        if self.parameterization is Parameterization.EPS:
            return (x_t - sigma * out) / alpha, out
        if self.parameterization is Parameterization.X0:
            return out, (x_t - alpha * out) / sigma
        x_start = alpha * x_t - sigma * out  # v
        return x_start, (x_t - alpha * x_start) / sigma

    def eps_from_x_start(self, x_t: torch.Tensor, t, x_start: torch.Tensor) -> torch.Tensor:
        a = self.abar(t, x_t)
        return (x_t - a.sqrt() * x_start) / (1 - a).sqrt()

    def target(self, x_start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.parameterization is Parameterization.EPS:
            return noise
        if self.parameterization is Parameterization.X0:
            return x_start
        a = self.abar(t.cpu(), x_start)
        return a.sqrt() * noise - (1 - a).sqrt() * x_start

    def training_losses(
        self, model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_start: torch.Tensor,
        t: torch.Tensor, noise: torch.Tensor,
    ) -> torch.Tensor:
        """Per-sample mean squared error between the network output and its target. (B,)"""
        out = model_fn(self.q_sample(x_start, t, noise), t)
        return (out - self.target(x_start, noise, t)).pow(2).flatten(1).mean(dim=1)


Denoiser = Callable[[torch.Tensor, int], tuple[torch.Tensor, ...]]


def make_denoiser(
    diffusion: GaussianDiffusion, model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    clip_x_start: float | None = None,
) -> Denoiser:
    """Wrap a network call into the samplers' interface: (x_t, t) -> (pred_x_start, pred_eps), plus the
    variance interpolation v (B, C, ...) as a third item for a learned-range diffusion.

    With `clip_x_start`, x_start is clamped and eps recomputed from the clamped value, so that the
    two stay consistent (as guided-diffusion does for images in [-1, 1])."""
    learned = diffusion.variance is Variance.LEARNED_RANGE

    def denoise(x_t: torch.Tensor, t: int):
        t_batch = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
        out = model_fn(x_t, t_batch)
        if learned:
            out, v = out.split(x_t.shape[1], dim=1)  # (B, C, ...) each: eps, and the variance interpolation
        x_start, eps = diffusion.split(out, x_t, t)
        if clip_x_start is not None:
            x_start = x_start.clamp(-clip_x_start, clip_x_start)
            eps = diffusion.eps_from_x_start(x_t, t, x_start)
        return (x_start, eps, v) if learned else (x_start, eps)

    return denoise
