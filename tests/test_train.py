"""Training: every stage on the tiny preset from fixture shards, resume, learning, torchrun, stops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clirun import cli
from unclip_cli.errors import InputError, UnclipError
from unclip_cli.train.common import read_state_meta
from unclip_cli.train.loop import TrainOptions, train

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square"]


def _png(colour: str, shape: str, size: int = 32) -> bytes:
    import io

    from PIL import ImageDraw

    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    box = (6, 6, size - 6, size - 6)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """12 captioned images (coloured circles and squares) in two train shards."""
    from unclip_cli.data.shards import ShardWriter

    root = tmp_path_factory.mktemp("shards")
    with ShardWriter(root, "train", per_shard=6) as w:
        for c in COLOURS:
            for s in SHAPES:
                caps = {"en": [f"a {c} {s}", f"{c} {s} emoji"], "zh": [f"{c} 的 {s}"]}
                w.write(f"{c}_{s}", _png(c, s), "png", text=f"a {c} {s}", meta={"captions": caps, "concept": f"{c}-{s}", "split": "train"})
    return root


def _opts(run, data, stage, **kw):
    return TrainOptions(stage=stage, run=run, data=str(data), preset="tiny", device="cpu", **kw)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, shards) -> Path:
    run = tmp_path_factory.mktemp("run")
    for stage in ("clip", "prior", "decoder", "upsampler"):
        summary = train(_opts(run, shards, stage, max_steps=3))
        assert summary["step"] == 3 and np.isfinite(summary["loss"])
    return run


def test_every_stage_trains_checkpoints_and_exports(trained_run, tmp_path):
    from unclip_cli.engine import Engine
    from unclip_cli.requests import GenerateRequest
    from unclip_cli.train.export import export

    for stage in ("clip", "prior", "decoder", "upsampler"):
        meta = read_state_meta(trained_run / stage / "state.safetensors")
        assert meta["step"] == 3
        lines = (trained_run / stage / "metrics.jsonl").read_text().splitlines()
        assert json.loads(lines[0])["step"] == 1
    assert list((trained_run / "decoder" / "samples").glob("step-*.png"))
    written = export(trained_run, tmp_path / "set")
    assert sorted(p.name for p in written) == ["clip.safetensors", "decoder.safetensors", "prior.safetensors", "upsampler.safetensors"]
    engine = Engine.load(tmp_path / "set", device="cpu")
    result = engine.run(GenerateRequest(prompt="a red circle", seed=0, prior_steps=2, decoder_steps=2, upsampler_steps=2, decoder_candidates=1))
    assert result.images[0].size == (16, 16)
    with pytest.raises(UnclipError, match="already holds"):
        export(trained_run, tmp_path / "set")


def test_export_appends_the_runs_upsampler_as_one_more_stage(trained_run, tmp_path):
    """How emoji got its 256 px stage: a set, plus a run's upsampler after its last stage (here 16 px ->
    8 -> 16: the stage takes the image before it downsized)."""
    from unclip_cli.engine import Engine
    from unclip_cli.modelset import load_model_set
    from unclip_cli.requests import GenerateRequest
    from unclip_cli.train.export import append_upsampler, export

    base = tmp_path / "base"
    export(trained_run, base)
    (base / "MODEL_CARD.md").write_text("card")
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    written = append_upsampler(trained_run, base, tmp_path / "more")
    assert [p.name for p in written] == ["upsampler-2.safetensors"]
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before  # the base is untouched
    more = {p.name: p.read_bytes() for p in (tmp_path / "more").iterdir()}
    assert {k: v for k, v in more.items() if k != "upsampler-2.safetensors"} == before
    ms = load_model_set(tmp_path / "more")
    assert [u.path.name for u in ms.upsamplers] == ["upsampler.safetensors", "upsampler-2.safetensors"] and ms.image_size == 16
    result = Engine(ms, torch.device("cpu"), torch.float32).run(
        GenerateRequest(prompt="a red circle", seed=0, prior_steps=2, decoder_steps=2, upsampler_steps=2, decoder_candidates=1))
    assert result.images[0].size == (16, 16)
    with pytest.raises(UnclipError, match="already holds"):
        append_upsampler(trained_run, base, tmp_path / "more")
    assert append_upsampler(trained_run, base, base)[0].name == "upsampler-2.safetensors"  # in place
    assert len(load_model_set(base).upsamplers) == 2
    r = cli("train", "export", str(trained_run), "--to", str(tmp_path / "x"), "--append-upsampler")
    assert r.code == 1 and "needs --base" in r.err and not (tmp_path / "x").exists()
    # An upsampler that does not fit after the set's last stage (12 px does not divide 16) is refused
    # before anything is written.
    import shutil

    odd = tmp_path / "odd-run"
    shutil.copytree(trained_run / "upsampler", odd / "upsampler")
    info = json.loads((odd / "upsampler" / "run.json").read_text())
    info["extra"]["low_res"] = 12
    (odd / "upsampler" / "run.json").write_text(json.dumps(info))
    with pytest.raises(UnclipError, match="12"):
        append_upsampler(odd, base, tmp_path / "y")
    assert not (tmp_path / "y").exists()


def test_the_decoder_records_its_training_mean_image_and_exports_it(trained_run, tmp_path):
    from unclip_cli import checkpoint
    from unclip_cli.train.export import export
    from unclip_cli.train.stages import open_cache

    info = json.loads((trained_run / "decoder" / "run.json").read_text())
    extra = info["extra"]
    mean = np.array(extra["x_start_mean"])  # (3, 8, 8) in [-1, 1]
    images = open_cache(info["data"], 8, tmp_path / "cache").images
    expected = (np.asarray(images, dtype=np.float64).mean(0) / 127.5 - 1).transpose(2, 0, 1)  # the tiny preset's base is 8 px
    assert mean.shape == (3, 8, 8)
    np.testing.assert_allclose(mean, expected, atol=1e-4)
    export(trained_run, tmp_path / "set")
    assert checkpoint.load(tmp_path / "set" / "decoder.safetensors").extra["x_start_mean"] == extra["x_start_mean"]


def test_mean_image_averages_in_chunks_and_pools():
    from unclip_cli.train.stages import mean_image

    images = np.zeros((5, 4, 4, 3), dtype=np.uint8)
    images[:, :2, :, 0] = 255  # red top half in every image
    images[0] = 255  # one all-white image
    mean = np.array(mean_image(images, size=2, chunk=2))  # (3, 2, 2)
    np.testing.assert_allclose(mean[0], [[1, 1], [-0.6, -0.6]], atol=1e-4)
    np.testing.assert_allclose(mean[1], [[-0.6, -0.6], [-0.6, -0.6]], atol=1e-4)
    # Capped: rows 0, 2 and 4 only (one white of three).
    np.testing.assert_allclose(np.array(mean_image(images, size=2, max_images=3))[1], np.full((2, 2), -1 / 3), atol=1e-4)


def test_resume_adds_task_facts_that_the_run_predates(trained_run, shards, tmp_path):
    import shutil

    run = tmp_path / "old"
    shutil.copytree(trained_run, run)
    info_path = run / "decoder" / "run.json"
    info = json.loads(info_path.read_text())
    mean = info["extra"].pop("x_start_mean")
    info_path.write_text(json.dumps(info))
    train(_opts(run, shards, "decoder", max_steps=4, resume=True))
    resumed = json.loads(info_path.read_text())
    assert resumed["extra"]["x_start_mean"] == mean and resumed["uid"] == info["uid"]


def test_a_run_started_from_a_model_set_goes_on_from_its_weights_and_steps(trained_run, shards, tmp_path):
    """--init-from: the decoder starts from the set's weights (against the set's CLIP), counts on from its
    steps and warms the learning rate up again; export --base takes the untrained stages from the set."""
    from unclip_cli import checkpoint
    from safetensors.torch import load_file

    from unclip_cli.modelset import load_model_set, write_random_model_set
    from unclip_cli.train.export import export
    from unclip_cli.train.stages import STAGES

    base = tmp_path / "set"
    export(trained_run, base, dtype=torch.float32)
    run = tmp_path / "finetune"
    summary = train(_opts(run, shards, "decoder", max_steps=4, init_from=base))
    assert summary["step"] == 4  # 3 from the set, 1 here
    lines = [json.loads(line) for line in (run / "decoder" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 4 and abs(lines[0]["lr"] - 1e-3 / 5) < 1e-9  # the tiny preset warms up over 5 steps
    info = json.loads((run / "decoder" / "run.json").read_text())
    assert info["init_from"]["trained_steps"] == 3 and info["uid"] not in info["init_from"]["uid"]
    # One step away from the set's weights, not from a fresh initialisation.
    start = checkpoint.load(base / "decoder.safetensors").model.state_dict()
    tensors = {k[6:]: v for k, v in load_file(str(run / "decoder" / "state.safetensors")).items() if k.startswith("model.")}
    assert max((tensors[k] - v).abs().max().item() for k, v in start.items()) < 0.05

    with pytest.raises(UnclipError, match="no trained prior, upsampler"):
        export(run, tmp_path / "out")
    written = export(run, tmp_path / "out", base=base)
    assert sorted(p.name for p in written) == sorted(f"{s}.safetensors" for s in STAGES)
    out = load_model_set(tmp_path / "out")  # a consistent set: the decoder was trained against the set's CLIP
    assert out.decoder.extra["trained_steps"] == 4 and out.prior.extra["uid"] == load_model_set(base).prior.extra["uid"]
    export(run, base, base=base, force=True)  # the set itself can be replaced in place
    assert load_model_set(base).decoder.extra["trained_steps"] == 4

    with pytest.raises(UnclipError, match="starts a new run"):
        train(_opts(run, shards, "decoder", max_steps=5, init_from=base, resume=True))
    with pytest.raises(UnclipError, match="CLIP cannot"):
        train(_opts(tmp_path / "other", shards, "clip", max_steps=5, init_from=base))
    other = write_random_model_set(tmp_path / "random", "tiny")  # a set with a CLIP of its own
    with pytest.raises(UnclipError, match="another CLIP"):
        train(_opts(run, shards, "prior", max_steps=5, init_from=other))


def test_resume_continues_exactly(trained_run, shards, tmp_path):
    """A run stopped after 3 steps and resumed to 6 ends where a straight 6-step run ends."""
    import shutil

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for run in (straight, resumed):
        run.mkdir()
        shutil.copy(trained_run / "frozen_clip.safetensors", run / "frozen_clip.safetensors")
        shutil.copytree(trained_run / "embeddings", run / "embeddings")
    a = train(_opts(straight, shards, "decoder", max_steps=6))
    train(_opts(resumed, shards, "decoder", max_steps=3))
    b = train(_opts(resumed, shards, "decoder", max_steps=6, resume=True))
    assert b["step"] == 6
    assert a["loss"] == b["loss"]  # the same batches, noise and weights: bit-identical
    with pytest.raises(UnclipError, match="already has a training state"):
        train(_opts(resumed, shards, "decoder", max_steps=7))


def test_prior_learns(trained_run, shards, tmp_path):
    """The prior overfits 12 samples: its x_start loss falls well below where it starts."""
    import shutil

    run = tmp_path / "learn"
    run.mkdir()
    shutil.copy(trained_run / "frozen_clip.safetensors", run / "frozen_clip.safetensors")
    shutil.copytree(trained_run / "embeddings", run / "embeddings")
    train(TrainOptions(stage="prior", run=run, data=str(shards), preset="tiny", device="cpu", max_steps=300, lr=3e-3, log_seconds=0))
    losses = [json.loads(line)["loss"] for line in (run / "prior" / "metrics.jsonl").read_text().splitlines()]
    first, last = np.mean(losses[:10]), np.mean(losses[-30:])
    # Measured: first ~1.0, last ~0.1 (the floor is set by the 10% caption dropout).
    assert last < 0.35 * first, (first, last)


def test_nan_loss_stops_and_keeps_last_checkpoint(trained_run, shards, tmp_path, monkeypatch):
    import shutil

    from unclip_cli.train import stages

    run = tmp_path / "nan"
    shutil.copytree(trained_run, run)
    before = (run / "upsampler" / "state.safetensors").read_bytes()
    monkeypatch.setattr(stages.UpsamplerTask, "loss", lambda self, idx, gen: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(UnclipError, match="loss became nan at step 3"):
        train(_opts(run, shards, "upsampler", max_steps=10, resume=True))
    assert (run / "upsampler" / "state.safetensors").read_bytes() == before


def test_sigint_saves_and_stops(trained_run, shards, tmp_path):
    import shutil

    run = tmp_path / "sig"
    shutil.copytree(trained_run, run)

    def interrupt(progress):
        if progress.step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    opts = _opts(run, shards, "prior", max_steps=1000, resume=True)
    opts.log_seconds = 0
    summary = train(opts, interrupt)
    assert summary["interrupted"] and summary["step"] == 5
    assert read_state_meta(run / "prior" / "state.safetensors")["step"] == 5


# Under torchrun, `python -m unclip_cli` with one addition: at exit each rank reports the gloo threads it
# still runs (Linux). Training must have torn its process group down by then; a group left alive is torn
# down at the ranks' unsynchronised exits, which ended a rank with SIGABRT now and then.
TORCHRUN_MAIN = """
import os, sys
from unclip_cli.cli import main

