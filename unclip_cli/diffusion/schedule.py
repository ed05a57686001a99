"""Noise schedules, in float64 (Nichol & Dhariwal 2021 §3.2 for the cosine one)."""

from __future__ import annotations

import math

import numpy as np


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2); betas clipped at 0.999 to avoid a singularity at t = T."""

    def alpha_bar(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    return np.array(
        [min(1 - alpha_bar((i + 1) / timesteps) / alpha_bar(i / timesteps), max_beta) for i in range(timesteps)],
        dtype=np.float64,
    )


def linear_betas(timesteps: int) -> np.ndarray:
    """DDPM's linear schedule, rescaled so that any number of steps spans the same noise range."""
    scale = 1000 / timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=np.float64)


def scaled_linear_betas(timesteps: int, start: float = 0.00085, end: float = 0.012) -> np.ndarray:
    """Latent diffusion's schedule (Rombach et al. 2022): betas linear in sqrt from 0.00085 to 0.012. Computed in
    float32, as diffusers' schedulers do, so a converted Stable Diffusion samples with its exact values."""
    import torch

    return (torch.linspace(start**0.5, end**0.5, timesteps, dtype=torch.float32) ** 2).double().numpy()


SCHEDULES = {"cosine": cosine_betas, "linear": linear_betas, "scaled_linear": scaled_linear_betas}


def make_betas(name: str, timesteps: int) -> np.ndarray:
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; choose from {sorted(SCHEDULES)}")
    return SCHEDULES[name](timesteps)


SPACINGS = ("linspace", "karlo", "leading", "leading1")


def spaced_timesteps(timesteps: int, steps: int, start: int | None = None, spacing: str = "linspace") -> list[int]:
    """`steps` evenly strided timesteps from `start` (default T-1) down to 0, descending (the sampling order).

    spacing "linspace": round(linspace(start, 0, steps)); "karlo": round(i * start / (steps - 1)) for
    i = steps-1 .. 0, as Karlo's respacing and diffusers' UnCLIPScheduler compute them (ties to even); "leading":
    i * (T // steps) for i = steps-1 .. 0, diffusers' DDPM and DDIM default; "leading1": the same plus 1 (their
    steps_offset=1, Stable Diffusion's scheduler). The leading spacings ignore `start` above their first step."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"steps must be between 1 and {timesteps}, got {steps}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose from {', '.join(SPACINGS)}")
    if spacing in ("leading", "leading1"):
        ratio, offset = timesteps // steps, spacing == "leading1"
        return [min(i * ratio + offset, timesteps - 1) for i in reversed(range(steps))]
    start = timesteps - 1 if start is None else min(start, timesteps - 1)
    if steps == 1:
        return [start]
    if spacing == "karlo":
        return [int(x) for x in (np.arange(steps) * (start / (steps - 1))).round()[::-1]]
    return [int(round(x)) for x in np.linspace(start, 0, steps)]
