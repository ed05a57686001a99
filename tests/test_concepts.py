"""What the model can draw (issue 24, item 2): the set's concept list, `unclip concepts`, and the note that
names the closest concepts when a prompt names none of them."""

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


def tiny_set(tiny_weights, tmp_path, note: bool = False) -> Path:
    ws = tmp_path / "set"
    shutil.copytree(tiny_weights, ws)
    raw = {"concepts": CONCEPTS, **({"note": {"rule": "names"}} if note else {})}
    (ws / domain.CONCEPTS_FILE).write_text(json.dumps(raw, ensure_ascii=False), encoding="utf-8")
    return ws


def test_search_ranks_whole_names_then_names_then_keywords():
    assert [c["en"] for c in domain.search_concepts(CONCEPTS, "cat")] == ["cat", "cat face"]
    assert [c["en"] for c in domain.search_concepts(CONCEPTS, "PET")] == ["cat", "cat face"]
    assert [c["en"] for c in domain.search_concepts(CONCEPTS, "猫")] == ["cat", "cat face"]
    assert [c["en"] for c in domain.search_concepts(CONCEPTS, "love")] == ["red heart"]
    assert domain.search_concepts(CONCEPTS, "rocket") == []


MORE = [{"concept": c, "emoji": "", "en": en, "zh": zh, "keywords_en": k, "keywords_zh": [], "images": 6} for c, en, zh, k in [
    ("1F1E6", "regional indicator A", "区域指示符A", []), ("1FAAA", "identification card", "身份证", ["credentials"]),
    ("1F3CE", "racing car", "赛车", ["racing"]), ("1F697", "automobile", "汽车", ["car"]), ("1F9E3", "scarf", "围巾", ["neck"]),
    ("1F955", "carrot", "胡萝卜", ["food"]), ("1FAA7", "placard", "标语牌", ["picket"]), ("1F6D2", "shopping cart", "购物车", ["trolley"])]]


def test_search_ranks_whole_words_before_pieces_of_words():
    """`concepts cat` listed ten "regional indicator" letters (ind-icat-or) in its first 20 and `concepts car` scarf,
    carrot and placard before "automobile": whole words first (names, then keywords), then words that start with the
    query; a piece inside a word only when nothing else matches."""
    listed = CONCEPTS + MORE
    assert [c["en"] for c in domain.search_concepts(listed, "cat")] == ["cat", "cat face"]
    assert [c["en"] for c in domain.search_concepts(listed, "car")] == ["racing car", "automobile", "carrot", "shopping cart",
                                                                          "identification card"]
    assert [c["en"] for c in domain.search_concepts(listed, "ndicat")] == ["regional indicator A"]  # nothing better: pieces
    assert [c["en"] for c in domain.search_concepts(listed, "🐱")] == ["cat face"]
    assert [c["en"] for c in domain.search_concepts(listed, "cats")] == []  # a plural query is no word of "cat"
    assert [c["en"] for c in domain.search_concepts(listed, "车")] == ["automobile", "racing car", "shopping cart"]  # Chinese: characters
    shipped = domain.load_concepts(SHIPPED).entries
    first = [c["en"] for c in domain.search_concepts(shipped, "cat")[:20]]
    assert first[:2] == ["cat", "cat face"] and not any("indicator" in n or "identification" in n for n in first)
    car = [c["en"] for c in domain.search_concepts(shipped, "car")]
    assert car.index("automobile") < 10 and not {"scarf", "carrot", "placard"} & set(car[:car.index("automobile")])


def test_concepts_says_when_the_nearest_by_meaning_are_far(tiny_weights, tmp_path):
    """Some concepts are always nearest by meaning; a query with no letter at all has none (the tiny set's CLIP has a
    row for every token, so it cannot tell an unknown word)."""
    ws = tiny_set(tiny_weights, tmp_path)
    for query, far in (("12345", True), ("a blue bicycle", False)):
        r = cli("concepts", query, "--weights", ws)
        assert r.code == 0 and len(r.out.splitlines()) == 4, r.err
        assert r.out.splitlines()[0] == (f"No concept is named '{query}', and none is close in meaning (it has no words): the model is "
                                         "unlikely to draw it. The nearest anyway:" if far else
                                         f"No concept is named '{query}'; the nearest by meaning:")
        res = json.loads(cli("concepts", query, "--json", "--weights", ws).out)
        assert res["matched_by"] == "meaning" and res["far"] is far and res["unknown_words"] == []


