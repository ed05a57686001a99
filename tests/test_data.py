"""The data pipeline on fixtures made here: fake npm packages, a fake `npm`, generated images."""

from __future__ import annotations

import io
import json
import os
import stat
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unclip_cli.data import emoji as emoji_mod
from unclip_cli.data.cache import ImageCache, build_image_cache
from unclip_cli.data.emoji import Style, canonical_hex, captions, load_concepts, split_of
from unclip_cli.data.npm import NpmPackage, fetch_package, iter_members, read_member, sri_sha512
from unclip_cli.data.shards import ShardWriter, expand_shards, iter_samples
from unclip_cli.errors import DataError

# --------------------------------------------------------------------------------------------------
# Fixtures

EMOJIBASE_EN = [
    {"label": "grinning face", "hexcode": "1F600", "emoji": "😀", "group": 0, "tags": ["face", "grin", "happy"]},
    {"label": "waving hand", "hexcode": "1F44B", "emoji": "👋", "group": 1, "tags": ["hand", "hello", "wave"],
     "skins": [{"label": "waving hand: dark skin tone", "hexcode": "1F44B-1F3FF", "emoji": "👋🏿", "tone": 5}]},
    {"label": "red heart", "hexcode": "2764-FE0F", "emoji": "❤️", "group": 0, "tags": ["heart", "love"]},
    {"label": "flag: China", "hexcode": "1F1E8-1F1F3", "emoji": "🇨🇳", "group": 9, "tags": ["CN", "flag"]},
]
EMOJIBASE_ZH = [
    {"label": "嘿嘿", "hexcode": "1F600", "tags": ["笑脸", "高兴"]},
    {"label": "挥手", "hexcode": "1F44B", "tags": ["你好", "再见"],
     "skins": [{"label": "挥手: 较深肤色", "hexcode": "1F44B-1F3FF"}]},
    {"label": "红心", "hexcode": "2764-FE0F", "tags": ["爱"]},
    {"label": "旗: 中国", "hexcode": "1F1E8-1F1F3", "tags": ["旗"]},
]
COLOURS = {"1f600": "#ffcc00", "1f44b": "#ff8800", "1f44b-1f3ff": "#663300", "2764-fe0f": "#dd0000",
           "1f1e8-1f1f3": "#ee1c25", "e000": "#00ff00"}  # e000: art with no CLDR name, to be skipped


def _svg(colour: str) -> bytes:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 36 36">'
            f'<circle cx="18" cy="18" r="14" fill="{colour}"/></svg>').encode()


