"""Which torch device a run uses: `auto` picks CUDA, then Apple's MPS, then the CPU."""

from __future__ import annotations

import torch

from unclip_cli.errors import InputError

DEVICES = ("auto", "cpu", "cuda", "mps")


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