def test_the_shipped_set_calls_nonsense_far_and_never_a_concept_name():
    """The rule (`domain.far_in_meaning`): a word the set's CLIP never saw, or no letter. Its CLIP cosine could not
    tell: nonsense is as near some name as the held-out prompts (scripts/calibrate_concepts_meaning.py)."""
    import sys

    from unclip_cli.engine import Engine

    sys.path.insert(0, str(ROOT / "scripts"))
    from calibrate_concepts_meaning import nonsense

    facts = json.loads((SHIPPED / domain.CONCEPTS_FILE).read_text(encoding="utf-8"))["meaning"]["facts"]
    assert facts["held_out"]["prompts"] == 996 and facts["held_out"]["far"] == 0 and facts["concept_names"]["far"] == 0
    assert facts["nonsense"] == {"prompts": 400, "far": 374, "rate": 0.935, "best_cosine_median": 0.8286}
    assert abs(facts["nonsense"]["best_cosine_median"] - facts["held_out"]["best_cosine_median"]) < 0.01
    engine = Engine.load(SHIPPED, device="cpu")
    far = lambda t: domain.far_in_meaning(t, engine.unknown_words(t))  # noqa: E731
    assert sum(map(far, nonsense())) == 374  # as recorded
    assert not any(far(c[lang]) for c in engine.concepts.entries for lang in ("en", "zh"))  # no name is far
    r = cli("concepts", "zzzqqq")
    assert r.code == 0 and r.out.startswith("No concept is named 'zzzqqq', and none is close in meaning (this model never saw "
                                            "'zzzqqq' in training)")


def test_a_sentence_of_several_objects_is_pointed_to_compose():
    listed = domain.ConceptList(CONCEPTS, note=True)
    for prompt in ("two cats", "a cat to the left of a red heart"):
        assert domain.concept_note(listed, prompt, layout=True).endswith("; for several objects or where they go, try `unclip compose`")
        assert "compose" not in domain.concept_note(listed, prompt)  # not from edit, say
    assert "compose" not in domain.concept_note(listed, "a cat", layout=True)


def test_the_shipped_set_lists_what_it_was_trained_on():
    listed = domain.load_concepts(SHIPPED)
    assert len(listed.entries) == 1948 and sum(c["images"] for c in listed.entries) == 20117  # the training split
    names = {c["en"] for c in listed.entries}
    assert {"cat face", "red heart", "rocket", "pizza"} <= names and "猫脸" in {c["zh"] for c in listed.entries}
    assert listed.note and listed.facts["held_out"]["rate"] <= 0.02 and listed.facts["concept_names"]["noted"] == 0
    assert listed.facts["everyday"]["rate"] >= 0.9  # the old CLIP-cosine note: 0 of 48
    assert listed.named("an emoji of astronaut with dark skin tone in Noto style")["en"] == "astronaut with dark skin tone"
    assert listed.named("宇航员")["en"].startswith("astronaut")  # the name without its skin tone


def test_a_prompt_names_a_concept_only_by_its_name():
    listed = domain.ConceptList(CONCEPTS, note=True)
    for prompt in ("cat face", "Cat  Face", "an emoji of cat face in Noto style", "Noto风格的猫脸表情符号", "猫脸表情",
                   "cat face, OpenMoji style"):
        assert listed.named(prompt)["en"] == "cat face", prompt
    # an article, number or measure word makes it another prompt ("a tiger" drew no tiger where "tiger" did)
    for prompt in ("a cat face", "two cats", "一只猫", "a red car", "a cat sleeping on a sofa", "red", "小猫", "hearts"):
        assert listed.named(prompt) is None, prompt
    assert [c["en"] for c in listed.closest("a cat")] == ["cat", "cat face"]  # its own name first
    assert [c["en"] for c in listed.closest("a cat sleeping on a sofa")] == ["cat", "cat face"]
    assert [c["en"] for c in listed.closest("一只可爱的小猫")][:2] == ["cat", "cat face"]
    assert [c["en"] for c in listed.closest("I love you")] == ["red heart"]  # a keyword, at half weight
    assert listed.closest("a lighthouse") == []


