"""Karlo as the hub holds it: pipelines built from the hub's own config files (tests/data/karlo-hub) with layer counts
and widths reduced, converted, checked against diffusers (each network in float32, whole pipelines in float64) and run;
then hostile configs and weights, refused before any work with the file and the field named."""

from __future__ import annotations

import json
import os
import shutil
import stat

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from clirun import cli  # noqa: E402
from test_karlo import in_float64  # noqa: E402

from unclip_cli.convert import karlo, random_karlo, verify  # noqa: E402
from unclip_cli.engine import Engine  # noqa: E402
from unclip_cli.errors import InputError  # noqa: E402
from unclip_cli.requests import BlendRequest, EditRequest, GenerateRequest, NudgeRequest, VaryRequest  # noqa: E402

FEW = dict(prior_steps=2, decoder_steps=2, upsampler_steps=1)


@pytest.fixture(scope="session")
def hub_dirs(tmp_path_factory):
    """(pipe, var, src, var_dir): the hub's configs reduced, built by diffusers' classes, saved with the hub's own texts."""
    configs = random_karlo.reduce(random_karlo.hub_configs())
    pipe, var = random_karlo.build_from_configs(configs, seed=0)
    src, var_dir = random_karlo.save_as_hub(pipe, var, configs, tmp_path_factory.mktemp("hub"))
    return pipe, var, src, var_dir


@pytest.fixture(scope="session")
def hub_set(hub_dirs, tmp_path_factory):
    _, _, src, var_dir = hub_dirs
    return karlo.convert(src, tmp_path_factory.mktemp("hub-converted") / "karlo", variation=var_dir, dtype=torch.float32)


def test_the_fixture_keeps_what_the_hub_files_say(hub_dirs):
    """The converter reads the hub's texts, not today's diffusers' re-save of them."""
    _, _, src, var_dir = hub_dirs
    last = json.loads((src / "super_res_last" / "config.json").read_text())
    assert last["sample_size"] is None and "time_embedding_dim" not in last
    text = json.loads((src / "text_encoder" / "config.json").read_text())
    assert text["eos_token_id"] == 2 and text["transformers_version"] == "4.25.1"
    decoder = json.loads((src / "decoder" / "config.json").read_text())
    assert decoder["block_out_channels"] == [64, 128, 192, 256] and decoder["attention_head_dim"] == 64
    assert decoder["_diffusers_version"] == "0.12.0.dev0" and "addition_embed_type" not in decoder
    assert json.loads((var_dir / "feature_extractor" / "preprocessor_config.json").read_text())["size"] == 224


def test_hub_layout_converts_with_the_real_structure(hub_set):
    e = Engine.load(hub_set, device="cpu")
    dec, up = e.models.decoder.config, e.models.upsamplers[0]
    assert dec.channel_mult == (1, 2, 3, 4) and dec.attention_ds == (2, 4, 8) and dec.head_channels == 64 and dec.num_res_blocks == 2
    assert e.models.decoder.diffusion.variance == "learned_range" and dec.image_size == 32
    assert up.config.image_size == 128 and up.last is not None and e.image_size == 128
    assert e.models.sampling.prior_clamp == 5.0


@pytest.mark.parametrize("network", ["text encoder", "image encoder", "prior", "decoder", "super-res first", "super-res last"])
def test_each_network_matches_diffusers_in_float32(network, hub_dirs, hub_set):
    _, _, src, var_dir = hub_dirs
    assert _hub_differences(src, hub_set, var_dir)[network] <= 1e-5


_DIFFS: dict = {}


def _hub_differences(src, dst, var_dir):
    if not _DIFFS:
        _DIFFS.update(verify.check(src, dst, var_dir))
    return _DIFFS


@pytest.fixture(scope="module")
def hub64(hub_dirs, hub_set):
    return in_float64(hub_dirs, hub_set)


