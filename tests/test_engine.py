"""The engine end to end on the tiny random model set: all five operations, seeds, batching, recipes, masks, errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image, ImageDraw

from unclip_cli.engine import paste_back
from unclip_cli.errors import InputError
from unclip_cli.requests import BlendRequest, EditRequest, GenerateRequest, NudgeRequest, Steps, VaryRequest

ST = Steps(prior=3, decoder=3, upsampler=2)


def req(op: str, steps: Steps | None = ST, **kw):
    """The request of an operation on the test inputs, with explicit step counts (ST unless given)."""
    if steps is not None:
        kw = {"prior_steps": steps.prior, "decoder_steps": steps.decoder, "upsampler_steps": steps.upsampler,
              "decoder_candidates": steps.decoder_candidates, **kw}
    cls, fields = {
        "generate": (GenerateRequest, {"prompt": "a red circle"}),
        "vary": (VaryRequest, {"image": IMG_A}),
        "blend": (BlendRequest, {"image_a": IMG_A, "image_b": IMG_B}),
        "nudge": (NudgeRequest, {"image": IMG_A, "to": "a blue square", "from_": "a red circle"}),
        "edit": (EditRequest, {"image": IMG_A, "mask": MASK, "prompt": "a green star"}),
    }[op]
    return cls(**{**fields, **kw})
W, H = 20, 12  # non-square inputs


def _picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (W, H), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    draw.ellipse((3, 2, 14, 10), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    arr = np.asarray(img).astype(np.int16) + rng.integers(-20, 20, (H, W, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")


def _mask() -> Image.Image:
    """Irregular: a polygon, an isolated pixel, a grey strip on the border, and a darker grey pixel that is kept."""
    m = Image.new("L", (W, H), 0)
    draw = ImageDraw.Draw(m)
    draw.polygon([(2, 1), (9, 3), (7, 9), (3, 7)], fill=255)
    draw.point((15, 2), fill=255)
    draw.rectangle((17, 8, 19, 11), fill=200)  # grey, still repainted
    draw.point((13, 10), fill=127)  # grey, kept
    return m


IMG_A, IMG_B, MASK = _picture(0), _picture(1), _mask()
REPAINT = np.asarray(MASK) >= 128  # (H, W)


@pytest.fixture(scope="module")
def run(tiny_engine):
    """Memoised engine calls: run(op, **kwargs) -> Result (every test reads the same few runs)."""
    cache = {}

    def call(op, fresh=False, **kw):
        key = (op, tuple(sorted(kw.items())))
        if fresh or key not in cache:
            cache[key] = tiny_engine.run(req(op, **kw))
        return cache[key]

    return call


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img).copy()


def _same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(_arr(a), _arr(b))


# Calls that count images with n (blend counts frames; its "n" is frames).
COUNTED = ["generate", "vary", "nudge", "edit"]
ALL = ["generate", "vary", "blend", "nudge", "edit"]


def _n(op, k):
    return {"frames": k} if op == "blend" else {"n": k}


@pytest.mark.parametrize("op", ALL)
def test_output_sizes(op, run, tiny_engine):
    res = run(op, seed=5, **_n(op, 3))
    assert len(res.images) == len(res.recipes) == 3
    want = (W, H) if op == "edit" else (tiny_engine.image_size, tiny_engine.image_size)
    assert tiny_engine.image_size == 16
    assert all(img.size == want and img.mode == "RGB" for img in res.images)


@pytest.mark.parametrize("op", ALL)
def test_identical_seeds_give_identical_images(op, run):
    a = run(op, seed=5, **_n(op, 2))
    b = run(op, seed=5, fresh=True, **_n(op, 2))
    assert all(_same(x, y) for x, y in zip(a.images, b.images))


@pytest.mark.parametrize("op", ALL)
def test_different_seeds_give_different_images(op, run):
    a = run(op, seed=5, **_n(op, 2))
    b = run(op, seed=6000, **_n(op, 2))
    assert all(not _same(x, y) for x, y in zip(a.images, b.images))
    # ...and within one call, images with different seeds differ too.
    if op != "blend":
        assert not _same(a.images[0], a.images[1])


@pytest.mark.parametrize("op", ["generate", "vary", "edit"])
def test_image_i_of_a_batch_is_the_single_image_with_seed_plus_i(op, run):
    batch = run(op, seed=5, n=3)
    for i in range(3):
        single = run(op, seed=5 + i, n=1)
        assert _same(batch.images[i], single.images[0]), f"image {i} differs from seed {5 + i} alone"
        assert batch.recipes[i]["seed"] == single.recipes[0]["seed"] == 5 + i


def test_nudge_last_image_is_the_single_image_with_its_seed(run):
    """Nudge steps the amount over its n images; its last image (full amount, seed + n - 1) stands alone."""
    batch = run("nudge", seed=5, n=3, amount=0.3)
    single = run("nudge", seed=7, n=1, amount=0.3)
    assert _same(batch.images[2], single.images[0])
    assert [r["theta"] for r in batch.recipes] == pytest.approx([0.1, 0.2, 0.3])


@pytest.mark.parametrize("op", ALL)
def test_a_recipe_replays_its_image_exactly(op, run, tiny_engine):
    """A recipe holds its request and its image's index; the replay recomputes that image's batch."""
    from unclip_cli.requests import request_from_recipe

    res = run(op, seed=5, batch_size=2, **_n(op, 3))
    inputs = {"blend": {"image_a": IMG_A, "image_b": IMG_B}, "edit": {"image": IMG_A, "mask": MASK}}.get(op, {"image": IMG_A})
    for i in (1, 2):
        again = request_from_recipe(res.recipes[i], **({} if op == "generate" else inputs))
        if op == "blend":  # a blend replays whole: its frames belong together
            assert again.index is None and _same(tiny_engine.run(again).images[i], res.images[i])
            continue
        assert again.index == i
        out = tiny_engine.run(again)
        assert len(out.images) == 1 and _same(out.images[0], res.images[i]) and out.recipes[0] == res.recipes[i]


@pytest.mark.parametrize("op", ALL)
def test_batch_size_changes_images_by_rounding_at_most(op, run):
    """What the README promises: another --batch-size changes no image by more than rounding."""
    a = run(op, seed=5, **_n(op, 3))
    b = run(op, seed=5, batch_size=1, **_n(op, 3))
    for i, (x, y) in enumerate(zip(a.images, b.images)):
        assert np.abs(_arr(x).astype(int) - _arr(y)).max() <= 3, f"image {i} depends on the batch size"
    assert [dict(r, batch_size=0) for r in a.recipes] == [dict(r, batch_size=0) for r in b.recipes]


def test_blend_end_frames_do_not_depend_on_the_frame_count(run):
    three = run("blend", seed=5, frames=3)
    two = run("blend", seed=5, frames=2)
    assert _same(three.images[0], two.images[0]) and _same(three.images[2], two.images[1])
    assert not _same(three.images[0], three.images[2])
    assert [r["theta"] for r in three.recipes] == [0.0, 0.5, 1.0]
    assert [r["frame"] for r in three.recipes] == [0, 1, 2]


def test_blend_takes_more_decoder_steps_than_the_quality_preset(tiny_engine):
    from unclip_cli.requests import BLEND_DECODER_STEP_FACTOR, QUALITY, quality_steps

    fast = QUALITY["fast"]
    assert quality_steps("fast") == fast
    assert quality_steps("fast", "blend") == dataclasses.replace(fast, decoder=BLEND_DECODER_STEP_FACTOR * fast.decoder)
    res = tiny_engine.run(req("blend", steps=None, frames=2, quality="fast", seed=1))
    # the recipe holds what ran: twice fast's steps, raised to the inversion's minimum (40 > 20)
    assert res.recipes[0]["steps"]["decoder"] == max(BLEND_DECODER_STEP_FACTOR * fast.decoder, tiny_engine.sampling.inversion_steps_min)
    assert tiny_engine.run(req("blend", frames=2, seed=1)).recipes[0]["steps"]["decoder"] == ST.decoder


@pytest.mark.parametrize("op", ALL)
def test_recipes_carry_what_reproduces_the_image(op, run, tiny_engine):
    res = run(op, seed=5, **_n(op, 3))
    for i, r in enumerate(res.recipes):
        assert r["op"] == op
        assert r["seed"] == (5 if op == "blend" else 5 + i)
        assert r["index"] == i and r["n"] == 3
        if op in ("generate", "edit"):
            assert r["steps"] == {"prior": 3, "decoder": 3, "upsampler": 2, "decoder_candidates": 1} and r["prior_guidance"] == 1.5
        else:  # the prior takes no part: its settings are not recorded
            assert r["steps"] == {"decoder": 3, "upsampler": 2} and "prior_guidance" not in r
        assert r["model"] == tiny_engine.name and r["model_hash"] == tiny_engine.models.model_hash
    if op in ("generate", "edit"):
        assert all(r["prompt"] in ("a red circle", "a green star") for r in res.recipes)
        assert res.recipes[0]["prompt"] == ("a red circle" if op == "generate" else "a green star")
    if op == "nudge":
        assert res.recipes[0]["to"] == "a blue square" and res.recipes[0]["from"] == "a red circle"
    if op == "vary":
        assert res.recipes[0]["strength"] == 0.5
    if op == "edit":
        assert res.recipes[0]["size"] == [W, H]
    else:
        assert res.recipes[0]["size"] == [tiny_engine.image_size] * 2


def test_edit_changes_no_pixel_outside_the_mask(run):
    res = run("edit", seed=5, n=3)
    src = _arr(IMG_A)
    for img in res.images:
        out = _arr(img)
        assert out.shape == src.shape
        outside = ~REPAINT
        assert np.array_equal(out[outside], src[outside]), f"{int((out != src)[outside].any(-1).sum())} pixels changed outside the mask"
        changed = (out != src).any(-1)
        assert changed[REPAINT].sum() > REPAINT.sum() // 2, "the masked area was not repainted"


@pytest.mark.parametrize("size", [(W, H), (H, W)])
def test_edit_pastes_the_square_result_back_in_place(size):
    """The square, padded canvas the models see must map back onto the same pixels: pasting the square
    of a smooth image (resized to the model's size) back reproduces that image, not a shifted copy."""
    from unclip_cli.engine import square

    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    original = Image.fromarray(np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx + yy) * 255 // (w + h - 2)], -1).astype(np.uint8), "RGB")
    generated = square(original).resize((16, 16), Image.Resampling.BICUBIC)
    repaint = np.ones((h, w), dtype=bool)
    out = _arr(paste_back(generated, original, repaint)).astype(int)
    # Observed mean error 4.0 levels (resampling 20 -> 16 -> 20, and the white padding bleeding in at the
    # edges); a crop at (0, 0) instead of the centre gives 81.
    assert np.abs(out - _arr(original)).mean() < 10


def test_membrane_fills_a_hole_smoothly():
    """Laplace's equation inside the hole: a linear ramp (harmonic) is refilled as itself, to within a level."""
    import torch

    from unclip_cli.engine import membrane

    yy, xx = torch.meshgrid(torch.arange(40.0), torch.arange(48.0), indexing="ij")
    ramp = torch.stack([3 * xx, 2 * yy - xx])  # (2, 40, 48)
    hole = torch.zeros(40, 48, dtype=torch.bool)
    hole[8:30, 10:41] = True
    filled = membrane(torch.where(hole, torch.zeros(()), ramp), ~hole)
    assert torch.equal(filled[:, ~hole], ramp[:, ~hole])
    assert float((filled - ramp).abs().max()) < 1  # observed 0.48 (values up to 141)


def test_harmonised_paste_meets_the_kept_pixels_and_keeps_the_middle():
    """A result tinted 60 levels off the kept image (the seam a newcomer saw: the decoder's colours, not its
    edges, differ at the border): feathered over 4 px the tint still arrives as a band a few pixels wide;
    harmonised, it fades in over `reach` px, and deeper in the generated pixels are untouched. Unmasked pixels
    are the input's, bit for bit, either way."""
    n = 96
    yy, xx = np.mgrid[0:n, 0:n]
    original = np.stack([60 + xx, 60 + yy, np.full_like(xx, 100)], -1).astype(np.uint8)
    generated = (original.astype(int) + [60, -50, 60]).astype(np.uint8)
    repaint = np.zeros((n, n), dtype=bool)
    repaint[16:80, 24:88] = True
    orig_im, gen_im = Image.fromarray(original), Image.fromarray(generated)
    feathered = _arr(paste_back(gen_im, orig_im, repaint, feather=4)).astype(int)
    harmonised = _arr(paste_back(gen_im, orig_im, repaint, feather=4, reach=16)).astype(int)
    for out in (feathered, harmonised):
        assert np.array_equal(out[~repaint], original[~repaint])
    # The largest step between rows across the top border, less the kept image's own gradient.
    steepest = lambda out: np.abs(np.diff((out - original)[14:40, 40:72].mean(1), axis=0)).sum(-1).max()  # noqa: E731
    assert steepest(harmonised) < 25 and steepest(feathered) > 40  # observed 16.0 and 50.0 (the tint: 170)
    # Deeper than `reach` the generated image is untouched.
    assert np.abs(harmonised[40:56, 48:64] - generated[40:56, 48:64]).max() <= 1


def test_a_large_output_is_pasted_like_the_exact_solve_at_its_size():
    """An output 10x the result's size (a photo): the colour match is solved at the result's pixels and upsampled,
    and only the mask's box is resampled and feathered, instead of solving at the output's size (minutes at 20 MP).
    It stays close to that exact solve (taken from the functions themselves), takes the result's tint off past the
    feathered band as that does, and keeps every unmasked pixel bit for bit."""
    from unclip_cli.engine import feather_weights, harmonise, square

    w, h, S, reach, feather = 640, 400, 64, 80, 8  # reach: 4 base pixels of an 8 px base at 640 px
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(0)
    original = np.clip(np.stack([40 + xx // 4, 60 + yy // 3, 120 + 0 * xx], -1) + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
    repaint = (xx - 300) ** 2 / 150**2 + (yy - 190) ** 2 / 110**2 < 1
    orig_im = Image.fromarray(original)
    generated = square(Image.fromarray((original.astype(int) + [70, -40, 50]).clip(0, 255).astype(np.uint8))).resize((S, S), Image.Resampling.BICUBIC)
    out = _arr(paste_back(generated, orig_im, repaint, feather, reach)).astype(int)
    # The exact solve: the result resized to the output, matched and feathered at every output pixel.
    full = np.asarray(generated.resize((w, w), Image.Resampling.LANCZOS))[(w - h) // 2 : (w - h) // 2 + h]
    weights = feather_weights(repaint, feather)[..., None]
    exact = np.rint(weights * harmonise(full, original, repaint, reach) + (1 - weights) * original).clip(0, 255)
    exact = np.where(repaint[..., None], exact, original).astype(int)
    assert np.array_equal(out[~repaint], original[~repaint])
    # Only the box resampled: the same pixels as the whole square resized and cropped (to rounding).
    hard = _arr(paste_back(generated, orig_im, repaint)).astype(int)
    assert np.abs(hard - np.where(repaint[..., None], full, original)).max() <= 1
    gap = np.abs(out - exact)[repaint].mean(0)
    assert gap.max() < 3, gap  # observed 2.2 levels, of a correction of 34 on average (the exact one follows the noise)
    # Past the feathered band the tint (160 levels over the channels) is gone as in the exact solve.
    band = (feather_weights(repaint, 16) > 0.5) & (feather_weights(repaint, 16) < 1)
    step = lambda x: np.abs((x - original)[band].mean(0)).sum()  # noqa: E731
    assert step(exact) < 12 and step(out) < 20, (step(out), step(exact))  # observed 14.3 and 9.7


def test_edit_harmonises_by_default_and_old_recipes_do_not(tiny_engine):
    """One batch, one seed: the default and the pre-harmonising paste differ only inside the mask, where the
    default's border is closer to the kept pixels; a recipe without the field reruns as it was made."""
    img = _picture(3).resize((64, 64))
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 47, 47), fill=255)
    repaint = np.asarray(mask) >= 128
    kw = dict(image=img, mask=mask, prompt="a green star", seed=4, prior_steps=3, decoder_steps=3, upsampler_steps=2)
    now, before = (r.images[0] for r in tiny_engine.run_many([EditRequest(**kw), EditRequest(**kw, harmonise=False)], batch_size=2))
    a, b, src = _arr(now).astype(int), _arr(before).astype(int), _arr(img).astype(int)
    assert np.array_equal(a[~repaint], src[~repaint]) and np.array_equal(b[~repaint], src[~repaint])
    assert (a != b).any(-1)[repaint].any()
    ring = np.zeros_like(repaint)
    ring[16, 16:48] = ring[47, 16:48] = ring[16:48, 16] = ring[16:48, 47] = True  # the first pixels inside
    outer = np.zeros_like(repaint)
    outer[15, 16:48] = outer[48, 16:48] = outer[16:48, 15] = outer[16:48, 48] = True  # their kept neighbours
    gap = lambda x: abs(x[ring].mean(0) - x[outer].mean(0)).sum()  # noqa: E731
    assert gap(a) < gap(b)
    from unclip_cli.requests import request_from_recipe

    assert request_from_recipe({"op": "edit", "prompt": "x", "feather": 8}, image=img, mask=mask).harmonise is False
    assert tiny_engine.run(EditRequest(**kw)).recipes[0]["harmonise"] is True


def test_feather_weights_are_the_alternating_square_and_cross_distance():
    """feather_weights shifts boolean masks (a photo's default feather is ~190 steps over megapixels); its weights are
    those of the max-pooling it replaced, bit for bit, so older recipes paste as they were made: a thin mask, one
    touching the image's edge, a blob and a mask too thin for the band."""
    import torch
    import torch.nn.functional as F

    from unclip_cli.engine import feather_weights

    def pooled(repaint, feather):  # the max-pooled definition, as it was
        inside = torch.from_numpy(repaint)
        reached, dist = (~inside).float()[None, None], torch.full(inside.shape, float(feather + 1))
        for k in range(1, feather + 1):
            if k % 2:
                reached = F.max_pool2d(reached, 3, 1, 1)
            else:
                reached = torch.maximum(F.max_pool2d(reached, (1, 3), 1, (0, 1)), F.max_pool2d(reached, (3, 1), 1, (1, 0)))
            dist = torch.where((reached[0, 0] > 0) & inside & (dist > feather), torch.tensor(float(k)), dist)
        depth = float(dist[inside].max())
        band = feather if depth > feather else max(1.0, (depth - 1) // 2)
        t = (dist / (band + 1)).clamp(max=1.0)
        return torch.where(inside, t * t * (3 - 2 * t), torch.zeros(())).numpy()

    rng = np.random.default_rng(3)
    blob = Image.new("L", (57, 41), 0)
    ImageDraw.Draw(blob).ellipse((-6, 5, 40, 46), fill=255)
    strip = np.zeros((30, 40), bool)
    strip[:, 12:15] = True
    masks = [np.asarray(blob) >= 128, strip, rng.random((23, 31)) < 0.7, np.asarray(MASK) >= 128]
    for repaint in masks:
        for feather in (1, 2, 3, 8, 21):
            assert np.array_equal(feather_weights(repaint, feather), pooled(repaint, feather)), feather


def test_edit_feather_default_scales_with_the_image_and_replays_as_recorded(tiny_engine):
    """The default feather is 8 px per 256 px of the image's long side (a fixed 8 px was a third of one model pixel
    across a 6028 px photo and left the enlarged edit's edge showing); the recipe records the pixels that ran, so a
    replay pastes the same, and a recipe's explicit 8 (an older default) stays 8."""
    from unclip_cli.requests import default_feather, request_from_recipe

    assert [default_feather(s) for s in [(256, 256), (40, 24), (6028, 3391), (192, 384), (12000, 800)]] == [8, 1, 188, 12, 256]
    img = _picture(5).resize((384, 240))
    mask = Image.new("L", img.size, 0)
    ImageDraw.Draw(mask).ellipse((100, 40, 300, 200), fill=255)
    repaint = np.asarray(mask) >= 128
    kw = dict(image=img, mask=mask, prompt="red heart", seed=6, prior_steps=3, decoder_steps=3, upsampler_steps=2)
    default = tiny_engine.run(EditRequest(**kw))
    assert default.recipes[0]["feather"] == 12
    scaled, eight = (tiny_engine.run(EditRequest(**kw, feather=f)).images[0] for f in (12, 8))
    assert np.array_equal(_arr(default.images[0]), _arr(scaled))
    assert (_arr(eight) != _arr(scaled)).any(-1)[repaint].any()  # the wider band: other pixels inside the mask
    assert np.array_equal(_arr(eight)[~repaint], _arr(img)[~repaint])
    again = tiny_engine.run(request_from_recipe(default.recipes[0], image=img, mask=mask).validated())
    assert np.array_equal(_arr(again.images[0]), _arr(default.images[0]))
    old = {**default.recipes[0], "feather": 8}
    assert np.array_equal(_arr(tiny_engine.run(request_from_recipe(old, image=img, mask=mask).validated()).images[0]), _arr(eight))


def test_edit_accepts_an_rgba_image_and_keeps_its_rgb(tiny_engine):
    rgba = IMG_A.convert("RGBA")
    res = tiny_engine.run(EditRequest(image=rgba, mask=MASK, prompt="a green star", seed=1, prior_steps=3, decoder_steps=3, upsampler_steps=2))
    out, src = _arr(res.images[0]), _arr(IMG_A)
    assert res.images[0].size == (W, H)
    assert np.array_equal(out[~REPAINT], src[~REPAINT])


def test_generate_reports_progress_per_stage(tiny_engine):
    from unclip_cli.progress import Tick

    seen = []
    tiny_engine.run(req("generate", seed=1, n=3, batch_size=2), callback=seen.append)  # batches of 2 images, then 1
    assert [t for t in seen if t.stage == "prior"] == [Tick("prior", i, 3, b, 2, size=3 - b) for b in (1, 2) for i in (1, 2, 3)]
    assert [t for t in seen if t.stage == "decoder"] == [Tick("decoder", i, 3, b, 2, size=3 - b) for b in (1, 2) for i in (1, 2, 3)]
    assert [t for t in seen if t.stage == "upsampler"] == [Tick("upsampler", i, 2, b, 2, size=3 - b) for b in (1, 2) for i in (1, 2)]
    seen.clear()
    tiny_engine.run(req("blend", seed=1, frames=3), callback=seen.append)
    assert [t for t in seen if t.stage == "invert"] == [Tick("invert", i, 2, 1, 1, size=2) for i in (1, 2)]  # images A and B


def test_decoding_from_noise_starts_from_the_noised_training_mean(tiny_engine):
    """x at DECODER_T_START is sqrt(abar) * mean + sqrt(1 - abar) * eps, the mean from the checkpoint;
    when inpainting, known pixels replace the mean."""
    import torch

    from unclip_cli.engine import DECODER_T_START, Noise

    stage, s = tiny_engine.models.decoder, tiny_engine.base_size
    a = float(stage.diffusion.alphas_cumprod[DECODER_T_START])
    eps = Noise([5], tiny_engine.device)(3, s, s)
    saved = stage.extra.get("x_start_mean")
    try:
        stage.extra["x_start_mean"] = [[[0.5] * 8] * 8, [[-0.5] * 8] * 8, [[0.0] * 8] * 8]
        x = tiny_engine.decoder_start(Noise([5], tiny_engine.device))
        mean = torch.tensor([0.5, -0.5, 0.0]).view(1, 3, 1, 1)
        torch.testing.assert_close(x, a**0.5 * mean + (1 - a) ** 0.5 * eps)
        known, keep = torch.ones(1, 3, s, s), torch.zeros(1, 1, s, s)
        keep[..., : s // 2, :] = 1
        x = tiny_engine.decoder_start(Noise([5], tiny_engine.device), known, keep)
        torch.testing.assert_close(x, a**0.5 * (keep * known + (1 - keep) * mean) + (1 - a) ** 0.5 * eps)
    finally:
        stage.extra.pop("x_start_mean", None)
        if saved is not None:
            stage.extra["x_start_mean"] = saved
    # A set without a recorded mean (random weights) starts from zeros.
    torch.testing.assert_close(tiny_engine.decoder_start(Noise([5], tiny_engine.device)), (1 - a) ** 0.5 * eps)


def test_vary_at_full_strength_and_at_zero(tiny_engine):
    for strength in (0.0, 1.0):
        res = tiny_engine.run(req("vary", strength=strength, seed=3))
        assert res.images[0].size == (16, 16) and res.recipes[0]["strength"] == strength


def test_a_long_prompt_warns(tiny_engine):
    res = tiny_engine.run(GenerateRequest(prompt=" ".join(["cat"] * 40), seed=0, prior_steps=1, decoder_steps=1, upsampler_steps=1))
    assert any("truncated" in w for w in res.warnings)


def test_warnings_reach_the_callback_before_the_first_step(tiny_engine):
    """What a request warns of depends on it alone: handed to the callback once, before any Tick, as the same lines the
    result carries (a cut prompt, nudge's cut --to, an edit's mask resized); a request with nothing to say sends none."""
    from unclip_cli.progress import Tick, Warnings

    long = " ".join(["cat"] * 40)
    for r, says in ((req("generate", prompt=long, seed=0), "prompt truncated"), (req("nudge", to=long, seed=0), "prompt truncated"),
                    (req("edit", mask=MASK.resize((W // 2, H // 2)), seed=0), "resized")):
        seen = []
        res = tiny_engine.run(r, callback=seen.append)
        assert isinstance(seen[0], Warnings) and all(isinstance(e, Tick) for e in seen[1:]), seen[:2]
        assert list(seen[0].lines) == res.warnings and seen[0].request == 0 and says in res.warnings[0]
    seen = []
    assert tiny_engine.run(req("generate", seed=0), callback=seen.append).warnings == []
    assert seen and all(isinstance(e, Tick) for e in seen)


@pytest.mark.parametrize("texts", [("a cat", "a cat"), ("a cat", "  a  cat ")])
def test_nudge_with_the_same_text_both_sides_is_an_input_error(texts, tiny_engine):
    with pytest.raises(InputError):
        tiny_engine.run(req("nudge", to=texts[0], from_=texts[1]))


# -- input errors -------------------------------------------------------------------------------------------
FULL = Image.new("L", (W, H), 255)
EMPTY = Image.new("L", (W, H), 0)


@pytest.mark.parametrize(
    "call",
    [
        lambda e: e.run(req("generate", prompt="")),
        lambda e: e.run(req("generate", prompt="   \n")),
        lambda e: e.run(req("generate", n=0)),
        lambda e: e.run(req("generate", n=-1)),
        lambda e: e.run(req("generate", n=10_000)),
        lambda e: e.run(req("generate", prior_steps=0)),
        lambda e: e.run(req("generate", quality="ultra")),
        lambda e: e.run(req("generate", guidance=-1.0)),
        lambda e: e.run(req("vary", n=0)),
        lambda e: e.run(req("vary", strength=-0.1)),
        lambda e: e.run(req("vary", strength=1.5)),
        lambda e: e.run(req("blend", frames=1)),
        lambda e: e.run(req("nudge", to="")),
        lambda e: e.run(req("nudge", n=0)),
        lambda e: e.run(req("nudge", amount=0.0)),
        lambda e: e.run(req("nudge", amount=1.5)),
        lambda e: e.run(req("edit", prompt="")),
        lambda e: e.run(req("edit", n=0)),
        lambda e: e.run(req("edit", mask=EMPTY)),
        lambda e: e.run(req("edit", mask=FULL)),
        lambda e: e.run(req("edit", mask=Image.new("L", (H, W), 255))),
    ],
    ids=[
        "generate-empty-prompt", "generate-blank-prompt", "generate-n0", "generate-n-negative", "generate-n-huge",
        "generate-zero-steps", "generate-unknown-quality", "generate-negative-guidance", "vary-n0", "vary-strength-low",
        "vary-strength-high", "blend-one-frame", "nudge-empty-to", "nudge-n0", "nudge-amount-zero", "nudge-amount-high",
        "edit-empty-prompt", "edit-n0", "edit-empty-mask", "edit-full-mask", "edit-mask-size",
    ],
)
def test_input_errors(call, tiny_engine):
    with pytest.raises(InputError):
        call(tiny_engine)


def test_decoder_candidates_keep_the_sample_closest_to_z_i_per_image(tiny_engine):
    """With K decoder candidates each image is the best of its own K samples by CLIP cosine to z_i: it is one of
    the K, scores at least as well as each, and does not depend on the other images in the batch."""
    import torch
    import torch.nn.functional as F

    from unclip_cli.engine import Noise

    e = tiny_engine
    K = 3
    st = Steps(prior=2, decoder=2, upsampler=1, decoder_candidates=K)
    z_t, states, mask, _ = e.encode_text(["a red circle", "a blue square"])
    z_i = F.normalize(torch.randn(2, z_t.shape[1], generator=torch.Generator().manual_seed(0)), dim=-1)
    x = e.decode_from_noise(z_i, states, mask, Noise([4, 9], e.device), st, 3.0)
    # All K candidates of both images, drawn as decode_from_noise draws them, then scored.
    one = Steps(prior=2, decoder=2, upsampler=1)
    noise = Noise([4, 9], e.device)
    flat = lambda *shape: noise(K, *shape).flatten(0, 1)  # noqa: E731
    cands = e.decode_from_noise(z_i.repeat_interleave(K, 0), states.repeat_interleave(K, 0), mask.repeat_interleave(K, 0), flat, one, 3.0)
    emb = F.normalize(e.models.clip.model.encode_image(cands.clamp(-1, 1)).float(), dim=-1).view(2, K, -1)
    score = (emb * z_i[:, None]).sum(-1)  # (2, K)
    for b in range(2):
        picked = [k for k in range(K) if torch.equal(cands[b * K + k], x[b])]
        assert picked and score[b, picked[0]] >= score[b].max() - 1e-6
    alone = e.decode_from_noise(z_i[1:], states[1:], mask[1:], Noise([9], e.device), st, 3.0)
    assert torch.allclose(alone[0], x[1], atol=1e-5)
    assert not torch.allclose(x, e.decode_from_noise(z_i, states, mask, Noise([4, 9], e.device), one, 3.0), atol=1e-3)


def test_decoder_candidates_are_bounded(tiny_engine):
    with pytest.raises(InputError, match="decoder-candidates"):
        tiny_engine.run(req("generate", steps=Steps(1, 1, 1, decoder_candidates=0)))


# Golden numbers: the last 3x3 pixels (3 channels) of the tiny random set's output, before quantisation, recorded
# when model sets began to carry their own sampling recipe. The emoji policy (DPM-Solver++ prior, DDPM decoder from
# the noised mean at t = 800, DDIM upsampler from t = 400) must keep sampling exactly as it did.
GOLDEN = {
    "explicit": ([-1.0, -1.0, 0.41525, 0.635684, -0.65043, 0.521961, 1.0, 1.0, 0.458311, -0.165559, -0.373083, -0.327626, -1.0,
                  0.643261, 0.620745, -0.762228, 1.0, -0.108747, 0.013637, -0.189489, 0.506803, -0.147103, 0.225469, -1.0,
                  -0.534890, -0.449676, -0.302308], dict(prior_steps=3, decoder_steps=3, upsampler_steps=2)),
    "fast": ([-1.0, 0.107755, -1.0, -0.017245, -0.250549, 0.634326, 0.499212, -0.049927, 0.459346, -0.099078, 1.0, 1.0, 1.0,
              0.353336, 0.477330, -0.212891, -0.368235, -0.721116, 1.0, 0.686502, 0.337599, 0.707846, -0.240962, 1.0, -1.0,
              0.108534, 1.0], dict(quality="fast")),
}


@pytest.mark.parametrize("case", GOLDEN)
def test_golden_numbers_of_the_tiny_set(case, tiny_engine, monkeypatch):
    import torch

    from unclip_cli.engine import Engine

    want, kw = GOLDEN[case]
    seen = []
    finish = Engine.to_images
    monkeypatch.setattr(Engine, "to_images", lambda self, x: seen.append(x) or finish(self, x))
    tiny_engine.run(GenerateRequest(prompt="a red circle", seed=5, **kw))
    torch.testing.assert_close(seen[0][0, :, -3:, -3:].flatten(), torch.tensor(want), atol=1e-4, rtol=0)


def test_channels_last_for_the_upsamplers_only(tiny_engine, monkeypatch):
    """In float32 on a CPU the upsamplers' image inputs are laid out channels-last (measured faster there, issue 25);
    the decoder's are not (measured slower)."""
    import torch

    seen = {}

    def spy(name, net):
        forward = net.forward

        def f(x, t, **kw):
            seen.setdefault(name, set()).add(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
            return forward(x, t, **kw)

        monkeypatch.setattr(net, "forward", f)

    spy("decoder", tiny_engine.models.decoder.model)
    for k, stage in enumerate(tiny_engine.models.upsamplers):
        spy(f"upsampler {k}", stage.model)
    tiny_engine.run(GenerateRequest(prompt="a red circle", seed=5, quality="fast", precision="fp32"))
    assert seen == {"decoder": {False}, **{f"upsampler {k}": {True} for k in range(len(tiny_engine.models.upsamplers))}}


# -- issue 24: vary inverts without guidance and guides in proportion to strength ---------------------
def test_vary_inverts_unguided_and_guides_by_strength(tiny_engine, monkeypatch):
    seen = {"invert": [], "decode": []}
    invert, denoiser = tiny_engine.invert, tiny_engine.decoder_denoiser

    def spy_invert(z_i, x_start, steps, guidance, *a, **kw):
        seen["invert"].append(guidance)
        return invert(z_i, x_start, steps, guidance, *a, **kw)

    def spy_denoiser(z_i, scale, *a, **kw):
        seen["decode"].append(scale)
        return denoiser(z_i, scale, *a, **kw)

    monkeypatch.setattr(tiny_engine, "invert", spy_invert)
    monkeypatch.setattr(tiny_engine, "decoder_denoiser", spy_denoiser)
    res = tiny_engine.run(req("vary", strength=0.3, guidance=3.0, seed=1))
    assert seen["invert"] == [1.0] and seen["decode"][-1] == pytest.approx(1.6)  # 1 + (3 - 1) * 0.3
    assert res.recipes[0]["guidance_ramp"] is True and res.recipes[0]["guidance"] == 3.0

    # A recipe from before the ramp (no field) reruns as it was made: inverted and decoded at the constant scale.
    from unclip_cli.requests import request_from_recipe

    old = {k: v for k, v in res.recipes[0].items() if k != "guidance_ramp"}
    seen["invert"].clear(), seen["decode"].clear()
    again = request_from_recipe(old, image=IMG_A)
    assert again.guidance_ramp is False
    tiny_engine.run(again)
    assert seen["invert"] == [3.0] and seen["decode"][-1] == 3.0


def test_vary_at_strength_1_starts_where_text_to_image_decoding_does(tiny_engine, monkeypatch):
    """Strength turns the inverted x_t's noise toward fresh noise (at the decoder's start), so strength 1 starts from
    fresh noise there with DDIM eta 1 and needs no inversion. Recipes from before rerun as they were made: those from
    before 2026-12-05's first fix from fresh noise, those between the fixes with eta 1 from the noise inverted to T - 1."""
    from unclip_cli.requests import request_from_recipe

    seen = {"invert": 0, "eta": []}
    invert, run_decoder = tiny_engine.invert, tiny_engine.run_decoder
    monkeypatch.setattr(tiny_engine, "invert", lambda *a, **kw: seen.__setitem__("invert", seen["invert"] + 1) or invert(*a, **kw))
    monkeypatch.setattr(tiny_engine, "run_decoder", lambda *a, **kw: seen["eta"].append((kw.get("sampler"), kw.get("eta"), kw.get("start")))
                        or run_decoder(*a, **kw))
    t_start = tiny_engine.sampling.decoder_t_start
    res = tiny_engine.run(req("vary", strength=1.0, seed=2))
    assert seen == {"invert": 0, "eta": [("ddim", 1.0, t_start)]} and res.recipes[0]["invert_to_start"] is True
    between = {k: v for k, v in res.recipes[0].items() if k != "invert_to_start"}
    seen["invert"], seen["eta"] = 0, []
    tiny_engine.run(request_from_recipe(between, image=IMG_A))
    assert seen == {"invert": 1, "eta": [("ddim", 1.0, None)]}
    old = {k: v for k, v in between.items() if k != "fresh_at_one"}
    seen["invert"], seen["eta"] = 0, []
    again = request_from_recipe(old, image=IMG_A)
    assert again.fresh_at_one is True and again.invert_to_start is False
    tiny_engine.run(again)
    assert seen == {"invert": 0, "eta": [("ddim", 1.0, t_start)]}


def test_vary_blend_nudge_invert_to_the_decoders_start(tiny_engine, monkeypatch):
    """Below strength 1 the inversion stops at the set's decoder start and the decoding starts there; recipes from
    before (no `invert_to_start`) invert to T - 1 as they were made."""
    from unclip_cli.requests import request_from_recipe

    seen = []
    invert, run_decoder = tiny_engine.invert, tiny_engine.run_decoder
    monkeypatch.setattr(tiny_engine, "invert", lambda *a, **kw: seen.append(("invert", kw.get("start"))) or invert(*a, **kw))
    monkeypatch.setattr(tiny_engine, "run_decoder", lambda *a, **kw: seen.append(("decode", kw.get("start"))) or run_decoder(*a, **kw))
    t_start = tiny_engine.sampling.decoder_t_start
    for op, kw in (("vary", {"strength": 0.0}), ("vary", {"strength": 0.4}), ("blend", {"frames": 2}), ("nudge", {"amount": 0.2})):
        seen.clear()
        res = tiny_engine.run(req(op, seed=1, **kw))
        assert seen == [("invert", t_start), ("decode", t_start)] and res.recipes[0]["invert_to_start"] is True, op
        seen.clear()
        old = {k: v for k, v in res.recipes[0].items() if k != "invert_to_start"}
        tiny_engine.run(request_from_recipe(old, **({"image_a": IMG_A, "image_b": IMG_B} if op == "blend" else {"image": IMG_A})))
        assert seen == [("invert", None), ("decode", None)], op


def test_toward_fresh_keeps_the_image_at_0_and_is_the_decoders_start_at_1():
    import torch

    from unclip_cli.diffusion.gaussian import DiffusionConfig, GaussianDiffusion
    from unclip_cli.diffusion.policy import noised_mean, toward_fresh

    diffusion = GaussianDiffusion(DiffusionConfig())
    g = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    mean = torch.rand(3, 4, 4, generator=g).tolist()
    assert torch.equal(toward_fresh(diffusion, mean, x_t, eps, 800, 0.0), x_t)
    torch.testing.assert_close(toward_fresh(diffusion, mean, x_t, eps, 800, 1.0), noised_mean(diffusion, mean, eps, t_start=800))
    half = toward_fresh(diffusion, None, x_t, eps, 800, 0.5)
    a = diffusion.abar(800, x_t)
    own = x_t / (1 - a).sqrt()  # zero mean: all of x_t is noise
    assert (half / (1 - a).sqrt()).flatten(1).norm(dim=1).sub(own.flatten(1).norm(dim=1) / 2 + eps.flatten(1).norm(dim=1) / 2).abs().max() < 1e-4


def test_the_shipped_decoder_reconstructs_its_own_outputs():
    """Issue 24: inverted to T - 1, images the emoji set made itself came back distorted (a blue ear; 32 px RMSE 0.26-0.32
    at 20 steps on these tiles of tests/data/own-outputs.png); inverted to the decoder's start, where its decoding from
    noise starts, they reconstruct (0.02-0.04)."""
    from pathlib import Path

    import torch

    from unclip_cli.engine import Engine

    engine = Engine.load(Path(__file__).resolve().parents[1] / "weights" / "emoji", device="cpu", dtype=torch.float32)
    sheet = Image.open(Path(__file__).resolve().parent / "data" / "own-outputs.png").convert("RGB")
    tiles = [sheet.crop((64 * k, 0, 64 * k + 64, 64)) for k in (1, 2)]
    x0, rec = engine.reconstruct(tiles, 20, 1.0)
    rmse = lambda x: ((x.clamp(-1, 1) - x0) / 2).pow(2).mean((1, 2, 3)).sqrt()  # noqa: E731  (0-1 scale)
    z_i, _ = engine.base_inputs(tiles)
    x_T = engine.invert(z_i, x0, 20, 1.0)  # the old way: to T - 1
    old = engine.run_decoder(engine.decoder_denoiser(z_i, 1.0), x_T, 20, sampler="ddim", eta=0.0)
    assert rmse(rec).max() < 0.05 and rmse(old).min() > 0.15, (rmse(rec), rmse(old))


def test_nudge_inverts_unguided_and_guides_by_amount(tiny_engine, monkeypatch):
    seen = {"invert": [], "decode": []}
    invert, denoiser = tiny_engine.invert, tiny_engine.decoder_denoiser
    monkeypatch.setattr(tiny_engine, "invert", lambda z, x, s, g, *a, **kw: seen["invert"].append(g) or invert(z, x, s, g, *a, **kw))
    monkeypatch.setattr(tiny_engine, "decoder_denoiser", lambda z, g, *a, **kw: seen["decode"].append(g) or denoiser(z, g, *a, **kw))
    res = tiny_engine.run(req("nudge", amount=0.25, guidance=3.0, seed=1, n=2))
    assert seen["invert"] == [1.0] and seen["decode"][-1] == 1.5  # 1 + (3 - 1) * 0.25, one batch for both images
    assert [r["guidance_ramp"] for r in res.recipes] == [True, True]


def test_blend_inverts_unguided_and_guides_frames_by_distance_from_the_ends(tiny_engine, monkeypatch):
    seen = {"invert": [], "decode": []}
    invert, denoiser = tiny_engine.invert, tiny_engine.decoder_denoiser
    monkeypatch.setattr(tiny_engine, "invert", lambda z, x, s, g, *a, **kw: seen["invert"].append(g) or invert(z, x, s, g, *a, **kw))
    monkeypatch.setattr(tiny_engine, "decoder_denoiser", lambda z, g, *a, **kw: seen["decode"].append((z.shape[0], g)) or denoiser(z, g, *a, **kw))
    res = tiny_engine.run(req("blend", frames=5, guidance=3.0, seed=1))
    # the inversion of A and B unguided; then one denoiser per scale: the end frames unguided, 1/4 and 3/4 at
    # 1 + 2 * 0.5, the middle at the full 3
    assert seen["invert"] == [1.0] and sorted(seen["decode"]) == [(1, 3.0), (2, 1.0), (2, 1.0), (2, 2.0)]
    assert [r["guidance_ramp"] for r in res.recipes] == [True] * 5

    from unclip_cli.requests import request_from_recipe

    old = {k: v for k, v in res.recipes[2].items() if k != "guidance_ramp"}
    seen["invert"].clear(), seen["decode"].clear()
    again = request_from_recipe(old, image_a=IMG_A, image_b=IMG_B)
    assert again.guidance_ramp is False
    tiny_engine.run(again)
    assert seen["invert"] == [3.0] and seen["decode"] == [(2, 3.0), (5, 3.0)]


def test_operations_through_an_inversion_take_at_least_the_recipes_inversion_steps():
    from unclip_cli.diffusion.recipe import KARLO

    fast = dict(quality="fast", image=IMG_A)
    assert VaryRequest(strength=0.5, **fast).steps.decoder == 40  # fast's 10, raised
    assert VaryRequest(strength=1.0, **fast).steps.decoder == 40  # eta 1 from the inverted noise, like every strength
    assert VaryRequest(strength=1.0, fresh_at_one=True, **fast).steps.decoder == 10  # recipes from before: fresh noise, no inversion
    assert VaryRequest(strength=1.0, **fast).under(KARLO).inverts is False  # diffusers' variations: fresh noise
    assert NudgeRequest(to="x", **fast).steps.decoder == 40 and BlendRequest(quality="best", image_a=IMG_A, image_b=IMG_B).steps.decoder == 100
    assert VaryRequest(strength=0.5, decoder_steps=12, **fast).steps.decoder == 12  # explicit steps (and recipes) as given
    assert VaryRequest(strength=0.5, **fast).under(KARLO).steps.decoder == 15  # a set's own recipe decides
