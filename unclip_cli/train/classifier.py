"""Training the concept classifier that `unclip eval` uses as an independent yardstick.

It trains with the same loop as every stage (`unclip train classifier`), on the training split only,
with augmentations that keep what names a concept (shape and colour: no flips, which turn a left arrow
into a right one, and no hue changes, which turn a red heart into a blue one) and vary what does not:
framing, scale, contrast, softness and noise. It sees no CLIP and no model set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from unclip_cli import checkpoint
from unclip_cli.checkpoint import config_from_dict
from unclip_cli.models.classifier import Classifier, ClassifierConfig
from unclip_cli.train.stages import Task, open_cache, to_unit


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """x (B, 3, s, s) in [-1, 1] -> the same images reframed (scale 0.75-1.1, shift ±10%), with contrast
    and brightness ±15%, 30% of them softened (down- and up-sampled by 2), and light noise."""
    B, _, s, _ = x.shape
    scale = 0.75 + 0.35 * torch.rand(B, generator=gen)
    shift = (torch.rand(B, 2, generator=gen) - 0.5) * 0.2
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    # Padding with white (the corpus background): grid_sample pads with zeros, so shift to [-2, 0] and back.
    x = F.grid_sample(x - 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 1
    contrast = 1 + (torch.rand(B, 1, 1, 1, generator=gen) - 0.5) * 0.3
    bright = (torch.rand(B, 1, 1, 1, generator=gen) - 0.5) * 0.3
    x = (x * contrast.to(x) + bright.to(x)).clamp(-1, 1)
    soft = torch.rand(B, generator=gen) < 0.3
    if soft.any():
        small = F.interpolate(x[soft], size=(s // 2, s // 2), mode="bilinear", antialias=True, align_corners=False)
        x = x.clone()
        x[soft] = F.interpolate(small, size=(s, s), mode="bilinear", align_corners=False)
    return (x + 0.03 * torch.randn(x.shape, generator=gen).to(x)).clamp(-1, 1)


class ClassifierTask(Task):
    kind = "classifier"

    def __init__(self, preset, data, run, device):
        super().__init__(preset, data, run, device)
        self.cache = open_cache(data, preset["classifier"]["model"].get("image_size", 64), self.cache_root)
        self.n = len(self.cache)
        concepts = sorted({r["concept"] for r in self.cache.records})
        self.index = {c: k for k, c in enumerate(concepts)}
        self.labels = torch.tensor([self.index[r["concept"]] for r in self.cache.records])
        self.config = config_from_dict(ClassifierConfig, {**preset["classifier"]["model"], "num_classes": len(concepts)})
        self.model = Classifier(self.config).to(device)
        self.extra = {"concepts": concepts}

    def loss(self, idx, gen):
        idx = np.sort(idx)
        x = augment(to_unit(self.cache.images[idx]), gen).to(self.device)
        return F.cross_entropy(self.net(x), self.labels[idx].to(self.device), label_smoothing=0.1)


def export_classifier(run: str | Path, to: str | Path) -> Path:
    """Write the EMA weights of RUN/classifier as a classifier checkpoint (fp16 weights, concepts in the metadata)."""
    import json

    from unclip_cli.errors import UnclipError
    from unclip_cli.train.common import load_ema_weights

    stage = Path(run) / "classifier"
    if not (stage / "state.safetensors").is_file():
        raise UnclipError(f"{stage} has no training state", hint="train it first: unclip train classifier --data DATA --run RUN")
    info = json.loads((stage / "run.json").read_text())
    cfg = config_from_dict(ClassifierConfig, {k: tuple(v) if isinstance(v, list) else v for k, v in info["config"].items()})
    model = Classifier(cfg)
    meta = load_ema_weights(stage / "state.safetensors", model)
    extra = {**info["extra"], "uid": info.get("uid"), "trained_steps": meta["step"], "images_seen": meta["images_seen"]}
    checkpoint.save(Path(to), "classifier", model, cfg, None, extra, dtype=torch.float16)
    return Path(to)