def test_text_to_image_end_to_end_matches_diffusers_in_float64(hub64, monkeypatch):
    pipe, _, _, theirs, mine = hub64
    ref, ref_draws = theirs(lambda: pipe("a horse", num_images_per_prompt=1, prior_num_inference_steps=2, decoder_num_inference_steps=2,
                                         super_res_num_inference_steps=2, output_type="np"), seed=5)
    out, draws = mine(GenerateRequest(prompt="a horse", n=1, seed=0, prior_steps=2, decoder_steps=2, upsampler_steps=2), seed=5,
                      monkeypatch=monkeypatch)
    assert draws == ref_draws and out.shape == ref.shape == (1, 128, 128, 3)
    assert (out - ref).abs().max() <= 1e-6 and ref.std() > 0.05


def test_variation_end_to_end_matches_diffusers_in_float64(hub64, monkeypatch):
    """Both from the same pixels: the processor's float32 normalisation rounds in another order than ours (2e-7, checked
    apart in test_karlo), and a float32 rounding difference grows to 2e-4 through the two stages' x_start."""
    _, var, ours, theirs, mine = hub64
    monkeypatch.setattr(type(ours.models.clip.model), "image_pixels",
                        lambda self, im: var.feature_extractor(images=im, return_tensors="pt").pixel_values)
    img = Image.fromarray((np.random.default_rng(2).random((224, 224, 3)) * 255).astype(np.uint8))
    ref, ref_draws = theirs(lambda: var(image=img, num_images_per_prompt=1, decoder_num_inference_steps=2, super_res_num_inference_steps=2,
                                        output_type="np"), seed=7)
    out, draws = mine(VaryRequest(image=img, n=1, seed=0, strength=1.0, decoder_steps=2, upsampler_steps=2), seed=7,
                      monkeypatch=monkeypatch)
    assert draws == ref_draws and (out - ref).abs().max() <= 1e-6


