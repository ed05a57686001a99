"""Random-weight Karlo pipelines built with diffusers' and transformers' own classes, saved in diffusers'
folder layout: what the parity tests convert (`build("tiny")`), and pipelines built from the hub's own config files
(`hub_configs`, full size or `reduce`d) that the real-layout tests convert and the benchmarks time. Needs diffusers and transformers; no download: the tokenizer
is written from the BPE vocabulary unclip ships (CLIP's).

    pipe, var = build("tiny", seed=0)                 # in memory: UnCLIPPipeline, UnCLIPImageVariationPipeline
    src, var_dir = save(pipe, var, tmp / "karlo")     # the folders `unclip convert karlo` reads

Parameters that diffusers initialises to constants (zeros: clip_mean, clip_std, the prior's positional
embeddings and final token, the learned null image embedding; ones and zeros: every norm) are set to random
values, so a conversion that dropped or swapped any of them fails the comparison.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SIZES = {
    # text/vision width, layers, heads; prior heads x head dim, layers; decoder channels, res blocks, head dim, context;
    # super-res channels, res blocks; decoder and super-res sample sizes; image encoder size and patch
    "tiny": dict(text=(32, 2, 4), vision=(32, 2, 4), embed=32, image=32, patch=4, prior=(2, 12, 1), dec=((32, 64), 1, 4, 100),
                 sr=((32, 64), 1), dec_size=16, sr_size=32),
}


def hf_vocab(encoder: dict) -> dict:
    """CLIP's vocabulary under the names Hugging Face's CLIP tokenizers give the two special tokens."""
    from unclip_cli.convert.karlo import HF_SPECIAL

    return {HF_SPECIAL.get(k, k): v for k, v in encoder.items()}


def _bpe_files(folder: Path) -> tuple[Path, Path]:
    """vocab.json and merges.txt of CLIP's BPE, from the copy unclip ships (what Hugging Face's CLIP tokenizers hold)."""
    from unclip_cli.models.clip import bpe_tokenizer

    tok = bpe_tokenizer()
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    vocab.write_text(json.dumps(hf_vocab(tok.encoder), ensure_ascii=False), encoding="utf-8")
    ranked = sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])
    merges.write_text("#version: 0.2\n" + "\n".join(" ".join(pair) for pair, _ in ranked) + "\n", encoding="utf-8")
    return vocab, merges


@torch.no_grad()
def randomise_constants(module: torch.nn.Module, g: torch.Generator) -> None:
    """Give every constant parameter (all zeros, all ones) random values; standard deviations stay positive."""
    for name, p in module.named_parameters():
        flat = p.detach().flatten()
        if flat.numel() and bool((flat == flat[0]).all()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p)
            if name.endswith("clip_std"):
                p.copy_(0.5 + noise.abs())
            elif float(flat[0]) == 1.0:
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)


def build(size: str = "tiny", seed: int = 0, device: str | torch.device = "cpu"):
    """An UnCLIPPipeline and an UnCLIPImageVariationPipeline sharing every component, with random weights."""
    import tempfile

    from diffusers import PriorTransformer, UnCLIPImageVariationPipeline, UnCLIPPipeline, UNet2DConditionModel, UNet2DModel, UnCLIPScheduler
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    from unclip_cli.convert.verify import quiet_libraries, text_proj_class

    quiet_libraries()
    s = SIZES[size]
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    (tw, tl, th), (vw, vl, vh), D = s["text"], s["vision"], s["embed"]
    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = _bpe_files(Path(tmp))
        tokenizer = CLIPTokenizer(str(vocab), str(merges), pad_token="!", model_max_length=77)
    with torch.device(device):
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=tw, intermediate_size=4 * tw, num_hidden_layers=tl, num_attention_heads=th,
            max_position_embeddings=77, projection_dim=D, hidden_act="quick_gelu", layer_norm_eps=1e-5,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=0))
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=vw, intermediate_size=4 * vw, num_hidden_layers=vl, num_attention_heads=vh, image_size=s["image"],
            patch_size=s["patch"], projection_dim=D, hidden_act="quick_gelu", layer_norm_eps=1e-5))
        heads, head_dim, layers = s["prior"]
        prior = PriorTransformer(num_attention_heads=heads, attention_head_dim=head_dim, num_layers=layers, embedding_dim=D)
        chs, per, head, ctx = s["dec"]
        n = len(chs)
        text_proj = text_proj_class()(clip_embeddings_dim=D, time_embed_dim=4 * chs[0], cross_attention_dim=ctx)
        decoder = UNet2DConditionModel(
            sample_size=s["dec_size"], in_channels=3, out_channels=6, layers_per_block=per, block_out_channels=chs,
            down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * (n - 1),
            up_block_types=("SimpleCrossAttnUpBlock2D",) * (n - 1) + ("ResnetUpsampleBlock2D",),
            mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=ctx, attention_head_dim=head,
            resnet_time_scale_shift="scale_shift", class_embed_type="identity")
        sr_chs, sr_per = s["sr"]

        def super_res():
            return UNet2DModel(sample_size=s["sr_size"], in_channels=6, out_channels=3, layers_per_block=sr_per, block_out_channels=sr_chs,
                               down_block_types=("ResnetDownsampleBlock2D",) * len(sr_chs),
                               up_block_types=("ResnetUpsampleBlock2D",) * len(sr_chs), add_attention=False)

        super_res_first, super_res_last = super_res(), super_res()
    for m in (text_encoder, image_encoder, prior, text_proj, decoder, super_res_first, super_res_last):
        randomise_constants(m, g)
        m.eval()
    schedulers = dict(
        prior_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0),
        decoder_scheduler=UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon"),
        super_res_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon"))
    pipe = UnCLIPPipeline(prior=prior, decoder=decoder, text_proj=text_proj, text_encoder=text_encoder, tokenizer=tokenizer,
                          super_res_first=super_res_first, super_res_last=super_res_last, **schedulers)
    processor = CLIPImageProcessor(size={"shortest_edge": s["image"]}, crop_size={"height": s["image"], "width": s["image"]})
    var = UnCLIPImageVariationPipeline(decoder=decoder, text_encoder=text_encoder, tokenizer=tokenizer, text_proj=text_proj,
                                       feature_extractor=processor, image_encoder=image_encoder, super_res_first=super_res_first,
                                       super_res_last=super_res_last, decoder_scheduler=schedulers["decoder_scheduler"],
                                       super_res_scheduler=schedulers["super_res_scheduler"])
    return pipe, var


def save(pipe, var, root: str | Path, **kwargs) -> tuple[Path, Path]:
    """Save both pipelines as diffusers folders: root/karlo and root/karlo-variations."""
    root = Path(root)
    src, var_dir = root / "karlo", root / "karlo-variations"
    pipe.save_pretrained(src, **kwargs)
    var.save_pretrained(var_dir, **kwargs)
    # The pipelines' save can leave text_proj without weights (its class is not exported by diffusers):
    # save it with its own method.
    for folder in (src, var_dir):
        pipe.text_proj.save_pretrained(folder / "text_proj", **kwargs)
    return src, var_dir


# -- pipelines from the hub's own config files ------------------------------------------------------------------------
HUB_CONFIGS = Path(__file__).resolve().parents[2] / "tests" / "data" / "karlo-hub"
HUB_FOLDERS = ("karlo-v1-alpha", "karlo-v1-alpha-image-variations")


def hub_configs(root: str | Path = HUB_CONFIGS) -> dict[str, dict[str, dict]]:
    """{folder: {relative path: the JSON object}} of the hub's config files (tests/data/karlo-hub)."""
    root = Path(root)
    return {folder: {str(p.relative_to(root / folder)): json.loads(p.read_text(encoding="utf-8"))
                     for p in sorted((root / folder).rglob("*.json"))} for folder in HUB_FOLDERS}


