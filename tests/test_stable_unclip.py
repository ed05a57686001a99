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


# -- whole pipelines, float64, the same injected noise ------------------------------------------------------------
@pytest.fixture(scope="module")
def su64(su_dirs, su_set):
    import diffusers.schedulers.scheduling_ddpm as ddpm

    from test_karlo import Draws, run_with_draws

    from unclip_cli.engine import Engine

    img2img = su_dirs[0].to(torch.float64)
    text2img = random_stable_unclip.text_to_image(img2img, su_dirs[1].to(torch.float64))
    modules = [ddpm] + [__import__(type(p).__module__, fromlist=["x"]) for p in (img2img, text2img)]
    ours = Engine.load(su_set, device="cpu", dtype=torch.float64)

    def theirs(fn, seed):
        draws = Draws(seed)
        saved = [m.randn_tensor for m in modules]
        for m in modules:
            m.randn_tensor = lambda shape, **kw: draws(shape)
        try:
            out = fn()
        finally:
            for m, f in zip(modules, saved):
                m.randn_tensor = f
        return torch.from_numpy(out.images), draws.sizes

    def mine(request, seed, monkeypatch):
        return run_with_draws(ours, request, Draws(seed), monkeypatch)

    return img2img, text2img, ours, theirs, mine


def _square(seed=2, size=32):
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8))


@pytest.mark.parametrize("level, prompt", [(0, ""), (600, ""), (0, "a horse")])
def test_img2img_vary_end_to_end_matches_diffusers_in_float64(level, prompt, su64, monkeypatch):
    """diffusers' StableUnCLIPImg2ImgPipeline (guidance 10, DDIM eta 0; its prompt empty, or a caption for the decoder)
    against `vary` from fresh noise."""
    import dataclasses

    from unclip_cli.requests import VaryRequest

    img2img, _, ours, theirs, mine = su64
    monkeypatch.setattr(ours, "sampling", dataclasses.replace(ours.sampling, noise_level=level))
    img = _square()
    ref, ref_draws = theirs(lambda: img2img(image=img, prompt=prompt, num_inference_steps=4, noise_level=level, output_type="np"), seed=3)
    out, draws = mine(VaryRequest(image=img, seed=0, strength=1.0, decoder_steps=4, prompt=prompt), seed=3, monkeypatch=monkeypatch)
    assert draws == ref_draws  # the embedding's noise, then the latent's, in the same order
    assert out.shape == ref.shape == (1, 32, 32, 3)
    assert (out - ref).abs().max() <= 1e-6
    assert ref.std() > 0.02


def test_text_to_image_end_to_end_matches_diffusers_in_float64(su64, monkeypatch):
    """diffusers' StableUnCLIPPipeline: Karlo's prior under DDPM with its cosine schedule (guidance 4), then the latent
    decoder (guidance 10). (The 4.7e-3 this test once showed was diffusers' DDPM scheduler on linear betas: see
    random_stable_unclip.text_to_image.)"""
    from unclip_cli.requests import GenerateRequest

    _, text2img, ours, theirs, mine = su64
    ref, ref_draws = theirs(lambda: text2img("a horse", num_images_per_prompt=2, prior_num_inference_steps=5, num_inference_steps=4,
                                             output_type="np"), seed=5)
    out, draws = mine(GenerateRequest(prompt="a horse", n=2, seed=0, prior_steps=5, decoder_steps=4), seed=5, monkeypatch=monkeypatch)
    assert draws == ref_draws
    assert out.shape == ref.shape == (2, 32, 32, 3)
    assert (out - ref).abs().max() <= 1e-6
    assert ref.std() > 0.02


# -- every operation on the converted set ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def su_engine(su_set):
    from unclip_cli.engine import Engine

    return Engine.load(su_set, device="cpu")


