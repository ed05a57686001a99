"""Shared fixtures: a tiny random model set, written once per test session."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)  # tiny models: one thread is as fast, and immune to a busy machine


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """A folder with clip/prior/decoder/upsampler checkpoints of the `tiny` preset, randomly initialised."""
    from unclip_cli.modelset import write_random_model_set

    return write_random_model_set(tmp_path_factory.mktemp("weights") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_engine(tiny_weights):
    from unclip_cli.engine import Engine

    return Engine.load(tiny_weights, device="cpu")


@pytest.fixture(scope="session")
def karlo_dirs(tmp_path_factory):
    """Tiny random Karlo pipelines (diffusers' classes), saved as diffusers folders: (pipe, var, src, var_dir)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from unclip_cli.convert import random_karlo

    pipe, var = random_karlo.build("tiny", seed=0)
    src, var_dir = random_karlo.save(pipe, var, tmp_path_factory.mktemp("karlo"))
    return pipe, var, src, var_dir


@pytest.fixture(scope="session")
def karlo_set(karlo_dirs, tmp_path_factory):
    """The tiny Karlo pipelines converted in float32."""
    from unclip_cli.convert import karlo

    _, _, src, var_dir = karlo_dirs
    return karlo.convert(src, tmp_path_factory.mktemp("converted") / "karlo", variation=var_dir, dtype=torch.float32)
