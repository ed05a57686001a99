"""Export a training run's EMA weights as an inference model set (see `unclip_cli.modelset`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from unclip_cli import checkpoint
from unclip_cli.checkpoint import config_from_dict
from unclip_cli.diffusion.gaussian import DiffusionConfig
from unclip_cli.errors import UnclipError
from unclip_cli.train.common import load_ema_weights
from unclip_cli.train.stages import STAGES

FILES = {"clip": "clip.safetensors", "prior": "prior.safetensors", "decoder": "decoder.safetensors", "upsampler": "upsampler.safetensors"}


def export(run: str | Path, to: str | Path, dtype: torch.dtype = torch.float16, force: bool = False) -> list[Path]:
    """Write clip/prior/decoder/upsampler .safetensors into `to` from the run's latest states.

    The CLIP written is the frozen copy the prior and decoder were trained against, so the set is
    consistent by construction; a run whose prior or decoder lacks it cannot be exported."""
    run, to = Path(run), Path(to)
    if not run.is_dir():
        raise UnclipError(f"{run}: no such training run")
    frozen = run / "frozen_clip.safetensors"
    if not frozen.is_file():
        raise UnclipError(f"{run} has no frozen CLIP yet", hint="train the prior or decoder first: they freeze the run's CLIP")
    missing = [s for s in STAGES[1:] if not (run / s / "state.safetensors").is_file()]
    if missing:
        raise UnclipError(f"{run} has no trained {', '.join(missing)}", hint=f"train them: unclip train {missing[0]} --run {run} ...")
    existing = [to / f for f in FILES.values() if (to / f).exists()]
    if existing and not force:
        raise UnclipError(f"{to} already holds a model set", hint="pass --force to replace it")
    written = []
    clip = checkpoint.load(frozen, "clip")
    checkpoint.save(to / FILES["clip"], "clip", clip.model, clip.config, None, clip.extra, dtype=dtype)
    written.append(to / FILES["clip"])
    for stage in STAGES[1:]:
        info = json.loads((run / stage / "run.json").read_text())
        cfg_cls, model_cls = checkpoint.KINDS[stage]
        cfg = config_from_dict(cfg_cls, info["config"])
        model = model_cls(cfg)
        meta = load_ema_weights(run / stage / "state.safetensors", model)
        extra = {**info["extra"], "uid": f"{info['uid']}-step{meta['step']}", "trained_steps": meta["step"],
                 "images_seen": meta["images_seen"], "train_seconds": round(meta["seconds"], 1),
                 "final_loss": meta.get("last_loss"), "world_size": info.get("world_size", 1)}
        if stage in ("prior", "decoder") and extra.get("clip_uid") != clip.extra["uid"]:
            raise UnclipError(f"{run / stage} was trained with another CLIP than {frozen.name}", hint=f"retrain {stage} against the current frozen CLIP")
        diffusion = config_from_dict(DiffusionConfig, info["diffusion"]) if info.get("diffusion") else None
        checkpoint.save(to / FILES[stage], stage, model, cfg, diffusion, extra, dtype=dtype)
        written.append(to / FILES[stage])
    return written
