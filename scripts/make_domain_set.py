"""Make the model's own outputs that the out-of-domain image test is calibrated on (issue 24, item 1).

    python scripts/make_domain_set.py --out ~/.cache/unclip/domain-set [--generate 512] [--quality fast]

Writes PNGs under OUT: generated/ (text to image: English and Chinese emoji names of the concepts the
independent classifier knows, drawn at random, plus everyday prompts, one seed each), and the other
operations applied to the first --derived generated images as a user would chain them, each image with its own
seeds: vary/ (strengths 0 to 1, two seeds), blend/ (pairs, every frame), edit/ (a random box repainted with another
image's prompt, feathered as by default), nudge/ (toward 8 texts, up to amounts 0.1 to 0.5 in three steps). Resumable:
files already there are kept and counted. Run it twice: once to generate, once with --skip-generate for the
derived operations; several may run at once (--ops: one operation each).
Emoji names come from the emojibase-data tarball of `unclip data emoji`'s npm cache.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EVERYDAY = ["a dog", "a red car", "pizza", "a rocket", "two cats", "猫", "火箭", "a smiling cat", "a red hat", "a starry sky",
            "a tiger", "a house", "a tree", "a birthday cake", "the sun", "a blue bird", "coffee", "a heart"]
VARY_STRENGTHS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # image k at VARY_STRENGTHS[k % 11]
NUDGE_AMOUNTS = (0.1, 0.2, 0.3, 0.4, 0.5)
NUDGE_TO = ("tiger face", "red heart", "sun", "snowflake", "cat face", "rocket", "pizza", "smiling face with sunglasses")


def prompts(n: int, seed: int = 0) -> list[str]:
    from unclip_cli import checkpoint
    from unclip_cli.data.emoji import canonical_hex, chinese_name, english_name, load_concepts

    tarball = next(Path.home().joinpath(".cache", "unclip", "npm").glob("emojibase-data-*.tgz"))
    names = load_concepts(tarball)
    known = checkpoint.load(REPO / "weights" / "classifier" / "emoji-concepts.safetensors", "classifier").extra["concepts"]
    rng = random.Random(seed)
    chosen = rng.sample([c for c in known if canonical_hex(c) in names], n)
    out = []
    for k, code in enumerate(chosen):
        c = names[canonical_hex(code)]
        out.append(english_name(c.label_en, c.skin_tone) if k % 2 == 0 else chinese_name(c.label_zh, c.skin_tone))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=str(REPO / "weights" / "emoji"))
    ap.add_argument("--out", type=Path, default=Path.home() / ".cache" / "unclip" / "domain-set")
    ap.add_argument("--generate", type=int, default=512)
    ap.add_argument("--derived", type=int, default=150, help="outputs of each derived operation (edit: one per generated image; vary: "
                                                             "half as many images, two seeds each; nudge: a third, 3 amounts; blend: a "
                                                             "fifth of them as pairs, 5 frames each)")
    ap.add_argument("--ops", default="vary,edit,nudge,blend", help="the derived operations to run")
    ap.add_argument("--quality", default="fast")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--skip-generate", action="store_true", help="only the derived operations, on the generated images there")
    args = ap.parse_args(argv)

    from unclip_cli.engine import Engine
    from unclip_cli.requests import BlendRequest, EditRequest, GenerateRequest, NudgeRequest, VaryRequest

    t0 = time.time()
    engine = Engine.load(args.weights, device="cpu")
    gen_dir = args.out / "generated"
    gen_dir.mkdir(parents=True, exist_ok=True)
    texts = EVERYDAY + prompts(args.generate - len(EVERYDAY))

    def run(reqs, folder: Path, names: list[str]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        todo = [(r, nm) for r, nm in zip(reqs, names) if not all((folder / f"{nm}-{i}.png").exists() for i in range(r.count))]
        for s in range(0, len(todo), args.batch):
            part = todo[s : s + args.batch]
            for (r, nm), res in zip(part, engine.run_many([r for r, _ in part], batch_size=args.batch * max(r.count for r, _ in part))):
                for i, im in enumerate(res.images):
                    im.save(folder / f"{nm}-{i}.png")
            print(f"{folder.name}: {s + len(part)}/{len(todo)} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)

    if not args.skip_generate:
        run([GenerateRequest(prompt=p, seed=k, quality=args.quality) for k, p in enumerate(texts)], gen_dir,
            [f"{k:04d}" for k in range(len(texts))])
        return
    made = sorted(gen_dir.glob("*.png"))
    from PIL import Image

    pick = [Image.open(p).convert("RGB") for p in made[: args.derived]]
    n = len(pick)
    ops = args.ops.split(",")
    rng = random.Random(1)
    boxes = []  # a box of 0.3-0.6 of each side, anywhere: one per image
    for _ in range(n):
        w, h = rng.uniform(0.3, 0.6), rng.uniform(0.3, 0.6)
        x, y = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
        boxes.append((round(x, 3), round(y, 3), round(x + w, 3), round(y + h, 3)))
    # Vary and nudge draw several images per request (one inversion for them all), as a user asking for -n would.
    if "vary" in ops:  # image k's strength VARY_STRENGTHS[k % 11], two seeds each
        ks = list(range(n // 2))
        for strength in VARY_STRENGTHS:  # a batch shares its strength
            part = [k for k in ks if VARY_STRENGTHS[k % len(VARY_STRENGTHS)] == strength]
            run([VaryRequest(image=pick[k], n=2, seed=k, quality=args.quality, strength=strength) for k in part], args.out / "vary",
                [f"{k:04d}" for k in part])
    if "edit" in ops:
        run([EditRequest(image=im, box=boxes[k], prompt=texts[(k + 7) % n], seed=k, quality=args.quality) for k, im in enumerate(pick)],
            args.out / "edit", [f"{k:04d}" for k in range(n)])
    if "nudge" in ops:  # image k up to NUDGE_AMOUNTS[k % 5] in three steps
        ks = list(range(n // 3))
        for amount in NUDGE_AMOUNTS:
            part = [k for k in ks if NUDGE_AMOUNTS[k % len(NUDGE_AMOUNTS)] == amount]
            run([NudgeRequest(image=pick[k], n=3, to=NUDGE_TO[k % len(NUDGE_TO)], amount=amount, seed=k, quality=args.quality)
                 for k in part], args.out / "nudge", [f"{k:04d}" for k in part])
    if "blend" in ops:
        pairs = [(pick[2 * k], pick[2 * k + 1]) for k in range(n // 5)]
        run([BlendRequest(image_a=a, image_b=b, frames=5, seed=k, quality=args.quality) for k, (a, b) in enumerate(pairs)],
            args.out / "blend", [f"{k:04d}" for k in range(len(pairs))])
    print(f"done in {time.time() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