def test_every_operation_runs_and_edit_keeps_every_unmasked_pixel(su_engine):
    import numpy as np
    from PIL import Image

    from unclip_cli.requests import BlendRequest, EditRequest, GenerateRequest, MixRequest, NudgeRequest, VaryRequest

    a, b = _square(2, 40), _square(3, 24)
    few = dict(decoder_steps=2, seed=4)
    out = {req.op: su_engine.run(req) for req in (
        VaryRequest(image=a, strength=0.5, **few), BlendRequest(image_a=a, image_b=b, frames=3, **few),
        NudgeRequest(image=a, to="a horse", amount=0.5, **few), GenerateRequest(prompt="a horse", prior_steps=2, **few),
        MixRequest(images=[a], prompts=["a horse"], weights=[0.5, 0.5], prior_steps=2, noise_level=200, **few))}
    assert len(out["blend"].images) == 3 and all(r.images[0].size == (32, 32) for r in out.values())
    assert out["mix"].recipes[0]["noise_level"] == 200 and "noise_level" not in out["blend"].recipes[0]
    mask = np.zeros((24, 40), dtype=np.uint8)
    mask[4:14, 10:30] = 255
    photo = Image.fromarray((np.random.default_rng(5).random((24, 40, 3)) * 255).astype(np.uint8))
    edited = su_engine.run(EditRequest(image=photo, mask=Image.fromarray(mask), prompt="a horse", prior_steps=2, **few)).images[0]
    got, was = np.asarray(edited), np.asarray(photo)
    assert edited.size == photo.size and np.array_equal(got[mask == 0], was[mask == 0]) and not np.array_equal(got, was)


def test_vary_noise_level_from_the_cli_is_recorded_and_replays(su_set, tmp_path):
    import numpy as np
    from PIL import Image

    from unclip_cli.imageio import read_recipe

    img = tmp_path / "in.png"
    _square(6, 32).save(img)
    run = lambda out, *more: cli("vary", img, "--weights", su_set, "--seed", 3, "--strength", 1, "--decoder-steps", 2,  # noqa: E731
                                 "--out", tmp_path / out, "--json", "-q", *more)
    made = {}
    for out, more in (("own", ()), ("l300", ("--noise-level", 300))):
        r = run(out, *more)
        assert r.code == 0, r.err
        made[out] = json.loads(r.out)["images"][0]["path"]
    assert read_recipe(made["own"])["noise_level"] == 0 and read_recipe(made["l300"])["noise_level"] == 300
    pixels = lambda path: np.asarray(Image.open(path))  # noqa: E731
    assert not np.array_equal(pixels(made["own"]), pixels(made["l300"]))
    again = cli("vary", img, "--weights", su_set, "--from", made["l300"], "--out", tmp_path / "again", "--json", "-q")
    assert again.code == 0, again.err
    path = json.loads(again.out)["images"][0]["path"]
    assert read_recipe(path)["noise_level"] == 300 and np.array_equal(pixels(path), pixels(made["l300"]))
    bad = run("bad", "--noise-level", 1000)
    assert bad.code == 2 and "--noise-level must be between 0 and 999" in bad.err  # a usage mistake


def test_a_noise_level_is_refused_where_the_decoder_takes_none(tiny_weights, tmp_path):
    img = tmp_path / "in.png"
    _square(6, 32).save(img)
    r = cli("vary", img, "--weights", tiny_weights, "--noise-level", 100, "--out", tmp_path / "o", "-q")
    assert r.code == 1 and "--noise-level applies to decoders that read a noised image embedding" in r.err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_a_latent_set_decodes_at_a_smaller_size_recorded_in_the_recipe(su_engine, su_set, tiny_weights, tmp_path):
    """--size: the tiny set's native 32 px (a 16 x 16 latent, x2 autoencoder, two UNet levels) at 16 px."""
    import numpy as np
    from PIL import Image

    from unclip_cli.errors import InputError
    from unclip_cli.imageio import read_recipe
    from unclip_cli.requests import EditRequest, VaryRequest

    assert su_engine.sizes() == [8, 12, 16, 20, 24, 28, 32]
    out = su_engine.run(VaryRequest(image=_square(2, 40), strength=0.5, decoder_steps=2, seed=1, size=16))
    assert out.images[0].size == (16, 16) and out.recipes[0]["image_size"] == 16 and out.recipes[0]["size"] == [16, 16]
    assert su_engine.image_size == 32  # only while the request ran
    photo = Image.fromarray((np.random.default_rng(7).random((20, 30, 3)) * 255).astype(np.uint8))
    mask = np.zeros((20, 30), dtype=np.uint8)
    mask[5:15, 5:20] = 255
    edited = su_engine.run(EditRequest(image=photo, mask=Image.fromarray(mask), prompt="a horse", prior_steps=2, decoder_steps=2,
                                       seed=1, size=16)).images[0]
    assert edited.size == photo.size and np.array_equal(np.asarray(edited)[mask == 0], np.asarray(photo)[mask == 0])
    with pytest.raises(InputError, match="--size 18 is not a size .* 8 to 32 in steps of 4"):
        su_engine.run(VaryRequest(image=_square(), decoder_steps=2, size=18))
    img = tmp_path / "in.png"
    _square(6, 32).save(img)
    r = cli("vary", img, "--weights", su_set, "--size", 24, "--decoder-steps", 2, "--seed", 0, "--out", tmp_path / "a", "--json", "-q")
    assert r.code == 0, r.err
    made = json.loads(r.out)["images"][0]["path"]
    again = cli("vary", img, "--weights", su_set, "--from", made, "--out", tmp_path / "b", "--json", "-q")
    path = json.loads(again.out)["images"][0]["path"]
    assert Image.open(path).size == (24, 24) and read_recipe(path)["image_size"] == 24
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(made)))
    r = cli("generate", "a cat", "--weights", tiny_weights, "--size", 40, "--out", tmp_path / "c", "-q")
    assert r.code == 1 and "only its own" in r.err


