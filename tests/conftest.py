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
