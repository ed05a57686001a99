"""Issue 26's CPU proxy: which decoder run pays most for ~10 device-minutes, at equal training FLOPs.

Arms (every one trains against weights/emoji's CLIP, with the same batch, learning rate, warm-up and EMA):
  a   v0.3's 32 px decoder (weights/emoji/decoder.safetensors; its EMA and optimiser state were not kept), continued
  b   the prepared v0.4 decoder (emoji256: 64 px, space-to-depth 2, 40 channels) from scratch
  c   a 64 px decoder with v0.3's trunk (space-to-depth 2, 32 channels: every tensor but the first and last
      convolution has v0.3's shape and is copied; those two start as "the 32 px network on 2x2 block means,
      its output repeated over each block")
  d   c, with the symmetry between a block's four sub-pixels broken: random zero-sum sub-pixel weights added to
      both convolutions (the block-mean path is v0.3's still). c starts on a saddle: its features see only block
      means and its output is flat within blocks, so the gradient that would make the sub-pixels differ is zero
      in expectation and only minibatch noise moves it

Usage (one thread; everything goes under RUN, outside the repo):
  python proxy_decoder.py flops                              training FLOPs per image of each arm
  python proxy_decoder.py heldout CORPUS RUN                  the fixed held-out set (images, z_i, t, noise)
  python proxy_decoder.py embed CORPUS RUN                    the arms' training embeddings (one caption an image)
  python proxy_decoder.py train ARM CORPUS RUN TFLOP [--batch 32 --lr 1e-4 --points 4 --upto K]
                                                              train ARM for TFLOP tera-FLOPs, in --points equal
                                                              segments (through segment K only, to interleave
                                                              the arms); after each, the EMA's held-out loss
  python proxy_decoder.py extend ARM CORPUS RUN STEPS [--points 2]
                                                              past the budget: STEPS more, the held-out loss
  python proxy_decoder.py judge ARM RUN [--point K]           decode the held-out images from their true z_i;
                                                              the independent classifier and the Frechet distance
  python proxy_decoder.py report RUN                          the table
Arm "v03" in `judge` is the shipped decoder itself (arm a before training).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from unclip_cli import checkpoint
from unclip_cli.checkpoint import config_from_dict
from unclip_cli.diffusion.gaussian import DiffusionConfig, GaussianDiffusion
from unclip_cli.models.unet import UNet, UNetConfig
from unclip_cli.presets import load_preset

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "weights" / "emoji"
HELD_LOSS_IMAGES, HELD_T_PER_IMAGE, JUDGE_IMAGES, JUDGE_STEPS = 128, 4, 160, 10
WARMUP = 20  # steps: v0.3's 100-step warm-up is ~2% of a GPU run; the proxy's runs are ~1/10 as many steps
ARMS = ("a", "b", "c", "d")


def arm_preset(arm: str) -> dict:
    """The arm's preset: emoji (a), emoji256 (b), emoji256 with v0.3's widths (c); the proxy's warm-up."""
    preset = load_preset("emoji" if arm == "a" else "emoji256")
    if arm in ("c", "d"):
        preset["decoder"]["model"]["model_channels"] = load_preset("emoji")["decoder"]["model"]["model_channels"]
    preset["train"]["decoder"]["warmup"] = WARMUP
    return preset


def unet_config(arm: str) -> UNetConfig:
    return config_from_dict(UNetConfig, arm_preset(arm)["decoder"]["model"])


# -- FLOPs ----------------------------------------------------------------------------------------------
def train_flops_per_image(cfg: UNetConfig, batch: int = 4) -> float:
    """Forward and backward FLOPs of one training image (eps loss, text and z_i given, inpainting channels)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    net = UNet(cfg)
    s = cfg.image_size
    x = torch.randn(batch, 3, s, s)
    args = dict(cond=torch.randn(batch, cfg.extra_channels, s, s), z_i=F.normalize(torch.randn(batch, cfg.clip_dim), dim=-1),
                z_keep=torch.ones(batch, dtype=torch.bool), text_states=torch.randn(batch, 40, cfg.text_width),
                text_mask=torch.ones(batch, 40, dtype=torch.bool))
    with FlopCounterMode(display=False) as counter:
        F.mse_loss(net(x, torch.randint(0, 1000, (batch,)), **args), x).backward()
    return counter.get_total_flops() / batch


def sample_flops_per_image(cfg: UNetConfig, batch: int = 4) -> float:
    """One forward pass (a sampling step without guidance)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = UNet(cfg)
    s = cfg.image_size
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(torch.randn(batch, 3, s, s), torch.zeros(batch, dtype=torch.long), z_i=torch.randn(batch, cfg.clip_dim),
            text_states=torch.zeros(batch, 40, cfg.text_width), text_mask=torch.zeros(batch, 40, dtype=torch.bool))
    return counter.get_total_flops() / batch


