"""Why `vary --strength 0.3` could come out further than 0.5, and `nudge` fall apart (issue 24, item 4): the
decoder's 32 px output (before the upsamplers) for held-out emoji, inverted and decoded with guidance in
both (as before the fix: "A") or inverted unguided and decoded with guidance 1 + (g - 1) * strength (the
fix: "B"), measured with the independent classifier (feature distance to the source, and whether the
source's concept stays in its top 5) and in pixels.

    python scripts/measure_inversion_guidance.py [--n 8] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--to", default="tiger face")
    args = ap.parse_args(argv)

    from measure_strength import Yardstick, held_out

    from unclip_cli.diffusion.samplers import slerp
    from unclip_cli.engine import Engine, Noise, to_pil

    e = Engine.load(REPO / "weights" / "emoji", device="cpu")
    tiles, concepts = held_out(args.n)
    judge = Yardstick()
    z_i, x0 = e.base_inputs(tiles)
    src_f, _ = judge([to_pil(x) for x in x0])
    zd = F.normalize(e.encode_text([args.to])[0] - e.encode_text([""], allow_empty=True)[0], dim=-1)
    g = 3.0
    out = {}

    def measure(x):
        f, top5 = judge([to_pil(xx) for xx in x])
        return {"pixel_rmse": round(float((((x.clamp(-1, 1) - x0) / 2) ** 2).mean(dim=(1, 2, 3)).sqrt().mean()), 4),
                "feature_distance": round(float((1 - (f * src_f).sum(1)).mean()), 4),
                "recognisable_top5": float(np.mean([c in t for c, t in zip(concepts, top5)]))}

    for name, g_inv, g_dec in [("A: guided inversion, guidance 3", g, lambda s: g), ("B: unguided inversion, guidance 1 + 2 s", 1.0, lambda s: 1 + (g - 1) * s)]:
        x_T = e.invert(z_i, x0, args.steps, g_inv)
        out[f"vary {name}"] = {s: measure(e.run_decoder(e.decoder_denoiser(z_i, g_dec(s)), x_T, args.steps, sampler="ddim", eta=s,
                                                        noise=Noise(list(range(len(tiles))), e.device))) for s in (0, 0.2, 0.3, 0.5, 0.8)}
        out[f"nudge {name}"] = {a: measure(e.run_decoder(e.decoder_denoiser(torch.cat([slerp(z_i[k : k + 1], zd, a) for k in range(len(tiles))]), g_dec(a)),
                                                         x_T, args.steps, sampler="ddim", eta=0.0)) for a in (0.1, 0.2, 0.3, 0.5)}
        print(name, file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
