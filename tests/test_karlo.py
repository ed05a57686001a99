"""Karlo, converted: parity with diffusers on tiny random pipelines built with diffusers' own classes.

Each network is compared in float32 on the same random inputs (1e-5 relative); the whole text-to-image and
variation pipelines end to end in float64 with the same injected noise (1e-6): in float32, a tiny random
model's x_start at t = 999 multiplies rounding error by ~2e4, so only float64 tells a real difference from
rounding. Then every operation, the command line (--verify, --check) and the converter's refusals.
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from clirun import cli  # noqa: E402

from unclip_cli import engine as engine_mod  # noqa: E402
from unclip_cli.convert import karlo, random_karlo, verify  # noqa: E402
from unclip_cli.engine import Engine  # noqa: E402
from unclip_cli.errors import InputError, UnclipError  # noqa: E402
from unclip_cli.requests import BlendRequest, EditRequest, GenerateRequest, NudgeRequest, VaryRequest, request_from_recipe  # noqa: E402

FEW = dict(prior_steps=3, decoder_steps=3, upsampler_steps=2)


# karlo_dirs and karlo_set (the tiny random pipelines and their conversion) are in conftest.py.


@pytest.fixture(scope="session")
def karlo_engine(karlo_set):
    return Engine.load(karlo_set, device="cpu")


# -- each network, float32 -------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def differences(karlo_dirs, karlo_set):
    _, _, src, var_dir = karlo_dirs
    return verify.check(src, karlo_set, var_dir)


@pytest.mark.parametrize("network", ["text encoder", "image encoder", "prior", "decoder", "super-res first", "super-res last"])
def test_each_network_matches_diffusers_in_float32(network, differences):
    assert differences[network] <= 1e-5


def _altered_copy(src_set, dst, file, tensor):
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(src_set, dst)
    with safe_open(str(src_set / file), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[tensor] = tensors[tensor] * 1.5
    save_file(tensors, str(dst / file), metadata=meta)
    return dst


def test_tokens_match_huggingfaces_clip_tokenizer(karlo_dirs, karlo_engine):
    """Start 49406, end 49407, padding 0, `!` -> 0 (Karlo's padding token), 77 tokens, truncation."""
    pipe = karlo_dirs[0]
    clip = karlo_engine.models.clip.model
    prompts = ["a horse", "A Red  apple!", "wow!! great", "hello ! world", "", "café, 3.5 kg; x-ray", "cat " * 100]
    ours, _ = clip.tokenize(prompts)
    ref = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(ours, ref.input_ids)
    _, _, mask = clip.encode_text(ours)
    assert torch.equal(mask, ref.attention_mask.bool())


@pytest.mark.parametrize("size", [(32, 32), (50, 40), (40, 64)])
def test_image_preprocessing_matches_clip_image_processor(size, karlo_dirs, karlo_engine):
    """Shortest side, centre crop, OpenAI mean/std: equal at the encoder's size, within one grey level otherwise."""
    var = karlo_dirs[1]
    img = Image.fromarray((np.random.default_rng(1).random((size[1], size[0], 3)) * 255).astype(np.uint8))
    ours = karlo_engine.models.clip.model.image_pixels(img)
    ref = var.feature_extractor(images=img, return_tensors="pt").pixel_values
    one_level = 1 / 255 / min(0.26130258, 0.26862954, 0.27577711)
    assert (ours - ref).abs().max() <= (1e-6 if size == (32, 32) else one_level * 1.01)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_networks_match_and_float16_sampling_runs(karlo_dirs, karlo_set, differences):
    """On a GPU: each network in float32 beside its original (same kernels both sides), and every operation in fp16."""
    _, _, src, var_dir = karlo_dirs
    diffs = verify.check(src, karlo_set, var_dir, device="cuda")
    assert max(diffs.values()) <= 1e-4, diffs
    e = Engine.load(karlo_set, device="cuda")
    assert e.dtype == torch.float16
    img = Image.fromarray((np.random.default_rng(3).random((30, 40, 3)) * 255).astype(np.uint8))
    for req in (GenerateRequest(prompt="a cat", n=2, seed=1, **FEW), VaryRequest(image=img, seed=1, decoder_steps=3, upsampler_steps=2),
                VaryRequest(image=img, seed=1, strength=1.0, decoder_steps=3, upsampler_steps=2)):
        assert e.run(req).images[0].size == (e.image_size, e.image_size)


# -- whole pipelines, float64 --------------------------------------------------------------------------------------
class Draws:
    """One stream of float64 standard normals, handed out in the order asked for."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)
        self.sizes: list[int] = []

    def __call__(self, shape) -> torch.Tensor:
        self.sizes.append(int(np.prod(shape)))
        return torch.randn(tuple(shape), generator=self.g, dtype=torch.float64)


@pytest.fixture(scope="module")
def float64(karlo_dirs, karlo_set):
    return in_float64(karlo_dirs, karlo_set)


def run_with_draws(engine, request, draws, monkeypatch):
    """Run a request with every noise tensor taken from `draws` (a shared stream, as diffusers' pipelines draw it) in
    place of the engine's per-image generators: -> (the final images (B, H, W, 3) in [0, 1] before quantising, draws.sizes)."""
    finished = []

    class Noise:
        def __init__(self, seeds, device):
            self.n = len(seeds)

        def __call__(self, *shape):
            return draws((self.n, *shape))

    finish = Engine.to_images
    monkeypatch.setattr(engine_mod, "Noise", Noise)
    monkeypatch.setattr(Engine, "to_images", lambda self, x: finished.append(x) or finish(self, x))
    engine.run(request)
    return (finished[0] * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1), draws.sizes


def in_float64(dirs, converted):
    """diffusers' pipelines and our engine, both in float64; functions that run each with injected noise."""
    import diffusers.schedulers.scheduling_unclip as sched

    pipe, var = (p.to(torch.float64) for p in dirs[:2])
    pipelines = [sys.modules[type(p).__module__] for p in (pipe, var)]
    ours = Engine.load(converted, device="cpu", dtype=torch.float64)

    def theirs(fn, seed):
        draws = Draws(seed)
        fake = lambda shape, **kw: draws(shape)  # noqa: E731
        saved = [m.randn_tensor for m in (sched, *pipelines)]
        for m in (sched, *pipelines):
            m.randn_tensor = fake
        try:
            out = fn()
        finally:
            for m, f in zip((sched, *pipelines), saved):
                m.randn_tensor = f
        return torch.from_numpy(out.images), draws.sizes

    def mine(request, seed, monkeypatch):
        return run_with_draws(ours, request, Draws(seed), monkeypatch)

    return pipe, var, ours, theirs, mine


def test_text_to_image_end_to_end_matches_diffusers_in_float64(float64, monkeypatch):
    pipe, _, ours, theirs, mine = float64
    ref, ref_draws = theirs(lambda: pipe("a horse", num_images_per_prompt=2, prior_num_inference_steps=5, decoder_num_inference_steps=4,
                                         super_res_num_inference_steps=3, output_type="np"), seed=5)
    out, draws = mine(GenerateRequest(prompt="a horse", n=2, seed=0, prior_steps=5, decoder_steps=4, upsampler_steps=3), seed=5,
                      monkeypatch=monkeypatch)
    assert draws == ref_draws  # the same noise, drawn in the same order
    assert out.shape == ref.shape == (2, 32, 32, 3)
    assert (out - ref).abs().max() <= 1e-6
    assert ref.std() > 0.05  # not a saturated image, so the comparison means something


def test_variation_end_to_end_matches_diffusers_in_float64(float64, monkeypatch):
    """diffusers' variation: the image's raw z_i, the empty caption, fresh noise (our strength 1)."""
    _, var, ours, theirs, mine = float64
    img = Image.fromarray((np.random.default_rng(2).random((32, 32, 3)) * 255).astype(np.uint8))
    ref, ref_draws = theirs(lambda: var(image=img, num_images_per_prompt=2, decoder_num_inference_steps=4, super_res_num_inference_steps=3,
                                        output_type="np"), seed=7)
    out, draws = mine(VaryRequest(image=img, n=2, seed=0, strength=1.0, decoder_steps=4, upsampler_steps=3), seed=7, monkeypatch=monkeypatch)
    assert draws == ref_draws
    assert (out - ref).abs().max() <= 1e-6


def test_sampling_schedule_and_timesteps_are_diffusers(karlo_engine):
    from diffusers import UnCLIPScheduler

    ref = UnCLIPScheduler()
    for stage in (karlo_engine.models.prior, karlo_engine.models.decoder, karlo_engine.models.upsamplers[0]):
        assert torch.equal(stage.diffusion.alphas_cumprod, ref.alphas_cumprod)
    for n in (2, 3, 7, 25, 50):
        ref.set_timesteps(n)
        assert karlo_engine.timesteps(karlo_engine.models.decoder, n) == ref.timesteps.tolist()


# -- every operation on the converted set -------------------------------------------------------------------------
def _picture(w=40, h=30, seed=0):
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 256, 3)))
    ImageDraw.Draw(img).ellipse((5, 4, w - 8, h - 5), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return img


def test_quality_maps_onto_the_sets_own_steps_and_defaults(karlo_engine):
    req = GenerateRequest(prompt="a cat", seed=1, quality="fast", prior_steps=2, upsampler_steps=2).validated().under(karlo_engine.sampling)
    r = karlo_engine.recipe(req, 0)  # what a run records, without the run
    assert r["steps"] == {"prior": 2, "decoder": 15, "upsampler": 2, "decoder_candidates": 1}
    assert (r["guidance"], r["prior_guidance"]) == (8.0, 4.0)
    assert r["sampler"] == {"prior": "ancestral", "decoder": "ancestral", "upsampler": "ancestral from t=999"}
    s = GenerateRequest(prompt="x", quality="default").under(karlo_engine.sampling).steps
    assert (s.prior, s.decoder, s.upsampler) == (25, 25, 7)


@pytest.mark.parametrize("op", ["generate", "vary", "blend", "nudge", "edit"])
def test_every_operation_runs_and_its_recipe_replays_exactly(op, karlo_engine):
    a, b = _picture(seed=0), _picture(36, 36, seed=1)
    mask = Image.new("L", a.size, 0)
    ImageDraw.Draw(mask).rectangle((8, 6, 25, 20), fill=255)
    make = {
        "generate": lambda: GenerateRequest(prompt="a red apple", n=2, seed=3, **FEW),
        "vary": lambda: VaryRequest(image=a, n=2, seed=3, strength=0.5, decoder_steps=3, upsampler_steps=2),
        "blend": lambda: BlendRequest(image_a=a, image_b=b, frames=2, seed=3, decoder_steps=2, upsampler_steps=2),
        "nudge": lambda: NudgeRequest(image=a, to="a dog", n=2, seed=3, decoder_steps=3, upsampler_steps=2),
        "edit": lambda: EditRequest(image=a, mask=mask, prompt="a star", n=2, seed=3, **FEW),
    }[op]
    res = karlo_engine.run(make())
    assert len(res.images) == len(res.recipes) >= 2
    if op == "edit":  # Karlo has no inpainting channels: RePaint in decoder and super-res; outside the mask, the input
        keep = np.asarray(mask) < 128
        for img in res.images:
            assert img.size == a.size and np.array_equal(np.asarray(img)[keep], np.asarray(a)[keep])
            assert (np.asarray(img)[~keep] != np.asarray(a)[~keep]).any()
        assert res.recipes[0]["sampler"]["decoder"] == "repaint (ancestral)"
    else:
        assert all(img.size == (32, 32) for img in res.images)
    assert not np.array_equal(np.asarray(res.images[0]), np.asarray(res.images[1]))
    inputs = {"generate": {}, "blend": {"image_a": a, "image_b": b}, "edit": {"image": a, "mask": mask}}.get(op, {"image": a})
    again = karlo_engine.run(request_from_recipe(res.recipes[1], **inputs))
    assert np.array_equal(np.asarray(again.images[1 if op == "blend" else 0]), np.asarray(res.images[1]))


def test_nudge_keeps_the_raw_norm_of_z_i(karlo_engine):
    """Raw embeddings: the text direction is rescaled to |z_i|, so the slerp stays on z_i's sphere."""
    from unclip_cli.diffusion.samplers import slerp

    z_i = karlo_engine.encode_image(_picture())
    z_to = karlo_engine.encode_text(["a dog"])[0]
    z_from = karlo_engine.encode_text([""], allow_empty=True)[0]
    d = torch.nn.functional.normalize(z_to - z_from, dim=-1) * z_i.norm()
    assert slerp(z_i, d, 0.3).norm() == pytest.approx(z_i.norm().item(), rel=1e-5)
    assert abs(z_i.norm().item() - 1) > 1e-3  # the converted CLIP's embeddings are raw, not unit-norm


def test_repaint_resampling_jumps_keep_the_known_region():
    """RePaint with r = 3 resamplings on a toy denoiser: the known region ends exactly at the known image."""
    from unclip_cli.diffusion.gaussian import DiffusionConfig, GaussianDiffusion
    from unclip_cli.diffusion.samplers import sample_repaint

    d = GaussianDiffusion(DiffusionConfig(schedule_dtype="float32"))
    g = torch.Generator().manual_seed(0)
    known = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
    keep = torch.zeros(1, 1, 8, 8)
    keep[..., :4] = 1
    calls = []

    def denoise(x, t):
        calls.append(t)
        return x.clamp(-1, 1) * 0.5, x

    out = sample_repaint(denoise, torch.randn(1, 3, 8, 8, generator=g), [999, 500, 0], d, known=known, keep=keep,
                         randn=lambda: torch.randn(1, 3, 8, 8, generator=g), resample=3)
    assert torch.equal(out[..., :4], known[..., :4]) and not torch.equal(out, known)
    assert calls == [999] * 3 + [500] * 3 + [0]  # the last step (to the clean image) is not resampled


def test_a_set_converted_without_its_variation_folder(karlo_dirs, tmp_path):
    """Text-to-image works; operations that encode images say what is missing."""
    dst = karlo.convert(karlo_dirs[2], tmp_path / "text-only", dtype=torch.float32)
    e = Engine.load(dst, device="cpu")
    assert e.run(GenerateRequest(prompt="a cat", seed=1, prior_steps=2, decoder_steps=2, upsampler_steps=2)).images[0].size == (32, 32)
    with pytest.raises(UnclipError, match="no CLIP image encoder"):
        e.run(VaryRequest(image=_picture(), seed=1, decoder_steps=2, upsampler_steps=2))


def test_a_damaged_sampling_recipe_is_refused_naming_the_field(karlo_set, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from unclip_cli.errors import WeightsError

    copy = shutil.copytree(karlo_set, tmp_path / "set")
    with safe_open(str(copy / "decoder.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    extra = json.loads(meta["extra"])
    extra["sampling"]["decoder_sampler"] = "magic"
    save_file(tensors, str(copy / "decoder.safetensors"), metadata={**meta, "extra": json.dumps(extra)})
    with pytest.raises(WeightsError, match="sampling.*decoder_sampler"):
        Engine.load(copy, device="cpu")


def test_loading_is_lazy_and_info_reads_headers_only(karlo_set):
    e = Engine.load(karlo_set, device="cpu")
    info = e.info()
    assert not any(s.loaded for s in e.models.stages)
    assert set(info["stages"]) == {"clip", "prior", "decoder", "upsampler", "upsampler-last"}
    assert info["sampling"]["decoder_sampler"] == "ancestral" and info["image_size"] == 32
    assert sum(s["parameters"] for s in info["stages"].values()) == sum(p.numel() for s in e.models.stages for p in s.model.parameters())


# -- the command line and the converter's refusals ----------------------------------------------------------------------
def test_cli_convert_verify_and_check(karlo_dirs, tmp_path):
    _, _, src, var_dir = karlo_dirs
    dst = tmp_path / "k16"
    r = cli("convert", "karlo", src, "--variation", var_dir, "--to", dst, "--verify")
    assert r.code == 0, r.err
    for network in ("text encoder", "image encoder", "prior", "decoder", "super-res first", "super-res last"):
        assert network in r.out
    assert "DIFFERS" not in r.out and r.out.strip().endswith(str(dst))
    card = (dst / "MODEL_CARD.md").read_text()
    assert "creativeml-openrail-m" in card and "karlo" in card.lower()
    assert cli("convert", "karlo", src, "--variation", var_dir, "--to", dst).code == 1  # an existing set is not overwritten
    # One tensor altered in a copy: --check names the network that differs (so the parity above is not vacuous).
    bad = _altered_copy(dst, tmp_path / "altered", "decoder.safetensors", "up.0.0.in_layers.2.weight")
    r = cli("convert", "karlo", src, "--variation", var_dir, "--check", bad, "--json")
    assert r.code == 1 and "decoder" in r.err and "Error:" in r.err
    diffs = json.loads(r.out)["differences"]
    assert diffs["decoder"] > 1e-3 and diffs["prior"] <= 1e-5 and diffs["super-res last"] <= 1e-5


def test_cli_check_without_diffusers_says_how_to_install(karlo_dirs, karlo_set, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    r = cli("convert", "karlo", karlo_dirs[2], "--check", karlo_set)
    assert r.code == 1 and "pip install diffusers transformers" in r.err


def test_cli_usage_errors(karlo_dirs, tmp_path):
    src = karlo_dirs[2]
    assert cli("convert", "karlo", src).code == 2  # neither --to nor --check
    assert cli("convert", "karlo", src, "--to", tmp_path / "a", "--check", tmp_path).code == 2


@pytest.mark.parametrize("part", ["prior", "decoder", "text_proj", "super_res_last", "tokenizer", "decoder_scheduler", "model_index.json"])
def test_an_incomplete_folder_is_one_line_naming_the_missing_part(part, karlo_dirs, tmp_path):
    src = shutil.copytree(karlo_dirs[2], tmp_path / "karlo")
    target = src / part
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    r = cli("convert", "karlo", src, "--to", tmp_path / "out")
    errors = [line for line in r.err.splitlines() if line.startswith("Error:")]
    assert r.code == 1 and len(errors) == 1 and part in errors[0] and "Traceback" not in r.err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_missing_image_encoder_is_named(karlo_dirs, tmp_path):
    var = shutil.copytree(karlo_dirs[3], tmp_path / "var")
    shutil.rmtree(var / "image_encoder")
    with pytest.raises(InputError, match="image_encoder"):
        karlo.prepare(karlo_dirs[2], var)


def test_an_unsupported_config_field_is_named(karlo_dirs, tmp_path):
    src = shutil.copytree(karlo_dirs[2], tmp_path / "karlo")
    cfg = json.loads((src / "prior" / "config.json").read_text())
    (src / "prior" / "config.json").write_text(json.dumps({**cfg, "norm_in_type": "layer"}))
    with pytest.raises(InputError, match="norm_in_type"):
        karlo.prepare(src)


def test_bin_weights_are_read_with_weights_only(karlo_dirs, karlo_set, tmp_path):
    """A .bin component converts to the same tensors; a .bin that pickles code is refused, never run."""
    pipe, _, src, _ = karlo_dirs
    src = shutil.copytree(src, tmp_path / "karlo")
    (src / "prior" / "diffusion_pytorch_model.safetensors").unlink()
    state = {k: v.float() for k, v in pipe.prior.state_dict().items()}
    torch.save(state, src / "prior" / "diffusion_pytorch_model.bin")
    dst = karlo.convert(src, tmp_path / "from-bin", dtype=torch.float32)
    from safetensors.torch import load_file

    assert all(torch.equal(v, load_file(karlo_set / "prior.safetensors")[k]) for k, v in load_file(dst / "prior.safetensors").items())
    torch.save({"x": _Payload()}, src / "prior" / "diffusion_pytorch_model.bin")
    with pytest.raises(InputError, match="not a plain PyTorch state dict"):
        karlo.prepare(src)


class _Payload:
    def __reduce__(self):
        return (print, ("a pickle that runs code",))
