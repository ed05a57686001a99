"""Karlo (kakaobrain's Karlo-v1.0.alpha, in Hugging Face diffusers' layout) -> an unclip model set.

    unclip convert karlo karlo-v1-alpha --variation karlo-v1-alpha-image-variations --to weights/karlo

Reads a diffusers UnCLIPPipeline folder (`model_index.json`; `prior/`, `decoder/`, `text_proj/`,
`super_res_first/`, `super_res_last/`, `text_encoder/`, `tokenizer/` and the three `*_scheduler/`
configs) and, optionally, the image-variation pipeline's folder for `image_encoder/` and
`feature_extractor/`. Writes clip, prior, decoder, upsampler and upsampler-last .safetensors, each our own
network's state dict with its config in the metadata, a MODEL_CARD.md, and Karlo's sampling recipe in the
decoder's metadata (`diffusion.recipe.KARLO`).

Only names and shapes are mapped: q/k/v projections concatenated into our fused ones, projections
transposed where we multiply from the other side, (1, n, d) parameters flattened, 1x1 convolution weights
given their kernel dimension. The configs that make our networks compute what Karlo's do are derived from
the component configs, and anything they cannot express is refused with the field named.

Weights are read tensor by tensor (`.safetensors` directly; `.bin` only through
`torch.load(weights_only=True)`, which refuses code) and written tensor by tensor, so converting needs
about one tensor's memory, not the model's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch

from unclip_cli import checkpoint
from unclip_cli.convert.common import SMALL, Fields, Folder, Plan, Rule, Tensors, check_destination, fail, plan, read_folder, read_json, write
from unclip_cli.diffusion.gaussian import DiffusionConfig
from unclip_cli.diffusion.recipe import KARLO
from unclip_cli.models.clip import BPE_VOCAB, OPENAI_MEAN, OPENAI_STD, ClipConfig
from unclip_cli.models.prior import PriorConfig
from unclip_cli.models.unet import UNetConfig

PIPELINE = "UnCLIPPipeline"
VARIATION_PIPELINE = "UnCLIPImageVariationPipeline"
# What each folder holds, as errors name it.
PARTS = {
    "prior": "the diffusion prior (PriorTransformer)",
    "decoder": "the decoder UNet (UNet2DConditionModel)",
    "text_proj": "the decoder's conditioning projection (UnCLIPTextProjModel)",
    "super_res_first": "the super-resolution UNet (UNet2DModel)",
    "super_res_last": "the final-step super-resolution UNet (UNet2DModel)",
    "text_encoder": "the CLIP text encoder (CLIPTextModelWithProjection)",
    "tokenizer": "the CLIP tokenizer",
    "prior_scheduler": "the prior's scheduler config",
    "decoder_scheduler": "the decoder's scheduler config",
    "super_res_scheduler": "the super-resolution scheduler config",
}
VARIATION_PARTS = {
    "image_encoder": "the CLIP image encoder (CLIPVisionModelWithProjection)",
    "feature_extractor": "the image preprocessing config (CLIPImageProcessor)",
}
FOLDER_HINT = ("unclip convert karlo reads kakaobrain/karlo-v1-alpha (and, with --variation, the image-variation pipeline "
               "built from it)")
LICENCE = "creativeml-openrail-m"
# open_clip names CLIP's start and end tokens differently from OpenAI's (and Hugging Face's) vocabulary files.
HF_SPECIAL = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
# Bounds on config values: far above Karlo's own (prior width 2,048 in 20 layers, UNet channels up to 1,280 with
# 3 res blocks a level), far below what could exhaust memory before the shapes are compared with the weights.
MAX_WIDTH, MAX_LAYERS, MAX_HEADS, MAX_CHANNELS, MAX_BLOCKS, MAX_LEVELS, MAX_TOKENS = 16384, 256, 256, 8192, 32, 8, 1024


# -- configs: each field typed and bounded, layer counts and widths compared with the weights' headers ------------------
def _tower(f: Fields, r: Tensors, prefix: str, W: int, what: str) -> tuple[int, int, int]:
    """(layers, heads, MLP width) of a transformers CLIP tower, checked against its weights."""
    layers = f.int("num_hidden_layers", 1, MAX_LAYERS, 12)
    heads = f.int("num_attention_heads", 1, MAX_HEADS, 8 if what == "text" else 12)
    mlp = f.int("intermediate_size", 1, 4 * MAX_WIDTH, 2048 if what == "text" else 3072)
    f.check(W % heads == 0, "num_attention_heads", f"it must divide hidden_size {W}")
    f.one_of("layer_norm_eps", (1e-5,), 1e-5)
    r.expect_count(f"{prefix}.encoder.layers", layers, f.path, "num_hidden_layers")
    r.expect(f"{prefix}.encoder.layers.0.mlp.fc1.weight", (mlp, W), f.path, "intermediate_size and hidden_size")
    return layers, heads, mlp


def clip_config(folder: Folder, var: Folder | None, readers: dict[str, Tensors]) -> ClipConfig:
    f, r = Fields(folder.config_path("text_encoder"), folder.configs["text_encoder"]), readers["text_encoder"]
    act = f.one_of("hidden_act", ("quick_gelu", "gelu"), "quick_gelu")
    W = f.int("hidden_size", 1, MAX_WIDTH, 512)
    D = f.int("projection_dim", 1, MAX_WIDTH, 512)
    L = f.int("max_position_embeddings", 2, MAX_TOKENS, 77)
    f.one_of("vocab_size", (BPE_VOCAB,), BPE_VOCAB)
    layers, heads, mlp = _tower(f, r, "text_model", W, "text")
    r.expect("text_model.embeddings.token_embedding.weight", (BPE_VOCAB, W), f.path, "vocab_size and hidden_size")
    r.expect("text_model.embeddings.position_embedding.weight", (L, W), f.path, "max_position_embeddings and hidden_size")
    r.expect("text_projection.weight", (D, W), f.path, "projection_dim and hidden_size")
    cfg = ClipConfig(embed_dim=D, context_length=L, vocab_size=BPE_VOCAB, text_width=W, text_heads=heads, text_layers=layers,
                     text_mlp_width=mlp, activation=act, vocab="bpe", normalize=False, preprocess="openai", vision=var is not None)
    if var is None:
        return cfg
    f, r = Fields(var.config_path("image_encoder"), var.configs["image_encoder"]), readers["image_encoder"]
    f.one_of("hidden_act", (act,), "quick_gelu")
    V = f.int("hidden_size", 1, MAX_WIDTH, 768)
    f.one_of("projection_dim", (D,), 512)
    f.one_of("num_channels", (3,), 3)
    size = f.int("image_size", 1, MAX_TOKENS, 224)
    patch = f.int("patch_size", 1, size, 32)
    f.check(size % patch == 0, "patch_size", f"it must divide image_size {size}")
    layers, heads, mlp = _tower(f, r, "vision_model", V, "vision")
    r.expect("vision_model.embeddings.patch_embedding.weight", (V, 3, patch, patch), f.path, "hidden_size and patch_size")
    r.expect("vision_model.embeddings.position_embedding.weight", ((size // patch) ** 2 + 1, V), f.path, "image_size and patch_size")
    r.expect("visual_projection.weight", (D, V), f.path, "projection_dim and hidden_size")
    cfg = replace(cfg, image_size=size, patch_size=patch, vision_width=V, vision_layers=layers, vision_head_width=V // heads,
                  vision_mlp_width=mlp)
    _check_processor(Fields(var.config_path("feature_extractor"), var.configs["feature_extractor"]), size)
    return cfg


def _side(value, key: str):
    return value.get(key) if isinstance(value, dict) else value


def _check_processor(f: Fields, size: int) -> None:
    """Our "openai" preprocessing: shortest side to the encoder's size, a centre crop of it, OpenAI's mean and std."""
    for field in ("do_resize", "do_center_crop", "do_normalize", "do_rescale"):
        f.one_of(field, (True,), True)
    for field, key in (("size", "shortest_edge"), ("crop_size", "height"), ("crop_size", "width")):
        got = _side(f.get(field, size), key)
        f.check(got == size and type(got) is int or key == "width" and got is None, field,
                f"the image encoder reads {size} px; unclip resizes the shortest side to that size and crops the centre")
    for field, want in (("image_mean", OPENAI_MEAN), ("image_std", OPENAI_STD)):
        got = f.get(field, list(want))
        f.check(isinstance(got, list) and len(got) == 3 and all(type(a) in (int, float) and abs(a - b) <= 1e-6 for a, b in zip(got, want)),
                field, f"unclip applies OpenAI's {list(want)}")


def prior_config(folder: Folder, readers: dict[str, Tensors]) -> PriorConfig:
    f, r = Fields(folder.config_path("prior"), folder.configs["prior"]), readers["prior"]
    heads = f.int("num_attention_heads", 1, MAX_HEADS, 32)
    head_dim = f.int("attention_head_dim", 1, MAX_WIDTH, 64)
    D = f.int("embedding_dim", 1, MAX_WIDTH, 768)
    L = f.int("num_embeddings", 1, MAX_TOKENS, 77)
    layers = f.int("num_layers", 1, MAX_LAYERS, 20)
    W = heads * head_dim
    f.check(W <= MAX_WIDTH, "attention_head_dim", f"num_attention_heads x attention_head_dim must be at most {MAX_WIDTH:,}")
    f.one_of("additional_embeddings", (4,), 4)
    f.number("dropout", 0.0, 1.0, 0.0)  # sampling runs without dropout
    f.one_of("time_embed_act_fn", ("silu",), "silu")
    f.one_of("norm_in_type", (None,), None)
    f.one_of("embedding_proj_norm_type", (None,), None)
    f.one_of("encoder_hid_proj_type", ("linear",), "linear")
    f.one_of("added_emb_type", ("prd",), "prd")
    f.one_of("time_embed_dim", (None, W), None)
    f.one_of("embedding_proj_dim", (None, D), None)
    f.one_of("clip_embed_dim", (None, D), None)
    r.expect_count("transformer_blocks", layers, f.path, "num_layers")
    r.expect("proj_in.weight", (W, D), f.path, "num_attention_heads, attention_head_dim and embedding_dim")
    r.expect("positional_embedding", (1, L + 4, W), f.path, "num_embeddings and additional_embeddings")
    return PriorConfig(clip_dim=D, text_width=D, context_length=L, width=W, layers=layers, heads=heads, mlp_ratio=4, dropout=0.0,
                       raw_embeddings=True, learned_null_text=False)


def _unet(f: Fields, r: Tensors, down_attn: str | None, in_ch: int, out_ch: int) -> tuple[tuple[int, ...], int, tuple[int, ...]]:
    """(block_out_channels, layers_per_block, downsampling factors with attention) of a diffusers UNet config, with the
    fields unclip's UNet takes as given and the block counts and widths compared with the weights."""
    for field, allowed, default in (("flip_sin_to_cos", (True,), True), ("freq_shift", (0,), 0), ("norm_num_groups", (32,), 32),
                                    ("norm_eps", (1e-5,), 1e-5), ("act_fn", ("silu",), "silu"), ("center_input_sample", (False,), False),
                                    ("time_embedding_type", ("positional",), "positional"), ("downsample_padding", (1,), 1),
                                    ("mid_block_scale_factor", (1,), 1), ("resnet_time_scale_shift", ("scale_shift", "default"), "default")):
        f.one_of(field, allowed, default)
    chs = f.ints("block_out_channels", 32, MAX_CHANNELS, (1, MAX_LEVELS), (224, 448, 672, 896) if down_attn is None else (320, 640, 1280, 1280))
    f.check(all(c % chs[0] == 0 and c % 32 == 0 for c in chs), "block_out_channels",
            "each must be a multiple of the first and of 32 (the GroupNorm groups)")
    L = f.int("layers_per_block", 1, MAX_BLOCKS, 2)
    downs = f.strs("down_block_types", (len(chs), len(chs)), ())
    ups = f.strs("up_block_types", (len(chs), len(chs)), ())
    attn = []
    for i, (d, u) in enumerate(zip(downs, reversed(ups))):
        down_ok = ("ResnetDownsampleBlock2D",) + ((down_attn,) if down_attn else ())
        f.check(d in down_ok, "down_block_types", f"unclip's UNet expresses {', '.join(down_ok)}")
        want_up = "SimpleCrossAttnUpBlock2D" if d == down_attn else "ResnetUpsampleBlock2D"
        f.check(u == want_up, "up_block_types", f"each must mirror its down block ({d}: {want_up})")
        if d == down_attn:
            attn.append(i)
    n = len(chs)
    r.expect_count("down_blocks", n, f.path, "block_out_channels")
    r.expect_count("up_blocks", n, f.path, "block_out_channels")
    r.expect("conv_in.weight", (chs[0], in_ch, 3, 3), f.path, "block_out_channels and in_channels")
    r.expect("conv_out.weight", (out_ch, chs[0], 3, 3), f.path, "block_out_channels and out_channels")
    for level, ch in enumerate(chs):
        r.expect_count(f"down_blocks.{level}.resnets", L, f.path, "layers_per_block")
        r.expect_count(f"up_blocks.{n - 1 - level}.resnets", L + 1, f.path, "layers_per_block")
        r.expect(f"down_blocks.{level}.resnets.0.conv2.weight", (ch, ch, 3, 3), f.path, "block_out_channels")
        r.expect_count(f"down_blocks.{level}.attentions", L if level in attn else 0, f.path, "down_block_types")
    return chs, L, tuple(2**i for i in attn)


