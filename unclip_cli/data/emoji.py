"""The emoji corpus: openly licensed emoji art in several styles, captioned in English and Chinese.

Sources are pinned npm packages (fetched by `unclip_cli.data.npm`): each style is one package of
artwork, and `emojibase-data` supplies the Unicode CLDR names and keywords in both languages. Every
image is rendered or resized to the target size, flattened onto a background and written to
img2dataset-layout shards with its captions, concept, style and licence. A fixed 5% of
(concept, style) pairs, picked by a hash, is held out for validation, and a list of prompts for
those held-out pairs is written for evaluation.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import random
import re
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image, ImageColor

from unclip_cli.data.npm import NpmPackage, fetch_package, iter_members
from unclip_cli.data.shards import ShardWriter, flatten
from unclip_cli.errors import DataError

VAL_FRACTION = 0.05
SAMPLES_PER_SHARD = 1000
_COMPONENT_GROUP = 2  # emojibase's group of skin tone swatches and hair components
EVAL_PAIRS = None  # held-out (concept, style) pairs, each one English and one Chinese prompt; None: all (~480)
MAX_KEYWORDS = 5

EMOJIBASE = NpmPackage(
    "emojibase-data",
    "17.0.0",
    "sha512-Yvgb5AWoHViHV/gq1qr5ZAarcBip+B27/ZLRsUJkbgAEaLlZ/fof9g882LTpmEpyhBNEC0m2SEmItljHsTygjA==",
)
EMOJIBASE_CREDIT = (
    "Names and keywords: Unicode CLDR annotations (Copyright © Unicode, Inc., Unicode License v3), "
    "as packaged in emojibase-data by Miles Johnson (MIT License)."
)

ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Style:
    """One art style: a pinned package and how to find its images in it."""

    name: str  # used in keys, metadata and `--styles`
    title: str  # the style's name inside English captions
    title_zh: str  # ... and inside Chinese ones
    package: NpmPackage
    licence: str  # SPDX identifier
    credit: str  # the attribution line the licence asks for
    layout: str  # "files": one image per file named by hexcode; "iconify": an Iconify JSON icon set
    folder: str = ""  # "files": where the images are inside the package
    ext: str = ".svg"  # "files": which files are images
    # "iconify": some sets ship an empty chars.json; their icon names match this package's chars.json.
    chars_from: NpmPackage | None = None


_FLUENT_FLAT = NpmPackage(
    "@iconify-json/fluent-emoji-flat",
    "1.2.6",
    "sha512-RY47RgPb47fYUiyrA64sIOL0+UU02s29sXpNBbIQRBUlPlfNFTKUmZDERGuxDs/7yNGWqQYvuaSYM1M4fRXlUw==",
)
_FLUENT_CREDIT = "Fluent Emoji, Copyright (c) Microsoft Corporation, MIT License."

STYLES: dict[str, Style] = {
    s.name: s
    for s in [
        Style(
            "openmoji", "OpenMoji", "OpenMoji",
            NpmPackage("openmoji", "17.0.0",
                       "sha512-EBnYrNGdcdw+OSXmENeNE1yBNRu6tOraTmoOyUbJkTmvT/+XETp8RZLSJFzD3lrPc5N9CzsyPnRTk0Vp4UaI9w=="),
            "CC-BY-SA-4.0",
            "All emojis designed by OpenMoji – the open-source emoji and icon project. "
            "License: CC BY-SA 4.0 (Creative Commons Attribution-ShareAlike 4.0 International).",
            "files", folder="color/svg/",
        ),
        Style(
            "twemoji", "Twemoji", "Twemoji",
            NpmPackage("@twemoji/svg", "15.0.0",
                       "sha512-ZSPef2B6nBaYnfgdTbAy4jgW95o7pi2xPGwGCU+WMTxo7J6B1lMPTWwSq/wTuiMq+N0khQ90CcvYp1wFoQpo/w=="),
            "CC-BY-4.0",
            "Twemoji graphics Copyright 2020 Twitter, Inc and other contributors (now maintained by the "
            "jdecked/twemoji community), licensed under CC-BY 4.0 (Creative Commons Attribution 4.0 "
            "International). SVG files as optimised and packaged in @twemoji/svg by Samuel Kopp (MIT License).",
            "files",
        ),
        Style(
            "noto", "Noto", "Noto",
            NpmPackage("@iconify-json/noto", "1.2.9",
                       "sha512-DQiuXENbun41ch+XPSV55H9FaWKpHTyz46YIKtSaKYD4fIDDzL1tR6H4np/T38jfrTAeI3rcKF0mqHYeZVAuaw=="),
            "Apache-2.0",
            "Noto Emoji, Copyright Google Inc., Apache License 2.0; SVG data as packaged by Iconify.",
            "iconify",
        ),
        Style(
            "fluent-flat", "Fluent flat", "Fluent 扁平",
            _FLUENT_FLAT, "MIT", _FLUENT_CREDIT + " SVG data as packaged by Iconify.", "iconify",
        ),
        Style(
            "fluent-color", "Fluent color", "Fluent 彩色",
            NpmPackage("@iconify-json/fluent-emoji", "1.2.7",
                       "sha512-D8G6bKAyIsyxP1rzZtIWr/gg/fO4Rg1+DyCWlfqKK4h8W+4Em/Y0P6QYgJUQTlUcagzJvSyg+9OBv4hz4Hc/QA=="),
            "MIT", _FLUENT_CREDIT + " SVG data as packaged by Iconify.", "iconify", chars_from=_FLUENT_FLAT,
        ),
        Style(
            "fluent-3d", "Fluent 3D", "Fluent 3D",
            NpmPackage("@lobehub/fluent-emoji-3d", "1.1.0",
                       "sha512-Wlq2lVStTnr8BDpIJ0pEnTKO4LuDxxqTEhTvRtD1DLRF0me7ogeRQjKoehDHXuVJ2Qaecgl5wRBv60lUAG3h7g=="),
            "MIT", _FLUENT_CREDIT + " 256 px WebP renders as packaged by LobeHub (MIT License).",
            "files", folder="assets/", ext=".webp",
        ),
    ]
}


# --------------------------------------------------------------------------------------------------
# Names and keywords


@dataclass(frozen=True)
class Concept:
    """One emoji as emojibase describes it. Skin tone variants are concepts of their own."""

    hexcode: str  # emojibase's hexcode of this exact emoji, e.g. "1F44B-1F3FB"
    base: str  # hexcode of the emoji it varies, shared by all its skin tones, e.g. "1F44B"
    emoji: str
    label_en: str
    label_zh: str
    tags_en: tuple[str, ...]
    tags_zh: tuple[str, ...]
    skin_tone: bool
    group: int | None = None  # emojibase's group; None for regional indicators, 2 for components


def canonical_hex(code: str) -> str:
    """A hexcode normalised for matching across packages: upper case, no zero padding, no FE0F.

    Packages disagree on the variation selector U+FE0F and on padding ("0023-fe0f-20e3" vs "23-20E3"),
    but the remaining code points identify the emoji.
    """
    parts = [p for p in re.split(r"[-_ ]", code.strip()) if p]
    return "-".join(f"{int(p, 16):X}" for p in parts if int(p, 16) != 0xFE0F)


def load_concepts(emojibase_tarball: Path) -> dict[str, Concept]:
    """Every emoji and skin tone variant in emojibase-data, keyed by `canonical_hex`."""
    files = dict(iter_members(emojibase_tarball, lambda n: n in ("en/data.json", "zh/data.json")))
    if len(files) != 2:
        raise DataError(f"{emojibase_tarball.name} lacks en/data.json or zh/data.json.",
                        hint="The pinned emojibase-data version may be wrong.")
    en = json.loads(files["en/data.json"])
    zh = {e["hexcode"]: e for e in json.loads(files["zh/data.json"])}
    concepts: dict[str, Concept] = {}
    for entry in en:
        entry_zh = zh.get(entry["hexcode"], {})
        tags_en, tags_zh = tuple(entry.get("tags", ())), tuple(entry_zh.get("tags", ()))
        concepts[canonical_hex(entry["hexcode"])] = _concept(entry, entry_zh, entry["hexcode"], tags_en, tags_zh, False)
        skins_zh = {s["hexcode"]: s for s in entry_zh.get("skins", ())}
        for skin in entry.get("skins", ()):
            # Variants carry no keywords of their own; they share the base emoji's.
            c = _concept(skin, skins_zh.get(skin["hexcode"], {}), entry["hexcode"], tags_en, tags_zh, True)
            concepts[canonical_hex(skin["hexcode"])] = c
    return concepts


def _concept(en: dict, zh: dict, base: str, tags_en, tags_zh, skin_tone: bool) -> Concept:
    return Concept(en["hexcode"], base, en.get("emoji", ""), en["label"], zh.get("label", en["label"]),
                   tags_en, tags_zh, skin_tone, en.get("group"))


def english_name(label: str, skin_tone: bool) -> str:
    """CLDR's "head: detail" labels turned into a phrase: "flag of China", "waving hand with light skin tone"."""
    head, sep, tail = label.partition(": ")
    if not sep:
        return label
    if head == "flag":
        return f"flag of {tail}"
    if head == "keycap":
        return f"keycap {tail}"
    if skin_tone:
        return f"{head} with {tail}"
    return f"{head}, {tail}"


