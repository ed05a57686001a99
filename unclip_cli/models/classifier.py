"""A concept classifier: the independent yardstick of `unclip eval`.

Scores from the model set's own CLIP flatter the model (the same CLIP picks the best of several decoder
samples), so evaluation also asks a network that shares nothing with the model set: a small residual
convnet trained apart, on the training split only, to name an emoji's concept from its pixels. It never
takes part in sampling. Its top-1/top-5 on real held-out images (styles of a concept it never saw) is
the ceiling that generated images are read against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ClassifierConfig:
    num_classes: int = 1
    image_size: int = 64  # inputs of any size are resized to this (antialiased)
    channels: tuple[int, ...] = (32, 64, 128, 256)  # one stage per entry; each after the first halves the side
    blocks: int = 2  # residual blocks per stage
    dropout: float = 0.1


class _Block(nn.Module):
    def __init__(self, ch_in: int, ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch_in, ch, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(8, ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(8, ch)
        self.skip = nn.Identity() if stride == 1 and ch_in == ch else nn.Conv2d(ch_in, ch, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(self.conv1(x)))  # (B, ch, H / stride, W / stride)
        return F.silu(self.skip(x) + self.norm2(self.conv2(h)))


class Classifier(nn.Module):
    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        self.stem = nn.Sequential(nn.Conv2d(3, cfg.channels[0], 3, padding=1, bias=False), nn.GroupNorm(8, cfg.channels[0]), nn.SiLU())
        layers, ch = [], cfg.channels[0]
        for k, width in enumerate(cfg.channels):
            for b in range(cfg.blocks):
                layers.append(_Block(ch, width, stride=2 if (k > 0 and b == 0) else 1))
                ch = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(ch, cfg.num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) in [-1, 1] -> the pooled features the head reads (B, C): a yardstick of how far
        apart two images are that shares nothing with the model set being measured."""
        s = self.cfg.image_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        return self.body(self.stem(x)).mean(dim=(2, 3))  # (B, C), pooled over s / 2^(stages-1) squared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) in [-1, 1] -> logits (B, num_classes)."""
        return self.head(self.features(x))
