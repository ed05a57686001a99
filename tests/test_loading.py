"""Hostile inputs at the edges: damaged model sets and metadata, odd input images, and output folders
that cannot be written. Each must end in one UnclipError naming the file (and the field), never in a
traceback, a stray warning or files left behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from unclip_cli import checkpoint, imageio
from unclip_cli.errors import InputError, WeightsError
from unclip_cli.modelset import load_model_set


@pytest.fixture()
def weights(tiny_weights, tmp_path) -> Path:
    """A private copy of the tiny random model set, to damage."""
    return Path(shutil.copytree(tiny_weights, tmp_path / "set"))


def _meta(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def _edit(path: Path, key: str, value) -> Path:
    """Rewrite one metadata entry of a checkpoint in place (a str as is, anything else as JSON)."""
    meta = _meta(path)
    meta[key] = value if isinstance(value, str) else json.dumps(value)
    save_file(load_file(str(path)), str(path), metadata=meta)
    return path


def _edit_json(path: Path, key: str, **changes) -> Path:
    """Change fields of one JSON metadata entry (config, diffusion, extra); None deletes the field."""
    d = json.loads(_meta(path)[key])
    d.update(changes)
    return _edit(path, key, {k: v for k, v in d.items() if v is not None})


def _fails(fn, *names: str) -> WeightsError:
    """fn() raises a one-line WeightsError whose message holds every one of `names`."""
    with pytest.raises(WeightsError) as ei:
        fn()
    message = str(ei.value)
    assert "\n" not in message
    for name in names:
        assert name in message, f"{name!r} not in: {message}"
    return ei.value


# -- model sets -------------------------------------------------------------------------------------
def test_a_set_without_its_upsampler_is_refused(weights):
    (weights / "upsampler.safetensors").unlink()
    _fails(lambda: load_model_set(weights), str(weights), "upsampler.safetensors")


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"scale": 100}, "scale"),
        ({"scale": 1}, "scale"),
        ({"scale": "2"}, "scale"),
        ({"scale": 2.0}, "scale"),
        ({"scale": True}, "scale"),
        ({"scale": None}, "scale"),  # missing
        ({"low_res": "8"}, "low_res"),
        ({"low_res": 8.5}, "low_res"),
    ],
    ids=["100", "1", "string", "float", "bool", "missing", "low-res-string", "low-res-float"],
)
def test_upsampler_scale_and_low_res_are_checked(weights, changes, field):
    up = _edit_json(weights / "upsampler.safetensors", "extra", **changes)
    _fails(lambda: load_model_set(weights), up.name, field)


def test_final_image_size_is_capped(weights):
    # The decoder's image_size sets no tensor shape, so an edited one loads; the set would then make
    # 1,024 x 8 = 8,192 px images.
    _edit_json(weights / "decoder.safetensors", "config", image_size=1024)
    up = _edit_json(weights / "upsampler.safetensors", "extra", scale=8, low_res=1024)
    _fails(lambda: load_model_set(weights), up.name, "scale", "4096")
    dec = _edit_json(weights / "decoder.safetensors", "config", image_size=5000)
    _fails(lambda: load_model_set(weights), dec.name, "image_size")


@pytest.mark.parametrize(
    "mean",
    [[[1.0]], [[[0.0, 0.0], [0.0]]] * 3, "grey", [[[0.0]]] * 2, [[[0.0, 0.0]]] * 3, [[[5.0]]] * 3, [[["x"]]] * 3, []],
    ids=["2d", "ragged", "string", "two-channels", "not-square", "out-of-range", "text-inside", "empty"],
)
def test_decoder_mean_image_is_checked(weights, mean):
    dec = _edit_json(weights / "decoder.safetensors", "extra", x_start_mean=mean)
    _fails(lambda: load_model_set(weights), dec.name, "x_start_mean")


def test_decoder_mean_image_with_nan(weights):
    dec = weights / "decoder.safetensors"
    _edit(dec, "extra", json.dumps({**json.loads(_meta(dec)["extra"]), "x_start_mean": [[[float("nan")]]] * 3}))
    _fails(lambda: load_model_set(weights), dec.name, "x_start_mean")


def test_a_valid_mean_image_loads(weights):
    _edit_json(weights / "decoder.safetensors", "extra", x_start_mean=[[[0.5, -0.5], [0.0, 1.0]]] * 3)
    assert load_model_set(weights).image_size == 16


@pytest.mark.parametrize("kind, key", [("clip", "uid"), ("prior", "clip_uid")])
def test_ids_must_be_strings(weights, kind, key):
    path = weights / f"{kind}.safetensors"
    _edit_json(path, "extra", **{key: ["not", "an", "id"]})
    _fails(lambda: load_model_set(weights), path.name, key)


def test_model_card_that_is_not_utf8_and_holds_control_characters(weights):
    (weights / "MODEL_CARD.md").write_bytes(b"# Card\r\n\xff\xfe latin-1: caf\xe9\n\x1b[2J\x1b]0;pwned\x07cleared?\tok\n")
    card = load_model_set(weights).card
    assert card == "# Card\n\ufffd\ufffd latin-1: caf\ufffd\n[2J]0;pwnedcleared?\tok\n"


def test_a_weights_path_with_a_name_too_long(tmp_path):
    _fails(lambda: load_model_set(tmp_path / ("w" * 300)), "too long")


# -- checkpoint metadata ----------------------------------------------------------------------------
CONFIG_CASES = [
    # (file, metadata key, changes, what the message must name)
    ("prior", "config", {"layers": "six"}, "layers"),
    ("prior", "config", {"layers": 1.5}, "layers"),
    ("prior", "config", {"layers": True}, "layers"),
    ("prior", "config", {"width": [[32]]}, "width"),
    ("prior", "config", {"width": -32}, "width"),
    ("prior", "config", {"heads": 0}, "heads"),
    ("prior", "config", {"dropout": "none"}, "dropout"),
    ("prior", "config", {"dropout": -0.5}, "dropout"),
    ("decoder", "config", {"channel_mult": [1, "2"]}, "channel_mult"),
    ("decoder", "config", {"channel_mult": 2}, "channel_mult"),
    ("decoder", "config", {"attention_ds": [0]}, "attention_ds"),
    ("decoder", "config", {"image_size": 0}, "image_size"),
    ("clip", "config", {"text_heads": 3}, "does not build"),  # well typed, but 32 wide does not split in 3 heads
    ("decoder", "diffusion", {"timesteps": 0}, "timesteps"),
    ("decoder", "diffusion", {"timesteps": -5}, "timesteps"),
    ("decoder", "diffusion", {"timesteps": 10**9}, "timesteps"),
    ("decoder", "diffusion", {"timesteps": 1000.0}, "timesteps"),
    ("decoder", "diffusion", {"schedule": "bogus"}, "schedule"),
    ("prior", "diffusion", {"parameterization": "sigma"}, "parameterization"),
]


@pytest.mark.parametrize("kind, key, changes, field", CONFIG_CASES, ids=[f"{k}-{json.dumps(c)}" for k, _, c, _ in CONFIG_CASES])
def test_malformed_config_values_name_the_file_and_field(weights, kind, key, changes, field):
    path = _edit_json(weights / f"{kind}.safetensors", key, **changes)
    _fails(lambda: checkpoint.load(path), path.name, field)


@pytest.mark.parametrize("key", ["config", "diffusion", "extra"])
@pytest.mark.parametrize("value", ["[1, 2]", '"text"', "7", "null"])
def test_metadata_entries_must_be_json_objects(weights, key, value):
    path = _edit(weights / "decoder.safetensors", key, value)
    _fails(lambda: checkpoint.load(path), path.name, key)


@pytest.mark.parametrize("version", ["9" * 5000, "²", "1.0", "-1", ""])
def test_format_version_must_be_a_small_number(weights, version):
    path = _edit(weights / "clip.safetensors", "format_version", version)
    _fails(lambda: checkpoint.load(path), path.name, "format_version")


def test_metadata_that_is_not_strings(weights):
    """The safetensors format allows only strings there: the reader refuses the header, with the name."""
    path = weights / "clip.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"]["format_version"] = 1
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])
    _fails(lambda: checkpoint.load(path), path.name)


def test_config_from_dict_checks_annotated_types():
    from unclip_cli.models.unet import UNetConfig

    cfg = checkpoint.config_from_dict(UNetConfig, {"channel_mult": [1, 2], "dropout": 0, "clip_dim": 0})
    assert cfg.channel_mult == (1, 2) and cfg.dropout == 0 and cfg.clip_dim == 0  # an int for a float; 0 = none
    with pytest.raises(ValueError, match="UNetConfig.model_channels"):
        checkpoint.config_from_dict(UNetConfig, {"model_channels": None})
    with pytest.raises(ValueError, match="UNetConfig.dropout"):
        checkpoint.config_from_dict(UNetConfig, {"dropout": float("inf")})


# -- input images ------------------------------------------------------------------------------------
def test_a_damaged_exif_block_keeps_the_pixels_with_a_note(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("RGB", (8, 6), (200, 20, 30)).save(path, exif=b"Exif\x00\x00XX\x00*\x00\x00\x00\x08")  # not a TIFF header
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        im, notes = imageio.load_image(path, fit=None)
    assert im.size == (8, 6) and im.getpixel((0, 0)) == (200, 20, 30)
    assert len(notes) == 1 and "EXIF" in notes[0]


def test_damaged_exif_tags_in_a_jpeg_print_no_warning(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 6), (200, 20, 30)).save(path, exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        im, _ = imageio.load_image(path, fit=None)
    assert im.size == (8, 6)


def test_orientation_is_still_applied(tmp_path):
    path = tmp_path / "photo.png"
    exif = Image.Exif()
    exif[0x0112] = 8  # rotated 90° counter-clockwise for display
    Image.new("RGB", (8, 6)).save(path, exif=exif)
    im, notes = imageio.load_image(path, fit=None)
    assert im.size == (6, 8) and notes == []


@pytest.mark.parametrize("fill", [np.nan, np.inf], ids=["nan", "inf"])
def test_a_float_tiff_with_non_finite_pixels_is_refused(tmp_path, fill):
    path = tmp_path / "scan.tif"
    a = np.full((8, 8), fill, np.float32)
    a[0, 0] = 0.5  # a partly defined image is refused too
    Image.fromarray(a, "F").save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InputError, match="scan.tif has NaN or infinite"):
            imageio.load_image(path)
        with pytest.raises(InputError, match="scan.tif has NaN or infinite"):
            imageio.load_mask(path, (8, 8))


def test_a_finite_float_tiff_loads(tmp_path):
    path = tmp_path / "scan.tif"
    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8), "F").save(path)
    im, _ = imageio.load_image(path, fit=None)
    assert im.getpixel((0, 0)) == (0, 0, 0) and im.getpixel((7, 7)) == (255, 255, 255)


def test_an_image_path_with_a_name_too_long(tmp_path):
    with pytest.raises(InputError, match="too long"):
        imageio.load_image(tmp_path / ("i" * 300 + ".png"))


# -- output folders ---------------------------------------------------------------------------------
def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_check_out_dir_finds_problems_before_any_work_and_leaves_nothing(tmp_path):
    (tmp_path / "file").write_text("x")
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    cases = {
        tmp_path / "a" / ("o" * 300): "too long",
        tmp_path / "dangling": "does not exist",
        tmp_path / "dangling" / "sub": "does not exist",
        tmp_path / "file": "is a file",
        tmp_path / "file" / "sub": "is a file",
    }
    for out, message in cases.items():
        with pytest.raises(InputError, match=message) as ei:
            imageio.check_out_dir(out)
        assert "\n" not in str(ei.value)
    assert imageio.check_out_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert _tree(tmp_path) == ["dangling", "file"]


def test_output_set_removes_the_folders_it_made_when_a_name_is_too_long(tmp_path):
    with pytest.raises(InputError, match="too long"):
        with imageio.OutputSet(tmp_path / "a" / "b" / ("o" * 300)) as outs:
            outs.add_png(Image.new("RGB", (4, 4)), "x")
    assert _tree(tmp_path) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO])
def test_a_full_disk_is_an_input_error_and_leaves_nothing(tmp_path, monkeypatch, code):
    def full(frames, f, fps):
        f.write(b"GIF89a partial")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(imageio, "save_gif", full)
    out = tmp_path / "out" / "run"
    with pytest.raises(InputError) as ei:
        with imageio.OutputSet(out) as outs:
            outs.add_png(Image.new("RGB", (4, 4)), "first")
            outs.add_gif([Image.new("RGB", (4, 4))] * 2, "anim")
    reason = os.strerror(code)
    assert f"cannot write anim.gif in {out}: {reason[0].lower()}{reason[1:]}" in str(ei.value)
    assert _tree(tmp_path) == []


def test_sigterm_while_writing_cleans_up_like_ctrl_c(tmp_path):
    """In a child process: SIGTERM without the handler would kill it, leaving a .part file and the folder."""
    script = f"""
import os, signal, sys
from PIL import Image
from unclip_cli.imageio import OutputSet
try:
    with OutputSet({str(tmp_path / "out" / "run")!r}) as outs:
        outs.add_png(Image.new("RGB", (4, 4)), "a")
        outs.add_gif([Image.new("RGB", (4, 4))] * 2, "b")
        os.kill(os.getpid(), signal.SIGTERM)
        outs.add_png(Image.new("RGB", (4, 4)), "never")
except KeyboardInterrupt:
    sys.exit(130 if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL else 1)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert r.returncode == 130, r.stderr
    assert _tree(tmp_path) == []


def test_output_set_restores_the_sigterm_handler(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with imageio.OutputSet(tmp_path / "o") as outs:
        assert signal.getsignal(signal.SIGTERM) is (imageio._interrupt if before == signal.SIG_DFL else before)
        outs.add_png(Image.new("RGB", (4, 4)), "x")
    assert signal.getsignal(signal.SIGTERM) is before
    assert _tree(tmp_path) == ["o", "o/x.png"]