def test_a_long_stage_gets_a_one_line_estimate_from_its_measured_steps():
    from unclip_cli.cli.progress import Estimate
    from unclip_cli.progress import Tick

    said, now = [], [0.0]
    est = Estimate(said.append, images=2, clock=lambda: now[0])

    def stage(name, total, first, each, batches=1):
        for step in range(1, total + 1):
            now[0] += first if step == 1 else each
            est(Tick(name, step, total, 1, batches))

    stage("prior", 25, 3.0, 0.5)  # 0.5 s a step: 11.5 s to go, nothing said
    stage("decoder", 20, 50.0, 31.5, batches=2)  # the first step's one-off costs are not counted
    assert said == ["decoder: 31.5 s per step (measured), 20 steps: about 5.2 min per image in this stage, 20 min to go"]


def test_serve_offers_variations_with_a_noise_level_and_edits(su_engine):
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    import base64
    import io

    import numpy as np
    from PIL import Image

    from unclip_cli.serve.app import Settings, create_app
    from unclip_cli.serve.server import running

    def png(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    app = create_app(su_engine, Settings(steps={"prior_steps": 2, "decoder_steps": 2}, allowed_hosts=("127.0.0.1", "localhost")))
    photo = Image.fromarray((np.random.default_rng(8).random((24, 32, 3)) * 255).astype(np.uint8))
    mask = np.zeros((24, 32), dtype=np.uint8)
    mask[4:12, 6:20] = 255
    with running(app) as (url, _), httpx.Client(base_url=url, timeout=60, trust_env=False) as c:
        r = c.post("/v1/images/variations", files={"image": png(photo)}, data={"noise_level": "250", "seed": "3", "response_format": "b64_json"})
        assert r.status_code == 200, r.text
        assert Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).size == (32, 32)
        r = c.post("/v1/images/variations", files={"image": png(photo)}, data={"noise_level": "1000"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "noise_level"
        r = c.post("/v1/images/edits", files={"image": png(photo), "mask": png(Image.fromarray(mask))},
                   data={"prompt": "a horse", "seed": "3", "response_format": "b64_json"})
        assert r.status_code == 200, r.text
        out = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).convert("RGB"))
        assert out.shape == (24, 32, 3) and np.array_equal(out[mask == 0], np.asarray(photo)[mask == 0])


def test_without_a_prior_vary_runs_and_edit_says_what_is_missing(su_dirs, tmp_path):
    from unclip_cli.engine import Engine
    from unclip_cli.errors import UnclipError
    from unclip_cli.requests import EditRequest, VaryRequest

    out = stable_unclip.convert(su_dirs[2], tmp_path / "no-prior", dtype=torch.float32)
    assert "`generate`, `edit`, `nudge`" in (out / "MODEL_CARD.md").read_text()
    e = Engine.load(out, device="cpu", offload="on")  # and stage by stage: only the network in use is held
    assert e.models.offload and e.run(VaryRequest(image=_square(), strength=1.0, decoder_steps=2, seed=0)).images[0].size == (32, 32)
    with pytest.raises(UnclipError, match="has no CLIP text encoder") as err:
        e.run(EditRequest(image=_square(), box=(0, 0, 0.5, 0.5), prompt="a horse", decoder_steps=2, seed=0))
    assert "--prior" in err.value.hint
