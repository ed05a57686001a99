"""How the command's CPU threads share the machine with other processes.

torch runs its kernels on OpenMP threads, one per core. A thread that finishes its share of a parallel
region spins, waiting for the next one, and every region waits for its slowest thread. On an idle machine
that is the fastest way to wait. When other processes want the cores, the spinning thread takes the time
slice its partner needed, and each of the thousands of small regions of a sampling loop waits for a thread
the scheduler has put aside: a 5-frame blend took 210 s instead of 8 s beside other jobs (load 4-7 on 2
cores), and `generate -n 4 --quality fast` took 6.6 times as long beside two spinning processes. Threads that
sleep while they wait (`OMP_WAIT_POLICY=PASSIVE`) give the cores back, but on an idle machine they cost a
third more time. So the CLI measures how busy the CPU is while it starts (the time its own imports take,
from /proc/stat, less its own CPU time) and lets the threads sleep only when other processes use half a
core or more. benchmarks/bench_load.py measures the result.

OpenMP reads the setting once, when it starts with torch: `CpuWatch` must start and `share_the_cpu` run
before torch is imported. A value the user set is kept.
"""

from __future__ import annotations

import os
import time

OTHERS_BUSY = 0.5  # cores used by other processes from which threads wait passively
MIN_WINDOW = 0.15  # s: /proc/stat counts in ticks of 10 ms


def _busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (/proc/stat), or None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 8:
        return None
    user, nice, system, idle, iowait, irq, softirq = map(int, fields[1:8])
    steal = int(fields[8]) if len(fields) > 8 else 0
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class CpuWatch:
    """How many cores other processes keep busy, measured from when this object is made."""

    def __init__(self):
        self.busy, self.wall, self.own = _busy_seconds(), time.monotonic(), time.process_time()

    def others(self) -> float | None:
        """Cores used by other processes since the start (None: not measurable here)."""
        if self.busy is None:
            return None
        wait = MIN_WINDOW - (time.monotonic() - self.wall)
        if wait > 0:
            time.sleep(wait)
        busy = _busy_seconds()
        if busy is None:
            return None
        wall, own = time.monotonic() - self.wall, time.process_time() - self.own
        return max(0.0, (busy - self.busy - own) / wall)


def share_the_cpu(watch: CpuWatch) -> str | None:
    """Set OMP_WAIT_POLICY=PASSIVE when other processes are busy (and the user set no policy); -> the policy set."""
    if "OMP_WAIT_POLICY" in os.environ:
        return None
    others = watch.others()
    if others is None or others < OTHERS_BUSY:
        return None
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return "PASSIVE"
