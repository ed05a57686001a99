"""Presets: JSON files describing a whole stack (each stage's model and diffusion config, and training
hyperparameters). `tiny` is for tests, `emoji` is the shipped model, `base` a GPU-sized starting point."""

from __future__ import annotations

import json
from pathlib import Path

from unclip_cli.errors import UnclipError

HERE = Path(__file__).parent


def list_presets() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.json"))


def load_preset(name_or_path: str) -> dict:
    path = Path(name_or_path)
    if not path.suffix == ".json":
        path = HERE / f"{name_or_path}.json"
    if not path.is_file():
        raise UnclipError(f"unknown preset {name_or_path!r}", hint=f"choose from {', '.join(list_presets())} or pass a .json file")
    return json.loads(path.read_text())
