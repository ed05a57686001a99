"""How familiar an input is to a model set: the out-of-domain warning.

A model trained on emoji turns a photograph into abstract texture, and a user deserves a sentence that
says why. A model set may carry `domain.json` (scripts/calibrate_domain.py writes it; the model card has
its numbers), which turns on two checks whose thresholds were calibrated on held-out data:

- images: the share of near-white pixels of the square the model sees (every training image was flattened
  onto white), or a border ring mostly of one saturated or pale colour (emoji on a coloured background,
  drawings that fill the frame, and the tinted backgrounds of the set's own outputs); and, where the set's
  rule has one, a linear photograph score of ten statistics of that square (those four, and how flat, how
  textured and how many-coloured it is), fitted on training-split emoji against photographs: sky, snow and
  pale wood pass the white test, but a photograph's texture and gradients give it away. Neighbours in the
  set's CLIP space, or the independent classifier's, did not separate them: both map photographs into their
  emoji manifold. A second such score (`screen`), on those ten and four statistics of the square's "ink" (pixels
  unlike its commonest colour: how much, how saturated, how long its runs, how horizontal its steps), flags
  screenshots, text documents, charts and diagrams: a mostly white page that passes the other tests, whose text
  shrunk to 64 px is rows of short grey strokes where an emoji is one colourful drawing.
- prompts: words that never occurred in a training caption. The set's CLIP has a row only for the
  tokens of its captions; a word made of tokens outside them reaches the model as "unknown". Emoji and
  other symbols count as words of their own. Text in scripts without spaces (Chinese, Japanese) reaches
  the tokenizer as UTF-8 bytes whose pieces every caption in those scripts shares, so the tokens cannot
  tell a new character from a trained one: a set's `domain.json` may list the characters beyond ASCII
  that its captions held (`chars`), and a character outside that list is unknown too. For
  `weights/emoji` (2,135 Han characters from CLDR's Chinese names) this flags no held-out Chinese prompt
  (0 of 498) and 12 of 30 Chinese prompts describing photographs and scenes (the other 18 use only
  characters of emoji names).

Below a threshold the engine adds a one-line warning to the result. The result still comes out.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

FILE = "domain.json"
SIDE = 64  # images are measured at this size, centre-cropped square as `--fit crop` gives the model
WHITE = 0.9  # a pixel counts as background when every channel is above this (in [0, 1])


@dataclass
class Domain:
    subject: str  # what the set was trained on, in the warning: "the emoji this model knows"
    white_share_min: float  # images with less near-white area than this are far from the training data
    facts: dict  # how the thresholds were calibrated
    chars: frozenset | None = None  # the characters beyond ASCII that training captions held (None: not recorded)
    image_rule: dict | None = None  # the background test beside the white share (`background`), and its `photo` score; None: white share only


def _square(image: Image.Image) -> np.ndarray:
    """The image's centre square at SIDE px, (SIDE, SIDE, 3) in [0, 1]."""
    w, h = image.size
    s = min(w, h)
    square = image.convert("RGB").crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return np.asarray(square.resize((SIDE, SIDE), Image.Resampling.BICUBIC), dtype=np.float32) / 255


def white_share(image: Image.Image) -> float:
    """Share of near-white pixels of the image's centre square at SIDE px."""
    return _white_share(_square(image))


def _white_share(a: np.ndarray) -> float:
    return float((a.min(axis=2) > WHITE).mean())


RING_TOLERANCE = 0.06  # a ring pixel has the background colour when every channel is within this of it


def background(image: Image.Image) -> dict:
    """The image's border ring (the outermost pixels of its centre square at SIDE px) and its commonest colour:
    `ring_share`, the share of the ring within RING_TOLERANCE of that colour; `saturation` and `lightness`
    (its smallest channel) of that colour. Emoji on a coloured background, full-frame emoji and the
    generated images' pale tints have a ring mostly of one colour that is either saturated or pale; a
    photograph's border is texture, or grey."""
    return _background(_square(image))


