"""What every converter shares: reading another project's folders, checking their configs before anything is
allocated, planning each output tensor from the source tensors, and writing the set.

A family's file (`karlo.py`) holds only its tables: which folders it reads, how their config fields become our
networks' configs, and which source tensors make each of our tensors. Everything read from a folder is
untrusted: config values are checked for type and range (`Fields`), layer counts and widths against the
shapes in the weight files' headers (`Tensors.shape`, no tensor data read) before a network is built even on
the meta device, and every tensor for NaN and infinity as it is written.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from unclip_cli import checkpoint
from unclip_cli.diffusion.gaussian import DiffusionConfig
from unclip_cli.errors import InputError

WEIGHT_NAMES = ("diffusion_pytorch_model", "model", "pytorch_model")
IGNORED = ("position_ids",)  # buffers older transformers checkpoints store; recomputed, not weights
SMALL = 1024  # tensors with fewer values (norms, biases, statistics) stay float32, as `checkpoint.save` keeps them
REQUIRED = object()  # Fields: no default, the file must hold the field


def fail(message: str, hint: str | None = None):
    raise InputError(message, hint=hint)


def show(value) -> str:
    """A value read from a file, as JSON (control characters escaped), cut short for a one-line message."""
    try:
        text = json.dumps(value, default=repr)
    except (RecursionError, ValueError):
        return "a value nested too deeply"
    return text if len(text) <= 40 else text[:37] + "..."


# -- config fields --------------------------------------------------------------------------------------------------
class Fields:
    """Typed, bounded access to one config file's fields; every refusal names the file and the field.

    A field the file omits takes `default` (diffusers' or transformers' own default, as they read the file)."""

    def __init__(self, path: Path, cfg: dict):
        self.path, self.cfg = path, cfg

    def refuse(self, name: str, expected: str, value=REQUIRED):
        value = self.cfg.get(name) if value is REQUIRED else value
        fail(f"{self.path}: field {name} is {show(value)}; {expected}")

    def get(self, name: str, default=REQUIRED):
        if name in self.cfg:
            return self.cfg[name]
        if default is REQUIRED:
            fail(f"{self.path}: missing field {name}", hint="the file is not the config this converter reads, or it is damaged")
        return default

    def int(self, name: str, lo: int, hi: int, default=REQUIRED) -> int:
        v = self.get(name, default)
        if type(v) is not int or not lo <= v <= hi:
            self.refuse(name, f"expected an integer from {lo:,} to {hi:,}", v)
        return v

    def ints(self, name: str, lo: int, hi: int, length: tuple[int, int], default=REQUIRED) -> tuple[int, ...]:
        v = self.get(name, default)
        if not isinstance(v, (list, tuple)) or not length[0] <= len(v) <= length[1] or any(type(x) is not int or not lo <= x <= hi for x in v):
            self.refuse(name, f"expected a list of {length[0]}-{length[1]} integers from {lo:,} to {hi:,}", v)
        return tuple(v)

    def strs(self, name: str, length: tuple[int, int], default=REQUIRED) -> tuple[str, ...]:
        v = self.get(name, default)
        if not isinstance(v, (list, tuple)) or not length[0] <= len(v) <= length[1] or any(not isinstance(x, str) for x in v):
            self.refuse(name, f"expected a list of {length[0]}-{length[1]} names", v)
        return tuple(v)

    def number(self, name: str, lo: float, hi: float, default=REQUIRED) -> float:
        v = self.get(name, default)
        if type(v) not in (int, float) or not lo <= v <= hi:  # NaN fails the comparison
            self.refuse(name, f"expected a number from {lo:g} to {hi:g}", v)
        return float(v)

    def one_of(self, name: str, allowed: tuple, default=REQUIRED):
        """A field whose value must be one of those our networks express (bools and numbers compared by type too)."""
        v = self.get(name, default)
        if not any(type(v) is type(a) and v == a or v is a for a in allowed) and not (
                type(v) in (int, float) and any(type(a) in (int, float) and v == a for a in allowed)):
            self.refuse(name, f"unclip's networks express {', '.join(map(show, allowed))}", v)
        return v

    def check(self, ok: bool, name: str, expected: str) -> None:
        if not ok:
            self.refuse(name, expected)


# -- reading a folder -----------------------------------------------------------------------------------------------
MAX_JSON_BYTES = 32 * 2**20  # configs are kilobytes and a tokenizer.json a few megabytes: larger is not one of them


def read_json(path: Path, what: str) -> dict:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            fail(f"{path}: {path.stat().st_size / 2**20:,.0f} MB, too large for {what} (at most {MAX_JSON_BYTES // 2**20} MB)")
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        fail(f"{path.parent}: missing {path.name} ({what})")
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: a hostile, deeply nested file
        fail(f"{path}: not readable JSON ({type(e).__name__}: {str(e)[:80]})")
    if not isinstance(data, dict):
        fail(f"{path}: not a JSON object")
    return data


class Tensors:
    """The weights of one component folder, read one tensor at a time: `.safetensors` (possibly sharded)
    through safetensors' lazy reader, `.bin` through torch.load(weights_only=True, mmap=True). `shape` reads
    the file's header only."""

    def __init__(self, folder: Path, what: str):
        self.folder, self.what = folder, what
        self._handles: list = []
        self._where: dict[str, object] = {}
        for f in self._files():
            if f.suffix == ".safetensors":
                from safetensors import safe_open

                try:
                    h = safe_open(str(f), framework="pt")
                except Exception as e:
                    fail(f"{f}: not a readable safetensors file ({str(e)[:120]})", hint="the download is incomplete or damaged")
                self._handles.append(h)
                for k in h.keys():
                    self._where[k] = h
            else:
                try:
                    try:
                        state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                    except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
                        state = torch.load(f, map_location="cpu", weights_only=True)
                except Exception as e:  # weights_only refuses pickled code: such a file is not a plain state dict
                    fail(f"{f}: not a plain PyTorch state dict ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})",
                         hint="only tensors are read from .bin files (torch.load weights_only=True); convert it to safetensors")
                if not isinstance(state, dict):
                    fail(f"{f}: holds a {type(state).__name__}, not a state dict")
                for k, v in state.items():
                    if torch.is_tensor(v):
                        self._where[k] = state
        self.keys = {k for k in self._where if not k.endswith(IGNORED)}

    def _files(self) -> list[Path]:
        for name in WEIGHT_NAMES:
            for variant in ("", ".fp16"):
                for ext in (".safetensors", ".bin"):
                    f = self.folder / f"{name}{variant}{ext}"
                    if f.is_file():
                        return [f]
                    index = self.folder / f"{name}{variant}{ext}.index.json"
                    if index.is_file():
                        weight_map = read_json(index, "a shard index").get("weight_map")
                        if not isinstance(weight_map, dict) or not all(isinstance(s, str) and "/" not in s and s not in ("", ".", "..")
                                                                       for s in weight_map.values()):
                            fail(f"{index}: not a shard index (weight_map must name shard files in its folder)")
                        shards = sorted(set(weight_map.values()))
                        missing = [s for s in shards if not (self.folder / s).is_file()]
                        if missing:
                            fail(f"{self.folder}: missing weight shard {show(missing[0])} of {self.what}")
                        return [self.folder / s for s in shards]
        fail(f"{self.folder}: no weights for {self.what} (expected {WEIGHT_NAMES[0]}.safetensors or model.safetensors, or a .bin)")

    def under(self, prefix: str) -> "Tensors":
        """Name every tensor as under `prefix` when none is: transformers 5 saves CLIPTextModel without the
        `text_model.` its earlier versions (and the hub's files) have."""
        if self.keys and not any(k.startswith(prefix) for k in self.keys):
            self._where = {prefix + k: v for k, v in self._where.items()}
            self._names = {prefix + k: k for k in self.keys}
            self.keys = {prefix + k for k in self.keys}
        return self

    def _name(self, key: str) -> str:
        return getattr(self, "_names", {}).get(key, key)

    def shape(self, key: str) -> tuple[int, ...]:
        src, name = self._where[key], self._name(key)
        if isinstance(src, dict):
            return tuple(src[name].shape)
        return tuple(src.get_slice(name).get_shape())

    def get(self, key: str) -> torch.Tensor:
        src, name = self._where[key], self._name(key)
        t = src[name] if isinstance(src, dict) else src.get_tensor(name)
        if t.is_floating_point():
            if not bool(torch.isfinite(t).all()):
                fail(f"{self.folder}: tensor {key} has NaN or infinite values", hint="the download is damaged; fetch it again")
            return t.float()
        return t

    def count(self, prefix: str) -> int:
        """How many numbered blocks `prefix.0.`, `prefix.1.`, ... the weights hold (their indices must run 0..n-1)."""
        pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
        found = {int(m.group(1)) for k in self.keys if (m := pattern.match(k))}
        if found and found != set(range(len(found))):
            fail(f"{self.folder}: the weights' {prefix}.N blocks are numbered {sorted(found)[:5]}..., not 0 to {len(found) - 1}")
        return len(found)

    def expect(self, key: str, shape: tuple[int, ...], config: Path, fields: str) -> None:
        """Refuse, before anything is built, a config whose fields disagree with a tensor's shape in the header."""
        if key not in self.keys:
            fail(f"{self.folder}: no tensor {key} ({self.what})", hint="the folder's weights do not match its config.json")
        got = self.shape(key)
        if got != tuple(shape):
            fail(f"{config}: {fields} imply tensor {key} of shape {tuple(shape)}, but the weights hold {got}",
                 hint="the folder's config.json does not describe its weights")

    def expect_count(self, prefix: str, n: int, config: Path, field: str) -> None:
        got = self.count(prefix)
        if got != n:
            fail(f"{config}: field {field} is {show(n)}, but the weights hold {got} {prefix}.N blocks",
                 hint="the folder's config.json does not describe its weights")


