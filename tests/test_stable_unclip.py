"""Stable unCLIP, converted: parity with diffusers on a tiny random pipeline built with diffusers' own classes
(shaped unlike diffusers' tests), per network in float32; the converter's refusals; the schedules."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from clirun import cli  # noqa: E402

from unclip_cli.convert import random_stable_unclip, stable_unclip, verify_stable_unclip  # noqa: E402
from unclip_cli.errors import InputError  # noqa: E402


@pytest.fixture(scope="session")
def su_dirs(tmp_path_factory):
    """(img2img pipeline, Karlo pipeline, the img2img folder, the Karlo folder)."""
    pipe, karlo_pipe = random_stable_unclip.build("tiny", seed=0)
    root = tmp_path_factory.mktemp("stable-unclip")
    return pipe, karlo_pipe, random_stable_unclip.save(pipe, root / "sd"), random_stable_unclip.save_karlo(karlo_pipe, root / "karlo")


@pytest.fixture(scope="session")
def su_set(su_dirs, tmp_path_factory):
    """Converted in float32, with Karlo's prior."""
    return stable_unclip.convert(su_dirs[2], tmp_path_factory.mktemp("converted") / "su", prior=su_dirs[3], dtype=torch.float32)


@pytest.fixture(scope="session")
def su_differences(su_dirs, su_set):
    return verify_stable_unclip.check(su_dirs[2], su_set, su_dirs[3])


@pytest.mark.parametrize("network", ["image encoder", "text encoder", "unet", "vae", "prior text encoder", "prior"])
def test_each_network_matches_diffusers_in_float32(network, su_differences):
    assert su_differences[network] <= 1e-5


def test_the_set_has_a_latent_decoder_and_its_recipe(su_set):
    from unclip_cli.modelset import load_model_set

    m = load_model_set(su_set)
    assert m.vae is not None and m.text is not None and m.prior is not None and not m.upsamplers
    assert m.base_size == 16 and m.image_size == 32  # a 16 x 16 latent, x2 autoencoder
    assert m.decoder.diffusion.cfg.parameterization == "v" and m.decoder.diffusion.cfg.final_alpha == "first"
    assert m.sampling.timestep_spacing == "leading1" and m.sampling.prior_spacing == "leading" and m.sampling.decoder_clamp == 0
    card = (su_set / "MODEL_CARD.md").read_text()
    assert "openrail++" in card and "Karlo" in card


def test_schedules_and_timesteps_are_diffusers(su_dirs, su_set):
    from unclip_cli.diffusion.schedule import spaced_timesteps
    from unclip_cli.modelset import load_model_set

    pipe, karlo_pipe = su_dirs[:2]
    m = load_model_set(su_set)
    assert torch.equal(m.decoder.diffusion.alphas_cumprod, pipe.scheduler.alphas_cumprod)
    from diffusers import DDPMScheduler

    prior_sched = DDPMScheduler.from_config(karlo_pipe.prior_scheduler.config)
    for n in (1, 3, 7, 20, 25, 50):
        pipe.scheduler.set_timesteps(n)
        assert spaced_timesteps(1000, n, spacing="leading1") == pipe.scheduler.timesteps.tolist()
        prior_sched.set_timesteps(n)
        assert spaced_timesteps(1000, n, spacing="leading") == prior_sched.timesteps.tolist()


def test_check_fails_after_one_tensor_is_altered(su_dirs, su_set, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    bad = shutil.copytree(su_set, tmp_path / "altered")
    with safe_open(str(bad / "decoder.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["down.0.1.block.attn2.to_k.weight"] = tensors["down.0.1.block.attn2.to_k.weight"] * 1.5
    save_file(tensors, str(bad / "decoder.safetensors"), metadata=meta)
    r = cli("convert", "stable-unclip", su_dirs[2], "--prior", su_dirs[3], "--check", bad, "--json")
    assert r.code == 1 and "unet" in r.err
    diffs = json.loads(r.out)["differences"]
    assert diffs["unet"] > 1e-3 and diffs["vae"] <= 1e-5


def test_cli_convert_verify_without_prior(su_dirs, tmp_path):
    dst = tmp_path / "img2img"
    r = cli("convert", "stable-unclip", su_dirs[2], "--to", dst, "--verify")
    assert r.code == 0, r.err
    assert "unet" in r.out and "DIFFERS" not in r.out and not (dst / "prior.safetensors").exists()
    assert cli("convert", "stable-unclip", su_dirs[2], "--to", dst).code == 1  # not overwritten


def test_a_prior_of_another_embedding_width_is_refused_before_any_work(su_dirs, tmp_path):
    """Karlo's prior makes 32-wide embeddings here; an image encoder projecting to 48 cannot take them."""
    src = random_stable_unclip.save(random_stable_unclip.build("wide")[0], tmp_path / "sd")
    r = cli("convert", "stable-unclip", src, "--prior", su_dirs[3], "--to", tmp_path / "out")
    assert r.code == 1 and "embedding_dim 32 does not fit" in r.err and "projection_dim 48" in r.err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("rel, changes, field", [
    ("unet/config.json", {"use_linear_projection": False}, "use_linear_projection"),
    ("unet/config.json", {"class_embed_type": "timestep"}, "class_embed_type"),
    ("unet/config.json", {"attention_head_dim": [3, 4]}, "attention_head_dim"),
    ("unet/config.json", {"layers_per_block": 2}, "layers_per_block"),
    ("vae/config.json", {"latent_channels": 8}, "latent_channels"),
    ("scheduler/scheduler_config.json", {"beta_schedule": "linear"}, "beta_schedule"),
    ("image_noising_scheduler/scheduler_config.json", {"beta_schedule": "linear"}, "beta_schedule"),
])
def test_a_hostile_config_is_refused_naming_file_and_field(rel, changes, field, su_dirs, tmp_path):
    src = shutil.copytree(su_dirs[2], tmp_path / "sd")
    cfg = json.loads((src / rel).read_text())
    (src / rel).write_text(json.dumps({**cfg, **changes}))
    with pytest.raises(InputError, match=field) as e:
        stable_unclip.prepare(src)
    assert rel.split("/")[0] in str(e.value)
