"""Calibrate the out-of-domain image test (`unclip_cli/domain.py`: `in_domain`) on every kind of input it meets
(issue 24, item 1), and write it into WEIGHTS/domain.json (other keys kept).

    python scripts/calibrate_domain_images.py --data ~/.cache/unclip/emoji-256 --own ~/.cache/unclip/domain-set \
        --photos ~/.cache/unclip/photos --screens ~/.cache/unclip/screens --photo-score --screen-score [--write] \
        [--sheet tests/data/own-outputs.png]

Groups: the held-out emoji (val shards); full-frame emoji (held-out emoji cropped to their drawing and
stretched to the frame, every third); emoji on a coloured background (the white connected to the border of
every third held-out emoji painted one random colour); the set's own outputs (scripts/make_domain_set.py:
generated/, vary/, edit/, nudge/, blend/); photographs: scikit-image's sample photographs and PHOTOS/fit for the
fit, PHOTOS/held-out held out (scripts/collect_photos.py: Debian wallpaper packages and two wheels' sample
images, split alternately by name); drawings: scikit-image's and the wallpapers that are illustrations; screenshots
and documents: SCREENS/fit and SCREENS/held-out (scripts/collect_screens.py: local HTML, man pages and this repo's
docs rendered by headless Chromium, and charts, text pages, tables, diagrams, terminals and dialogs drawn with PIL).

The rule: in domain when the near-white share is at least `white_share_min`, or the border ring is mostly
(`ring_share_min`) of one colour that is saturated (`saturation_min`) or pale (`lightness_min`). The thresholds are searched on a grid: the set's outputs pooled, each
operation's outputs and the held-out emoji at most 2% false alarms, full-frame and coloured-background emoji at most
5%; among those, the most fit photographs flagged, then the fewest false alarms. The held-out photographs and the
drawings take no part in the choice: they are only measured.

Then the photograph score (`domain.features`, `photo_score`; with --photo-score): a logistic regression (L2
`--l2`, classes weighted equally) of the fit photographs against TRAINING-split emoji (the first --train of the
shards, and full-frame and coloured-background versions of a third each). Neither the set's outputs nor any held-out
image takes part in the fit; its threshold is the lowest logit at which the rule above and the score together still
keep every false-alarm limit. How many fit photographs it catches is estimated by 5-fold cross-validation (each fold's
photographs scored by a model fitted without them, against the threshold chosen for that model), since the shipped
score has seen them all.

Then the screen score (with --screen-score): the same, fitted on the fit screenshots and documents against the same
training-split emoji, on all of `domain.STATISTICS` (the photograph's ten and the ink statistics); its threshold is
the lowest at which the rule, the photograph score and it together keep every false-alarm limit.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

OWN = ["generated", "vary", "edit", "nudge", "blend"]


def recolour(im: Image.Image, colour) -> Image.Image:
    """The emoji with its background (near-white pixels connected to the border) painted `colour`."""
    from scipy import ndimage  # scikit-image's dependency, as the photographs are

    a = np.asarray(im.convert("RGB")).copy()
    labels, _ = ndimage.label(a.min(axis=2) > 230)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    a[np.isin(labels, border[border > 0])] = colour
    return Image.fromarray(a)


def full_frame(im: Image.Image) -> Image.Image:
    """The emoji cropped to its drawing (non-white pixels) and stretched to the whole frame."""
    a = np.asarray(im.convert("RGB"))
    ys, xs = np.nonzero(a.min(axis=2) < 230)
    if len(ys) == 0:
        return im
    return im.crop((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)).resize(im.size, Image.Resampling.LANCZOS)


def fit_logistic(X: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """Logistic regression by Newton's method, the two classes weighted equally, L2 on the weights (not the bias)."""
    w = np.where(y == 1, 0.5 / max((y == 1).sum(), 1), 0.5 / max((y == 0).sum(), 1)) * len(y)
    Xb = np.c_[X, np.ones(len(X))]
    beta = np.zeros(Xb.shape[1])
    ridge = l2 * np.diag(np.r_[np.ones(X.shape[1]), 0.0]) + 1e-9 * np.eye(Xb.shape[1])
    for _ in range(50):
        p = 1 / (1 + np.exp(-np.clip(Xb @ beta, -30, 30)))
        step = np.linalg.solve(Xb.T @ (Xb * (w * p * (1 - p))[:, None]) + ridge, Xb.T @ (w * (p - y)) + ridge @ beta)
        beta -= step
        if np.abs(step).max() < 1e-10:
            break
    return beta[:-1], float(beta[-1])


