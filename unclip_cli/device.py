"""Which torch device a run uses (`auto` picks CUDA, then Apple's MPS, then the CPU), and in what precision
a CPU runs the denoising networks (`auto` picks bfloat16 where the CPU computes it natively and the set's
`precision.json` records that bfloat16 kept its quality; see `cpu_has_bf16` and `set_allows_bf16`)."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch

from unclip_cli.errors import InputError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISION_FILE = "precision.json"
# x86: AVX-512 BF16 (Cooper Lake, Zen 4 and later) or AMX (Sapphire Rapids and later); Arm: the BF16 extension.
# Without them oneDNN emulates bfloat16, which is slower than float32.
_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def mps_available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available() else "cpu")
    if device not in DEVICES:
        raise InputError(f"unknown device {device!r}", hint="use auto, cpu, cuda or mps")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but no CUDA GPU is available", hint="use --device cpu or auto")
    if device == "mps" and not mps_available():
        raise InputError("--device mps was asked for, but MPS is not available", hint="use --device cpu or auto")
    return torch.device(device)


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively, from the kernel's CPU flags (Linux; elsewhere: no)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.partition(":")[2].split())
    return bool(flags & _BF16_FLAGS)


def set_allows_bf16(root: str | Path) -> bool:
    """Whether a model set's `precision.json` records that bfloat16 kept its quality on the CPU (`cpu_bf16`:
    true, written after `unclip eval --precision bf16` compared with fp32; see the set's card). The file is
    untrusted: anything but a JSON object whose `cpu_bf16` is a boolean counts as no."""
    path = Path(root) / PRECISION_FILE
    try:
        if not path.is_file() or path.stat().st_size > 1 << 20:
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("cpu_bf16") is True


def resolve_precision(asked: str, device: torch.device, dtype: torch.dtype, set_ok: bool) -> str:
    """The precision a run records: on the CPU in float32 networks, `asked` (auto: bf16 where the CPU has it
    natively and the set allows it, else fp32); elsewhere the networks' own dtype (fp16 on CUDA and MPS)."""
    from unclip_cli.requests import PRECISIONS  # here: training, which picks devices too, never loads the requests

    if device.type != "cpu" or dtype != torch.float32:
        return re.sub(r"^float", "fp", str(dtype).replace("torch.", "")).replace("bfloat16", "bf16")
    if asked not in PRECISIONS:
        raise InputError(f"unknown precision {asked!r}", hint="use auto, fp32 or bf16")
    if asked == "auto":
        return "bf16" if set_ok and cpu_has_bf16() else "fp32"
    return asked


def precision_reason(asked: str, device: torch.device, dtype: torch.dtype, set_ok: bool) -> str:
    """Why `resolve_precision` picks what it picks, in words (what `unclip info` says)."""
    if device.type != "cpu" or dtype != torch.float32:
        return f"the networks' own precision on {device.type}"
    if asked != "auto":
        return f"--precision {asked}"
    native = cpu_has_bf16()
    if native and set_ok:
        return "--precision auto: this CPU computes bfloat16 natively and the set's precision.json records bf16 at fp32's quality"
    if set_ok:
        return "--precision auto: the set allows bf16, but this CPU has no native bfloat16 (emulated, it is slower than fp32)"
    if native:
        return "--precision auto: this CPU computes bfloat16 natively, but the set's precision.json does not record bf16 at fp32's quality"
    return "--precision auto: this CPU has no native bfloat16, and the set records no bf16 measurement"
