"""Checkpoints: safetensors files that carry their own config. No pickle is ever loaded.

The safetensors metadata holds (all strings): `format` ("unclip"), `format_version`, `kind` (clip,
prior, decoder, upsampler), `config` (the model's dataclass as JSON), `diffusion` (its diffusion config,
for the diffusion stages) and `extra` (JSON: ids tying a set together, training facts). A file loads on
its own; every key and shape is checked, and any problem names the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import tempfile
import threading
import types
import typing
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from unclip_cli.diffusion.gaussian import FINAL_ALPHAS, SCHEDULE_DTYPES, DiffusionConfig, Parameterization, Variance
from unclip_cli.diffusion.schedule import SCHEDULES
from unclip_cli.errors import WeightsError
from unclip_cli.models.classifier import Classifier, ClassifierConfig
from unclip_cli.models.clip import Clip, ClipConfig
from unclip_cli.models.prior import Prior, PriorConfig
from unclip_cli.models.unet import UNet, UNetConfig
from unclip_cli.models.vae import VAE, VAEConfig

FORMAT = "unclip"
FORMAT_VERSION = 1
DAMAGED_HINT = "the file was edited or damaged; re-export or re-download it"
MAX_TIMESTEPS = 100_000  # a schedule is computed at load: a larger count is damage, and would take minutes
KINDS: dict[str, tuple[type, type]] = {
    "clip": (ClipConfig, Clip),
    "prior": (PriorConfig, Prior),
    "decoder": (UNetConfig, UNet),
    "upsampler": (UNetConfig, UNet),
    "vae": (VAEConfig, VAE),  # a latent decoder's autoencoder
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
    if cfg.schedule_dtype not in SCHEDULE_DTYPES:
        raise ValueError(f"DiffusionConfig.schedule_dtype is {shorten(cfg.schedule_dtype)}; choose from {list(SCHEDULE_DTYPES)}")
    if cfg.final_alpha not in FINAL_ALPHAS:
        raise ValueError(f"DiffusionConfig.final_alpha is {shorten(cfg.final_alpha)}; choose from {list(FINAL_ALPHAS)}")
    variances = [v.value for v in Variance]
    if cfg.variance not in variances:
        raise ValueError(f"DiffusionConfig.variance is {shorten(cfg.variance)}; choose from {variances}")
    return cfg


def process_umask() -> int:
    """The process umask, read without changing it where the system says it (Linux), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename over `path`: an interrupted write never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~process_umask())  # mkstemp makes 0600; a written file gets the mode any other would
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


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64", torch.int64: "I64"}
UID_PLACEHOLDER = "#" * 16  # in `extra.uid`, replaced by the first 16 hex digits of the tensors' SHA-256


