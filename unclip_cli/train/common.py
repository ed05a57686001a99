"""Pieces of the training loop that do not depend on the stage: EMA, the learning-rate schedule,
distributed set-up, and the resumable training state (safetensors + JSON, never pickle)."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.nn.functional  # noqa: F401  before any process group exists: see below
import torch.nn as nn

from unclip_cli.checkpoint import atomic_write


# -- distributed --------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def any(self, flags: list[bool], device: torch.device) -> list[bool]:
        """Each flag True on every rank when it is True on any, in one collective: time limits, signals and
        checkpoint clocks are per-process, and a rank that stops or checkpoints alone leaves the others
        waiting in a collective."""
        if not self.enabled:
            return list(flags)
        t = torch.tensor([float(f) for f in flags], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def close(self, together: bool = True) -> None:
        """Leave the process group. After a run that ended normally every rank comes here from the same
        last collective, and a barrier makes sure no rank leaves while another is still talking to it.
        After an error the other ranks may be anywhere (`together=False`): leave at once, so that their
        next collective fails instead of waiting out the timeout."""
        if self.enabled and dist.is_initialized():
            if together:
                dist.barrier()
            dist.destroy_process_group()


def init_distributed(device: torch.device) -> Dist:
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on GPUs, gloo on CPUs.

    torch.distributed.nn.functional, which DDP imports on first use, binds `group=group.WORLD` as the
    default argument of its functions when it is imported. Imported while a process group exists, it
    holds that group for good, and `destroy_process_group` can no longer free it: gloo's threads and
    sockets then live on until the process exits, so the ranks really part at their unsynchronised
    exits, each tearing gloo down while its peer's connections drop (the suspected cause of a rank that
    ended with SIGABRT now and then). This module imports it first, while the defaults are still None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


# -- EMA ----------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of weights, with the usual warm-up so early averages are not stale."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        # One fused call on a GPU instead of a kernel launch per tensor; the same per-tensor lerp on a CPU.
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


def lr_at(step: int, base_lr: float, warmup: int) -> float:
    """Linear warm-up, then constant: runs are open-ended and resumed, so no schedule end is assumed."""
    return base_lr * min(1.0, (step + 1) / max(1, warmup))


# -- training state -------------------------------------------------------------------------------------
def save_state(path: Path, model: nn.Module, ema: EMA, opt: torch.optim.Optimizer, meta: dict) -> None:
    """Model, EMA, optimiser moments and RNG state as tensors in one safetensors file; the rest as JSON
    metadata. Written atomically, so an interrupted save leaves the previous state intact."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.model.state_dict().items()})
    opt_state = opt.state_dict()
    for pid, st in opt_state["state"].items():
        for name, v in st.items():
            tensors[f"opt.{pid}.{name}"] = torch.as_tensor(v).detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {**meta, "param_groups": opt_state["param_groups"]}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"state": json.dumps(meta)}))


def load_state(path: Path, model: nn.Module, ema: EMA, opt: torch.optim.Optimizer) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["state"])
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    ema.model.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}, strict=True)
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
    torch.set_rng_state(tensors["rng.torch"])
    return meta


def read_state_meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["state"])


def load_ema_weights(path: Path, model: nn.Module) -> dict:
    """Load only the EMA weights of a training state into `model`; returns the state's metadata."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    model.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}, strict=True)
    return read_state_meta(path)
