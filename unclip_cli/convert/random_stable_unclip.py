"""Random-weight Stable unCLIP pipelines built with diffusers' and transformers' own classes, saved in diffusers'
folder layout: what the parity tests convert (`build("tiny")`), and pipelines from the hub's config files
(`hub_configs`, `reduce`d) that the real-layout tests convert and the benchmark times. No download: the tokenizer
is written from the BPE vocabulary unclip ships; Karlo's prior comes from `random_karlo`.

    img2img, karlo_pipe = build("tiny", seed=0)
    src = save(img2img, tmp / "sd-unclip")                 # the folder `unclip convert stable-unclip` reads
    text2img = text_to_image(img2img, karlo_pipe)           # diffusers' StableUnCLIPPipeline on the same networks

Every parameter diffusers initialises to a constant (norms, the normaliser's mean and std) is randomised, so a
conversion that dropped or swapped one fails the comparison.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from unclip_cli.convert.random_karlo import _bpe_files, randomise_constants

# Shaped unlike diffusers' own tests: attention on the first level only, heads differing per level, a text tower
# wider than the embedding, a two-level autoencoder (x2), non-square head counts.
SIZES = {
    "tiny": dict(vision=(48, 2, 3), image=32, patch=8, embed=32, text=(40, 2, 4), unet=((32, 64), 1, (2, 4)), sample=16,
                 attn=(True, False), vae=((32, 64), 1), karlo="tiny"),
}
SIZES["wide"] = {**SIZES["tiny"], "embed": 48}  # embeddings Karlo's tiny prior does not make


def _tokenizer():
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = _bpe_files(Path(tmp))
        return CLIPTokenizer(str(vocab), str(merges), pad_token="!", model_max_length=77)


def build(size: str = "tiny", seed: int = 0, device: str | torch.device = "cpu"):
    """A StableUnCLIPImg2ImgPipeline with random weights, and the random Karlo pipeline whose prior pairs with it."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableUnCLIPImg2ImgPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    from unclip_cli.convert import random_karlo
    from unclip_cli.convert.verify import quiet_libraries

    quiet_libraries()
    s = SIZES[size]
    karlo_pipe, _ = random_karlo.build(s["karlo"], seed=seed, device=device)
    torch.manual_seed(seed + 10)
    g = torch.Generator().manual_seed(seed + 11)
    (vw, vl, vh), (tw, tl, th), D = s["vision"], s["text"], s["embed"]
    chs, per, heads = s["unet"]
    with torch.device(device):
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=vw, intermediate_size=3 * vw, num_hidden_layers=vl, num_attention_heads=vh, image_size=s["image"],
            patch_size=s["patch"], projection_dim=D, hidden_act="quick_gelu", layer_norm_eps=1e-5))
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=tw, intermediate_size=4 * tw, num_hidden_layers=tl, num_attention_heads=th,
            max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=0))
        normalizer = StableUnCLIPImageNormalizer(embedding_dim=D)
        unet = UNet2DConditionModel(
            sample_size=s["sample"], in_channels=4, out_channels=4, layers_per_block=per, block_out_channels=chs,
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in s["attn"]),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(s["attn"])),
            cross_attention_dim=tw, attention_head_dim=heads, use_linear_projection=True, class_embed_type="projection",
            projection_class_embeddings_input_dim=2 * D, upcast_attention=True)
        vae_chs, vae_per = s["vae"]
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(vae_chs),
                            up_block_types=("UpDecoderBlock2D",) * len(vae_chs), block_out_channels=vae_chs, layers_per_block=vae_per,
                            latent_channels=4, sample_size=s["sample"] * 2 ** (len(vae_chs) - 1))
    for m in (image_encoder, text_encoder, normalizer, unet, vae):
        randomise_constants(m, g)
        m.eval()
    with torch.no_grad():  # the statistics' std must stay positive
        normalizer.std.copy_(0.5 + normalizer.std.abs())
    pipe = StableUnCLIPImg2ImgPipeline(
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": s["image"]}, crop_size={"height": s["image"], "width": s["image"]}),
        image_encoder=image_encoder, image_normalizer=normalizer,
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        tokenizer=_tokenizer(), text_encoder=text_encoder, unet=unet,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
                                set_alpha_to_one=False, steps_offset=1, clip_sample=False),
        vae=vae)
    return pipe, karlo_pipe


