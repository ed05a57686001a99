"""One training loop for every stage: AdamW with warm-up, gradient clipping, EMA, time and step
budgets, atomic checkpoints every few minutes, exact resume, clean stops on SIGINT/SIGTERM, a halt on a
non-finite loss, and DistributedDataParallel under torchrun (only rank 0 writes).

Run layout:  RUN/STAGE/run.json  state.safetensors  metrics.jsonl  samples/step-N.png
Prior and decoder also use RUN/frozen_clip.safetensors and RUN/embeddings/ (see stages.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from unclip_cli.checkpoint import atomic_write
from unclip_cli.errors import UnclipError
from unclip_cli.presets import load_preset
from unclip_cli.train.common import EMA, init_distributed, load_state, lr_at, save_state
from unclip_cli.train.stages import STAGES, TASKS, adopt_clip, init_from_set


@dataclass
class TrainOptions:
    stage: str
    run: Path
    data: str
    preset: str = "emoji"
    max_minutes: float | None = None
    max_steps: int | None = None
    resume: bool = False
    init_from: Path | None = None  # a model set whose weights start a new run (fine-tuning)
    batch_size: int | None = None
    lr: float | None = None
    checkpoint_minutes: float = 10.0
    seed: int = 0
    device: str = "auto"
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    log_seconds: float = 10.0


@dataclass
class Progress:
    step: int
    max_steps: int | None
    loss: float
    images_per_s: float
    elapsed: float
    max_seconds: float | None
    event: str = "step"  # step | checkpoint | done


class BatchOrder:
    """Epoch-wise permutations of the training indices; rank r takes every world_size-th index. The
    position (epoch, offset) goes into the training state, so a resumed run sees the same batches."""

    def __init__(self, indices: np.ndarray, batch: int, seed: int, rank: int, world: int, epoch=0, offset=0):
        self.indices, self.batch, self.seed, self.rank, self.world = indices, batch, seed, rank, world
        self.epoch, self.offset = epoch, offset

    def next(self) -> np.ndarray:
        out = []
        while len(out) < self.batch:  # a batch may run into the next epoch (or several, for tiny data)
            perm = np.random.default_rng(self.seed + self.epoch).permutation(self.indices)[self.rank :: self.world]
            take = perm[self.offset : self.offset + self.batch - len(out)]
            out.extend(take.tolist())
            self.offset += len(take)
            if self.offset >= len(perm):
                self.epoch, self.offset = self.epoch + 1, 0
        return np.asarray(out)


def rank_checksums(model: torch.nn.Module, world_size: int) -> list[float]:
    """Each rank's float64 sum of its weights; DDP keeps them equal, and a desynchronised run shows here."""
    import torch.distributed as tdist

    local = torch.stack([sum(p.detach().double().sum() for p in model.parameters())])  # on the model device (NCCL needs GPU tensors)
    gathered = [torch.zeros_like(local) for _ in range(world_size)]
    tdist.all_gather(gathered, local)
    return [g.item() for g in gathered]


