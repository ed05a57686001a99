"""Image–text shards in the img2dataset / webdataset layout: a writer and a streaming reader.

A shard is a plain tar file in which each sample is a run of consecutive members sharing a key:
`{key}.png` (or .jpg/.jpeg/.webp) plus `{key}.txt` (the caption) and/or `{key}.json` (metadata).
This is what img2dataset writes, so anything a user downloads with it trains the same way as the
emoji corpus.
"""

from __future__ import annotations

import glob
import io
import json
import os
import random
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torch.utils.data import IterableDataset, get_worker_info

from unclip_cli.errors import DataError

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
# Transparent pixels are composited onto this, never dropped to whatever colour they happen to store.
DEFAULT_BACKGROUND = "white"


# --------------------------------------------------------------------------------------------------
# Writing


class ShardWriter:
    """Write samples into `{prefix}-000000.tar`, `{prefix}-000001.tar`, … with `per_shard` samples each.

    Each shard is written under a temporary name and renamed when complete, so a reader never sees a
    half-written tar.
    """

    def __init__(self, out_dir: Path, prefix: str, per_shard: int = 1000):
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.per_shard = per_shard
        self.paths: list[Path] = []
        self._tar: tarfile.TarFile | None = None
        self._count = 0
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def write(self, key: str, image: bytes, ext: str, *, text: str | None = None, meta: dict | None = None) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"shard key {key!r} may not contain '.' or '/'")
        if self._tar is None or self._count == self.per_shard:
            self._roll()
        self._add(f"{key}.{ext}", image)
        if text is not None:
            self._add(f"{key}.txt", text.encode("utf-8"))
        if meta is not None:
            self._add(f"{key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"))
        self._count += 1

    def close(self) -> list[Path]:
        self._finish()
        return self.paths

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _roll(self) -> None:
        self._finish()
        final = self.out_dir / f"{self.prefix}-{len(self.paths):06d}.tar"
        # Fixed metadata (owner, mtime) keeps shards byte-identical across rebuilds.
        self._tar = tarfile.open(final.with_suffix(".tar.tmp"), "w", format=tarfile.PAX_FORMAT)
        self.paths.append(final)
        self._count = 0

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = 0
        self._tar.addfile(info, io.BytesIO(data))

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        final = self.paths[-1]
        os.replace(final.with_suffix(".tar.tmp"), final)
        self._tar = None


# --------------------------------------------------------------------------------------------------
# Finding shards

_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Shard paths from a directory, a glob, one tar, a brace range (`train-{000000..000009}.tar`) or a list.

    A directory means every `*.tar` in it. Paths come back sorted within each spec, so the order (and
    hence shuffling with a seed) does not depend on the file system.
    """
    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in expand_shards(s)]
    text = os.path.expanduser(os.fspath(spec))
    paths = [Path(p) for p in _expand_braces(text)]
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(p.glob("*.tar")))
        elif glob.has_magic(str(p)):
            out.extend(sorted(Path(m) for m in glob.glob(str(p))))
        elif p.exists():
            out.append(p)
        else:
            raise DataError(f"Shard not found: {p}", hint="Give a folder of .tar shards, a glob, or a brace range.")
    if not out:
        raise DataError(f"No .tar shards match {text!r}.", hint="Build a corpus first, e.g. `unclip data emoji`.")
    return out


def _expand_braces(text: str) -> list[str]:
    match = _BRACE.search(text)
    if match is None:
        return [text]
    lo, hi = match.group(1), match.group(2)
    width = len(lo)  # zero padding follows the lower bound, as in webdataset
    head, tail = text[: match.start()], text[match.end() :]
    return [s for i in range(int(lo), int(hi) + 1) for s in _expand_braces(f"{head}{i:0{width}d}{tail}")]


# --------------------------------------------------------------------------------------------------
# Reading


def iter_samples(
    paths: Sequence[str | os.PathLike],
    *,
    shuffle_buffer: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    loop: bool = False,
    background: str = DEFAULT_BACKGROUND,
) -> Iterator[dict]:
    """Stream samples `{"key", "image" (PIL RGB), "text", "meta"}` from img2dataset-format shards.

    The work is split over `world_size` DDP ranks and, inside a torch DataLoader, over its workers:
    consumer `c` of `n` reads shards `c, c+n, …`, or, when there are fewer shards than consumers,
    every shard but only samples `c, c+n, …`; either way each sample goes to exactly one consumer per
    pass. With `shuffle_buffer > 0`, shard order is shuffled per pass and samples are drawn at random
    from a buffer of that many. `loop=True` repeats forever, reshuffling each pass.
    """
    paths = [Path(p) for p in paths]
    consumer, consumers = _consumer(rank, world_size)
    epoch = 0
    while True:
        rng = random.Random(f"{seed}-{epoch}-{consumer}")
        stream = _assigned_samples(paths, consumer, consumers, rng if shuffle_buffer > 0 else None, background)
        if shuffle_buffer > 0:
            stream = _buffer_shuffle(stream, shuffle_buffer, rng)
        yield from stream
        epoch += 1
        if not loop:
            return


def _consumer(rank: int, world_size: int) -> tuple[int, int]:
    """This reader's index among all readers: DDP ranks times DataLoader workers."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    info = get_worker_info()  # None outside a DataLoader worker
    workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
    return rank * workers + worker, world_size * workers