def text_to_image(img2img, karlo_pipe):
    """diffusers' StableUnCLIPPipeline on the same networks, with Karlo's prior under a DDPM scheduler (as diffusers'
    conversion script pairs them)."""
    from diffusers import DDPMScheduler, StableUnCLIPPipeline

    c = img2img.components
    # Karlo's scheduler config less its list of fields left at their defaults: with that list, DDPMScheduler.from_config
    # drops beta_schedule (UnCLIPScheduler's default, squaredcos_cap_v2: the schedule the prior was trained with) for its
    # own default, linear. diffusers' documented recipe, DDPMScheduler.from_config(UnCLIPScheduler.from_pretrained(karlo,
    # subfolder="prior_scheduler").config), does just that with the hub's file (no beta_schedule key; diffusers 0.42).
    prior_config = {k: v for k, v in karlo_pipe.prior_scheduler.config.items() if k != "_use_default_values"}
    return StableUnCLIPPipeline(
        prior_tokenizer=karlo_pipe.tokenizer, prior_text_encoder=karlo_pipe.text_encoder, prior=karlo_pipe.prior,
        prior_scheduler=DDPMScheduler.from_config(prior_config),
        image_normalizer=c["image_normalizer"], image_noising_scheduler=c["image_noising_scheduler"], tokenizer=c["tokenizer"],
        text_encoder=c["text_encoder"], unet=c["unet"], scheduler=c["scheduler"], vae=c["vae"])


def save(pipe, root: str | Path, **kwargs) -> Path:
    root = Path(root)
    pipe.save_pretrained(root, **kwargs)
    return root


def save_karlo(karlo_pipe, root: str | Path) -> Path:
    """The Karlo pipeline's folder (what --prior reads: prior, text encoder, tokenizer, schedulers)."""
    root = Path(root)
    karlo_pipe.save_pretrained(root)
    karlo_pipe.text_proj.save_pretrained(root / "text_proj")  # diffusers' save can leave it out (its class is not exported)
    return root


# -- pipelines from the hub's own config files ----------------------------------------------------------------------
HUB_CONFIGS = Path(__file__).resolve().parents[2] / "tests" / "data" / "stable-unclip-hub"
HUB_FOLDERS = ("stable-diffusion-2-1-unclip-small", "stable-diffusion-2-1-unclip")  # OpenAI CLIP ViT-L/14; OpenCLIP ViT-H/14


def hub_configs(folder: str = HUB_FOLDERS[0], root: str | Path = HUB_CONFIGS) -> dict[str, dict]:
    """{relative path: JSON object} of one hub folder's config files (tests/data/stable-unclip-hub)."""
    root = Path(root) / folder
    return {str(p.relative_to(root)): json.loads(p.read_text(encoding="utf-8")) for p in sorted(root.rglob("*.json"))}


# Layer counts and widths reduced, sizes reduced to an 8 x 8 latent (64 px); the structure as the hub's files have it
# (four UNet levels with attention at three, heads per level 5-10-20-20 scaled down, the four-level x8 autoencoder,
# v-prediction, the legacy eos id, the null fields). -small's embeddings stay as wide as Karlo's reduced prior's
# (random_karlo.REDUCED: 64); -unclip's (ViT-H: 1024 against ViT-L's 768) stay wider than them (80).
REDUCED = {
    "image_encoder/config.json": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, projection_dim=64,
                                      image_size=56, patch_size=14),
    "feature_extractor/preprocessor_config.json": dict(crop_size={"height": 56, "width": 56}, size={"shortest_edge": 56}),
    "image_normalizer/config.json": dict(embedding_dim=64),
    "text_encoder/config.json": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
    "unet/config.json": dict(block_out_channels=[32, 64, 128, 128], attention_head_dim=[1, 2, 4, 4], cross_attention_dim=64,
                             projection_class_embeddings_input_dim=128, sample_size=8, layers_per_block=1),
    "vae/config.json": dict(block_out_channels=[32, 32, 64, 64], layers_per_block=1, sample_size=64),
}
WIDER = {"image_encoder/config.json": dict(projection_dim=80), "image_normalizer/config.json": dict(embedding_dim=80),
         "unet/config.json": dict(projection_class_embeddings_input_dim=160)}


