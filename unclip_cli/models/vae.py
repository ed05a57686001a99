"""The autoencoder of latent diffusion (Rombach et al. 2022 §3.1, "perceptual image compression"): a KL-regularised
convolutional encoder to a (latent_channels, H/f, W/f) latent and a decoder back to pixels, f = 2^(levels - 1).

A latent decoder samples in this space: images enter through `encode` (the posterior's mean, times the scaling
factor that gives the latents unit variance, §4.3.2) and leave through `decode`. Stable Diffusion's AutoencoderKL
(diffusers) is this network: residual blocks without time conditioning, one single-head self-attention block in
the middle of each half, asymmetric zero padding before each strided convolution, GroupNorm eps 1e-6.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from unclip_cli.models.layers import attention


@dataclass
class VAEConfig:
    image_size: int = 256  # the training resolution (any multiple of the downsampling factor runs)
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    scaling_factor: float = 0.18215  # latents * this have about unit variance (Stable Diffusion's value)

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)

    @property
    def factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


def norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, ch), ch, eps=1e-6)


class Res(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1, self.conv1 = norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class SelfAttention(nn.Module):
    """One head over all pixels, with a residual."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = norm(ch)
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(ch, ch) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).view(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        h = self.to_out(attention(self.to_q(h), self.to_k(h), self.to_v(h), 1))
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Middle(nn.Sequential):
    def __init__(self, ch: int):
        super().__init__(Res(ch, ch), SelfAttention(ch), Res(ch, ch))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right and bottom only: (H, W) -> (H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs = cfg.block_out_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.down = nn.ModuleList()
        ch = chs[0]
        for level, out in enumerate(chs):
            blocks = []
            for _ in range(cfg.layers_per_block):
                blocks.append(Res(ch, out))
                ch = out
            if level < len(chs) - 1:
                blocks.append(Downsample(ch))
            self.down.append(nn.Sequential(*blocks))
        self.middle = Middle(ch)
        self.norm_out = norm(ch)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.latent_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(self.middle(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs = tuple(reversed(cfg.block_out_channels))
        ch = chs[0]
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch, 3, padding=1)
        self.middle = Middle(ch)
        self.up = nn.ModuleList()
        for level, out in enumerate(chs):
            blocks = []
            for _ in range(cfg.layers_per_block + 1):
                blocks.append(Res(ch, out))
                ch = out
            if level < len(chs) - 1:
                blocks.append(Upsample(ch))
            self.up.append(nn.Sequential(*blocks))
        self.norm_out = norm(ch)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.middle(self.conv_in(z))
        for block in self.up:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        L = cfg.latent_channels
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(2 * L, 2 * L, 1)
        self.post_quant_conv = nn.Conv2d(L, L, 1)
        self.decoder = Decoder(cfg)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents (B, L, H/f, W/f): the posterior's mean (no sampling)."""
        mean, _logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean * self.cfg.scaling_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, L, h, w) -> images (B, 3, h f, w f), about [-1, 1]."""
        return self.decoder(self.post_quant_conv(z / self.cfg.scaling_factor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