def _assigned_samples(paths, consumer, consumers, rng, background) -> Iterator[dict]:
    order = list(paths)
    if len(order) >= consumers:
        mine = order[consumer::consumers]
        if rng is not None:
            rng.shuffle(mine)
        for path in mine:
            yield from _read_shard(path, background)
        return
    # Too few shards to give each reader its own: everyone reads all, keeping every n-th sample.
    # Only the kept samples are decoded, so the cost is reading the tar, not the images.
    index = 0
    for path in order:
        for key, members in _group_members(path):
            if index % consumers == consumer:
                yield _decode_sample(path, key, members, background)
            index += 1


def _buffer_shuffle(stream: Iterable[dict], size: int, rng: random.Random) -> Iterator[dict]:
    buffer: list[dict] = []
    for sample in stream:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = sample
    rng.shuffle(buffer)
    yield from buffer


def _read_shard(path: Path, background: str) -> Iterator[dict]:
    for key, members in _group_members(path):
        yield _decode_sample(path, key, members, background)


def _group_members(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {extension: bytes}) for each run of consecutive members sharing a key."""
    key, members = None, {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                if base.startswith("."):
                    continue
                # webdataset: the key is the path up to the first dot of the file name.
                stem, _, ext = base.partition(".")
                this_key = os.path.join(os.path.dirname(member.name), stem)
                if this_key != key and members:
                    yield key, members
                    members = {}
                key = this_key
                members[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"Cannot read shard {path}: {e}", hint="The file is not a complete tar; rebuild or re-download it.") from e
    if members:
        yield key, members


def _decode_sample(path: Path, key: str, members: dict[str, bytes], background: str) -> dict:
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    if ext is None:
        raise DataError(f"Sample {key!r} in {path} has no image ({', '.join(IMAGE_EXTS)}).",
                        hint="Each sample needs {key}.png/.jpg/.webp next to its .txt/.json.")
    image = decode_image(members[ext], background=background, where=f"{key}.{ext} in {path}")
    meta = _json(members.get("json"), where=f"{key}.json in {path}")
    return {"key": key, "image": image, "text": _text(members, meta), "meta": meta}


def decode_image(data: bytes, *, background: str = DEFAULT_BACKGROUND, where: str = "image") -> Image.Image:
    """Decode image bytes to RGB, compositing any transparency onto `background`."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"Cannot decode {where}: {e}", hint="The image file is corrupt; remove that sample or rebuild the shard.") from e
    return flatten(image, background)


def flatten(image: Image.Image, background: str = DEFAULT_BACKGROUND) -> Image.Image:
    """RGB copy of `image` with any transparency composited onto `background`."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background)
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def _json(data: bytes | None, *, where: str) -> dict:
    if data is None:
        return {}
    try:
        meta = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"Cannot parse {where}: {e}", hint="The metadata file is corrupt; rebuild the shard.") from e
    return meta if isinstance(meta, dict) else {"value": meta}


def _text(members: dict[str, bytes], meta: dict) -> str:
    # img2dataset writes the caption to .txt and also to json["caption"]; prefer the .txt.
    if "txt" in members:
        return members["txt"].decode("utf-8", errors="replace").strip()
    for field in ("caption", "text"):
        if isinstance(meta.get(field), str):
            return meta[field]
    return ""


class ShardDataset(IterableDataset):
    """A torch `IterableDataset` over shards; hand it to a DataLoader with any number of workers.

    Each worker reads its own part of the shards (see `iter_samples`). `transform` maps each sample
    dict to whatever the training step wants (e.g. a tensor and a caption) inside the worker.
    """

    def __init__(self, spec, *, transform=None, shuffle_buffer: int = 1000, seed: int = 0, rank: int = 0,
                 world_size: int = 1, loop: bool = True, background: str = DEFAULT_BACKGROUND):
        self.paths = expand_shards(spec)
        self.transform = transform
        self.kwargs = dict(shuffle_buffer=shuffle_buffer, seed=seed, rank=rank, world_size=world_size, loop=loop,
                           background=background)

    def __iter__(self):
        for sample in iter_samples(self.paths, **self.kwargs):
            yield self.transform(sample) if self.transform else sample
