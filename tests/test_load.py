"""Sharing the CPU (cli/load.py): torch's threads wait by sleeping when other threads are ready to take the cores."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from unclip_cli.cli import load

STAT = "cpu  10 0 5 100 0 0 0 0 0 0\nctxt 1\nprocs_running {}\nprocs_blocked 0\n"


@pytest.mark.parametrize("running, cpus, want", [
    (1, 2, False),   # only this process: torch's spinning waits
    (2, 2, True),    # one other ready thread on 2 CPUs
    (4, 16, False),  # 3 others on 16 logical CPUs (8 cores): room for them
    (9, 16, True),   # 8 others on 16: they start taking torch's cores
    (3, 1, True),
])
def test_contended(running, cpus, want):
    assert load.contended(load.others_running(STAT.format(running)), cpus) is want


def test_unreadable_stat_changes_nothing():
    assert load.others_running("cpu 1 2 3\n") is None and load.contended(None, 2) is False
    assert load.others_running(STAT.format("x")) is None


def test_policy_is_chosen_before_torch_and_a_users_choice_stands():
    """In a fresh console-script process: the policy is set (or not) before torch is imported; one the user set
    is never replaced."""
    code = ("import os, sys; from unclip_cli.cli import load; load.choose_wait_policy(); "
            "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["ACTIVE", "False"]
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out[0] in ("None", "PASSIVE") and out[1] == "False"