def test_closest_on_the_shipped_list_is_the_full_index_it_replaced():
    """`closest` tokenizes only the entries whose text holds a prompt's words; ranked as by an index of every entry's
    words (what it built before, most of a cold prompt's cost), for prompts of each kind, asked again as well."""
    import numpy as np
    listed = domain.load_concepts(SHIPPED)
    entries, words_of, index, counts = listed.entries, [], {}, {}
    for i, c in enumerate(entries):  # name words (a skin tone's taken off) and other keyword words; rarity counts both
        raw = domain._name_words(c["en"]) | domain._name_words(c["zh"])
        keys = set().union(*map(domain._name_words, c["keywords_en"] + c["keywords_zh"]))
        names = domain._name_words(domain._TONE.sub("", c["en"])) | domain._name_words(domain._TONE.sub("", c["zh"]))
        words_of.append((names, keys - names))
        for w in raw | keys:
            counts[w] = counts.get(w, 0) + 1
        for w in names | keys:
            index.setdefault(w, []).append(i)
    idf = {w: float(np.log(1 + len(entries) / m)) for w, m in counts.items()}

    def reference(text: str) -> list[dict]:  # all that share a word, best first
        words, scored = domain._name_words(domain.names_of(text)[-1]) - domain._STOP, []
        for i in sorted(set().union(*(index.get(w, ()) for w in words))):
            names, keys = words_of[i]
            score = sum(idf.get(w, 0.0) for w in words & names) + 0.5 * sum(idf.get(w, 0.0) for w in words & keys)
            scored += [(-score, len(entries[i]["en"]), entries[i]["en"], entries[i])] if score > 0 else []
        return [c for *_, c in sorted(scored, key=lambda r: r[:3])]

    prompts = ["an emoji of a red apple", "a cat sleeping on a sofa", "two cats", "dogs and puppies", "glasses", "grass",
               "buses", "racing cars in Noto style", "I love you", "party", "thumbs up with dark skin tone", "skin tone",
               "a woman with medium-light skin tone", "light", "Mx Claus", "OK hand", "1st place", "e", "x", "flag: japan",
               "一只可爱的小猫", "红色的苹果", "Noto风格的火箭表情符号", "较浅肤色", "圣诞奶奶（中等-深肤色）", "竖起大拇指",
               "🍎", "a 🐱 emoji", "café", "ΟΔΟΣ", "xyzzy plugh", "the of a", "", "   "]
    for text in prompts:
        ranked = reference(text)
        assert listed.closest(text) == ranked[:3] and listed.closest(text, len(entries)) == ranked, text
    fresh = domain.load_concepts(SHIPPED)
    assert fresh.closest(prompts[0]) == reference(prompts[0])[:3] and len(fresh._words) < 100  # only those tokenized


def test_concepts_command(tiny_weights, tmp_path):
    ws = tiny_set(tiny_weights, tmp_path)
    r = cli("concepts", "cat", "--weights", ws)
    assert r.code == 0, r.err
    assert r.out.splitlines()[0] == "2 concepts match 'cat':" and "cat face · 猫脸" in r.out
    res = json.loads(cli("concepts", "--json", "--limit", "0", "--weights", ws).out)
    assert res["total"] == 3 and [c["en"] for c in res["concepts"]] == ["cat face", "cat", "red heart"]
    r = cli("concepts", "a blue bicycle", "--weights", ws)  # no name has it: the nearest by the set's CLIP
    assert r.code == 0 and r.out.startswith("No concept is named 'a blue bicycle'; the nearest by meaning:") and len(r.out.splitlines()) == 4
    r = cli("concepts", "a sleeping cat", "--weights", ws)  # no name has it, but its words: those concepts first
    assert r.code == 0 and r.out.startswith("No concept is named 'a sleeping cat'; the nearest by shared words:") and "cat face" in r.out
    r = cli("concepts", "cat", "--weights", tiny_weights)
    assert r.code == 1 and "lists no concepts" in r.err


