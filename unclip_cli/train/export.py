"""Export a training run's EMA weights as an inference model set (see `unclip_cli.modelset`)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from unclip_cli import checkpoint
from unclip_cli.checkpoint import config_from_dict
from unclip_cli.diffusion.gaussian import DiffusionConfig
from unclip_cli.errors import UnclipError
from unclip_cli.imageio import signals_deferred
from unclip_cli.modelset import FILES
from unclip_cli.train.common import load_ema_weights
from unclip_cli.train.stages import STAGES

# The files `load_model_set` reads as stages: the four of FILES, and further upsamplers by glob.
STAGE_FILE_PATTERNS = ("clip.safetensors", "prior.safetensors", "decoder.safetensors", "upsampler*.safetensors")


def export(run: str | Path, to: str | Path, dtype: torch.dtype = torch.float16, force: bool = False,
           base: str | Path | None = None) -> list[Path]:
    """Write clip/prior/decoder/upsampler .safetensors into `to` from the run's latest states.

    The CLIP written is the frozen copy the prior and decoder were trained against, so the set is
    consistent by construction. With `base` (a model set, e.g. the one the run was started from with
    --init-from), the files the run has not trained come from it, if they share its CLIP.

    The four files replace every stage file in `to` (a stale upsampler-2.safetensors too); other files
    stay. They are written under hidden temporary names first and renamed into place at the end, so an
    export that fails or is interrupted while writing leaves the previous set as it was."""
    run, to = Path(run), Path(to)
    if not run.is_dir():
        raise UnclipError(f"{run}: no such training run")
    sources: dict[str, Path] = {}  # stage -> a training state or a base checkpoint
    frozen = run / "frozen_clip.safetensors"
    sources["clip"] = frozen if frozen.is_file() else Path(base) / FILES["clip"] if base else frozen
    for stage in STAGES[1:]:
        state = run / stage / "state.safetensors"
        sources[stage] = state if state.is_file() or not base else Path(base) / FILES[stage]
    missing = [s for s, p in sources.items() if not p.is_file()]
    if "clip" in missing:
        raise UnclipError(f"{run} has no frozen CLIP yet", hint="train the prior or decoder first (they freeze the run's CLIP), or pass --base SET")
    if missing:
        raise UnclipError(f"{run} has no trained {', '.join(missing)}",
                          hint=f"train them (unclip train {missing[0]} --run {run} ...), or take them from a model set with --base SET")
    if stage_files(to) and not force:
        raise UnclipError(f"{to} already holds a model set", hint="pass --force to replace it")
    # Everything is read before anything is written: `to` may be `base` itself.
    clip = checkpoint.load(sources["clip"], "clip")
    outputs = {"clip": (clip.model, clip.config, None, clip.extra)}
    for stage in STAGES[1:]:
        if sources[stage].parent == run / stage:
            model, cfg, diffusion, extra = _trained(run, stage)
        else:
            ck = checkpoint.load(sources[stage], stage)
            model, cfg, diffusion, extra = ck.model, ck.config, ck.diffusion, ck.extra
        if stage in ("prior", "decoder") and extra.get("clip_uid") != clip.extra["uid"]:
            raise UnclipError(f"{sources[stage]} was trained with another CLIP than {sources['clip']}",
                              hint=f"retrain {stage} against the run's frozen CLIP")
        outputs[stage] = (model, cfg, diffusion, extra)
    to.mkdir(parents=True, exist_ok=True)
    staged: dict[Path, Path] = {}  # final name -> temporary file, hidden from the glob of stage files
    try:
        for stage, (model, cfg, diffusion, extra) in outputs.items():
            fd, tmp = tempfile.mkstemp(dir=to, prefix=f".{FILES[stage]}.", suffix=".tmp")
            os.close(fd)
            staged[to / FILES[stage]] = Path(tmp)
            checkpoint.save(tmp, stage, model, cfg, diffusion, extra, dtype=dtype)
            os.chmod(tmp, 0o666 & ~checkpoint.process_umask())  # mkstemp makes 0600; a set gets the usual mode
        with signals_deferred():  # a handful of renames, not split by Ctrl-C
            for stale in set(stage_files(to)) - set(staged):
                stale.unlink()
            for final, tmp in staged.items():
                os.replace(tmp, final)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
    return list(staged)


def _trained(run: Path, stage: str):
    """(model, config, diffusion, extra) of a run's stage from its latest state's EMA weights."""
    info = json.loads((run / stage / "run.json").read_text())
    cfg_cls, model_cls = checkpoint.KINDS[stage]
    cfg = config_from_dict(cfg_cls, info["config"])
    model = model_cls(cfg)
    meta = load_ema_weights(run / stage / "state.safetensors", model)
    extra = {**info["extra"], "uid": f"{info['uid']}-step{meta['step']}", "trained_steps": meta["step"],
             "images_seen": meta["images_seen"], "train_seconds": round(meta["seconds"], 1),
             "final_loss": meta.get("last_loss"), "world_size": info.get("world_size", 1)}
    if info.get("init_from"):
        extra["init_from"] = info["init_from"]["uid"]
    diffusion = config_from_dict(DiffusionConfig, info["diffusion"]) if info.get("diffusion") else None
    return model, cfg, diffusion, extra


def append_upsampler(run: str | Path, base: str | Path, to: str | Path, dtype: torch.dtype = torch.float16,
                     force: bool = False) -> list[Path]:
    """Model set `base` with the run's upsampler as one more stage after its last (`upsampler-K.safetensors`).

    The run's upsampler may take the image before it downsized by a whole factor (emoji: its 128 px
    output -> 64 -> 256 by a stage trained on 64 px; see `modelset._chain`). `to` is `base` itself (the
    stage file is added) or a new folder, which gets a copy of every file of `base` first. The stage is
    checked against the chain before anything is written, then written under a hidden name and renamed
    into place."""
    from types import SimpleNamespace

    from unclip_cli.modelset import _chain, load_model_set

    run, base, to = Path(run), Path(base), Path(to)
    if not (run / "upsampler" / "state.safetensors").is_file():
        raise UnclipError(f"{run} has no trained upsampler", hint=f"train one: unclip train upsampler --run {run} ...")
    models = load_model_set(base)
    name = f"upsampler-{len(models.upsamplers) + 1}.safetensors"
    same = to.exists() and to.resolve() == base.resolve()
    if not same and stage_files(to) and not force:
        raise UnclipError(f"{to} already holds a model set", hint="pass --force to replace it")
    model, cfg, diffusion, extra = _trained(run, "upsampler")
    _chain(SimpleNamespace(extra=extra, path=run / "upsampler"), models.image_size)
    to.mkdir(parents=True, exist_ok=True)
    if not same:
        for stale in stage_files(to):
            stale.unlink()
        for f in sorted(base.iterdir()):
            if f.is_file() and not f.name.startswith("."):
                shutil.copy2(f, to / f.name)
    fd, tmp = tempfile.mkstemp(dir=to, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    try:
        checkpoint.save(tmp, "upsampler", model, cfg, diffusion, extra, dtype=dtype)
        os.chmod(tmp, 0o666 & ~checkpoint.process_umask())
        os.replace(tmp, to / name)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return [to / name]


def stage_files(folder: Path) -> list[Path]:
    """The stage files of a model set folder: what `load_model_set` would read."""
    return sorted({p for pattern in STAGE_FILE_PATTERNS for p in Path(folder).glob(pattern) if p.is_file()})