def _background(a: np.ndarray) -> dict:
    ring = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])
    q = np.round(ring * 15).astype(int)
    code = (q[:, 0] * 16 + q[:, 1]) * 16 + q[:, 2]
    codes, counts = np.unique(code, return_counts=True)
    colour = ring[code == codes[counts.argmax()]].mean(axis=0)
    return {"ring_share": float((np.abs(ring - colour).max(axis=1) <= RING_TOLERANCE).mean()),
            "saturation": float((colour.max() - colour.min()) / max(float(colour.max()), 1e-6)),
            "lightness": float(colour.min())}


# The statistics the photograph score reads, in order (scripts/calibrate_domain_images.py fits its weights)
FEATURES = ("white_share", "ring_share", "saturation", "lightness", "flat", "texture", "edges", "colour_entropy",
            "laplacian", "laplacian_share")
# and those a screenshot or document gives itself away by (the screen score reads these and FEATURES)
INK = ("ink", "ink_saturation", "ink_run", "anisotropy")
STATISTICS = FEATURES + INK
INK_STEP = 0.15  # a pixel is ink when some channel is this far from the square's commonest colour


def features(image: Image.Image, names: tuple = FEATURES) -> np.ndarray:
    """Statistics `names` (of STATISTICS) of the image's centre square at SIDE px. An emoji is flat areas of few colours
    met by sharp edges; a photograph is texture: many small steps between neighbours, many colours, a busy Laplacian.
    `flat`, `texture`, `edges`: shares of pixels whose steepest step to the right or lower neighbour (largest
    channel) is < 0.02, 0.02-0.15 and >= 0.15; `colour_entropy`: of the colours at 3 bits a channel, in bits;
    `laplacian`: mean |Laplacian| of the grey image, and the share of pixels where it exceeds 0.04.
    A screenshot or a document is a plain page with thin grey ink on it: text shrunk to 64 px is rows of short
    strokes. `ink`: the share of pixels INK_STEP from the commonest colour (at 4 bits a channel); `ink_saturation`:
    their mean saturation; `ink_run`: log2 of the mean length of the runs of ink along rows and columns (an emoji's
    one drawing gives runs of 10-40 px, text 1-3); `anisotropy`: the vertical steps' share of all steps (lines of
    text are horizontal)."""
    a = _square(image)
    stats = {}
    if any(n in FEATURES for n in names):
        step = np.maximum(np.abs(np.diff(a, axis=1)).max(axis=2)[:-1, :], np.abs(np.diff(a, axis=0)).max(axis=2)[:, :-1])
        q = np.round(a * 7).astype(int)
        share = np.bincount(((q[..., 0] * 8 + q[..., 1]) * 8 + q[..., 2]).ravel(), minlength=512) / (SIDE * SIDE)
        share = share[share > 0]
        g = a.mean(axis=2)
        lap = np.abs(4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:])
        stats.update(zip(FEATURES, [_white_share(a), *_background(a).values(), (step < 0.02).mean(),
                                    ((step >= 0.02) & (step < 0.15)).mean(), (step >= 0.15).mean(),
                                    -(share * np.log2(share)).sum(), lap.mean(), (lap > 0.04).mean()]))
    if any(n in INK for n in names):
        stats.update(_ink(a))
    return np.array([stats[n] for n in names], dtype=np.float64)


def _ink(a: np.ndarray) -> dict:
    q = np.round(a * 15).astype(int)
    code = (q[..., 0] * 16 + q[..., 1]) * 16 + q[..., 2]
    codes, counts = np.unique(code, return_counts=True)
    ink = np.abs(a - a[code == codes[counts.argmax()]].mean(axis=0)).max(axis=2) > INK_STEP
    starts = ink[:, :1].sum() + (~ink[:, :-1] & ink[:, 1:]).sum() + ink[:1].sum() + (~ink[:-1] & ink[1:]).sum()
    saturation = (a.max(axis=2) - a.min(axis=2)) / np.maximum(a.max(axis=2), 1e-6)
    g = a.mean(axis=2)
    dx, dy = np.abs(np.diff(g, axis=1)).sum(), np.abs(np.diff(g, axis=0)).sum()
    return {"ink": float(ink.mean()), "ink_saturation": float(saturation[ink].mean()) if ink.any() else 0.0,
            "ink_run": float(np.log2(max(2 * ink.sum(), 1) / max(starts, 1))), "anisotropy": float(dy / max(dx + dy, 1e-9))}