def chinese_name(label: str, skin_tone: bool) -> str:
    """The same for Chinese labels: "旗: 中国" becomes "中国旗帜", "挥手: 较浅肤色" becomes "挥手（较浅肤色）"."""
    head, sep, tail = label.partition(": ")
    if not sep:
        return label
    if head == "旗":
        return f"{tail}旗帜"
    if skin_tone:
        return f"{head}（{tail}）"
    return f"{head}：{tail}"


def captions(concept: Concept, style: Style) -> dict[str, list[str]]:
    """Several phrasings in each language, with and without the style's name."""
    name = english_name(concept.label_en, concept.skin_tone)
    keywords = [t for t in concept.tags_en if t.lower() not in name.lower()][:MAX_KEYWORDS]
    en = [
        name,
        f"an emoji of {name}",
        f"{name} emoji",
        f"an emoji of {name} in {style.title} style",
        f"{name}, {style.title} style",
    ]
    if keywords:
        en += [f"{name}, {', '.join(keywords)}", f"{style.title} emoji of {name}: {', '.join(keywords)}"]

    name_zh = chinese_name(concept.label_zh, concept.skin_tone)
    keywords_zh = [t for t in concept.tags_zh if t not in name_zh][:MAX_KEYWORDS]
    zh = [
        name_zh,
        f"{name_zh}的表情符号",
        f"{name_zh}表情",
        f"{style.title_zh}风格的{name_zh}表情符号",
        f"{name_zh}，{style.title_zh}风格",
    ]
    if keywords_zh:
        zh += [f"{name_zh}，{'、'.join(keywords_zh)}", f"{style.title_zh}风格的{name_zh}表情：{'、'.join(keywords_zh)}"]
    return {"en": en, "zh": zh}