def cmd_flops(_args) -> None:
    out = {}
    for arm in ARMS:
        cfg = unet_config(arm)
        out[arm] = {"image_size": cfg.image_size, "patch_size": cfg.patch_size, "model_channels": cfg.model_channels,
                    "params_M": round(sum(p.numel() for p in UNet(cfg).parameters()) / 1e6, 3),
                    "train_GFLOP_per_image": round(train_flops_per_image(cfg) / 1e9, 4),
                    "forward_GFLOP_per_image": round(sample_flops_per_image(cfg) / 1e9, 4)}
    print(json.dumps(out, indent=1))


# -- held-out set -----------------------------------------------------------------------------------------
def cmd_heldout(args) -> None:
    """The first held-out images in the corpus's hash order (as `unclip eval` orders them) at 32 and 64 px
    (Lanczos, as the training cache resizes), their true z_i from weights/emoji's CLIP, and each image's fixed
    (t, eps) draws for the held-out loss."""
    from unclip_cli.data.cache import square_resize
    from unclip_cli.evaluate import load_eval_data
    from unclip_cli.train.stages import to_unit

    run = Path(args.run).expanduser()
    run.mkdir(parents=True, exist_ok=True)
    data = load_eval_data(args.corpus)
    items = data.items
    clip = checkpoint.load(SHIPPED / "clip.safetensors", "clip").model.eval()
    arrays = {f"images{s}": np.stack([np.asarray(square_resize(it.image.convert("RGB"), s), dtype=np.uint8) for it in items])
              for s in (32, 64)}
    with torch.no_grad():
        z_i = torch.cat([clip.encode_image(to_unit(arrays["images32"][k : k + 256])) for k in range(0, len(items), 256)])
    gen = torch.Generator().manual_seed(26)
    n = HELD_LOSS_IMAGES
    # Stratified timesteps: image i's k-th draw lies in the k-th quarter of [0, 1000).
    u = torch.rand(n, HELD_T_PER_IMAGE, generator=gen)
    t = ((torch.arange(HELD_T_PER_IMAGE)[None] + u) * 1000 / HELD_T_PER_IMAGE).long().clamp(max=999)
    eps = {s: torch.randn(n, HELD_T_PER_IMAGE, 3, s, s, generator=gen) for s in (32, 64)}
    judge_noise = {s: torch.randn(JUDGE_IMAGES, 3, s, s, generator=gen) for s in (32, 64)}
    np.savez(run / "heldout.npz", **arrays, z_i=z_i.numpy(), t=t.numpy(), eps32=eps[32].numpy(), eps64=eps[64].numpy(),
             judge32=judge_noise[32].numpy(), judge64=judge_noise[64].numpy(),
             concept=np.array([it.concept for it in items]), keys=np.array([it.key for it in items]))
    # Real images for the classifier's reference and the Frechet distance, as eval reads them (full size).
    real = np.stack([np.asarray(it.image.convert("RGB").resize((64, 64), 1), dtype=np.uint8) for it in items])
    np.save(run / "heldout-real64.npy", real)
    print(f"{len(items)} held-out images; loss on the first {n} x {HELD_T_PER_IMAGE} draws; judged on the first {JUDGE_IMAGES}")


def load_heldout(run: Path) -> dict:
    with np.load(run / "heldout.npz") as f:
        return {k: f[k] for k in f.files}


@torch.no_grad()
def heldout_loss(model: UNet, diffusion: GaussianDiffusion, held: dict, batch: int = 64) -> float:
    """Mean eps MSE on the fixed held-out draws: z_i given, no caption, no inpainting (decoding from a true
    embedding, as `vary` does). Losses at 32 and 64 px are not comparable with each other."""
    from unclip_cli.train.stages import to_unit

    s = model.cfg.image_size
    model.eval()
    x0 = to_unit(held[f"images{s}"][:HELD_LOSS_IMAGES])
    z = torch.from_numpy(held["z_i"][:HELD_LOSS_IMAGES])
    t, eps = torch.from_numpy(held["t"]), torch.from_numpy(held[f"eps{s}"])
    total, count = 0.0, 0
    L, W = 40, model.cfg.text_width
    for k in range(HELD_T_PER_IMAGE):
        for b in range(0, len(x0), batch):
            xb, tb, eb = x0[b : b + batch], t[b : b + batch, k], eps[b : b + batch, k]
            B = len(xb)
            out = model(diffusion.q_sample(xb, tb, eb), tb, z_i=z[b : b + batch], z_keep=torch.ones(B, dtype=torch.bool),
                        text_states=torch.zeros(B, L, W), text_mask=torch.zeros(B, L, dtype=torch.bool))
            total += F.mse_loss(out, eb, reduction="sum").item() / eb[0].numel()
            count += B
    return total / count