SCORES = ("photo", "screen")  # the image rule's fitted scores: a photograph's, a screenshot's or document's


def photo_score(photo: dict, f: np.ndarray) -> float:
    """The score of statistics `f` (the rule's `statistics`, FEATURES when it names none) under a set's fitted `photo`
    or `screen` rule (a logistic regression's logit)."""
    return float(((f - np.asarray(photo["mean"])) / np.asarray(photo["scale"])) @ np.asarray(photo["weights"]) + photo["bias"])


def in_domain(domain: Domain, image: Image.Image) -> bool:
    """Whether an image looks like what the set was trained on: enough near-white area, or (with the set's
    background rule) a border ring mostly of one saturated or pale colour; and (with the rule's `photo` and
    `screen` scores) scored neither a photograph nor a screenshot or document."""
    rule = domain.image_rule
    scores = [rule[k] for k in SCORES if rule and k in rule]
    names = tuple(dict.fromkeys(FEATURES + tuple(n for s in scores for n in s.get("statistics", FEATURES))))
    f = dict(zip(names, features(image, names)))
    white, ring, saturation, lightness = (f[n] for n in FEATURES[:4])
    if white < domain.white_share_min and not (rule and ring >= rule["ring_share_min"] and (
            saturation >= rule["saturation_min"] or lightness >= rule["lightness_min"])):
        return False
    return all(photo_score(s, np.array([f[n] for n in s.get("statistics", FEATURES)])) <= s["threshold"] for s in scores)


def unknown_words(clip, text: str, chars: frozenset | None = None) -> list[str]:
    """The words of `text` that the set's CLIP never saw in training (some token maps to its unknown row,
    or, with `chars`, a character beyond ASCII is not among them; such characters of scripts written
    without spaces are named alone). Emoji and other symbols are words of their own. Empty for a CLIP with
    a row for every token."""
    words = [w for w in re.findall(r"\w+|[^\w\s]", text.lower()) if re.match(r"\w", w) or _symbol(w)]
    if not words or getattr(clip.cfg, "vocab", "compact") != "compact":
        return []
    from unclip_cli.models.clip import EOT, PAD, SOT, UNK

    tokens, _ = clip.tokenize(words)
    found = []
    for w, row in zip(words, tokens):
        new = [c for c in w if ord(c) > 127 and c not in chars] if chars is not None else []
        if (row[(row != PAD) & (row != SOT) & (row != EOT)] == UNK).any() or (new and not _unspaced(new[0])):
            found.append(w)
        else:
            found += new
    return found


def _symbol(c: str) -> bool:
    """Emoji and other symbols beyond ASCII (punctuation is not a word)."""
    return ord(c) > 127 and unicodedata.category(c).startswith("S")


def _unspaced(c: str) -> bool:
    """A character of a script written without spaces (wide: Han, kana, Hangul), named alone in warnings."""
    return unicodedata.east_asian_width(c) in ("W", "F")


