"""A model set: a folder with `clip`, `prior`, `decoder` and one or more `upsampler` checkpoints.

    weights/emoji/clip.safetensors  prior.safetensors  decoder.safetensors  upsampler.safetensors
                  [upsampler-2.safetensors ...]  [MODEL_CARD.md]  [metrics.json]

The prior and decoder record the id of the CLIP they were trained with; loading refuses a mismatched
set (a decoder from one CLIP with a prior from another only produces noise). The upsamplers must chain
from the decoder's resolution; a stage may take the previous image downsized by a whole factor (its `low_res`).

An upsampler may have a companion `upsampler-last.safetensors` (same config) that takes only the final
sampling step of its stage, as Karlo's super_res_last does. The decoder's `extra` may hold a `sampling`
object, the set's sampling recipe (`diffusion.recipe.SamplingRecipe`); without one, the emoji defaults.

A latent set (Stable unCLIP) adds `vae.safetensors`, the autoencoder its decoder samples in, and may add
`text.safetensors`, the decoder's own text encoder (a CLIP text tower whose token states it cross-attends to;
without one the decoder reads the CLIP's). It needs no upsampler, and its prior is optional: without one it
varies, blends and edits images but does not generate from text.

Loading reads every file's metadata and tensor shapes and checks them at once; the tensors are read when
a stage is first used (`Stage.model`), so `unclip info` on a multi-gigabyte set is quick.
"""

from __future__ import annotations

import hashlib
import re
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from unclip_cli import checkpoint
from unclip_cli.checkpoint import DAMAGED_HINT, config_from_dict, shorten
from unclip_cli.diffusion.gaussian import DiffusionConfig, GaussianDiffusion
from unclip_cli.diffusion.recipe import SamplingRecipe
from unclip_cli.errors import WeightsError
from unclip_cli.models.clip import Clip, ClipConfig
from unclip_cli.models.prior import Prior, PriorConfig
from unclip_cli.models.unet import UNet, UNetConfig
from unclip_cli.presets import load_preset


SAMPLED_TIMESTEPS = 1000  # the schedule length every sampling policy here is set for (diffusion/policy.py)
FILES = {"clip": "clip.safetensors", "prior": "prior.safetensors", "decoder": "decoder.safetensors", "upsampler": "upsampler.safetensors"}
MAX_IMAGE_SIZE = 4096  # px: a set that claims to make larger images is damaged, not a model
SCALES = range(2, 9)  # an upsampler's factor


LAST_SUFFIX = "-last"  # upsampler-last.safetensors: the companion that takes its stage's final step


class Stage:
    """One checkpoint of a set: its config, diffusion and extra at once; its network (`model`) read on first use."""

    def __init__(self, header: checkpoint.Header, device, dtype, last: "Stage | None" = None):
        self.header, self.device, self.dtype, self.last = header, device, dtype, last
        self.config, self.extra, self.path = header.config, header.extra, header.path
        self.diffusion = GaussianDiffusion(header.diffusion) if header.diffusion else None
        self._model: torch.nn.Module | None = None
        self._lock = threading.Lock()
        self.before_load = None  # called with this stage before its network is read (the set's offloading)

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            with self._lock:
                if self._model is None:
                    if self.before_load is not None:
                        self.before_load(self)
                    self._model = checkpoint.materialize(self.header, self.device, self.dtype)
        return self._model

    def unload(self) -> None:
        """Drop the network (it is read again on next use)."""
        with self._lock:
            self._model = None

    @property
    def parameters(self) -> int:
        return self.header.parameters


