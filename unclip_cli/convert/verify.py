"""Checking a converted Karlo set against its originals: each network, on the same random inputs.

    diffs = verify.check(src, dst, variation)   # {"text encoder": 3e-7, "prior": 1e-6, ...}

Every converted network runs beside the diffusers / transformers module it came from, both in float32, on
the same seeded random inputs (tokens, pixels, noised embeddings and images, timesteps, text masks, the
learned null z_i), and the largest relative difference of their outputs, max |ours - theirs| / max |theirs|,
is reported per network. diffusers and transformers are needed only here (`pip install diffusers
transformers`); the rest of unclip never imports them.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from unclip_cli.errors import UnclipError

LIMIT = 1e-4  # above this, a conversion is wrong (float32 rounding of these networks stays near 1e-6)
INSTALL_HINT = "pip install diffusers transformers (only checking a conversion needs them)"


def require_diffusers():
    """Import diffusers and transformers, or say how to install them."""
    try:
        diffusers = importlib.import_module("diffusers")
        transformers = importlib.import_module("transformers")
    except ImportError as e:
        raise UnclipError(f"checking a conversion runs the original networks, which needs diffusers and transformers ({e.name} is missing)",
                          hint=INSTALL_HINT) from None
    return diffusers, transformers


def quiet_libraries() -> None:
    """diffusers' and transformers' notes and progress bars (accelerate, deprecations, shards) are not ours to show."""
    for lib in require_diffusers():
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()


def text_proj_class():
    """diffusers' UnCLIPTextProjModel (its module moved when the UnCLIP pipelines were deprecated)."""
    for name in ("diffusers.pipelines.deprecated.unclip.text_proj", "diffusers.pipelines.unclip.text_proj"):
        try:
            return importlib.import_module(name).UnCLIPTextProjModel
        except (ImportError, AttributeError):
            continue
    raise UnclipError("this diffusers has no UnCLIPTextProjModel", hint="pip install 'diffusers>=0.12'")


