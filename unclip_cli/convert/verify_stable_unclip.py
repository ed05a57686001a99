"""Checking a converted Stable unCLIP set against its originals, network by network, on the same random inputs
(float32; `verify.rel`'s largest relative difference). Needs diffusers and transformers, as `verify` does."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from unclip_cli.convert import verify
from unclip_cli.convert.verify import rel
from unclip_cli.errors import UnclipError


@torch.no_grad()
def text_states(ours, theirs, g: torch.Generator, device="cpu") -> float:
    """The decoder's text encoder: token states (its last layer, normed) for prompts of several lengths."""
    B, L = 3, ours.cfg.context_length
    tokens = torch.randint(1, 49406, (B, L), generator=g)
    for b, n in enumerate((3, L // 2, L)):
        tokens[b, 0], tokens[b, n - 1], tokens[b, n:] = ours.sot_id, ours.eot_id, ours.pad_id
    tokens = tokens.to(device)
    return rel(ours.encode_text(tokens)[1], theirs(tokens).last_hidden_state)


@torch.no_grad()
def unet(ours, theirs, g: torch.Generator, device="cpu") -> float:
    """The latent UNet, with the class input kept and dropped (zeros, diffusers' unconditional branch)."""
    cfg = ours.cfg
    B, s = 2, cfg.image_size
    x = torch.randn(B, cfg.in_channels, s, s, generator=g).to(device)
    c = torch.randn(B, cfg.class_dim, generator=g).to(device)
    states = torch.randn(B, 77, cfg.context_dim, generator=g).to(device)
    keep = torch.tensor([True, False], device=device)
    worst = 0.0
    for t in (999, 250):
        tt = torch.full((B,), t, dtype=torch.long, device=device)
        ref = theirs(x, tt, encoder_hidden_states=states, class_labels=c * keep[:, None]).sample
        worst = max(worst, rel(ours(x, tt, z_i=c, z_keep=keep, text_states=states), ref))
    return worst


@torch.no_grad()
def vae(ours, theirs, g: torch.Generator, device="cpu") -> float:
    """Encoding (the posterior's mean, scaled) and decoding."""
    S, f = ours.cfg.image_size, ours.cfg.factor
    S = min(S, 16 * f)  # convolutions and one attention: a smaller image checks the same weights, quickly
    x = torch.rand(2, 3, S, S, generator=g).mul(2).sub(1).to(device)
    z = torch.randn(2, ours.cfg.latent_channels, S // f, S // f, generator=g).to(device)
    sf = theirs.config.scaling_factor
    return max(rel(ours.encode(x), theirs.encode(x).latent_dist.mean * sf), rel(ours.decode(z), theirs.decode(z / sf).sample))


def stored_half(ours) -> dict[str, set[str]]:
    """{source part: source tensor names} the set stores in half precision (checking rounds those originals alike)."""
    from safetensors import safe_open

    from unclip_cli.convert import karlo, stable_unclip

    maps = [(ours.clip, stable_unclip.clip_map(ours.clip.config, "prior_text")), (ours.text, stable_unclip.clip_map(ours.text.config)),
            (ours.decoder, stable_unclip.unet_map(ours.decoder.config)), (ours.vae, stable_unclip.vae_map(ours.vae.config))]
    if ours.prior is not None:
        maps.append((ours.prior, karlo.prior_map(ours.prior.config)))
    out: dict[str, set[str]] = {}
    for stage, mapping in maps:
        with safe_open(str(stage.path), framework="pt") as f:
            for name in f.keys():
                if f.get_slice(name).get_dtype() in ("F16", "BF16") and name in mapping:
                    part, (_, keys) = mapping[name]
                    out.setdefault(part, set()).update(keys)
    return out


def check(src: str | Path, dst: str | Path, prior: str | Path | None = None, device: str = "cpu", seed: int = 0,
          progress: Callable[[str], None] | None = None) -> dict[str, float]:
    """Each network of the converted set at `dst` against its original in `src` (and `prior`), one pair at a time."""
    from unclip_cli.convert import stable_unclip
    from unclip_cli.modelset import load_model_set

    diffusers, transformers = verify.require_diffusers()
    verify.quiet_libraries()
    stable_unclip.read_folder(src, stable_unclip.PARTS, stable_unclip.PIPELINE, stable_unclip.FOLDER_HINT)
    src = Path(src)
    ours = load_model_set(dst, device=device, dtype=torch.float32)
    if prior is not None and ours.prior is None:
        raise UnclipError(f"{dst} has no prior to check against {prior}", hint="convert again with --prior")
    if ours.text is None or ours.vae is None:
        raise UnclipError(f"{dst} is not a converted Stable unCLIP set (it has no text.safetensors or vae.safetensors)")

    half = stored_half(ours)

    def load(cls, folder):
        kw = {"torch_dtype": torch.float32} if cls.__module__.startswith("diffusers") else {"dtype": torch.float32}
        part = {"image_encoder": "image_encoder", "text_encoder": "text_encoder" if Path(folder).parent == src else "prior_text"}.get(
            Path(folder).name, Path(folder).name)
        names = half.get(part, set())
        names = names | {n.removeprefix("text_model.") for n in names}  # transformers 5's CLIPTextModel names them without it
        return verify._round_like(cls.from_pretrained(folder, **kw), names).to(device).eval()

    g = torch.Generator().manual_seed(seed)
    results: dict[str, float] = {}

    def run(name, stage, fn):
        if progress:
            progress(name)
        results[name] = fn(stage.model)
        stage.unload()

    run("image encoder", ours.clip, lambda m: verify.image_encoder(m, load(transformers.CLIPVisionModelWithProjection, src / "image_encoder"),
                                                                   g, device))
    run("text encoder", ours.text, lambda m: text_states(m, load(transformers.CLIPTextModel, src / "text_encoder"), g, device))
    run("unet", ours.decoder, lambda m: unet(m, load(diffusers.UNet2DConditionModel, src / "unet"), g, device))
    run("vae", ours.vae, lambda m: vae(m, load(diffusers.AutoencoderKL, src / "vae"), g, device))
    if prior is not None:
        run("prior text encoder", ours.clip, lambda m: verify.text_encoder(
            m, load(transformers.CLIPTextModelWithProjection, Path(prior) / "text_encoder"), g, device))
        run("prior", ours.prior, lambda m: verify.prior(m, load(diffusers.PriorTransformer, Path(prior) / "prior"), g, device))
    return results
