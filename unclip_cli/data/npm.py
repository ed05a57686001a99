"""Fetch pinned npm packages with `npm pack` and read files out of their tarballs.

The emoji corpus is built from art and names published as npm packages. We never talk to a registry
ourselves: `npm pack NAME@VERSION` does, with the user's own npm configuration (mirrors, proxies).
Each tarball is cached and checked against a pinned Subresource Integrity string (`sha512-…`), the
same value npm records in lock files, so a rebuild months later reads byte-identical sources.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from unclip_cli.errors import DataError

# npm puts every file of a package under this folder inside the tarball.
_PACKAGE_ROOT = "package/"


@dataclass(frozen=True)
class NpmPackage:
    """One pinned package. `integrity` is npm's SRI string; None means trust `npm pack`'s report."""

    name: str
    version: str
    integrity: str | None = None

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def tarball_name(self) -> str:
        # The file name npm pack itself writes: scope '@a/b' becomes 'a-b'.
        return f"{self.name.lstrip('@').replace('/', '-')}-{self.version}.tgz"


def sri_sha512(path: Path) -> str:
    """The `sha512-<base64>` integrity string of a file, as npm computes it."""
    digest = hashlib.sha512()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha512-" + base64.b64encode(digest.digest()).decode()


def fetch_package(pkg: NpmPackage, cache_dir: Path, *, npm: str = "npm") -> Path:
    """Return the path of `pkg`'s tarball in `cache_dir`, running `npm pack` only if it is not cached."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / pkg.tarball_name
    if path.exists():
        if pkg.integrity is None or sri_sha512(path) == pkg.integrity:
            return path
        # A truncated or tampered cache entry is not the user's problem: fetch it again.
        path.unlink()
    return _npm_pack(pkg, path, npm)


def _npm_pack(pkg: NpmPackage, dest: Path, npm: str) -> Path:
    exe = shutil.which(npm)
    if exe is None:
        raise DataError(
            f"`{npm}` was not found on PATH; it is needed to download {pkg.spec}.",
            hint="Install Node.js (which ships npm), or copy the tarballs into the npm cache folder by hand.",
        )
    # Pack into a private folder first so a half-written file never sits in the cache.
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".pack-") as tmp:
        proc = subprocess.run(
            [exe, "pack", pkg.spec, "--json", "--pack-destination", tmp],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise DataError(
                f"`npm pack {pkg.spec}` failed: {_last_line(proc.stderr) or 'no message'}",
                hint="Check your network and npm configuration (`npm config get registry`), then retry.",
            )
        reported = _pack_report(proc.stdout)
        packed = Path(tmp) / reported.get("filename", pkg.tarball_name)
        if not packed.exists():
            raise DataError(f"`npm pack {pkg.spec}` wrote no tarball.", hint="Retry; if it persists, update npm.")
        actual = sri_sha512(packed)
        expected = pkg.integrity or reported.get("integrity")
        if expected and actual != expected:
            raise DataError(
                f"Integrity mismatch for {pkg.spec}: expected {expected[:24]}…, got {actual[:24]}….",
                hint="The package served is not the one this corpus was pinned to; check your npm registry or mirror.",
            )
        os.replace(packed, dest)
    return dest


def _pack_report(stdout: str) -> dict:
    # `npm pack --json` prints a list with one object per package; old npms may print nothing useful.
    try:
        report = json.loads(stdout)
    except json.JSONDecodeError:
        return {}
    if isinstance(report, list) and report and isinstance(report[0], dict):
        return report[0]
    return {}


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def iter_members(tarball: Path, want: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """Yield (path inside the package, bytes) for each file whose path `want` accepts, in one pass.

    A .tgz can only be read front to back, so one sequential pass that keeps just the wanted files is
    far cheaper than extracting everything or seeking member by member.
    """
    try:
        with tarfile.open(tarball, mode="r|gz") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name.removeprefix(_PACKAGE_ROOT)
                if want(name):
                    f = tar.extractfile(member)
                    yield name, f.read() if f else b""
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(
            f"Cannot read {Path(tarball).name}: the tarball is corrupt ({e}).",
            hint=f"Delete {tarball} and run the command again to download it afresh.",
        ) from e


def read_member(tarball: Path, name: str) -> bytes:
    """The bytes of one file of the package (path relative to the package root)."""
    for _, data in iter_members(tarball, lambda n: n == name):
        return data
    raise DataError(
        f"{Path(tarball).name} has no file {name!r}.",
        hint="The pinned package version may be wrong; delete the cached tarball and retry.",
    )