def _picture(w=80, h=64, seed=0):
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 256, 3)))
    ImageDraw.Draw(img).ellipse((8, 6, w - 12, h - 8), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return img


@pytest.mark.parametrize("op", ["generate", "vary", "blend", "nudge", "edit", "edit-one-step"])
def test_every_operation_runs_on_the_hub_layout(op, hub_set):
    e = Engine.load(hub_set, device="cpu")
    a, b = _picture(), _picture(64, 64, seed=1)
    mask = Image.new("L", a.size, 0)
    ImageDraw.Draw(mask).rectangle((20, 16, 50, 40), fill=255)
    req = {
        "generate": lambda: GenerateRequest(prompt="a red apple", n=1, seed=3, **FEW),
        "vary": lambda: VaryRequest(image=a, n=1, seed=3, strength=0.5, decoder_steps=2, upsampler_steps=1),
        "blend": lambda: BlendRequest(image_a=a, image_b=b, frames=2, seed=3, decoder_steps=2, upsampler_steps=1),
        "nudge": lambda: NudgeRequest(image=a, to="a dog", n=1, seed=3, decoder_steps=2, upsampler_steps=1),
        "edit": lambda: EditRequest(image=a, mask=mask, prompt="a star", n=1, seed=3, **FEW),
        # One decoder step goes straight to the clean image: its posterior variance is 0, whose log made the learned
        # range NaN on this layout.
        "edit-one-step": lambda: EditRequest(image=a, mask=mask, prompt="a star", n=1, seed=3, prior_steps=1, decoder_steps=1, upsampler_steps=1),
    }[op]()
    res = e.run(req)
    for img in res.images:
        arr = np.asarray(img)
        assert arr.std() > 0
        if op.startswith("edit"):
            keep = np.asarray(mask) < 128
            assert img.size == a.size and np.array_equal(arr[keep], np.asarray(a)[keep])
        else:
            assert img.size == (128, 128)


# -- hostile configs: refused within moments, the file and the field named, nothing written -------------------------------
@pytest.fixture()
def tiny_copy(karlo_dirs, tmp_path):
    """A copy of the tiny random Karlo folders; each case then edits its configs or weights."""
    _, _, src, var_dir = karlo_dirs
    return shutil.copytree(src, tmp_path / "src" / "karlo"), shutil.copytree(var_dir, tmp_path / "src" / "karlo-variations")


def _edit(folder, rel, **changes):
    path = folder / rel
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


HOSTILE = [
    ("prior/config.json", {"num_layers": 1_000_000_000}, "num_layers"),
    ("prior/config.json", {"num_layers": 3}, "num_layers"),  # in range, but the weights hold 1 block
    ("decoder/config.json", {"layers_per_block": 100_000}, "layers_per_block"),
    ("decoder/config.json", {"layers_per_block": 2}, "layers_per_block"),
    ("prior/config.json", {"num_attention_heads": "four"}, "num_attention_heads"),
    ("prior/config.json", {"embedding_dim": True}, "embedding_dim"),
    ("prior/config.json", {"attention_head_dim": -12}, "attention_head_dim"),
    ("decoder/config.json", {"block_out_channels": [32, "64"]}, "block_out_channels"),
    ("decoder/config.json", {"block_out_channels": [64, 128]}, "block_out_channels"),
    ("decoder/config.json", {"sample_size": "16"}, "sample_size"),
    ("decoder/config.json", {"cross_attention_dim": 1e300}, "cross_attention_dim"),
    ("super_res_first/config.json", {"sample_size": None}, "sample_size"),
    ("text_encoder/config.json", {"hidden_size": 64}, "hidden_size"),
    ("text_encoder/config.json", {"num_hidden_layers": 10**12}, "num_hidden_layers"),
    ("text_encoder/config.json", {"intermediate_size": 100}, "intermediate_size"),
    ("text_proj/config.json", {"clip_extra_context_tokens": 5}, "clip_extra_context_tokens"),
    ("prior_scheduler/scheduler_config.json", {"clip_sample_range": "5"}, "clip_sample_range"),
]


@pytest.mark.parametrize("rel,changes,field", HOSTILE, ids=[f"{r.split('/')[0]}-{f}-{i}" for i, (r, _, f) in enumerate(HOSTILE)])
def test_a_hostile_config_is_refused_naming_file_and_field(rel, changes, field, tiny_copy, tmp_path):
    src, _ = tiny_copy
    _edit(src, rel, **changes)
    r = cli("convert", "karlo", src, "--to", tmp_path / "out")
    errors = [line for line in r.err.splitlines() if line.startswith("Error:")]
    assert r.code == 1 and len(errors) == 1 and "Traceback" not in r.err, r.err
    assert rel.split("/")[0] in errors[0] and field in errors[0] and "bug" not in errors[0]
    assert not (tmp_path / "out").exists()


def test_a_deeply_nested_model_index_is_a_clear_error(tiny_copy, tmp_path):
    src, _ = tiny_copy
    (src / "model_index.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    r = cli("convert", "karlo", src, "--to", tmp_path / "out")
    assert r.code == 1 and "model_index.json" in r.err and "bug" not in r.err and "Traceback" not in r.err


def test_nan_or_inf_weights_are_refused_naming_the_tensor(tiny_copy, tmp_path):
    from safetensors.torch import load_file, save_file

    src, _ = tiny_copy
    f = src / "decoder" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(f)
    tensors["conv_out.bias"][1] = float("inf")
    save_file(tensors, f)
    r = cli("convert", "karlo", src, "--to", tmp_path / "out")
    assert r.code == 1 and "conv_out.bias" in r.err and "NaN or infinite" in r.err
    assert not (tmp_path / "out").exists()  # the files written before it are gone, and the folder it made


def test_the_destination_is_checked_before_any_work(tiny_copy, tmp_path, monkeypatch):
    src, var_dir = tiny_copy
    monkeypatch.setattr(karlo, "prepare", lambda *a, **k: pytest.fail("converted before checking --to"))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    a_file = tmp_path / "file.safetensors"
    a_file.write_text("x")
    for to, extra, words in ((busy, (), "not empty"), (src, ("--force",), "inside the source"), (src / "prior", ("--force",), "inside the source"),
                             (var_dir / "new", (), "inside the source"), (a_file, (), "is a file")):
        r = cli("convert", "karlo", src, "--variation", var_dir, "--to", to, *extra)
        assert r.code == 1 and words in r.err, (to, r.err)
    assert (busy / "notes.txt").read_text() == "mine" and a_file.read_text() == "x"


def test_written_files_follow_the_umask(tiny_copy, tmp_path):
    src, _ = tiny_copy
    old = os.umask(0o022)
    try:
        dst = karlo.convert(src, tmp_path / "set", dtype=torch.float32)
        busy = tmp_path / "busy"
        busy.mkdir()
        (busy / "notes.txt").write_text("mine")
        karlo.convert(src, busy, dtype=torch.float32, force=True)  # --force writes beside files that are not ours
    finally:
        os.umask(old)
    for f in [*dst.iterdir(), *busy.iterdir()]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    assert (busy / "notes.txt").read_text() == "mine" and (busy / "prior.safetensors").is_file()


def test_clip_towers_of_any_mlp_width(tmp_path):
    """intermediate_size need not be 4 x hidden_size (Karlo's is; other CLIPs differ): converted and equal."""
    changes = {"text_encoder/config.json": dict(hidden_size=32, intermediate_size=80, num_hidden_layers=1, num_attention_heads=2, projection_dim=32),
               "image_encoder/config.json": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                                 projection_dim=32, image_size=28, patch_size=14),
               "prior/config.json": dict(num_attention_heads=1, attention_head_dim=32, num_layers=1, embedding_dim=32),
               "text_proj/config.json": dict(clip_embeddings_dim=32, cross_attention_dim=32, time_embed_dim=128),
               "decoder/config.json": dict(block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=32, attention_head_dim=32,
                                           sample_size=8, down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
                                           up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"]),
               "super_res_first/config.json": dict(block_out_channels=[32, 64], layers_per_block=1, sample_size=16,
                                                   down_block_types=["ResnetDownsampleBlock2D"] * 2, up_block_types=["ResnetUpsampleBlock2D"] * 2),
               "super_res_last/config.json": dict(block_out_channels=[32, 64], layers_per_block=1,
                                                  down_block_types=["ResnetDownsampleBlock2D"] * 2, up_block_types=["ResnetUpsampleBlock2D"] * 2),
               "feature_extractor/preprocessor_config.json": dict(size=28, crop_size=28)}
    configs = random_karlo.reduce(random_karlo.hub_configs(), changes)
    pipe, var = random_karlo.build_from_configs(configs, seed=1)
    src, var_dir = random_karlo.save_as_hub(pipe, var, configs, tmp_path / "hub")
    dst = karlo.convert(src, tmp_path / "set", variation=var_dir, dtype=torch.float32)
    e = Engine.load(dst, device="cpu")
    assert (e.models.clip.config.text_mlp_width, e.models.clip.config.vision_mlp_width) == (80, 48)
    diffs = verify.check(src, dst, var_dir)
    assert diffs["text encoder"] <= 1e-5 and diffs["image encoder"] <= 1e-5


def test_old_clip_configs_without_the_mlp_width_still_load():
    from unclip_cli.checkpoint import config_from_dict
    from unclip_cli.models.clip import Clip, ClipConfig

    cfg = config_from_dict(ClipConfig, {"embed_dim": 16, "text_width": 32, "vision_width": 32, "vision_head_width": 16, "text_heads": 2,
                                        "text_layers": 1, "vision_layers": 1, "image_size": 16, "patch_size": 8, "vocab_size": 64})
    assert Clip(cfg).model.transformer.resblocks[0].mlp.c_fc.weight.shape == (128, 32)


def test_offload_keeps_one_network_alive_and_changes_no_pixel(karlo_set, monkeypatch):
    """When a network is read, no other is alive anywhere (held by a denoiser, say), but its upsampler companion; each
    is read once per run; and the pixels are those of a run with everything loaded."""
    import weakref

    from unclip_cli import checkpoint, modelset

    a = _picture()
    mask = Image.new("L", a.size, 0)
    ImageDraw.Draw(mask).rectangle((20, 16, 50, 40), fill=255)
    two = dict(prior_steps=1, decoder_steps=1, upsampler_steps=2)  # the first step super_res_first's, the last super_res_last's
    reqs = [GenerateRequest(prompt="a red apple", n=1, seed=3, **two), VaryRequest(image=a, seed=3, decoder_steps=1, upsampler_steps=2),
            EditRequest(image=a, mask=mask, prompt="a star", n=1, seed=3, **two)]
    whole = Engine.load(karlo_set, device="cpu", offload="off")
    assert not whole.models.offload
    expected = [whole.run(r).images for r in reqs]
    made, reads = [], []
    materialize = checkpoint.materialize

    def spy(header, *args, **kw):
        alive = sorted(name for name, ref in made if ref() is not None)
        reads.append((header.path.name, alive))
        model = materialize(header, *args, **kw)
        made.append((header.path.name, weakref.ref(model)))
        return model

    monkeypatch.setattr(modelset.checkpoint, "materialize", spy)
    staged = Engine.load(karlo_set, device="cpu", offload="on")
    assert staged.models.offload
    for r, images in zip(reqs, expected):
        before = len(reads)
        assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(staged.run(r).images, images))
        names = [name for name, _ in reads[before:]]
        assert len(names) == len(set(names)), names  # nothing read twice in one run
    assert {name for name, _ in reads} == {"clip.safetensors", "prior.safetensors", "decoder.safetensors", "upsampler.safetensors",
                                           "upsampler-last.safetensors"}
    for name, alive in reads:
        assert set(alive) <= ({"upsampler.safetensors"} if name == "upsampler-last.safetensors" else set()), (name, alive)


def test_offload_auto_follows_the_free_memory(hub_set, monkeypatch):
    from unclip_cli import modelset

    e = Engine.load(hub_set, device="cpu", offload="off")
    need = e.models.memory_needed()
    assert need == 4 * sum(s.parameters for s in e.models.stages)  # float32 on the CPU
    monkeypatch.setattr(modelset, "free_memory", lambda device: int(need / 0.7) + 1)
    assert not e.models.set_offload("auto")
    monkeypatch.setattr(modelset, "free_memory", lambda device: int(need / 0.7) - 1)
    assert e.models.set_offload("auto")


def test_cli_offload_says_so_and_writes_the_same_image(hub_set, tmp_path):
    args = ("generate", "a red apple", "--weights", hub_set, "--seed", "4", "--prior-steps", "1", "--decoder-steps", "1",
            "--upsampler-steps", "1")
    on = cli(*args, "--offload", "on", "--out", tmp_path / "on")
    off = cli(*args, "--offload", "off", "--out", tmp_path / "off")
    assert on.code == off.code == 0, on.err + off.err
    assert "stage by stage" in on.err and "stage by stage" not in off.err
    (a,), (b,) = (list((tmp_path / d).glob("*-0.png")) for d in ("on", "off"))
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_mix_keeps_raw_embeddings_at_the_parts_weighted_norm(hub_set):
    """Karlo's embeddings are raw, not unit-norm: a mix gets the weighted mean of its parts' norms."""
    from unclip_cli.requests import MixRequest

    e = Engine.load(hub_set, device="cpu")
    a, b = _picture(64, 64), _picture(64, 64, seed=1)  # square: the request's crop leaves them as they are
    z_a, z_b = e.encode_image(a)[0], e.encode_image(b)[0]
    res = e.run(MixRequest(images=[a, b], weights=[0.75, 0.5], seed=1, decoder_steps=1, upsampler_steps=1))
    want = torch.nn.functional.normalize(0.75 * z_a + 0.5 * z_b, dim=-1) * (0.75 * z_a.norm() + 0.5 * z_b.norm()) / 1.25
    assert torch.allclose(res.z_i[0], want, rtol=1e-5, atol=1e-6) and res.images[0].size == (128, 128)


def test_an_oversized_config_file_is_refused_unread(tiny_copy, tmp_path):
    src, _ = tiny_copy
    with open(src / "prior" / "config.json", "r+b") as f:
        f.seek(40 * 2**20)
        f.write(b" ")  # a sparse 40 MB file
    r = cli("convert", "karlo", src, "--to", tmp_path / "out")
    assert r.code == 1 and "prior" in r.err and "too large" in r.err
