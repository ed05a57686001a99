"""Checkpoints: safetensors files that carry their own config. No pickle is ever loaded.

The safetensors metadata holds (all strings): `format` ("unclip"), `format_version`, `kind` (clip,
prior, decoder, upsampler), `config` (the model's dataclass as JSON), `diffusion` (its diffusion config,
for the diffusion stages) and `extra` (JSON: ids tying a set together, training facts). A file loads on
its own; every key and shape is checked, and any problem names the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from unclip_cli.diffusion.gaussian import DiffusionConfig
from unclip_cli.errors import WeightsError
from unclip_cli.models.clip import Clip, ClipConfig
from unclip_cli.models.prior import Prior, PriorConfig
from unclip_cli.models.unet import UNet, UNetConfig

FORMAT = "unclip"
FORMAT_VERSION = 1
KINDS: dict[str, tuple[type, type]] = {
    "clip": (ClipConfig, Clip),
    "prior": (PriorConfig, Prior),
    "decoder": (UNetConfig, UNet),
    "upsampler": (UNetConfig, UNet),
}


@dataclasses.dataclass
class Checkpoint:
    kind: str
    model: nn.Module
    config: Any
    diffusion: DiffusionConfig | None
    extra: dict
    path: Path


def config_from_dict(cls, d: dict):
    """Build a config dataclass, refusing unknown keys (a file from a newer version, or a typo in a preset)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return cls(**d)


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename over `path`: an interrupted write never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(
    path: str | Path, kind: str, model: nn.Module, config, diffusion: DiffusionConfig | None = None,
    extra: dict | None = None, dtype: torch.dtype | None = None,
) -> None:
    """Write a model with its config. With `dtype` (e.g. fp16 for shipping), weight tensors are cast;
    tensors under 1,024 values (norms, biases, the prior's statistics) stay fp32: they cost nothing."""
    from safetensors.torch import save_file

    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point() and v.numel() >= 1024:
            v = v.to(dtype)
        tensors[k] = v.contiguous()
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "kind": kind,
        "config": json.dumps(dataclasses.asdict(config)),
        "diffusion": json.dumps(dataclasses.asdict(diffusion)) if diffusion else "",
        "extra": json.dumps(extra or {}),
    }
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_metadata(path: str | Path) -> dict:
    """The metadata of a checkpoint, without reading its tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such checkpoint file", hint="check the --weights folder")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise WeightsError(f"{path}: not a readable safetensors file ({e})", hint="the file is truncated or corrupted; re-export or re-download it") from None
    if meta.get("format") != FORMAT:
        raise WeightsError(f"{path}: not an unclip checkpoint (no unclip metadata)")
    missing = [k for k in ("format_version", "kind", "config") if k not in meta]
    if missing or not str(meta["format_version"]).isdigit():
        raise WeightsError(f"{path}: damaged unclip metadata ({'missing ' + ', '.join(missing) if missing else 'bad format_version'})")
    if int(meta["format_version"]) > FORMAT_VERSION:
        raise WeightsError(f"{path}: checkpoint format {meta['format_version']} is newer than this unclip supports ({FORMAT_VERSION})", hint="upgrade unclip")
    return meta


def load(path: str | Path, kind: str | None = None, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Checkpoint:
    """Rebuild a model from its file alone, checking every key and shape."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_metadata(path)
    if kind is not None and meta.get("kind") != kind:
        raise WeightsError(f"{path}: expected a {kind} checkpoint, found {meta.get('kind')!r}")
    kind = meta["kind"]
    if kind not in KINDS:
        raise WeightsError(f"{path}: unknown checkpoint kind {kind!r}")
    config_cls, model_cls = KINDS[kind]
    try:
        config = config_from_dict(config_cls, json.loads(meta["config"]))
        diffusion = config_from_dict(DiffusionConfig, json.loads(meta["diffusion"])) if meta.get("diffusion") else None
        extra = json.loads(meta.get("extra") or "{}")
    except (ValueError, TypeError) as e:
        raise WeightsError(f"{path}: bad config in metadata ({e})") from None
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise WeightsError(f"{path}: tensors could not be read ({e})", hint="the file is truncated or corrupted") from None
    # Built for real (not on the meta device): modules such as open_clip's text tower keep derived,
    # non-persistent buffers (the causal mask) that only the constructor computes.
    model = model_cls(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise WeightsError(f"{path}: keys do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in expected.items():
        if tuple(v.shape) != tuple(tensors[k].shape):
            raise WeightsError(f"{path}: tensor {k} has shape {tuple(tensors[k].shape)}, config says {tuple(v.shape)}")
        if tensors[k].is_floating_point() and not torch.isfinite(tensors[k]).all():
            raise WeightsError(f"{path}: tensor {k} contains NaN or inf", hint="the checkpoint is corrupted")
    model.load_state_dict({k: v.to(expected[k].dtype) if v.is_floating_point() else v for k, v in tensors.items()}, strict=True)
    model = model.to(device=device)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return Checkpoint(kind, model.eval(), config, diffusion, extra, path)
