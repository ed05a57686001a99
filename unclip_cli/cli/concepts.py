"""`unclip concepts [QUERY]`: what the model set can draw, from the list of concepts it was trained on."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from unclip_cli.cli import app
from unclip_cli.cli.options import JsonShowOpt, WeightsOpt, resolve_weights
from unclip_cli.errors import InputError
from unclip_cli.requests import check_text, printable

CONCEPTS_EXAMPLES = """\
[b]Examples[/b]

  unclip concepts cat                 [dim]# names, then keywords, with the word "cat"[/dim]
  unclip concepts 猫
  unclip concepts "a red car"         [dim]# no name has it: the nearest concepts by meaning[/dim]
  unclip concepts --limit 0 --json    [dim]# every concept[/dim]
"""


def _line(c: dict) -> str:
    keywords = ", ".join(c.get("keywords_en", [])[:4])
    text = f"{c.get('emoji', '')}  {c['en']} · {c['zh']}" + (f"  ({keywords})" if keywords else "")
    return printable(text)


@app.command("concepts", epilog=CONCEPTS_EXAMPLES)
def concepts(
    query: Annotated[Optional[str], typer.Argument(metavar="QUERY", help="Words to look for, in English or Chinese.",
                                                   show_default=False)] = None,
    limit: Annotated[int, typer.Option("--limit", help="Show at most this many (0: all).")] = 20,
    weights: WeightsOpt = None,
    json_: JsonShowOpt = False,
) -> None:
    """List the concepts the model was trained on (what it can draw), or search them: by name and keyword,
    else by meaning (the model's CLIP)."""
    from unclip_cli.domain import FAR, far_reason, find_concepts, load_concepts

    if limit < 0:
        raise InputError(f"--limit must be 0 or more, not {limit}")
    root = resolve_weights(weights)
    listed = load_concepts(root)
    if listed is None:
        raise InputError(f"the model set {root} lists no concepts (it has no concepts.json)",
                         hint="write one from its training data with scripts/write_concepts.py")
    q = "" if query is None else check_text("QUERY", query, allow_empty=True)

    def engine():
        from unclip_cli.engine import Engine

        return Engine.load(root, device="cpu")

    res = find_concepts(listed, q, limit, engine)
    if json_:
        sys.stdout.write(json.dumps(res, ensure_ascii=False, indent=2) + "\n")
        return
    found, how, shown, unknown = res["total"], res["matched_by"], res["concepts"], res.get("unknown_words", [])
    if not q:
        print(f"{len(listed.entries)} concepts in {Path(root).name}; showing {len(shown)} (--limit 0 shows all):")
    elif res.get("far"):
        why = far_reason(q, unknown)  # in the words of generate's note
        print(f"No concept is named {printable(q)!r}, and {FAR} ({why}): the model is unlikely to draw it. "
              "The nearest anyway:")
    elif how != "name":
        print(f"No concept is named {printable(q)!r}; the nearest by {'meaning' if how == 'meaning' else 'shared words'}:")
    else:
        print(f"{found} concept{'s' if found != 1 else ''} match {printable(q)!r}" +
              (f"; the first {len(shown)}:" if len(shown) < found else ":"))
    for c in shown:
        print("  " + _line(c))
    from unclip_cli.cli.info import recognised_share

    recognised = recognised_share(root)
    if recognised and shown:  # being trained on a concept is no promise of drawing it ("bicycle" draws nothing clear)
        print(f"Note: {recognised}; try several seeds (-n 4).")