def primary_caption(concept: Concept, style: Style) -> str:
    """The one English caption written to `{key}.txt`."""
    return f"an emoji of {english_name(concept.label_en, concept.skin_tone)} in {style.title} style"


def split_of(concept: str, style: str) -> str:
    """"val" for a fixed 5% of (concept, style) pairs, "train" otherwise; stable across runs and machines.

    `concept` is the base hexcode, so all skin tones of a held-out emoji are held out together.
    """
    return "val" if _unit_hash(concept, style) < VAL_FRACTION else "train"


def _unit_hash(concept: str, style: str) -> float:
    digest = hashlib.sha256(f"{concept}|{style}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


# --------------------------------------------------------------------------------------------------
# Finding the images in each package


def collect_sources(style: Style, tarball: Path, chars_tarball: Path | None = None) -> dict[str, tuple[str, bytes]]:
    """{canonical hexcode: (kind, bytes)} for every image in the style's package; kind is "svg" or "raster"."""
    if style.layout == "files":
        return _collect_files(style, tarball)
    if style.layout == "iconify":
        return _collect_iconify(tarball, chars_tarball)
    raise ValueError(f"unknown layout {style.layout!r}")


def _collect_files(style: Style, tarball: Path) -> dict[str, tuple[str, bytes]]:
    kind = "svg" if style.ext == ".svg" else "raster"
    found: dict[str, tuple[str, bytes]] = {}
    want = lambda n: n.startswith(style.folder) and "/" not in n[len(style.folder):] and n.lower().endswith(style.ext)
    for name, data in iter_members(tarball, want):
        stem = name[len(style.folder): -len(style.ext)]
        try:
            code = canonical_hex(stem)
        except ValueError:  # a file not named by code points (a logo, a sample): not an emoji
            continue
        found.setdefault(code, (kind, data))
    return found


def _collect_iconify(tarball: Path, chars_tarball: Path | None) -> dict[str, tuple[str, bytes]]:
    """Iconify sets keep every icon's SVG body in icons.json and map code points to names in chars.json."""
    files = dict(iter_members(tarball, lambda n: n in ("icons.json", "chars.json")))
    if "icons.json" not in files:
        raise DataError(f"{tarball.name} has no icons.json.", hint="The pinned package is not an Iconify icon set.")
    icon_set = json.loads(files["icons.json"])
    chars_source = files.get("chars.json", b"{}") if chars_tarball is None else dict(
        iter_members(chars_tarball, lambda n: n == "chars.json")).get("chars.json", b"{}")
    chars = json.loads(chars_source)
    found: dict[str, tuple[str, bytes]] = {}
    for code, icon_name in sorted(chars.items()):
        icon = icon_set["icons"].get(icon_name)
        if icon is not None:
            found.setdefault(canonical_hex(code), ("svg", _iconify_svg(icon, icon_set).encode()))
    return found


def _iconify_svg(icon: dict, icon_set: dict) -> str:
    # An icon's box defaults to the set's; Iconify's default size is 16.
    left, top = icon.get("left", icon_set.get("left", 0)), icon.get("top", icon_set.get("top", 0))
    width = icon.get("width", icon_set.get("width", 16))
    height = icon.get("height", icon_set.get("height", 16))
    return ('<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'viewBox="{left} {top} {width} {height}">{icon["body"]}</svg>')


# --------------------------------------------------------------------------------------------------
# Rendering (runs in worker processes)


def render(kind: str, data: bytes, size: int, background: str) -> bytes:
    """PNG bytes of a `size`×`size` RGB image on `background`, from SVG or raster source bytes.

    SVGs are rasterised at the target size, so edges are exact rather than upscaled; rasters are
    resized with an antialiasing (Lanczos) filter. Non-square art is centred, never stretched.
    """
    if kind == "svg":
        image = _rasterise_svg(data, size)
    else:
        image = Image.open(io.BytesIO(data))
        image.load()
    return _png_bytes(flatten(_fit(image.convert("RGBA"), size), background))


def _rasterise_svg(data: bytes, size: int) -> Image.Image:
    try:
        import resvg_py
    except ImportError as e:
        raise DataError("Rasterising SVG emoji needs the `resvg-py` package.",
                        hint="pip install 'unclip-cli[data]'") from e
    # System fonts are skipped: emoji art has no text, and loading fonts dominates the render time.
    png = resvg_py.svg_to_bytes(svg_string=data.decode("utf-8"), width=size, height=size, skip_system_fonts=True)
    image = Image.open(io.BytesIO(bytes(png)))
    image.load()
    return image


def _fit(image: Image.Image, size: int) -> Image.Image:
    if image.size == (size, size):
        return image
    scale = size / max(image.size)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    # Premultiplied resampling so transparent pixels' stored colour does not bleed into the edges.
    resized = image.convert("RGBa").resize((w, h), Image.Resampling.LANCZOS).convert("RGBA")
    canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    canvas.paste(resized, ((size - w) // 2, (size - h) // 2))
    return canvas


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _render_job(job: tuple[str, bytes, int, str]) -> bytes | str:
    # Errors travel back as text so that one bad file names itself instead of killing the pool.
    kind, data, size, background = job
    try:
        return render(kind, data, size, background)
    except Exception as e:  # noqa: BLE001 - reported per sample by the parent
        return f"{type(e).__name__}: {e}"


# --------------------------------------------------------------------------------------------------
# The build


@dataclass
class _Sample:
    style: Style
    concept: Concept
    kind: str
    data: bytes

    @property
    def key(self) -> str:
        return f"{self.style.name}_{self.concept.hexcode.lower()}"

    @property
    def split(self) -> str:
        return split_of(self.concept.base, self.style.name)


def resolve_styles(names: Iterable[str] | None) -> list[Style]:
    if not names:
        return list(STYLES.values())
    unknown = [n for n in names if n not in STYLES]
    if unknown:
        raise DataError(f"Unknown style(s): {', '.join(unknown)}.", hint=f"Choose from: {', '.join(STYLES)}.")
    return [STYLES[n] for n in dict.fromkeys(names)]


def build_emoji_corpus(
    out_dir: Path,
    *,
    cache_dir: Path,
    size: int = 128,
    styles: Iterable[str] | None = None,
    background: str = "white",
    workers: int = 2,
    per_shard: int = SAMPLES_PER_SHARD,
    progress: ProgressFn | None = None,
) -> dict:
    """Fetch the pinned packages, build the corpus in `out_dir`, and return its manifest.

    The new corpus is assembled in a side folder and moved into place at the end, so an interrupted
    build leaves the previous corpus intact.
    """
    chosen = resolve_styles(styles)
    _check_background(background)
    progress = progress or (lambda stage, done, total: None)
    out_dir, cache_dir = Path(out_dir).expanduser(), Path(cache_dir).expanduser()

    started = time.time()
    tarballs = _fetch_all(chosen, cache_dir, progress)
    downloaded = time.time()

    concepts = load_concepts(tarballs[EMOJIBASE])
    samples, unmatched = _gather_samples(chosen, tarballs, concepts)
    staging = out_dir / ".building"
    if staging.exists():
        shutil.rmtree(staging)
    shards = _write_shards(samples, staging, size, background, workers, per_shard, progress)

    manifest = _manifest(chosen, samples, unmatched, shards, size, background,
                         build_seconds=time.time() - downloaded, download_seconds=downloaded - started)
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    (staging / "ATTRIBUTION.md").write_text(attribution_markdown(chosen, size, background))
    (staging / "eval_prompts.json").write_text(json.dumps(eval_prompts(samples), indent=1, ensure_ascii=False) + "\n")
    _replace_corpus(staging, out_dir)
    manifest["build_seconds"] = round(time.time() - downloaded, 1)
    return manifest


def _check_background(background: str) -> None:
    try:
        ImageColor.getrgb(background)
    except ValueError as e:
        raise DataError(f"Unknown background colour {background!r}.", hint="Use a name like 'white' or '#rrggbb'.") from e


def _fetch_all(styles: list[Style], cache_dir: Path, progress: ProgressFn) -> dict[NpmPackage, Path]:
    packages = [EMOJIBASE] + [s.package for s in styles] + [s.chars_from for s in styles if s.chars_from]
    packages = list(dict.fromkeys(packages))
    tarballs = {}
    for i, pkg in enumerate(packages):
        progress(f"fetch {pkg.spec}", i, len(packages))
        tarballs[pkg] = fetch_package(pkg, cache_dir)
    progress("fetch", len(packages), len(packages))
    return tarballs


def _gather_samples(styles, tarballs, concepts) -> tuple[list[_Sample], dict[str, int]]:
    samples: list[_Sample] = []
    unmatched: dict[str, int] = {}
    for style in styles:
        chars = tarballs[style.chars_from] if style.chars_from else None
        sources = collect_sources(style, tarballs[style.package], chars)
        # Art without a CLDR name (a package's own extras) cannot be captioned, so it is left out.
        unmatched[style.name] = sum(code not in concepts for code in sources)
        for code in sorted(sources):
            if code in concepts:
                kind, data = sources[code]
                samples.append(_Sample(style, concepts[code], kind, data))
    # One fixed shuffle so that every shard mixes styles and concepts, as a streaming reader wants.
    random.Random(0).shuffle(samples)
    return samples, unmatched


def _write_shards(samples, out_dir, size, background, workers, per_shard, progress) -> dict[str, list[str]]:
    writers = {split: ShardWriter(out_dir, split, per_shard) for split in ("train", "val")}
    jobs = ((s.kind, s.data, size, background) for s in samples)
    with multiprocessing.Pool(max(1, workers)) as pool:
        for i, (sample, png) in enumerate(zip(samples, pool.imap(_render_job, jobs, chunksize=32))):
            if isinstance(png, str):
                raise DataError(f"Cannot render {sample.key} from {sample.style.package.spec}: {png}",
                                hint="The cached package may be damaged; delete it from the npm cache and retry.")
            writers[sample.split].write(sample.key, png, "png", text=primary_caption(sample.concept, sample.style),
                                        meta=_sample_meta(sample))
            if i % 200 == 0:
                progress("render", i, len(samples))
    progress("render", len(samples), len(samples))
    return {split: [p.name for p in w.close()] for split, w in writers.items()}


def _sample_meta(sample: _Sample) -> dict:
    c, style = sample.concept, sample.style
    return {
        "key": sample.key,
        "concept": c.base,
        "hexcode": c.hexcode,
        "emoji": c.emoji,
        "label": c.label_en,
        "label_zh": c.label_zh,
        "skin_tone": c.skin_tone,
        "style": style.name,
        "source": style.package.spec,
        "licence": style.licence,
        "captions": captions(c, style),
        "caption": primary_caption(c, style),
        "split": sample.split,
    }


def eval_prompts(samples: list[_Sample], pairs: int | None = EVAL_PAIRS) -> list[dict]:
    """Prompts for held-out (concept, style) pairs, one English and one Chinese each.

    Only base emoji are used (a skin tone's name adds little), not letters or components (no one
    prompts for "regional indicator F"), and pairs are taken in hash order so that the list is fixed
    for a given set of packages.
    """
    held_out = [s for s in samples if s.split == "val" and not s.concept.skin_tone
                and s.concept.group not in (None, _COMPONENT_GROUP)]
    held_out.sort(key=lambda s: _unit_hash(s.concept.base, s.style.name + "/eval"))
    prompts = []
    for s in held_out[:pairs]:
        name_en = english_name(s.concept.label_en, False)
        name_zh = chinese_name(s.concept.label_zh, False)
        common = {"concept": s.concept.base, "style": s.style.name, "key": s.key}
        prompts.append({"prompt": f"an emoji of {name_en} in {s.style.title} style", "lang": "en", **common})
        prompts.append({"prompt": f"{s.style.title_zh}风格的{name_zh}表情符号", "lang": "zh", **common})
    return prompts


def _manifest(styles, samples, unmatched, shards, size, background, *, build_seconds, download_seconds) -> dict:
    per_style: dict[str, Counter] = defaultdict(Counter)
    concepts_per_style: dict[str, set] = defaultdict(set)
    for s in samples:
        per_style[s.style.name][s.split] += 1
        concepts_per_style[s.style.name].add(s.concept.base)
    splits = Counter(s.split for s in samples)
    return {
        "name": "unclip-emoji",
        "format": "img2dataset/webdataset tar shards: {key}.png + {key}.json + {key}.txt",
        "image_size": size,
        "background": background,
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(build_seconds, 1),
        "download_seconds": round(download_seconds, 1),
        "counts": {
            "images": len(samples),
            "train": splits["train"],
            "val": splits["val"],
            "concepts": len({s.concept.base for s in samples}),
            "emoji_with_skin_tones": len({s.concept.hexcode for s in samples}),
            "styles": len(styles),
        },
        "styles": {
            st.name: {
                "title": st.title,
                "package": st.package.spec,
                "integrity": st.package.integrity,
                "licence": st.licence,
                "train": per_style[st.name]["train"],
                "val": per_style[st.name]["val"],
                "concepts": len(concepts_per_style[st.name]),
                "skipped_without_cldr_name": unmatched.get(st.name, 0),
            }
            for st in styles
        },
        "captions": {"package": EMOJIBASE.spec, "integrity": EMOJIBASE.integrity, "languages": ["en", "zh"],
                     "licence": "MIT (package), Unicode-3.0 (CLDR data)"},
        "split": {"val_fraction": VAL_FRACTION, "unit": "(base concept, style)", "hash": "sha256('{concept}|{style}')"},
        "shards": shards,
    }


def attribution_markdown(styles: list[Style], size: int, background: str) -> str:
    """Licences and credits for every style, written so that a model card can include it as is."""
    lines = [
        "# Attribution",
        "",
        f"The emoji corpus combines the following openly licensed works. Each image was rasterised "
        f"(SVG) or resized with antialiasing (bitmaps) to {size}×{size} pixels and flattened onto a "
        f"{background} background; no other changes were made.",
        "",
    ]
    for st in styles:
        lines += [f"## {st.title} (`{st.name}`)", "", f"- Source: npm package `{st.package.spec}`",
                  f"- Licence: {st.licence}", f"- Credit: {st.credit}", ""]
        if st.licence == "CC-BY-SA-4.0":
            lines += ["Images of this style in the corpus are adaptations and remain under CC BY-SA 4.0; "
                      "works that adapt them must carry the same licence.", ""]
    lines += ["## Captions", "", f"- Source: npm package `{EMOJIBASE.spec}`", f"- {EMOJIBASE_CREDIT}", ""]
    return "\n".join(lines)


def _replace_corpus(staging: Path, out_dir: Path) -> None:
    """Swap the freshly built files in, removing only the previous corpus's own files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in [*out_dir.glob("train-*.tar"), *out_dir.glob("val-*.tar")]:
        old.unlink()
    for item in staging.iterdir():
        item.replace(out_dir / item.name)
    staging.rmdir()
