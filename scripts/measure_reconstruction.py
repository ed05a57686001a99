"""How far `vary --strength` moves an image, on the model's own outputs as well as held-out emoji (issue 24, item 4):
`vary --strength 0` on a generated "cat face" came back with a blue ear, further from it than strength 0.3.

    python scripts/measure_reconstruction.py [--n 8] [--values 0,0.1,0.3,0.5,0.8,1] [--before] [--full]
    python scripts/measure_reconstruction.py --blend [--before]

Sources: --n images the set generates ("cat face", "dog face", "grinning face", "red apple" in turn, seeds 0, 1, ...;
`--quality default`, the machine's precision, as `unclip generate` makes them) and the first --n held-out emoji of the 256 px corpus's val shard (~/.cache/unclip/emoji-256,
`unclip data emoji --size 256`). Each is varied at each strength (seed 0, default quality, fp32, one thread).
Without --full the upsamplers are skipped and the decoder's base image (32 px) is compared with the source's
base-resolution input (what the inversion starts from); with --full, the 256 px result with the source at 256 px.
Per value: the mean pixel RMSE (0-1 scale) and the independent classifier's feature distance (1 - cosine,
weights/classifier). --before replays the recipe of a vary made before the fix (`invert_to_start` false: inverted
to t = 999). --blend: the end frames of 5-frame blends of generated pairs, their RMSE to their images (base).
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
PROMPTS = ("cat face", "dog face", "grinning face", "red apple")


def held_out_256(n: int):
    from PIL import Image

    shard = Path.home() / ".cache" / "unclip" / "emoji-256" / "val-000000.tar"
    out = []
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            if m.name.endswith(".png") and len(out) < n:
                out.append(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB"))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=str(REPO / "weights" / "emoji"))
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--values", default="0,0.1,0.3,0.5,0.8,1")
    ap.add_argument("--before", action="store_true")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--blend", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from measure_strength import Yardstick
    from unclip_cli.engine import Engine, to_pil
    from unclip_cli.requests import BlendRequest, GenerateRequest, VaryRequest

    torch.set_num_threads(1)
    t0 = time.time()
    engine, judge = Engine.load(args.weights, device="cpu"), Yardstick()
    generated = [r.images[0] for r in engine.run_many(
        [GenerateRequest(prompt=PROMPTS[k % len(PROMPTS)], seed=k // len(PROMPTS)) for k in range(args.n)], batch_size=8)]
    if not args.full:
        engine.run_upsamplers = lambda x, *a, **kw: x  # the decoder's base image
    old = {"invert_to_start": False} if args.before else {}

    def as_tensor(images):
        return torch.stack([torch.from_numpy(np.asarray(im.convert("RGB").resize((256, 256), 1) if args.full else im, dtype=np.float32) / 127.5 - 1)
                            .permute(2, 0, 1) for im in images])

    def rmse(outs, x0):
        return ((as_tensor(outs) - x0) / 2).pow(2).mean((1, 2, 3)).sqrt()

    if args.blend:
        pairs = ((0, 5), (2, 7), (1, 4), (3, 6))  # different prompts; needs --n 8
        errs = []
        for a, b in pairs:
            res = engine.run(BlendRequest(image_a=generated[a], image_b=generated[b], frames=5, seed=0, precision="fp32", **old))
            x0 = engine.base_inputs([generated[a], generated[b]])[1]
            errs += rmse([res.images[0], res.images[-1]], x0).tolist()
        print(f"blend end frames ({'before' if args.before else 'after'}): rmse {np.mean(errs):.4f} {[round(e, 3) for e in errs]}")
        return
    for group, sources in (("generated", generated), ("held-out", held_out_256(args.n))):
        x0 = as_tensor(sources) if args.full else engine.base_inputs(sources)[1]
        feat_src, _ = judge(sources if args.full else [to_pil(x) for x in x0])
        for v in [float(v) for v in args.values.split(",")]:
            outs = [r.images[0] for r in engine.run_many(
                [VaryRequest(image=im, strength=v, seed=0, precision="fp32", **old) for im in sources], batch_size=8)]
            feat, _ = judge(outs)
            print(f"{group} {'before' if args.before else 'after'} {v:g}: rmse {rmse(outs, x0).mean():.4f}  feature distance "
                  f"{1 - (feat * feat_src).sum(1).mean():.4f}  ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
