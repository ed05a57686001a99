"""Collect photographs that install offline, for the out-of-domain image test (issue 24, item 1): copied from Debian
packages of desktop wallpapers, from the sample images inside two PyPI wheels and from the example data of the Debian
package `opencv-doc`, then split into a fit half and a held-out half (alternately, by name, within each of the two
batches: the wallpapers and wheels, then opencv-doc's, added later so as to leave the first split as it was), as
256 px JPEGs under OUT/fit and OUT/held-out.

    apt-get install ukui-wallpapers mate-backgrounds lomiri-wallpapers-16.04 lomiri-wallpapers-20.04
    pip download --no-deps scikit-learn matplotlib -d WHEELS
    apt-get download opencv-doc && dpkg -x opencv-doc_*.deb OPENCV   # (version 4.6.0+dfsg-12; or apt-get install it: OPENCV=/)
    python scripts/collect_photos.py --wheels WHEELS --opencv OPENCV --out ~/.cache/unclip/photos

Only the photographs are taken (chosen by looking at every image of those packages): the wallpapers that are drawings,
renders or gradients are left out, and listed apart as OUT/illustrations for a measurement of their own.
scripts/calibrate_domain_images.py reads the folders; nothing here is committed or fetched at run time.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import zipfile
from pathlib import Path

from PIL import Image

BACKGROUNDS = Path("/usr/share/backgrounds")
# Photographs in the Debian packages (the rest of their images are illustrations)
PHOTOS = {
    "mate-backgrounds": ["mate/nature/" + n for n in ("Aqua.jpg", "Blinds.jpg", "Dune.jpg", "FreshFlower.jpg", "Garden.jpg",
                                                       "GreenMeadow.jpg", "LadyBird.jpg", "RainDrops.jpg", "Storm.jpg", "TwoWings.jpg",
                                                       "Wood.jpg", "YellowFlower.jpg")],
    "lomiri-wallpapers-16.04": ["Bridge_by_Sander_Klootwijk.jpg", "Dragonfly_by_Bolly.jpg", "Picture_0B_by_freespace.jpg",
                                "Picture_1A_by_freespace.jpg", "Wine_by_Jakkub_Mede.jpg", "aitzgorri_by_Aitzol_Berasategi.jpg",
                                "free_by_Peter_Nerlich.jpg", "friends_by_Aitzol_Berasategi.jpg", "greentock_by_Peter_Nerlich.jpg",
                                "life_by_Aitzol_Berasategi.jpg", "picosdeeuropa_by_Aitzol_Berasategi.jpg",
                                "seeding_by_Clements_Engelhardt.jpg", "sunset_by_Aitzol_Berasategi.jpg"],
    "lomiri-wallpapers-20.04": ["Infinite-Sea_by_Aury88.jpg", "Kleiber_by_Lukas_Baubkus.jpg"],
}
ILLUSTRATIONS = ["ukui-wallpapers", "mate-backgrounds", "lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04"]
WHEEL_PHOTOS = {"scikit_learn": ["sklearn/datasets/images/china.jpg", "sklearn/datasets/images/flower.jpg"],
                "matplotlib": ["matplotlib/mpl-data/sample_data/grace_hopper.jpg"]}
# opencv-doc's example photographs (usr/share/doc/opencv-doc/examples/...), one of each near-identical pair (aloeL/aloeR,
# leuvenA/B, basketball1/2, rubberwhale1/2, ela_original/modified, aero1/aero3, left/right, box/box_in_scene), so no scene
# is on both sides of the split. Left out, by looking at all 2,369 images: renders, logos, drawings, paintings
# (starry_night, the anime girl of fuzzy/), shapes, masks, scanned or photographed documents (sudoku, text_*, LR_*) and
# the grey chessboard calibration shots.
OPENCV_DOC = "usr/share/doc/opencv-doc/examples"
OPENCV_PHOTOS = ["alphamat/input_images/plant.jpg", "data/aero1.jpg", "data/aloeL.jpg", "data/apple.jpg", "data/baboon.jpg",
                 "data/basketball1.png", "data/board.jpg", "data/box_in_scene.png", "data/building.jpg", "data/butterfly.jpg",
                 "data/chicky_512.png", "data/ela_original.jpg", "data/fruits.jpg", "data/graf1.png", "data/home.jpg",
                 "data/left.jpg", "data/leuvenA.jpg", "data/licenseplate_motion.jpg", "data/messi5.jpg", "data/orange.jpg",
                 "data/rubberwhale1.png", "data/squirrel_cls.jpg", "data/stuff.jpg", "dnn_superres/butterfly.png",
                 "hfs/data/000.jpg", "hfs/data/001.jpg", "hfs/data/002.jpg", "reg/home.png",
                 *(f"text/scenetext0{i}.jpg" for i in range(1, 7))]
SIDE = 256


def small(im: Image.Image) -> Image.Image:
    im.draft("RGB", (SIDE * 2, SIDE * 2))  # JPEG: decode at a fraction of the size
    im = im.convert("RGB")
    im.thumbnail((SIDE * 2, SIDE * 2), Image.Resampling.LANCZOS)
    w, h = im.size
    return im.resize((SIDE * w // min(w, h), SIDE * h // min(w, h)), Image.Resampling.LANCZOS)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheels", type=Path, required=True, help="folder holding the scikit-learn and matplotlib wheels")
    ap.add_argument("--opencv", type=Path, default=None, help="the root opencv-doc was unpacked or installed in (/ when installed)")
    ap.add_argument("--out", type=Path, default=Path.home() / ".cache" / "unclip" / "photos")
    args = ap.parse_args(argv)
    Image.MAX_IMAGE_PIXELS = None  # wallpapers of 5640 px from the system's own packages
    photos = {}
    for pkg, names in PHOTOS.items():
        for n in names:
            photos[f"{pkg}--{Path(n).stem}"] = Image.open(BACKGROUNDS / n)
    for prefix, members in WHEEL_PHOTOS.items():
        wheel = next(args.wheels.glob(f"{prefix}-*.whl"), None)
        if wheel is None:
            sys.exit(f"no {prefix} wheel in {args.wheels}")
        with zipfile.ZipFile(wheel) as z:
            for m in members:
                photos[f"{prefix}--{Path(m).stem}"] = Image.open(io.BytesIO(z.read(m)))
    taken = {str(BACKGROUNDS / n) for names in PHOTOS.values() for n in names}
    batches = [photos]
    if args.opencv is not None:
        batches.append({"opencv-doc--" + n.replace("/", "_").rsplit(".", 1)[0]: Image.open(args.opencv / OPENCV_DOC / n)
                        for n in OPENCV_PHOTOS})
    for batch in batches:
        for k, name in enumerate(sorted(batch)):
            folder = args.out / ("fit" if k % 2 == 0 else "held-out")
            folder.mkdir(parents=True, exist_ok=True)
            small(batch[name]).save(folder / f"{name}.jpg", quality=92)
    drawings = args.out / "illustrations"
    drawings.mkdir(parents=True, exist_ok=True)
    for pkg in ILLUSTRATIONS:
        files = subprocess.run(["dpkg", "-L", pkg], capture_output=True, text=True, check=True).stdout.split()
        for f in files:
            # one size of each (mate ships some at three sizes), no photograph
            if not (f.lower().endswith((".jpg", ".png")) and f not in taken and "_3840x" not in f and "_5640x" not in f):
                continue
            im = Image.open(f)
            if "A" in im.getbands() and im.getchannel("A").getextrema()[0] < 255:
                continue  # an overlay meant to be laid on another picture: no image of its own
            small(im).save(drawings / f"{pkg}--{Path(f).stem}.jpg", quality=92)
    print({p.name: len(list(p.glob("*.jpg"))) for p in sorted(args.out.iterdir())}, file=sys.stderr)


if __name__ == "__main__":
    main()
