"""Layers shared, identically, by the prior and the UNets."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def initial(make, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A parameter's or buffer's initial value, `make()`; where models are built on the meta device for their
    shapes alone (`checkpoint.inspect`), an empty tensor of that shape instead: random draws and some other
    ops there first import parts of torch (its meta kernels, its compiler), 2-4 s of every command's
    start-up. Elsewhere the values (and random draws) are the same as without this."""
    return torch.empty(*shape, dtype=dtype) if torch.empty(0).is_meta else make()


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in the Transformer and ADM. (B,) -> (B, dim)"""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepMLP(nn.Sequential):
    """sinusoid(t) -> Linear -> SiLU -> Linear, the ADM time embedding."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))
        self.in_dim = in_dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # The sinusoid is computed in float32 and then cast to the weights' dtype (fp16 on GPUs, float64 in parity tests).
        return super().forward(timestep_embedding(t, self.in_dim).to(self[0].weight.dtype))


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with (and Karlo's CLIP uses)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation(name: str) -> nn.Module:
    """The MLP activation a config names: "gelu" (exact) or "quick_gelu"."""
    if name == "gelu":
        return nn.GELU()
    if name == "quick_gelu":
        return QuickGELU()
    raise ValueError(f"unknown activation {name!r}; choose from gelu, quick_gelu")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention on (B, T, C) queries and (B, S, C) keys/values; mask (B, T, S) or (B, 1, S), True = attend."""
    B, T, C = q.shape
    S = k.shape[1]
    q = q.view(B, T, heads, C // heads).transpose(1, 2)  # (B, h, T, c)
    k = k.view(B, S, heads, C // heads).transpose(1, 2)  # (B, h, S, c)
    v = v.view(B, S, heads, C // heads).transpose(1, 2)
    if mask is not None:
        mask = mask[:, None]  # (B, 1, T|1, S), broadcast over heads
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, T, c)
    return out.transpose(1, 2).reshape(B, T, C)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero-initialise a layer so a residual branch starts as the identity (ADM, GLIDE)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module