# Layer counts and widths of the reduced pipelines, and the sizes halved (decoder 64 -> 32 px, super-res 256 -> 128 px:
# a float64 run of the whole pipeline then takes seconds); everything else stays as the hub's files have it (4 levels
# with multipliers 1-2-3-4, attention at three levels with 64-wide heads, learned-range variance, the legacy eos id, the
# old key sets, super_res_last's null sample_size, the x4 super-resolution).
REDUCED = {
    "text_encoder/config.json": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, projection_dim=64),
    "image_encoder/config.json": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, projection_dim=64),
    "prior/config.json": dict(num_attention_heads=2, num_layers=2, embedding_dim=64),
    "text_proj/config.json": dict(clip_embeddings_dim=64, cross_attention_dim=96, time_embed_dim=256),
    "decoder/config.json": dict(block_out_channels=[64, 128, 192, 256], layers_per_block=2, cross_attention_dim=96, sample_size=32),
    "super_res_first/config.json": dict(block_out_channels=[32, 64, 96, 128], layers_per_block=2, sample_size=128),
    "super_res_last/config.json": dict(block_out_channels=[32, 64, 96, 128], layers_per_block=2),
}


def reduce(configs: dict[str, dict[str, dict]], changes: dict[str, dict] = REDUCED) -> dict[str, dict[str, dict]]:
    """The hub's configs with layer counts and widths replaced (the keys each file has are kept as they are)."""
    return {folder: {rel: {**cfg, **changes.get(rel, {})} for rel, cfg in files.items()} for folder, files in configs.items()}


COMPONENTS = ("text_encoder", "image_encoder", "prior", "text_proj", "decoder", "super_res_first", "super_res_last")


