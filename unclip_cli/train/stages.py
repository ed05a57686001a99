"""The four training objectives. Each task owns its model, reads its data from the memory-mapped image
cache, and turns a list of sample indices into a loss; the loop in `loop.py` does everything else.

- clip: open_clip's ClipLoss on (image, random caption) pairs.
- prior (§2.2): MSE on the standardised clean image embedding; the caption dropped 10% of the time.
- decoder (§2.1): MSE on eps; z_i replaced by the learned null 10% of the time, text dropped 50% of
  the time, and random inpainting masks for a quarter of the batch (GLIDE §4.3).
- upsampler (§2.1): MSE on eps, on random crops a quarter of the target side, conditioned on the
  blurred (kernel 3, sigma 0.6) and bilinearly upsampled low-resolution image.

CLIP embeddings for the prior and decoder come from one frozen CLIP and are computed once into
`RUN/embeddings/` (z_i per image; z_t and token states per distinct caption), never per step.

The decoder and upsampler can also hold their data on the training device (`hold_data_on_device`: uint8
images, fp16 token states, caption tables) and draw a step's random numbers there from a generator seeded by
the step's, so a GPU step needs nothing from the host but the batch's indices. Both ways give the same
batches from the same numbers when the device is the CPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from unclip_cli import checkpoint
from unclip_cli.checkpoint import config_from_dict
from unclip_cli.diffusion.gaussian import DiffusionConfig, GaussianDiffusion
from unclip_cli.errors import UnclipError
from unclip_cli.models.clip import Clip, ClipConfig
from unclip_cli.models.prior import Prior, PriorConfig
from unclip_cli.models.unet import UNet, UNetConfig

STAGES = ("clip", "prior", "decoder", "upsampler")
PRIOR_TEXT_DROP = 0.1
DECODER_Z_DROP = 0.1
DECODER_TEXT_DROP = 0.5
INPAINT_FRACTION = 0.25
MEAN_IMAGE_SIZE = 8
# Sample grids sample as `unclip generate` does at its default quality: 20 decoder steps and 4 upsampler
# steps. Fixed here, not read from the quality presets, so that a preset change cannot change a
# running training's previews (and training does not depend on the inference requests).
GRID_DECODER_STEPS = 20
GRID_UPSAMPLER_STEPS = 4


# -- data ---------------------------------------------------------------------------------------------
def open_cache(data: str, size: int, cache_root: Path):
    """The decoded images of `data` (shards) at size x size, built once into `cache_root`."""
    from unclip_cli.data.cache import build_image_cache
    from unclip_cli.data.shards import expand_shards

    shards = [p for p in expand_shards(data) if not Path(p).name.startswith("val-")]
    if not shards:
        raise UnclipError(f"no training shards found in {data}", hint="build a corpus with `unclip data emoji`")
    return build_image_cache(shards, size, cache_root / f"cache-{size}")


def to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def blur(x: torch.Tensor, sigma: float = 0.6) -> torch.Tensor:
    """3x3 Gaussian blur, the upsampler's low-res corruption (unCLIP App. C, after SR3 and CDM)."""
    k = torch.exp(-torch.tensor([-1.0, 0.0, 1.0]) ** 2 / (2 * sigma**2))
    k = (k[:, None] * k[None]) / (k.sum() ** 2)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.to(x)[None, None].repeat(x.shape[1], 1, 1, 1), groups=x.shape[1])


