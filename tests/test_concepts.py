"""What the model can draw (issue 24, item 2): the set's concept list, `unclip concepts`, and the note that
names the closest concepts when a prompt is far from all of them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from clirun import cli
from unclip_cli import domain

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "weights" / "emoji"
CONCEPTS = [{"concept": "1F431", "emoji": "🐱", "en": "cat face", "zh": "猫脸", "keywords_en": ["kitten", "pet"], "keywords_zh": ["猫"], "images": 6},
            {"concept": "1F408", "emoji": "🐈", "en": "cat", "zh": "猫", "keywords_en": ["pet"], "keywords_zh": [], "images": 5},
            {"concept": "2764", "emoji": "❤", "en": "red heart", "zh": "红心", "keywords_en": ["love"], "keywords_zh": ["爱"], "images": 6}]


def tiny_set(tiny_weights, tmp_path, note: float | None = None) -> Path:
    ws = tmp_path / "set"
    shutil.copytree(tiny_weights, ws)
    raw = {"concepts": CONCEPTS, **({"note": {"cosine_min": note}} if note is not None else {})}
    (ws / domain.CONCEPTS_FILE).write_text(json.dumps(raw, ensure_ascii=False), encoding="utf-8")
    return ws


def test_search_ranks_whole_names_then_names_then_keywords():
    assert [c["en"] for c in domain.search_concepts(CONCEPTS, "cat")] == ["cat", "cat face"]
    assert [c["en"] for c in domain.search_concepts(CONCEPTS, "PET")] == ["cat", "cat face"]
    assert [c["en"] for c in domain.search_concepts(CONCEPTS, "猫")] == ["cat", "cat face"]
    assert [c["en"] for c in domain.search_concepts(CONCEPTS, "love")] == ["red heart"]
    assert domain.search_concepts(CONCEPTS, "rocket") == []


def test_the_shipped_set_lists_what_it_was_trained_on():
    listed = domain.load_concepts(SHIPPED)
    assert len(listed.entries) == 1948 and sum(c["images"] for c in listed.entries) == 20117  # the training split
    names = {c["en"] for c in listed.entries}
    assert {"cat face", "red heart", "rocket", "pizza"} <= names and "猫脸" in {c["zh"] for c in listed.entries}
    assert listed.cosine_min is not None and listed.facts["held_out_rate"] <= 0.03


def test_concepts_command(tiny_weights, tmp_path):
    ws = tiny_set(tiny_weights, tmp_path)
    r = cli("concepts", "cat", "--weights", ws)
    assert r.code == 0, r.err
    assert r.out.splitlines()[0] == "2 concepts match 'cat':" and "cat face · 猫脸" in r.out
    res = json.loads(cli("concepts", "--json", "--limit", "0", "--weights", ws).out)
    assert res["total"] == 3 and [c["en"] for c in res["concepts"]] == ["cat face", "cat", "red heart"]
    r = cli("concepts", "a blue bicycle", "--weights", ws)  # no name has it: the nearest by the set's CLIP
    assert r.code == 0 and r.out.startswith("No concept is named 'a blue bicycle'; the nearest by meaning:") and len(r.out.splitlines()) == 4
    r = cli("concepts", "cat", "--weights", tiny_weights)
    assert r.code == 1 and "lists no concepts" in r.err


def test_note_names_the_closest_concepts_below_the_threshold(tiny_weights, tmp_path):
    from unclip_cli.engine import Engine
    from unclip_cli.requests import GenerateRequest

    steps = {"prior_steps": 1, "decoder_steps": 1, "upsampler_steps": 1}
    quiet = Engine.load(tiny_set(tiny_weights, tmp_path / "a", note=-1.0), device="cpu")
    assert not [w for w in quiet.run(GenerateRequest(prompt="a bicycle", seed=0, **steps)).warnings if "concept" in w]
    loud = Engine.load(tiny_set(tiny_weights, tmp_path / "b", note=1.0), device="cpu")
    near = loud.nearest_concepts("a bicycle", 3)
    assert len(near) == 3 and near[0][0] >= near[1][0] >= near[2][0]
    notes = [w for w in loud.run(GenerateRequest(prompt="a bicycle", seed=0, **steps)).warnings if "concept" in w]
    assert notes == [f"the prompt is far from every concept this model was trained on; the closest are "
                     f"{', '.join(c['en'] for _, c in near)} (`unclip concepts` lists them)"]


@pytest.mark.parametrize("text", ["{", '{"concepts": 3}', '{"concepts": [{"en": "x"}]}', '{"concepts": [], "note": {"cosine_min": 7}}'])
def test_a_damaged_concepts_file_is_an_error_naming_it(tmp_path, text):
    from unclip_cli.errors import WeightsError

    (tmp_path / domain.CONCEPTS_FILE).write_text(text)
    with pytest.raises(WeightsError, match="concepts.json"):
        domain.load_concepts(tmp_path)
