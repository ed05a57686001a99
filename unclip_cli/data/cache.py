"""Decode every image of a set of shards once, at one size, into a uint8 memory map.

Training small models at 32 or 64 px would otherwise spend its time decoding PNGs. The cache is a
raw `images-{size}.u8` file of shape [N, size, size, 3] next to `records.json` (one entry per
image: key, captions, concept, style, split). Reading a random batch is then one fancy index into a
memory map, served from the page cache after the first epoch.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from unclip_cli.data.shards import DEFAULT_BACKGROUND, iter_samples
from unclip_cli.errors import DataError

CACHE_FORMAT = 1
ProgressFn = Callable[[str, int, int], None]


@dataclass
class ImageCache:
    """Images as `images[i]` (uint8 [size, size, 3]) and their `records[i]`."""

    images: np.memmap  # [N, size, size, 3] uint8
    records: list[dict]
    size: int

    def __len__(self) -> int:
        return len(self.records)

    def captions(self, i: int, lang: str | None = None) -> list[str]:
        """All captions of sample `i` (English then Chinese), or only those of `lang`; at least its text."""
        by_lang = self.records[i].get("captions") or {}
        langs = [lang] if lang else sorted(by_lang, key=lambda l: (l != "en", l))
        found = [c for l in langs for c in by_lang.get(l, [])]
        return found or [self.records[i]["text"]]

    def split_indices(self, split: str) -> np.ndarray:
        """Indices of the samples in `split` ("train" or "val"); samples without a split count as train."""
        return np.array([i for i, r in enumerate(self.records) if (r.get("split") or "train") == split], dtype=np.int64)

    @classmethod
    def open(cls, out_dir: str | os.PathLike, size: int) -> ImageCache:
        out_dir = Path(out_dir).expanduser()
        header = _read_header(out_dir)
        if header is None or header["size"] != size:
            raise DataError(f"No {size}px image cache in {out_dir}.",
                            hint=f"Build it with `unclip data cache SHARDS --size {size} --out {out_dir}`.")
        path = out_dir / f"images-{size}.u8"
        n = len(header["records"])
        expected = n * size * size * 3
        if not path.exists() or path.stat().st_size != expected:
            raise DataError(f"{path} is missing or truncated.", hint="Delete the cache folder and build it again.")
        images = np.memmap(path, dtype=np.uint8, mode="r", shape=(n, size, size, 3))
        return cls(images, header["records"], size)


def build_image_cache(
    shard_paths: Sequence[str | os.PathLike],
    size: int,
    out_dir: str | os.PathLike,
    *,
    progress: ProgressFn | None = None,
    background: str = DEFAULT_BACKGROUND,
    workers: int = 2,
) -> ImageCache:
    """Build (or reuse, if built from the same shard files) the `size`px cache of `shard_paths` in `out_dir`.

    Images are centre-cropped to a square and resized with an antialiasing (Lanczos) filter. Both files
    are written under temporary names and renamed at the end, so a cache is either whole or absent.
    """
    shards = [Path(p).expanduser().resolve() for p in shard_paths]
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(shards)
    header = _read_header(out_dir)
    if header is not None and header["size"] == size and header["shards"] == fingerprint:
        try:
            return ImageCache.open(out_dir, size)
        except DataError:
            pass  # the images file went missing: rebuild below
    progress = progress or (lambda stage, done, total: None)

    images_tmp = out_dir / f"images-{size}.u8.{os.getpid()}.tmp"  # per process: two stages may build it at once
    records: list[dict] = []
    jobs = [(str(p), size, background) for p in shards]
    with open(images_tmp, "wb") as f, multiprocessing.Pool(max(1, min(workers, len(shards)))) as pool:
        progress("cache", 0, len(shards))
        for i, (shard_records, pixels) in enumerate(pool.imap(_cache_shard, jobs)):
            if isinstance(shard_records, str):  # an error message from the worker
                raise DataError(shard_records, hint=pixels)
            records.extend(shard_records)
            f.write(pixels)
            progress("cache", i + 1, len(shards))

    header = {"format": CACHE_FORMAT, "size": size, "shards": fingerprint, "records": records}
    records_tmp = out_dir / f"records.json.{os.getpid()}.tmp"
    records_tmp.write_text(json.dumps(header, ensure_ascii=False))
    os.replace(images_tmp, out_dir / f"images-{size}.u8")
    os.replace(records_tmp, out_dir / "records.json")
    return ImageCache.open(out_dir, size)


def _cache_shard(job: tuple[str, int, str]) -> tuple[list[dict], bytes] | tuple[str, str]:
    """Decode one shard in a worker: its records and its images as raw bytes, in shard order."""
    path, size, background = job
    records, arrays = [], []
    try:
        for sample in iter_samples([path], background=background):
            arrays.append(np.asarray(square_resize(sample["image"], size), dtype=np.uint8))
            records.append(_record(sample))
    except DataError as e:  # exceptions with extra fields do not survive pickling; send the text
        return str(e), e.hint or ""
    pixels = np.stack(arrays).tobytes() if arrays else b""
    return records, pixels


def square_resize(image: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square, then resize to `size`×`size` with antialiasing."""
    w, h = image.size
    if w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return image


def _record(sample: dict) -> dict:
    meta = sample["meta"]
    captions = meta.get("captions") if isinstance(meta.get("captions"), dict) else {}
    return {
        "key": sample["key"],
        "text": sample["text"],
        "captions": captions,
        "concept": meta.get("concept"),
        "style": meta.get("style"),
        "split": meta.get("split"),
    }


def _fingerprint(shards: list[Path]) -> list[dict]:
    # Path, size and modification time: a rebuilt or edited shard invalidates the cache.
    out = []
    for p in shards:
        try:
            st = p.stat()
        except FileNotFoundError as e:
            raise DataError(f"Shard not found: {p}", hint="Check the shard paths.") from e
        out.append({"path": str(p), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _read_header(out_dir: Path) -> dict | None:
    path = out_dir / "records.json"
    if not path.exists():
        return None
    try:
        header = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a damaged header is rebuilt, never trusted
    if not isinstance(header, dict) or header.get("format") != CACHE_FORMAT:
        return None
    return header