def train(opts: TrainOptions, on_progress: Callable[[Progress], None] | None = None) -> dict:
    from unclip_cli.engine import pick_device

    if opts.stage not in STAGES:
        raise UnclipError(f"unknown stage {opts.stage!r}", hint=f"choose from {', '.join(STAGES)}")
    device = pick_device(opts.device)
    dist = init_distributed(device)
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if device.type == "cuda":
        # TF32 matmuls and convolutions (Ampere and later run them several times faster than fp32); a
        # 10-bit mantissa is far below the noise of diffusion and contrastive losses. These flags are set
        # in the training process only; the engine chooses its own precision for sampling.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes per stage: pick the fastest kernels once
    preset = load_preset(opts.preset)
    hp = preset["train"][opts.stage]
    batch = opts.batch_size or hp["batch_size"]
    base_lr = opts.lr or hp["lr"]
    run = Path(opts.run)
    stage_dir = run / opts.stage
    state_path = stage_dir / "state.safetensors"
    if state_path.exists() and not opts.resume:
        raise UnclipError(f"{stage_dir} already has a training state", hint="pass --resume to continue it, or choose another --run")
    if opts.resume and not state_path.exists():
        raise UnclipError(f"nothing to resume in {stage_dir}", hint="drop --resume to start a new run")
    if opts.init_from is not None and opts.resume:
        raise UnclipError("--init-from starts a new run and --resume continues one", hint="pass only one of them")

    torch.manual_seed(opts.seed)
    # Rank 0 builds the caches and embeddings first; the others then read them.
    if not dist.is_main:
        dist.barrier()
    if opts.init_from is not None and dist.is_main:
        adopt_clip(run, Path(opts.init_from), opts.stage)
    task = TASKS[opts.stage](preset, opts.data, run, device)
    if dist.is_main:
        dist.barrier()
    started_from = init_from_set(task, Path(opts.init_from)) if opts.init_from is not None else None
    model = task.model
    task.net = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        task.net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        if hasattr(task, "configure_distributed"):
            task.configure_distributed(dist.rank, dist.world_size)
    ema = EMA(model, opts.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=base_lr, betas=(0.9, 0.999), weight_decay=hp.get("weight_decay", 0.01))

    info = {"stage": opts.stage, "preset": opts.preset, "config": dataclasses.asdict(task.config),
            "diffusion": dataclasses.asdict(task.diffusion_cfg) if task.diffusion_cfg else None,
            "extra": task.extra, "batch_size": batch, "world_size": dist.world_size, "data": str(opts.data)}
    meta = {"step": 0, "epoch": 0, "offset": 0, "images_seen": 0, "seconds": 0.0, "last_loss": None, "warmup_from": 0}
    if started_from is not None:
        # The step count goes on from the set's, so exports and model cards count all of its training;
        # the optimiser's moments are new, so the learning rate warms up again from here.
        meta.update(step=started_from["trained_steps"], images_seen=started_from["images_seen"],
                    seconds=started_from["train_seconds"], warmup_from=started_from["trained_steps"])
        info["init_from"] = started_from
    if opts.resume:
        meta = load_state(state_path, model, ema, opt)
        info = {**json.loads((stage_dir / "run.json").read_text()), "resumed_at": meta["step"]}
        # Facts the task records that the run predates (e.g. the decoder's mean image) join run.json.
        missing = {k: v for k, v in task.extra.items() if k not in info["extra"]}
        if missing and dist.is_main:
            info["extra"] = {**info["extra"], **missing}
            atomic_write(stage_dir / "run.json", lambda tmp: Path(tmp).write_text(json.dumps(info, indent=1)))
    elif dist.is_main:
        stage_dir.mkdir(parents=True, exist_ok=True)
        info["uid"] = uuid.uuid4().hex
        (stage_dir / "run.json").write_text(json.dumps(info, indent=1))
    order = BatchOrder(task.train_indices(), batch, opts.seed, dist.rank, dist.world_size, meta["epoch"], meta["offset"])

    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    start = time.time()
    seconds0 = meta["seconds"]
    last_ckpt = last_log = start
    max_seconds = opts.max_minutes * 60 if opts.max_minutes else None
    window_images, window_start, loss_avg = 0, start, None
    first_step = meta["step"] + 1  # logged at once, whatever the step count a run starts or resumes from

    def checkpoint(event: str) -> None:
        meta.update(epoch=order.epoch, offset=order.offset, seconds=seconds0 + time.time() - start)
        if dist.enabled:
            meta["rank_checksums"] = rank_checksums(model, dist.world_size)
        if dist.is_main:
            save_state(state_path, model, ema, opt, meta)
            (stage_dir / "samples").mkdir(exist_ok=True)
            task.sample_grid(ema.model, stage_dir / "samples" / f"step-{meta['step']:07d}.png")
        if on_progress:
            on_progress(Progress(meta["step"], opts.max_steps, loss_avg or float("nan"), 0.0, time.time() - start, max_seconds, event))

    try:
        model.train()
        while True:
            if opts.max_steps is not None and meta["step"] >= opts.max_steps:
                break
            step = meta["step"]
            gen = torch.Generator().manual_seed(opts.seed * 1_000_003 + dist.rank * 7919 + step)
            idx = order.next()
            for g in opt.param_groups:
                g["lr"] = lr_at(step - meta.get("warmup_from", 0), base_lr, hp.get("warmup", 0))
            loss = task.loss(idx, gen)
            if not torch.isfinite(loss):
                raise UnclipError(
                    f"the {opts.stage} loss became {loss.item()} at step {step}; stopped, the last good checkpoint "
                    f"in {state_path} is kept",
                    hint="resume with --resume and a lower --lr",
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
            opt.step()
            task.after_step()
            ema.update(model, step)
            value = loss.item()
            loss_avg = value if loss_avg is None else 0.98 * loss_avg + 0.02 * value
            meta.update(step=step + 1, images_seen=meta["images_seen"] + len(idx) * dist.world_size, last_loss=value)
            window_images += len(idx) * dist.world_size
            now = time.time()
            if now - last_log >= opts.log_seconds or meta["step"] == first_step:
                ips = window_images / max(now - window_start, 1e-9)
                if dist.is_main:
                    with open(stage_dir / "metrics.jsonl", "a") as f:
                        f.write(json.dumps({"step": meta["step"], "loss": value, "loss_avg": loss_avg, "lr": opt.param_groups[0]["lr"],
                                            "images_per_s": ips, "images_seen": meta["images_seen"],
                                            "seconds": seconds0 + now - start}) + "\n")
                if on_progress:
                    on_progress(Progress(meta["step"], opts.max_steps, loss_avg, ips, now - start, max_seconds))
                last_log, window_images, window_start = now, 0, now
            out_of_time = max_seconds is not None and now - start >= max_seconds
            stop_now, checkpoint_due = dist.any([stop["signal"] is not None or out_of_time, now - last_ckpt >= opts.checkpoint_minutes * 60], device)
            if stop_now:
                break  # the final checkpoint follows
            if checkpoint_due:
                checkpoint("checkpoint")
                last_ckpt = time.time()
        checkpoint("done")
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
    dist.close()
    return {"stage": opts.stage, "run": str(run), "step": meta["step"], "images_seen": meta["images_seen"],
            "seconds": meta["seconds"], "loss": meta["last_loss"], "loss_avg": loss_avg,
            "interrupted": stop["signal"] is not None, "state": str(state_path)}
