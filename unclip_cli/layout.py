"""Layouts for `unclip compose`: a sentence's objects and where they go, as boxes in fractions of the canvas.

    parse("a cat face left of a red heart")  # [("a cat face", (0.0, 0.2, 0.5, 0.8)), ("a red heart", (0.5, 0.2, 1.0, 0.8))]
    parse("two stars")                       # [("star", left box), ("star", right box)]

A small grammar, no language model: `A left of B`, `A to the left of B`, `A right of B`, `A above B`, `A below B`
(`under`, `on top of`, `over`), `A next to B`, `A and B` (side by side), `two X` / `2 X`. A sentence that is none
of these is one object filling the canvas. DALL-E 2's first named limitation (Ramesh et al. 2022, §7) is exactly
this: one global CLIP embedding says what is in a picture far better than where; the boxes say where.
"""

from __future__ import annotations

import re

Box = tuple[float, float, float, float]  # left, top, right, bottom, fractions of the canvas

# Two regions side by side or one above the other, each a little inset so objects do not touch the edge.
LEFT, RIGHT = (0.02, 0.22, 0.5, 0.78), (0.5, 0.22, 0.98, 0.78)
TOP, BOTTOM = (0.22, 0.02, 0.78, 0.5), (0.22, 0.5, 0.78, 0.98)
WHOLE: Box = (0.0, 0.0, 1.0, 1.0)
RELATIONS = [  # (pattern between the two phrases, box of the first, box of the second); longest first
    (r"to the left of", LEFT, RIGHT), (r"on the left of", LEFT, RIGHT), (r"left of", LEFT, RIGHT),
    (r"to the right of", RIGHT, LEFT), (r"on the right of", RIGHT, LEFT), (r"right of", RIGHT, LEFT),
    (r"on top of", TOP, BOTTOM), (r"above", TOP, BOTTOM), (r"over", TOP, BOTTOM),
    (r"below", BOTTOM, TOP), (r"under(?:neath)?", BOTTOM, TOP), (r"beneath", BOTTOM, TOP),
    (r"next to", LEFT, RIGHT), (r"beside", LEFT, RIGHT), (r"and", LEFT, RIGHT), (r"&", LEFT, RIGHT),
]
NUMBERS = {"two": 2, "2": 2, "a pair of": 2}
MAX_OBJECTS = 4


def singular(word: str) -> str:
    """A plural noun made singular the simple English way (stars -> star, foxes -> fox, cherries -> cherry)."""
    if re.search(r"[^aeiou]ies$", word):
        return word[:-3] + "y"
    if re.search(r"(ch|sh|x|ss)es$", word):
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def parse(sentence: str) -> list[tuple[str, Box]]:
    """The objects of a sentence and their default boxes (see the module's grammar)."""
    text = " ".join(sentence.split())
    for pattern, first, second in RELATIONS:
        parts = re.split(rf"\s+{pattern}\s+" if pattern[0].isalpha() else rf"\s*{re.escape(pattern)}\s*", text, maxsplit=1,
                         flags=re.IGNORECASE)
        if len(parts) == 2 and all(p.strip() for p in parts):
            return [(parts[0].strip(), first), (parts[1].strip(), second)]
    m = re.match(r"^(two|2|a pair of)\s+(.+)$", text, flags=re.IGNORECASE)
    if m:
        words = m.group(2).split()
        thing = " ".join(words[:-1] + [singular(words[-1])])
        return [(thing, LEFT), (thing, RIGHT)]
    return [(text, WHOLE)]


def box_masks(boxes, size: int, soft: float = 0.0):
    """(hard, soft) masks (B, 1, size, size) of boxes given as fractions: 1 inside; the soft one falls off over
    `soft` pixels on each side of the edge (a box filter of the hard one), so fused paths meet without a seam."""
    import torch
    import torch.nn.functional as F

    hard = torch.zeros(len(boxes), 1, size, size)
    for b, (l, t, r, bt) in enumerate(boxes):
        x0, y0 = round(l * size), round(t * size)
        x1, y1 = max(x0 + 1, round(r * size)), max(y0 + 1, round(bt * size))
        hard[b, :, y0:y1, x0:x1] = 1
    k = 2 * round(soft) + 1
    if k <= 1:
        return hard, hard
    return hard, F.avg_pool2d(F.pad(hard, (k // 2,) * 4, mode="replicate"), k, stride=1)
