"""Decide from two `unclip eval` runs whether a model set may run bf16 on the CPU, and write its precision.json.

    unclip eval --sections generate,classifier --precision fp32 --out eval-fp32.json   # the same settings and seed
    unclip eval --sections generate,classifier --precision bf16 --out eval-bf16.json
    python scripts/write_precision.py eval-fp32.json eval-bf16.json --to weights/emoji

bf16 is allowed (`"cpu_bf16": true`, what `--precision auto` reads) when each number the choice rests on stays within
the noise of fp32's: the independent classifier's top-1 and top-5 over the held-out prompts, and the sharpness (each
detail band's power as a share of real images'). The noise of a rate is the standard error of the difference of two
independent runs of n prompts, sqrt(2 p (1 - p) / n), and of a sharpness band sqrt(se_fp32^2 + se_bf16^2) from the
eval's per-image spread; "within" is at most two of them. The two runs share prompts and seeds, so their difference is
smaller than that noise unless bf16 changes what the model draws.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import datetime, timezone
from pathlib import Path

Z = 2.0  # standard errors a difference may reach and still count as noise


def numbers(path: Path) -> dict:
    m = json.loads(path.read_text())
    cls, sharp = m["metrics"]["classifier"], m["metrics"]["sharpness"]
    langs = sorted(cls["generated"])
    n = sum(cls["prompts"][lang] for lang in langs)
    rate = {k: sum(cls["generated"][lang][k] * cls["prompts"][lang] for lang in langs) / n for k in ("top1", "top5")}
    return {"precision": m.get("precision"), "command": m.get("command"), "prompts": n, "seed": m["settings"]["seed"],
            "quality": m["settings"]["quality"], "model_hash": m["model"]["model_hash"], **rate,
            "sharpness": sharp["share_of_real"], "sharpness_se": sharp["share_of_real_se"], "bands_px": sharp["bands_px"],
            "wall_seconds": m.get("wall_seconds"), "machine": m.get("machine")}


def decide(a: dict, b: dict) -> tuple[bool, list[dict]]:
    """a: fp32, b: bf16 -> (bf16 allowed, one row per number compared)."""
    rows = []
    for k in ("top1", "top5"):
        p = (a[k] + b[k]) / 2
        noise = math.sqrt(2 * p * (1 - p) / a["prompts"])
        rows.append({"number": f"classifier {k}", "fp32": a[k], "bf16": b[k], "difference": b[k] - a[k], "noise": noise})
    for band, x, y, sx, sy in zip(a["bands_px"], a["sharpness"], b["sharpness"], a["sharpness_se"], b["sharpness_se"]):
        rows.append({"number": f"sharpness {band} px", "fp32": x, "bf16": y, "difference": y - x, "noise": math.hypot(sx, sy)})
    for r in rows:
        r["within"] = abs(r["difference"]) <= Z * r["noise"]
    return all(r["within"] for r in rows), rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fp32", type=Path)
    ap.add_argument("bf16", type=Path)
    ap.add_argument("--to", type=Path, help="the model set's folder: writes precision.json there (default: print only)")
    args = ap.parse_args(argv)
    a, b = numbers(args.fp32), numbers(args.bf16)
    if (a["precision"], b["precision"]) != ("fp32", "bf16"):
        sys.exit(f"expected an fp32 and a bf16 run, got {a['precision']} and {b['precision']}")
    same = ("prompts", "seed", "quality", "model_hash")
    if any(a[k] != b[k] for k in same):
        sys.exit("the two runs differ in " + ", ".join(k for k in same if a[k] != b[k]))
    ok, rows = decide(a, b)
    report = {
        "cpu_bf16": ok,
        "rule": f"bf16 when every number below differs from fp32's by at most {Z:g} noise (standard errors of a difference)",
        "compared": rows,
        "runs": {"fp32": {k: a[k] for k in ("command", "wall_seconds", "machine")},
                 "bf16": {k: b[k] for k in ("command", "wall_seconds", "machine")}},
        "prompts": a["prompts"], "seed": a["seed"], "quality": a["quality"], "model_hash": a["model_hash"],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    print("| number | fp32 | bf16 | difference | noise (1 SE) | within 2 SE |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['number']} | {r['fp32']:.3f} | {r['bf16']:.3f} | {r['difference']:+.3f} | {r['noise']:.3f} | {'yes' if r['within'] else 'no'} |")
    print(f"cpu_bf16: {str(ok).lower()}  ({a['prompts']} prompts, seed {a['seed']}, quality {a['quality']}; "
          f"eval wall time fp32 {a['wall_seconds']} s, bf16 {b['wall_seconds']} s)")
    if args.to:
        out = args.to / "precision.json"
        out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