def _image_bytes(colour: str, fmt: str = "PNG", size: int = 256, mode: str = "RGBA") -> bytes:
    image = Image.new(mode, (size, size), (0, 0, 0, 0) if mode == "RGBA" else "black")
    image.paste(Image.new(mode, (size // 2, size // 2), colour), (size // 4, size // 4))
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _npm_tarball(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def registry(tmp_path):
    """A folder of package tarballs that the fake npm 'downloads' from."""
    reg = tmp_path / "registry"
    reg.mkdir()
    _npm_tarball(reg / "emojibase-data-1.0.0.tgz", {
        "en/data.json": json.dumps(EMOJIBASE_EN).encode(),
        "zh/data.json": json.dumps(EMOJIBASE_ZH, ensure_ascii=False).encode(),
    })
    # Twemoji-like: lower-case names at the root.
    _npm_tarball(reg / "fake-svg-1.0.0.tgz", {f"{h}.svg": _svg(c) for h, c in COLOURS.items()} | {"license": b"x"})
    # Fluent-3D-like: unpadded WebP renders in a folder.
    _npm_tarball(reg / "fake-webp-1.0.0.tgz",
                 {f"assets/{h.lstrip('0')}.webp": _image_bytes(c, "WEBP") for h, c in COLOURS.items()})
    # Iconify-like: SVG bodies in icons.json, code points in chars.json.
    icons = {f"icon-{h}": {"body": f'<rect x="4" y="4" width="8" height="8" fill="{c}"/>'} for h, c in COLOURS.items()}
    _npm_tarball(reg / "fake-iconify-1.0.0.tgz", {
        "icons.json": json.dumps({"prefix": "x", "icons": icons, "width": 16, "height": 16}).encode(),
        "chars.json": json.dumps({h: f"icon-{h}" for h in COLOURS}).encode(),
    })
    return reg


@pytest.fixture
def fake_npm(tmp_path, monkeypatch, registry):
    """An `npm` first on PATH whose `pack` copies from `registry` and logs each call."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "npm.log"
    script = bin_dir / "npm"
    script.write_text(f"""#!{sys.executable}
import base64, hashlib, json, shutil, sys
from pathlib import Path
args = sys.argv[1:]
open({str(log)!r}, "a").write(" ".join(args) + "\\n")
spec, dest = args[1], Path(args[args.index("--pack-destination") + 1])
name, version = spec.rsplit("@", 1)
fname = name.lstrip("@").replace("/", "-") + "-" + version + ".tgz"
src = Path({str(registry)!r}) / fname
if not src.exists():
    sys.stderr.write("npm error 404 Not Found - " + spec + "\\n")
    sys.exit(1)
shutil.copy(src, dest / fname)
sri = "sha512-" + base64.b64encode(hashlib.sha512(src.read_bytes()).digest()).decode()
print(json.dumps([{{"name": name, "version": version, "filename": fname, "integrity": sri}}]))
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def _styles(registry: Path) -> dict[str, Style]:
    pin = lambda name: NpmPackage(name, "1.0.0", sri_sha512(registry / f"{name}-1.0.0.tgz"))
    return {s.name: s for s in [
        Style("vector", "Vector", "矢量", pin("fake-svg"), "CC-BY-4.0", "Vector art by someone.", "files"),
        Style("render", "Render", "渲染", pin("fake-webp"), "MIT", "Renders by someone.", "files",
              folder="assets/", ext=".webp"),
        Style("icons", "Icons", "图标", NpmPackage("fake-iconify", "1.0.0"), "Apache-2.0", "Icons by someone.",
              "iconify"),
    ]}


@pytest.fixture
def corpus(tmp_path, fake_npm, registry, monkeypatch):
    """A corpus built by the real pipeline from the fake packages, at 32 px."""
    pytest.importorskip("resvg_py")
    monkeypatch.setattr(emoji_mod, "EMOJIBASE", NpmPackage("emojibase-data", "1.0.0"))
    monkeypatch.setattr(emoji_mod, "STYLES", _styles(registry))
    # Hold out one pair whatever the hash says, so the val split is never empty on four concepts.
    real_split = emoji_mod.split_of
    monkeypatch.setattr(emoji_mod, "split_of",
                        lambda c, s: "val" if (c, s) == ("1F44B", "vector") else real_split(c, s))
    out = tmp_path / "corpus"
    manifest = emoji_mod.build_emoji_corpus(out, cache_dir=tmp_path / "npm-cache", size=32, workers=1, per_shard=4)
    return out, manifest


# --------------------------------------------------------------------------------------------------
# npm


def test_canonical_hex_matches_across_packages():
    assert canonical_hex("0023-fe0f-20e3") == canonical_hex("23-20E3") == "23-20E3"
    assert canonical_hex("2764-FE0F") == canonical_hex("2764") == "2764"


def test_fetch_package_packs_once_then_reuses_the_cache(tmp_path, fake_npm, registry):
    pkg = NpmPackage("fake-svg", "1.0.0", sri_sha512(registry / "fake-svg-1.0.0.tgz"))
    first = fetch_package(pkg, tmp_path / "cache")
    second = fetch_package(pkg, tmp_path / "cache")
    assert first == second == tmp_path / "cache" / "fake-svg-1.0.0.tgz"
    assert fake_npm.read_text().count("pack fake-svg@1.0.0") == 1
    assert read_member(first, "1f600.svg") == _svg(COLOURS["1f600"])
    # A damaged cache entry is fetched again rather than trusted.
    first.write_bytes(b"garbage")
    fetch_package(pkg, tmp_path / "cache")
    assert fake_npm.read_text().count("pack fake-svg@1.0.0") == 2


def test_fetch_package_rejects_an_integrity_mismatch(tmp_path, fake_npm):
    pkg = NpmPackage("fake-svg", "1.0.0", "sha512-" + "A" * 86 + "==")
    with pytest.raises(DataError, match="Integrity mismatch"):
        fetch_package(pkg, tmp_path / "cache")
    assert not (tmp_path / "cache" / pkg.tarball_name).exists()


def test_missing_npm_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no npm anywhere
    with pytest.raises(DataError, match="npm.*not found") as e:
        fetch_package(NpmPackage("openmoji", "17.0.0"), tmp_path / "cache")
    assert "Node.js" in e.value.hint


def test_a_package_npm_cannot_get_is_a_clear_error(tmp_path, fake_npm):
    with pytest.raises(DataError, match="npm pack no-such-package@9.9.9.*404"):
        fetch_package(NpmPackage("no-such-package", "9.9.9"), tmp_path / "cache")


def test_corrupt_tarball_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad-1.0.0.tgz"
    good = _npm_tarball(tmp_path / "good.tgz", {f"f{i}.svg": os.urandom(5000) for i in range(4)}).read_bytes()
    bad.write_bytes(good[: len(good) // 2])  # truncated mid-stream
    with pytest.raises(DataError, match="corrupt") as e:
        list(iter_members(bad, lambda n: True))
    assert str(bad) in e.value.hint


# --------------------------------------------------------------------------------------------------
# The emoji corpus


def test_corpus_shards_have_the_img2dataset_layout(corpus):
    out, manifest = corpus
    shards = sorted(p.name for p in out.glob("*.tar"))
    assert shards == ["train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar"]
    assert not list(out.glob("*.tmp")) and not (out / ".building").exists()
    with tarfile.open(out / "train-000000.tar") as tar:
        names = tar.getnames()
    assert len(names) == 12  # 4 samples per shard, 3 files each, grouped by key
    for i in range(0, 12, 3):
        key = names[i].rsplit(".", 1)[0]
        assert names[i: i + 3] == [f"{key}.png", f"{key}.txt", f"{key}.json"]

    # 5 named emoji in each of 3 styles; the unnamed E000 art is skipped.
    assert manifest["counts"]["images"] == 15
    assert manifest["counts"]["concepts"] == 4 and manifest["counts"]["emoji_with_skin_tones"] == 5
    assert manifest["counts"]["train"] + manifest["counts"]["val"] == 15
    assert {s: v["skipped_without_cldr_name"] for s, v in manifest["styles"].items()} == {
        "vector": 1, "render": 1, "icons": 1}
    saved = json.loads((out / "manifest.json").read_text())
    assert saved["styles"]["render"]["package"] == "fake-webp@1.0.0"


def test_corpus_samples_carry_captions_in_both_languages(corpus):
    out, _ = corpus
    samples = {s["key"]: s for s in iter_samples(expand_shards(out))}
    wave = samples["vector_1f44b-1f3ff"]
    assert wave["image"].size == (32, 32) and wave["image"].mode == "RGB"
    assert wave["image"].getpixel((0, 0)) == (255, 255, 255)  # flattened on white
    assert wave["image"].getpixel((16, 16)) == (0x66, 0x33, 0x00)  # the art itself, rendered at 32 px
    meta = wave["meta"]
    assert meta["concept"] == "1F44B" and meta["hexcode"] == "1F44B-1F3FF" and meta["skin_tone"]
    assert meta["style"] == "vector" and meta["source"] == "fake-svg@1.0.0" and meta["licence"] == "CC-BY-4.0"
    assert meta["split"] == "val"
    assert wave["text"] == "an emoji of waving hand with dark skin tone in Vector style"
    assert "waving hand with dark skin tone" in meta["captions"]["en"]
    assert "waving hand with dark skin tone, hello, wave" in meta["captions"]["en"]  # keywords
    assert "挥手（较深肤色）的表情符号" in meta["captions"]["zh"]
    assert "矢量风格的挥手（较深肤色）表情符号" in meta["captions"]["zh"]
    flag = samples["icons_1f1e8-1f1f3"]["meta"]["captions"]
    assert flag["en"][0] == "flag of China" and flag["zh"][0] == "中国旗帜"
    # Packages that drop U+FE0F or zero padding still match emojibase's hexcode.
    assert "render_2764-fe0f" in samples and "icons_2764-fe0f" in samples


def test_corpus_attribution_and_eval_prompts(corpus):
    out, _ = corpus
    attribution = (out / "ATTRIBUTION.md").read_text()
    for text in ("fake-svg@1.0.0", "CC-BY-4.0", "Vector art by someone.", "Apache-2.0", "emojibase-data@1.0.0"):
        assert text in attribution
    prompts = json.loads((out / "eval_prompts.json").read_text())
    assert {"prompt": "an emoji of waving hand in Vector style", "lang": "en", "concept": "1F44B",
            "style": "vector", "key": "vector_1f44b"} in prompts
    assert any(p["lang"] == "zh" and p["prompt"] == "矢量风格的挥手表情符号" for p in prompts)


def test_split_is_fixed_and_holds_out_about_five_percent():
    # Golden values: a change to the hash would silently reshuffle everyone's validation set.
    assert split_of("1F9E8", "fluent-color") == "val"
    assert split_of("1F1EB", "openmoji") == "val"
    assert split_of("1F44B", "openmoji") == "train"
    assert split_of("1F600", "twemoji") == "train"
    pairs = [(f"{c:X}", s) for c in range(0x1F300, 0x1F300 + 2000) for s in ("a", "b")]
    held_out = sum(split_of(c, s) == "val" for c, s in pairs) / len(pairs)
    assert 0.04 < held_out < 0.06


def test_captions_name_skin_tones_and_styles(tmp_path):
    tarball = _npm_tarball(tmp_path / "eb.tgz", {"en/data.json": json.dumps(EMOJIBASE_EN).encode(),
                                                  "zh/data.json": json.dumps(EMOJIBASE_ZH).encode()})
    concepts = load_concepts(tarball)
    assert set(concepts) == {"1F600", "1F44B", "1F44B-1F3FF", "2764", "1F1E8-1F1F3"}
    style = Style("s", "Sketch", "素描", NpmPackage("x", "1"), "MIT", "", "files")
    caps = captions(concepts["1F600"], style)
    assert caps["en"][:3] == ["grinning face", "an emoji of grinning face", "grinning face emoji"]
    assert "an emoji of grinning face in Sketch style" in caps["en"]
    assert caps["zh"][:2] == ["嘿嘿", "嘿嘿的表情符号"] and "素描风格的嘿嘿表情符号" in caps["zh"]


# --------------------------------------------------------------------------------------------------
# Reading shards


def _write_shards(out: Path, n_shards: int, per_shard: int, prefix: str = "train") -> list[Path]:
    writer = ShardWriter(out, prefix, per_shard)
    for i in range(n_shards * per_shard):
        colour = (i * 7 % 256, i * 13 % 256, i * 29 % 256)
        writer.write(f"{i:06d}", _image_bytes(colour, "PNG", 16, "RGB"), "png", text=f"sample {i}",
                     meta={"caption": f"sample {i}", "captions": {"en": [f"sample {i}"], "zh": [f"样本 {i}"]},
                           "split": "val" if i % 5 == 0 else "train"})
    return writer.close()


def test_expand_shards_accepts_folders_globs_ranges_and_files(tmp_path):
    paths = _write_shards(tmp_path, 3, 2)
    assert expand_shards(tmp_path) == paths
    assert expand_shards(str(tmp_path / "train-*.tar")) == paths
    assert expand_shards(str(tmp_path / "train-{000001..000002}.tar")) == paths[1:]
    assert expand_shards(paths[0]) == paths[:1]
    with pytest.raises(DataError, match="not found"):
        expand_shards(tmp_path / "nope.tar")


def test_reader_shuffles_with_a_buffer_and_a_seed(tmp_path):
    paths = _write_shards(tmp_path, 4, 10)
    plain = [s["key"] for s in iter_samples(paths)]
    assert plain == [f"{i:06d}" for i in range(40)]
    shuffled = [s["key"] for s in iter_samples(paths, shuffle_buffer=8, seed=1)]
    assert shuffled != plain and sorted(shuffled) == plain
    assert shuffled == [s["key"] for s in iter_samples(paths, shuffle_buffer=8, seed=1)]
    assert shuffled != [s["key"] for s in iter_samples(paths, shuffle_buffer=8, seed=2)]
    first = next(iter_samples(paths))
    assert first["image"].mode == "RGB" and first["text"] == "sample 0" and first["meta"]["captions"]["zh"] == ["样本 0"]


@pytest.mark.parametrize("n_shards", [6, 1])  # shard-level split, and sample-level when shards are too few
def test_reader_gives_each_sample_to_exactly_one_rank_and_worker(tmp_path, n_shards):
    from torch.utils.data import DataLoader

    from unclip_cli.data.shards import ShardDataset

    paths = _write_shards(tmp_path, n_shards, 12 // n_shards)
    seen = Counter()
    for rank in range(2):
        dataset = ShardDataset(paths, transform=lambda s: s["key"], shuffle_buffer=4, rank=rank, world_size=2,
                               loop=False)
        loader = DataLoader(dataset, batch_size=None, num_workers=2)
        seen.update(loader)
    assert seen == Counter({f"{i:06d}": 1 for i in range(12)})


def test_reader_loops_forever_when_asked(tmp_path):
    paths = _write_shards(tmp_path, 1, 3)
    stream = iter_samples(paths, loop=True, shuffle_buffer=2)
    keys = [next(stream)["key"] for _ in range(9)]
    assert Counter(keys) == Counter({"000000": 3, "000001": 3, "000002": 3})


def test_unreadable_image_is_a_clear_error(tmp_path):
    writer = ShardWriter(tmp_path, "train")
    writer.write("000000", b"\x89PNG not really", "png", text="broken")
    [path] = writer.close()
    with pytest.raises(DataError, match=r"Cannot decode 000000\.png in .*train-000000\.tar"):
        list(iter_samples([path]))


def test_reader_reads_jpg_and_webp_with_only_a_txt(tmp_path):
    path = tmp_path / "user.tar"
    with tarfile.open(path, "w") as tar:
        for key, fmt in (("a", "JPEG"), ("b", "WEBP")):
            for name, data in ((f"{key}.{fmt.lower()[:4].replace('jpeg', 'jpg')}", _image_bytes("red", fmt, 8, "RGB")),
                               (f"{key}.txt", f"a photo {key}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    samples = list(iter_samples([path]))
    assert [(s["key"], s["text"], s["meta"]) for s in samples] == [("a", "a photo a", {}), ("b", "a photo b", {})]


# --------------------------------------------------------------------------------------------------
# The memory-map cache


def test_image_cache_matches_the_shards_and_is_reused(tmp_path):
    paths = _write_shards(tmp_path / "shards", 2, 5)
    out = tmp_path / "cache"
    cache = build_image_cache(paths, 8, out, workers=1)
    assert cache.images.shape == (10, 8, 8, 3) and cache.images.dtype == np.uint8
    assert (out / "images-8.u8").exists() and (out / "records.json").exists()
    assert not list(out.glob("*.tmp"))
    expected = np.asarray(next(iter_samples(paths[1:]))["image"].resize((8, 8), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(cache.images[5], expected)
    assert cache.records[5]["key"] == "000005"
    assert cache.captions(5) == ["sample 5", "样本 5"] and cache.captions(5, "zh") == ["样本 5"]
    assert cache.split_indices("val").tolist() == [0, 5]

    stamp = (out / "records.json").stat().st_mtime_ns
    again = build_image_cache(paths, 8, out, workers=1)
    assert (out / "records.json").stat().st_mtime_ns == stamp and len(again) == 10
    reopened = ImageCache.open(out, 8)
    np.testing.assert_array_equal(reopened.images, cache.images)
    with pytest.raises(DataError, match="No 16px image cache"):
        ImageCache.open(out, 16)


def test_cli_builds_a_cache(tmp_path):
    from typer.testing import CliRunner

    from unclip_cli.cli import _register, app

    _register()
    _write_shards(tmp_path, 2, 3)
    result = CliRunner().invoke(app, ["data", "cache", str(tmp_path), "--size", "8", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert Path(result.stdout.strip().splitlines()[-1]) == tmp_path / "cache-8"
    assert len(ImageCache.open(tmp_path / "cache-8", 8)) == 6


def test_eval_prompts_cover_every_eligible_held_out_pair_and_keep_their_order():
    """All held-out base emoji (no skin tones, no letters or components) give one English and one Chinese
    prompt; a shorter list is a prefix of the longer one, so earlier measurements stay comparable."""
    from unclip_cli.data.emoji import Concept, _Sample, eval_prompts

    style = Style("s", "Sketch", "素描", NpmPackage("x", "1"), "MIT", "", "files")
    samples = []
    for code in range(0x1F300, 0x1F300 + 400):
        hexcode = f"{code:X}"
        concept = Concept(hexcode, hexcode, chr(code), f"thing {code}", f"东西{code}", (), (), False, 1)
        samples.append(_Sample(style, concept, "svg", b""))
    samples.append(_Sample(style, Concept("1F44B-1F3FB", "1F44B", "", "waving hand: light skin tone", "挥手：较浅肤色", (), (), True, 1), "svg", b""))
    held_out = [s for s in samples if s.split == "val" and not s.concept.skin_tone]
    prompts = eval_prompts(samples)
    assert len(prompts) == 2 * len(held_out) and len(held_out) >= 10
    assert [p["lang"] for p in prompts[:4]] == ["en", "zh", "en", "zh"]
    assert eval_prompts(samples, pairs=5) == prompts[:10]
    assert {p["key"] for p in prompts} == {s.key for s in held_out}
