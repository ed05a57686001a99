"""What `make demo` installs is what unclip runs on: pyproject's dependencies (plus the `serve` extra), without
the test suite's extras (diffusers, transformers, playwright, scikit-image) or open_clip_torch, which drags in
torchvision and timm. A module imported anywhere in unclip_cli must come from a declared dependency, and one from
an extra only in the files that need that extra and say how to install it; every data file must be packaged."""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata as metadata
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "unclip_cli"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))

# extra -> the files (relative to unclip_cli) that may import it
EXTRA_FILES = {
    "serve": {"serve/app.py", "serve/server.py"},
    "train": {"train/stages.py"},  # open_clip's ClipLoss, with an install hint when missing
    "data": {"data/emoji.py"},  # resvg_py renders the SVG sources
    # checking a conversion against diffusers / transformers (with an install hint), and the tests' random pipelines
    "test": {"convert/verify.py", "convert/random_karlo.py", "convert/random_stable_unclip.py"},
}


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9._-]+)", requirement).group(1)).lower()


def _closure(requirements: list[str]) -> set[str]:
    """The distributions these requirements install, with what they require in turn (extras' requirements aside)."""
    seen, todo = set(), [_name(r) for r in requirements]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += [_name(r) for r in metadata.requires(name) or [] if "extra ==" not in r]
        except metadata.PackageNotFoundError:
            pass
    return seen


def _imports(path: Path) -> set[str]:
    """Top-level names of every absolute import in the file, those inside functions included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"unclip_cli", "__future__"}


def test_unclip_imports_only_what_it_declares():
    project = PYPROJECT["project"]
    core = _closure(project["dependencies"])
    extras = {extra: _closure(reqs) - core for extra, reqs in project["optional-dependencies"].items()}
    dists = {module: {_name(d) for d in names} for module, names in metadata.packages_distributions().items()}
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for module in sorted(_imports(path)):
            owners = dists.get(module)
            assert owners, f"{rel}: imports {module}, which no installed distribution provides"
            if owners & core:
                continue
            allowed = [e for e, files in EXTRA_FILES.items() if rel in files and owners & extras.get(e, set())]
            if not allowed:
                wrong.append(f"{rel}: {module} ({', '.join(sorted(owners))})")
    assert not wrong, "imports from outside pyproject's dependencies: " + "; ".join(wrong)


def test_make_demo_installs_no_test_extras_nor_torchvision():
    """The failure this guards against: the demo's 6 GB environment carrying the test suite's packages."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    runtime = makefile.split("$(VENV)/.runtime:")[1].split("\n\n")[0]
    assert "-e '.[serve]'" in runtime and "torchvision" not in runtime
    assert re.search(r"^demo: \$\(VENV\)/\.runtime$", makefile, re.M)
    core = _closure(PYPROJECT["project"]["dependencies"])
    assert not core & {"torchvision", "timm", "open-clip-torch", "diffusers", "transformers", "playwright", "scikit-image"}


def test_every_data_file_is_packaged():
    """A file the code reads beside itself (presets, the page, CLIP's BPE merges) must be in a wheel too."""
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["unclip_cli"]
    data = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert "models/bpe_merges.txt.gz" in data
    assert [f for f in data if not any(fnmatch.fnmatch(f, pat) for pat in patterns)] == []


def test_training_clip_without_open_clip_says_how_to_install(monkeypatch):
    from unclip_cli.errors import UnclipError
    from unclip_cli.train.stages import clip_loss

    assert type(clip_loss()).__name__ == "ClipLoss"
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if open_clip_torch were not installed
    monkeypatch.setitem(sys.modules, "open_clip.loss", None)
    with pytest.raises(UnclipError, match="needs open_clip_torch") as e:
        clip_loss()
    assert "unclip-cli[train]" in e.value.hint
