"""--precision: bf16 autocast on the CPU, recorded in recipes and replayed; `auto` from the CPU and the set's precision.json."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from unclip_cli import device
from unclip_cli.engine import Engine
from unclip_cli.errors import InputError
from unclip_cli.requests import GenerateRequest, VaryRequest, request_from_recipe

from test_engine import IMG_A

FEW = dict(prior_steps=2, decoder_steps=2, upsampler_steps=1, decoder_candidates=1)


def _arr(img) -> np.ndarray:
    return np.asarray(img).astype(int)


@pytest.fixture(scope="module")
def runs(tiny_engine):
    return {p: tiny_engine.run(GenerateRequest(prompt="a red circle", n=2, seed=3, precision=p, **FEW)) for p in ("fp32", "bf16")}


def test_bf16_rounds_differently_but_draws_the_same_picture(runs):
    a, b = runs["fp32"], runs["bf16"]
    diff = [np.abs(_arr(x) - _arr(y)) for x, y in zip(a.images, b.images)]
    assert any(d.max() > 0 for d in diff)  # autocast did run: bfloat16 rounds differently
    assert max(d.max() for d in diff) <= 16  # out of 255: the same picture (the tiny set: mean 0.3, at most 3)


def test_the_recipe_records_the_precision_and_a_replay_uses_it(runs, tiny_engine):
    for p, res in runs.items():
        assert [r["precision"] for r in res.recipes] == [p, p]
        again = request_from_recipe(res.recipes[1])
        assert again.precision == p
        out = tiny_engine.run(again)
        assert np.array_equal(_arr(out.images[0]), _arr(res.images[1])) and out.recipes[0] == res.recipes[1]


def test_a_recipe_from_before_the_field_replays_in_fp32(runs):
    old = {k: v for k, v in runs["fp32"].recipes[0].items() if k != "precision"}
    assert request_from_recipe(old).precision == "fp32"
    assert request_from_recipe({**old, "precision": "fp16"}).precision is None  # a GPU's: the engine's default
    with pytest.raises(InputError, match="recipe field 'precision'"):
        request_from_recipe({**old, "precision": "int8"})


def test_an_unknown_precision_is_an_input_error(tiny_engine):
    with pytest.raises(InputError, match="--precision"):
        GenerateRequest(prompt="x", precision="fp8").validated()
    with pytest.raises(InputError, match="precision"):
        Engine.load(tiny_engine.models.root, device="cpu", precision="half")


def test_requests_of_two_precisions_do_not_share_a_batch(tiny_engine):
    reqs = [VaryRequest(image=IMG_A, seed=1, precision=p, decoder_steps=2, upsampler_steps=1) for p in ("fp32", "bf16")]
    with pytest.raises(ValueError, match="share"):
        tiny_engine.run_many(reqs)


@pytest.mark.parametrize("content, native, expect", [
    (None, True, "fp32"),  # no measurement: fp32
    ('{"cpu_bf16": true}', True, "bf16"),
    ('{"cpu_bf16": true}', False, "fp32"),  # bf16 emulated is slower than fp32
    ('{"cpu_bf16": false}', True, "fp32"),
    ('{"cpu_bf16": "true"}', True, "fp32"),  # untrusted: only a JSON true counts
    ("[true]", True, "fp32"),
    ("{not json", True, "fp32"),
    ("[" * 100000, True, "fp32"),
])
def test_auto_picks_bf16_only_on_a_native_cpu_for_a_set_that_measured_it(content, native, expect, tiny_weights, tmp_path, monkeypatch):
    root = tmp_path / "set"
    shutil.copytree(tiny_weights, root)
    if content is not None:
        (root / device.PRECISION_FILE).write_text(content)
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: native)
    eng = Engine.load(root, device="cpu")
    assert eng.precision_of(GenerateRequest(prompt="x")) == expect
    assert eng.precision_of(GenerateRequest(prompt="x", precision="fp32")) == "fp32"  # asked for: as asked
    assert eng.precision_of(GenerateRequest(prompt="x", precision="bf16")) == "bf16"


def test_other_devices_and_dtypes_record_their_own(tiny_weights):
    assert device.resolve_precision("bf16", torch.device("cuda"), torch.float16, True) == "fp16"
    eng = Engine.load(tiny_weights, device="cpu", dtype=torch.float64)
    assert eng.precision_of(GenerateRequest(prompt="x", precision="bf16")) == "fp64"


def test_cpu_flags_are_read_from_the_flags_line(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    real = device.Path

    def fake(path):
        return info if str(path) == "/proc/cpuinfo" else real(path)

    monkeypatch.setattr(device, "Path", fake)
    for text, has in [("flags\t\t: fpu sse avx512f avx512bw\n", False), ("flags\t\t: fpu avx512_bf16 amx_tile\n", True),
                      ("Features\t: fp asimd bf16 i8mm\n", True), ("model name\t: bf16 marketing name\n", False)]:
        info.write_text(text)
        device.cpu_has_bf16.cache_clear()
        assert device.cpu_has_bf16() is has, text
    device.cpu_has_bf16.cache_clear()


def test_the_cli_takes_and_records_precision(tiny_weights, tmp_path):
    from clirun import cli

    res = cli("generate", "a red circle", "--weights", tiny_weights, "--precision", "bf16", "--seed", 1, "--out", tmp_path,
              "--prior-steps", 1, "--decoder-steps", 1, "--upsampler-steps", 1, "--json", "-q")
    assert res.code == 0, res.err
    assert json.loads(res.out)["images"][0]["recipe"]["precision"] == "bf16"
    bad = cli("generate", "x", "--weights", tiny_weights, "--precision", "fp8", "--out", tmp_path)
    assert bad.code != 0 and "fp8" in bad.err


def test_write_precision_allows_bf16_only_within_the_noise():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "write_precision.py"
    spec = importlib.util.spec_from_file_location("write_precision", path)
    wp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wp)
    fp32 = {"prompts": 200, "top1": 0.18, "top5": 0.385, "bands_px": ["8-16", "4-8"], "sharpness": [0.39, 0.36],
            "sharpness_se": [0.02, 0.02]}
    # top-5 noise at the mean rate 0.43: sqrt(2 * 0.43 * 0.57 / 200) = 0.050, so 0.09 is within two; sharpness: 0.028
    ok, rows = wp.decide(fp32, {**fp32, "top5": 0.475, "sharpness": [0.43, 0.33]})
    assert ok and [round(r["noise"], 3) for r in rows] == [0.038, 0.05, 0.028, 0.028]
    assert not wp.decide(fp32, {**fp32, "top5": 0.285})[0]  # 0.1 worse: beyond two noises
    assert not wp.decide(fp32, {**fp32, "sharpness": [0.30, 0.36]})[0]
