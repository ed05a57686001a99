"""How the command's CPU threads share the machine with other processes.

torch runs its kernels on OpenMP threads, one per core. By default a thread that finishes its share of a
parallel region spins, waiting for the next one, and every region waits for its slowest thread. When other
processes want the cores, the spinning thread takes a time slice its partner needed, and the thousands of
small regions of a sampling loop each wait for a thread the scheduler has put aside: a 5-frame blend took
210 s instead of 8 s beside other jobs (load 4-7 on 2 cores). Threads that sleep while they wait
(`OMP_WAIT_POLICY=PASSIVE`) give the cores back; benchmarks/bench_load.py measures both.

The setting is read once, when the OpenMP runtime starts with torch, so `share_the_cpu` must run before
torch is imported: the CLI calls it first thing. A value the user set is kept.
"""

from __future__ import annotations

import os

WAIT_POLICY = "PASSIVE"


def share_the_cpu() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)
