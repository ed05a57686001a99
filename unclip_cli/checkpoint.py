"""Checkpoints: safetensors files that carry their own config. No pickle is ever loaded.

The safetensors metadata holds (all strings): `format` ("unclip"), `format_version`, `kind` (clip,
prior, decoder, upsampler), `config` (the model's dataclass as JSON), `diffusion` (its diffusion config,
for the diffusion stages) and `extra` (JSON: ids tying a set together, training facts). A file loads on
its own; every key and shape is checked, and any problem names the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
import types
import typing
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from unclip_cli.diffusion.gaussian import DiffusionConfig, Parameterization
from unclip_cli.diffusion.schedule import SCHEDULES
from unclip_cli.errors import WeightsError
from unclip_cli.models.classifier import Classifier, ClassifierConfig
from unclip_cli.models.clip import Clip, ClipConfig
from unclip_cli.models.prior import Prior, PriorConfig
from unclip_cli.models.unet import UNet, UNetConfig

FORMAT = "unclip"
FORMAT_VERSION = 1
DAMAGED_HINT = "the file was edited or damaged; re-export or re-download it"
MAX_TIMESTEPS = 100_000  # a schedule is computed at load: a larger count is damage, and would take minutes
KINDS: dict[str, tuple[type, type]] = {
    "clip": (ClipConfig, Clip),
    "prior": (PriorConfig, Prior),
    "decoder": (UNetConfig, UNet),
    "upsampler": (UNetConfig, UNet),
    "classifier": (ClassifierConfig, Classifier),  # not a model-set stage: the eval's independent yardstick
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
    """Build a config dataclass from JSON, checking each value against the field's annotation.

    Unknown keys are refused (a file from a newer version, or a typo in a preset). Config numbers are
    sizes, counts and rates: none may be negative, and an int may be 0 only in a field whose default is
    0 (there, 0 means "none"). Every problem is a ValueError naming the field."""
    if not isinstance(d, dict):
        raise ValueError(f"{cls.__name__} must be a JSON object, not {shorten(d)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    hints = typing.get_type_hints(cls)  # the annotations are strings under `from __future__ import annotations`
    for name, value in d.items():
        if not _has_type(value, hints[name]):
            raise ValueError(f"{cls.__name__}.{name} is {shorten(value)}, not {fields[name].type}")
        low = 0 if fields[name].default == 0 else 1
        if any(x < 0 or (x < low and type(x) is int) for x in _numbers(value)):
            raise ValueError(f"{cls.__name__}.{name} is {shorten(value)}; it must be at least {low}")
    return cls(**d)


def _has_type(value, hint) -> bool:
    """Whether a JSON value fits a field annotation: int, float (ints accepted), bool, str, None, unions
    and tuples/lists of those. A bool is not a number, and a float must be finite."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args[-1:] != (Ellipsis,):  # fixed length: tuple[int, int]
            return len(value) == len(args) and all(map(_has_type, value, args))
        return all(_has_type(v, args[0]) for v in value)
    if hint is float:
        return type(value) is int or (type(value) is float and math.isfinite(value))
    if hint is int:
        return type(value) is int
    return isinstance(value, hint)


def _numbers(value) -> list:
    """The numbers in a config value (itself, or the items of a tuple)."""
    items = value if isinstance(value, (list, tuple)) else [value]
    return [x for x in items if isinstance(x, (int, float)) and not isinstance(x, bool)]


def shorten(value) -> str:
    """A metadata value as JSON, cut short for an error message."""
    text = json.dumps(value, default=repr)
    return text if len(text) <= 40 else text[:37] + "..."


def check_diffusion(cfg: DiffusionConfig) -> DiffusionConfig:
    """Refuse a diffusion config that cannot build a schedule, naming the field."""
    if not 1 <= cfg.timesteps <= MAX_TIMESTEPS:
        raise ValueError(f"DiffusionConfig.timesteps is {cfg.timesteps}; it must be from 1 to {MAX_TIMESTEPS:,}")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"DiffusionConfig.schedule is {shorten(cfg.schedule)}; choose from {sorted(SCHEDULES)}")
    kinds = [p.value for p in Parameterization]
    if cfg.parameterization not in kinds:
        raise ValueError(f"DiffusionConfig.parameterization is {shorten(cfg.parameterization)}; choose from {kinds}")
    return cfg


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
    # ASCII digits, few of them: str.isdigit() also accepts "²", and int() refuses over 4,300 digits.
    if missing or not re.fullmatch(r"[0-9]{1,9}", meta["format_version"]):
        raise WeightsError(f"{path}: damaged unclip metadata ({'missing ' + ', '.join(missing) if missing else 'bad format_version'})")
    if int(meta["format_version"]) > FORMAT_VERSION:
        raise WeightsError(f"{path}: checkpoint format {meta['format_version']} is newer than this unclip supports ({FORMAT_VERSION})", hint="upgrade unclip")
    return meta


def _parse(path: Path, meta: dict, key: str, build):
    """build(JSON of meta[key]), with any problem a WeightsError naming the file and the key."""
    try:
        return build(json.loads(meta[key]))
    except (ValueError, TypeError) as e:  # bad JSON, a checked field; TypeError: a dataclass's required field missing
        raise WeightsError(f"{path}: bad {key} in metadata ({e})", hint=DAMAGED_HINT) from None


def _json_object(d):
    if not isinstance(d, dict):
        raise ValueError(f"must be a JSON object, not {shorten(d)}")
    return d


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
    config = _parse(path, meta, "config", lambda d: config_from_dict(config_cls, d))
    diffusion = None
    if meta.get("diffusion"):  # "" for the CLIP, which is not a diffusion model
        diffusion = _parse(path, meta, "diffusion", lambda d: check_diffusion(config_from_dict(DiffusionConfig, d)))
    extra = _parse(path, meta, "extra", _json_object) if meta.get("extra") else {}
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise WeightsError(f"{path}: tensors could not be read ({e})", hint="the file is truncated or corrupted") from None
    # Built for real (not on the meta device): modules such as open_clip's text tower keep derived,
    # non-persistent buffers (the causal mask) that only the constructor computes.
    try:
        model = model_cls(config)
    except Exception as e:  # whatever a well-typed but impossible config makes the constructor raise
        raise WeightsError(f"{path}: its config does not build a {kind} model ({type(e).__name__}: {e})", hint=DAMAGED_HINT) from None
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
