"""`unclip compose`: the layout grammar, box masks, region fusion and paste-and-harmonise (tiny random set)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unclip_cli.errors import InputError
from unclip_cli.layout import LEFT, RIGHT, TOP, BOTTOM, WHOLE, box_masks, parse, singular
from unclip_cli.requests import ComposeRequest, request_from_recipe

FEW = dict(prior_steps=2, decoder_steps=3, upsampler_steps=1, quality="fast")


@pytest.mark.parametrize("sentence,objects", [
    ("a cat face left of a red heart", [("a cat face", LEFT), ("a red heart", RIGHT)]),
    ("cat face to the right of  red heart", [("cat face", RIGHT), ("red heart", LEFT)]),
    ("a star above a moon", [("a star", TOP), ("a moon", BOTTOM)]),
    ("a star on top of a moon", [("a star", TOP), ("a moon", BOTTOM)]),
    ("a fish under a boat", [("a fish", BOTTOM), ("a boat", TOP)]),
    ("a red heart and a blue heart", [("a red heart", LEFT), ("a blue heart", RIGHT)]),
    ("dog next to cat", [("dog", LEFT), ("cat", RIGHT)]),
    ("two stars", [("star", LEFT), ("star", RIGHT)]),
    ("2 red cherries", [("red cherry", LEFT), ("red cherry", RIGHT)]),
    ("a rocket", [("a rocket", WHOLE)]),
    ("the band", [("the band", WHOLE)]),  # "and" inside a word is not a relation
])
def test_the_grammar_places_objects(sentence, objects):
    assert parse(sentence) == objects


def test_plurals_become_singular():
    assert [singular(w) for w in ("stars", "foxes", "cherries", "glass", "cat")] == ["star", "fox", "cherry", "glass", "cat"]


def test_box_masks_cover_the_box_and_soften_its_edge():
    hard, soft = box_masks([(0.0, 0.25, 0.5, 0.75)], 16, soft=2)
    assert hard.shape == (1, 1, 16, 16) and hard.sum() == 8 * 8 and hard[0, 0, 4:12, 0:8].all()
    assert soft[0, 0, 8, 2] == 1 and 0 < soft[0, 0, 8, 8] < 1 and soft[0, 0, 0, 15] == 0


def test_a_bad_layout_is_refused():
    with pytest.raises(InputError, match="say what to draw"):
        ComposeRequest().validated()
    with pytest.raises(InputError, match="--obj 1's box"):
        ComposeRequest(objects=[["cat", [0.5, 0, 0.2, 1]]]).validated()
    with pytest.raises(InputError, match="1 to 4 objects"):
        ComposeRequest(objects=[["cat", [0, 0, 1, 1]]] * 5).validated()
    with pytest.raises(InputError, match="--method"):
        ComposeRequest(prompt="a cat", method="magic").validated()


def test_explicit_boxes_win_over_the_sentence():
    req = ComposeRequest(prompt="a dog left of a cat", objects=[["dog", [0, 0, 0.3, 0.3]]]).validated()
    assert req.objects == [["dog", [0.0, 0.0, 0.3, 0.3]]] and req.global_text() == "a dog left of a cat"


def test_region_fusion_weights_each_path_by_its_box():
    """The fused x_start is each path's inside its box, the global path's outside."""
    from unclip_cli.diffusion.gaussian import DiffusionConfig, GaussianDiffusion
    from unclip_cli.diffusion.policy import fused_denoiser

    d = GaussianDiffusion(DiffusionConfig(schedule_dtype="float32"))
    hard, _ = box_masks([(0, 0, 0.5, 1)], 4)
    obj = lambda x, t: (torch.full_like(x, 0.5),)  # noqa: E731
    whole = lambda x, t: (torch.full_like(x, -0.5),)  # noqa: E731
    fused = fused_denoiser(d, [(obj, lambda t: hard), (whole, lambda t: 1 - hard)])
    x = torch.zeros(1, 3, 4, 4)
    x_start, eps = fused(x, torch.tensor([500]))
    assert torch.equal(x_start[..., :2], torch.full((1, 3, 4, 2), 0.5)) and torch.equal(x_start[..., 2:], torch.full((1, 3, 4, 2), -0.5))
    assert torch.allclose(eps, d.eps_from_x_start(x, torch.tensor([500]), x_start))


@pytest.mark.parametrize("method", ["fuse", "paste"])
def test_compose_runs_and_replays_exactly(method, tiny_engine):
    res = tiny_engine.run(ComposeRequest(prompt="a red circle left of a green star", n=2, seed=4, method=method, **FEW))
    assert len(res.images) == 2 and res.images[0].size == (tiny_engine.image_size,) * 2
    assert not np.array_equal(np.asarray(res.images[0]), np.asarray(res.images[1]))
    r = res.recipes[1]
    assert r["op"] == "compose" and r["method"] == method and r["objects"][0] == ["a red circle", list(LEFT)]
    again = tiny_engine.run(request_from_recipe(r))
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(res.images[1]))


def test_the_methods_differ(tiny_engine):
    a, b = (tiny_engine.run(ComposeRequest(prompt="a red circle above a green star", seed=4, method=m, **FEW)).images[0]
            for m in ("fuse", "paste"))
    assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_cli_compose_with_boxes_and_a_rerun(tiny_weights, tmp_path):
    import json

    from PIL import Image

    from clirun import cli

    args = ("--weights", tiny_weights, "--seed", "2", "--prior-steps", "2", "--decoder-steps", "2", "--upsampler-steps", "1",
            "--out", tmp_path)
    r = cli("compose", "--obj", "a red circle:0,0,0.5,0.5", "--obj", "a green star:0.5,0.5,1,1", "--method", "paste", *args, "--json")
    assert r.code == 0, r.err
    image = json.loads(r.out)["images"][0]
    assert image["recipe"]["objects"] == [["a red circle", [0, 0, 0.5, 0.5]], ["a green star", [0.5, 0.5, 1, 1]]]
    # each stage's line (stderr is no terminal here) says which part it drew: the whole, or which object
    stages = [line.split(": ")[0] for line in r.err.splitlines() if " steps in " in line]
    assert stages == ["prior, the whole picture", "prior, object 1 of 2 (a red circle)", "prior, object 2 of 2 (a green star)",
                      "decoder, object 1 of 2 (a red circle)", "decoder, object 2 of 2 (a green star)",
                      "decoder, the whole picture, harmonised", "upsampler, the whole picture"], r.err
    again = cli("compose", "--from", image["path"], "--weights", tiny_weights, "--out", tmp_path)
    assert again.code == 0, again.err
    assert np.array_equal(np.asarray(Image.open(image["path"])), np.asarray(Image.open(again.out.strip().splitlines()[0])))
    assert cli("compose", "--obj", "no box here", *args).code == 2
    bad = cli("compose", "--obj", "cat:0,0,2,1", *args)
    assert bad.code == 2 and "--obj 1's box" in bad.err  # a usage mistake


def _bench_compose():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_compose.py"
    spec = importlib.util.spec_from_file_location("bench_compose", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("boxes", [(LEFT, RIGHT), (RIGHT, LEFT), (TOP, BOTTOM)])
def test_the_strict_checker_wants_the_boxes_apart(boxes):
    """Two shapes each in its box pass (on a tinted background too); one shape across both boxes fails, as does
    bench_compose's `merged` calibration case."""
    from PIL import Image, ImageDraw

    bench = _bench_compose()
    disc, ring = Image.new("RGB", (64, 64), "white"), Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(disc).ellipse((6, 6, 58, 58), fill="red")
    ImageDraw.Draw(ring).ellipse((6, 6, 58, 58), outline="blue", width=8)
    apart = bench.paste([disc, ring], boxes)
    assert bench.separated(apart, boxes)
    tinted = Image.fromarray((np.asarray(apart) * np.array([0.93, 0.9, 0.97])).astype(np.uint8))
    assert bench.separated(tinted, boxes)
    assert not bench.separated(bench.merged([disc, ring], boxes), boxes)
    across = Image.new("RGB", (128, 128), "white")
    ImageDraw.Draw(across).rectangle((10, 10, 118, 118), fill="green")
    assert not bench.separated(across, boxes)


def test_a_stopped_bench_run_resumes_from_what_it_stored(tmp_path):
    """Each finished item is its PNG and a line; a line cut by a kill, or whose image is gone, runs again."""
    from PIL import Image

    bench = _bench_compose()
    image = Image.new("RGB", (8, 8), "white")
    bench.store(tmp_path, 3, "fuse", 1003, image, 2.5)
    bench.store(tmp_path, 3, "paste", 1003, image, 4.0)
    (tmp_path / bench.item_file(3, "paste", 1003)).unlink()
    with open(tmp_path / "results.jsonl", "a") as f:
        f.write('{"p": 4, "method": "fuse", "se')
    assert list(bench.load_done(tmp_path)) == [(3, "fuse", 1003)]
    assert bench.consecutive([1000, 1001, 1003]) == [[1000, 1001], [1003]]