@dataclass
class Folder:
    """A checked pipeline folder: its model_index and each component's config."""

    root: Path
    index: dict
    configs: dict[str, dict]
    parts: dict[str, str]

    def tensors(self, part: str) -> Tensors:
        return Tensors(self.root / part, self.parts[part])

    def config_path(self, part: str) -> Path:
        return self.root / part / config_name(part)


def config_name(part: str) -> str:
    return {"tokenizer": "tokenizer_config.json", "feature_extractor": "preprocessor_config.json"}.get(
        part, "scheduler_config.json" if part.endswith("scheduler") else "config.json")


def read_folder(root: str | Path, parts: dict[str, str], pipeline: str, hint: str) -> Folder:
    """Check a pipeline folder holds every part (a one-line error naming the first one missing) and read the configs."""
    root = Path(root)
    if not root.is_dir():
        fail(f"{root}: no such folder", hint="pass the folder the pipeline was downloaded to (it holds model_index.json)")
    index = read_json(root / "model_index.json", f"the index of a diffusers {pipeline} folder")
    cls = index.get("_class_name")
    if cls not in (pipeline, None):
        fail(f"{root}: a diffusers {show(cls)} folder, not {pipeline}", hint=hint)
    configs = {part: read_json(root / part / config_name(part), what) if (root / part).is_dir() else fail(f"{root}: missing {part}/ ({what})")
               for part, what in parts.items()}
    return Folder(root, index, configs, parts)


