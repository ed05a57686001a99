"""Checkpoints and model sets: exact round trips, and every broken file fails with a WeightsError naming it."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from unclip_cli import checkpoint
from unclip_cli.errors import WeightsError
from unclip_cli.modelset import build_models, load_model_set, write_random_model_set
from unclip_cli.presets import load_preset

KINDS = ["clip", "prior", "decoder", "upsampler"]


@pytest.fixture(scope="module")
def models():
    """kind -> (model, config, diffusion, extra) for the tiny preset, with every tensor made non-trivial."""
    built = build_models(load_preset("tiny"), seed=0, uid_prefix="test")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model, *_ in built.values():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.01)  # zero-initialised layers would round-trip trivially
        built["clip"][0].fit_vocab(["a red circle", "a blue square", "红色的圆"])  # a non-default token_map buffer
        prior = built["prior"][0]
        prior.emb_mean.copy_(torch.randn(prior.emb_mean.shape, generator=g) * 0.1)  # the standardisation statistics
        prior.emb_std.copy_(torch.rand(prior.emb_std.shape, generator=g) + 0.05)
    return built


@pytest.fixture(scope="module")
def saved(models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for kind, (model, cfg, diffusion, extra) in models.items():
        paths[kind] = root / f"{kind}.safetensors"
        checkpoint.save(paths[kind], kind, model, cfg, diffusion, extra)
    return paths


def _raises_naming(path: Path, fn, match: str | None = None) -> WeightsError:
    with pytest.raises(WeightsError) as ei:
        fn()
    assert path.name in str(ei.value), f"error does not name the file: {ei.value}"
    if match:
        assert match in str(ei.value)
    return ei.value


def _copy(src: Path, dst_dir: Path, name: str | None = None) -> Path:
    dst = dst_dir / (name or src.name)
    shutil.copyfile(src, dst)
    return dst


def _rewrite_metadata(src: Path, dst: Path, **changes) -> Path:
    """The same tensors under edited metadata (as a hand-edited or mixed-up file would be)."""
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    meta.update(changes)
    save_file(load_file(str(src)), str(dst), metadata=meta)
    return dst


# -- round trips ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_is_exact(kind, models, saved):
    model, cfg, diffusion, extra = models[kind]
    ck = checkpoint.load(saved[kind], kind)
    assert ck.kind == kind and ck.path == saved[kind]
    assert ck.config == cfg and ck.diffusion == diffusion and ck.extra == extra
    assert type(ck.model) is type(model) and not ck.model.training
    want, got = model.state_dict(), ck.model.state_dict()
    assert set(want) == set(got)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), f"{k} differs after a round trip"


def test_load_without_kind_reads_it_from_the_file(saved):
    assert checkpoint.load(saved["prior"]).kind == "prior"


def test_a_shell_skips_initialisation_in_its_own_thread_only():
    # _build runs no nn.init function (they compute nothing on meta tensors but cost a third of building); a model
    # built meanwhile on another thread, and any built afterwards, is initialised as usual.
    torch.manual_seed(0)
    expected = torch.nn.Linear(3, 3).weight.detach().clone()
    other = {}

    def build_elsewhere():
        torch.manual_seed(0)
        other["weight"] = torch.nn.Linear(3, 3).weight.detach().clone()

    with checkpoint._no_init():
        untouched = torch.zeros(4)
        torch.nn.init.normal_(untouched)
        thread = threading.Thread(target=build_elsewhere)
        thread.start()
        thread.join()
    assert torch.equal(untouched, torch.zeros(4))
    assert torch.equal(other["weight"], expected)
    torch.manual_seed(0)
    assert torch.equal(torch.nn.Linear(3, 3).weight, expected)


def test_fp16_save_loads_as_rounded_fp32(models, tmp_path):
    model, cfg, diffusion, extra = models["decoder"]
    half, full = tmp_path / "half.safetensors", tmp_path / "full.safetensors"
    checkpoint.save(half, "decoder", model, cfg, diffusion, extra, dtype=torch.float16)
    checkpoint.save(full, "decoder", model, cfg, diffusion, extra)
    assert half.stat().st_size < 0.7 * full.stat().st_size
    stored = load_file(str(half))
    got = checkpoint.load(half, "decoder").model.state_dict()
    for k, v in model.state_dict().items():
        assert got[k].dtype == torch.float32
        if v.numel() >= 1024:
            assert stored[k].dtype == torch.float16
            assert torch.equal(got[k], v.half().float()), k
        else:
            assert stored[k].dtype == torch.float32
            assert torch.equal(got[k], v), k


def test_load_in_half_precision(saved):
    ck = checkpoint.load(saved["decoder"], "decoder", dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in ck.model.parameters())


def test_interrupted_write_leaves_nothing(tmp_path):
    target = tmp_path / "x.safetensors"

    def fail(tmp):
        Path(tmp).write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_write(target, fail)
    assert list(tmp_path.iterdir()) == []


# -- broken files -----------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    path = tmp_path / "decoder.safetensors"
    _raises_naming(path, lambda: checkpoint.load(path, "decoder"))


@pytest.mark.parametrize("kind", ["prior", "decoder"])
def test_truncated_file(kind, saved, tmp_path):
    data = saved[kind].read_bytes()
    for cut in (len(data) // 2, len(data) - 1, 100, 4, 0):
        path = tmp_path / f"{kind}.safetensors"
        path.write_bytes(data[:cut])
        _raises_naming(path, lambda: checkpoint.load(path, kind))


def test_garbage_bytes(tmp_path):
    path = tmp_path / "clip.safetensors"
    g = torch.Generator().manual_seed(0)
    for n in (16, 5000):
        path.write_bytes(bytes(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).tolist()))
        _raises_naming(path, lambda: checkpoint.load(path, "clip"))
    path.write_text("this is not a model\n" * 50)
    _raises_naming(path, lambda: checkpoint.load(path, "clip"))


def test_a_pickle_checkpoint_is_refused_not_loaded(models, tmp_path):
    path = tmp_path / "prior.safetensors"
    torch.save(models["prior"][0].state_dict(), path)
    _raises_naming(path, lambda: checkpoint.load(path, "prior"))


def test_corrupted_tensor_bytes(saved, tmp_path):
    """Flipped bytes inside the tensor data (header intact) may yield NaN/inf; those are refused."""
    data = bytearray(saved["decoder"].read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header: header + 64] = b"\xff" * 64  # 0xffffffff is a NaN in float32
    path = tmp_path / "decoder.safetensors"
    path.write_bytes(bytes(data))
    _raises_naming(path, lambda: checkpoint.load(path, "decoder"), match="NaN")


def test_safetensors_without_our_metadata(saved, tmp_path):
    tensors = load_file(str(saved["decoder"]))
    path = tmp_path / "decoder.safetensors"
    save_file(tensors, str(path))
    _raises_naming(path, lambda: checkpoint.load(path, "decoder"))
    save_file(tensors, str(path), metadata={"format": "pt"})
    _raises_naming(path, lambda: checkpoint.load(path, "decoder"))


def test_shape_mismatch_from_edited_config(saved, tmp_path):
    with safe_open(str(saved["decoder"]), framework="pt") as f:
        cfg = json.loads(f.metadata()["config"])
    path = tmp_path / "decoder.safetensors"
    _rewrite_metadata(saved["decoder"], path, config=json.dumps({**cfg, "model_channels": 32}))
    _raises_naming(path, lambda: checkpoint.load(path, "decoder"), match="shape")


def test_key_mismatch_from_edited_config(saved, tmp_path):
    with safe_open(str(saved["decoder"]), framework="pt") as f:
        cfg = json.loads(f.metadata()["config"])
    path = tmp_path / "decoder.safetensors"
    _rewrite_metadata(saved["decoder"], path, config=json.dumps({**cfg, "num_res_blocks": 2}))
    _raises_naming(path, lambda: checkpoint.load(path, "decoder"), match="keys")


def test_other_config_model_saved_under_the_same_name(models, tmp_path):
    """A prior of another width, saved with the tiny prior's config: every shape disagrees."""
    from unclip_cli.models.prior import Prior

    _, cfg, diffusion, extra = models["prior"]
    other = Prior(dataclasses.replace(cfg, width=48, heads=3))
    path = tmp_path / "prior.safetensors"
    checkpoint.save(path, "prior", other, cfg, diffusion, extra)
    _raises_naming(path, lambda: checkpoint.load(path, "prior"))