def rel(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| / max |theirs| (NaN anywhere: inf)."""
    ours, theirs = ours.double(), theirs.double()
    if ours.shape != theirs.shape:
        raise ValueError(f"shapes differ: {tuple(ours.shape)} and {tuple(theirs.shape)}")
    if not (torch.isfinite(ours).all() and torch.isfinite(theirs).all()):
        return float("inf")
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp(min=1e-30))


def _mask(B: int, L: int, g: torch.Generator) -> torch.Tensor:
    """Text masks of random lengths (2..L), True = a real token."""
    lengths = torch.randint(2, L + 1, (B,), generator=g)
    return torch.arange(L)[None] < lengths[:, None]


# -- one comparison per network: ours (an unclip module) against theirs (the original), same inputs -----------
@torch.no_grad()
def text_encoder(ours, theirs, g: torch.Generator, device="cpu") -> float:
    clip = ours
    B, L = 3, clip.cfg.context_length
    tokens = torch.randint(1, 49406, (B, L), generator=g)
    lengths = torch.tensor([3, L // 2, L])
    for b, n in enumerate(lengths):  # start, words, end, padding
        tokens[b, 0], tokens[b, n - 1], tokens[b, n:] = clip.sot_id, clip.eot_id, clip.pad_id
    tokens = tokens.to(device)
    z_t, states, _ = clip.encode_text(tokens)
    out = theirs(tokens)
    return max(rel(z_t, out.text_embeds), rel(states, out.last_hidden_state))


@torch.no_grad()
def image_encoder(ours, theirs, g: torch.Generator, device="cpu") -> float:
    S = ours.cfg.image_size
    pixels = torch.randn(2, 3, S, S, generator=g).to(device)
    return rel(ours.encode_pixels(pixels), theirs(pixels).image_embeds)


@torch.no_grad()
def prior(ours, theirs, g: torch.Generator, device="cpu") -> float:
    cfg = ours.cfg
    B, L, D = 3, cfg.context_length, cfg.clip_dim
    x = torch.randn(B, D, generator=g).to(device)
    z_t = torch.randn(B, D, generator=g).to(device)
    states = torch.randn(B, L, cfg.text_width, generator=g).to(device)
    mask = _mask(B, L, g).to(device)
    worst = 0.0
    for t in (999, 500, 0):
        tt = torch.full((B,), t, dtype=torch.long, device=device)
        mine = ours(x, tt, z_t, states, mask)
        ref = theirs(x, timestep=tt, proj_embedding=z_t, encoder_hidden_states=states, attention_mask=mask).predicted_image_embedding
        worst = max(worst, rel(mine, ref))
    return worst


@torch.no_grad()
def decoder(ours, theirs_unet, theirs_proj, g: torch.Generator, device="cpu") -> float:
    """Our decoder UNet against diffusers' text_proj + UNet2DConditionModel, with z_i and with the learned null."""
    cfg = ours.cfg
    B, L, s = 2, 77, cfg.image_size
    x = torch.randn(B, 3, s, s, generator=g).to(device)
    z_i = torch.randn(B, cfg.clip_dim, generator=g).to(device)
    z_t = torch.randn(B, cfg.clip_dim, generator=g).to(device)
    states = torch.randn(B, L, cfg.text_width, generator=g).to(device)
    mask = _mask(B, L, g).to(device)
    worst = 0.0
    for t in (999, 300):
        tt = torch.full((B,), t, dtype=torch.long, device=device)
        # diffusers' guidance batch: the null image embedding first, then z_i
        ctx, added = theirs_proj(image_embeddings=z_i, prompt_embeds=torch.cat([z_t, z_t]),
                                 text_encoder_hidden_states=torch.cat([states, states]), do_classifier_free_guidance=True)
        full_mask = F.pad(torch.cat([mask, mask]), (theirs_proj.clip_extra_context_tokens, 0), value=True)
        ref = theirs_unet(torch.cat([x, x]), torch.cat([tt, tt]), encoder_hidden_states=ctx, class_labels=added,
                          attention_mask=full_mask).sample
        keep = torch.tensor([False] * B + [True] * B, device=device)
        mine = ours(torch.cat([x, x]), torch.cat([tt, tt]), z_i=torch.cat([z_i, z_i]), z_keep=keep,
                    text_states=torch.cat([states, states]), text_mask=torch.cat([mask, mask]), z_t=torch.cat([z_t, z_t]))
        worst = max(worst, rel(mine, ref))
    return worst


@torch.no_grad()
def super_res(ours, theirs, g: torch.Generator, device="cpu", size: int | None = None) -> float:
    """A super-resolution UNet (convolutions only, so any multiple of its downsampling runs; `size` keeps it quick)."""
    S = size or ours.cfg.image_size
    x = torch.randn(2, 3, S, S, generator=g).to(device)
    low = torch.randn(2, 3, S, S, generator=g).clamp(-1, 1).to(device)
    worst = 0.0
    for t in (999, 0):
        tt = torch.full((2,), t, dtype=torch.long, device=device)
        worst = max(worst, rel(ours(x, tt, cond=low), theirs(torch.cat([x, low], dim=1), tt).sample))
    return worst


# -- a whole set --------------------------------------------------------------------------------------------
def originals(src: str | Path, variation: str | Path | None = None, dtype=torch.float32, device="cpu") -> dict[str, Callable]:
    """Loaders of the original networks (each loads when called), by our stage name."""
    diffusers, transformers = require_diffusers()
    src = Path(src)

    def load(cls, folder):
        # transformers names the option `dtype` (formerly `torch_dtype`), diffusers still `torch_dtype`
        key = "torch_dtype" if cls.__module__.startswith("diffusers") else "dtype"

        def make():
            try:
                model = cls.from_pretrained(folder, **{key: dtype})
            except TypeError:
                model = cls.from_pretrained(folder).to(dtype=dtype)
            return model.to(device=device).eval()

        return make

    quiet_libraries()

    out = {
        "text encoder": load(transformers.CLIPTextModelWithProjection, src / "text_encoder"),
        "prior": load(diffusers.PriorTransformer, src / "prior"),
        "decoder": load(diffusers.UNet2DConditionModel, src / "decoder"),
        "text_proj": load(text_proj_class(), src / "text_proj"),
        "super-res first": load(diffusers.UNet2DModel, src / "super_res_first"),
        "super-res last": load(diffusers.UNet2DModel, src / "super_res_last"),
    }
    if variation is not None:
        out["image encoder"] = load(transformers.CLIPVisionModelWithProjection, Path(variation) / "image_encoder")
    return out


def stored_half(ours) -> dict[str, set[str]]:
    """{source folder: source tensor names} whose converted tensors the set stores in half precision: checking
    a float16 conversion rounds those originals the same way, so only conversion errors remain."""
    from safetensors import safe_open

    from unclip_cli.convert import karlo

    maps = [(ours.clip, karlo.clip_map(ours.clip.config)), (ours.prior, karlo.prior_map(ours.prior.config)),
            (ours.decoder, karlo.unet_map(ours.decoder.config, "decoder", True))]
    for up in ours.upsamplers[:1]:
        maps.append((up, karlo.unet_map(up.config, "super_res_first", False)))
        if up.last is not None:
            maps.append((up.last, karlo.unet_map(up.last.config, "super_res_last", False)))
    out: dict[str, set[str]] = {}
    for stage, mapping in maps:
        with safe_open(str(stage.path), framework="pt") as f:
            for name in f.keys():
                if f.get_slice(name).get_dtype() in ("F16", "BF16") and name in mapping:
                    part, (_, keys) = mapping[name]
                    out.setdefault(part, set()).update(keys)
    return out


def _round_like(module, names: set[str], dtype=torch.float16):
    """Round the named parameters of an original module to `dtype` and back, as the conversion stored them."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name in names:
                p.copy_(p.to(dtype).to(p.dtype))
    return module


def check(src: str | Path, dst: str | Path, variation: str | Path | None = None, device: str = "cpu", seed: int = 0,
          progress: Callable[[str], None] | None = None, sr_size: int = 64) -> dict[str, float]:
    """Run every network of the converted set at `dst` against its original in `src` (and `variation`), one
    network at a time (the pair of them in memory, never the whole stack), in float32.
    Returns {network: largest relative difference}."""
    from unclip_cli.convert import karlo
    from unclip_cli.modelset import load_model_set

    karlo.read_folder(src, karlo.PARTS, karlo.PIPELINE, karlo.FOLDER_HINT)
    if variation is not None:
        karlo.read_folder(variation, karlo.VARIATION_PARTS, karlo.VARIATION_PIPELINE, karlo.FOLDER_HINT)
    theirs = originals(src, variation, device=device)
    ours = load_model_set(dst, device=device, dtype=torch.float32)
    if variation is not None and not ours.clip.config.vision:
        raise UnclipError(f"{dst} has no image encoder to check against {variation}", hint="convert again with --variation")
    if ours.upsamplers and ours.upsamplers[0].last is None:
        raise UnclipError(f"{dst} has no upsampler-last.safetensors to check against super_res_last")
    g = torch.Generator().manual_seed(seed)
    results: dict[str, float] = {}
    half = stored_half(ours)
    loaders = theirs
    theirs = {}
    for name, part in (("text encoder", "text_encoder"), ("image encoder", "image_encoder"), ("prior", "prior"), ("decoder", "decoder"),
                       ("text_proj", "text_proj"), ("super-res first", "super_res_first"), ("super-res last", "super_res_last")):
        if name in loaders:
            theirs[name] = lambda load=loaders[name], part=part: _round_like(load(), half.get(part, set()))

    def run(name, stage, fn):
        if progress:
            progress(name)
        results[name] = fn(stage.model)
        stage.unload()  # one pair of networks in memory at a time

    run("text encoder", ours.clip, lambda m: text_encoder(m, theirs["text encoder"](), g, device))
    if variation is not None:
        run("image encoder", ours.clip, lambda m: image_encoder(m, theirs["image encoder"](), g, device))
    run("prior", ours.prior, lambda m: prior(m, theirs["prior"](), g, device))
    run("decoder", ours.decoder, lambda m: decoder(m, theirs["decoder"](), theirs["text_proj"](), g, device))
    up = ours.upsamplers[0]
    size = min(sr_size, up.config.image_size)
    run("super-res first", up, lambda m: super_res(m, theirs["super-res first"](), g, device, size))
    run("super-res last", up.last, lambda m: super_res(m, theirs["super-res last"](), g, device, size))
    return results