try:
    main(sys.argv[1:])
finally:
    if os.path.isdir("/proc/self/task"):
        names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
        print(f"rank {os.environ['RANK']} gloo threads at exit: {sorted(n for n in names if 'gloo' in n)}", file=sys.stderr, flush=True)
"""


def test_torchrun_two_processes_agree(trained_run, shards, tmp_path):
    """Two CPU processes under torchrun (gloo) train the prior; DDP keeps their weights identical, and
    both leave the process group before they exit."""
    import re
    import shutil

    run = tmp_path / "ddp"
    run.mkdir()
    shutil.copy(trained_run / "frozen_clip.safetensors", run / "frozen_clip.safetensors")
    shutil.copytree(trained_run / "embeddings", run / "embeddings")
    script = tmp_path / "unclip_main.py"
    script.write_text(TORCHRUN_MAIN)
    paths = [str(Path(__file__).parents[1]), *filter(None, [os.environ.get("PYTHONPATH")])]  # this checkout's unclip_cli
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(paths)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           "train", "prior", "--preset", "tiny", "--data", str(shards), "--run-dir", str(run), "--max-steps", "4", "--device", "cpu", "--quiet"]
    # Its own session, so that a hang kills torchrun's workers too, not just torchrun.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, stderr[-2000:]
    meta = read_state_meta(run / "prior" / "state.safetensors")
    checksums = meta["rank_checksums"]  # float64 sum of every weight, gathered from each rank at the end
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert meta["step"] == 4 and meta["images_seen"] == 4 * 2 * 8  # two ranks, batch 8 each
    if Path("/proc/self/task").is_dir():
        assert sorted(re.findall(r"rank (\d) gloo threads at exit: \[\]", stderr)) == ["0", "1"], stderr[-2000:]


# -- issue 13: the trainer's boundaries, its exits, export and bad options ---------------------------------
def test_training_imports_neither_the_engine_nor_the_cli():
    """Training code is a library of its own: no module under unclip_cli/train imports the engine, the
    inference requests or the CLI, at import time or inside a function."""
    import ast

    forbidden = ("unclip_cli.engine", "unclip_cli.requests", "unclip_cli.cli")
    root = Path(__file__).parents[1] / "unclip_cli" / "train"
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad = [n for n in names if any(n == f or n.startswith(f + ".") for f in forbidden)]
            assert not bad, f"{path.name}:{node.lineno} imports {bad}"
    code = ("import sys, unclip_cli.train.loop, unclip_cli.train.export\n"
            f"print(sorted(m for m in sys.modules if m.startswith({forbidden!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def _copy_clip(trained_run, run: Path) -> Path:
    """A new run folder with the trained run's frozen CLIP and embeddings (for the prior and decoder)."""
    import shutil

    run.mkdir()
    shutil.copy(trained_run / "frozen_clip.safetensors", run / "frozen_clip.safetensors")
    shutil.copytree(trained_run / "embeddings", run / "embeddings")
    return run


