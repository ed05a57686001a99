"""One training loop for every stage: AdamW with warm-up, gradient clipping, EMA, time and step
budgets, atomic checkpoints every few minutes, exact resume, clean stops on SIGINT/SIGTERM, a halt on a
non-finite loss, and DistributedDataParallel under torchrun (only rank 0 writes).

Run layout:  RUN/STAGE/run.json  state.safetensors  metrics.jsonl  samples/step-N.png
Prior and decoder also use RUN/frozen_clip.safetensors and RUN/embeddings/ (see stages.py).
"""

from __future__ import annotations

import contextlib
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
from unclip_cli.device import pick_device
from unclip_cli.errors import InputError, UnclipError
from unclip_cli.presets import load_preset
from unclip_cli.train.common import EMA, init_distributed, load_state, lr_at, save_state
from unclip_cli.train.classifier import ClassifierTask
from unclip_cli.train.stages import TASKS as STAGE_TASKS
from unclip_cli.train.stages import Task, adopt_clip, init_from_set

# The model set's stages, and the concept classifier that `unclip eval` measures them with.
TASKS = {**STAGE_TASKS, "classifier": ClassifierTask}


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
    clip_from: Path | None = None  # a model set whose CLIP a new prior or decoder trains against, from new weights
    batch_size: int | None = None
    lr: float | None = None
    checkpoint_minutes: float = 10.0
    seed: int = 0
    device: str = "auto"
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    log_seconds: float = 10.0
    data_on_device: bool | None = None  # decoder, upsampler: data as tensors on the training device; None: on a GPU

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Refuse options a run cannot honour, before any work: one place for the CLI and every other
        caller. The messages name the options as the CLI spells them."""
        if self.stage not in TASKS:
            raise InputError(f"unknown stage {self.stage!r}", hint=f"choose from {', '.join(TASKS)}")
        # A NaN or infinite budget never runs out, and 0 read as "no budget": all three would train forever.
        _positive("--max-minutes", self.max_minutes, "a number of minutes, e.g. --max-minutes 30")
        _positive("--lr", self.lr, "a peak learning rate, e.g. --lr 3e-4")
        for name, value in (("--max-steps", self.max_steps), ("--batch-size", self.batch_size)):
            if value is not None and value < 1:
                raise InputError(f"{name} must be at least 1, not {value}")
        if not self.checkpoint_minutes > 0:  # inf is fine: a checkpoint at the end only
            raise InputError(f"--checkpoint-minutes must be above 0, not {self.checkpoint_minutes}")
        if not 0 <= self.ema_decay < 1:
            raise InputError(f"the EMA decay must be in [0, 1), not {self.ema_decay}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise InputError(f"the gradient clipping norm must be a finite number above 0, not {self.grad_clip}")
        if self.init_from is not None and self.resume:
            raise InputError("--init-from starts a new run and --resume continues one", hint="pass only one of them")
        if self.clip_from is not None:
            if self.init_from is not None or self.resume:
                raise InputError("--clip-from starts a new run from new weights", hint="drop --init-from and --resume (--init-from takes the set's CLIP too)")
            if self.stage not in ("prior", "decoder"):
                raise InputError(f"--clip-from is for the prior and the decoder; the {self.stage} stage {'is' if self.stage == 'clip' else 'never sees'} CLIP")
        if self.data_on_device and not TASKS[self.stage].device_data:
            raise InputError(f"the {self.stage} stage cannot keep its data on the device", hint="drop --data-on-device")
        run = Path(self.run)
        for folder in (run, *run.parents):  # the run folder, or the nearest of its parents that exists
            if folder.exists():
                if not folder.is_dir():
                    what = "--run-dir" if folder == run else f"--run-dir {run}: its parent"
                    raise InputError(f"{what} {folder} is a file, not a folder",
                                     hint="choose a folder for the run; it is made if missing")
                break


def _positive(name: str, value: float | None, example: str) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise InputError(f"{name} must be a finite number above 0, not {value}", hint=f"give {example}, or leave it out")


@dataclass
class TrainStatus:
    """What the trainer reports to `on_progress` after a logged step, a checkpoint and at the end."""

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
        self._perm: tuple[int, np.ndarray] | None = None  # (epoch, this rank's permutation), drawn once per epoch

    def permutation(self) -> np.ndarray:
        if self._perm is None or self._perm[0] != self.epoch:
            self._perm = (self.epoch, np.random.default_rng(self.seed + self.epoch).permutation(self.indices)[self.rank :: self.world])
        return self._perm[1]

    def next(self) -> np.ndarray:
        out = []
        while len(out) < self.batch:  # a batch may run into the next epoch (or several, for tiny data)
            perm = self.permutation()
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


def build_task(opts: TrainOptions, device: torch.device, preset: dict | None = None) -> Task:
    """The stage's task (model, data, objective) as `train` builds it: seeded by `opts.seed`, so the
    model starts from the same weights. Callers that train one task in several runs build it once here."""
    torch.manual_seed(opts.seed)
    return TASKS[opts.stage](preset or load_preset(opts.preset), opts.data, Path(opts.run), device)


def train(opts: TrainOptions, on_progress: Callable[[TrainStatus], None] | None = None, task: Task | None = None) -> dict:
    """Train one stage as `opts` says; -> a summary (step, images seen, loss, interrupted, state path)."""
    return Trainer(opts, on_progress, task).run()


class Trainer:
    """One training run of one stage: `Trainer(opts).run()`.

    `task` is the stage's task when the caller has built it already (see `build_task`), e.g. to train it
    in several resumed runs without building it (caches, vocabulary, embeddings) again; it must live on
    the device the run uses. Otherwise `run` builds it, rank 0 first under torchrun.
    """

    def __init__(self, opts: TrainOptions, on_progress: Callable[[TrainStatus], None] | None = None, task: Task | None = None):
        opts.validate()  # again: fields may have changed since construction
        if task is not None and task.kind != opts.stage:
            raise InputError(f"a {task.kind} task cannot train the {opts.stage} stage")
        self.opts, self.on_progress, self.task = opts, on_progress, task
        self.preset = load_preset(opts.preset)
        self.hp = self.preset["train"][opts.stage]
        self.batch = opts.batch_size or self.hp["batch_size"]
        self.base_lr = opts.lr or self.hp["lr"]
        self.run_dir = Path(opts.run)
        self.stage_dir = self.run_dir / opts.stage
        self.state_path = self.stage_dir / "state.safetensors"
        self.max_seconds = opts.max_minutes * 60 if opts.max_minutes is not None else None
        self.stop_signal: int | None = None
        self.loss_avg: float | None = None

    # -- the run ---------------------------------------------------------------------------------------
    def run(self) -> dict:
        self._check_state()
        device = self.task.device if self.task is not None else pick_device(self.opts.device)
        self.dist = init_distributed(device)
        finished = False
        try:
            self._set_up(device)
            with self._stop_on_signals():
                self._train_steps()
                self.checkpoint("done")
            finished = True
        finally:
            self._release()
            self.dist.close(together=finished)
        return self.summary()

    def _check_state(self) -> None:
        if self.state_path.exists() and not self.opts.resume:
            raise UnclipError(f"{self.stage_dir} already has a training state", hint="pass --resume to continue it, or choose another --run")
        if self.opts.resume and not self.state_path.exists():
            raise UnclipError(f"nothing to resume in {self.stage_dir}", hint="drop --resume to start a new run")

    def _set_up(self, device: torch.device) -> None:
        opts, dist = self.opts, self.dist
        if device.type == "cuda" and dist.enabled and self.task is None:
            device = torch.device("cuda", dist.local_rank)
            torch.cuda.set_device(device)
        if device.type == "cuda":
            # TF32 matmuls and convolutions (Ampere and later run them several times faster than fp32); a
            # 10-bit mantissa is far below the noise of diffusion and contrastive losses. These flags are set
            # in the training process only; the engine chooses its own precision for sampling.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True  # fixed shapes per stage: pick the fastest kernels once
        self.device = device
        self.task = task = self._task()
        on_device = opts.data_on_device if opts.data_on_device is not None else device.type != "cpu" and task.device_data
        if on_device and not task.data_held:
            task.hold_data_on_device()
        started_from = init_from_set(task, Path(opts.init_from)) if opts.init_from is not None else None
        self.model = model = task.model
        task.net = model
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            task.net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
            if hasattr(task, "configure_distributed"):
                task.configure_distributed(dist.rank, dist.world_size)
        self.ema = EMA(model, opts.ema_decay)
        self.opt = torch.optim.AdamW(model.parameters(), lr=self.base_lr, betas=(0.9, 0.999), weight_decay=self.hp.get("weight_decay", 0.01))
        self.meta = self._start_or_resume(started_from)
        self.order = BatchOrder(task.train_indices(), self.batch, opts.seed, dist.rank, dist.world_size, self.meta["epoch"], self.meta["offset"])

    def _task(self) -> Task:
        """The given task, or a new one. Under torchrun rank 0 builds first (caches, embeddings, the adopted
        CLIP), then the other ranks read what it wrote."""
        torch.manual_seed(self.opts.seed)
        if self.task is not None:
            return self.task
        if not self.dist.is_main:
            self.dist.barrier()
        model_set = self.opts.init_from or self.opts.clip_from
        if model_set is not None and self.dist.is_main:
            adopt_clip(self.run_dir, Path(model_set), self.opts.stage)
        task = TASKS[self.opts.stage](self.preset, self.opts.data, self.run_dir, self.device)
        if self.dist.is_main:
            self.dist.barrier()
        return task

    def _start_or_resume(self, started_from: dict | None) -> dict:
        """The training state's metadata: new, counted on from a model set, or loaded with the state; and
        RUN/STAGE/run.json written (rank 0)."""
        opts, task, dist = self.opts, self.task, self.dist
        info = {"stage": opts.stage, "preset": opts.preset, "config": dataclasses.asdict(task.config),
                "diffusion": dataclasses.asdict(task.diffusion_cfg) if task.diffusion_cfg else None,
                "extra": task.extra, "batch_size": self.batch, "world_size": dist.world_size, "data": str(opts.data)}
        meta = {"step": 0, "epoch": 0, "offset": 0, "images_seen": 0, "seconds": 0.0, "last_loss": None, "warmup_from": 0}
        if started_from is not None:
            # The step count goes on from the set's, so exports and model cards count all of its training;
            # the optimiser's moments are new, so the learning rate warms up again from here.
            meta.update(step=started_from["trained_steps"], images_seen=started_from["images_seen"],
                        seconds=started_from["train_seconds"], warmup_from=started_from["trained_steps"])
            info["init_from"] = started_from
        if opts.resume:
            meta = load_state(self.state_path, self.model, self.ema, self.opt)
            info = {**json.loads((self.stage_dir / "run.json").read_text()), "resumed_at": meta["step"]}
            # Facts the task records that the run predates (e.g. the decoder's mean image) join run.json.
            missing = {k: v for k, v in task.extra.items() if k not in info["extra"]}
            if missing and dist.is_main:
                info["extra"] = {**info["extra"], **missing}
                atomic_write(self.stage_dir / "run.json", lambda tmp: Path(tmp).write_text(json.dumps(info, indent=1)))
        elif dist.is_main:
            self.stage_dir.mkdir(parents=True, exist_ok=True)
            info["uid"] = uuid.uuid4().hex
            (self.stage_dir / "run.json").write_text(json.dumps(info, indent=1))
        return meta

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGINT and SIGTERM end the run after the current step, with a checkpoint."""
        def on_signal(signum, frame):
            self.stop_signal = signum

        old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)

    def _release(self) -> None:
        """Drop the DDP wrapper before the process group is left: it holds the group, which would outlive
        `destroy_process_group` while it lives; and a task trained again gets a wrapper of its own."""
        if self.task is not None:
            self.task.net = None

    # -- steps -----------------------------------------------------------------------------------------
    def _train_steps(self) -> None:
        opts, meta = self.opts, self.meta
        self.start = self.last_ckpt = self.last_log = self.window_start = time.time()
        self.seconds0 = meta["seconds"]
        self.window_images = 0
        self.first_step = meta["step"] + 1  # logged at once, whatever the step count a run starts or resumes from
        self.model.train()
        while opts.max_steps is None or meta["step"] < opts.max_steps:
            value, images = self.step()
            now = time.time()
            self.window_images += images
            if now - self.last_log >= opts.log_seconds or meta["step"] == self.first_step:
                self._log(value, now)
            out_of_time = self.max_seconds is not None and now - self.start >= self.max_seconds
            # One collective for both decisions: a rank that stops or checkpoints alone leaves the others waiting.
            stop_now, checkpoint_due = self.dist.any(
                [self.stop_signal is not None or out_of_time, now - self.last_ckpt >= opts.checkpoint_minutes * 60], self.device)
            if stop_now:
                break  # the final checkpoint follows
            if checkpoint_due:
                self.checkpoint("checkpoint")
                self.last_ckpt = time.time()

    def step(self) -> tuple[float, int]:
        """One optimiser step; -> (its loss, the images it saw on all ranks)."""
        opts, meta, dist, model = self.opts, self.meta, self.dist, self.model
        step = meta["step"]
        gen = torch.Generator().manual_seed(opts.seed * 1_000_003 + dist.rank * 7919 + step)
        idx = self.order.next()
        for g in self.opt.param_groups:
            g["lr"] = lr_at(step - meta.get("warmup_from", 0), self.base_lr, self.hp.get("warmup", 0))
        loss = self.task.loss(idx, gen)
        # Decided together: a rank that stopped alone would leave the others in the gradient all-reduce.
        (diverged,) = dist.any([not bool(torch.isfinite(loss))], self.device)
        if diverged:
            value = loss.item()
            raise UnclipError(
                f"the {opts.stage} loss became {value if not math.isfinite(value) else 'non-finite on another rank'} at step "
                f"{step}; stopped, the last good checkpoint in {self.state_path} is kept",
                hint="resume with --resume and a lower --lr",
            )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
        self.opt.step()
        self.task.after_step()
        self.ema.update(model, step)
        value = loss.item()
        self.loss_avg = value if self.loss_avg is None else 0.98 * self.loss_avg + 0.02 * value
        images = len(idx) * dist.world_size
        meta.update(step=step + 1, images_seen=meta["images_seen"] + images, last_loss=value)
        return value, images

    def _log(self, value: float, now: float) -> None:
        """A line in metrics.jsonl (rank 0) and a progress report; opens a new throughput window."""
        meta = self.meta
        ips = self.window_images / max(now - self.window_start, 1e-9)
        if self.dist.is_main:
            with open(self.stage_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": meta["step"], "loss": value, "loss_avg": self.loss_avg, "lr": self.opt.param_groups[0]["lr"],
                                    "images_per_s": ips, "images_seen": meta["images_seen"],
                                    "seconds": self.seconds0 + now - self.start}) + "\n")
        if self.on_progress:
            self.on_progress(TrainStatus(meta["step"], self.opts.max_steps, self.loss_avg, ips, now - self.start, self.max_seconds))
        self.last_log, self.window_images, self.window_start = now, 0, now

    def checkpoint(self, event: str) -> None:
        """Save the training state and a sample grid (rank 0); every rank takes part (weight checksums)."""
        meta = self.meta
        meta.update(epoch=self.order.epoch, offset=self.order.offset, seconds=self.seconds0 + time.time() - self.start)
        if self.dist.enabled:
            meta["rank_checksums"] = rank_checksums(self.model, self.dist.world_size)
        if self.dist.is_main:
            save_state(self.state_path, self.model, self.ema, self.opt, meta)
            (self.stage_dir / "samples").mkdir(exist_ok=True)
            self.task.sample_grid(self.ema.model, self.stage_dir / "samples" / f"step-{meta['step']:07d}.png")
        if self.on_progress:
            self.on_progress(TrainStatus(meta["step"], self.opts.max_steps, self.loss_avg or float("nan"), 0.0,
                                      time.time() - self.start, self.max_seconds, event))

    def summary(self) -> dict:
        meta = self.meta
        return {"stage": self.opts.stage, "run": str(self.run_dir), "step": meta["step"], "images_seen": meta["images_seen"],
                "seconds": meta["seconds"], "loss": meta["last_loss"], "loss_avg": self.loss_avg,
                "interrupted": self.stop_signal is not None, "state": str(self.state_path)}