def test_note_names_the_closest_concepts_when_a_prompt_names_none(tiny_weights, tmp_path):
    from unclip_cli.engine import Engine
    from unclip_cli.requests import GenerateRequest

    steps = {"prior_steps": 1, "decoder_steps": 1, "upsampler_steps": 1}

    def notes(engine, prompt):
        return [w for w in engine.run(GenerateRequest(prompt=prompt, seed=0, **steps)).warnings if "concept" in w]

    quiet = Engine.load(tiny_set(tiny_weights, tmp_path / "a", note=False), device="cpu")
    assert notes(quiet, "a bicycle") == []
    loud = Engine.load(tiny_set(tiny_weights, tmp_path / "b", note=True), device="cpu")
    assert notes(loud, "cat") == [] and notes(loud, "猫脸") == []
    assert notes(loud, "a cat") == ["the prompt is not the name of a concept this model was trained on, so expect a loose "
                                    "match; the closest are cat, cat face (`unclip concepts` lists them)"]
    seen = []  # the note is handed to the caller before the first step, once
    loud.run(GenerateRequest(prompt="a cat", seed=0, **steps), callback=seen.append)
    assert [type(e).__name__ for e in seen[:2]] == ["Warnings", "Tick"] and list(seen[0].lines) == notes(loud, "a cat")
    near = loud.nearest_concepts("a bicycle", 3)  # no word in common: the nearest by the set's CLIP
    assert len(near) == 3 and near[0][0] >= near[1][0] >= near[2][0]
    assert notes(loud, "a bicycle") == [f"the prompt is not the name of a concept this model was trained on, so expect a loose "
                                        f"match; the closest are {', '.join(c['en'] for _, c in near)} (`unclip concepts` lists them)"]
    # a prompt with no words is far, as `unclip concepts` says it (test_concepts_says_when_the_nearest_by_meaning_are_far)
    near = ", ".join(c["en"] for _, c in loud.nearest_concepts("12345", 3))
    assert notes(loud, "12345") == [f"the prompt is not the name of a concept this model was trained on, and none is close in meaning "
                                    f"(it has no words): the model is unlikely to draw it; the nearest anyway are {near} "
                                    "(`unclip concepts` lists them)"]


def test_a_prompt_with_a_word_never_seen_is_told_as_unclip_concepts_tells_it(monkeypatch):
    """The prompt note and `unclip concepts` say a far prompt in the same words (`domain.far_reason`); the unknown-words
    warning is as strong (of the everyday prompts with such a word that were checked, none was drawn). When the note
    says it, the warning, which would repeat it, is left out."""
    from unclip_cli.engine import Engine
    from unclip_cli.requests import GenerateRequest

    concepts = domain.load_concepts(SHIPPED)
    checked, far = concepts.facts["checked"], json.loads((SHIPPED / domain.CONCEPTS_FILE).read_text(encoding="utf-8"))["meaning"]["facts"]
    assert all(not checked.get(p) for p in far["everyday"]["which"])  # every one checked drew 0 of 4 (one was not checked)
    note = domain.concept_note(concepts, "xylophonist", lambda t: [(0.5, concepts.entries[0])], unknown=["xylophonist"])
    assert note.startswith("the prompt is not the name of a concept this model was trained on, and none is close in meaning "
                           "(this model never saw 'xylophonist' in training): the model is unlikely to draw it; the nearest anyway")
    assert cli("concepts", "xylophonist").out.startswith("No concept is named 'xylophonist', and none is close in meaning "
                                                        "(this model never saw 'xylophonist' in training): the model is unlikely")
    engine = Engine.load(SHIPPED, device="cpu")
    monkeypatch.setattr(engine, "run_prior", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))  # the warnings alone
    for prompt, lines in (("xylophonist", [note.split("; the nearest")[0]]),
                          ("a vintage car", ["the prompt has words this model never saw in training (vintage): the model is unlikely "
                                             "to draw them", "the prompt is not the name of a concept this model was trained on, so "
                                             "expect a loose match"])):
        seen = []
        with pytest.raises(KeyboardInterrupt):
            engine.run(GenerateRequest(prompt=prompt, seed=0, prior_steps=1, decoder_steps=1, upsampler_steps=1), callback=seen.append)
        assert [w.split("; the c")[0].split("; the n")[0] for w in seen[0].lines] == lines


@pytest.mark.parametrize("text", ["{", '{"concepts": 3}', '{"concepts": [{"en": "x"}]}', '{"concepts": [], "note": {"rule": "cosine"}}'])
def test_a_damaged_concepts_file_is_an_error_naming_it(tmp_path, text):
    from unclip_cli.errors import WeightsError

    (tmp_path / domain.CONCEPTS_FILE).write_text(text)
    with pytest.raises(WeightsError, match="concepts.json"):
        domain.load_concepts(tmp_path)