def test_a_task_built_once_trains_in_resumed_runs_as_one_run_does(trained_run, shards, tmp_path, monkeypatch):
    """`train(opts, task=...)` trains the caller's task and builds none; 2 + 2 resumed steps of one task
    end where 4 steps of a new run end."""
    from unclip_cli.train import loop

    straight = train(_opts(_copy_clip(trained_run, tmp_path / "straight"), shards, "prior", max_steps=4))
    run = _copy_clip(trained_run, tmp_path / "chunks")
    task = loop.build_task(_opts(run, shards, "prior"), torch.device("cpu"))
    monkeypatch.setitem(loop.TASKS, "prior", None)  # building another task would fail
    train(_opts(run, shards, "prior", max_steps=2), task=task)
    chunked = train(_opts(run, shards, "prior", max_steps=4, resume=True), task=task)
    assert chunked["step"] == 4 and chunked["loss"] == straight["loss"]
    with pytest.raises(InputError, match="a prior task cannot train the decoder"):
        train(_opts(tmp_path / "other", shards, "decoder", max_steps=1), task=task)


class _RecordingDist:
    """A single process's Dist that records how the run left the process group; `diverged_at` makes the
    non-finite-loss vote come out True at that step, as if another rank's loss had become NaN."""

    def __init__(self, diverged_at: int | None = None):
        from unclip_cli.train.common import Dist

        self.inner, self.diverged_at, self.votes, self.closed = Dist(), diverged_at, 0, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def any(self, flags, device):
        if len(flags) == 1:  # the per-step non-finite-loss vote
            self.votes += 1
            return [flags[0] or self.votes == self.diverged_at]
        return self.inner.any(flags, device)

    def close(self, together=True):
        self.closed.append(together)


