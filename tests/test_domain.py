"""The out-of-domain warning of the shipped set: calibrated on held-out emoji, it must fire on photographs
and stay quiet on emoji. Uses weights/emoji/domain.json and the set's CLIP; no sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unclip_cli import domain

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "weights" / "emoji"
PHOTOS = ["astronaut", "camera", "cell", "chelsea", "coffee", "coins", "grass", "gravel", "brick", "hubble_deep_field",
          "immunohistochemistry", "moon", "retina", "rocket", "clock"]


@pytest.fixture(scope="module")
def shipped():
    found = domain.load_domain(WEIGHTS)
    assert found is not None, "weights/emoji has no domain.json"
    return found


def _held_out_emoji() -> list[Image.Image]:
    """The 100 held-out emoji of tests/data (a 10 x 10 sheet of 64 px tiles; see its ATTRIBUTION file)."""
    sheet = Image.open(ROOT / "tests" / "data" / "held-out-emoji.png").convert("RGB")
    return [sheet.crop((64 * (k % 10), 64 * (k // 10), 64 * (k % 10) + 64, 64 * (k // 10) + 64)) for k in range(100)]


def _sheet(name: str, count: int | None = None) -> list[Image.Image]:
    """The 64 px tiles of a sheet in tests/data, row by row."""
    sheet = Image.open(ROOT / "tests" / "data" / name).convert("RGB")
    n = count or (sheet.width // 64) * (sheet.height // 64)
    cols = sheet.width // 64
    return [sheet.crop((64 * (k % cols), 64 * (k // cols), 64 * (k % cols) + 64, 64 * (k // cols) + 64)) for k in range(n)]


def _flagged(shipped, images) -> int:
    return sum(domain.image_warning(shipped, "x.png", im) is not None for im in images)


def _calibration():
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    import calibrate_domain_images

    return calibrate_domain_images


def test_photographs_are_flagged_as_calibrated(shipped):
    pytest.importorskip("skimage.data", reason="pip install scikit-image (a test dependency) for its sample photographs")

    _calibration()
    from calibrate_domain import PHOTOS, skimage_images

    photos = skimage_images(PHOTOS)
    missed = [name for name, im in photos if domain.image_warning(shipped, name, im) is None]
    assert len(missed) <= 0.1 * len(photos)  # at least 90% flagged
    assert set(missed) <= set(json.loads((WEIGHTS / "domain.json").read_text())["facts"]["images"]["not_flagged"]["photographs (fit)"])
    chelsea = dict(photos)["chelsea"]
    assert domain.image_warning(shipped, "chelsea.png", chelsea) == "chelsea.png is far from the emoji this model knows: expect abstract results"


def test_held_out_emoji_rarely_warn(shipped):
    assert _flagged(shipped, _held_out_emoji()) <= 5  # of 100; the calibration measured it on all 910


def test_full_frame_and_coloured_background_emoji_rarely_warn(shipped):
    cal = _calibration()
    rng = np.random.default_rng(1)
    tiles = _held_out_emoji()
    assert _flagged(shipped, [cal.full_frame(im) for im in tiles]) <= 5
    assert _flagged(shipped, [cal.recolour(im, tuple(int(v) for v in rng.integers(0, 256, 3))) for im in tiles]) <= 5


OWN_SHEET = {"generated": (0, 60), "vary": (60, 75), "edit": (75, 90), "nudge": (90, 105), "blend": (105, 120)}


@pytest.mark.parametrize("op", list(OWN_SHEET))
def test_the_models_own_outputs_rarely_warn(shipped, op):
    """tests/data/own-outputs.png: 60 generated images of the set and 15 each of vary, edit, nudge and blend
    (scripts/calibrate_domain_images.py --sheet), as the test measures them (64 px); ~150 of each in the
    calibration, at most 2% flagged each: here at most one of 15 (generated: of 60)."""
    a, b = OWN_SHEET[op]
    own = _sheet("own-outputs.png")[a:b]
    assert len(own) == b - a
    assert _flagged(shipped, own) <= 1, op


def test_the_photograph_score_catches_what_the_white_test_lets_through(shipped):
    """Sky, snow and pale backgrounds pass the white-share and border tests; the photograph score (texture, colours,
    gradients) flags them. Photographs that pass the first test are flagged by the score alone, and no held-out
    emoji passing the first test is."""
    data = pytest.importorskip("skimage.data", reason="pip install scikit-image (a test dependency) for its sample photographs")
    photo = shipped.image_rule["photo"]
    rule_only = domain.Domain(shipped.subject, shipped.white_share_min, {},
                              image_rule={k: v for k, v in shipped.image_rule.items() if k not in domain.SCORES})
    # scikit-image's Hubble deep field: a black field of stars whose border the background test reads as one colour
    im = Image.fromarray(data.hubble_deep_field())
    assert domain.in_domain(rule_only, im) and not domain.in_domain(shipped, im)
    assert domain.photo_score(photo, domain.features(im)) > photo["threshold"]
    emoji = _held_out_emoji()[:30]
    assert all(domain.photo_score(photo, domain.features(im)) <= photo["threshold"] for im in emoji)
    assert list(domain.features(emoji[0])[:4]) == pytest.approx([domain.white_share(emoji[0]), *domain.background(emoji[0]).values()])


SCREENS_FIT = 39  # tests/data/screens.png: the fit half's 39 tiles, then the 38 held out (77, row by row)


def test_screenshots_and_documents_are_flagged_as_calibrated(shipped):
    """tests/data/screens.png (scripts/collect_screens.py: web pages, man pages and this repo's docs rendered by headless
    Chromium, and charts, text pages, tables, diagrams, terminals and dialogs drawn with PIL), as measured (64 px): each
    half flagged exactly as the calibration counted, the held-out half at least 90%; and it is the screen score that
    flags them: without it (the rule and the photograph score, as shipped before) a newcomer's web page passed."""
    tiles = _sheet("screens.png", 77)
    groups = json.loads((WEIGHTS / "domain.json").read_text())["facts"]["images"]["groups"]
    fit, held = tiles[:SCREENS_FIT], tiles[SCREENS_FIT:]
    assert (len(fit), len(held)) == (groups["screenshots and documents (fit)"]["n"], groups["screenshots and documents (held out)"]["n"])
    assert _flagged(shipped, fit) == groups["screenshots and documents (fit)"]["flagged"] == 36
    assert _flagged(shipped, held) == groups["screenshots and documents (held out)"]["flagged"] == 35
    before = domain.Domain(shipped.subject, shipped.white_share_min, {},
                           image_rule={k: v for k, v in shipped.image_rule.items() if k != "screen"})
    assert _flagged(before, held) == 8
    node_http = held[22]  # Node.js's http docs at 1920x1080 (held out, by name: the pages after the drawings)
    assert domain.in_domain(before, node_http) and not domain.in_domain(shipped, node_http)
    screen = shipped.image_rule["screen"]
    assert domain.photo_score(screen, domain.features(node_http, tuple(screen["statistics"]))) > screen["threshold"]