def random_keep_masks(B: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Known-pixel masks (B, 1, s, s), 1 = known: one to three random rectangles erased per image, each side a
    quarter to three quarters of the image's. Drawn with a few tensor operations on the generator's device."""
    dev = gen.device
    count = torch.randint(1, 4, (B, 1), generator=gen, device=dev)  # rectangles per image
    sides = torch.randint(size // 4, size * 3 // 4 + 1, (B, 3, 2), generator=gen, device=dev)  # (B, 3, [h, w])
    corner = (torch.rand(B, 3, 2, generator=gen, device=dev) * (size - sides + 1)).long()  # uniform in [0, size - side]
    pos = torch.arange(size, device=dev)
    inside = (pos >= corner[..., None]) & (pos < (corner + sides)[..., None])  # (B, 3, 2, s): rows, then columns
    used = torch.arange(3, device=dev) < count  # (B, 3)
    erased = (inside[:, :, 0, :, None] & inside[:, :, 1, None, :] & used[..., None, None]).any(dim=1)  # (B, s, s)
    return (~erased)[:, None].float()


def step_generator(gen: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on `device`, seeded from the step's (CPU) generator: a step draws its random numbers where
    its data lives, so a task whose data is on the GPU sends nothing from the host per step. Seeded per step,
    so runs stay reproducible and resume exactly."""
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    return torch.Generator(device=device).manual_seed(seed)


def unit_rows(images, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows `idx` of a uint8 (N, H, W, 3) image cache, a host memory map or a tensor on the training device,
    as float (B, 3, H, W) in [-1, 1] on `device` (the same numbers as `to_unit`); only uint8 is moved."""
    if isinstance(images, torch.Tensor):
        rows = images[idx.to(images.device)]
    else:
        rows = torch.from_numpy(np.ascontiguousarray(images[idx.cpu().numpy()]))
    return rows.to(device).permute(0, 3, 1, 2).float() / 127.5 - 1


def crops(x: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, c: int) -> torch.Tensor:
    """(B, C, c, c) windows of x (B, C, H, W) with top-left corners (ys, xs) (B,), in one gather."""
    r = torch.arange(c, device=x.device)
    rows = (ys[:, None] + r)[:, None, :, None]  # (B, 1, c, 1)
    cols = (xs[:, None] + r)[:, None, None, :]  # (B, 1, 1, c)
    b = torch.arange(x.shape[0], device=x.device)[:, None, None, None]
    ch = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return x[b, ch, rows, cols]


def to_device_tensor(array: np.ndarray, device: torch.device, chunk_bytes: int = 1 << 28) -> torch.Tensor:
    """A host array (a memory map, say) as a tensor on `device`, copied in chunks of rows, so a cache of
    several GB never needs a second whole copy in host memory."""
    rows = max(1, chunk_bytes // max(1, array[:1].nbytes))
    out = None
    for s in range(0, len(array), rows):
        chunk = torch.from_numpy(np.array(array[s : s + rows])).to(device)  # a writable copy of the rows
        if out is None:
            out = torch.empty((len(array), *chunk.shape[1:]), dtype=chunk.dtype, device=device)
        out[s : s + len(chunk)] = chunk
    return out


# -- tasks --------------------------------------------------------------------------------------------
class Task:
    kind: str
    model: torch.nn.Module
    config: object
    diffusion_cfg: DiffusionConfig | None = None
    extra: dict
    n: int  # training samples

    def __init__(self, preset: dict, data: str, run: Path, device: torch.device):
        self.preset, self.data, self.run, self.device = preset, data, Path(run), device
        self.cache_root = self.run / "cache"
        self.net = None  # the model as called in training (DDP-wrapped under torchrun)
        self.data_device = torch.device("cpu")  # where the training data lives and a step draws its random numbers
        self.data_held = False  # True once hold_data_on_device has run

    def train_indices(self) -> np.ndarray:
        return np.arange(self.n)

    def loss(self, idx: np.ndarray, gen: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def sample_grid(self, ema_model, path: Path) -> None:
        """Write a small grid of samples (image stages only)."""

    def after_step(self) -> None:
        """Stage-specific fix-ups after an optimiser step."""

    # Whether `hold_data_on_device` works for this stage.
    device_data = False

    def hold_data_on_device(self) -> None:
        """Keep the training data on the training device as tensors, so that a step gathers its batch and draws
        its random numbers there instead of on the host. The batches are the same numbers either way."""
        raise NotImplementedError(f"the {self.kind} stage reads its data from the host")


def clip_loss(**kwargs):
    """open_clip's ClipLoss. open_clip_torch (with torchvision and timm) is a training extra, not needed to sample."""
    try:
        from open_clip.loss import ClipLoss
    except ImportError as e:
        raise UnclipError(f"training CLIP uses open_clip's ClipLoss, which needs open_clip_torch ({e.name} is missing)",
                          hint="pip install 'unclip-cli[train]' (from a checkout: .venv/bin/pip install -e '.[train]')") from e
    return ClipLoss(**kwargs)


class ClipTask(Task):
    kind = "clip"

    def __init__(self, preset, data, run, device):
        super().__init__(preset, data, run, device)
        self.config = config_from_dict(ClipConfig, preset["clip"])
        self.model = Clip(self.config).to(device)
        self.cache = open_cache(data, self.config.image_size, self.cache_root)
        self.n = len(self.cache)
        # Every caption tokenised once; sample i draws one of its captions per step.
        self.captions = [self.cache.captions(i) for i in range(self.n)]
        self.kept_tokens = self.model.fit_vocab([c for cs in self.captions for c in cs])
        unique = sorted({c for cs in self.captions for c in cs})
        row = {c: r for r, c in enumerate(unique)}
        self.tokens, _ = self.model.tokenize(unique)
        self.caption_rows = [[row[c] for c in cs] for cs in self.captions]
        self.extra = {"vocab_tokens": self.kept_tokens}
        self.loss_fn = clip_loss()

    def configure_distributed(self, rank: int, world_size: int) -> None:
        self.loss_fn = clip_loss(gather_with_grad=True, rank=rank, world_size=world_size)

    def loss(self, idx, gen):
        images = to_unit(self.cache.images[np.sort(idx)]).to(self.device)
        rows = [self.caption_rows[i][int(torch.randint(len(self.caption_rows[i]), (1,), generator=gen))] for i in np.sort(idx)]
        image_f, text_f, scale = self.net(images, self.tokens[rows].to(self.device))
        return self.loss_fn(image_f, text_f, scale)

    def after_step(self):
        with torch.no_grad():  # as open_clip's trainer does: keep the temperature at most 100
            self.model.model.logit_scale.clamp_(0, math.log(100))


class Embeddings:
    """z_i per image and (z_t, token states) per distinct caption, from one frozen CLIP, computed once."""

    def __init__(self, root: Path, clip: Clip, clip_uid: str, cache, device: torch.device):
        root.mkdir(parents=True, exist_ok=True)
        meta_path = root / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        if meta.get("clip_uid") != clip_uid or meta.get("n") != len(cache):
            self._compute(root, clip, clip_uid, cache, device)
            meta = json.loads(meta_path.read_text())
        cfg = clip.cfg
        self.z_i = torch.from_numpy(np.load(root / "z_i.npy"))  # (N, D)
        self.z_t = torch.from_numpy(np.load(root / "z_t.npy"))  # (U, D)
        self.lengths = torch.from_numpy(np.load(root / "lengths.npy"))  # (U,) tokens up to EOT inclusive
        self.states = np.memmap(root / "states.f16", dtype=np.float16, mode="r", shape=(len(self.z_t), cfg.context_length, cfg.text_width))
        self.caption_rows = meta["caption_rows"]

    @staticmethod
    @torch.no_grad()
    def _compute(root, clip, clip_uid, cache, device):
        from unclip_cli.checkpoint import atomic_write

        (root / "meta.json").unlink(missing_ok=True)  # meta.json last: a half-computed cache is never taken as whole
        clip = clip.to(device).eval()
        n = len(cache)
        z_i = torch.cat([clip.encode_image(to_unit(cache.images[s : s + 256]).to(device)).cpu() for s in range(0, n, 256)])
        captions = [cache.captions(i) for i in range(n)]
        unique = sorted({c for cs in captions for c in cs})
        row = {c: r for r, c in enumerate(unique)}
        cfg = clip.cfg
        z_t, lengths = [], []

        def write_states(tmp):
            states = np.memmap(tmp, mode="w+", dtype=np.float16, shape=(len(unique), cfg.context_length, cfg.text_width))
            for s in range(0, len(unique), 512):
                tokens, _ = clip.tokenize(unique[s : s + 512])
                zt, st, mask = clip.encode_text(tokens.to(device))
                z_t.append(zt.cpu())
                lengths.append(mask.sum(1).cpu())
                states[s : s + 512] = (st * mask[..., None]).cpu().numpy().astype(np.float16)
            states.flush()

        def save_npy(name, array):
            def write(tmp):
                with open(tmp, "wb") as f:
                    np.save(f, array)
            atomic_write(root / name, write)

        # Every file through its own temporary name: two stages started together both compute the
        # (identical) embeddings, and neither may truncate a file the other is writing or reading.
        atomic_write(root / "states.f16", write_states)
        save_npy("z_i.npy", z_i.numpy())
        save_npy("z_t.npy", torch.cat(z_t).numpy())
        save_npy("lengths.npy", torch.cat(lengths).numpy())
        meta = {"clip_uid": clip_uid, "n": n, "captions": len(unique), "caption_rows": [[row[c] for c in cs] for cs in captions]}
        atomic_write(root / "meta.json", lambda tmp: Path(tmp).write_text(json.dumps(meta)))

    def text(self, rows: list[int], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        st = torch.from_numpy(self.states[np.asarray(rows)].astype(np.float32))  # (B, L, W)
        L = st.shape[1]
        mask = torch.arange(L)[None] < self.lengths[rows][:, None]
        return self.z_t[rows].to(device), st.to(device), mask.to(device)

    def caption_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image's caption rows, padded: (N, C) int64, and how many it has (N,), so that a batch draws one
        caption per image with tensor operations."""
        counts = torch.tensor([len(r) for r in self.caption_rows])
        table = torch.zeros(len(self.caption_rows), int(counts.max()), dtype=torch.int64)
        for i, r in enumerate(self.caption_rows):
            table[i, : len(r)] = torch.tensor(r)
        return table, counts


def text_rows(states, lengths: torch.Tensor, rows: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token states (B, L, W) as float32 and their mask (B, L) for caption `rows`, from fp16 states that are
    a host memory map or a tensor on the training device; both give the same numbers."""
    if isinstance(states, torch.Tensor):
        st = states[rows.to(states.device)].float()
    else:
        st = torch.from_numpy(states[rows.cpu().numpy()].astype(np.float32))
    mask = torch.arange(st.shape[1], device=lengths.device)[None] < lengths[rows.to(lengths.device)][:, None]
    return st.to(device), mask.to(device)


def frozen_clip(run: Path, device) -> tuple[Clip, str, dict]:
    """The CLIP the prior and decoder train against: a frozen copy of the run's CLIP EMA, made once, so
    that both stages (and the exported set) agree even while CLIP training goes on."""
    path = run / "frozen_clip.safetensors"
    if not path.is_file():
        from unclip_cli.train.common import load_ema_weights

        state = run / "clip" / "state.safetensors"
        if not state.is_file():
            raise UnclipError(f"no CLIP in {run}", hint=f"train it first: unclip train clip --run {run} ...")
        meta = json.loads((run / "clip" / "run.json").read_text())
        clip = Clip(config_from_dict(ClipConfig, meta["config"]))
        smeta = load_ema_weights(state, clip)
        uid = f"{meta['uid']}-step{smeta['step']}"
        checkpoint.save(path, "clip", clip, clip.cfg, None, {"uid": uid, "trained_steps": smeta["step"], "images_seen": smeta.get("images_seen")})
    ck = checkpoint.load(path, "clip", device=device)
    ck.model.requires_grad_(False)
    return ck.model, ck.extra["uid"], ck.extra


def adopt_clip(run: Path, model_set: Path, stage: str) -> None:
    """Start a run from a model set (`unclip train STAGE --init-from DIR`): its CLIP becomes the run's
    frozen CLIP, so the prior and decoder go on training against the embeddings they were trained on."""
    from unclip_cli.modelset import FILES

    if stage == "clip":
        raise UnclipError("CLIP cannot be started from a model set", hint="a new CLIP needs a new prior and decoder: train it from scratch")
    if stage == "upsampler":
        return  # the upsampler never sees CLIP
    src = checkpoint.load(model_set / FILES["clip"], "clip")
    path = run / "frozen_clip.safetensors"
    if path.is_file():
        uid = checkpoint.load(path, "clip").extra.get("uid")
        if uid != src.extra.get("uid"):
            raise UnclipError(f"{run} already trains against another CLIP than {model_set}", hint="use a new --run folder")
        return
    checkpoint.save(path, "clip", src.model, src.config, None, src.extra)  # fp32: the embeddings are computed from it


def init_from_set(task: Task, model_set: Path) -> dict:
    """Load the model set's weights for `task`'s stage into its model; -> the facts the run starts from.
    The set must match the task: same architecture and diffusion, and (prior, decoder) the same CLIP."""
    from unclip_cli.modelset import FILES

    path = model_set / FILES[task.kind]
    ck = checkpoint.load(path, task.kind)
    if ck.config != task.config or ck.diffusion != task.diffusion_cfg:
        raise UnclipError(f"{path} has another architecture or diffusion than the preset", hint="pass the --preset it was trained with")
    if task.kind in ("prior", "decoder") and ck.extra.get("clip_uid") != task.extra.get("clip_uid"):
        raise UnclipError(f"{path} was trained with another CLIP than this run's", hint="use a new --run folder")
    task.model.load_state_dict(ck.model.state_dict(), strict=True)
    ex = ck.extra
    return {"path": str(model_set), "uid": ex.get("uid"), "trained_steps": int(ex.get("trained_steps") or 0),
            "images_seen": int(ex.get("images_seen") or 0), "train_seconds": float(ex.get("train_seconds") or 0.0)}


class PriorTask(Task):
    kind = "prior"

    def __init__(self, preset, data, run, device):
        super().__init__(preset, data, run, device)
        self.config = config_from_dict(PriorConfig, preset["prior"]["model"])
        self.diffusion_cfg = config_from_dict(DiffusionConfig, preset["prior"]["diffusion"])
        self.diffusion = GaussianDiffusion(self.diffusion_cfg)
        clip, clip_uid, _ = frozen_clip(self.run, device)
        cache = open_cache(data, clip.cfg.image_size, self.cache_root)
        self.emb = Embeddings(self.run / "embeddings", clip, clip_uid, cache, device)
        self.n = len(self.emb.z_i)
        self.model = Prior(self.config).to(device)
        with torch.no_grad():  # standardisation statistics of the training embeddings (karlo's clip_mean/std)
            self.model.emb_mean.copy_(self.emb.z_i.mean(0))
            self.model.emb_std.copy_(self.emb.z_i.std(0).clamp(min=1e-4))
        self.extra = {"clip_uid": clip_uid}

    def loss(self, idx, gen):
        B = len(idx)
        rows = [self.emb.caption_rows[i][int(torch.randint(len(self.emb.caption_rows[i]), (1,), generator=gen))] for i in idx]
        z_t, states, mask = self.emb.text(rows, self.device)
        x_start = self.model.standardize(self.emb.z_i[idx].to(self.device))
        t = torch.randint(0, self.diffusion.num_timesteps, (B,), generator=gen).to(self.device)
        noise = torch.randn(x_start.shape, generator=gen).to(self.device)
        keep = (torch.rand(B, generator=gen) >= PRIOR_TEXT_DROP).to(self.device)
        losses = self.diffusion.training_losses(lambda x, tt: self.net(x, tt, z_t, states, mask, keep), x_start, t, noise)
        return losses.mean()


def mean_image(images: np.ndarray, size: int = MEAN_IMAGE_SIZE, max_images: int = 16384, chunk: int = 4096) -> list:
    """The training images' mean in [-1, 1], area-averaged to size x size: (3, size, size) as nested lists.
    The engine starts decoding from it (see `diffusion.policy.DECODER_T_START`); it is smooth, so 8x8 loses nothing.
    At most `max_images`, evenly spaced, are read: it is computed at every (re)start, and a large corpus
    must not cost a pass over its cache."""
    rows = np.unique(np.linspace(0, len(images) - 1, min(len(images), max_images)).round().astype(np.int64))
    total = np.zeros(images.shape[1:], dtype=np.float64)
    for s in range(0, len(rows), chunk):
        total += images[rows[s : s + chunk]].sum(axis=0, dtype=np.float64)
    mean = torch.from_numpy(total / len(rows) / 127.5 - 1).permute(2, 0, 1)[None]  # (1, 3, s, s) float64
    return F.adaptive_avg_pool2d(mean, size)[0].round(decimals=4).tolist()


class DecoderTask(Task):
    kind = "decoder"

    def __init__(self, preset, data, run, device):
        super().__init__(preset, data, run, device)
        self.config = config_from_dict(UNetConfig, preset["decoder"]["model"])
        self.diffusion_cfg = config_from_dict(DiffusionConfig, preset["decoder"]["diffusion"])
        self.diffusion = GaussianDiffusion(self.diffusion_cfg)
        clip, clip_uid, _ = frozen_clip(self.run, device)
        self.emb = Embeddings(self.run / "embeddings", clip, clip_uid, open_cache(data, clip.cfg.image_size, self.cache_root), device)
        self.cache = open_cache(data, self.config.image_size, self.cache_root)
        self.n = len(self.cache)
        self.model = UNet(self.config).to(device)
        self.extra = {"clip_uid": clip_uid, "x_start_mean": mean_image(self.cache.images)}
        # What a step reads: host memory maps and CPU tensors here; tensors on the device after hold_data_on_device.
        self.images, self.states, self.lengths, self.z_i = self.cache.images, self.emb.states, self.emb.lengths, self.emb.z_i
        self.captions, self.caption_counts = self.emb.caption_table()

    device_data = True

    def hold_data_on_device(self):
        dev = self.device
        self.images, self.states = to_device_tensor(self.cache.images, dev), to_device_tensor(self.emb.states, dev)  # uint8, fp16
        self.lengths, self.z_i = self.emb.lengths.to(dev), self.emb.z_i.to(dev)
        self.captions, self.caption_counts = (t.to(dev) for t in self.emb.caption_table())
        self.data_device, self.data_held = dev, True

    def loss(self, idx, gen):
        B, s, dev, here = len(idx), self.config.image_size, self.device, self.data_device
        g = step_generator(gen, here)
        idx = torch.from_numpy(np.sort(idx)).to(here)
        x_start = unit_rows(self.images, idx, dev)
        z_i = self.z_i[idx].to(dev)
        pick = (torch.rand(B, generator=g, device=here) * self.caption_counts[idx]).long()  # one caption per image
        states, mask = text_rows(self.states, self.lengths, self.captions[idx, pick], dev)
        z_keep = (torch.rand(B, generator=g, device=here) >= DECODER_Z_DROP).to(dev)
        mask = mask & (torch.rand(B, generator=g, device=here) >= DECODER_TEXT_DROP).to(dev)[:, None]
        cond = None
        if self.config.extra_channels:
            keep = random_keep_masks(B, s, g).to(dev)
            inpaint = (torch.rand(B, generator=g, device=here) < INPAINT_FRACTION).to(dev)[:, None, None, None].float()
            cond = torch.cat([x_start * keep, keep], dim=1) * inpaint  # zero for plain generation
        t = torch.randint(0, self.diffusion.num_timesteps, (B,), generator=g, device=here).to(dev)
        noise = torch.randn(x_start.shape, generator=g, device=here).to(dev)
        fn = lambda x, tt: self.net(x, tt, cond=cond, z_i=z_i, z_keep=z_keep, text_states=states, text_mask=mask)  # noqa: E731
        return self.diffusion.training_losses(fn, x_start, t, noise).mean()

    @torch.no_grad()
    def sample_grid(self, ema_model, path):
        """Top row: real images; bottom row: decoded from their z_i as `unclip generate` decodes (20 DDPM
        steps from the noised mean image at DECODER_T_START, guidance 3, no caption)."""
        from unclip_cli.diffusion.policy import DECODER_T_START, decoder_denoiser, noised_mean
        from unclip_cli.diffusion.samplers import sample_ddpm
        from unclip_cli.diffusion.schedule import spaced_timesteps

        idx = np.linspace(0, self.n - 1, 8).astype(int)
        z = self.emb.z_i[idx].to(self.device)
        L = self.emb.states.shape[1]
        states = torch.zeros(8, L, self.emb.states.shape[2], device=self.device)
        no_text = torch.zeros(8, L, dtype=torch.bool, device=self.device)
        gen = torch.Generator().manual_seed(0)
        shape = (8, 3, self.config.image_size, self.config.image_size)
        x = noised_mean(self.diffusion, self.extra["x_start_mean"], torch.randn(shape, generator=gen)).to(self.device)
        denoise = decoder_denoiser(self.diffusion, ema_model, z, states, no_text, 3.0)
        ts = spaced_timesteps(self.diffusion.num_timesteps, GRID_DECODER_STEPS, start=DECODER_T_START)
        x = sample_ddpm(denoise, x, ts, self.diffusion, randn=lambda: torch.randn(shape, generator=gen).to(self.device))
        save_grid(torch.cat([to_unit(self.cache.images[idx]), x.cpu()]), path, cols=8)


class UpsamplerTask(Task):
    kind = "upsampler"

    def __init__(self, preset, data, run, device):
        super().__init__(preset, data, run, device)
        self.config = config_from_dict(UNetConfig, preset["upsampler"]["model"])
        self.diffusion_cfg = config_from_dict(DiffusionConfig, preset["upsampler"]["diffusion"])
        self.diffusion = GaussianDiffusion(self.diffusion_cfg)
        self.scale = preset["upsampler"]["scale"]
        self.low_res = preset["decoder"]["model"]["image_size"]
        self.size = self.low_res * self.scale
        self.cache = open_cache(data, self.size, self.cache_root)
        self.n = len(self.cache)
        self.model = UNet(self.config).to(device)
        self.extra = {"scale": self.scale, "low_res": self.low_res}
        self.images = self.cache.images  # a host memory map; a uint8 tensor on the device after hold_data_on_device

    device_data = True

    def hold_data_on_device(self):
        self.images, self.data_device, self.data_held = to_device_tensor(self.cache.images, self.device), self.device, True

    def low_res_condition(self, hi: torch.Tensor) -> torch.Tensor:
        low = F.interpolate(hi, size=(self.low_res,) * 2, mode="bilinear", antialias=True, align_corners=False)
        return F.interpolate(blur(low), size=hi.shape[-2:], mode="bilinear", align_corners=False).clamp(-1, 1)

    def loss(self, idx, gen):
        B, c, dev, here = len(idx), self.config.image_size, self.device, self.data_device
        g = step_generator(gen, here)
        hi = unit_rows(self.images, torch.from_numpy(np.sort(idx)).to(here), dev)  # (B, 3, S, S)
        cond = self.low_res_condition(hi)
        # One random crop per image, a quarter of the target side (App. C); the network is convolutional.
        ys = torch.randint(0, self.size - c + 1, (B,), generator=g, device=here).to(dev)
        xs = torch.randint(0, self.size - c + 1, (B,), generator=g, device=here).to(dev)
        x_start, low = crops(hi, ys, xs, c), crops(cond, ys, xs, c)
        t = torch.randint(0, self.diffusion.num_timesteps, (B,), generator=g, device=here).to(dev)
        noise = torch.randn(x_start.shape, generator=g, device=here).to(dev)
        return self.diffusion.training_losses(lambda x, tt: self.net(x, tt, cond=low), x_start, t, noise).mean()

    @torch.no_grad()
    def sample_grid(self, ema_model, path):
        """Rows: real, its blurred low-res condition, the upsampled result (as the engine samples it)."""
        from unclip_cli.diffusion.gaussian import make_denoiser
        from unclip_cli.diffusion.policy import UPSAMPLER_T_START
        from unclip_cli.diffusion.samplers import sample_ddim
        from unclip_cli.diffusion.schedule import spaced_timesteps

        idx = np.linspace(0, self.n - 1, 4).astype(int)
        hi = to_unit(self.cache.images[idx]).to(self.device)
        cond = self.low_res_condition(hi)
        gen = torch.Generator().manual_seed(0)
        ts = spaced_timesteps(self.diffusion.num_timesteps, GRID_UPSAMPLER_STEPS, start=UPSAMPLER_T_START)
        x = self.diffusion.q_sample(cond, torch.full((len(idx),), ts[0]), torch.randn(hi.shape, generator=gen).to(self.device))
        denoise = make_denoiser(self.diffusion, lambda x_t, t: ema_model(x_t, t, cond=cond), clip_x_start=1.0)
        x = sample_ddim(denoise, x, ts, self.diffusion)
        save_grid(torch.cat([hi, cond, x]).cpu(), path, cols=4)


TASKS = {"clip": ClipTask, "prior": PriorTask, "decoder": DecoderTask, "upsampler": UpsamplerTask}


def save_grid(x: torch.Tensor, path: Path, cols: int) -> None:
    from PIL import Image

    from unclip_cli.checkpoint import atomic_write

    B, _, H, W = x.shape
    rows = math.ceil(B / cols)
    grid = torch.ones(3, rows * H, cols * W)
    for i, img in enumerate(x):
        r, c = divmod(i, cols)
        grid[:, r * H : (r + 1) * H, c * W : (c + 1) * W] = img.clamp(-1, 1)
    arr = ((grid + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    atomic_write(Path(path), lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))