# -- embeddings -------------------------------------------------------------------------------------------
class OneCaption:
    """The training cache with one caption per image (drawn once, seeded) instead of all of them: the CLIP text
    states of every caption (~150k, ~16 TFLOP of text encoder) would cost this CPU more than an arm's training."""

    def __init__(self, cache, seed: int = 26):
        self.images, self.cache = cache.images, cache
        self.rng = np.random.default_rng(seed)
        self.pick = [self.rng.integers(len(cache.captions(i))) for i in range(len(cache))]

    def __len__(self) -> int:
        return len(self.cache)

    def captions(self, i: int) -> list[str]:
        return [self.cache.captions(i)[self.pick[i]]]


def cmd_embed(args) -> None:
    """The arms' shared RUN/shared/embeddings in the trainer's format (z_i of every training image, token states
    of one caption per image), so the decoder tasks find them made."""
    from unclip_cli.train.stages import Embeddings, adopt_clip, frozen_clip, open_cache

    run = Path(args.run).expanduser()
    share_data(run / "arm-a", run)
    adopt_clip(run / "arm-a", SHIPPED, "decoder")
    clip, uid, _ = frozen_clip(run / "arm-a", torch.device("cpu"))
    cache = open_cache(args.corpus, 32, run / "shared" / "cache")
    t = time.time()
    Embeddings._compute(run / "shared" / "embeddings", clip, uid, OneCaption(cache), torch.device("cpu"))
    print(f"embeddings of {len(cache)} images, one caption each, in {time.time() - t:.0f} s")


# -- training ---------------------------------------------------------------------------------------------
def init_c_from_v03(model: UNet) -> dict:
    """Arm c: every tensor of v0.3's decoder whose shape matches is copied; the space-to-depth input convolution
    reads each channel's 2x2 block mean through v0.3's kernel, and the output convolution repeats v0.3's output
    over each 2x2 block (pixel_unshuffle puts channel c's block offsets at c*4 .. c*4+3)."""
    src = checkpoint.load(SHIPPED / "decoder.safetensors", "decoder").model.state_dict()
    dst = model.state_dict()
    p2 = model.cfg.patch_size ** 2
    copied = []
    for k, v in src.items():
        if dst[k].shape == v.shape:
            dst[k] = v.clone()
            copied.append(k)
    w, b = src["input_conv.weight"], src["input_conv.bias"]
    dst["input_conv.weight"] = w.repeat_interleave(p2, dim=1) / p2
    dst["input_conv.bias"] = b.clone()
    w, b = src["out.2.weight"], src["out.2.bias"]
    dst["out.2.weight"], dst["out.2.bias"] = w.repeat_interleave(p2, dim=0), b.repeat_interleave(p2, dim=0)
    spread = ["input_conv.weight", "out.2.weight", "out.2.bias"]
    model.load_state_dict(dst, strict=True)
    return {"copied": len(copied), "spread": spread, "of": len(dst)}


def break_block_symmetry(model: UNet, seed: int = 26) -> dict:
    """Arm d: add to each convolution's sub-pixel weights random ones that sum to zero over a block's four
    sub-pixels (std a quarter of the weights' own), leaving what the network does with block means unchanged."""
    gen = torch.Generator().manual_seed(seed)
    p2 = model.cfg.patch_size ** 2

    def zero_sum(shape, dim):
        r = torch.randn(shape, generator=gen)
        r = r.unflatten(dim, (-1, p2))
        return (r - r.mean(dim + 1, keepdim=True)).flatten(dim, dim + 1)

    with torch.no_grad():
        w = model.input_conv.weight  # (ch0, C * p2, 3, 3)
        w += zero_sum(w.shape, 1) * w.std() / 4
        w = model.out[2].weight  # (C * p2, ch, 3, 3)
        w += zero_sum(w.shape, 0) * w.std() / 4
    return {"symmetry_broken": ["input_conv.weight", "out.2.weight"]}