def reduce(configs: dict[str, dict], changes: dict[str, dict] | None = None) -> dict[str, dict]:
    """The hub's configs with layer counts and widths replaced (the keys each file has are kept as they are); by
    default REDUCED, with WIDER embeddings for the ViT-H folder."""
    if changes is None:
        wide = configs["image_normalizer/config.json"].get("embedding_dim") == 1024
        changes = {rel: {**REDUCED.get(rel, {}), **(WIDER.get(rel, {}) if wide else {})} for rel in REDUCED}
    return {rel: {**cfg, **changes.get(rel, {})} for rel, cfg in configs.items()}


def save_karlo_prior(root: str | Path, seed: int = 0, changes: dict | None = None) -> Path:
    """A Karlo folder with only what `--prior` reads (prior, text encoder, tokenizer, prior scheduler), built from
    the hub's Karlo configs (tests/data/karlo-hub), reduced as random_karlo.REDUCED unless `changes` says otherwise ({}: full size),
    random weights, the hub's config texts written back."""
    from diffusers import PriorTransformer
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from unclip_cli.convert import random_karlo

    changes = random_karlo.REDUCED if changes is None else changes
    configs = random_karlo.reduce(random_karlo.hub_configs(), changes)[random_karlo.HUB_FOLDERS[0]]
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    prior = PriorTransformer.from_config(configs["prior/config.json"])
    text = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(configs["text_encoder/config.json"]))
    root = Path(root)
    for name, m in (("prior", prior), ("text_encoder", text)):
        randomise_constants(m, g)
        m.save_pretrained(root / name)
    _tokenizer().save_pretrained(root / "tokenizer")
    for rel in ("model_index.json", "prior/config.json", "text_encoder/config.json", "tokenizer/tokenizer_config.json",
                "prior_scheduler/scheduler_config.json"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(configs[rel], indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return root


def build_from_configs(configs: dict[str, dict], seed: int = 0, device: str | torch.device = "cpu", dtype=torch.float32):
    """A StableUnCLIPImg2ImgPipeline built by diffusers' and transformers' classes from hub config files, random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableUnCLIPImg2ImgPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    from unclip_cli.convert.verify import quiet_libraries

    quiet_libraries()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.device(device):
        nets = dict(
            image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(configs["image_encoder/config.json"])),
            text_encoder=CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder/config.json"])),
            image_normalizer=StableUnCLIPImageNormalizer.from_config(configs["image_normalizer/config.json"]),
            unet=UNet2DConditionModel.from_config(configs["unet/config.json"]),
            vae=AutoencoderKL.from_config(configs["vae/config.json"]))
    for name, m in nets.items():
        randomise_constants(m, g)
        nets[name] = m.to(dtype).eval()
    with torch.no_grad():
        nets["image_normalizer"].std.copy_(0.5 + nets["image_normalizer"].std.abs())
    fe = configs["feature_extractor/preprocessor_config.json"]
    processor = CLIPImageProcessor(size=fe["size"], crop_size=fe["crop_size"], resample=fe["resample"], image_mean=fe["image_mean"],
                                   image_std=fe["image_std"])
    return StableUnCLIPImg2ImgPipeline(
        feature_extractor=processor, tokenizer=_tokenizer(),
        image_noising_scheduler=DDPMScheduler.from_config(configs["image_noising_scheduler/scheduler_config.json"]),
        scheduler=DDIMScheduler.from_config(configs["scheduler/scheduler_config.json"]), **nets)


def save_as_hub(pipe, configs: dict[str, dict], root: str | Path) -> Path:
    """`save`, then every config file written back as the hub has it."""
    root = save(pipe, root)
    for rel, cfg in configs.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return root
