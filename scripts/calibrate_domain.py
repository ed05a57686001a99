"""Calibrate a model set's out-of-domain warnings (`unclip_cli/domain.py`).

    python scripts/calibrate_domain.py --weights weights/emoji --data ~/.cache/unclip/emoji [--write]

Images: the threshold on the near-white share is the 2nd percentile of the held-out emoji (val shards);
the script reports its false alarms there and how many of scikit-image's sample photographs and drawings
it flags (these are only measured, never used to choose). Prompts: the warning names words the set's CLIP
never saw; the script reports how often that happens to the held-out prompts and to prompts describing
photographs and scenes. With --write it stores the result as WEIGHTS/domain.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path

import numpy as np

PHOTOS = ["astronaut", "camera", "cell", "chelsea", "coffee", "coins", "grass", "gravel", "brick", "hubble_deep_field", "immunohistochemistry",
          "moon", "stereo_motorcycle", "retina", "rocket", "clock", "lfw_subset"]
DRAWINGS = ["horse", "text", "page", "logo", "shepp_logan_phantom", "colorwheel", "microaneurysms"]
# Prompts that name no emoji: photographs, scenes, styles and technical subjects.
FOREIGN_PROMPTS = [
    "a photograph of a busy street in Tokyo at night", "an aerial photo of a river delta", "a watercolor landscape of the Alps",
    "a portrait of an old fisherman, oil on canvas", "a macro photo of a dragonfly wing", "the interior of a gothic cathedral",
    "a blueprint of a jet engine", "a chest x-ray", "a satellite image of a hurricane", "a renaissance fresco of angels",
    "a street market in Marrakech, documentary photo", "a long exposure of car lights on a highway", "a close-up of rusty metal",
    "an impressionist painting of water lilies", "a microscope image of blood cells", "a foggy pine forest at dawn",
    "a 3d render of a modern kitchen", "a black and white photo of a jazz band", "a spreadsheet of quarterly sales",
    "a detailed map of the London underground", "a pencil sketch of a human skull", "a product photo of running shoes",
    "a crowd at a football stadium", "the surface of Mars seen from orbit", "a close-up of a circuit board",
    "a baroque still life with lemons and silver", "an architectural drawing of a bridge", "a selfie on a beach at sunset",
    "a medieval manuscript page", "a herd of elephants crossing a savanna, wildlife photography",
]
# The same in Chinese: the held-out prompts include Chinese CLDR names, and the check must not flag those.
FOREIGN_PROMPTS_ZH = [
    "东京夜晚繁忙街道的照片", "河流三角洲的航拍照片", "阿尔卑斯山的水彩风景画", "老渔夫的肖像，布面油画", "蜻蜓翅膀的微距照片", "哥特式大教堂的内部",
    "喷气发动机的蓝图", "胸部X光片", "飓风的卫星图像", "文艺复兴时期的天使壁画", "马拉喀什的街头市场", "公路上车灯的长曝光", "生锈金属的特写",
    "睡莲的印象派油画", "血细胞的显微镜图像", "黎明时分雾蒙蒙的松树林", "现代厨房的三维渲染", "爵士乐队的黑白照片", "季度销售额的电子表格", "伦敦地铁的详细地图",
    "人类头骨的铅笔素描", "跑鞋的产品照片", "足球场上的人群", "从轨道上看到的火星表面", "电路板的特写", "巴洛克风格的柠檬与银器静物画", "桥梁的建筑图纸",
    "日落时海滩上的自拍", "中世纪的手抄本", "大象群穿越稀树草原，野生动物摄影",
]
CALIBRATION_PERCENTILE = 2.0  # threshold at this percentile of held-out emoji: about 2% false alarms


def skimage_images(names):
    import skimage.data as d

    from PIL import Image

    out = []
    for name in names:
        arr = getattr(d, name)()
        arr = np.asarray(arr[0] if isinstance(arr, tuple) else arr)  # stereo_motorcycle: (left, right, disparity)
        if name == "lfw_subset":  # a stack of 25 px grey faces in [0, 1]: the first five
            out += [(f"{name}[{i}]", Image.fromarray((a * 255).astype(np.uint8))) for i, a in enumerate(arr[:5])]
            continue
        if arr.dtype == bool:
            arr = (~arr * 255).astype(np.uint8) if name == "horse" else (arr * 255).astype(np.uint8)
        if arr.dtype != np.uint8:
            arr = (255 * (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-9)).astype(np.uint8)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[..., 0]
        out.append((name, Image.fromarray(arr)))
    return out


def caption_chars(paths) -> str:
    """The characters beyond ASCII of every caption in the shards (their `.json` metadata, lower-cased as the
    check reads prompts), sorted: `domain.json`'s `chars`."""
    import tarfile

    chars = set()
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    texts = [t for ts in (meta.get("captions") or {}).values() for t in ts] + [meta.get("caption") or ""]
                    chars.update(c for t in texts for c in t.lower() if ord(c) > 127)
    return "".join(sorted(chars))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="weights/emoji")
    ap.add_argument("--data", default=os.path.expanduser("~/.cache/unclip/emoji"))
    ap.add_argument("--write", action="store_true", help="write WEIGHTS/domain.json")
    args = ap.parse_args(argv)

    from unclip_cli import domain
    from unclip_cli.checkpoint import atomic_write
    from unclip_cli.data.shards import iter_samples
    from unclip_cli.modelset import load_model_set

    clip = load_model_set(args.weights).clip.model
    held = np.array([domain.white_share(s["image"]) for s in iter_samples(sorted(glob.glob(os.path.join(args.data, "val-*.tar"))))])
    threshold = round(float(np.percentile(held, CALIBRATION_PERCENTILE)), 4)
    photos, drawings = skimage_images(PHOTOS), skimage_images(DRAWINGS)
    photo = np.array([domain.white_share(im) for _, im in photos])
    drawing = np.array([domain.white_share(im) for _, im in drawings])
    chars = caption_chars(sorted(glob.glob(os.path.join(args.data, "train-*.tar"))))
    known = frozenset(chars)
    eval_prompts = json.loads(Path(args.data, "eval_prompts.json").read_text())
    prompts = [p["prompt"] for p in eval_prompts]
    held_unknown = [bool(domain.unknown_words(clip, p, known)) for p in prompts]
    held_zh = [u for p, u in zip(eval_prompts, held_unknown) if p.get("lang") == "zh"]
    foreign_unknown = [bool(domain.unknown_words(clip, p, known)) for p in FOREIGN_PROMPTS]
    foreign_zh = [bool(domain.unknown_words(clip, p, known)) for p in FOREIGN_PROMPTS_ZH]
    facts = {
        "images": {"feature": f"share of near-white pixels (all channels > {domain.WHITE}) of the centre square at {domain.SIDE} px",
                   "threshold": threshold, "percentile_of_held_out": CALIBRATION_PERCENTILE, "held_out_emoji": len(held),
                   "false_alarms_on_held_out_emoji": round(float((held < threshold).mean()), 4),
                   "held_out_median": round(float(np.median(held)), 4),
                   "photos": len(photos), "photos_flagged": int((photo < threshold).sum()),
                   "drawings": len(drawings), "drawings_flagged": int((drawing < threshold).sum()),
                   "not_flagged": [n for (n, _), v in zip(photos + drawings, np.concatenate([photo, drawing])) if v >= threshold]},
        "prompts": {"rule": "warn when a word never occurred in a training caption (the CLIP maps it to its unknown row), "
                            "an emoji or symbol included, or a character beyond ASCII is not among the captions' (chars)",
                    "held_out_prompts": len(prompts), "false_alarms_on_held_out_prompts": round(float(np.mean(held_unknown)), 4),
                    "held_out_chinese_prompts": len(held_zh), "false_alarms_on_held_out_chinese_prompts": round(float(np.mean(held_zh or [0])), 4),
                    "foreign_prompts": len(FOREIGN_PROMPTS), "foreign_flagged": int(sum(foreign_unknown)),
                    "foreign_not_flagged": [p for p, u in zip(FOREIGN_PROMPTS, foreign_unknown) if not u],
                    "foreign_chinese_prompts": len(FOREIGN_PROMPTS_ZH), "foreign_chinese_flagged": int(sum(foreign_zh))},
        "command": "python scripts/calibrate_domain.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    report = {"subject": "emoji", "white_share_min": threshold, "facts": facts, "chars": chars}
    was = Path(args.weights) / domain.FILE
    was = json.loads(was.read_text(encoding="utf-8")) if was.is_file() else {}
    if was.get("image_rule"):  # the image test is calibrated by calibrate_domain_images.py: kept as it is
        report.update(white_share_min=was["white_share_min"], image_rule=was["image_rule"])
        facts["images"] = was.get("facts", {}).get("images", facts["images"])
    text = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    print(text)
    if args.write:
        atomic_write(Path(args.weights) / domain.FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        print(f"wrote {Path(args.weights) / domain.FILE}", file=sys.stderr)


if __name__ == "__main__":
    main()