# -- planning and writing -------------------------------------------------------------------------------------------
Rule = tuple[str, list[str]]  # (how, source keys): copy, cat (q, k, v), cat1 (as 1x1 conv), t (transpose), flat, logit


def _apply(how: str, srcs: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    if how == "copy":
        return srcs[0]
    if how == "cat":
        return torch.cat(srcs, dim=0)
    if how == "cat1":  # Linear weights as a 1x1 Conv1d's
        return torch.cat(srcs, dim=0)[..., None]
    if how == "t":
        return srcs[0].t()
    if how == "flat":
        return srcs[0].reshape(shape)
    if how == "logit":  # OpenAI's CLIP ends training at its clamp, 100; only training reads it
        return torch.tensor(math.log(100.0))
    raise ValueError(how)


def _source_shape(how: str, shape: tuple[int, ...], n: int) -> list[tuple[int, ...]]:
    if how in ("cat", "cat1"):
        rows = shape[0] // n
        return [(rows, *shape[1:2])] * n if how == "cat1" else [(rows, *shape[1:])] * n
    if how == "t":
        return [tuple(reversed(shape))]
    return [shape] * n


def plan(kind: str, config, mapping: dict[str, tuple[str, Rule]], readers: dict[str, Tensors], dtype: torch.dtype, label: str):
    """The tensors of one output file: (name, shape, dtype, make) for checkpoint.save_streaming, with every
    name and shape checked against our network built from `config` (on the meta device: call it only after
    the config's layer counts and widths were checked against the headers) and every source tensor used."""
    expected = {k: (tuple(v.shape), v.dtype) for k, v in checkpoint._build(kind, config, Path(label)).state_dict().items()}
    missing = sorted(set(expected) - set(mapping))
    if missing:  # a bug in the maps, not in the folder
        raise RuntimeError(f"no source for {missing[:3]} in the {label} map")
    used: dict[str, set] = {}
    items = []
    for name, (shape, own_dtype) in expected.items():
        part, (how, keys) = mapping[name]
        if keys:
            reader = readers[part]
            absent = [k for k in keys if k not in reader.keys]
            if absent:
                fail(f"{reader.folder}: no tensor {absent[0]} ({reader.what})", hint="the folder's weights do not match its config.json")
            used.setdefault(part, set()).update(keys)
            got = [reader.shape(k) for k in keys]
            want = _source_shape(how, shape, len(keys))
            if how != "flat" and any(g != w for g, w in zip(got, want)) or how == "flat" and any(math.prod(g) != math.prod(shape) for g in got):
                fail(f"{reader.folder}: tensor {keys[0]} has shape {got[0]}, its config.json implies {want[0]}")
        out_dtype = own_dtype if not own_dtype.is_floating_point or math.prod(shape) < SMALL else dtype

        def make(part=part, how=how, keys=keys, shape=shape):
            return _apply(how, [readers[part].get(k) for k in keys], shape)

        items.append((name, shape, out_dtype, make))
    for part, keys in used.items():
        unused = sorted(readers[part].keys - keys)
        if unused:
            fail(f"{readers[part].folder}: tensor {unused[0]} is not part of {readers[part].what} as its config.json describes it",
                 hint="the folder's weights do not match its config.json")
    return items


@dataclass
class Plan:
    """Everything a conversion writes, checked before anything is written."""

    files: dict[str, tuple[str, object, DiffusionConfig | None, dict, list]]  # file -> (kind, config, diffusion, extra, items)
    card: str
    sources: tuple[Path, ...] = ()

    @property
    def parameters(self) -> int:
        return sum(math.prod(item[1]) for f in self.files.values() for item in f[4])


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_destination(dst: str | Path, sources, force: bool = False) -> Path:
    """Where a conversion may write, checked before any work: a folder (new, empty, or with --force), never a
    file, never one of the source folders or a folder inside them."""
    dst = Path(dst)
    try:
        where = dst.resolve()
    except (OSError, RuntimeError) as e:
        fail(f"--to {dst}: cannot be resolved ({e})")
    for src in sources:
        if src is not None and _inside(where, Path(src).resolve()):
            fail(f"--to {dst} is inside the source folder {src}", hint="write the converted set to a folder of its own")
    if dst.exists() and not dst.is_dir():
        fail(f"--to {dst} is a file; it must be a folder", hint="choose a new folder name")
    if not force and dst.is_dir() and any(dst.iterdir()):
        fail(f"--to {dst} is not empty", hint="choose a new or empty folder, or pass --force to write the set into it "
             "(files of the same names are replaced; others are left alone)")
    return dst


def write(p: Plan, dst: str | Path, force: bool = False, progress: Callable[[str], None] | None = None) -> Path:
    """Write a planned conversion into `dst`. Each file is written atomically; on any failure (a damaged
    tensor, a full disk, Ctrl-C) the files this call wrote are removed, and the folder if this call made it."""
    dst = check_destination(dst, p.sources, force)
    made = not dst.exists()
    dst.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        clip_uid = None
        for name, (kind, cfg, diffusion, extra, items) in p.files.items():
            if progress:
                progress(name)
            extra = dict(extra)
            if kind != "clip":
                extra["clip_uid"] = clip_uid
            path = dst / name
            uid = checkpoint.save_streaming(path, kind, cfg, items, diffusion, extra)
            written.append(path)
            if kind == "clip":
                clip_uid = uid
        card = dst / "MODEL_CARD.md"
        checkpoint.atomic_write(card, lambda tmp: Path(tmp).write_text(p.card, encoding="utf-8"))
        written.append(card)
    except BaseException:
        for f in written:
            f.unlink(missing_ok=True)
        if made:
            try:
                os.rmdir(dst)
            except OSError:
                pass
        raise
    return dst