def photo_model(inside: np.ndarray, photos: np.ndarray, l2: float) -> dict:
    """The photograph score's standardisation (on the emoji) and weights."""
    mean, scale = inside.mean(axis=0), inside.std(axis=0) + 1e-6
    X = (np.concatenate([inside, photos]) - mean) / scale
    weights, bias = fit_logistic(X, np.r_[np.zeros(len(inside)), np.ones(len(photos))], l2)
    return {"mean": mean.tolist(), "scale": scale.tolist(), "weights": weights.tolist(), "bias": bias}


def lowest_threshold(rule_flags: dict, scores: dict, limits: dict, own_groups: list) -> float | None:
    """The lowest photograph-score threshold at which rule OR score keeps every false-alarm limit (and the pooled
    own outputs' 2%); None if even the rule alone breaks one."""
    for t in np.unique(np.concatenate([scores[g] for g in limits])):
        flagged = {g: rule_flags[g] | (scores[g] > t) for g in limits}
        if all(flagged[g].mean() <= limits[g] for g in limits) and np.concatenate([flagged[g] for g in own_groups]).mean() <= 0.02:
            return float(t)
    return None


def widest_threshold(rule_flags: dict, scores: dict, limits: dict, own_groups: list, fit_group: str) -> float | None:
    """The screen score's threshold: of those flagging as many of `fit_group` as the lowest one keeping every limit
    (`lowest_threshold`), the middle of the gap between the lowest fit score it flags and the highest score below that
    of any group with a limit (a margin on both sides; the lowest would spend the whole false-alarm budget on emoji
    that look like documents, a page or a memo, without catching one more fit screenshot)."""
    t0 = lowest_threshold(rule_flags, scores, limits, own_groups)
    if t0 is None:
        return None
    fit = scores[fit_group][~rule_flags[fit_group] & (scores[fit_group] > t0)]
    if not len(fit):
        return t0
    below = np.concatenate([scores[g][~rule_flags[g] & (scores[g] < fit.min())] for g in limits])
    return float((fit.min() + max(t0, below.max(initial=t0))) / 2)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=str(REPO / "weights" / "emoji"))
    ap.add_argument("--data", default=os.path.expanduser("~/.cache/unclip/emoji-256"))
    ap.add_argument("--own", default=os.path.expanduser("~/.cache/unclip/domain-set"))
    ap.add_argument("--photos", default=os.path.expanduser("~/.cache/unclip/photos"), help="scripts/collect_photos.py's folder")
    ap.add_argument("--photo-score", action="store_true", help="add the fitted photograph score to the rule")
    ap.add_argument("--screens", default=os.path.expanduser("~/.cache/unclip/screens"), help="scripts/collect_screens.py's folder")
    ap.add_argument("--screen-score", action="store_true", help="add the fitted screenshot-and-document score (needs --photo-score)")
    ap.add_argument("--train", type=int, default=1500, help="training-split emoji for the photograph score")
    ap.add_argument("--l2", type=float, default=10.0, help="the photograph score's L2 penalty (on standardised statistics)")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--sheet", default=None, help="also write a sheet of the set's outputs for the tests (tests/data/own-outputs.png): "
                                                  "64 px tiles, as the test measures them, 60 generated and 15 of each other operation")
    ap.add_argument("--screens-sheet", default=None, help="also write a sheet of the screenshots and documents for the tests "
                                                          "(tests/data/screens.png): 64 px tiles, the fit ones, then the held-out ones")
    args = ap.parse_args(argv)

    from calibrate_domain import DRAWINGS, PHOTOS, skimage_images

    from unclip_cli import domain
    from unclip_cli.checkpoint import atomic_write
    from unclip_cli.data.shards import iter_samples

    held = [s["image"] for s in iter_samples(sorted(glob.glob(os.path.join(args.data, "val-*.tar"))))]
    rng = np.random.default_rng(0)
    groups = {"held-out emoji": held, "full-frame emoji": [full_frame(im) for im in held[::3]],
              "emoji on a coloured background": [recolour(im, tuple(int(v) for v in rng.integers(0, 256, 3))) for im in held[::3]]}
    for g in OWN:
        files = sorted(glob.glob(os.path.join(args.own, g, "*.png")))
        if files:
            groups[f"own outputs: {g}"] = [Image.open(f) for f in files]
    def folder(name, root=args.photos, ext="jpg", script="collect_photos"):
        files = sorted(glob.glob(os.path.join(root, name, f"*.{ext}")))
        if not files:
            sys.exit(f"no images in {os.path.join(root, name)}: run scripts/{script}.py")
        return [(Path(f).stem, Image.open(f)) for f in files]

    photos = skimage_images(PHOTOS) + folder("fit")
    held_photos = folder("held-out")
    drawings = skimage_images(DRAWINGS) + folder("illustrations")
    groups["photographs (fit)"] = [im for _, im in photos]
    groups["photographs (held out)"] = [im for _, im in held_photos]
    groups["drawings"] = [im for _, im in drawings]
    screens = held_screens = []
    if args.screen_score or os.path.isdir(args.screens):  # measured whenever present, fitted on with --screen-score
        screens, held_screens = (folder(n, args.screens, "png", "collect_screens") for n in ("fit", "held-out"))
        groups["screenshots and documents (fit)"] = [im for _, im in screens]
        groups["screenshots and documents (held out)"] = [im for _, im in held_screens]
    every = {g: np.array([domain.features(im, domain.STATISTICS) for im in ims]) for g, ims in groups.items()}
    full = {g: f[:, :len(domain.FEATURES)] for g, f in every.items()}
    feats = {g: f[:, :4] for g, f in full.items()}  # white share, ring share, saturation, lightness
    print({g: len(v) for g, v in feats.items()}, file=sys.stderr)

    def accepted(f, w, r, s, light):
        return (f[:, 0] >= w) | ((f[:, 1] >= r) & ((f[:, 2] >= s) | (f[:, 3] >= light)))

    # The set's outputs pooled, each operation's (150 or more each) and the held-out emoji at most 2%; full-frame and
    # coloured backgrounds 5%.
    own_groups = [g for g in feats if g.startswith("own")]
    own_all = np.concatenate([feats[g] for g in own_groups])
    limits = {g: 0.02 for g in own_groups}
    limits.update({"held-out emoji": 0.02, "full-frame emoji": 0.05, "emoji on a coloured background": 0.05})
    best = None
    for w, r, s, light in itertools.product(np.round(np.arange(0.01, 0.30, 0.01), 2), np.round(np.arange(0.2, 1.0, 0.05), 2),
                                            (0.1, 0.15, 0.25, 0.35, 0.5), (0.7, 0.75, 0.8, 0.85, 0.9, 1.01)):
        fa = {g: float(1 - accepted(feats[g], w, r, s, light).mean()) for g in limits}
        if any(fa[g] > limits[g] for g in limits) or 1 - accepted(own_all, w, r, s, light).mean() > 0.02:
            continue
        key = (float(1 - accepted(feats["photographs (fit)"], w, r, s, light).mean()), -sum(fa.values()), w)
        if best is None or key > best[0]:
            best = (key, (float(w), float(r), float(s), float(light)))
    if best is None:
        sys.exit("no thresholds meet the false-alarm limits")
    w, r, s, light = best[1]
    flagged = {g: ~accepted(f, w, r, s, light) for g, f in feats.items()}
    rule = {"ring_share_min": r, "saturation_min": s, "lightness_min": min(light, 1.0)}
    photo_facts = screen_facts = None
    if args.photo_score:
        train = []
        for sample in iter_samples(sorted(glob.glob(os.path.join(args.data, "train-*.tar")))):
            train.append(sample["image"])
            if len(train) >= args.train:
                break
        rng2 = np.random.default_rng(1)
        inside_every = np.array([domain.features(im, domain.STATISTICS) for im in [*train, *(full_frame(im) for im in train[::3]),
                                 *(recolour(im, tuple(int(v) for v in rng2.integers(0, 256, 3))) for im in train[1::3])]])
        inside = inside_every[:, :len(domain.FEATURES)]
        fit = full["photographs (fit)"]
        # 5-fold cross-validation of the fit photographs (and the emoji): each fold's photographs against its own threshold
        caught = np.zeros(len(fit), bool)
        for k in range(5):
            out, out_in = np.arange(len(fit)) % 5 == k, np.arange(len(inside)) % 5 == k
            m = photo_model(inside[~out_in], fit[~out], args.l2)
            t = lowest_threshold(flagged, {g: np.array([domain.photo_score(m, x) for x in f]) for g, f in full.items()}, limits, own_groups)
            caught[out] = flagged["photographs (fit)"][out] | ((t is not None) & np.array([domain.photo_score(m, x) > (t or 0) for x in fit[out]]))
        photo = photo_model(inside, fit, args.l2)
        scores = {g: np.array([domain.photo_score(photo, x) for x in f]) for g, f in full.items()}
        threshold = lowest_threshold(flagged, scores, limits, own_groups)
        if threshold is None:
            sys.exit("the photograph score finds no threshold within the false-alarm limits")
        rule["photo"] = {**photo, "threshold": threshold}
        flagged = {g: flagged[g] | (scores[g] > threshold) for g in flagged}
        photo_facts = {"statistics": list(domain.FEATURES), "fitted_on": f"{len(train)} training-split emoji, {len(inside) - len(train)} "
                       f"full-frame and coloured-background versions of them, against the {len(fit)} fit photographs; L2 {args.l2}",
                       "threshold": "the lowest logit keeping every false-alarm limit together with the rule",
                       "fit_photographs_cross_validated": {"n": len(fit), "flagged": int(caught.sum()), "rate": round(float(caught.mean()), 4)}}
        print(f"photograph score: threshold {threshold:.4f}; fit photographs flagged in 5-fold cross-validation "
              f"{int(caught.sum())} of {len(fit)}", file=sys.stderr)
    if args.screen_score:
        if not args.photo_score:
            sys.exit("--screen-score needs --photo-score")
        names = list(domain.STATISTICS)
        fit = every["screenshots and documents (fit)"]
        caught = np.zeros(len(fit), bool)
        for k in range(5):  # cross-validated as the photograph score is, on top of the rule and that score
            out, out_in = np.arange(len(fit)) % 5 == k, np.arange(len(inside_every)) % 5 == k
            m = photo_model(inside_every[~out_in], fit[~out], args.l2)
            t = widest_threshold(flagged, {g: np.array([domain.photo_score(m, x) for x in f]) for g, f in every.items()}, limits, own_groups,
                                 "screenshots and documents (fit)")
            caught[out] = flagged["screenshots and documents (fit)"][out] | (
                (t is not None) & np.array([domain.photo_score(m, x) > (t if t is not None else 0) for x in fit[out]]))
        screen = photo_model(inside_every, fit, args.l2)
        scores = {g: np.array([domain.photo_score(screen, x) for x in f]) for g, f in every.items()}
        threshold = widest_threshold(flagged, scores, limits, own_groups, "screenshots and documents (fit)")
        if threshold is None:
            sys.exit("the screen score finds no threshold within the false-alarm limits")
        rule["screen"] = {"statistics": names, **screen, "threshold": threshold}
        flagged = {g: flagged[g] | (scores[g] > threshold) for g in flagged}
        screen_facts = {
            "statistics": names, "fitted_on": f"the same {len(inside_every)} training-split emoji against the {len(fit)} fit "
                                              f"screenshots and documents; L2 {args.l2}",
            "threshold": "with the rule and the photograph score: of the logits flagging as many fit screenshots as the lowest one "
                         "keeping every false-alarm limit, the middle of the gap between the lowest fit score flagged and the "
                         "highest score below it of a group with a limit",
            "fit_screens_cross_validated": {"n": len(fit), "flagged": int(caught.sum()), "rate": round(float(caught.mean()), 4)}}
        print(f"screen score: threshold {threshold:.4f}; fit screenshots and documents flagged in 5-fold cross-validation "
              f"{int(caught.sum())} of {len(fit)}", file=sys.stderr)
    own = np.concatenate([flagged[g] for g in feats if g.startswith("own")])
    named = {"photographs (fit)": photos, "photographs (held out)": held_photos, "drawings": drawings,
             **({"screenshots and documents (fit)": screens, "screenshots and documents (held out)": held_screens} if screens else {})}
    missed = {g: [n for (n, _), hit in zip(named[g], flagged[g]) if not hit] for g in named}
    facts = {
        "feature": f"near-white share (all channels > {domain.WHITE}) of the centre square at {domain.SIDE} px, or its border ring "
                   f"mostly of one colour (within {domain.RING_TOLERANCE}) that is saturated or pale"
                   + ("; and a photograph score not above its threshold" if photo_facts else "")
                   + ("; and a screen score (screenshots and documents) not above its threshold" if screen_facts else ""),
        **({"photo_score": photo_facts} if photo_facts else {}),
        **({"screen_score": screen_facts} if screen_facts else {}),
        "groups": {g: {"n": len(f), "flagged": int(flagged[g].sum()), "rate": round(float(flagged[g].mean()), 4)} for g, f in feats.items()},
        "own_outputs_pooled": {"n": int(len(own)), "flagged": int(own.sum()), "rate": round(float(own.mean()), 4)},
        "not_flagged": missed,
        "photo_sources": "scikit-image's sample photographs; Debian packages mate-backgrounds, lomiri-wallpapers-16.04 and "
                         "lomiri-wallpapers-20.04 (photographs), ukui-wallpapers and the rest of those (illustrations); "
                         "the sample photographs of the scikit-learn and matplotlib wheels; the example photographs of the "
                         "Debian package opencv-doc 4.6.0+dfsg-12 (scripts/collect_photos.py)",
        **({"screen_sources": "HTML of the Debian packages nodejs (its API docs), valgrind, libtasn1-doc and python3, the Rust "
                              "toolchain's docs (std, book, reference, cargo), this repo's README, CHANGELOG, page and model card, "
                              "six man pages as text, rendered by headless Chromium at 390x844 to 1920x1080 (a few forced dark); "
                              "33 charts, text pages, tables, diagrams, terminals, editors, slides and dialogs drawn with PIL "
                              "(scripts/collect_screens.py: PAGES, MANPAGES, DRAWN)"} if screens else {}),
        "chosen": "grid search: the set's outputs pooled, each operation's outputs and held-out emoji at most 2% false alarms, "
                  "full-frame and coloured-background emoji at most 5%; then the most fit photographs flagged (the held-out "
                  "photographs and the drawings take no part)",
        "command": "python scripts/calibrate_domain_images.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(json.dumps({"white_share_min": w, "image_rule": rule, "facts": facts}, indent=2, ensure_ascii=False))
    # The rule the set ships now, on the same groups, for the card's "before" column
    was = json.loads((Path(args.weights) / domain.FILE).read_text(encoding="utf-8"))
    old = was.get("image_rule") or {"ring_share_min": 2.0, "saturation_min": 0.0, "lightness_min": 0.0}
    before = {g: ~accepted(f, was["white_share_min"], old["ring_share_min"], old["saturation_min"], old["lightness_min"])
              for g, f in feats.items()}
    for kind in domain.SCORES:
        if old.get(kind):
            cols = [domain.STATISTICS.index(n) for n in old[kind].get("statistics", domain.FEATURES)]
            before = {g: before[g] | np.array([domain.photo_score(old[kind], x[cols]) > old[kind]["threshold"] for x in every[g]])
                      for g in before}
    print("\n| group | images | flagged | with the rule shipped before |\n| --- | --- | --- | --- |")
    for g, f in feats.items():
        print(f"| {g} | {len(f)} | {int(flagged[g].sum())} ({flagged[g].mean():.1%}) | {int(before[g].sum())} ({before[g].mean():.1%}) |")
    own_before = np.concatenate([before[g] for g in own_groups])
    print(f"| own outputs, all | {len(own)} | {int(own.sum())} ({own.mean():.1%}) | {int(own_before.sum())} ({own_before.mean():.1%}) |")
    def write_sheet(path, tiles):
        sheet = Image.new("RGB", (64 * 10, 64 * ((len(tiles) + 9) // 10)), "white")
        for k, im in enumerate(tiles):
            tile = Image.fromarray((domain._square(im) * 255).round().astype(np.uint8))
            sheet.paste(tile, (64 * (k % 10), 64 * (k // 10)))
        sheet.save(path)

    if args.screens_sheet:
        write_sheet(args.screens_sheet, [im for _, im in screens + held_screens])
        print(f"wrote {args.screens_sheet}: {len(screens)} fit, {len(held_screens)} held out", file=sys.stderr)
    if args.sheet:
        tiles = [im for g in OWN for im in groups.get(f"own outputs: {g}", [])[: 60 if g == "generated" else 15]]
        write_sheet(args.sheet, tiles)
        counts = {g: len(groups.get(f"own outputs: {g}", [])[: 60 if g == "generated" else 15]) for g in OWN}
        print(f"wrote {args.sheet}: {counts}", file=sys.stderr)
    if args.write:
        path = Path(args.weights) / domain.FILE
        raw = json.loads(path.read_text(encoding="utf-8"))
        raw["white_share_min"], raw["image_rule"] = w, rule
        raw.setdefault("facts", {})["images"] = facts
        text = json.dumps(raw, indent=2, ensure_ascii=False) + "\n"
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