def decoder_config(folder: Folder, readers: dict[str, Tensors]) -> UNetConfig:
    f, r = Fields(folder.config_path("decoder"), folder.configs["decoder"]), readers["decoder"]
    tp, rt = Fields(folder.config_path("text_proj"), folder.configs["text_proj"]), readers["text_proj"]
    f.one_of("class_embed_type", ("identity",), None)
    f.one_of("mid_block_type", ("UNetMidBlock2DSimpleCrossAttn",), "UNetMidBlock2DCrossAttn")
    f.one_of("in_channels", (3,), 4)
    out = f.one_of("out_channels", (3, 6), 4)
    for field in ("time_embedding_dim", "encoder_hid_dim", "addition_embed_type", "time_cond_proj_dim",
                  "projection_class_embeddings_input_dim", "cross_attention_norm", "num_class_embeds"):
        f.one_of(field, (None,), None)
    for field in ("only_cross_attention", "dual_cross_attention", "resnet_skip_time_act", "mid_block_only_cross_attention",
                  "upcast_attention", "use_linear_projection"):
        f.one_of(field, (False, None), False)
    f.one_of("resnet_out_scale_factor", (1,), 1)
    size = f.int("sample_size", 8, checkpoint_max_size(), None)
    head = f.int("attention_head_dim", 1, MAX_CHANNELS, 8)
    ctx = f.int("cross_attention_dim", 1, MAX_WIDTH, 1280)
    chs, L, attn = _unet(f, r, "SimpleCrossAttnDownBlock2D", 3, out)
    for level, ch in enumerate(chs):
        f.check(2**level not in attn or ch % head == 0, "attention_head_dim", f"it must divide the channels of every attention level ({ch})")
    D = tp.int("clip_embeddings_dim", 1, MAX_WIDTH, 768)
    tokens = tp.int("clip_extra_context_tokens", 1, 64, 4)
    tp.one_of("time_embed_dim", (4 * chs[0],), None)
    tp.one_of("cross_attention_dim", (ctx,), None)
    rt.expect("clip_extra_context_tokens_proj.weight", (tokens * ctx, D), tp.path, "clip_extra_context_tokens, cross_attention_dim and clip_embeddings_dim")
    rt.expect("clip_image_embeddings_project_to_time_embeddings.weight", (4 * chs[0], D), tp.path, "time_embed_dim and clip_embeddings_dim")
    return UNetConfig(
        image_size=size, in_channels=3, out_channels=out, extra_channels=0, model_channels=chs[0],
        channel_mult=tuple(c // chs[0] for c in chs), num_res_blocks=L, attention_ds=attn, head_channels=head, dropout=0.0,
        clip_dim=D, num_clip_tokens=tokens, text_width=D, context_dim=ctx, patch_size=1, resblock_updown=True,
        time_conditioning="scale_shift" if f.get("resnet_time_scale_shift", "default") == "scale_shift" else "additive",
        raw_embeddings=True, text_embed_to_time=True, clip_token_layout="interleaved",
    )


def checkpoint_max_size() -> int:
    from unclip_cli.modelset import MAX_IMAGE_SIZE

    return MAX_IMAGE_SIZE


def super_res_config(folder: Folder, readers: dict[str, Tensors], part: str, size: int | None = None) -> UNetConfig:
    """A super-resolution UNet's config; `size` is super_res_first's sample_size, which super_res_last's null one takes
    (the hub's super_res_last/config.json says null: the original conversion never set it, and diffusers never reads it)."""
    f, r = Fields(folder.config_path(part), folder.configs[part]), readers[part]
    f.one_of("add_attention", (False,), True)
    f.one_of("class_embed_type", (None,), None)
    f.one_of("num_class_embeds", (None,), None)
    f.one_of("mid_block_type", ("UNetMidBlock2D", None), "UNetMidBlock2D")
    f.one_of("time_embedding_dim", (None,), None)
    f.one_of("out_channels", (3,), 3)
    f.one_of("in_channels", (6,), 3)
    if size is None or f.get("sample_size", None) is not None:
        size = f.int("sample_size", 8, checkpoint_max_size(), None)
    chs, L, _ = _unet(f, r, None, 6, 3)
    return UNetConfig(
        image_size=size, in_channels=3, out_channels=3, extra_channels=3, model_channels=chs[0], channel_mult=tuple(c // chs[0] for c in chs),
        num_res_blocks=L, attention_ds=(), dropout=0.0, clip_dim=0, text_width=0, patch_size=1, resblock_updown=True,
        time_conditioning="scale_shift" if f.get("resnet_time_scale_shift", "default") == "scale_shift" else "additive",
    )


def diffusion_config(folder: Folder, part: str, variance: tuple[str, ...]) -> tuple[DiffusionConfig, float]:
    """(the diffusion config, clip_sample_range) of an UnCLIPScheduler config."""
    f = Fields(folder.config_path(part), folder.configs[part])
    f.one_of("num_train_timesteps", (1000,), 1000)
    f.one_of("beta_schedule", ("squaredcos_cap_v2",), "squaredcos_cap_v2")
    v = f.one_of("variance_type", variance, "fixed_small_log")
    p = f.one_of("prediction_type", ("epsilon", "sample"), "epsilon")
    f.one_of("clip_sample", (True,), True)
    clamp = f.number("clip_sample_range", 1e-3, 1e3, 1.0)
    return DiffusionConfig(timesteps=1000, schedule="cosine", parameterization="eps" if p == "epsilon" else "x0",
                           schedule_dtype="float32", variance="learned_range" if v == "learned_range" else "fixed_small"), clamp


def check_tokenizer(folder: Path) -> None:
    """unclip tokenizes with its own copy of CLIP's BPE: the folder's vocabulary and merges
    (vocab.json and merges.txt, or a tokenizers-format tokenizer.json) must be that one."""
    from unclip_cli.models.clip import bpe_tokenizer

    if (folder / "vocab.json").is_file():
        vocab = read_json(folder / "vocab.json", "the tokenizer's vocabulary")
        if not (folder / "merges.txt").is_file():
            fail(f"{folder}: missing merges.txt (the tokenizer's BPE merges)")
        merges = [ln.split() for ln in (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
                  if ln and not ln.startswith("#version")]
    elif (folder / "tokenizer.json").is_file():
        model = read_json(folder / "tokenizer.json", "the tokenizer").get("model")
        if not isinstance(model, dict) or not isinstance(model.get("vocab"), dict) or not isinstance(model.get("merges"), list):
            fail(f"{folder}/tokenizer.json: not a BPE tokenizer")
        vocab = model["vocab"]
        merges = [m.split() if isinstance(m, str) else m for m in model["merges"]]
    else:
        fail(f"{folder}: missing vocab.json and merges.txt (or tokenizer.json): the CLIP tokenizer's vocabulary")
    tok = bpe_tokenizer()
    if vocab != {HF_SPECIAL.get(k, k): v for k, v in tok.encoder.items()}:
        fail(f"{folder}: a vocabulary of {len(vocab):,} tokens that is not CLIP's BPE vocabulary",
              hint="unclip reads CLIP's own 49,408-token BPE vocabulary")
    ranks = tok.bpe_ranks
    if len(merges) != len(ranks) or any(ranks.get(tuple(m)) != i for i, m in enumerate(merges)):
        fail(f"{folder}: not CLIP's BPE merges", hint="unclip reads CLIP's own BPE merges")


# -- name maps: ours <- theirs ----------------------------------------------------------------------------


def _linear(ours: str, theirs: str, m: dict, bias: bool = True) -> None:
    m[f"{ours}.weight"] = ("copy", [f"{theirs}.weight"])
    if bias:
        m[f"{ours}.bias"] = ("copy", [f"{theirs}.bias"])


def _clip_tower(ours: str, theirs: str, layers: int, m: dict) -> None:
    for i in range(layers):
        o, t = f"{ours}.resblocks.{i}", f"{theirs}.layers.{i}"
        a = f"{t}.self_attn"
        m[f"{o}.attn.in_proj_weight"] = ("cat", [f"{a}.q_proj.weight", f"{a}.k_proj.weight", f"{a}.v_proj.weight"])
        m[f"{o}.attn.in_proj_bias"] = ("cat", [f"{a}.q_proj.bias", f"{a}.k_proj.bias", f"{a}.v_proj.bias"])
        _linear(f"{o}.attn.out_proj", f"{a}.out_proj", m)
        _linear(f"{o}.ln_1", f"{t}.layer_norm1", m)
        _linear(f"{o}.ln_2", f"{t}.layer_norm2", m)
        _linear(f"{o}.mlp.c_fc", f"{t}.mlp.fc1", m)
        _linear(f"{o}.mlp.c_proj", f"{t}.mlp.fc2", m)


def clip_map(cfg: ClipConfig) -> dict[str, tuple[str, Rule]]:
    """Our CLIP's state-dict names -> (source folder, rule)."""
    text: dict[str, Rule] = {
        "model.token_embedding.weight": ("copy", ["text_model.embeddings.token_embedding.weight"]),
        "model.positional_embedding": ("copy", ["text_model.embeddings.position_embedding.weight"]),
        "model.text_projection": ("t", ["text_projection.weight"]),
    }
    _linear("model.ln_final", "text_model.final_layer_norm", text)
    _clip_tower("model.transformer", "text_model.encoder", cfg.text_layers, text)
    out = {k: ("text_encoder", r) for k, r in text.items()}
    out["model.logit_scale"] = ("", ("logit", []))
    if cfg.vision:
        vis: dict[str, Rule] = {
            "model.visual.class_embedding": ("copy", ["vision_model.embeddings.class_embedding"]),
            "model.visual.conv1.weight": ("copy", ["vision_model.embeddings.patch_embedding.weight"]),
            "model.visual.positional_embedding": ("copy", ["vision_model.embeddings.position_embedding.weight"]),
            "model.visual.proj": ("t", ["visual_projection.weight"]),
        }
        _linear("model.visual.ln_pre", "vision_model.pre_layrnorm", vis)
        _linear("model.visual.ln_post", "vision_model.post_layernorm", vis)
        _clip_tower("model.visual.transformer", "vision_model.encoder", cfg.vision_layers, vis)
        out.update({k: ("image_encoder", r) for k, r in vis.items()})
    return out


def prior_map(cfg: PriorConfig) -> dict[str, tuple[str, Rule]]:
    m: dict[str, Rule] = {
        "pos_emb": ("flat", ["positional_embedding"]), "query": ("flat", ["prd_embedding"]),
        "emb_mean": ("flat", ["clip_mean"]), "emb_std": ("flat", ["clip_std"]),
    }
    for ours, theirs in (("text_proj", "encoder_hidden_states_proj"), ("text_emb_proj", "embedding_proj"), ("x_proj", "proj_in"),
                         ("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
                         ("ln_f", "norm_out"), ("out", "proj_to_clip_embeddings")):
        _linear(ours, theirs, m)
    for i in range(cfg.layers):
        o, t = f"blocks.{i}", f"transformer_blocks.{i}"
        m[f"{o}.qkv.weight"] = ("cat", [f"{t}.attn1.to_{x}.weight" for x in "qkv"])
        m[f"{o}.qkv.bias"] = ("cat", [f"{t}.attn1.to_{x}.bias" for x in "qkv"])
        _linear(f"{o}.proj", f"{t}.attn1.to_out.0", m)
        _linear(f"{o}.ln_1", f"{t}.norm1", m)
        _linear(f"{o}.ln_2", f"{t}.norm3", m)
        _linear(f"{o}.mlp.0", f"{t}.ff.net.0.proj", m)
        _linear(f"{o}.mlp.2", f"{t}.ff.net.2", m)
    return {k: ("prior", r) for k, r in m.items()}


def _res(ours: str, theirs: str, m: dict) -> None:
    for o, t in (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"), ("out_norm", "norm2"),
                 ("out_layers.2", "conv2"), ("skip", "conv_shortcut")):
        _linear(f"{ours}.{o}", f"{theirs}.{t}", m)


def _attn(ours: str, theirs: str, m: dict, context: bool) -> None:
    _linear(f"{ours}.norm", f"{theirs}.group_norm", m)
    m[f"{ours}.qkv.weight"] = ("cat1", [f"{theirs}.to_{x}.weight" for x in "qkv"])
    m[f"{ours}.qkv.bias"] = ("cat", [f"{theirs}.to_{x}.bias" for x in "qkv"])
    m[f"{ours}.proj.weight"] = ("cat1", [f"{theirs}.to_out.0.weight"])
    m[f"{ours}.proj.bias"] = ("copy", [f"{theirs}.to_out.0.bias"])
    if context:
        m[f"{ours}.context_kv.weight"] = ("cat", [f"{theirs}.add_k_proj.weight", f"{theirs}.add_v_proj.weight"])
        m[f"{ours}.context_kv.bias"] = ("cat", [f"{theirs}.add_k_proj.bias", f"{theirs}.add_v_proj.bias"])


def unet_map(cfg: UNetConfig, part: str, text_proj: bool) -> dict[str, tuple[str, Rule]]:
    """Our UNet's names <- a diffusers UNet2D(Condition)Model's (and UnCLIPTextProjModel's), block by block:
    both lay out ADM's down path (res blocks, then a downsampling block), middle and mirrored up path."""
    m: dict[str, Rule] = {}
    for o, t in (("input_conv", "conv_in"), ("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
                 ("out.0", "conv_norm_out"), ("out.2", "conv_out")):
        _linear(o, t, m)
    n, L = len(cfg.channel_mult), cfg.num_res_blocks
    context = cfg.has_context
    d = 0
    for level in range(n):
        attn = 2**level in cfg.attention_ds
        for j in range(L):
            _res(f"down.{d}.0", f"down_blocks.{level}.resnets.{j}", m)
            if attn:
                _attn(f"down.{d}.1", f"down_blocks.{level}.attentions.{j}", m, context)
            d += 1
        if level < n - 1:
            _res(f"down.{d}.0", f"down_blocks.{level}.downsamplers.0", m)
            d += 1
    _res("middle.0", "mid_block.resnets.0", m)
    if cfg.attention_ds:
        _attn("middle.1", "mid_block.attentions.0", m, context)
    _res(f"middle.{2 if cfg.attention_ds else 1}", "mid_block.resnets.1", m)
    u = 0
    for ui, level in enumerate(reversed(range(n))):
        attn = 2**level in cfg.attention_ds
        for j in range(L + 1):
            _res(f"up.{u}.0", f"up_blocks.{ui}.resnets.{j}", m)
            if attn:
                _attn(f"up.{u}.1", f"up_blocks.{ui}.attentions.{j}", m, context)
            if level > 0 and j == L:
                _res(f"up.{u}.{2 if attn else 1}", f"up_blocks.{ui}.upsamplers.0", m)
            u += 1
    out = {k: (part, r) for k, r in m.items()}
    if text_proj:
        tp: dict[str, Rule] = {"null_clip": ("copy", ["learned_classifier_free_guidance_embeddings"])}
        for o, t in (("clip_to_emb", "clip_image_embeddings_project_to_time_embeddings"), ("clip_to_tokens", "clip_extra_context_tokens_proj"),
                     ("text_emb_to_emb", "embedding_proj"), ("text_proj.0", "encoder_hidden_states_proj"),
                     ("text_proj.1", "text_encoder_hidden_states_norm")):
            _linear(o, t, tp)
        out.update({k: ("text_proj", r) for k, r in tp.items()})
    return out




# -- the conversion --------------------------------------------------------------------------------------
def prepare(src: str | Path, variation: str | Path | None = None, dtype: torch.dtype = torch.float16) -> Plan:
    """Read and check the folders, derive every config and plan every tensor; nothing is written. Every config value
    is checked for type and range, and layer counts and widths against the weights' headers, before any network is
    built (even on the meta device)."""
    folder = read_folder(src, PARTS, PIPELINE, FOLDER_HINT)
    var = read_folder(variation, VARIATION_PARTS, VARIATION_PIPELINE, FOLDER_HINT) if variation is not None else None
    check_tokenizer(folder.root / "tokenizer")
    readers = {p: folder.tensors(p) for p in ("text_encoder", "prior", "decoder", "text_proj", "super_res_first", "super_res_last")}
    if var is not None:
        readers["image_encoder"] = var.tensors("image_encoder")
    clip_cfg = clip_config(folder, var, readers)
    prior_cfg = prior_config(folder, readers)
    if prior_cfg.clip_dim != clip_cfg.embed_dim or prior_cfg.context_length != clip_cfg.context_length:
        fail(f"{folder.config_path('prior')}: embedding_dim {prior_cfg.clip_dim} and num_embeddings {prior_cfg.context_length} do not fit "
             f"the text encoder (projection_dim {clip_cfg.embed_dim}, {clip_cfg.context_length} tokens)")
    dec_cfg = decoder_config(folder, readers)
    if dec_cfg.clip_dim != clip_cfg.embed_dim:
        fail(f"{folder.config_path('text_proj')}: clip_embeddings_dim {dec_cfg.clip_dim} does not fit the text encoder "
             f"(projection_dim {clip_cfg.embed_dim})")
    first_cfg = super_res_config(folder, readers, "super_res_first")
    last_cfg = super_res_config(folder, readers, "super_res_last", size=first_cfg.image_size)
    if first_cfg != last_cfg:
        differ = [k for k, v in asdict(first_cfg).items() if asdict(last_cfg)[k] != v]
        fail(f"{folder.config_path('super_res_last')}: {', '.join(differ)} differ from super_res_first's (unclip runs them as one stage)")
    scale, rem = divmod(first_cfg.image_size, dec_cfg.image_size)
    if rem or not 2 <= scale <= 8:
        fail(f"{folder.config_path('super_res_first')}: field sample_size is {first_cfg.image_size}; it must be 2-8 times the "
             f"decoder's {dec_cfg.image_size}")
    prior_diff, prior_clamp = diffusion_config(folder, "prior_scheduler", ("fixed_small_log",))
    dec_diff, dec_clamp = diffusion_config(folder, "decoder_scheduler", ("learned_range", "fixed_small_log"))
    sr_diff, sr_clamp = diffusion_config(folder, "super_res_scheduler", ("fixed_small_log",))
    if prior_diff.parameterization != "x0" or dec_diff.parameterization != "eps" or sr_diff.parameterization != "eps":
        fail("the schedulers' prediction_type must be sample (prior) and epsilon (decoder, super-res), as Karlo's")
    if (dec_diff.variance == "learned_range") != (dec_cfg.out_channels == 6):
        fail(f"{folder.config_path('decoder')}: out_channels {dec_cfg.out_channels} with a {dec_diff.variance} decoder scheduler")
    recipe = replace(KARLO, prior_clamp=prior_clamp, decoder_clamp=dec_clamp, upsampler_clamp=sr_clamp)

    source = {"format": "diffusers", "pipeline": PIPELINE, "folder": folder.root.name,
              "diffusers_version": folder.index.get("_diffusers_version") if isinstance(folder.index.get("_diffusers_version"), str) else None,
              "licence": LICENCE}
    if var is not None:
        source["variation_folder"] = var.root.name
    uid = lambda kind: f"karlo-{kind}-{checkpoint.UID_PLACEHOLDER}"  # noqa: E731  filled with the tensors' hash
    files = {
        "clip.safetensors": ("clip", clip_cfg, None, {"uid": uid("clip"), "source": source},
                             plan("clip", clip_cfg, clip_map(clip_cfg), readers, dtype, "clip")),
        "prior.safetensors": ("prior", prior_cfg, prior_diff, {"uid": uid("prior"), "source": source},
                              plan("prior", prior_cfg, prior_map(prior_cfg), readers, dtype, "prior")),
        "decoder.safetensors": ("decoder", dec_cfg, dec_diff, {"uid": uid("decoder"), "source": source, "sampling": recipe.as_dict()},
                                plan("decoder", dec_cfg, unet_map(dec_cfg, "decoder", True), readers, dtype, "decoder")),
    }
    for name, part in (("upsampler.safetensors", "super_res_first"), ("upsampler-last.safetensors", "super_res_last")):
        extra = {"uid": uid("upsampler"), "source": source, "scale": scale, "low_res": dec_cfg.image_size}
        files[name] = ("upsampler", first_cfg, sr_diff, extra, plan("upsampler", first_cfg, unet_map(first_cfg, part, False), readers, dtype, part))
    sources = (folder.root,) + ((var.root,) if var is not None else ())
    return Plan(files, model_card(folder, var, files, dtype), sources)


def model_card(folder: Folder, var: Folder | None, files: dict, dtype: torch.dtype) -> str:
    params = {name: sum(math.prod(item[1]) for item in f[4]) for name, f in files.items()}
    rows = "\n".join(f"| `{name}` | {n / 1e6:,.1f} M |" for name, n in params.items())
    variation = (f"- Image encoder and its preprocessing from `{var.root.name}` (a diffusers {VARIATION_PIPELINE} folder).\n"
                 if var else "- No image encoder (converted without `--variation`): `vary`, `blend` and `nudge` need one.\n")
    return f"""# Karlo v1.0.alpha, converted

Converted by `unclip convert karlo` from the diffusers {PIPELINE} folder `{folder.root.name}`
(diffusers {folder.index.get("_diffusers_version", "unknown version")}) into unclip's own networks, configured to
compute what Karlo's do; weights in {str(dtype).replace("torch.", "")} (tensors under {SMALL:,} values in float32).
{variation}
## Where it came from

Karlo is kakaobrain's text-conditional image generation model based on OpenAI's unCLIP architecture
(the kakaobrain/karlo repository), trained on 115M image-text pairs (COYO-100M high-quality subset,
CC3M, CC12M). Its text and image encoders are OpenAI's CLIP ViT-L/14 (the openai/CLIP repository).
Nothing here was trained by unclip.

## Licence

Karlo's weights: **{LICENCE}** (CreativeML Open RAIL-M). The licence's use-based restrictions carry over to
this converted copy and to anything made with it; read it before use and pass it on with the weights.
OpenAI's CLIP: MIT.

## Sampling

The decoder's metadata carries Karlo's sampling recipe: ancestral sampling in every stage from pure noise
at t = 999 (timesteps round(i * 999 / (n - 1))), learned-range variance in the decoder, float32 schedule
values as diffusers computes them, prior guidance 4, decoder guidance 8 with the encoded empty caption as
the unconditional branch, bicubic antialiased upsampling, `super_res_last` on the final step only;
25 / 25 / 7 steps at `--quality default`. Edits, having no inpainting channels, are RePaint-style.

## Files

| file | parameters |
| --- | --- |
{rows}
"""




def convert(src: str | Path, dst: str | Path, variation: str | Path | None = None, dtype: torch.dtype = torch.float16,
            force: bool = False, progress: Callable[[str], None] | None = None) -> Path:
    """Convert a diffusers Karlo folder (and its image-variation folder) into an unclip model set at `dst`."""
    check_destination(dst, (src, variation), force)
    return write(prepare(src, variation, dtype), dst, force=force, progress=progress)
