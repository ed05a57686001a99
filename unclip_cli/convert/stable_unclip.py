"""Stable unCLIP 2.1 (Stability's stable-diffusion-2-1-unclip[-small], diffusers layout) -> an unclip model set.

    unclip convert stable-unclip sd21-unclip-small --prior karlo-v1-alpha --to weights/sd-unclip-small

Reads a diffusers StableUnCLIPImg2ImgPipeline folder (`image_encoder/`, `feature_extractor/`, `image_normalizer/`,
`image_noising_scheduler/`, `text_encoder/`, `tokenizer/`, `unet/`, `scheduler/`, `vae/`) and, with `--prior`, a
Karlo UnCLIPPipeline folder for the prior and its CLIP text encoder (text-to-image as diffusers'
StableUnCLIPPipeline pairs them). Writes:

- clip.safetensors: the image encoder (whose embeddings the decoder reads), with Karlo's text tower when a prior
  is given (the same CLIP ViT-L/14 space for `-small`; a folder whose embedding width differs is refused);
- text.safetensors: the decoder's own text encoder (OpenCLIP ViT-H's text tower as Stable Diffusion 2 keeps it:
  23 layers, the penultimate, no projection), whose token states the UNet cross-attends to;
- decoder.safetensors: the latent UNet with the image normaliser's mean and std, and the sampling recipe;
- vae.safetensors: the autoencoder; prior.safetensors with `--prior`.

The shared pieces (typed config fields, header shape checks, plans, writing) are `convert.common`'s; Karlo's
converter supplies the CLIP and prior tables; this file holds the UNet, VAE and scheduler tables.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from unclip_cli import checkpoint
from unclip_cli.convert import karlo
from unclip_cli.convert.common import Fields, Folder, Plan, Rule, Tensors, check_destination, fail, plan, read_folder, write
from unclip_cli.convert.karlo import MAX_BLOCKS, MAX_CHANNELS, MAX_HEADS, MAX_LEVELS, MAX_WIDTH, _linear, _res, _tower
from unclip_cli.diffusion.gaussian import DiffusionConfig
from unclip_cli.diffusion.recipe import STABLE_UNCLIP
from unclip_cli.models.clip import BPE_VOCAB, ClipConfig
from unclip_cli.models.unet import UNetConfig
from unclip_cli.models.vae import VAEConfig

PIPELINE = "StableUnCLIPImg2ImgPipeline"
PARTS = {
    "image_encoder": "the CLIP image encoder (CLIPVisionModelWithProjection)",
    "feature_extractor": "the image preprocessing config (CLIPImageProcessor)",
    "image_normalizer": "the image embedding's statistics (StableUnCLIPImageNormalizer)",
    "image_noising_scheduler": "the image embedding's noise schedule (DDPMScheduler)",
    "text_encoder": "the decoder's text encoder (CLIPTextModel)",
    "tokenizer": "the text encoder's tokenizer",
    "unet": "the latent UNet (UNet2DConditionModel)",
    "scheduler": "the UNet's scheduler config",
    "vae": "the autoencoder (AutoencoderKL)",
}
FOLDER_HINT = ("unclip convert stable-unclip reads stabilityai/stable-diffusion-2-1-unclip or -unclip-small "
               "(StableUnCLIPImg2ImgPipeline); --prior takes kakaobrain/karlo-v1-alpha")
LICENCE = "openrail++"


# -- configs ----------------------------------------------------------------------------------------------------
def vision_config(folder: Folder, r: Tensors) -> ClipConfig:
    """The image encoder alone (a CLIP without text tower), checked against its weights and preprocessing."""
    f = Fields(folder.config_path("image_encoder"), folder.configs["image_encoder"])
    act = f.one_of("hidden_act", ("quick_gelu", "gelu"), "quick_gelu")
    V = f.int("hidden_size", 1, MAX_WIDTH, 768)
    D = f.int("projection_dim", 1, MAX_WIDTH, 512)
    f.one_of("num_channels", (3,), 3)
    size = f.int("image_size", 1, 1024, 224)
    patch = f.int("patch_size", 1, size, 32)
    f.check(size % patch == 0, "patch_size", f"it must divide image_size {size}")
    layers, heads, mlp = _tower(f, r, "vision_model", V, "vision")
    r.expect("vision_model.embeddings.patch_embedding.weight", (V, 3, patch, patch), f.path, "hidden_size and patch_size")
    r.expect("vision_model.embeddings.position_embedding.weight", ((size // patch) ** 2 + 1, V), f.path, "image_size and patch_size")
    r.expect("visual_projection.weight", (D, V), f.path, "projection_dim and hidden_size")
    karlo._check_processor(Fields(folder.config_path("feature_extractor"), folder.configs["feature_extractor"]), size)
    return ClipConfig(embed_dim=D, image_size=size, patch_size=patch, vision_width=V, vision_layers=layers, vision_head_width=V // heads,
                      vision_mlp_width=mlp, activation=act, vocab="bpe", vocab_size=BPE_VOCAB, normalize=False, preprocess="openai",
                      text=False)


def text_config(folder: Folder, r: Tensors) -> ClipConfig:
    """The decoder's text encoder: a CLIP text tower without projection (its token states are what the UNet reads)."""
    f = Fields(folder.config_path("text_encoder"), folder.configs["text_encoder"])
    act = f.one_of("hidden_act", ("quick_gelu", "gelu"), "quick_gelu")
    W = f.int("hidden_size", 1, MAX_WIDTH, 512)
    L = f.int("max_position_embeddings", 2, 1024, 77)
    f.one_of("vocab_size", (BPE_VOCAB,), BPE_VOCAB)
    layers, heads, mlp = _tower(f, r, "text_model", W, "text")
    r.expect("text_model.embeddings.token_embedding.weight", (BPE_VOCAB, W), f.path, "vocab_size and hidden_size")
    r.expect("text_model.embeddings.position_embedding.weight", (L, W), f.path, "max_position_embeddings and hidden_size")
    return ClipConfig(embed_dim=W, context_length=L, vocab_size=BPE_VOCAB, text_width=W, text_heads=heads, text_layers=layers,
                      text_mlp_width=mlp, activation=act, vocab="bpe", normalize=False, vision=False, text_projection=False)


