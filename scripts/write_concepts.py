"""Write the list of concepts a model set was trained on: WEIGHTS/concepts.json (issue 24, item 2).

    python scripts/write_concepts.py --data ~/.cache/unclip/emoji-256 --weights weights/emoji

Reads the training shards' metadata (never the images): every concept of the training split with its
English and Chinese names and keywords, as the captions gave them, and how many training images it had.
`unclip concepts` searches this list, and the engine names the nearest entries when a prompt is far from
all of them (`unclip_cli/domain.py`).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def keywords(caption: str, name: str, seps: tuple[str, str]) -> list[str]:
    """The keywords of a "name, kw1, kw2" caption (English) or "name，kw1、kw2" (Chinese)."""
    head, comma = seps
    if not caption.startswith(name + head):
        return []
    return [k.strip() for k in caption[len(name) + len(head):].split(comma) if k.strip()]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.expanduser("~/.cache/unclip/emoji-256"))
    ap.add_argument("--weights", default=str(REPO / "weights" / "emoji"))
    args = ap.parse_args(argv)

    from unclip_cli.checkpoint import atomic_write
    from unclip_cli.domain import CONCEPTS_FILE

    concepts: dict[str, dict] = {}
    shards = sorted(glob.glob(os.path.join(args.data, "train-*.tar")))
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.name.endswith(".json"):
                    continue
                meta = json.load(tar.extractfile(member))
                if meta.get("split") != "train":
                    continue
                en, zh = meta["captions"]["en"], meta["captions"]["zh"]
                c = concepts.setdefault(meta["concept"], {"concept": meta["concept"], "emoji": meta.get("emoji", ""), "en": en[0], "zh": zh[0],
                                                          "keywords_en": [], "keywords_zh": [], "images": 0})
                c["images"] += 1
                for caption in en:
                    c["keywords_en"] += [k for k in keywords(caption, en[0], (", ", ", ")) if k not in c["keywords_en"] and not k.endswith(" style")]
                for caption in zh:
                    c["keywords_zh"] += [k for k in keywords(caption, zh[0], ("，", "、")) if k not in c["keywords_zh"] and not k.endswith("风格")]
    listed = sorted(concepts.values(), key=lambda c: c["en"])
    # The names' CLIP text embeddings, so that the engine need not encode 4,000 names on every run.
    import hashlib

    import numpy as np

    from unclip_cli.domain import ConceptList
    from unclip_cli.engine import Engine, concept_embeddings

    engine = Engine.load(args.weights, device="cpu")
    emb = concept_embeddings(engine.models, ConceptList(listed), engine.encode_text)
    np.save(Path(args.weights) / "concepts.npy", emb.numpy().astype(np.float16), allow_pickle=False)
    clip_sha = hashlib.sha256(Path(engine.models.clip.path).read_bytes()).hexdigest()[:16]
    old = Path(args.weights) / CONCEPTS_FILE
    note = json.loads(old.read_text(encoding="utf-8")).get("note") if old.is_file() else None  # calibrate_concepts.py's
    text = json.dumps({"about": "the concepts of the training split, with their names and keywords in the captions "
                                f"(scripts/write_concepts.py --data {args.data})",
                       "embeddings": {"file": "concepts.npy", "clip_sha256": clip_sha}, **({"note": note} if note else {}),
                       "concepts": listed}, ensure_ascii=False, indent=0) + "\n"
    atomic_write(Path(args.weights) / CONCEPTS_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    print(f"{len(listed)} concepts from {len(shards)} shards -> {Path(args.weights) / CONCEPTS_FILE}", file=sys.stderr)


if __name__ == "__main__":
    main()