def share_data(arm_run: Path, run: Path) -> None:
    """The arms share one image cache and one set of embeddings (same corpus, same CLIP)."""
    arm_run.mkdir(parents=True, exist_ok=True)
    for name in ("cache", "embeddings"):
        (run / "shared" / name).mkdir(parents=True, exist_ok=True)
        link = arm_run / name
        if not link.exists():
            link.symlink_to(run / "shared" / name)


def cmd_train(args) -> None:
    from unclip_cli.train.loop import Trainer, TrainOptions
    from unclip_cli.train.stages import DecoderTask, adopt_clip

    run = Path(args.run).expanduser()
    arm_run = run / f"arm-{args.arm}"
    share_data(arm_run, run)
    adopt_clip(arm_run, SHIPPED, "decoder")
    preset = arm_preset(args.arm)
    preset_path = arm_run / "preset.json"
    preset_path.write_text(json.dumps(preset, indent=1))
    torch.manual_seed(0)
    t0 = time.time()
    task = DecoderTask(preset, args.corpus, arm_run, torch.device("cpu"))
    print(f"task built in {time.time() - t0:.0f} s", flush=True)
    init = None
    if args.arm == "a":
        from unclip_cli.train.stages import init_from_set

        init = {"from": "weights/emoji", **init_from_set(task, SHIPPED)}
    elif args.arm in ("c", "d"):
        init = {"from": "weights/emoji (where shapes allow)", **init_c_from_v03(task.model)}
        if args.arm == "d":
            init.update(break_block_symmetry(task.model))
    held = load_heldout(run)
    diffusion = task.diffusion
    f_img = train_flops_per_image(task.config)
    images = args.tflop * 1e12 / f_img
    steps = max(args.points, round(images / args.batch))
    seg = [round(steps * (k + 1) / args.points) for k in range(args.points)]
    # EMA horizon a fifth of the run (1 / (1 - decay) steps), as 0.999 is of a GPU run of ~5,000 steps.
    decay = 1 - 5 / steps
    log = arm_run / "proxy.jsonl"
    plan = {"arm": args.arm, "init": init, "train_GFLOP_per_image": f_img / 1e9, "tflop": args.tflop, "images": steps * args.batch,
            "steps": steps, "batch": args.batch, "lr": args.lr, "warmup": WARMUP, "ema_decay": decay, "points": seg,
            "threads": torch.get_num_threads()}
    print(json.dumps(plan), flush=True)
    state = arm_run / "decoder" / "state.safetensors"
    if not state.exists():
        with open(log, "a") as f:
            f.write(json.dumps({"plan": plan}) + "\n")
            model0 = task.model
            f.write(json.dumps({"point": 0, "steps": 0, "images": 0, "tflop": 0.0, "heldout_loss_ema": heldout_loss(model0, diffusion, held)}) + "\n")
        model0.train()
    from unclip_cli.train.common import read_state_meta

    for k, target in enumerate(seg[: args.upto]):
        resume = state.exists()
        opts = TrainOptions(stage="decoder", run=arm_run, data=args.corpus, preset=str(preset_path), batch_size=args.batch, lr=args.lr,
                            ema_decay=decay, checkpoint_minutes=8, resume=resume, device="cpu")
        base = init["trained_steps"] if args.arm == "a" and init else 0
        opts.max_steps = base + target
        if resume and read_state_meta(state)["step"] >= opts.max_steps:
            continue  # this segment was done before an interruption
        if args.arm == "a" and not resume:
            opts.init_from = SHIPPED
        t = time.time()
        trainer = Trainer(opts, task=task)
        res = trainer.run()
        ema = trainer.ema.model
        from safetensors.torch import save_file

        save_file({n: p.detach().contiguous() for n, p in ema.state_dict().items()}, str(arm_run / f"ema-{k + 1}.safetensors"))
        row = {"point": k + 1, "steps": target, "images": target * args.batch, "tflop": target * args.batch * f_img / 1e12,
               "seconds": round(time.time() - t, 1), "loss_avg": res["loss_avg"],
               "heldout_loss_ema": heldout_loss(ema, diffusion, held)}
        task.model.train()
        print(json.dumps(row), flush=True)
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")


