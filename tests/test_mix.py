"""`unclip mix`: weighted mixes of images' and texts' CLIP image embeddings, decoded afresh (tiny random set)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from clirun import cli
from unclip_cli.errors import InputError
from unclip_cli.requests import MixRequest, request_from_recipe

FEW = dict(prior_steps=2, decoder_steps=2, upsampler_steps=1, quality="fast")


def _picture(colour, shape="ellipse", size=48):
    img = Image.new("RGB", (size, size), "white")
    getattr(ImageDraw.Draw(img), shape)((8, 8, size - 8, size - 8), fill=colour)
    return img


@pytest.fixture(scope="module")
def pictures():
    return _picture("red"), _picture("blue", "rectangle")


def _same(a, b):
    return np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("kwargs,words", [
    (dict(images=["a.png"]), "2 to 8"),
    (dict(prompts=["a", "b", "c", "d", "e", "f", "g", "h", "i"]), "2 to 8"),
    (dict(prompts=["a cat", "a dog"], weights=[1.0]), "one weight per image and text"),
    (dict(prompts=["a cat", "a dog"], weights=[0, 0.0]), "all zero"),
    (dict(prompts=["a cat", "a dog"], weights=[1, 11]), "--mix-weights 2"),
    (dict(prompts=["a cat", "a dog"], weights=[1, float("nan")]), "must be a number"),
    (dict(prompts=["a cat", ""]), "text 2"),
])
def test_a_bad_mix_is_refused_before_any_work(kwargs, words):
    with pytest.raises(InputError, match=words):
        MixRequest(**kwargs).validated()


def test_weights_make_the_embedding_they_say(tiny_engine, pictures):
    a, b = pictures
    z_a, z_b = (F.normalize(tiny_engine.encode_image(im)[0], dim=-1) for im in (a, b))
    only_a = tiny_engine.run(MixRequest(images=[a, b], weights=[1.0, 0.0], seed=1, **FEW))
    assert torch.allclose(only_a.z_i[0], z_a, atol=1e-5)
    even = tiny_engine.run(MixRequest(images=[a, b], seed=1, **FEW))  # no weights: equal
    assert torch.allclose(even.z_i[0], F.normalize(z_a + z_b, dim=-1), atol=1e-5)
    away = tiny_engine.run(MixRequest(images=[a, b], weights=[1.0, -0.5], seed=1, **FEW))
    assert torch.allclose(away.z_i[0], F.normalize(z_a - 0.5 * z_b, dim=-1), atol=1e-5)
    assert even.recipes[0]["weights"] == [0.5, 0.5]


def test_a_mix_with_texts_runs_and_its_recipe_replays_exactly(tiny_engine, pictures):
    a, b = pictures
    res = tiny_engine.run(MixRequest(images=[a, b], prompts=["a green star"], weights=[0.5, 0.3, 0.2], n=2, seed=3, **FEW))
    assert len(res.images) == 2 and not _same(res.images[0], res.images[1])
    assert res.images[0].size == (tiny_engine.image_size,) * 2
    r = res.recipes[1]
    assert (r["op"], r["prompts"], r["weights"], r["inputs"]) == ("mix", ["a green star"], [0.5, 0.3, 0.2], ["image 1", "image 2"])
    again = tiny_engine.run(request_from_recipe(r, images=[a, b]))
    assert _same(again.images[0], res.images[1])


def test_weights_that_cancel_out_are_a_clear_error(tiny_engine, pictures):
    a, _ = pictures
    with pytest.raises(InputError, match="cancel out"):
        tiny_engine.run(MixRequest(images=[a, a], weights=[1.0, -1.0], seed=1, **FEW))


def test_cli_mix_reads_files_as_images_and_the_rest_as_texts(tiny_weights, pictures, tmp_path):
    a, b = pictures
    a.save(tmp_path / "a.png")
    b.save(tmp_path / "b.png")
    args = ("--weights", tiny_weights, "--seed", "2", "--prior-steps", "2", "--decoder-steps", "2", "--upsampler-steps", "1",
            "--out", tmp_path / "out")
    r = cli("mix", tmp_path / "a.png", "a green star", tmp_path / "b.png", "--mix-weights", "0.6,0.1,0.3", *args, "--json")
    assert r.code == 0, r.err
    import json

    rec = json.loads(r.out)["images"][0]["recipe"]
    assert rec["inputs"] == ["a.png", "b.png"] and rec["prompts"] == ["a green star"]
    assert rec["weights"] == [0.6, 0.3, 0.1]  # images first, then texts, each with the weight given beside it
    made = json.loads(r.out)["images"][0]["path"]
    again = cli("mix", tmp_path / "a.png", tmp_path / "b.png", "--from", made, "--weights", tiny_weights, "--out", tmp_path / "out")
    assert again.code == 0, again.err
    assert _same(Image.open(made), Image.open(again.out.strip().splitlines()[0]))
    missing = cli("mix", tmp_path / "a.png", tmp_path / "nope.png", *args)
    assert missing.code == 1 and "nope.png does not exist" in missing.err
    assert cli("mix", tmp_path / "a.png", "a cat", "--mix-weights", "1,x", *args).code == 2
    assert cli("mix", tmp_path / "a.png", *args).code == 2  # one part is not a mix: a usage mistake
