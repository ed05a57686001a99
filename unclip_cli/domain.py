"""How familiar an input is to a model set: the out-of-domain warning.

A model trained on emoji turns a photograph into abstract texture, and a user deserves a sentence that
says why. A model set may carry `domain.json` (scripts/calibrate_domain.py writes it; the model card has
its numbers), which turns on two checks whose thresholds were calibrated on held-out data:

- images: the share of near-white pixels of the square the model sees. Every training image was
  flattened onto white, and held-out emoji keep a large white share (2nd percentile 0.235 for
  `weights/emoji`) where photographs have almost none. Neighbours in the set's CLIP space did not
  separate them: the emoji CLIP maps photographs into its emoji manifold.
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
from dataclasses import dataclass
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


def white_share(image: Image.Image) -> float:
    """Share of near-white pixels of the image's centre square at SIDE px."""
    w, h = image.size
    s = min(w, h)
    square = image.convert("RGB").crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    a = np.asarray(square.resize((SIDE, SIDE), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    return float((a.min(axis=2) > WHITE).mean())


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
    return Domain(subject, float(share), raw.get("facts", {}) if isinstance(raw.get("facts"), dict) else {},
                  None if chars is None else frozenset(chars))


def image_warning(domain: Domain, name: str, image: Image.Image) -> str | None:
    if white_share(image) >= domain.white_share_min:
        return None
    return f"{name} is far from the {domain.subject} this model knows: expect abstract results"


def prompt_warning(domain: Domain, clip, what: str, text: str) -> str | None:
    unknown = unknown_words(clip, text, domain.chars)
    if not unknown:
        return None
    shown = ", ".join(dict.fromkeys(unknown[:3]))
    return f"{what} has words this model never saw in training ({shown}): expect a loose match"