def cmd_extend(args) -> None:
    """Past the equal-FLOPs budget: resume ARM's run for STEPS more steps in --points segments, same settings,
    logging the EMA's held-out loss (how fast a 64 px arm learns to denoise at all; not a comparison)."""
    from safetensors.torch import save_file

    from unclip_cli.train.common import read_state_meta
    from unclip_cli.train.loop import Trainer, TrainOptions
    from unclip_cli.train.stages import DecoderTask

    run = Path(args.run).expanduser()
    arm_run = run / f"arm-{args.arm}"
    plan = json.loads((arm_run / "proxy.jsonl").read_text().splitlines()[0])["plan"]
    preset = json.loads((arm_run / "preset.json").read_text())
    task = DecoderTask(preset, args.corpus, arm_run, torch.device("cpu"))
    held = load_heldout(run)
    state = arm_run / "decoder" / "state.safetensors"
    start = read_state_meta(state)["step"]
    for k in range(args.points):
        target = start + round(args.steps * (k + 1) / args.points)
        opts = TrainOptions(stage="decoder", run=arm_run, data=args.corpus, preset=str(arm_run / "preset.json"), batch_size=plan["batch"],
                            lr=plan["lr"], ema_decay=plan["ema_decay"], checkpoint_minutes=8, resume=True, device="cpu", max_steps=target)
        t = time.time()
        trainer = Trainer(opts, task=task)
        res = trainer.run()
        name = f"ema-x{k + 1}.safetensors"
        save_file({n: p.detach().contiguous() for n, p in trainer.ema.model.state_dict().items()}, str(arm_run / name))
        steps = target - (plan["init"] or {}).get("trained_steps", 0) if args.arm == "a" else target
        row = {"extended": k + 1, "steps": steps, "images": steps * plan["batch"], "tflop": steps * plan["batch"] * plan["train_GFLOP_per_image"] / 1e3,
               "seconds": round(time.time() - t, 1), "loss_avg": res["loss_avg"], "heldout_loss_ema": heldout_loss(trainer.ema.model, task.diffusion, held),
               "weights": name}
        task.model.train()
        print(json.dumps(row), flush=True)
        with open(arm_run / "proxy.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


# -- judging ----------------------------------------------------------------------------------------------
def load_arm_model(arm: str, run: Path, point: str | None) -> tuple[UNet, GaussianDiffusion, list]:
    """The EMA weights of `arm` after segment `point` (the last if None; "x1", "x2": after `extend`'s segments),
    v0.3 itself for arm "v03", arm c's initial weights for "c0"."""
    from safetensors.torch import load_file

    if arm == "v03":
        ck = checkpoint.load(SHIPPED / "decoder.safetensors", "decoder")
        return ck.model.float().eval(), GaussianDiffusion(ck.diffusion), ck.extra["x_start_mean"]
    arm_run = run / f"arm-{arm[0]}"
    preset = json.loads((arm_run / "preset.json").read_text())
    model = UNet(config_from_dict(UNetConfig, preset["decoder"]["model"]))
    diffusion = GaussianDiffusion(config_from_dict(DiffusionConfig, preset["decoder"]["diffusion"]))
    if arm == "c0":
        init_c_from_v03(model)
    else:
        if point is None:
            point = str(max(int(p.stem.split("-")[1]) for p in arm_run.glob("ema-[0-9]*.safetensors")))
        model.load_state_dict(load_file(str(arm_run / f"ema-{point}.safetensors")))
    mean = json.loads((arm_run / "decoder" / "run.json").read_text())["extra"]["x_start_mean"]
    return model.eval(), diffusion, mean


@torch.no_grad()
def decode(model: UNet, diffusion: GaussianDiffusion, mean: list, z: torch.Tensor, noise: torch.Tensor, batch: int = 50) -> torch.Tensor:
    """As `unclip generate --quality fast` decodes (the sample grids take 20 steps): JUDGE_STEPS DDPM steps from the
    noised mean image at DECODER_T_START, guidance 3, no caption; fixed noise per image."""
    from unclip_cli.diffusion.policy import DECODER_T_START, decoder_denoiser, noised_mean
    from unclip_cli.diffusion.samplers import sample_ddpm
    from unclip_cli.diffusion.schedule import spaced_timesteps

    out = []
    L, W = 40, model.cfg.text_width
    for b in range(0, len(z), batch):
        zb = z[b : b + batch]
        B = len(zb)
        gen = torch.Generator().manual_seed(1000 + b)
        x = noised_mean(diffusion, mean, noise[b : b + batch])
        denoise = decoder_denoiser(diffusion, model, zb, torch.zeros(B, L, W), torch.zeros(B, L, dtype=torch.bool), 3.0)
        ts = spaced_timesteps(diffusion.num_timesteps, JUDGE_STEPS, start=DECODER_T_START)
        shape = x.shape
        out.append(sample_ddpm(denoise, x, ts, diffusion, randn=lambda: torch.randn(shape, generator=gen)))
    return torch.cat(out)


def to_pil(x: torch.Tensor) -> list:
    from PIL import Image

    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def cmd_judge(args) -> None:
    from PIL import Image

    from unclip_cli.engine import to_tensor
    from unclip_cli.evaluate import classify, concept_hits, frechet_distance

    run = Path(args.run).expanduser()
    held = load_heldout(run)
    model, diffusion, mean = load_arm_model(args.arm, run, args.point)
    s = model.cfg.image_size
    n = JUDGE_IMAGES
    t = time.time()
    images = to_pil(decode(model, diffusion, mean, torch.from_numpy(held["z_i"][:n]), torch.from_numpy(held[f"judge{s}"][:n])))
    seconds = time.time() - t
    classifier = checkpoint.load(REPO / "weights" / "classifier" / "emoji-concepts.safetensors", "classifier")
    index = {c: k for k, c in enumerate(classifier.extra["concepts"])}
    labels = [index.get(c, -1) for c in held["concept"][:n]]
    gen = concept_hits(classify(classifier, images), labels)
    real_images = [Image.fromarray(a) for a in np.load(run / "heldout-real64.npy")]
    real = concept_hits(classify(classifier, real_images[:n]), labels)
    clip = checkpoint.load(SHIPPED / "clip.safetensors", "clip").model.eval()

    def embed(ims):
        with torch.no_grad():
            return torch.cat([clip.encode_image(torch.stack([to_tensor(im, 32) for im in ims[k : k + 100]]))
                              for k in range(0, len(ims), 100)]).double().numpy()

    e_gen, e_real = embed(images), embed(real_images)
    z = held["z_i"][:n].astype(np.float64)
    row = {"arm": args.arm, "point": args.point, "image_size": s, "n": n, "decode_seconds": round(seconds, 1),
           "classifier_top1": float(gen["top1"].mean()), "classifier_top5": float(gen["top5"].mean()),
           "real_top1": float(real["top1"].mean()), "real_top5": float(real["top5"].mean()),
           "frechet_clip": frechet_distance(e_gen, e_real), "n_real": len(real_images),
           "cosine_to_z_i": float((e_gen / np.linalg.norm(e_gen, axis=1, keepdims=True) * z).sum(1).mean())}
    print(json.dumps(row), flush=True)
    with open(run / "judge.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    grid = Image.new("RGB", (s * 20, s * 2 * 2), "white")
    for k in range(min(40, n)):
        grid.paste(real_images[k].resize((s, s), Image.Resampling.LANCZOS), ((k % 20) * s, (k // 20) * 2 * s))
        grid.paste(images[k], ((k % 20) * s, (k // 20) * 2 * s + s))
    grid.save(run / f"judge-{args.arm}-{args.point or 'last'}.png")


def cmd_report(args) -> None:
    run = Path(args.run).expanduser()
    for arm in ARMS:
        log = run / f"arm-{arm}" / "proxy.jsonl"
        if log.is_file():
            for line in log.read_text().splitlines():
                print(arm, line)
    if (run / "judge.jsonl").is_file():
        print((run / "judge.jsonl").read_text())


def main() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("flops")
    p = sub.add_parser("heldout")
    p.add_argument("corpus")
    p.add_argument("run")
    p = sub.add_parser("embed")
    p.add_argument("corpus")
    p.add_argument("run")
    p = sub.add_parser("train")
    p.add_argument("arm", choices=ARMS)
    p.add_argument("corpus")
    p.add_argument("run")
    p.add_argument("tflop", type=float)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--points", type=int, default=4)
    p.add_argument("--upto", type=int, help="stop after this segment (default: all)")
    p = sub.add_parser("extend")
    p.add_argument("arm", choices=ARMS)
    p.add_argument("corpus")
    p.add_argument("run")
    p.add_argument("steps", type=int)
    p.add_argument("--points", type=int, default=2)
    p = sub.add_parser("judge")
    p.add_argument("arm", choices=(*ARMS, "v03", "c0"))
    p.add_argument("run")
    p.add_argument("--point", help="segment K, or xK after `extend` (default: the last segment)")
    p = sub.add_parser("report")
    p.add_argument("run")
    args = ap.parse_args()
    {"flops": cmd_flops, "heldout": cmd_heldout, "embed": cmd_embed, "extend": cmd_extend, "train": cmd_train, "judge": cmd_judge, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
