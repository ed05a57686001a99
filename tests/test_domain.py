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


def test_warns_on_sample_photographs_and_on_fewer_than_5_percent_of_held_out_emoji(shipped):
    data = pytest.importorskip("skimage.data", reason="pip install scikit-image (a test dependency) for its sample photographs")
    photos = [Image.fromarray(np.asarray(getattr(data, name)())) for name in PHOTOS]
    flagged = [name for name, im in zip(PHOTOS, photos) if domain.image_warning(shipped, name, im)]
    assert flagged == PHOTOS
    emoji = _held_out_emoji()
    false_alarms = sum(domain.image_warning(shipped, "emoji", im) is not None for im in emoji)
    assert false_alarms < 5  # of 100; the calibration measured 2.1% of all 910 held-out emoji
    assert domain.image_warning(shipped, "chelsea.png", photos[3]) == \
        "chelsea.png is far from the emoji this model knows: expect abstract results"


def test_prompt_warning_names_the_words_the_model_never_saw(shipped):
    from unclip_cli.modelset import load_model_set

    clip = load_model_set(WEIGHTS).clip.model
    for prompt in ("cat face", "red heart", "猫", "an emoji of a smiling face with sunglasses"):
        assert domain.prompt_warning(shipped, clip, "the prompt", prompt) is None, prompt
    w = domain.prompt_warning(shipped, clip, "the prompt", "a photograph of a busy street in Tokyo at night")
    assert w is not None and "(photograph, busy, street)" in w and w.startswith("the prompt has words this model never saw")


def test_the_card_and_the_file_agree_with_the_calibration(shipped):
    facts = json.loads((WEIGHTS / "domain.json").read_text())["facts"]
    assert facts["images"]["false_alarms_on_held_out_emoji"] < 0.05 and facts["images"]["photos_flagged"] == facts["images"]["photos"]
    assert shipped.white_share_min == facts["images"]["threshold"]


@pytest.mark.parametrize("text", ["{", '{"subject": "emoji"}', '{"subject": "\\u001b[2J", "white_share_min": 0.2}',
                                  '{"subject": "emoji", "white_share_min": "low"}', '{"subject": "emoji", "white_share_min": 7}'])
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
