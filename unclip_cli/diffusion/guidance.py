"""Classifier-free guidance (Ho & Salimans 2021) as a thin wrapper around a model call.

`model_fn(x, t, keep)` is a network call whose conditioning is used where `keep` (B,) is True and
dropped (null embedding, no caption) where it is False. The wrapper runs both halves in one batch and
returns uncond + scale * (cond - uncond), on the raw network output (eps for the decoder; x_start for
the prior, as karlo and diffusers do). The prior and the decoder get separate scales.
"""

from __future__ import annotations

from typing import Callable

import torch


def guided(model_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], scale: float, channels: int | None = None):
    """`channels`: guide only the first `channels` output channels (the noise of a network that also outputs
    its variance, as Karlo's decoder does); the rest comes from the conditional branch."""

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        if scale == 1.0:
            return model_fn(x, t, torch.ones(B, dtype=torch.bool, device=x.device))
        keep = torch.cat([torch.ones(B, dtype=torch.bool), torch.zeros(B, dtype=torch.bool)]).to(x.device)
        cond, uncond = model_fn(torch.cat([x, x]), torch.cat([t, t]), keep).chunk(2)
        if channels is None:
            return uncond + scale * (cond - uncond)
        c, u = cond[:, :channels], uncond[:, :channels]
        return torch.cat([u + scale * (c - u), cond[:, channels:]], dim=1)

    return fn