@pytest.mark.parametrize(
    "changes",
    [
        {"config": "{not json"},
        {"config": json.dumps({"image_size": 8, "no_such_field": 1})},
        {"diffusion": json.dumps({"timesteps": 1000, "sampler": "x"})},
        {"kind": "vae"},
        {"format_version": "99"},
    ],
    ids=["bad-json", "unknown-field", "unknown-diffusion-field", "unknown-kind", "newer-format"],
)
def test_bad_metadata(changes, saved, tmp_path):
    path = _rewrite_metadata(saved["decoder"], tmp_path / "decoder.safetensors", **changes)
    _raises_naming(path, lambda: checkpoint.load(path))


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda m: {**m, "format_version": "v2"}, id="non-numeric-format-version"),
        pytest.param(lambda m: {k: v for k, v in m.items() if k != "config"}, id="no-config"),
        pytest.param(lambda m: {k: v for k, v in m.items() if k != "kind"}, id="no-kind"),
    ],
)
def test_damaged_unclip_metadata(edit, saved, tmp_path):
    with safe_open(str(saved["decoder"]), framework="pt") as f:
        meta = edit(dict(f.metadata()))
    path = tmp_path / "decoder.safetensors"
    save_file(load_file(str(saved["decoder"])), str(path), metadata=meta)
    _raises_naming(path, lambda: checkpoint.load(path))


def test_wrong_kind(saved):
    _raises_naming(saved["decoder"], lambda: checkpoint.load(saved["decoder"], "prior"), match="prior")
    _raises_naming(saved["upsampler"], lambda: checkpoint.load(saved["upsampler"], "decoder"))


# -- model sets -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    return write_random_model_set(root / "a", seed=0), write_random_model_set(root / "b", seed=1)


