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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page-fault counts from getrusage, glibc's mallopt")
def test_freed_memory_is_reused_without_new_page_faults():
    """glibc gives an 8 MiB block back to the system when it is freed (its mmap threshold starts at 128 KiB), so the
    next one is faulted in, page by page, again; after keep_freed_memory the next one reuses the kept pages."""
    code = ("import ctypes, resource, sys\n"
            "if sys.argv[1] == 'keep':\n"
            "    from unclip_cli.cli.load import keep_freed_memory; keep_freed_memory()\n"
            "libc = ctypes.CDLL(None)\n"
            "libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]\n"
            "faults = []\n"
            "for _ in range(2):\n"
            "    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "    p = libc.malloc(8 << 20); ctypes.memset(p, 1, 8 << 20); libc.free(p)\n"
            "    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)\n"
            "print(*faults)\n")
    if "glibc" not in " ".join(__import__("platform").libc_ver()):
        pytest.skip("not glibc")
    thp = "/sys/kernel/mm/transparent_hugepage/enabled"
    if os.path.exists(thp) and "[always]" in open(thp).read():
        pytest.skip("transparent huge pages for every mapping: a block faults in a few 2 MiB pages")
    run = lambda mode: [int(x) for x in subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,  # noqa: E731
                                                        check=True).stdout.split()]
    first, second = run("keep")
    assert first > 1000 and second < 100  # 2,048 pages of 4 KiB the first time, none again
    first, second = run("default")
    assert first > 1000 and second > 1000  # glibc's default maps the second block afresh
