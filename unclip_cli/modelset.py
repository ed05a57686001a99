"""A model set: a folder with `clip`, `prior`, `decoder` and one or more `upsampler` checkpoints.

    weights/emoji/clip.safetensors  prior.safetensors  decoder.safetensors  upsampler.safetensors
                  [upsampler-2.safetensors ...]  [MODEL_CARD.md]  [metrics.json]

The prior and decoder record the id of the CLIP they were trained with; loading refuses a mismatched
set (a decoder from one CLIP with a prior from another only produces noise). The upsamplers must chain
from the decoder's resolution.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from unclip_cli import checkpoint
from unclip_cli.checkpoint import config_from_dict
from unclip_cli.diffusion.gaussian import DiffusionConfig, GaussianDiffusion
from unclip_cli.errors import WeightsError
from unclip_cli.models.clip import Clip, ClipConfig
from unclip_cli.models.prior import Prior, PriorConfig
from unclip_cli.models.unet import UNet, UNetConfig
from unclip_cli.presets import load_preset


FILES = {"clip": "clip.safetensors", "prior": "prior.safetensors", "decoder": "decoder.safetensors", "upsampler": "upsampler.safetensors"}


@dataclass
class Stage:
    model: torch.nn.Module
    diffusion: GaussianDiffusion | None
    extra: dict
    path: Path


@dataclass
class ModelSet:
    root: Path
    clip: Stage
    prior: Stage
    decoder: Stage
    upsamplers: list[Stage]
    card: str | None

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def base_size(self) -> int:
        return self.decoder.model.cfg.image_size

    @property
    def image_size(self) -> int:
        size = self.base_size
        for up in self.upsamplers:
            size *= up.extra["scale"]
        return size

    @property
    def model_hash(self) -> str:
        """A short id of the set, from the ids its files carry (stable, cheap: no tensor hashing)."""
        ids = [s.extra.get("uid", "") for s in (self.clip, self.prior, self.decoder, *self.upsamplers)]
        return hashlib.sha256("/".join(ids).encode()).hexdigest()[:10]


def upsampler_files(root: Path) -> list[Path]:
    files = sorted(root.glob("upsampler*.safetensors"), key=lambda p: (len(p.name), p.name))
    return files


def load_model_set(root: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> ModelSet:
    root = Path(root)
    if not root.is_dir():
        raise WeightsError(f"{root}: model set folder not found", hint="pass --weights DIR with clip/prior/decoder/upsampler .safetensors files")

    def stage(path: Path, kind: str) -> Stage:
        ck = checkpoint.load(path, kind, device=device, dtype=dtype)
        diffusion = GaussianDiffusion(ck.diffusion) if ck.diffusion else None
        return Stage(ck.model, diffusion, ck.extra, path)

    clip = stage(root / FILES["clip"], "clip")
    prior = stage(root / FILES["prior"], "prior")
    decoder = stage(root / FILES["decoder"], "decoder")
    ups = [stage(p, "upsampler") for p in upsampler_files(root)]
    for s in (prior, decoder):
        if s.extra.get("clip_uid") != clip.extra.get("uid"):
            raise WeightsError(
                f"{s.path}: trained with a different CLIP than {clip.path.name} in this folder",
                hint="use files exported together (unclip train export) — mixing sets produces noise",
            )
    size = decoder.model.cfg.image_size
    for up in ups:
        if up.extra.get("low_res") not in (None, size):
            raise WeightsError(f"{up.path}: upsamples from {up.extra['low_res']} px, but the stage before it gives {size} px")
        size *= up.extra["scale"]
    card_path = root / "MODEL_CARD.md"
    card = card_path.read_text() if card_path.is_file() else None
    return ModelSet(root, clip, prior, decoder, ups, card)


def build_models(preset: dict, seed: int = 0, uid_prefix: str | None = None) -> dict[str, tuple[torch.nn.Module, object, DiffusionConfig | None, dict]]:
    """Fresh, randomly initialised models for every stage of a preset: kind -> (model, config, diffusion, extra).

    Each file gets a `uid` (from `uid_prefix` when given, else random) and the diffusion stages record
    the CLIP's uid as `clip_uid`."""
    torch.manual_seed(seed)

    def uid(kind):
        return f"{uid_prefix}-{kind}" if uid_prefix else uuid.uuid4().hex

    clip_uid = uid("clip")
    out = {}
    clip_cfg = config_from_dict(ClipConfig, preset["clip"])
    out["clip"] = (Clip(clip_cfg), clip_cfg, None, {"uid": clip_uid})
    for kind, cls, cfg_cls in (("prior", Prior, PriorConfig), ("decoder", UNet, UNetConfig), ("upsampler", UNet, UNetConfig)):
        cfg = config_from_dict(cfg_cls, preset[kind]["model"])
        diffusion = config_from_dict(DiffusionConfig, preset[kind]["diffusion"])
        extra = {"uid": uid(kind), "clip_uid": clip_uid}
        if kind == "upsampler":
            extra.update(scale=preset[kind]["scale"], low_res=preset["decoder"]["model"]["image_size"])
        out[kind] = (cls(cfg), cfg, diffusion, extra)
    return out


def write_random_model_set(root: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """A randomly initialised set, for tests and for trying the machinery. Zero-initialised output layers
    get small random weights so that every input (noise, z_i, text, mask) changes the output."""
    root = Path(root)
    gen = torch.Generator().manual_seed(seed)
    for kind, (model, cfg, diffusion, extra) in build_models(load_preset(preset), seed, f"random-{preset}-{seed}").items():
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1 and not p.any():
                    p.normal_(0, 0.02, generator=gen)
        checkpoint.save(root / f"{kind}.safetensors", kind, model, cfg, diffusion, extra)
    return root