def _component(name: str, configs: dict[str, dict[str, dict]]):
    """One network built by diffusers' or transformers' own class from its hub config (random weights)."""
    from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModelWithProjection

    from unclip_cli.convert.verify import text_proj_class

    main, variation = (configs[f] for f in HUB_FOLDERS)
    if name == "text_encoder":
        return CLIPTextModelWithProjection(CLIPTextConfig.from_dict(main["text_encoder/config.json"]))
    if name == "image_encoder":
        return CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(variation["image_encoder/config.json"]))
    cls = {"prior": PriorTransformer, "text_proj": text_proj_class(), "decoder": UNet2DConditionModel,
           "super_res_first": UNet2DModel, "super_res_last": UNet2DModel}[name]
    return cls.from_config(main[f"{name}/config.json"])


def _tokenizer_and_schedulers(configs: dict[str, dict[str, dict]]):
    import tempfile

    from diffusers import UnCLIPScheduler
    from transformers import CLIPImageProcessor, CLIPTokenizer

    main, variation = (configs[f] for f in HUB_FOLDERS)
    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = _bpe_files(Path(tmp))
        tokenizer = CLIPTokenizer(str(vocab), str(merges), pad_token="!", model_max_length=77)
    schedulers = {name: UnCLIPScheduler.from_config(main[f"{name}/scheduler_config.json"])
                  for name in ("prior_scheduler", "decoder_scheduler", "super_res_scheduler")}
    fe = variation["feature_extractor/preprocessor_config.json"]
    processor = CLIPImageProcessor(size={"shortest_edge": fe["size"]}, crop_size={"height": fe["crop_size"], "width": fe["crop_size"]},
                                   resample=fe["resample"], image_mean=fe["image_mean"], image_std=fe["image_std"])
    return tokenizer, schedulers, processor


def build_from_configs(configs: dict[str, dict[str, dict]], seed: int = 0, device: str | torch.device = "cpu", dtype=torch.float32):
    """An UnCLIPPipeline and an UnCLIPImageVariationPipeline built by diffusers' and transformers' classes from config
    files as the hub holds them (`hub_configs`, maybe `reduce`d), with random weights (constants randomised too)."""
    from diffusers import UnCLIPImageVariationPipeline, UnCLIPPipeline

    from unclip_cli.convert.verify import quiet_libraries

    quiet_libraries()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    nets = {}
    with torch.device(device):
        for name in COMPONENTS:
            nets[name] = _component(name, configs)
            randomise_constants(nets[name], g)
            nets[name] = nets[name].to(dtype).eval()
    tokenizer, schedulers, processor = _tokenizer_and_schedulers(configs)
    shared = dict(decoder=nets["decoder"], text_proj=nets["text_proj"], text_encoder=nets["text_encoder"], tokenizer=tokenizer,
                  super_res_first=nets["super_res_first"], super_res_last=nets["super_res_last"])
    pipe = UnCLIPPipeline(prior=nets["prior"], **shared, **schedulers)
    var = UnCLIPImageVariationPipeline(**shared, feature_extractor=processor, image_encoder=nets["image_encoder"],
                                       decoder_scheduler=schedulers["decoder_scheduler"], super_res_scheduler=schedulers["super_res_scheduler"])
    return pipe, var


def write_hub_folders(configs: dict[str, dict[str, dict]], root: str | Path, seed: int = 0, dtype=torch.float16,
                      progress=None) -> tuple[Path, Path]:
    """The two hub folders with random weights, written one network at a time (the full-size set never whole in
    memory): what a user's download of kakaobrain/karlo-v1-alpha and its image-variation repository holds, but random."""
    from unclip_cli.convert.verify import quiet_libraries

    quiet_libraries()
    root = Path(root)
    folders = [root / "karlo", root / "karlo-variations"]
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    for name in COMPONENTS:
        if progress:
            progress(name)
        net = _component(name, configs)
        randomise_constants(net, g)
        net = net.to(dtype)
        for folder in folders[1:] if name == "image_encoder" else folders[:1] if name == "prior" else folders:
            net.save_pretrained(folder / name, safe_serialization=True)
        del net
    tokenizer, schedulers, processor = _tokenizer_and_schedulers(configs)
    for folder, files in zip(folders, (configs[f] for f in HUB_FOLDERS)):
        tokenizer.save_pretrained(folder / "tokenizer")
        for rel, cfg in files.items():  # the hub's texts over whatever the classes wrote
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return folders[0], folders[1]


def save_as_hub(pipe, var, configs: dict[str, dict[str, dict]], root: str | Path, **kwargs) -> tuple[Path, Path]:
    """`save`, then every config file written back as the hub has it (diffusers' save writes today's key sets)."""
    src, var_dir = save(pipe, var, root, **kwargs)
    for folder, files in zip((src, var_dir), (configs[f] for f in HUB_FOLDERS)):
        for rel, cfg in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return src, var_dir
