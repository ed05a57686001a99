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


@dataclass
class DiffusionConfig:
    timesteps: int = 1000
    schedule: str = "cosine"
    parameterization: str = "eps"


class GaussianDiffusion:
    def __init__(self, cfg: DiffusionConfig):
        self.cfg = cfg
        self.num_timesteps = cfg.timesteps
        self.parameterization = Parameterization(cfg.parameterization)
        betas = make_betas(cfg.schedule, cfg.timesteps)
        self.alphas_cumprod = torch.from_numpy(np.cumprod(1.0 - betas))  # float64, (T,)

    def abar(self, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """alpha_bar at integer timesteps t (-1 means no noise), shaped to broadcast against `like`."""
        t = torch.as_tensor(t, dtype=torch.long)
        a = torch.where(t < 0, torch.ones((), dtype=torch.float64), self.alphas_cumprod[t.clamp(min=0)])
        a = a.to(device=like.device, dtype=like.dtype)
        return a.view(-1, *([1] * (like.dim() - 1))) if a.dim() else a

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


Denoiser = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def make_denoiser(
    diffusion: GaussianDiffusion, model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    clip_x_start: float | None = None,
) -> Denoiser:
    """Wrap a network call into the samplers' interface: (x_t, t) -> (pred_x_start, pred_eps).

    With `clip_x_start`, x_start is clamped and eps recomputed from the clamped value, so that the
    two stay consistent (as guided-diffusion does for images in [-1, 1])."""

    def denoise(x_t: torch.Tensor, t: int):
        t_batch = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
        x_start, eps = diffusion.split(model_fn(x_t, t_batch), x_t, t)
        if clip_x_start is not None:
            x_start = x_start.clamp(-clip_x_start, clip_x_start)
            eps = diffusion.eps_from_x_start(x_t, t, x_start)
        return x_start, eps

    return denoise
