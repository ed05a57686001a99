"""Stable unCLIP as the hub holds it: pipelines built from the config files of stabilityai/stable-diffusion-2-1-unclip-small
and -unclip (tests/data/stable-unclip-hub) with layer counts and widths reduced, converted, and run; -small with a prior
from Karlo's hub configs (text-to-image), -unclip (wider ViT-H embeddings) refused with it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from clirun import cli  # noqa: E402

from unclip_cli.convert import random_stable_unclip as R  # noqa: E402
from unclip_cli.convert import stable_unclip  # noqa: E402
from unclip_cli.engine import Engine  # noqa: E402
from unclip_cli.requests import GenerateRequest, VaryRequest  # noqa: E402

SMALL, H = R.HUB_FOLDERS


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """{folder: the reduced pipeline's diffusers folder}, and Karlo's reduced prior folder."""
    root = tmp_path_factory.mktemp("su-hub")
    dirs = {}
    for k, folder in enumerate(R.HUB_FOLDERS):
        configs = R.reduce(R.hub_configs(folder))
        dirs[folder] = R.save_as_hub(R.build_from_configs(configs, seed=k), configs, root / folder)
    return dirs, R.save_karlo_prior(root / "karlo-v1-alpha", seed=2)


def test_the_fixture_keeps_what_the_hub_files_say(hub):
    dirs, karlo = hub
    for folder in R.HUB_FOLDERS:
        unet = json.loads((dirs[folder] / "unet" / "config.json").read_text())
        assert unet["_diffusers_version"] == "0.15.0.dev0" and unet["class_embed_type"] == "projection"
        assert unet["num_class_embeds"] is None and unet["time_cond_proj_dim"] is None and unet["timestep_post_act"] is None
        assert "addition_embed_type" not in unet and unet["upcast_attention"] is True and unet["layers_per_block"] == 1
        text = json.loads((dirs[folder] / "text_encoder" / "config.json").read_text())
        assert text["eos_token_id"] == 2 and text["hidden_act"] == "gelu" and text["projection_dim"] == 512
        fe = json.loads((dirs[folder] / "feature_extractor" / "preprocessor_config.json").read_text())
        assert fe["size"] == {"shortest_edge": 56} and fe["image_processor_type"] == "CLIPImageProcessor"
    vision = {f: json.loads((dirs[f] / "image_encoder" / "config.json").read_text()) for f in R.HUB_FOLDERS}
    assert vision[SMALL]["hidden_act"] == "quick_gelu" and vision[H]["hidden_act"] == "gelu"
    assert "beta_schedule" not in json.loads((karlo / "prior_scheduler" / "scheduler_config.json").read_text())


@pytest.fixture(scope="module")
def small_set(hub, tmp_path_factory):
    dirs, karlo = hub
    return stable_unclip.convert(dirs[SMALL], tmp_path_factory.mktemp("su-hub-set") / "small", prior=karlo, dtype=torch.float32)


def test_unclip_small_converts_and_runs_vary_and_generate(small_set):
    e = Engine.load(small_set, device="cpu")
    assert e.image_size == 64 and e.base_size == 8 and e.models.vae.config.factor == 8
    img = Image.fromarray((np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8))
    for req in (VaryRequest(image=img, seed=1, strength=1.0, decoder_steps=2),
                GenerateRequest(prompt="a red apple", seed=1, prior_steps=2, decoder_steps=2)):
        result = e.run(req)
        assert result.images[0].size == (64, 64) and np.asarray(result.images[0]).std() > 1


def test_unclip_h_converts_without_a_prior_and_refuses_karlo_s(hub, tmp_path):
    dirs, karlo = hub
    r = cli("convert", "stable-unclip", dirs[H], "--prior", karlo, "--to", tmp_path / "with-prior")
    assert r.code == 1 and "embedding_dim 64 does not fit" in r.err and "projection_dim 80" in r.err
    assert not (tmp_path / "with-prior").exists()
    out = stable_unclip.convert(dirs[H], tmp_path / "h", dtype=torch.float32)
    e = Engine.load(out, device="cpu")
    result = e.run(VaryRequest(image=Image.new("RGB", (64, 64), "teal"), seed=0, strength=1.0, decoder_steps=2))
    assert result.images[0].size == (64, 64)


def test_unclip_small_vary_matches_diffusers_in_float64(hub, small_set, monkeypatch):
    """The real layout (four levels, attention at three, upcast attention, the x8 autoencoder, the legacy text ids)
    against diffusers' StableUnCLIPImg2ImgPipeline loaded from the same folder, both in float64 with the same noise."""
    import diffusers.schedulers.scheduling_ddpm as ddpm
    from diffusers import StableUnCLIPImg2ImgPipeline
    from test_karlo import Draws, run_with_draws


    dirs, _ = hub
    pipe = StableUnCLIPImg2ImgPipeline.from_pretrained(dirs[SMALL]).to(torch.float64)
    pipe.set_progress_bar_config(disable=True)
    # At the image encoder's own size (56): resized, transformers' processor and ours (PIL's, as OpenAI's CLIP) differ by up
    # to a grey level (test_karlo's preprocessing test), which moves this output by 5e-4
    img = Image.fromarray((np.random.default_rng(3).random((56, 56, 3)) * 255).astype(np.uint8))
    draws = Draws(1)
    modules = (ddpm, __import__(type(pipe).__module__, fromlist=["x"]))
    for m in modules:
        monkeypatch.setattr(m, "randn_tensor", lambda shape, **kw: draws(shape))
    ref = torch.from_numpy(pipe(image=img, prompt="a horse", num_inference_steps=3, noise_level=300, output_type="np").images)
    ref_sizes = draws.sizes
    out, sizes = run_with_draws(Engine.load(small_set, device="cpu", dtype=torch.float64),
                                VaryRequest(image=img, seed=0, strength=1.0, decoder_steps=3, noise_level=300, prompt="a horse"), Draws(1), monkeypatch)
    assert sizes == ref_sizes and out.shape == ref.shape == (1, 64, 64, 3)
    assert (out - ref).abs().max() <= 1e-6 and ref.std() > 0.02


def test_unclip_small_with_karlo_s_prior_text_to_image_matches_diffusers_in_float64(hub, small_set, monkeypatch):
    """diffusers' StableUnCLIPPipeline assembled from the two hub-layout folders (Karlo's prior under DDPM with its cosine
    schedule, see random_stable_unclip.text_to_image) against `generate`, both in float64 with the same noise."""
    import diffusers.schedulers.scheduling_ddpm as ddpm
    from diffusers import PriorTransformer, StableUnCLIPImg2ImgPipeline, UnCLIPScheduler
    from test_karlo import Draws, run_with_draws
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer


    dirs, karlo = hub
    img2img = StableUnCLIPImg2ImgPipeline.from_pretrained(dirs[SMALL])

    class KarloParts:  # what random_stable_unclip.text_to_image reads of a Karlo pipeline
        tokenizer = CLIPTokenizer.from_pretrained(karlo, subfolder="tokenizer")
        text_encoder = CLIPTextModelWithProjection.from_pretrained(karlo, subfolder="text_encoder")
        prior = PriorTransformer.from_pretrained(karlo, subfolder="prior")
        prior_scheduler = UnCLIPScheduler.from_pretrained(karlo, subfolder="prior_scheduler")  # the class its file names

    pipe = R.text_to_image(img2img, KarloParts).to(torch.float64)
    assert pipe.prior_scheduler.config.beta_schedule == "squaredcos_cap_v2"
    pipe.set_progress_bar_config(disable=True)
    draws = Draws(2)
    for m in (ddpm, __import__(type(pipe).__module__, fromlist=["x"])):
        monkeypatch.setattr(m, "randn_tensor", lambda shape, **kw: draws(shape))
    ref = torch.from_numpy(pipe("a red apple", prior_num_inference_steps=3, num_inference_steps=3, output_type="np").images)
    ref_sizes = draws.sizes
    out, sizes = run_with_draws(Engine.load(small_set, device="cpu", dtype=torch.float64),
                                GenerateRequest(prompt="a red apple", seed=0, prior_steps=3, decoder_steps=3), Draws(2), monkeypatch)
    assert sizes == ref_sizes and out.shape == ref.shape == (1, 64, 64, 3)
    assert (out - ref).abs().max() <= 1e-6 and ref.std() > 0.02