@dataclass
class ModelSet:
    root: Path
    clip: Stage
    prior: Stage | None
    decoder: Stage
    upsamplers: list[Stage]
    card: str | None
    sampling: SamplingRecipe = field(default_factory=SamplingRecipe)
    vae: Stage | None = None  # the autoencoder of a latent decoder
    text: Stage | None = None  # the decoder's own text encoder (else the CLIP's text tower)

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def stages(self) -> list[Stage]:
        """Every checkpoint of the set, final-step companions included."""
        out = [s for s in (self.clip, self.prior, self.decoder, self.vae, self.text) if s is not None]
        for up in self.upsamplers:
            out += [up] + ([up.last] if up.last else [])
        return out

    @property
    def parameters(self) -> int:
        return sum(s.parameters for s in self.stages)

    # -- memory: the whole set on the device, or one network at a time -----------------------------------------------
    offload: bool = False

    def memory_needed(self) -> int:
        """Bytes the networks take on their device in the dtype they run in, all stages loaded at once."""
        return sum(s.parameters * _element_size(s) for s in self.stages)

    def set_offload(self, mode: str = "auto") -> bool:
        """"on": keep only the network in use (with its final-step companion) loaded, dropping the others, which are
        read again from their files when next used (the system's file cache usually still holds them), as diffusers'
        model offload keeps one network on the device at a time; "off": keep every network once read; "auto": "on"
        when the whole set would take more than 70% of the memory free on its device. Returns whether it is on."""
        if mode not in OFFLOAD_MODES:
            raise ValueError(f"offload mode {mode!r}; choose from {', '.join(OFFLOAD_MODES)}")
        device = self.decoder.device
        on = mode == "on" or mode == "auto" and self.memory_needed() > 0.7 * free_memory(device)
        self.offload = on
        for stage in self.stages:
            stage.before_load = self._make_room if on else None
        if on:
            for stage in self.stages:
                stage.unload()
        return on

    def _make_room(self, stage: Stage) -> None:
        """Drop every loaded network but `stage`'s group (an upsampler and its final-step companion run together)."""
        group = [stage] + [x for u in self.upsamplers if stage in (u, u.last) for x in (u, u.last)]
        dropped = False
        for other in self.stages:
            if all(other is not g for g in group) and other.loaded:
                other.unload()
                dropped = True
        if dropped:
            import gc

            gc.collect()  # free the dropped network now, before the next one is read
            if torch.device(stage.device).type == "cuda":
                torch.cuda.empty_cache()

    @property
    def base_size(self) -> int:
        return self.decoder.config.image_size

    @property
    def latent_factor(self) -> int:
        """Pixels per decoder sample along a side: the autoencoder's downsampling, or 1 for a pixel decoder."""
        return self.vae.config.factor if self.vae is not None else 1

    @property
    def image_size(self) -> int:
        size = self.base_size * self.latent_factor
        for up in self.upsamplers:
            size = up.extra.get("low_res", size) * up.extra["scale"]
        return size

    @property
    def model_hash(self) -> str:
        """A short id of the set, from the ids its files carry (stable, cheap: no tensor hashing)."""
        ids = [s.extra.get("uid", "") for s in self.stages]
        return hashlib.sha256("/".join(ids).encode()).hexdigest()[:10]


OFFLOAD_MODES = ("auto", "on", "off")


def _element_size(stage: Stage) -> int:
    return torch.empty((), dtype=stage.dtype or torch.float32).element_size()