def test_the_screen_statistics_tell_ink_from_a_drawing():
    """`ink_run` (log2 of the mean run of ink along rows and columns) is short for text and long for one drawing;
    `anisotropy` is the vertical steps' share: horizontal lines of text have more of them."""
    page = Image.new("RGB", (64, 64), "white")
    for y in range(4, 60, 4):  # lines of "text": dashes of 2 px with 1 px gaps
        for x in range(4, 60, 3):
            page.putpixel((x, y), (40, 40, 40))
            page.putpixel((x + 1, y), (40, 40, 40))
    disc = Image.new("RGB", (64, 64), "white")
    from PIL import ImageDraw

    ImageDraw.Draw(disc).ellipse((8, 8, 56, 56), fill=(255, 200, 40))
    names = domain.INK
    p, d = (dict(zip(names, domain.features(im, names))) for im in (page, disc))
    assert p["ink"] == pytest.approx(14 * 19 * 2 / 64**2) and p["ink_saturation"] == 0.0
    assert p["ink_run"] < 1.5 < 4 < d["ink_run"] and p["anisotropy"] > 0.6 > d["anisotropy"] > 0.4
    assert d["ink_saturation"] == pytest.approx(1 - 40 / 255, abs=0.01) and 0.4 < d["ink"] < 0.5


def test_prompt_warning_names_the_words_the_model_never_saw(shipped):
    from unclip_cli.modelset import load_model_set

    clip = load_model_set(WEIGHTS).clip.model
    warning = lambda text: domain.prompt_warning("the prompt", domain.unknown_words(clip, text, shipped.chars))  # noqa: E731
    for prompt in ("cat face", "red heart", "猫", "an emoji of a smiling face with sunglasses"):
        assert warning(prompt) is None, prompt
    w = warning("a photograph of a busy street in Tokyo at night")
    assert w is not None and "(photograph, busy, street)" in w and w.startswith("the prompt has words this model never saw")