def load_domain(root: str | Path) -> Domain | None:
    """The set's domain file, or None (no checks). A damaged file is an error naming it, like any other
    file of the set; its text is untrusted, so every field is checked."""
    from unclip_cli.errors import WeightsError

    path = Path(root) / FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        subject, share = raw["subject"], raw["white_share_min"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise WeightsError(f"{path}: not a readable domain file ({type(e).__name__}: {e})",
                           hint="rewrite it with scripts/calibrate_domain.py --write, or delete it to turn the warnings off") from None
    if not (isinstance(subject, str) and re.fullmatch(r"[\w -]{1,40}", subject)) or isinstance(share, bool) \
            or not isinstance(share, (int, float)) or not 0 <= share <= 1:
        raise WeightsError(f"{path}: `subject` must be a short name and `white_share_min` a number from 0 to 1")
    chars = raw.get("chars")
    if chars is not None and not (isinstance(chars, str) and len(chars) <= 100_000):
        raise WeightsError(f"{path}: `chars` must be text (the characters of the training captions beyond ASCII)")
    rule = raw.get("image_rule")
    keys = ("ring_share_min", "saturation_min", "lightness_min")
    if rule is not None and not (isinstance(rule, dict) and all(isinstance(rule.get(k), (int, float)) and not isinstance(rule.get(k), bool)
                                                                and 0 <= rule[k] <= 1 for k in keys)):
        raise WeightsError(f"{path}: `image_rule` must hold {', '.join(keys)}, numbers from 0 to 1")
    scores = {}
    for kind in SCORES:
        if rule is not None and rule.get(kind) is not None:
            scores[kind] = _photo_rule(rule[kind])
            if scores[kind] is None:
                raise WeightsError(f"{path}: `image_rule.{kind}` must hold `mean`, `scale` (non-zero) and `weights`, a number for "
                                   f"each of its `statistics` (distinct names of {', '.join(STATISTICS)}; the first "
                                   f"{len(FEATURES)} when it names none), and the numbers `bias` and `threshold`")
    return Domain(subject, float(share), raw.get("facts", {}) if isinstance(raw.get("facts"), dict) else {},
                  None if chars is None else frozenset(chars),
                  None if rule is None else {**{k: float(rule[k]) for k in keys}, **scores})


def _photo_rule(photo) -> dict | None:
    """A domain file's photograph (or screen) score, checked (the file is untrusted), or None when malformed."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v))

    if not isinstance(photo, dict) or not all(number(photo.get(k)) for k in ("bias", "threshold")):
        return None
    names = photo.get("statistics", list(FEATURES))
    if not (isinstance(names, list) and names and all(isinstance(n, str) and n in STATISTICS for n in names)
            and len(set(names)) == len(names)):
        return None
    lists = {k: photo.get(k) for k in ("mean", "scale", "weights")}
    if not all(isinstance(v, list) and len(v) == len(names) and all(number(x) for x in v) for v in lists.values()) \
            or any(x == 0 for x in lists["scale"]):
        return None
    return {**({"statistics": list(names)} if "statistics" in photo else {}), **{k: [float(x) for x in v] for k, v in lists.items()},
            "bias": float(photo["bias"]), "threshold": float(photo["threshold"])}


def image_warning(domain: Domain, name: str, image: Image.Image) -> str | None:
    if in_domain(domain, image):
        return None
    return f"{name} is far from the {domain.subject} this model knows: expect abstract results"


def prompt_warning(what: str, unknown: list[str]) -> str | None:
    """The warning for a text with words the set's CLIP never saw (`unknown_words`, computed once per text)."""
    if not unknown:
        return None
    shown = ", ".join(dict.fromkeys(unknown[:3]))
    # As strong as `unclip concepts` says it (`far_in_meaning`): of the everyday prompts with such a word that the
    # independent classifier checked, none was drawn in more than 0 of 4 images (concepts.json, note.facts.checked)
    return f"{what} has words this model never saw in training ({shown}): the model is unlikely to draw them"


# -- the concepts a set was trained on ----------------------------------------------------------------
CONCEPTS_FILE = "concepts.json"  # scripts/write_concepts.py writes it from the training split's captions


@dataclass
class ConceptList:
    """What a set was trained on: each entry has concept, emoji, en, zh, keywords_en, keywords_zh, images.
    `note`: whether a prompt that names no concept (`named`) gets a note naming the closest ones; `facts`:
    how that was calibrated."""

    entries: list[dict]
    note: bool = False
    facts: dict = field(default_factory=dict)
    embeddings: dict | None = None  # {"file": "concepts.npy", "clip_sha256": ...}: the names' CLIP embeddings, precomputed
    _names: dict | None = field(default=None, init=False, repr=False)
    _texts: list | None = field(default=None, init=False, repr=False)  # each entry's names and keywords, lowercased, as one text
    _words: dict = field(default_factory=dict, init=False, repr=False)  # entry -> its words (`_words_of`), once needed

    def named(self, text: str) -> dict | None:
        """The concept a prompt names: once the training captions' template is taken off, its English or Chinese
        name (any case, a skin tone optional); or None. An article, number or measure word counts against it:
        checked with the independent classifier, "tiger" drew the tiger in 4 of 4 images and "a tiger" in none,
        "狗" 3 and "一只狗" 1, "cat" 2 and "two cats" 0 (the model card has the table)."""
        if self._names is None:
            self._names = {}
            for c in self.entries:
                for name in (c["en"], c["zh"]):
                    self._names.setdefault(_key(name), c)
                    self._names.setdefault(_key(_TONE.sub("", name)), c)
        return self._names.get(names_of(text)[0])

    def closest(self, text: str, k: int = 3) -> list[dict]:
        """The concepts sharing most of a prompt's words (Chinese: characters) with their names, keywords at
        half weight, each word weighted by how rare it is among the concepts (so "car" counts more than "red"),
        best first; shorter names first among equals. Empty when no word is shared."""
        words = _name_words(names_of(text)[-1]) - _STOP
        if self._texts is None:
            # A word `_name_words` finds is a piece of its text lowercased (it cuts and drops, never adds), so only the
            # entries whose text holds one of a prompt's words need tokenizing: all of the shipped list's 1,948 took a
            # cold "an emoji of a red apple" 0.062 s, this 0.009 s. One lowercase for all parts is each part's own (only
            # a final sigma looks around, and a newline stops it); the names without their skin tone are there too
            # (taking one out can join two words into a new one).
            self._texts = ["\n".join([c["en"], c["zh"], _TONE.sub("", c["en"] + "\n" + c["zh"]), *c.get("keywords_en", []),
                                     *c.get("keywords_zh", [])]).lower() for c in self.entries]
        found = {w: [i for i, t in enumerate(self._texts) if w in t] for w in words}
        idf = {}
        for w, ids in found.items():
            n = sum(w in self._words_of(i)[0] for i in ids)  # the entries that have the word
            idf[w] = float(np.log(1 + len(self.entries) / n)) if n else 0.0
        scored = []
        for i in sorted(set().union(*found.values())):
            c, (_, names, keys) = self.entries[i], self._words_of(i)
            score = sum(idf[w] for w in words & names) + 0.5 * sum(idf[w] for w in words & keys)
            if score > 0:
                scored.append((-score, len(c["en"]), c["en"], c))
        return [c for *_, c in sorted(scored, key=lambda r: r[:3])[:k]]

    def _words_of(self, i: int) -> tuple[set, set, set]:
        """Entry i's words: all of them (what a word's rarity counts, skin tones too), its names' without the skin
        tone, and its keywords' other words."""
        if i not in self._words:
            c = self.entries[i]
            raw = _name_words(c["en"]) | _name_words(c["zh"])
            keys = set().union(*map(_name_words, c.get("keywords_en", []) + c.get("keywords_zh", [])))
            en, zh = _TONE.sub("", c["en"]), _TONE.sub("", c["zh"])
            names = raw if (en, zh) == (c["en"], c["zh"]) else _name_words(en) | _name_words(zh)
            self._words[i] = (raw | keys, names, keys - names)
        return self._words[i]


# What a prompt says beyond a concept's name: the training captions' templates ("an emoji of X in Noto style",
# "Noto风格的X表情符号"), then an article, number or Chinese measure word ("一只狗" is a dog).
_TEMPLATES = [r"^an? emoji of ", r" in [\w .-]+ style$", r", [\w .-]+ style$", r" emoji$",
              r"^.{0,20}风格的", r"，.{0,20}风格$", r"的?表情(符号)?$"]
_COUNTS = r"^(an?|the|one|two|three|four|five|some|many|\d+) |^[一二两三四五六七八九十几]?[只个辆杯束朵张头条座块把台片碗盘份架艘位棵]"
_TONE = re.compile(r" with (light|medium-light|medium|medium-dark|dark) skin tone|（(较浅|中等-浅|中等|中等-深|较深)肤色）")
_STOP = {"a", "an", "the", "of", "on", "in", "with", "at", "by", "over", "and", "to", "for", "emoji", "的"}


def _key(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .!")


def names_of(text: str) -> list[str]:
    """The concept names a prompt could be: lowercased, spaces collapsed, the training captions' templates taken
    off; then also without a leading article, number or measure word (what `closest` matches words in)."""
    name = _key(text)
    for pattern in _TEMPLATES:
        name = re.sub(pattern, "", name).strip()
    bare = re.sub(_COUNTS, "", name).strip()
    return [name] if bare == name or not bare else [name, bare]


_WORD = re.compile(r"\w+")  # compiled once: `re.findall` looks its pattern up anew on every call (`closest` can make thousands)


def _name_words(text: str) -> set[str]:
    """A name's words: English words (a plural's "s" taken off) and each Han character alone."""
    out = set()
    for w in _WORD.findall(text.lower()):
        if _unspaced(w[0]):
            out.update(c for c in w if not c.isascii())
        else:
            out.add(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w)
    return out


def load_concepts(root: str | Path) -> ConceptList | None:
    """The set's concept list, or None if it has none. The file is untrusted text: every entry is checked,
    and its text is shown escaped wherever it is printed."""
    from unclip_cli.errors import WeightsError

    path = Path(root) / CONCEPTS_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        entries, note = raw["concepts"], raw.get("note", {})
        ok = isinstance(entries, list) and isinstance(note, dict) and all(
            isinstance(c, dict) and isinstance(c.get("en"), str) and isinstance(c.get("zh"), str)
            and isinstance(c.get("keywords_en", []), list) and isinstance(c.get("keywords_zh", []), list)
            and all(isinstance(k, str) for k in c.get("keywords_en", []) + c.get("keywords_zh", [])) for c in entries)
        rule = note.get("rule") if ok else None
        ok = ok and rule in (None, "names")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise WeightsError(f"{path}: not a readable concepts file ({type(e).__name__}: {e})",
                           hint="rewrite it with scripts/write_concepts.py, or delete it") from None
    if not ok:
        raise WeightsError(f"{path}: every concept needs `en` and `zh` names and keyword lists (text), and "
                           "`note.rule` may only be \"names\"")
    emb = raw.get("embeddings")
    return ConceptList(entries, rule == "names", note.get("facts", {}) if isinstance(note.get("facts"), dict) else {},
                       emb if isinstance(emb, dict) else None)


def search_concepts(concepts: list[dict], query: str) -> list[dict]:
    """Concepts whose name, emoji or keywords hold `query` (any case, either language), whole words first: a name (or
    emoji) that is the query, then names that hold it as a word (a plural's "s" allowed), then keywords that do, then
    names and keywords with a word that starts with it ("car": "carrot"); shorter names first within each. A match
    inside a word (`cat` in "indicator", `car` in "scarf") is listed only when nothing else matches. Chinese, written
    without spaces, has no words to tell apart: a name or keyword holding the characters counts as a word."""
    q = " ".join(query.lower().split())
    if not q:
        return list(concepts)
    spaced = not _unspaced(q[0])
    word = re.compile(rf"(?<!\w){re.escape(q)}(?:s|es)?(?!\w)") if spaced else None
    start = re.compile(rf"(?<!\w){re.escape(q)}") if spaced else None

    def has(pattern, text: str) -> bool:
        return q in text if pattern is None else bool(pattern.search(text))

    ranked = []
    for c in concepts:
        names = (c["en"].lower(), c["zh"])
        keys = [k.lower() for k in c.get("keywords_en", [])] + list(c.get("keywords_zh", []))
        tests = [q in names or q == c.get("emoji"), any(has(word, n) for n in names), q in keys, any(has(word, k) for k in keys),
                 any(has(start, n) for n in names), any(has(start, k) for k in keys), any(q in n for n in names + tuple(keys))]
        rank = next((r for r, hit in enumerate(tests) if hit), None)
        if rank is not None:
            ranked.append((rank, len(c["en"] if spaced else c["zh"]), c["en"], c))  # shorter names, in the query's language, first
    if any(r[0] < 6 for r in ranked):  # pieces inside words only when nothing better matches
        ranked = [r for r in ranked if r[0] < 6]
    return [c for *_, c in sorted(ranked, key=lambda r: r[:3])]


def find_concepts(concepts: ConceptList, query: str, limit: int = 20, engine_of=None) -> dict:
    """`unclip concepts QUERY` and the server's GET /v1/unclip/concepts: the concepts named by the query (whole words,
    then word starts, `search_concepts`), else those sharing most words with it (`ConceptList.closest`), else, with
    `engine_of` (a function giving the set's engine, called only then), the nearest by the set's CLIP and whether even
    those are far. At most `limit` of them (0: all). -> {query, matched_by (name, words or meaning), total, concepts,
    and far and unknown_words when matched by meaning}."""
    found, how, extra = search_concepts(concepts.entries, query), "name", {}
    if not found:  # nothing by name: those sharing most words with it (what the prompt note names)
        found, how = concepts.closest(query, limit or 10), "words"
    if not found and engine_of is not None:  # no word in common: the nearest by meaning, of which there are always some
        engine = engine_of()
        found, how = [c for _, c in engine.nearest_concepts(query, limit or 10)], "meaning"
        unknown = engine.unknown_words(query)
        extra = {"far": far_in_meaning(query, unknown), "unknown_words": unknown}
    return {"query": query, "matched_by": how, "total": len(found), "concepts": found if limit == 0 else found[:limit], **extra}


def far_in_meaning(text: str, unknown: list[str]) -> bool:
    """Whether even the nearest concepts by meaning are far from a query (`unknown`: its words the set's CLIP never saw,
    `unknown_words`): it has such a word, or no letter at all (digits and signs). The CLIP cosine cannot tell: this
    CLIP puts nonsense as near some name as the held-out prompts (median best cosine 0.83 and 0.84). Measured by
    scripts/calibrate_concepts_meaning.py (`concepts.json`, `meaning.facts`; the model card has the table)."""
    return bool(unknown) or not any(c.isalpha() for c in text)


FAR = "none is close in meaning"  # how the prompt note and `unclip concepts` say it


def far_reason(text: str, unknown: list[str]) -> str | None:
    """Why even the nearest concepts by meaning are far from a text (`far_in_meaning`), in the words `unclip concepts`
    and the prompt note both use; None when they are not."""
    from unclip_cli.requests import printable

    if not far_in_meaning(text, unknown):
        return None
    if unknown:
        return f"this model never saw {', '.join(repr(printable(w)) for w in dict.fromkeys(unknown[:3]))} in training"
    return "it has no words"


def concept_note(concepts: ConceptList, text: str, nearest=None, what: str = "the prompt", layout: bool = False,
                 unknown: list[str] | None = None) -> str | None:
    """The note for a text that is no concept's name (`ConceptList.named`): the closest by shared words, else (with
    `nearest`, a function of the text giving (cosine, entry) pairs) by the set's CLIP, saying, as `unclip concepts`
    does, when even those are far (`far_reason`, given the text's `unknown` words). None when the text names a
    concept or the set has no note. With `layout` (a prompt of `generate`), a text that `unclip compose` reads as
    several objects ("two cats", "a cat to the left of a heart") is pointed there."""
    if not concepts.note or concepts.named(text) is not None:
        return None
    by_words = concepts.closest(text, 3)
    closest = by_words or ([c for _, c in nearest(text)] if nearest else [])
    names = ", ".join(dict.fromkeys(printable_name(c["en"]) for c in closest[:3]))
    several = ""
    if layout:
        from unclip_cli.layout import parse

        if len(parse(text)) > 1:
            several = "; for several objects or where they go, try `unclip compose`"
    # far as `unclip concepts` finds it: no name or keyword holds the text, none shares a word with it, and it has a
    # word this model never saw or no word at all
    why = None if by_words or unknown is None or search_concepts(concepts.entries, text) else far_reason(text, unknown)
    if why:
        return (f"{what} is not the name of a concept this model was trained on, and {FAR} ({why}): the model "
                "is unlikely to draw it" + (f"; the nearest anyway are {names}" if names else "") + " (`unclip concepts` lists them)"
                + several)
    return (f"{what} is not the name of a concept this model was trained on, so expect a loose match"
            + (f"; the closest are {names}" if names else "") + " (`unclip concepts` lists them)" + several)


def printable_name(text: str) -> str:
    """A name from the set's file as it may be printed: control characters and the like dropped."""
    return "".join(c for c in text if c.isprintable())[:60]