def unet_config(folder: Folder, r: Tensors, D: int, text_width: int, latent: int) -> UNetConfig:
    f = Fields(folder.config_path("unet"), folder.configs["unet"])
    for field, allowed, default in (
            ("flip_sin_to_cos", (True,), True), ("freq_shift", (0,), 0), ("norm_num_groups", (32,), 32), ("norm_eps", (1e-5,), 1e-5),
            ("act_fn", ("silu",), "silu"), ("center_input_sample", (False,), False), ("time_embedding_type", ("positional",), "positional"),
            ("downsample_padding", (1,), 1), ("mid_block_scale_factor", (1,), 1), ("resnet_time_scale_shift", ("default",), "default"),
            ("mid_block_type", ("UNetMidBlock2DCrossAttn",), "UNetMidBlock2DCrossAttn"), ("use_linear_projection", (True,), False),
            ("class_embed_type", ("projection",), None), ("transformer_layers_per_block", (1,), 1), ("conv_in_kernel", (3,), 3),
            ("conv_out_kernel", (3,), 3), ("class_embeddings_concat", (False,), False), ("resnet_out_scale_factor", (1,), 1),
            ("only_cross_attention", (False,), False), ("dual_cross_attention", (False,), False), ("dropout", (0, 0.0), 0.0)):
        f.one_of(field, allowed, default)
    for field in ("addition_embed_type", "encoder_hid_dim", "encoder_hid_dim_type", "time_cond_proj_dim", "num_class_embeds",
                  "timestep_post_act", "time_embedding_act_fn", "time_embedding_dim", "cross_attention_norm", "num_attention_heads",
                  "mid_block_only_cross_attention", "attention_type"):
        f.one_of(field, (None, "default") if field == "attention_type" else (None,), None)
    f.one_of("upcast_attention", (True, False), False)  # a float16 precaution of diffusers'; our attention accumulates in float32
    f.one_of("in_channels", (latent,), 4)
    f.one_of("out_channels", (latent,), 4)
    f.one_of("projection_class_embeddings_input_dim", (2 * D,), None)
    f.one_of("cross_attention_dim", (text_width,), 1280)
    chs = f.ints("block_out_channels", 32, MAX_CHANNELS, (1, MAX_LEVELS), (320, 640, 1280, 1280))
    f.check(all(c % chs[0] == 0 and c % 32 == 0 for c in chs), "block_out_channels", "each must be a multiple of the first and of 32")
    L = f.int("layers_per_block", 1, MAX_BLOCKS, 2)
    n = len(chs)
    downs = f.strs("down_block_types", (n, n), ())
    ups = f.strs("up_block_types", (n, n), ())
    attn = []
    for i, (d, u) in enumerate(zip(downs, reversed(ups))):
        f.check(d in ("CrossAttnDownBlock2D", "DownBlock2D"), "down_block_types", "unclip's UNet expresses CrossAttnDownBlock2D, DownBlock2D")
        want = "CrossAttnUpBlock2D" if d == "CrossAttnDownBlock2D" else "UpBlock2D"
        f.check(u == want, "up_block_types", f"each must mirror its down block ({d}: {want})")
        if d == "CrossAttnDownBlock2D":
            attn.append(i)
    f.check(bool(attn), "down_block_types", "at least one level must have cross-attention")
    heads = f.get("attention_head_dim", 8)
    heads = (heads,) * n if type(heads) is int else f.ints("attention_head_dim", 1, MAX_HEADS, (n, n))
    f.check(all(1 <= h <= MAX_HEADS and c % h == 0 for h, c in zip(heads, chs)), "attention_head_dim",
            "heads per level (diffusers' name), each dividing its level's channels")
    size = f.int("sample_size", 8, 512, 64)
    r.expect_count("down_blocks", n, f.path, "block_out_channels")
    r.expect_count("up_blocks", n, f.path, "block_out_channels")
    r.expect("conv_in.weight", (chs[0], latent, 3, 3), f.path, "block_out_channels and in_channels")
    r.expect("class_embedding.linear_1.weight", (4 * chs[0], 2 * D), f.path, "projection_class_embeddings_input_dim")
    for level, ch in enumerate(chs):
        r.expect_count(f"down_blocks.{level}.resnets", L, f.path, "layers_per_block")
        r.expect_count(f"up_blocks.{n - 1 - level}.resnets", L + 1, f.path, "layers_per_block")
        r.expect(f"down_blocks.{level}.resnets.0.conv2.weight", (ch, ch, 3, 3), f.path, "block_out_channels")
        r.expect_count(f"down_blocks.{level}.attentions", L if level in attn else 0, f.path, "down_block_types")
    return UNetConfig(
        image_size=size, in_channels=latent, out_channels=latent, model_channels=chs[0], channel_mult=tuple(c // chs[0] for c in chs),
        num_res_blocks=L, attention_ds=tuple(2**i for i in attn), heads=heads, dropout=0.0, clip_dim=0, text_width=text_width,
        context_dim=text_width, time_conditioning="additive", attention_kind="transformer", class_dim=2 * D, noise_augment=True)


def vae_config(folder: Folder, r: Tensors) -> VAEConfig:
    f = Fields(folder.config_path("vae"), folder.configs["vae"])
    for field, allowed, default in (("in_channels", (3,), 3), ("out_channels", (3,), 3), ("act_fn", ("silu",), "silu"),
                                    ("norm_num_groups", (32,), 32), ("mid_block_add_attention", (True,), True),
                                    ("use_quant_conv", (True,), True), ("use_post_quant_conv", (True,), True),
                                    ("shift_factor", (None,), None), ("latents_mean", (None,), None), ("latents_std", (None,), None)):
        f.one_of(field, allowed, default)
    f.one_of("force_upcast", (True, False), True)
    chs = f.ints("block_out_channels", 32, MAX_CHANNELS, (1, MAX_LEVELS), (64,))
    f.check(all(c % 32 == 0 for c in chs), "block_out_channels", "each must be a multiple of 32 (the GroupNorm groups)")
    n = len(chs)
    f.check(f.strs("down_block_types", (n, n), ("DownEncoderBlock2D",)) == ("DownEncoderBlock2D",) * n, "down_block_types",
            "unclip's autoencoder expresses DownEncoderBlock2D")
    f.check(f.strs("up_block_types", (n, n), ("UpDecoderBlock2D",)) == ("UpDecoderBlock2D",) * n, "up_block_types",
            "unclip's autoencoder expresses UpDecoderBlock2D")
    latent = f.int("latent_channels", 1, 64, 4)
    L = f.int("layers_per_block", 1, MAX_BLOCKS, 1)
    scale = f.number("scaling_factor", 1e-4, 1e4, 0.18215)
    size = f.int("sample_size", 8, 4096, 32)
    r.expect_count("encoder.down_blocks", n, f.path, "block_out_channels")
    r.expect("encoder.conv_in.weight", (chs[0], 3, 3, 3), f.path, "block_out_channels")
    r.expect("decoder.conv_in.weight", (chs[-1], latent, 3, 3), f.path, "block_out_channels and latent_channels")
    for level, ch in enumerate(chs):
        r.expect_count(f"encoder.down_blocks.{level}.resnets", L, f.path, "layers_per_block")
        r.expect_count(f"decoder.up_blocks.{level}.resnets", L + 1, f.path, "layers_per_block")
        r.expect(f"encoder.down_blocks.{level}.resnets.0.conv2.weight", (ch, ch, 3, 3), f.path, "block_out_channels")
    return VAEConfig(image_size=size, latent_channels=latent, block_out_channels=chs, layers_per_block=L, scaling_factor=scale)


def diffusion_config(folder: Folder) -> tuple[DiffusionConfig, str]:
    """The UNet's DDIM scheduler -> (its diffusion config, the recipe's timestep spacing)."""
    f = Fields(folder.config_path("scheduler"), folder.configs["scheduler"])
    f.one_of("num_train_timesteps", (1000,), 1000)
    f.one_of("beta_schedule", ("scaled_linear",), "linear")
    f.one_of("beta_start", (0.00085,), 0.0001)
    f.one_of("beta_end", (0.012,), 0.02)
    f.one_of("trained_betas", (None,), None)
    f.one_of("clip_sample", (False,), True)
    f.one_of("thresholding", (False,), False)
    f.one_of("timestep_spacing", ("leading",), "leading")
    f.one_of("rescale_betas_zero_snr", (False,), False)
    offset = f.one_of("steps_offset", (0, 1), 0)
    to_one = f.one_of("set_alpha_to_one", (True, False), True)
    p = f.one_of("prediction_type", ("v_prediction", "epsilon"), "epsilon")
    g = Fields(folder.config_path("image_noising_scheduler"), folder.configs["image_noising_scheduler"])
    g.one_of("num_train_timesteps", (1000,), 1000)
    g.one_of("beta_schedule", ("squaredcos_cap_v2",), "linear")
    return (DiffusionConfig(timesteps=1000, schedule="scaled_linear", parameterization="v" if p == "v_prediction" else "eps",
                            schedule_dtype="float32", final_alpha="one" if to_one else "first"), "leading1" if offset else "leading")


# -- name maps: ours <- theirs ------------------------------------------------------------------------------------
def _transformer(ours: str, theirs: str, m: dict) -> None:
    for o, t in (("norm", "norm"), ("proj_in", "proj_in"), ("proj_out", "proj_out")):
        _linear(f"{ours}.{o}", f"{theirs}.{t}", m)
    o, t = f"{ours}.block", f"{theirs}.transformer_blocks.0"
    for k in ("norm1", "norm2", "norm3"):
        _linear(f"{o}.{k}", f"{t}.{k}", m)
    for a in ("attn1", "attn2"):
        for x in "qkv":
            _linear(f"{o}.{a}.to_{x}", f"{t}.{a}.to_{x}", m, bias=False)
        _linear(f"{o}.{a}.to_out", f"{t}.{a}.to_out.0", m)
    _linear(f"{o}.ff_in", f"{t}.ff.net.0.proj", m)
    _linear(f"{o}.ff_out", f"{t}.ff.net.2", m)


def unet_map(cfg: UNetConfig) -> dict[str, tuple[str, Rule]]:
    m: dict[str, Rule] = {"emb_mean": ("flat", ["mean"]), "emb_std": ("flat", ["std"])}
    out = {k: ("image_normalizer", r) for k, r in m.items()}
    m = {}
    for o, t in (("input_conv", "conv_in"), ("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
                 ("class_embed.0", "class_embedding.linear_1"), ("class_embed.2", "class_embedding.linear_2"),
                 ("out.0", "conv_norm_out"), ("out.2", "conv_out")):
        _linear(o, t, m)
    n, L = len(cfg.channel_mult), cfg.num_res_blocks
    d = 0
    for level in range(n):
        attn = 2**level in cfg.attention_ds
        for j in range(L):
            _res(f"down.{d}.0", f"down_blocks.{level}.resnets.{j}", m)
            if attn:
                _transformer(f"down.{d}.1", f"down_blocks.{level}.attentions.{j}", m)
            d += 1
        if level < n - 1:
            _linear(f"down.{d}.0.op", f"down_blocks.{level}.downsamplers.0.conv", m)
            d += 1
    _res("middle.0", "mid_block.resnets.0", m)
    _transformer("middle.1", "mid_block.attentions.0", m)
    _res("middle.2", "mid_block.resnets.1", m)
    u = 0
    for ui, level in enumerate(reversed(range(n))):
        attn = 2**level in cfg.attention_ds
        for j in range(L + 1):
            _res(f"up.{u}.0", f"up_blocks.{ui}.resnets.{j}", m)
            if attn:
                _transformer(f"up.{u}.1", f"up_blocks.{ui}.attentions.{j}", m)
            if level > 0 and j == L:
                _linear(f"up.{u}.{2 if attn else 1}.conv", f"up_blocks.{ui}.upsamplers.0.conv", m)
            u += 1
    out.update({k: ("unet", r) for k, r in m.items()})
    return out


def _vae_res(ours: str, theirs: str, m: dict) -> None:
    for o, t in (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"), ("skip", "conv_shortcut")):
        _linear(f"{ours}.{o}", f"{theirs}.{t}", m)


def _vae_middle(ours: str, theirs: str, m: dict) -> None:
    _vae_res(f"{ours}.0", f"{theirs}.resnets.0", m)
    a, t = f"{ours}.1", f"{theirs}.attentions.0"
    _linear(f"{a}.norm", f"{t}.group_norm", m)
    for x in "qkv":
        _linear(f"{a}.to_{x}", f"{t}.to_{x}", m)
    _linear(f"{a}.to_out", f"{t}.to_out.0", m)
    _vae_res(f"{ours}.2", f"{theirs}.resnets.1", m)


def vae_map(cfg: VAEConfig) -> dict[str, tuple[str, Rule]]:
    m: dict[str, Rule] = {}
    for o in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out", "quant_conv", "post_quant_conv"):
        _linear(o, o, m)
    _linear("encoder.norm_out", "encoder.conv_norm_out", m)
    _linear("decoder.norm_out", "decoder.conv_norm_out", m)
    _vae_middle("encoder.middle", "encoder.mid_block", m)
    _vae_middle("decoder.middle", "decoder.mid_block", m)
    n, L = len(cfg.block_out_channels), cfg.layers_per_block
    for i in range(n):
        for j in range(L):
            _vae_res(f"encoder.down.{i}.{j}", f"encoder.down_blocks.{i}.resnets.{j}", m)
        if i < n - 1:
            _linear(f"encoder.down.{i}.{L}.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv", m)
        for j in range(L + 1):
            _vae_res(f"decoder.up.{i}.{j}", f"decoder.up_blocks.{i}.resnets.{j}", m)
        if i < n - 1:
            _linear(f"decoder.up.{i}.{L + 1}.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv", m)
    return {k: ("vae", r) for k, r in m.items()}


def clip_map(cfg: ClipConfig, text_part: str = "text_encoder") -> dict[str, tuple[str, Rule]]:
    """Karlo's CLIP table, its text tower read from `text_part`, without the tensors a config leaves out."""
    out = karlo.clip_map(replace(cfg, vision=cfg.vision))
    if not cfg.text_projection:
        out.pop("model.text_projection")
    return {k: (text_part if part == "text_encoder" else part, r) for k, (part, r) in out.items()}


# -- the conversion ------------------------------------------------------------------------------------------------
def prepare(src: str | Path, prior: str | Path | None = None, dtype: torch.dtype = torch.float16) -> Plan:
    """Read and check the folders (every config value typed and bounded, widths and layer counts against the
    weights' headers, the prior's embedding width against the image encoder's) and plan every tensor."""
    folder = read_folder(src, PARTS, PIPELINE, FOLDER_HINT)
    pf = read_folder(prior, {k: v for k, v in karlo.PARTS.items() if k in ("prior", "text_encoder", "tokenizer", "prior_scheduler")},
                     karlo.PIPELINE, FOLDER_HINT) if prior is not None else None
    karlo.check_tokenizer(folder.root / "tokenizer")
    readers = {p: folder.tensors(p) for p in ("image_encoder", "image_normalizer", "text_encoder", "unet", "vae")}
    readers["text_encoder"].under("text_model.")
    clip_cfg = vision_config(folder, readers["image_encoder"])
    D = clip_cfg.embed_dim
    norm = Fields(folder.config_path("image_normalizer"), folder.configs["image_normalizer"])
    norm.one_of("embedding_dim", (D,), 768)
    readers["image_normalizer"].expect("mean", (1, D), norm.path, "embedding_dim")
    readers["image_normalizer"].expect("std", (1, D), norm.path, "embedding_dim")
    prior_cfg = prior_readers = None
    if pf is not None:  # before anything else is read: the prior must make the embeddings this decoder reads
        karlo.check_tokenizer(pf.root / "tokenizer")
        prior_readers = {"prior": pf.tensors("prior"), "prior_text": pf.tensors("text_encoder")}
        prior_cfg = karlo.prior_config(pf, {"prior": prior_readers["prior"]})
        if prior_cfg.clip_dim != D:
            fail(f"{pf.config_path('prior')}: embedding_dim {prior_cfg.clip_dim} does not fit {folder.config_path('image_encoder')} "
                 f"(projection_dim {D})", hint="Karlo's prior makes CLIP ViT-L/14 embeddings: pair it with stable-diffusion-2-1-unclip-small")
        karlo_text = karlo.clip_config(pf, None, {"text_encoder": prior_readers["prior_text"]})
        if karlo_text.embed_dim != D:
            fail(f"{pf.config_path('text_encoder')}: projection_dim {karlo_text.embed_dim} does not fit the image encoder's {D}")
        clip_cfg = replace(clip_cfg, text=True, context_length=karlo_text.context_length, text_width=karlo_text.text_width,
                           text_heads=karlo_text.text_heads, text_layers=karlo_text.text_layers, text_mlp_width=karlo_text.text_mlp_width)
        if karlo_text.activation != clip_cfg.activation:
            fail(f"{pf.config_path('text_encoder')}: hidden_act {karlo_text.activation} differs from the image encoder's {clip_cfg.activation}")
    text_cfg = text_config(folder, readers["text_encoder"])
    vae_cfg = vae_config(folder, readers["vae"])
    unet_cfg = unet_config(folder, readers["unet"], D, text_cfg.text_width, vae_cfg.latent_channels)
    diff, spacing = diffusion_config(folder)
    recipe = replace(STABLE_UNCLIP, timestep_spacing=spacing)

    source = {"format": "diffusers", "pipeline": PIPELINE, "folder": folder.root.name, "licence": LICENCE}
    if pf is not None:
        source["prior_folder"] = pf.root.name
    uid = lambda kind: f"stable-unclip-{kind}-{checkpoint.UID_PLACEHOLDER}"  # noqa: E731
    all_readers = {**readers, **(prior_readers or {})}
    files = {"clip.safetensors": ("clip", clip_cfg, None, {"uid": uid("clip"), "source": source},
                                  plan("clip", clip_cfg, clip_map(clip_cfg, "prior_text"), all_readers, dtype, "clip"))}
    if pf is not None:
        prior_diff, prior_clamp = karlo.diffusion_config(pf, "prior_scheduler", ("fixed_small_log",))
        recipe = replace(recipe, prior_clamp=prior_clamp)
        files["prior.safetensors"] = ("prior", prior_cfg, prior_diff, {"uid": uid("prior"), "source": source},
                                      plan("prior", prior_cfg, karlo.prior_map(prior_cfg), all_readers, dtype, "prior"))
    files["decoder.safetensors"] = ("decoder", unet_cfg, diff, {"uid": uid("decoder"), "source": source, "sampling": recipe.as_dict()},
                                    plan("decoder", unet_cfg, unet_map(unet_cfg), readers, dtype, "decoder"))
    files["vae.safetensors"] = ("vae", vae_cfg, None, {"uid": uid("vae"), "source": source},
                                plan("vae", vae_cfg, vae_map(vae_cfg), readers, dtype, "vae"))
    # last: `write` ties every non-CLIP file to the CLIP written before it (clip_uid), and this is a CLIP checkpoint too
    files["text.safetensors"] = ("clip", text_cfg, None, {"uid": uid("text"), "source": source},
                                 plan("clip", text_cfg, clip_map(text_cfg), readers, dtype, "text"))
    sources = (folder.root,) + ((pf.root,) if pf is not None else ())
    return Plan(files, model_card(folder, pf, files, dtype, vae_cfg, unet_cfg), sources)


def model_card(folder: Folder, pf: Folder | None, files: dict, dtype: torch.dtype, vae: VAEConfig, unet: UNetConfig) -> str:
    params = {name: sum(math.prod(item[1]) for item in f[4]) for name, f in files.items()}
    rows = "\n".join(f"| `{name}` | {n / 1e6:,.1f} M |" for name, n in params.items())
    prior = (f"- Prior and its CLIP text encoder from `{pf.root.name}` (Karlo v1.0.alpha, creativeml-openrail-m), as diffusers'\n"
             "  StableUnCLIPPipeline pairs them: `generate` and `nudge` work.\n" if pf else
             "- No prior (converted without `--prior`): `vary`, `blend` and `mix` of images work; `generate`, `edit`, `nudge` and\n"
             "  texts in `mix` need one (and its CLIP text encoder).\n")
    return f"""# Stable unCLIP 2.1, converted

Converted by `unclip convert stable-unclip` from the diffusers {PIPELINE} folder `{folder.root.name}` into unclip's
own networks, configured to compute what Stable unCLIP's do; weights in {str(dtype).replace("torch.", "")}
(tensors under 1,024 values in float32). Images of {unet.image_size * vae.factor} px (a {unet.image_size} x {unet.image_size}
latent of {vae.latent_channels} channels, decoded by the autoencoder).
{prior}
## Where it came from

Stable unCLIP 2.1 is Stability AI's fine-tune of Stable Diffusion 2.1 that takes a noised CLIP image embedding
(Rombach et al. 2022; Ramesh et al. 2022). Nothing here was trained by unclip.

## Licence

Stable Diffusion 2.1 unCLIP's weights: **{LICENCE}** (CreativeML Open RAIL++-M). Its use-based restrictions carry
over to this converted copy and to anything made with it; read it before use and pass it on with the weights.

## Sampling

The decoder's metadata carries the recipe of diffusers' pipelines: DDIM (eta 0) from pure latent noise, guidance 10
with the empty prompt and a zero image embedding as the unconditional branch, noise level 0 (`vary --noise-level`
raises it), Karlo's prior under a DDPM scheduler with guidance 4. Edits repaint in latent space and paste the
unmasked pixels back.

## Files

| file | parameters |
| --- | --- |
{rows}
"""


def convert(src: str | Path, dst: str | Path, prior: str | Path | None = None, dtype: torch.dtype = torch.float16,
            force: bool = False, progress: Callable[[str], None] | None = None) -> Path:
    """Convert a diffusers Stable unCLIP img2img folder (and a Karlo folder for the prior) into an unclip model set."""
    check_destination(dst, (src, prior), force)
    return write(prepare(src, prior, dtype), dst, force=force, progress=progress)
