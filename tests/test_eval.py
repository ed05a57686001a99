"""Quality metrics on constructed cases with known answers, the batched runs against the engine, and one
quick end-to-end `unclip eval` on the tiny random model set with fixture shards."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from clirun import cli
from unclip_cli import evaluate as ev

# ---------------------------------------------------------------------------------------------------
# Retrieval


def test_perfect_retriever_scores_one_and_a_wrong_one_zero():
    scores = np.eye(10)
    positives = np.eye(10, dtype=bool)
    assert ev.retrieval(scores, positives) == {"top1": 1.0, "top5": 1.0}
    # Its own candidate always last: never in the top 5 of 10.
    assert ev.retrieval(-np.eye(10), positives) == {"top1": 0.0, "top5": 0.0}


def test_constant_retriever_scores_chance():
    positives = np.eye(20, dtype=bool)
    got = ev.retrieval(np.zeros((20, 20)), positives, ks=(1, 5))
    assert got["top1"] == pytest.approx(1 / 20) and got["top5"] == pytest.approx(5 / 20)
    # Two positives among 10, top 1: chance is 2/10; top 5: 1 - C(8,5)/C(10,5).
    pos2 = np.zeros((1, 10), dtype=bool)
    pos2[0, :2] = True
    assert ev.topk_hits(np.zeros((1, 10)), pos2, 1)[0] == pytest.approx(0.2)
    assert ev.topk_hits(np.zeros((1, 10)), pos2, 5)[0] == pytest.approx(1 - math.comb(8, 5) / math.comb(10, 5))


def test_topk_counts_only_strictly_better_negatives_and_splits_ties():
    s = np.array([[0.9, 0.5, 0.5, 0.5, 0.1]])
    pos = np.array([[False, True, False, False, False]])
    assert ev.topk_hits(s, pos, 1)[0] == 0.0  # one negative above
    assert ev.topk_hits(s, pos, 2)[0] == pytest.approx(1 / 3)  # one place among three tied
    assert ev.topk_hits(s, pos, 4)[0] == 1.0
    with pytest.raises(ValueError):
        ev.topk_hits(s, np.zeros_like(pos), 1)


def test_candidate_draws_put_own_first_are_distinct_and_reproducible():
    draws = ev.candidate_draws([3, 7, 3], 500, k=100, seed=0)
    assert draws.shape == (3, 100)
    assert list(draws[:, 0]) == [3, 7, 3]
    assert all(len(set(row)) == 100 for row in draws)
    assert 3 not in draws[0, 1:]
    assert (draws[0] == draws[2]).all()  # same concept, same draw
    assert (draws == ev.candidate_draws([3, 7, 3], 500, k=100, seed=0)).all()
    assert ev.candidate_draws([1], 5, k=100).shape == (1, 5)  # fewer concepts than k: all of them


def test_own_concept_rate_perfect_and_constant():
    emb = np.eye(50)
    draws = ev.candidate_draws(range(50), 50, k=10)
    assert ev.own_concept_hits(emb, emb, draws).mean() == 1.0
    const = np.ones((50, 50)) / np.sqrt(50)
    assert ev.own_concept_hits(const, const, draws).mean() == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------------
# Fréchet distance


def test_frechet_identical_sets_are_zero_and_shifted_means_give_the_squared_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 8))
    assert ev.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shift = np.arange(8) / 4
    assert ev.frechet_distance(a, a + shift) == pytest.approx(float((shift**2).sum()), rel=1e-8)


def test_frechet_covariance_term_against_a_closed_form():
    # b = 2a + c has mean 2 mu + c and covariance 4 S, so Tr(S + 4S - 2 (4 S^2)^(1/2)) = Tr S.
    rng = np.random.default_rng(1)
    a = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))  # correlated features
    c = np.full(6, 0.5)
    b = 2 * a + c
    expected = ((a.mean(0) + c) ** 2).sum() + np.trace(np.cov(a, rowvar=False))
    assert ev.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    # More dimensions than samples (rank-deficient covariances) still works.
    few = rng.normal(size=(5, 32))
    assert ev.frechet_distance(few, few) == pytest.approx(0.0, abs=1e-8)


# ---------------------------------------------------------------------------------------------------
# Sharpness: power in detail bands


def _disc(size: int) -> Image.Image:
    """A hard-edged dark disc on white, the kind of edge emoji are made of."""
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    grey = np.where(np.hypot(x, y) < size / 3, 40, 255).astype(np.uint8)
    return Image.fromarray(np.stack([grey] * 3, -1), "RGB")


def test_band_power_of_a_flat_image_is_zero_and_of_a_set_its_mean():
    flat = Image.new("RGB", (64, 64), (200, 30, 30))
    assert ev.band_power([flat], 64) == pytest.approx([0, 0, 0], abs=1e-20)
    disc = ev.band_power([_disc(64)], 64)
    assert (disc > 0).all()
    assert ev.band_power([_disc(64), flat], 64) == pytest.approx(disc / 2)


def test_band_power_falls_with_resolution_lost_most_in_the_finest_band():
    """A disc drawn at 64 px, and the same shown at 64 px after passing through 32 and 16 px."""
    sharp = ev.band_power([_disc(64)], 64)
    shares = [ev.band_power([_disc(64).resize((s, s), Image.Resampling.LANCZOS)], 64) / sharp for s in (32, 16)]
    for share in shares:
        assert (share < 1).all() and share[0] > share[1] > share[2]
    assert (shares[1] < shares[0]).all()
    assert shares[0][2] < 0.2 and shares[1][2] < 0.02  # detail finer than the image passed through is gone
    # White noise puts more power than the disc into the finest band: grain reads as too much, not as sharp.
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB")
    assert ev.band_power([noise], 64)[2] > 10 * sharp[2]


# ---------------------------------------------------------------------------------------------------
# Blend, edit, inversion


def test_blend_monotonicity():
    t = np.linspace(0, 1, 6)
    assert ev.blend_monotonicity(1 - t, t) == 1.0
    assert ev.blend_monotonicity(t, 1 - t) == 0.0  # backwards
    assert ev.blend_monotonicity([1, 0.5, 0.6, 0.2], [0, 0.5, 0.4, 0.9]) == pytest.approx(2 / 3)
    assert ev.blend_monotonicity([1, 1, 1], [0, 0, 0]) == 0.0  # standing still is not progress


def test_blend_progress():
    assert ev.blend_progress([1, 0.5, 0.6, 0.2], [0, 0.5, 0.4, 0.9]) == pytest.approx(2 / 3)
    # both similarities fall mid-blend, yet the frame moves toward B: progress, not monotone
    a, b = [1.0, 0.3, 0.1, 0.0], [0.0, 0.25, 0.2, 1.0]
    assert ev.blend_progress(a, b) == 1.0 and ev.blend_monotonicity(a, b) == pytest.approx(2 / 3)
    assert ev.blend_progress([1, 1, 1], [0, 0, 0]) == 0.0


def test_an_edit_that_touches_an_unmasked_pixel_is_caught():
    before = np.zeros((16, 16, 3), dtype=np.uint8)
    repaint = ev.center_mask(16)
    after = before.copy()
    after[repaint] = 200  # inside: allowed
    assert ev.pixels_changed_outside(before, after, repaint) == 0
    after[0, 0, 2] = 1  # one channel of one outside pixel
    assert ev.pixels_changed_outside(before, after, repaint) == 1
    assert ev.mask_box(repaint) == (4, 4, 12, 12)


def test_reconstruction_mse_is_on_the_unit_scale():
    x = torch.full((3, 4, 4), -1.0)
    assert ev.reconstruction_mse(x, x) == 0.0
    assert ev.reconstruction_mse(x, torch.ones_like(x)) == pytest.approx(1.0)  # black vs white


# ---------------------------------------------------------------------------------------------------
# The batched runs are the engine's operations


def _img(colour: str, shape: str, style: str, size: int = 32) -> Image.Image:
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    box = (6, 6, size - 6, size - 6)
    kw = {"fill": colour} if style == "flat" else {"outline": colour, "width": 3}
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, **kw)
    return img


def _close(a: Image.Image, b: Image.Image, tol: int = 2) -> bool:
    return int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max()) <= tol


def test_generate_batch_draws_what_the_command_draws(tiny_engine):
    """The runner batches requests across prompts; image i is `generate PROMPT --seed SEED` up to rounding."""
    from unclip_cli.requests import GenerateRequest

    e = tiny_engine
    base = GenerateRequest(prompt="-", prior_steps=2, decoder_steps=3, upsampler_steps=2, decoder_candidates=2)
    ims, z_i = ev.generate_batch(e, ["a red circle", "a blue square"], [5, 9], base)
    alone = e.run(GenerateRequest(prompt="a blue square", seed=9, prior_steps=2, decoder_steps=3, upsampler_steps=2, decoder_candidates=2))
    assert _close(ims[1], alone.images[0]) and z_i.shape == (2, e.models.clip.model.cfg.embed_dim)
    assert torch.allclose(z_i[1], alone.z_i[0], atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# End to end on the tiny model set

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square"]
STYLES = ["flat", "outline"]
ZH = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "orange": "橙色", "circle": "圆", "square": "方块"}


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_eval_shards(root: Path) -> Path:
    """12 concepts in two styles: the flat style of every third concept (and one outline) held out in
    val-*.tar, the rest in train-*.tar, with an eval_prompts.json like the emoji corpus writes."""
    from unclip_cli.data.shards import ShardWriter

    prompts = []
    with ShardWriter(root, "train", per_shard=100) as train, ShardWriter(root, "val", per_shard=100) as val:
        n = 0
        for c in COLOURS:
            for s in SHAPES:
                concept = f"{c}-{s}"
                for style in STYLES:
                    held = (n % 3 == 0 and style == "flat") or (n == 1 and style == "outline")
                    caps = {"en": [f"{c} {s}", f"an emoji of {c} {s}", f"{c} {s}, {style} style"],
                            "zh": [f"{ZH[c]}{ZH[s]}", f"{ZH[c]}{ZH[s]}的表情符号"]}
                    meta = {"concept": concept, "style": style, "captions": caps, "split": "val" if held else "train"}
                    key = f"{concept}_{style}"
                    (val if held else train).write(key, _png(_img(c, s, style)), "png", text=f"an emoji of {c} {s} in {style} style", meta=meta)
                    if held:
                        prompts.append({"prompt": f"an emoji of {c} {s} in {style} style", "lang": "en", "concept": concept, "key": key})
                        prompts.append({"prompt": f"{style}风格的{ZH[c]}{ZH[s]}表情符号", "lang": "zh", "concept": concept, "key": key})
                n += 1
    (root / "eval_prompts.json").write_text(json.dumps(prompts, ensure_ascii=False))
    return root


@pytest.fixture(scope="module")
def eval_shards(tmp_path_factory) -> Path:
    return write_eval_shards(tmp_path_factory.mktemp("corpus"))


def test_load_eval_data_reads_held_out_images_concepts_and_partners(eval_shards):
    data = ev.load_eval_data(eval_shards)
    assert len(data.items) == 5 and len(data.concepts) == 12
    assert data.concept_text["en"][data.concepts.index("red-circle")] == "red circle"
    assert data.concept_text["zh"][data.concepts.index("red-circle")] == "红色圆"
    assert len(data.prompts) == 10 and {p["lang"] for p in data.prompts} == {"en", "zh"}
    # Every held-out image has its concept's other style (from train shards) as the reference pair.
    assert set(data.partners) == {it.key for it in data.items}
    assert data.notes == []


def _cli(*args) -> tuple[int, str, str]:
    r = cli(*args)
    return r.code, r.out, r.err


def test_eval_quick_end_to_end(tiny_weights, eval_shards, tmp_path, monkeypatch):
    import dataclasses

    import unclip_cli.cli.eval as eval_cli

    monkeypatch.setattr(eval_cli, "SHIPPED_CLASSIFIER", tmp_path / "no-classifier.safetensors")  # measured without one
    monkeypatch.setattr(ev, "QUICK", dataclasses.replace(ev.QUICK, steps=(2, 3, 2)))  # the same runs, fewer steps
    out = tmp_path / "metrics.json"
    code, stdout, stderr = _cli("eval", "--weights", tiny_weights, "--data", eval_shards, "--quick", "--out", out, "--json",
                                "--device", "cpu")
    assert code == 0, stderr
    saved = json.loads(out.read_text())
    assert json.loads(stdout) == saved  # stdout holds only the JSON; notes went to stderr
    assert "Wrote" in stderr
    assert saved["sampling"]["steps"] == {"prior": 2, "decoder": 3, "upsampler": 2, "decoder_candidates": 1}
    assert saved["settings"]["mode"] == "quick" and saved["machine"]["cores"] >= 1
    assert saved["command"].startswith("unclip eval --weights") and "--quick" in saved["command"]
    m = saved["metrics"]
    assert m["clip"]["n_images"] == 5 and m["clip"]["en"]["candidates"] == 12
    for lang in ("en", "zh"):
        for d in ("image_to_text", "text_to_image"):
            assert 0 <= m["clip"][lang][d]["top1"] <= m["clip"][lang][d]["top5"] <= 1
    g = m["generate"]
    assert g["prompts"] == {"en": 5, "zh": 5} and g["n_generated"] == 10 and g["candidates"] == {"en": 12, "zh": 12}
    assert 0 <= g["own_concept_rate"]["en"] <= 1 and 0 <= g["own_concept_rate_real"]["zh"] <= 1
    assert g["frechet_clip"] > 0 and m["prior"]["n"] == 10
    sh = m["sharpness"]
    assert sh["size"] == 32 and sh["generated_size"] == 16 and sh["n_generated"] == 10 and sh["bands_px"] == ["8-16", "4-8", "2-4"]
    assert all(v > 0 for v in sh["share_of_real"]) and all(0 < v < 1 for v in sh["share_of_real_se"])
    assert -1 <= m["vary"]["cosine_to_source"] <= 1 and m["vary"]["n_style_pairs"] == 5
    assert m["inversion"]["mse"] >= 0 and m["inversion"]["resolution"] == 8
    assert 0 <= m["blend"]["monotone_fraction"] <= m["blend"]["progress_fraction"] <= 1 and m["blend"]["pairs"] == 2
    assert m["edit"]["pixels_changed_outside_mask"] == 0 and m["edit"]["n"] == 5
    assert "classifier" not in m and any("no concept classifier" in n for n in saved["notes"])
    # The readable table goes to stdout without --json.
    code, stdout, _ = _cli("eval", "--weights", tiny_weights, "--data", eval_shards, "--quick", "--out", out, "--quiet")
    assert code == 0 and "own concept among 12 (zh)" in stdout and "pixels changed outside the mask" in stdout


def test_eval_with_a_concept_classifier_trained_apart(tiny_weights, eval_shards, tmp_path, monkeypatch):
    """`unclip train classifier` on the training split, exported, then read by `unclip eval --classifier`."""
    import dataclasses

    run, ck = tmp_path / "run", tmp_path / "concepts.safetensors"
    code, _, err = _cli("train", "classifier", "--preset", "tiny", "--data", eval_shards, "--run", run, "--max-steps", "3",
                        "--device", "cpu", "--quiet")
    assert code == 0, err
    assert _cli("train", "export-classifier", run, "--to", ck)[0] == 0
    monkeypatch.setattr(ev, "QUICK", dataclasses.replace(ev.QUICK, steps=(2, 3, 2)))
    out = tmp_path / "metrics.json"
    code, stdout, err = _cli("eval", "--weights", tiny_weights, "--data", eval_shards, "--quick", "--out", out, "--json",
                             "--device", "cpu", "--classifier", ck)
    assert code == 0, err
    c = json.loads(stdout)["metrics"]["classifier"]
    assert c["classes"] == 12 and c["n_real"] == 5 and c["prompts"] == {"en": 5, "zh": 5} and c["classifier"]["trained_steps"] == 3
    for lang in ("en", "zh"):
        assert 0 <= c["generated"][lang]["top1"] <= c["generated"][lang]["top5"] <= 1
    assert "--classifier" in json.loads(stdout)["command"]


def test_eval_sections_and_precision(tiny_weights, eval_shards, tmp_path, monkeypatch):
    """--sections measures only the parts named (generate: its own, sharpness and the prior's), and the report
    records the precision that ran and the command that reproduces it."""
    import dataclasses

    import unclip_cli.cli.eval as eval_cli

    monkeypatch.setattr(eval_cli, "SHIPPED_CLASSIFIER", tmp_path / "no-classifier.safetensors")
    monkeypatch.setattr(ev, "QUICK", dataclasses.replace(ev.QUICK, steps=(2, 3, 2)))
    out = tmp_path / "metrics.json"
    code, stdout, err = _cli("eval", "--weights", tiny_weights, "--data", eval_shards, "--quick", "--out", out, "--json",
                             "--device", "cpu", "--sections", "generate", "--precision", "bf16")
    assert code == 0, err
    saved = json.loads(stdout)
    assert set(saved["metrics"]) == {"generate", "sharpness", "prior"} and set(saved["seconds"]) == {"generate"}
    assert saved["precision"] == "bf16" and "--sections generate" in saved["command"] and "--precision bf16" in saved["command"]
    for bad in ("vary,bogus", ","):
        code, _, err = _cli("eval", "--weights", tiny_weights, "--data", eval_shards, "--quick", "--out", out, "--sections", bad)
        assert code != 0 and "--sections" in err


def test_concept_hits_count_unknown_concepts_as_misses():
    import torch

    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [0.0, 0.0, 9.0]])
    hits = ev.concept_hits(logits, [0, 0, -1], ks=(1, 2))
    assert hits["top1"].tolist() == [1.0, 0.0, 0.0] and hits["top2"].tolist() == [1.0, 0.0, 0.0]
    assert ev.concept_hits(logits, [1, 1, 2], ks=(2,))["top2"].tolist() == [1.0, 1.0, 1.0]


def test_eval_without_data_is_a_clear_error(tiny_weights, tmp_path):
    code, _, stderr = _cli("eval", "--weights", tiny_weights, "--data", tmp_path / "nothing", "--quick")
    assert code == 1 and "\nError: Shard not found" in stderr and "Traceback" not in stderr