def free_memory(device) -> int:
    """Bytes free for networks on `device`: the GPU's free memory, or the host's available memory (Linux's
    MemAvailable; elsewhere, unknown, so treated as plenty)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 62


def upsampler_files(root: Path) -> list[Path]:
    """The upsampler stages in order (upsampler, upsampler-2, ...), without their final-step companions."""
    files = sorted((p for p in root.glob("upsampler*.safetensors") if not p.stem.endswith(LAST_SUFFIX)),
                   key=lambda p: (len(p.name), p.name))
    return files


def last_step_file(path: Path) -> Path:
    return path.with_name(path.stem + LAST_SUFFIX + path.suffix)


def load_model_set(root: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> ModelSet:
    root = Path(root)
    try:
        found = root.is_dir()
    except OSError as e:  # a name too long for the filesystem, say
        raise WeightsError(f"{root}: model set folder cannot be read ({e.strerror or e})", hint="check the --weights path") from None
    if not found:
        raise WeightsError(f"{root}: model set folder not found", hint="pass --weights DIR with clip/prior/decoder/upsampler .safetensors files")
    latent = (root / "vae.safetensors").is_file()
    required = [FILES["clip"], FILES["decoder"]] if latent else list(FILES.values())
    missing = [name for name in required if not (root / name).is_file()]
    if missing:  # without its upsampler, a set would quietly make base-size images
        raise WeightsError(f"{root}: incomplete model set, missing {', '.join(missing)}",
                           hint="a model set holds clip, prior, decoder and upsampler .safetensors files exported together")

    def stage(path: Path, kind: str) -> Stage:
        header = checkpoint.inspect(path, kind)
        if header.diffusion and header.diffusion.timesteps != SAMPLED_TIMESTEPS:
            raise WeightsError(f"{path}: diffusion timesteps is {header.diffusion.timesteps}; unclip samples "
                               f"{SAMPLED_TIMESTEPS}-step schedules (its start timesteps and step limits assume them)")
        last = None
        if kind == "upsampler" and last_step_file(path).is_file():
            last = stage(last_step_file(path), kind)
            if last.config != header.config or last.header.diffusion != header.diffusion:
                raise WeightsError(f"{last.path}: its config differs from {path.name}'s, whose final step it takes")
        return Stage(header, device, dtype, last)

    clip = stage(root / FILES["clip"], "clip")
    prior = stage(root / FILES["prior"], "prior") if (root / FILES["prior"]).is_file() else None
    decoder = stage(root / FILES["decoder"], "decoder")
    vae = stage(root / "vae.safetensors", "vae") if latent else None
    text = stage(root / "text.safetensors", "clip") if (root / "text.safetensors").is_file() else None
    ups = [stage(p, "upsampler") for p in upsampler_files(root)]
    if vae is not None and decoder.config.in_channels != vae.config.latent_channels:
        raise WeightsError(f"{decoder.path}: samples {decoder.config.in_channels} channels, but {vae.path.name} has "
                           f"{vae.config.latent_channels} latent channels", hint=DAMAGED_HINT)
    if vae is not None and ups:
        raise WeightsError(f"{root}: a latent set (vae.safetensors) with upsamplers; unclip runs upsamplers on pixel decoders only")
    for s in (clip, *(s for s in (prior, vae) if s), decoder, *ups, *(u.last for u in ups if u.last)):  # ids are compared and hashed (model_hash) as strings
        for key in ("uid", "clip_uid"):
            if not isinstance(s.extra.get(key, ""), str):
                raise WeightsError(f"{s.path}: extra field {key!r} is {shorten(s.extra[key])}, not a string", hint=DAMAGED_HINT)
    for s in (x for x in (prior, decoder, vae) if x is not None):
        if s.extra.get("clip_uid") != clip.extra.get("uid"):
            raise WeightsError(
                f"{s.path}: trained with a different CLIP than {clip.path.name} in this folder",
                hint="use files exported together (unclip train export) — mixing sets produces noise",
            )
    _check_mean(decoder)
    sampling = _sampling(decoder)
    size = decoder.config.image_size
    if size > MAX_IMAGE_SIZE:
        raise WeightsError(f"{decoder.path}: config field 'image_size' is {size}, above {MAX_IMAGE_SIZE} px", hint=DAMAGED_HINT)
    for up in ups:
        size = _chain(up, size)
    return ModelSet(root, clip, prior, decoder, ups, _read_card(root / "MODEL_CARD.md"), sampling, vae=vae, text=text)


def _sampling(decoder: Stage) -> SamplingRecipe:
    """The set's sampling recipe from the decoder's extra field `sampling` (absent: the defaults)."""
    raw = decoder.extra.get("sampling")
    if raw is None:
        return SamplingRecipe()
    try:
        return config_from_dict(SamplingRecipe, raw)
    except (ValueError, TypeError) as e:
        raise WeightsError(f"{decoder.path}: bad extra field 'sampling' ({e})", hint=DAMAGED_HINT) from None


def _chain(up: Stage, size: int) -> int:
    """The image size after upsampler `up`, which takes `size` px images; its extra fields are checked."""
    scale, low_res = up.extra.get("scale"), up.extra.get("low_res", size)
    if type(scale) is not int or scale not in SCALES:
        got = shorten(scale) if "scale" in up.extra else "missing"
        raise WeightsError(f"{up.path}: extra field 'scale' is {got}; it must be an integer from {SCALES[0]} to {SCALES[-1]}",
                           hint=DAMAGED_HINT)
    # A stage may take the image before it downsized by a whole factor (emoji: 32 -> 128, then 128 -> 64 -> 256;
    # the 64 -> 256 stage was trained on real images downsized to 64 px, so it gets what it knows).
    if type(low_res) is not int or low_res <= 0 or low_res > size or size % low_res:
        raise WeightsError(f"{up.path}: upsamples from {shorten(low_res)} px (extra field 'low_res'), "
                           f"but the stage before it gives {size} px")
    if low_res * scale > MAX_IMAGE_SIZE:
        raise WeightsError(f"{up.path}: extra field 'scale' ({scale}) makes {low_res * scale} px images, above {MAX_IMAGE_SIZE} px",
                           hint=DAMAGED_HINT)
    return low_res * scale


def _check_mean(decoder: Stage) -> None:
    """The decoder's `x_start_mean` (the training images' mean, where sampling starts): absent, or
    nested lists (3, m, m) of numbers in [-1, 1], the range of images."""
    mean = decoder.extra.get("x_start_mean")
    if mean is None:
        return
    try:
        t = torch.tensor(mean, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError, OverflowError):  # ragged lists, strings, huge ints
        t = None
    shaped = t is not None and t.dim() == 3 and t.shape[0] == 3 and t.shape[1] == t.shape[2] > 0
    if not shaped or not bool((t.abs() <= 1).all()):  # NaN fails the comparison too
        raise WeightsError(f"{decoder.path}: extra field 'x_start_mean' is not (3, m, m) nested lists of numbers in [-1, 1]",
                           hint=DAMAGED_HINT)


def _read_card(path: Path) -> str | None:
    """MODEL_CARD.md: optional, untrusted text shown on a terminal. Bytes that are not UTF-8 become
    U+FFFD, control characters other than newline and tab are dropped (an escape sequence could
    rewrite the screen), and an unreadable card says so instead of stopping every command."""
    try:
        if not path.is_file():
            return None
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        return f"({path.name} could not be read: {e.strerror or e})"
    return _CONTROL.sub("", text)


_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # Unicode's control characters (Cc) but tab and newline


def build_models(preset: dict, seed: int = 0, uid_prefix: str | None = None) -> dict[str, tuple[torch.nn.Module, object, DiffusionConfig | None, dict]]:
    """Fresh, randomly initialised models for every stage of a preset: kind -> (model, config, diffusion, extra).

    Each file gets a `uid` (from `uid_prefix` when given, else random) and the diffusion stages record
    the CLIP's uid as `clip_uid`."""
    torch.manual_seed(seed)

    def uid(kind):
        return f"{uid_prefix}-{kind}" if uid_prefix else uuid.uuid4().hex

    clip_uid = uid("clip")
    out = {}
    clip_cfg = config_from_dict(ClipConfig, preset["clip"])
    out["clip"] = (Clip(clip_cfg), clip_cfg, None, {"uid": clip_uid})
    for kind, cls, cfg_cls in (("prior", Prior, PriorConfig), ("decoder", UNet, UNetConfig), ("upsampler", UNet, UNetConfig)):
        cfg = config_from_dict(cfg_cls, preset[kind]["model"])
        diffusion = config_from_dict(DiffusionConfig, preset[kind]["diffusion"])
        extra = {"uid": uid(kind), "clip_uid": clip_uid}
        if kind == "upsampler":
            extra.update(scale=preset[kind]["scale"], low_res=preset["decoder"]["model"]["image_size"])
        out[kind] = (cls(cfg), cfg, diffusion, extra)
    return out


def write_random_model_set(root: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """A randomly initialised set, for tests and for trying the machinery. Zero-initialised output layers
    get small random weights so that every input (noise, z_i, text, mask) changes the output."""
    root = Path(root)
    gen = torch.Generator().manual_seed(seed)
    for kind, (model, cfg, diffusion, extra) in build_models(load_preset(preset), seed, f"random-{preset}-{seed}").items():
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1 and not p.any():
                    p.normal_(0, 0.02, generator=gen)
        checkpoint.save(root / f"{kind}.safetensors", kind, model, cfg, diffusion, extra)
    return root
