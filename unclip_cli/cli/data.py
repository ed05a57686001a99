"""`unclip data …`: build the emoji corpus and memory-map caches of any shards."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from unclip_cli.cli import app

data_app = typer.Typer(
    help="Build training data: the emoji corpus, and image caches of any img2dataset shards.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")

stderr = Console(stderr=True)


def default_corpus_dir() -> Path:
    """Where `unclip data emoji` writes and the trainer looks: $UNCLIP_DATA or ~/.cache/unclip/emoji."""
    return Path(os.environ.get("UNCLIP_DATA") or "~/.cache/unclip/emoji").expanduser()


def default_npm_cache() -> Path:
    return Path("~/.cache/unclip/npm").expanduser()


@data_app.command("emoji")
def emoji(
    out: Annotated[Optional[Path], typer.Option(help="Corpus folder (default: $UNCLIP_DATA or ~/.cache/unclip/emoji).")] = None,
    cache: Annotated[Optional[Path], typer.Option(help="Where npm tarballs are kept (default: ~/.cache/unclip/npm).")] = None,
    size: Annotated[int, typer.Option(min=16, max=1024, help="Image side in pixels.")] = 128,
    styles: Annotated[Optional[str], typer.Option(help="Comma-separated styles (default: all): "
                                                  "openmoji, twemoji, noto, fluent-flat, fluent-color, fluent-3d.")] = None,
    background: Annotated[str, typer.Option(help="Colour that transparent pixels are flattened onto.")] = "white",
    workers: Annotated[int, typer.Option(min=1, help="Rendering processes.")] = max(1, min(os.cpu_count() or 1, 8)),
) -> None:
    """Fetch pinned emoji packages with npm and build the captioned emoji corpus as tar shards."""
    from unclip_cli.data.emoji import build_emoji_corpus

    out = out or default_corpus_dir()
    names = [s.strip() for s in styles.split(",") if s.strip()] if styles else None
    with _progress() as bar:
        manifest = build_emoji_corpus(out, cache_dir=cache or default_npm_cache(), size=size, styles=names,
                                      background=background, workers=workers, progress=_reporter(bar))
    _print_counts(manifest)
    counts = manifest["counts"]
    typer.echo(json.dumps({"out": str(out), **counts, "build_seconds": manifest["build_seconds"]}))


@data_app.command("cache")
def cache(
    shards: Annotated[Optional[str], typer.Argument(
        metavar="SHARDS", help="Shards: a folder, a glob, a tar, or a brace range like 'train-{000000..000009}.tar' "
             "(default: the emoji corpus).")] = None,
    size: Annotated[int, typer.Option(min=8, max=1024, help="Image side in pixels.")] = 32,
    out: Annotated[Optional[Path], typer.Option(help="Cache folder (default: cache-SIZE beside the shards).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Decoding processes.")] = max(1, min(os.cpu_count() or 1, 8)),
) -> None:
    """Decode every image once into a uint8 memory map at SIZE px, for fast random access in training."""
    from unclip_cli.data.cache import build_image_cache
    from unclip_cli.data.shards import expand_shards

    spec = shards or str(default_corpus_dir())
    paths = expand_shards(spec)
    out = out or paths[0].parent / f"cache-{size}"
    with _progress() as bar:
        image_cache = build_image_cache(paths, size, out, progress=_reporter(bar), workers=workers)
    rate = measure_read_speed(image_cache)
    stderr.print(f"[bold]{len(image_cache)}[/] images at {size}px in {out} "
                 f"(random batches of 256 read at {rate:,.0f} images/s)")
    typer.echo(str(out))


def measure_read_speed(image_cache, batch: int = 256, seconds: float = 0.5) -> float:
    """Images per second when reading random batches, as a trainer does."""
    import numpy as np

    rng = np.random.default_rng(0)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        idx = np.sort(rng.integers(0, len(image_cache), size=batch))
        np.ascontiguousarray(image_cache.images[idx])
        n += batch
    return n / (time.perf_counter() - start)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=stderr, transient=True)


def _reporter(bar: Progress):
    tasks: dict[str, int] = {}

    def report(stage: str, done: int, total: int) -> None:
        # "fetch NAME@VERSION" stages share one bar, labelled with the package being fetched.
        group = stage.split(" ")[0]
        if group not in tasks:
            tasks[group] = bar.add_task(stage, total=total)
        bar.update(tasks[group], completed=done, total=total, description=stage)

    return report


def _print_counts(manifest: dict) -> None:
    table = Table(title=f"Emoji corpus ({manifest['image_size']}px)", title_justify="left")
    for column in ("style", "package", "licence", "concepts", "train", "val"):
        table.add_column(column, justify="right" if column in ("concepts", "train", "val") else "left", overflow="fold")
    for name, s in manifest["styles"].items():
        table.add_row(name, s["package"], s["licence"], str(s["concepts"]), str(s["train"]), str(s["val"]))
    c = manifest["counts"]
    table.add_row("[bold]all", manifest["captions"]["package"] + " (captions)", "", str(c["concepts"]),
                  str(c["train"]), str(c["val"]))
    stderr.print(table)
    stderr.print(f"{c['images']} images, {c['concepts']} concepts ({c['emoji_with_skin_tones']} with skin tones), "
                 f"{c['styles']} styles; built in {manifest['build_seconds']:.0f}s after "
                 f"{manifest['download_seconds']:.0f}s of download.")