def test_every_exit_leaves_the_process_group(trained_run, shards, tmp_path, monkeypatch):
    """Normal end: leave together (barrier first). NaN stop, here another rank's: all ranks vote on the
    loss before the backward pass, stop at the same step, and leave at once."""
    import shutil

    from unclip_cli.train import loop

    run = tmp_path / "exits"
    shutil.copytree(trained_run, run)
    normal = _RecordingDist()
    monkeypatch.setattr(loop, "init_distributed", lambda device: normal)
    train(_opts(run, shards, "upsampler", max_steps=4, resume=True))
    assert normal.closed == [True]
    before = (run / "upsampler" / "state.safetensors").read_bytes()
    nan = _RecordingDist(diverged_at=2)
    monkeypatch.setattr(loop, "init_distributed", lambda device: nan)
    with pytest.raises(UnclipError, match="loss became non-finite on another rank at step 5"):
        train(_opts(run, shards, "upsampler", max_steps=10, resume=True))
    assert nan.closed == [False]
    assert (run / "upsampler" / "state.safetensors").read_bytes() == before


def test_export_replaces_the_stage_files_all_at_once(trained_run, tmp_path, monkeypatch):
    """--force replaces every stage file (a stale upsampler-2 too) and keeps other files; an export
    interrupted while writing leaves the previous set whole, and Ctrl-C waits for the last rename."""
    import shutil

    from unclip_cli import checkpoint
    from unclip_cli.modelset import FILES, load_model_set
    from unclip_cli.train.export import export

    dest = tmp_path / "set"
    export(trained_run, dest)  # fp16
    shutil.copy(dest / "upsampler.safetensors", dest / "upsampler-2.safetensors")
    (dest / "MODEL_CARD.md").write_text("card")
    (dest / "notes.safetensors").write_bytes(b"not a stage")

    def contents() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(dest.iterdir())}

    before = contents()
    real_save, saved = checkpoint.save, []

    def save_then_interrupt(*args, **kwargs):
        if len(saved) == 2:
            raise KeyboardInterrupt
        saved.append(args[0])
        real_save(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "save", save_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            export(trained_run, dest, dtype=torch.float32, force=True)
    assert contents() == before  # no temporary file left either

    real_replace = os.replace

    def replace_then_interrupt(src, dst):
        real_replace(src, dst)
        if Path(dst).name in FILES.values():
            os.kill(os.getpid(), signal.SIGINT)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", replace_then_interrupt)
        # Python's own Ctrl-C handler, whatever this process inherited: a shell starts background jobs
        # (a CI runner's, say) with SIGINT ignored, and export hands a held-back Ctrl-C to that handler.
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            with pytest.raises(KeyboardInterrupt):
                export(trained_run, dest, dtype=torch.float32, force=True)
        finally:
            signal.signal(signal.SIGINT, previous)
    after = contents()
    assert sorted(after) == ["MODEL_CARD.md", "clip.safetensors", "decoder.safetensors", "notes.safetensors", "prior.safetensors",
                             "upsampler.safetensors"]
    assert after["MODEL_CARD.md"] == b"card" and after["notes.safetensors"] == b"not a stage"
    assert all(after[name] != before[name] for name in FILES.values())  # all four are the new fp32 files
    assert len(load_model_set(dest).upsamplers) == 1


@pytest.mark.parametrize("field, value, option", [
    ("max_minutes", float("nan"), "--max-minutes"), ("max_minutes", float("inf"), "--max-minutes"),
    ("max_minutes", -1.0, "--max-minutes"), ("max_minutes", 0.0, "--max-minutes"),
    ("batch_size", 0, "--batch-size"), ("batch_size", -2, "--batch-size"),
    ("lr", float("nan"), "--lr"), ("lr", float("inf"), "--lr"), ("lr", 0.0, "--lr"), ("lr", -1e-3, "--lr"),
    ("max_steps", 0, "--max-steps"), ("max_steps", -1, "--max-steps"),
    ("checkpoint_minutes", float("nan"), "--checkpoint-minutes"), ("checkpoint_minutes", 0.0, "--checkpoint-minutes"),
    ("stage", "colour", "unknown stage"),
])
def test_bad_options_are_refused_before_any_work(shards, tmp_path, field, value, option):
    good = {"stage": "prior", "run": tmp_path / "run", "data": str(shards), "preset": "tiny", "device": "cpu"}
    with pytest.raises(InputError, match=option):
        TrainOptions(**{**good, field: value})
    opts = TrainOptions(**good)
    setattr(opts, field, value)  # changed after construction: train checks again
    with pytest.raises(InputError, match=option):
        train(opts)
    assert not (tmp_path / "run").exists()


def test_a_run_folder_that_is_a_file_is_named(shards, tmp_path):
    blocker = tmp_path / "run-file"
    blocker.write_text("not a folder")
    with pytest.raises(InputError, match=f"--run-dir {blocker} is a file"):
        _opts(blocker, shards, "clip")
    with pytest.raises(InputError, match=f"its parent {blocker} is a file"):
        _opts(blocker / "run", shards, "clip")
    assert blocker.read_text() == "not a folder"


def _cli(*args, env: dict | None = None) -> tuple[int, str]:
    r = cli(*args, env=env)
    return r.code, r.err


@pytest.mark.parametrize("option, value, named", [("--max-minutes", "nan", "--max-minutes"), ("--batch-size", "0", "--batch-size"),
                                                  ("--lr", "-1", "--lr"), ("--max-steps", "0", "--max-steps")])
def test_the_cli_refuses_bad_options_in_one_line(tmp_path, option, value, named):
    # --data does not exist: the options are checked first.
    code, err = _cli("train", "prior", "--data", tmp_path / "no-data", "--run-dir", tmp_path / "run", "--preset", "tiny",
                     "--device", "cpu", option, value)
    errors = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert code == 1 and len(errors) == 1 and named in errors[0] and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_eval_reads_its_default_corpus_from_unclip_data(tiny_weights, tmp_path):
    data = tmp_path / "corpus"  # missing: eval must name it, not ~/.cache/unclip/emoji
    code, err = _cli("eval", "--quick", "--weights", tiny_weights, "--out", tmp_path / "m.json", "--device", "cpu", "--quiet",
                     env={"UNCLIP_DATA": str(data), "HOME": str(tmp_path / "home")})
    assert code == 1 and f"Error: no corpus at {data}" in err and ".cache/unclip" not in err, err


@pytest.mark.parametrize("stage", ["decoder", "upsampler"])
def test_data_on_the_device_gives_the_same_batches_as_the_host_memory_maps(trained_run, shards, tmp_path, stage):
    """--data-on-device (here with the CPU as the device): images, token states and caption tables as tensors,
    random numbers from a generator where the data lives; the same losses, bit for bit, as reading the memory
    maps, step after step; and another seed gives other batches."""
    import shutil

    from unclip_cli.train.loop import build_task

    def losses(run, on_device, seed=0):
        shutil.copytree(trained_run / "cache", _copy_clip(trained_run, run) / "cache")
        opts = _opts(run, shards, stage, max_steps=3, data_on_device=on_device, seed=seed,
                     log_seconds=0.0)
        task = build_task(opts, torch.device("cpu"))
        summary = train(opts, task=task)
        assert task.data_held == bool(on_device)
        return [json.loads(x)["loss"] for x in (run / stage / "metrics.jsonl").read_text().splitlines()], summary

    host, _ = losses(tmp_path / "host", None)  # the default on a CPU: memory maps
    device, summary = losses(tmp_path / "device", True)
    assert len(host) == 3 and host == device and summary["step"] == 3
    other, _ = losses(tmp_path / "other", True, seed=1)
    assert other != device


def test_random_keep_masks_erase_one_to_three_rectangles():
    from unclip_cli.train.stages import random_keep_masks

    keep = random_keep_masks(64, 16, torch.Generator().manual_seed(0))
    assert keep.shape == (64, 1, 16, 16) and set(keep.unique().tolist()) == {0.0, 1.0}
    erased = (keep == 0).sum(dim=(1, 2, 3))
    assert erased.min() >= 16 and erased.max() <= 3 * 12 * 12  # at least one 4x4, at most three 12x12
    assert torch.equal(keep, random_keep_masks(64, 16, torch.Generator().manual_seed(0)))


def test_the_emoji256_preset_keeps_v03s_clip_and_prior_and_builds_64_and_256_pixel_stages():
    """emoji v0.4: the `emoji` preset's CLIP and prior (so a run trains against weights/emoji's CLIP), a 64 px
    decoder with the same conditioning and inpainting channels, and a convolutional 64 -> 256 upsampler."""
    from unclip_cli.checkpoint import config_from_dict
    from unclip_cli.models.unet import UNet, UNetConfig
    from unclip_cli.presets import list_presets, load_preset

    assert "emoji256" in list_presets()
    new, old = load_preset("emoji256"), load_preset("emoji")
    assert new["clip"] == old["clip"] and new["prior"] == old["prior"]
    dec, old_dec = new["decoder"]["model"], old["decoder"]["model"]
    assert dec["image_size"] == 64 and all(dec[k] == old_dec[k] for k in ("extra_channels", "clip_dim", "num_clip_tokens", "text_width", "context_dim"))
    assert new["upsampler"]["model"]["attention_ds"] == [] and dec["image_size"] * new["upsampler"]["scale"] == 256
    decoder = UNet(config_from_dict(UNetConfig, dec))
    upsampler = UNet(config_from_dict(UNetConfig, new["upsampler"]["model"]))
    with torch.no_grad():
        x = torch.zeros(1, 3, 64, 64)
        assert decoder(x, torch.zeros(1, dtype=torch.long), z_i=torch.zeros(1, 256)).shape == x.shape
        assert upsampler(x, torch.zeros(1, dtype=torch.long), cond=x).shape == x.shape  # a training crop


def test_a_new_decoder_trains_against_a_model_sets_clip(shards, tiny_weights, tmp_path):
    """--clip-from SET: the run's frozen CLIP is the set's, the decoder starts from new weights (another
    architecture than the set's may be trained), and export --base completes the set with its prior."""
    from unclip_cli import checkpoint
    from unclip_cli.modelset import load_model_set
    from unclip_cli.train.export import export

    run = tmp_path / "run"
    train(_opts(run, shards, "decoder", max_steps=1, clip_from=tiny_weights))
    frozen = checkpoint.load(run / "frozen_clip.safetensors", "clip")
    assert frozen.extra["uid"] == checkpoint.load(tiny_weights / "clip.safetensors", "clip").extra["uid"]
    info = json.loads((run / "decoder" / "run.json").read_text())
    assert "init_from" not in info and info["extra"]["clip_uid"] == frozen.extra["uid"]
    export(run, tmp_path / "set", base=tiny_weights)
    assert load_model_set(tmp_path / "set").decoder.extra["trained_steps"] == 1
    for stage, kw, match in [("clip", {}, "is CLIP"), ("upsampler", {}, "never sees CLIP"), ("decoder", {"resume": True}, "new run"),
                             ("decoder", {"init_from": tiny_weights}, "new run")]:
        with pytest.raises(InputError, match=match):
            _opts(tmp_path / "other", shards, stage, clip_from=tiny_weights, **kw)
    with pytest.raises(InputError, match="cannot keep its data on the device"):
        _opts(tmp_path / "other", shards, "prior", data_on_device=True)
