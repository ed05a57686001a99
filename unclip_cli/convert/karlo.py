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

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from unclip_cli import checkpoint
from unclip_cli.diffusion.gaussian import DiffusionConfig
from unclip_cli.diffusion.recipe import KARLO
from unclip_cli.errors import InputError
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
CONFIG_FILE = {"tokenizer": "tokenizer_config.json", "feature_extractor": "preprocessor_config.json"}
WEIGHT_NAMES = ("diffusion_pytorch_model", "model", "pytorch_model")
IGNORED = ("position_ids",)  # buffers older transformers checkpoints store; recomputed, not weights
LICENCE = "creativeml-openrail-m"
# open_clip names CLIP's start and end tokens differently from OpenAI's (and Hugging Face's) vocabulary files.
HF_SPECIAL = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
SMALL = 1024  # tensors with fewer values (norms, biases, statistics) stay float32, as `checkpoint.save` keeps them


def _fail(message: str, hint: str | None = None):
    raise InputError(message, hint=hint)


# -- reading a diffusers folder ----------------------------------------------------------------------
class Tensors:
    """The weights of one component folder, read one tensor at a time: `.safetensors` (possibly sharded)
    through safetensors' lazy reader, `.bin` through torch.load(weights_only=True, mmap=True)."""

    def __init__(self, folder: Path, part: str):
        self.folder, self.part = folder, part
        self._handles: list = []
        self._where: dict[str, object] = {}
        files = self._files()
        for f in files:
            if f.suffix == ".safetensors":
                from safetensors import safe_open

                try:
                    h = safe_open(str(f), framework="pt")
                except Exception as e:
                    _fail(f"{f}: not a readable safetensors file ({e})", hint="the download is incomplete or damaged")
                self._handles.append(h)
                for k in h.keys():
                    self._where[k] = h
            else:
                try:
                    try:
                        state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                    except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
                        state = torch.load(f, map_location="cpu", weights_only=True)
                except Exception as e:  # weights_only refuses pickled code: such a file is not a plain state dict
                    _fail(f"{f}: not a plain PyTorch state dict ({type(e).__name__}: {str(e).splitlines()[0][:120]})",
                          hint="only tensors are read from .bin files (torch.load weights_only=True); convert it to safetensors")
                if not isinstance(state, dict):
                    _fail(f"{f}: holds a {type(state).__name__}, not a state dict")
                for k, v in state.items():
                    if torch.is_tensor(v):
                        self._where[k] = state
        self.keys = {k for k in self._where if not k.endswith(IGNORED)}

    def _files(self) -> list[Path]:
        for name in WEIGHT_NAMES:
            for variant in ("", ".fp16"):
                for ext in (".safetensors", ".bin"):
                    f = self.folder / f"{name}{variant}{ext}"
                    if f.is_file():
                        return [f]
                    index = self.folder / f"{name}{variant}{ext}.index.json"
                    if index.is_file():
                        try:
                            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                            _fail(f"{index}: not a shard index ({type(e).__name__})")
                        missing = [s for s in shards if not (self.folder / s).is_file()]
                        if missing:
                            _fail(f"{self.folder}: missing weight shard {missing[0]} of {PARTS.get(self.part, self.part)}")
                        return [self.folder / s for s in shards]
        _fail(f"{self.folder}: no weights for {PARTS.get(self.part) or VARIATION_PARTS.get(self.part, self.part)} "
              f"(expected {WEIGHT_NAMES[0]}.safetensors or model.safetensors, or a .bin)")

    def shape(self, key: str) -> tuple[int, ...]:
        src = self._where[key]
        if isinstance(src, dict):
            return tuple(src[key].shape)
        return tuple(src.get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        src = self._where[key]
        t = src[key] if isinstance(src, dict) else src.get_tensor(key)
        return t.float() if t.is_floating_point() else t


@dataclass
class Folder:
    """A checked diffusers pipeline folder: its model_index and each component's config."""

    root: Path
    index: dict
    configs: dict[str, dict]

    def tensors(self, part: str) -> Tensors:
        return Tensors(self.root / part, part)


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        _fail(f"{path.parent}: missing {path.name} ({what})")
    except (OSError, ValueError) as e:
        _fail(f"{path}: not readable JSON ({e})")
    if not isinstance(data, dict):
        _fail(f"{path}: not a JSON object")
    return data


def read_folder(root: str | Path, parts: dict[str, str], pipeline: str) -> Folder:
    """Check a diffusers folder holds every part (a one-line error naming the first one missing) and read the configs."""
    root = Path(root)
    if not root.is_dir():
        _fail(f"{root}: no such folder", hint="pass the folder the pipeline was downloaded to (it holds model_index.json)")
    index = _read_json(root / "model_index.json", f"the index of a diffusers {pipeline} folder")
    cls = index.get("_class_name")
    if cls not in (pipeline, None):
        _fail(f"{root}: a diffusers {cls} folder, not {pipeline}", hint="unclip convert karlo reads kakaobrain/karlo-v1-alpha "
              "(and, with --variation, the image-variation pipeline built from it)")
    configs = {}
    for part, what in parts.items():
        folder = root / part
        if not folder.is_dir():
            _fail(f"{root}: missing {part}/ ({what})")
        name = CONFIG_FILE.get(part, "scheduler_config.json" if part.endswith("scheduler") else "config.json")
        configs[part] = _read_json(folder / name, what)
    return Folder(root, index, configs)


# -- configs -------------------------------------------------------------------------------------------
def _need(part: str, cfg: dict, field: str, allowed, default=None):
    """cfg[field] (or its diffusers default), refused with the field named unless it is one we express."""
    value = cfg.get(field, default)
    ok = value in allowed if isinstance(allowed, (tuple, list, set)) else allowed(value)
    if not ok:
        _fail(f"{part}/: unsupported {field} = {json.dumps(value)}; unclip's networks express Karlo's "
              f"{', '.join(map(json.dumps, allowed)) if isinstance(allowed, (tuple, list, set)) else 'values'}")
    return value


def clip_config(text: dict, vision: dict | None, processor: dict | None) -> ClipConfig:
    part = "text_encoder"
    _need(part, text, "hidden_act", ("quick_gelu", "gelu"))
    W = text["hidden_size"]
    _need(part, text, "intermediate_size", lambda v: v == 4 * W)
    _need(part, text, "vocab_size", (BPE_VOCAB,))
    _need(part, text, "layer_norm_eps", lambda v: v is None or abs(v - 1e-5) < 1e-12, 1e-5)
    if W % text["num_attention_heads"]:
        _fail(f"{part}/: hidden_size {W} is not a multiple of num_attention_heads {text['num_attention_heads']}")
    cfg = ClipConfig(
        embed_dim=text["projection_dim"], context_length=text.get("max_position_embeddings", 77), vocab_size=BPE_VOCAB,
        text_width=W, text_heads=text["num_attention_heads"], text_layers=text["num_hidden_layers"],
        activation=text["hidden_act"], vocab="bpe", normalize=False, preprocess="openai", vision=vision is not None,
    )
    if vision is None:
        return cfg
    part = "image_encoder"
    V = vision["hidden_size"]
    _need(part, vision, "hidden_act", (text["hidden_act"],))
    _need(part, vision, "intermediate_size", lambda v: v == 4 * V)
    _need(part, vision, "projection_dim", (cfg.embed_dim,))
    _need(part, vision, "layer_norm_eps", lambda v: v is None or abs(v - 1e-5) < 1e-12, 1e-5)
    _need(part, vision, "num_channels", (3,), 3)
    if V % vision["num_attention_heads"]:
        _fail(f"{part}/: hidden_size {V} is not a multiple of num_attention_heads {vision['num_attention_heads']}")
    cfg = replace(cfg, image_size=vision["image_size"], patch_size=vision["patch_size"], vision_width=V,
                  vision_layers=vision["num_hidden_layers"], vision_head_width=V // vision["num_attention_heads"])
    if processor is not None:
        _check_processor(processor, cfg.image_size)
    return cfg


def _side(value, key: str):
    return value.get(key) if isinstance(value, dict) else value


def _check_processor(p: dict, size: int) -> None:
    """Our "openai" preprocessing: shortest side to the encoder's size, a centre crop of it, OpenAI's mean and std."""
    part = "feature_extractor"
    for field, want in (("do_resize", True), ("do_center_crop", True), ("do_normalize", True), ("do_rescale", True)):
        _need(part, p, field, (want,), want)
    shortest = _side(p.get("size"), "shortest_edge")
    crop = _side(p.get("crop_size"), "height")
    if shortest != size or crop != size or _side(p.get("crop_size"), "width") not in (None, size):
        _fail(f"{part}/: resizes to {p.get('size')} and crops {p.get('crop_size')}, but the image encoder reads {size} px",
              hint="unclip resizes the shortest side to the encoder's size and crops the centre")
    for field, want in (("image_mean", OPENAI_MEAN), ("image_std", OPENAI_STD)):
        got = p.get(field, list(want))
        if not isinstance(got, list) or len(got) != 3 or any(abs(a - b) > 1e-6 for a, b in zip(got, want)):
            _fail(f"{part}/: {field} is {got}, not OpenAI's {list(want)}")


def prior_config(p: dict) -> PriorConfig:
    part = "prior"
    heads, head_dim = p.get("num_attention_heads", 32), p.get("attention_head_dim", 64)
    D, W = p.get("embedding_dim", 768), heads * head_dim
    _need(part, p, "additional_embeddings", (4,), 4)
    _need(part, p, "time_embed_act_fn", ("silu",), "silu")
    _need(part, p, "norm_in_type", (None,))
    _need(part, p, "embedding_proj_norm_type", (None,))
    _need(part, p, "encoder_hid_proj_type", ("linear",), "linear")
    _need(part, p, "added_emb_type", ("prd",), "prd")
    _need(part, p, "time_embed_dim", (None, W))
    _need(part, p, "embedding_proj_dim", (None, D))
    _need(part, p, "clip_embed_dim", (None, D))
    return PriorConfig(clip_dim=D, text_width=D, context_length=p.get("num_embeddings", 77), width=W,
                       layers=p.get("num_layers", 20), heads=heads, mlp_ratio=4, dropout=0.0,
                       raw_embeddings=True, learned_null_text=False)


def _levels(part: str, cfg: dict, down_attn: str | None) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """(model channels, channel multipliers, downsampling factors with attention) of a diffusers UNet config."""
    chs = cfg["block_out_channels"]
    ch0 = chs[0]
    if any(c % ch0 for c in chs) or any(c % 32 for c in chs):
        _fail(f"{part}/: block_out_channels {chs} must be multiples of the first and of 32 (the GroupNorm groups)")
    downs, ups = cfg["down_block_types"], cfg["up_block_types"]
    if len(downs) != len(chs) or len(ups) != len(chs):
        _fail(f"{part}/: {len(downs)} down and {len(ups)} up blocks for {len(chs)} block_out_channels")
    attn = []
    for i, (d, u) in enumerate(zip(downs, reversed(ups))):
        down_ok = ("ResnetDownsampleBlock2D",) + ((down_attn,) if down_attn else ())
        if d not in down_ok:
            _fail(f"{part}/: unsupported down block {d}; unclip's UNet expresses {', '.join(down_ok)}")
        has = d == down_attn
        want_up = "SimpleCrossAttnUpBlock2D" if has else "ResnetUpsampleBlock2D"
        if u != want_up:
            _fail(f"{part}/: up block {u} does not mirror down block {d} (expected {want_up})")
        if has:
            attn.append(2**i)
    return ch0, tuple(c // ch0 for c in chs), tuple(attn)


def _common_unet(part: str, cfg: dict) -> None:
    _need(part, cfg, "flip_sin_to_cos", (True,), True)
    _need(part, cfg, "freq_shift", (0,), 0)
    _need(part, cfg, "norm_num_groups", (32,), 32)
    _need(part, cfg, "norm_eps", lambda v: abs(v - 1e-5) < 1e-12, 1e-5)
    _need(part, cfg, "act_fn", ("silu",), "silu")
    _need(part, cfg, "time_embedding_type", ("positional",), "positional")
    _need(part, cfg, "resnet_time_scale_shift", ("scale_shift", "default"), "default")


def decoder_config(d: dict, tp: dict) -> UNetConfig:
    part = "decoder"
    _common_unet(part, d)
    _need(part, d, "class_embed_type", ("identity",))
    _need(part, d, "mid_block_type", ("UNetMidBlock2DSimpleCrossAttn",))
    _need(part, d, "in_channels", (3,), 4)
    _need(part, d, "out_channels", (3, 6), 4)
    _need(part, d, "time_embedding_dim", (None,))
    for field in ("encoder_hid_dim", "addition_embed_type", "time_cond_proj_dim", "projection_class_embeddings_input_dim"):
        _need(part, d, field, (None,))
    for field in ("only_cross_attention", "dual_cross_attention", "resnet_skip_time_act", "mid_block_only_cross_attention"):
        _need(part, d, field, (False, None))
    _need(part, d, "cross_attention_norm", (None,))
    _need(part, d, "resnet_out_scale_factor", (1, 1.0), 1.0)
    head = d.get("attention_head_dim", 8)
    if not isinstance(head, int):
        _fail(f"{part}/: attention_head_dim {head} per block; unclip's UNet takes one head width")
    ch0, mult, attn = _levels(part, d, "SimpleCrossAttnDownBlock2D")
    ctx = d["cross_attention_dim"]
    if not isinstance(ctx, int):
        _fail(f"{part}/: cross_attention_dim {ctx} per block; unclip's UNet takes one")
    if tp.get("time_embed_dim") != 4 * ch0 or tp.get("cross_attention_dim") != ctx:
        _fail(f"text_proj/: time_embed_dim {tp.get('time_embed_dim')} and cross_attention_dim {tp.get('cross_attention_dim')} "
              f"do not fit the decoder ({4 * ch0}, {ctx})")
    return UNetConfig(
        image_size=d["sample_size"], in_channels=3, out_channels=d["out_channels"], extra_channels=0, model_channels=ch0,
        channel_mult=mult, num_res_blocks=d.get("layers_per_block", 2), attention_ds=attn, head_channels=head, dropout=0.0,
        clip_dim=tp.get("clip_embeddings_dim", 768), num_clip_tokens=tp.get("clip_extra_context_tokens", 4),
        text_width=tp.get("clip_embeddings_dim", 768), context_dim=ctx, patch_size=1, resblock_updown=True,
        time_conditioning="scale_shift" if d.get("resnet_time_scale_shift") == "scale_shift" else "additive",
        raw_embeddings=True, text_embed_to_time=True, clip_token_layout="interleaved",
    )


def super_res_config(u: dict, part: str) -> UNetConfig:
    _common_unet(part, u)
    _need(part, u, "add_attention", (False,), True)
    _need(part, u, "class_embed_type", (None,))
    _need(part, u, "center_input_sample", (False,), False)
    _need(part, u, "mid_block_type", ("UNetMidBlock2D", None), "UNetMidBlock2D")
    _need(part, u, "mid_block_scale_factor", (1, 1.0), 1)
    _need(part, u, "time_embedding_dim", (None,))
    _need(part, u, "out_channels", (3,), 3)
    _need(part, u, "in_channels", (6,), 3)
    ch0, mult, _ = _levels(part, u, None)
    return UNetConfig(
        image_size=u["sample_size"], in_channels=3, out_channels=3, extra_channels=3, model_channels=ch0, channel_mult=mult,
        num_res_blocks=u.get("layers_per_block", 2), attention_ds=(), dropout=0.0, clip_dim=0, text_width=0, patch_size=1,
        resblock_updown=True, time_conditioning="scale_shift" if u.get("resnet_time_scale_shift") == "scale_shift" else "additive",
    )


def diffusion_config(s: dict, part: str, variance: tuple[str, ...]) -> DiffusionConfig:
    _need(part, s, "num_train_timesteps", (1000,), 1000)
    _need(part, s, "beta_schedule", ("squaredcos_cap_v2",), "squaredcos_cap_v2")
    v = _need(part, s, "variance_type", variance, "fixed_small_log")
    p = _need(part, s, "prediction_type", ("epsilon", "sample"), "epsilon")
    _need(part, s, "clip_sample", (True,), True)
    return DiffusionConfig(timesteps=1000, schedule="cosine", parameterization="eps" if p == "epsilon" else "x0",
                           schedule_dtype="float32", variance="learned_range" if v == "learned_range" else "fixed_small")


def check_tokenizer(folder: Path) -> None:
    """unclip tokenizes with open_clip's bundled copy of CLIP's BPE: the folder's vocabulary and merges
    (vocab.json and merges.txt, or a tokenizers-format tokenizer.json) must be that one."""
    from unclip_cli.models.clip import bpe_tokenizer

    if (folder / "vocab.json").is_file():
        vocab = _read_json(folder / "vocab.json", "the tokenizer's vocabulary")
        if not (folder / "merges.txt").is_file():
            _fail(f"{folder}: missing merges.txt (the tokenizer's BPE merges)")
        merges = [ln.split() for ln in (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
                  if ln and not ln.startswith("#version")]
    elif (folder / "tokenizer.json").is_file():
        model = _read_json(folder / "tokenizer.json", "the tokenizer").get("model")
        if not isinstance(model, dict) or not isinstance(model.get("vocab"), dict) or not isinstance(model.get("merges"), list):
            _fail(f"{folder}/tokenizer.json: not a BPE tokenizer")
        vocab = model["vocab"]
        merges = [m.split() if isinstance(m, str) else m for m in model["merges"]]
    else:
        _fail(f"{folder}: missing vocab.json and merges.txt (or tokenizer.json): the CLIP tokenizer's vocabulary")
    tok = bpe_tokenizer()
    if vocab != {HF_SPECIAL.get(k, k): v for k, v in tok.encoder.items()}:
        _fail(f"{folder}: a vocabulary of {len(vocab):,} tokens that is not CLIP's BPE vocabulary",
              hint="unclip reads CLIP's own 49,408-token BPE vocabulary (open_clip bundles it)")
    ranks = tok.bpe_ranks
    if len(merges) != len(ranks) or any(ranks.get(tuple(m)) != i for i, m in enumerate(merges)):
        _fail(f"{folder}: not CLIP's BPE merges", hint="unclip reads CLIP's own BPE merges (open_clip bundles them)")


# -- name maps: ours <- theirs ----------------------------------------------------------------------------
Rule = tuple[str, list[str]]  # (how, source keys): copy, cat (q, k, v), cat1 (as 1x1 conv), t (transpose), flat, logit


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


def _apply(how: str, srcs: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    if how == "copy":
        return srcs[0]
    if how == "cat":
        return torch.cat(srcs, dim=0)
    if how == "cat1":  # Linear weights as a 1x1 Conv1d's
        return torch.cat(srcs, dim=0)[..., None]
    if how == "t":
        return srcs[0].t()
    if how == "flat":
        return srcs[0].reshape(shape)
    if how == "logit":  # OpenAI's CLIP ends training at its clamp, 100; only training reads it
        return torch.tensor(math.log(100.0))
    raise ValueError(how)


def plan(kind: str, config, mapping: dict[str, tuple[str, Rule]], readers: dict[str, Tensors], dtype: torch.dtype, label: str):
    """The tensors of one output file: (name, shape, dtype, make) for checkpoint.save_streaming, with every
    name and shape checked against our network built from `config` and every source tensor used."""
    expected = {k: (tuple(v.shape), v.dtype) for k, v in checkpoint._build(kind, config, Path(label)).state_dict().items()}
    missing = sorted(set(expected) - set(mapping))
    if missing:  # a bug in the maps, not in the folder
        raise RuntimeError(f"no source for {missing[:3]} in the {label} map")
    used: dict[str, set] = {}
    items = []
    for name, (shape, own_dtype) in expected.items():
        part, (how, keys) = mapping[name]
        if keys:
            reader = readers[part]
            absent = [k for k in keys if k not in reader.keys]
            if absent:
                _fail(f"{reader.folder}: no tensor {absent[0]} ({PARTS.get(part) or VARIATION_PARTS.get(part)})",
                      hint="the folder's weights do not match its config.json")
            used.setdefault(part, set()).update(keys)
            got = [reader.shape(k) for k in keys]
            want = _source_shape(how, shape, len(keys))
            if how != "flat" and any(g != w for g, w in zip(got, want)) or how == "flat" and any(math.prod(g) != math.prod(shape) for g in got):
                _fail(f"{reader.folder}: tensor {keys[0]} has shape {got[0]}, its config.json implies {want[0]}")
        out_dtype = own_dtype if not own_dtype.is_floating_point or math.prod(shape) < SMALL else dtype

        def make(part=part, how=how, keys=keys, shape=shape):
            return _apply(how, [readers[part].get(k) for k in keys], shape)

        items.append((name, shape, out_dtype, make))
    for part, keys in used.items():
        unused = sorted(readers[part].keys - keys)
        if unused:
            _fail(f"{readers[part].folder}: tensor {unused[0]} is not part of {PARTS.get(part) or VARIATION_PARTS.get(part)} "
                  "as its config.json describes it", hint="the folder's weights do not match its config.json")
    return items


def _source_shape(how: str, shape: tuple[int, ...], n: int) -> list[tuple[int, ...]]:
    if how in ("cat", "cat1"):
        rows = shape[0] // n
        return [(rows, *shape[1:2])] * n if how == "cat1" else [(rows, *shape[1:])] * n
    if how == "t":
        return [tuple(reversed(shape))]
    return [shape] * n


# -- the conversion --------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Everything a conversion writes, checked before anything is written."""

    files: dict[str, tuple[str, object, DiffusionConfig | None, dict, list]]  # file -> (kind, config, diffusion, extra, items)
    card: str


def prepare(src: str | Path, variation: str | Path | None = None, dtype: torch.dtype = torch.float16) -> Plan:
    """Read and check the folders, derive every config and plan every tensor; nothing is written."""
    folder = read_folder(src, PARTS, PIPELINE)
    var = read_folder(variation, VARIATION_PARTS, VARIATION_PIPELINE) if variation is not None else None
    c = folder.configs
    check_tokenizer(folder.root / "tokenizer")
    clip_cfg = clip_config(c["text_encoder"], var.configs["image_encoder"] if var else None, var.configs["feature_extractor"] if var else None)
    prior_cfg = prior_config(c["prior"])
    if prior_cfg.clip_dim != clip_cfg.embed_dim or prior_cfg.context_length != clip_cfg.context_length \
            or prior_cfg.text_width != clip_cfg.text_width:
        _fail(f"prior/: embedding_dim {prior_cfg.clip_dim} and num_embeddings {prior_cfg.context_length} do not fit the text "
              f"encoder (projection_dim {clip_cfg.embed_dim}, hidden_size {clip_cfg.text_width}, {clip_cfg.context_length} tokens)")
    dec_cfg = decoder_config(c["decoder"], c["text_proj"])
    if dec_cfg.clip_dim != clip_cfg.embed_dim or dec_cfg.text_width != clip_cfg.text_width:
        _fail(f"text_proj/: clip_embeddings_dim {dec_cfg.clip_dim} does not fit the text encoder ({clip_cfg.embed_dim})")
    first_cfg = super_res_config(c["super_res_first"], "super_res_first")
    last_cfg = super_res_config(c["super_res_last"], "super_res_last")
    if first_cfg != last_cfg:
        _fail("super_res_last/: its config differs from super_res_first's (unclip runs them as one stage)")
    scale, rem = divmod(first_cfg.image_size, dec_cfg.image_size)
    if rem or not 2 <= scale <= 8:
        _fail(f"super_res_first/: sample_size {first_cfg.image_size} is not 2-8 times the decoder's {dec_cfg.image_size}")
    prior_diff = diffusion_config(c["prior_scheduler"], "prior_scheduler", ("fixed_small_log",))
    dec_diff = diffusion_config(c["decoder_scheduler"], "decoder_scheduler", ("learned_range", "fixed_small_log"))
    sr_diff = diffusion_config(c["super_res_scheduler"], "super_res_scheduler", ("fixed_small_log",))
    if prior_diff.parameterization != "x0" or dec_diff.parameterization != "eps" or sr_diff.parameterization != "eps":
        _fail("the schedulers' prediction_type must be sample (prior) and epsilon (decoder, super-res), as Karlo's")
    if (dec_diff.variance == "learned_range") != (dec_cfg.out_channels == 6):
        _fail(f"decoder/: out_channels {dec_cfg.out_channels} with a {c['decoder_scheduler'].get('variance_type')} scheduler")
    recipe = replace(
        KARLO, prior_clamp=float(c["prior_scheduler"].get("clip_sample_range", 1.0)),
        decoder_clamp=float(c["decoder_scheduler"].get("clip_sample_range", 1.0)),
        upsampler_clamp=float(c["super_res_scheduler"].get("clip_sample_range", 1.0)))

    readers = {p: folder.tensors(p) for p in ("text_encoder", "prior", "decoder", "text_proj", "super_res_first", "super_res_last")}
    if var is not None:
        readers["image_encoder"] = var.tensors("image_encoder")
    source = {"format": "diffusers", "pipeline": folder.index.get("_class_name", PIPELINE), "folder": folder.root.name,
              "diffusers_version": folder.index.get("_diffusers_version"), "licence": LICENCE}
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
    return Plan(files, model_card(folder, var, files, dtype))


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


def write(p: Plan, dst: str | Path, force: bool = False, progress: Callable[[str], None] | None = None) -> Path:
    """Write a planned conversion into `dst`. Each file is written atomically; on any failure the files this
    call wrote are removed. An existing model set there is refused unless `force`."""
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        _fail(f"--to {dst} is a file; it must be a folder")
    if not force and dst.is_dir() and any((dst / f).exists() for f in [*p.files, "MODEL_CARD.md"]):
        _fail(f"{dst} already holds a model set", hint="choose another --to folder, or pass --force to replace it")
    dst.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        clip_uid = None
        for name, (kind, cfg, diffusion, extra, items) in p.files.items():
            if progress:
                progress(name)
            extra = dict(extra)
            if kind != "clip":
                extra["clip_uid"] = clip_uid
            path = dst / name
            uid = checkpoint.save_streaming(path, kind, cfg, items, diffusion, extra)
            written.append(path)
            if kind == "clip":
                clip_uid = uid
        card = dst / "MODEL_CARD.md"
        checkpoint.atomic_write(card, lambda tmp: Path(tmp).write_text(p.card, encoding="utf-8"))
        written.append(card)
    except BaseException:
        for f in written:
            f.unlink(missing_ok=True)
        raise
    return dst


def convert(src: str | Path, dst: str | Path, variation: str | Path | None = None, dtype: torch.dtype = torch.float16,
            force: bool = False, progress: Callable[[str], None] | None = None) -> Path:
    """Convert a diffusers Karlo folder (and its image-variation folder) into an unclip model set at `dst`."""
    return write(prepare(src, variation, dtype), dst, force=force, progress=progress)