def test_the_card_and_the_file_agree_with_the_calibration(shipped):
    raw = json.loads((WEIGHTS / "domain.json").read_text())
    groups = raw["facts"]["images"]["groups"]
    assert groups["held-out emoji"]["rate"] <= 0.02 and groups["full-frame emoji"]["rate"] <= 0.05
    assert groups["emoji on a coloured background"]["rate"] <= 0.05
    # Photographs: scikit-image's (test_photographs_are_flagged_as_calibrated: 90%), wallpapers and opencv-doc's
    # (scripts/collect_photos.py) in the fit; the held-out ones took no part in fitting or choosing. Issue 24 asks 90%.
    assert groups["photographs (fit)"]["rate"] >= 0.9 and raw["facts"]["images"]["photo_score"]["fit_photographs_cross_validated"]["rate"] >= 0.9
    assert groups["photographs (held out)"]["n"] >= 30 and groups["photographs (held out)"]["rate"] >= 0.9
    assert groups["screenshots and documents (held out)"]["n"] >= 30 and groups["screenshots and documents (held out)"]["rate"] >= 0.9
    assert groups["own outputs: generated"]["n"] >= 500 and raw["facts"]["images"]["own_outputs_pooled"]["rate"] <= 0.02
    for op in ("vary", "edit", "nudge", "blend"):  # enough of each that one false alarm is under 1%
        assert groups[f"own outputs: {op}"]["n"] >= 100 and groups[f"own outputs: {op}"]["rate"] <= 0.02, op
    assert shipped.white_share_min == raw["white_share_min"] and shipped.image_rule == raw["image_rule"]
    card = (WEIGHTS / "MODEL_CARD.md").read_text()
    for k, g in groups.items():
        assert f"| {k} | {g['n']} | {g['flagged']} " in card, k


_RULE = '"image_rule": {"ring_share_min": 0.4, "saturation_min": 0.1, "lightness_min": 0.7, "photo": %s}'
_TEN = "[" + ", ".join(["1"] * 10) + "]"


@pytest.mark.parametrize("text", ["{", '{"subject": "emoji"}', '{"subject": "\\u001b[2J", "white_share_min": 0.2}',
                                  '{"subject": "emoji", "white_share_min": "low"}', '{"subject": "emoji", "white_share_min": 7}',
                                  '{"subject": "emoji", "white_share_min": 0.04, %s}' % (_RULE % '"photo"'),
                                  '{"subject": "emoji", "white_share_min": 0.04, %s}' % (_RULE % ('{"mean": [1, 2], "scale": %s, "weights": %s, '
                                                                                                   '"bias": 0, "threshold": 1}' % (_TEN, _TEN))),
                                  '{"subject": "emoji", "white_share_min": 0.04, %s}' % (_RULE % ('{"mean": %s, "scale": %s, "weights": %s, '
                                                                                                   '"bias": 0, "threshold": NaN}' % (_TEN, _TEN, _TEN))),
                                  # a screen score naming a statistic the code does not compute, or too few numbers for its names
                                  '{"subject": "emoji", "white_share_min": 0.04, "image_rule": {"ring_share_min": 0.4, "saturation_min": 0.1, '
                                  '"lightness_min": 0.7, "screen": {"statistics": ["ink", "os.system"], "mean": [0, 0], "scale": [1, 1], '
                                  '"weights": [1, 1], "bias": 0, "threshold": 1}}}',
                                  '{"subject": "emoji", "white_share_min": 0.04, "image_rule": {"ring_share_min": 0.4, "saturation_min": 0.1, '
                                  '"lightness_min": 0.7, "screen": {"statistics": ["ink", "ink_run"], "mean": [0], "scale": [1], '
                                  '"weights": [1], "bias": 0, "threshold": 1}}}'])
def test_a_damaged_domain_file_is_an_error_naming_it(tmp_path, text):
    from unclip_cli.errors import WeightsError

    (tmp_path / domain.FILE).write_text(text)
    with pytest.raises(WeightsError, match="domain.json"):
        domain.load_domain(tmp_path)


def test_vary_on_a_photograph_warns_and_still_answers(tmp_path):
    """The warning reaches the user through the engine: one line on stderr, in --json, and the image is written."""
    data = pytest.importorskip("skimage.data", reason="pip install scikit-image (a test dependency) for its sample photographs")
    from clirun import cli

    photo = tmp_path / "chelsea.png"
    Image.fromarray(data.chelsea()).save(photo)
    r = cli("vary", photo, "--weights", WEIGHTS, "--decoder-steps", "2", "--upsampler-steps", "1", "--seed", "0", "--json",
            "--out", tmp_path / "out", "--device", "cpu")
    assert r.code == 0, r.err
    res = json.loads(r.out)
    assert res["warnings"] == ["chelsea.png is far from the emoji this model knows: expect abstract results"]
    assert "Warning: chelsea.png is far from the emoji" in r.err and Path(res["images"][0]["path"]).is_file()