def save_streaming(
    path: str | Path, kind: str, config, tensors: list[tuple[str, tuple[int, ...], torch.dtype, Any]],
    diffusion: DiffusionConfig | None = None, extra: dict | None = None,
) -> str:
    """Write a checkpoint one tensor at a time: `tensors` lists (name, shape, dtype, make) and `make()` returns
    that tensor when its turn comes, so only one tensor is ever held (a converter's way to write a
    multi-gigabyte network). A `uid` in `extra` containing UID_PLACEHOLDER gets the content hash of the
    tensors written; the uid is returned. The file is the format `save` writes and `load` checks."""
    import hashlib

    tensors = sorted(tensors, key=lambda item: item[0])
    header: dict[str, Any] = {}
    offset = 0
    for name, shape, dtype, _ in tensors:
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    extra = dict(extra or {})
    header["__metadata__"] = {
        "format": FORMAT, "format_version": str(FORMAT_VERSION), "kind": kind,
        "config": json.dumps(dataclasses.asdict(config)),
        "diffusion": json.dumps(dataclasses.asdict(diffusion)) if diffusion else "",
        "extra": json.dumps(extra),
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    digest = hashlib.sha256()
    uid = extra.get("uid", "")

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(len(head).to_bytes(8, "little"))
            f.write(head)
            for name, shape, dtype, make in tensors:
                t = make().detach().to("cpu", dtype).contiguous()
                if tuple(t.shape) != tuple(shape):
                    raise ValueError(f"{name}: made a tensor of shape {tuple(t.shape)}, planned {tuple(shape)}")
                data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
                digest.update(data)
                f.write(data)
                del t, data
            if UID_PLACEHOLDER in uid:  # same length, so the header keeps its size
                at = 8 + head.index(UID_PLACEHOLDER.encode())
                f.seek(at)
                f.write(digest.hexdigest()[: len(UID_PLACEHOLDER)].encode())

    atomic_write(Path(path), write)
    return uid.replace(UID_PLACEHOLDER, digest.hexdigest()[: len(UID_PLACEHOLDER)])


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


@dataclasses.dataclass
class Header:
    """What a checkpoint says about itself, read and checked without reading its tensors: the kind, config,
    diffusion and extra of its metadata, and the shape of every tensor (checked against the config)."""

    kind: str
    config: Any
    diffusion: DiffusionConfig | None
    extra: dict
    path: Path
    shapes: dict[str, tuple[int, ...]]
    parameters: int  # the model's parameter count (its buffers, such as statistics, not included)
    # The meta-device model `inspect` built to check the shapes, kept for the first `materialize` to fill (building a
    # network's modules again costs about as much as reading its tensors, at every command's start)
    shell: nn.Module | None = dataclasses.field(default=None, repr=False, compare=False)


def _build(kind: str, config, path: Path) -> nn.Module:
    """The model a config describes, on the meta device (shapes only: nothing allocated, so a billion-parameter config
    builds in a moment) and without running its initialisation, which on meta tensors computes nothing yet costs
    a third of building: the five networks of weights/emoji built in 0.036-0.064 s instead of 0.080-0.087 s (two runs on
    the 2-core machine, issue 25)."""
    try:
        with torch.device("meta"), _no_init():
            return KINDS[kind][1](config)
    except Exception as e:  # whatever a well-typed but impossible config makes the constructor raise
        raise WeightsError(f"{path}: its config does not build a {kind} model ({type(e).__name__}: {e})", hint=DAMAGED_HINT) from None


_skip = threading.local()  # set while this thread builds a shell: nn.init's functions then return their tensor untouched


@contextlib.contextmanager
def _no_init():
    # nn.init's in-place functions (every torch module's reset_parameters and our models' own init call them) are
    # wrapped once, for all threads, so that only the thread building a shell skips them: a model built with real
    # weights elsewhere in the process at the same moment is initialised as usual.
    if not getattr(nn.init, "_unclip_skippable", False):
        for name in [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]:
            setattr(nn.init, name, _skippable(getattr(nn.init, name)))
        nn.init._unclip_skippable = True
    _skip.on = True
    try:
        yield
    finally:
        _skip.on = False


def _skippable(init):
    @functools.wraps(init)
    def wrapped(*args, **kwargs):
        if getattr(_skip, "on", False):
            return args[0] if args else kwargs.get("tensor")
        return init(*args, **kwargs)

    return wrapped


def inspect(path: str | Path, kind: str | None = None) -> Header:
    """Read a checkpoint's metadata and tensor shapes (not its tensors) and check every key and shape
    against the model its config builds. Quick for any size of model."""
    from safetensors import safe_open

    path = Path(path)
    meta = read_metadata(path)
    if kind is not None and meta.get("kind") != kind:
        raise WeightsError(f"{path}: expected a {kind} checkpoint, found {meta.get('kind')!r}")
    kind = meta["kind"]
    if kind not in KINDS:
        raise WeightsError(f"{path}: unknown checkpoint kind {kind!r}")
    config_cls, _ = KINDS[kind]
    config = _parse(path, meta, "config", lambda d: config_from_dict(config_cls, d))
    diffusion = None
    if meta.get("diffusion"):  # "" for the CLIP, which is not a diffusion model
        diffusion = _parse(path, meta, "diffusion", lambda d: check_diffusion(config_from_dict(DiffusionConfig, d)))
    extra = _parse(path, meta, "extra", _json_object) if meta.get("extra") else {}
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise WeightsError(f"{path}: tensors could not be read ({e})", hint="the file is truncated or corrupted") from None
    shell = _build(kind, config, path)
    expected = {k: tuple(v.shape) for k, v in shell.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise WeightsError(f"{path}: keys do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, shape in expected.items():
        if shape != shapes[k]:
            raise WeightsError(f"{path}: tensor {k} has shape {shapes[k]}, config says {shape}")
    return Header(kind, config, diffusion, extra, path, shapes, sum(p.numel() for p in shell.parameters()), shell)


def materialize(header: Header, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Read the tensors of an inspected checkpoint into its model (in eval mode), refusing NaN and inf.

    Tensors are read one at a time, each cast once, straight to the dtype it will have (float32, or `dtype` for
    floating-point tensors), and becomes the model's own: a multi-gigabyte file never sits in memory beside
    the network made from it (what keeps --offload's peak at one network)."""
    from safetensors import safe_open

    path = header.path
    model, header.shell = header.shell or _build(header.kind, header.config, path), None  # a shell is filled once
    expected = model.state_dict()
    state = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            if keys != set(header.shapes) or any(tuple(f.get_slice(k).get_shape()) != header.shapes[k] for k in keys):
                raise WeightsError(f"{path}: the file changed since it was inspected", hint="reload the model set")
            for k in sorted(keys):
                state[k] = _cast(path, k, f.get_tensor(k), dtype if dtype is not None else expected[k].dtype)
    except WeightsError:
        raise
    except Exception as e:
        raise WeightsError(f"{path}: tensors could not be read ({e})", hint="the file is truncated or corrupted") from None
    model.load_state_dict(state, strict=True, assign=True)
    for m in model.modules():  # derived, non-persistent buffers (the CLIP's causal mask) are computed, not stored
        if hasattr(m, "reset_buffers"):
            m.reset_buffers()
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):  # a module whose buffers nobody recomputes
        raise WeightsError(f"{path}: the {header.kind} model has tensors the file does not hold", hint=DAMAGED_HINT)
    if torch.device(device).type != "cpu":  # the tensors were read onto the CPU
        model = model.to(device=device)
    if dtype is not None and dtype != torch.float32:  # the stored tensors are cast already; computed buffers are float32
        model = model.to(dtype=dtype)
    return model.eval()


def _cast(path: Path, k: str, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A floating-point tensor checked for NaN and inf and cast to `dtype`; any other as it is."""
    if not v.is_floating_point():
        return v
    # A sum is NaN or inf exactly when an element is, as long as the sum of the largest finite values cannot
    # overflow: float16's (65504) in float32 for under 5e33 elements, float32's or bfloat16's (3.4e38) in float64 for
    # any count a file can hold. The float32 sum of the cast tensor is the cheapest check of the float16 files sets ship (the
    # float64 sum of float16 took most of the time to read a set).
    w = v.to(dtype)
    wide = torch.float32 if v.dtype == torch.float16 and w.dtype == torch.float32 else torch.float64
    if not torch.isfinite((w if wide == torch.float32 else v).sum(dtype=wide)):
        raise WeightsError(f"{path}: tensor {k} contains NaN or inf", hint="the checkpoint is corrupted")
    return w


def load(path: str | Path, kind: str | None = None, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Checkpoint:
    """Rebuild a model from its file alone, checking every key and shape."""
    header = inspect(path, kind)
    model = materialize(header, device, dtype)
    return Checkpoint(header.kind, model, header.config, header.diffusion, header.extra, header.path)