def test_model_set_loads(two_sets):
    a, _ = two_sets
    ms = load_model_set(a)
    assert ms.base_size == 8 and ms.image_size == 16 and len(ms.upsamplers) == 1
    assert ms.prior.diffusion.parameterization.value == "x0"
    assert len(ms.model_hash) == 10 and ms.model_hash != load_model_set(two_sets[1]).model_hash


@pytest.mark.parametrize("swapped", ["prior", "decoder"])
def test_model_set_refuses_a_stage_trained_with_another_clip(swapped, two_sets, tmp_path):
    a, b = two_sets
    mixed = tmp_path / "mixed"
    shutil.copytree(a, mixed)
    shutil.copyfile(b / f"{swapped}.safetensors", mixed / f"{swapped}.safetensors")
    _raises_naming(mixed / f"{swapped}.safetensors", lambda: load_model_set(mixed), match="CLIP")


def test_model_set_with_a_missing_file(two_sets, tmp_path):
    incomplete = tmp_path / "incomplete"
    shutil.copytree(two_sets[0], incomplete)
    (incomplete / "decoder.safetensors").unlink()
    _raises_naming(incomplete / "decoder.safetensors", lambda: load_model_set(incomplete))


def test_model_set_folder_missing(tmp_path):
    _raises_naming(tmp_path / "nowhere", lambda: load_model_set(tmp_path / "nowhere"))


def test_model_set_refuses_an_upsampler_from_another_resolution(two_sets, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(two_sets[0], bad)
    ck = checkpoint.load(bad / "upsampler.safetensors")
    checkpoint.save(bad / "upsampler.safetensors", "upsampler", ck.model, ck.config, ck.diffusion, {**ck.extra, "low_res": 16})
    _raises_naming(bad / "upsampler.safetensors", lambda: load_model_set(bad), match="16")


def test_model_set_chains_several_upsamplers(two_sets, tmp_path):
    chained = tmp_path / "chained"
    shutil.copytree(two_sets[0], chained)
    ck = checkpoint.load(chained / "upsampler.safetensors")
    second = chained / "upsampler-2.safetensors"
    checkpoint.save(second, "upsampler", ck.model, ck.config, ck.diffusion, {**ck.extra, "low_res": 16})
    ms = load_model_set(chained)
    assert [u.path.name for u in ms.upsamplers] == ["upsampler.safetensors", "upsampler-2.safetensors"]
    assert ms.image_size == 32
    # The second stage takes what the first gives (16 px), or that image downsized by a whole factor.
    for low_res in (12, 32):
        checkpoint.save(second, "upsampler", ck.model, ck.config, ck.diffusion, {**ck.extra, "low_res": low_res})
        _raises_naming(second, lambda: load_model_set(chained), match=str(low_res))


def test_an_upsampler_may_take_the_previous_image_downsized(two_sets, tmp_path, monkeypatch):
    """emoji: 32 -> 128 by the first upsampler, then 128 -> 64 (antialiased) -> 256 by a stage trained on 64 px crops."""
    from unclip_cli.engine import Engine
    from unclip_cli.requests import GenerateRequest

    chained = tmp_path / "chained"
    shutil.copytree(two_sets[0], chained)
    ck = checkpoint.load(chained / "upsampler.safetensors")
    checkpoint.save(chained / "upsampler-2.safetensors", "upsampler", ck.model, ck.config, ck.diffusion, {**ck.extra, "low_res": 8})
    ms = load_model_set(chained)
    assert (ms.base_size, ms.image_size) == (8, 16)
    resized = []
    interpolate = torch.nn.functional.interpolate

    def spy(x, size=None, **kw):
        resized.append((x.shape[-1], size))
        return interpolate(x, size=size, **kw)

    monkeypatch.setattr(torch.nn.functional, "interpolate", spy)
    result = Engine(ms, torch.device("cpu"), torch.float32).run(GenerateRequest(prompt="a red circle", n=1, seed=0, quality="fast"))
    assert result.images[0].size == (16, 16) and result.recipes[0]["size"] == [16, 16]
    # 8 -> 16 (first stage's condition), 16 -> 8 (downsized for the second), 8 -> 16 (its condition)
    assert [r for r in resized if r[1] is not None] == [(8, (16, 16)), (16, (8, 8)), (8, (16, 16))]


@pytest.mark.parametrize("stored", [torch.float16, torch.float32, torch.bfloat16])
def test_nan_check_has_no_false_alarm_at_the_largest_finite_values(stored, tmp_path):
    """The check sums each tensor: a sum of the dtype's largest finite values must not overflow into a false alarm,
    while one NaN or inf anywhere is refused, whatever the dtype it is cast to."""
    big = torch.full((4096,), torch.finfo(stored).max, dtype=stored)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert checkpoint._cast(tmp_path, "w", big, dtype).dtype == dtype
        for bad in (float("nan"), float("inf"), float("-inf")):
            broken = big.clone()
            broken[1234] = bad
            with pytest.raises(WeightsError, match="NaN or inf"):
                checkpoint._cast(tmp_path, "w", broken, dtype)
