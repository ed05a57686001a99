"""What the console script sets before torch starts (issue 25): how torch's threads wait for each other beside other
busy processes, and keeping the memory it frees for its next steps.

torch's OpenMP threads spin while they wait for each other at the end of every parallel loop. Beside other busy
processes a waiting thread spins on a core another process needs, and a thread that was descheduled holds all the
others at the next barrier. Measured on a 2-core Xeon (`generate -n 4 --quality fast`, whole process, 3 runs each,
benchmarks/RESULTS.md): 3.8 s alone, 7.4 s beside one process spinning a core and 97 s beside two (bf16; fp32 4.1,
9.9 and 24 s); waits that sleep instead (`OMP_WAIT_POLICY=PASSIVE`) took 4.6 s and 6.7 s beside them (fp32 5.4 and
7.3 s), but 8-17% longer alone. Fewer threads would help as much but change bf16's rounding (a replayed recipe
would come out a few levels different), the wait policy changes nothing but the waiting.

So the console script looks, before torch is imported (libgomp reads the policy once), at how many other threads
are ready to run at that moment: when they could take the cores torch's threads run on, the threads sleep while
they wait. A policy the user set is kept. One look is a guess about the next seconds: a brief burst of other work
costs an idle machine the 8-17%, a missed steady load costs far more.
"""

from __future__ import annotations

import os


def others_running(stat: str) -> int | None:
    """Threads ready to run besides this one, from the text of /proc/stat (its `procs_running` counts this one)."""
    for line in stat.splitlines():
        if line.startswith("procs_running "):
            try:
                return max(0, int(line.split()[1]) - 1)
            except ValueError:
                return None
    return None


def contended(others: int | None, cpus: int) -> bool:
    """Whether other ready threads could take the cores torch's threads run on: at least half as many as there are
    logical CPUs, and at least one. torch starts one thread per physical core; with two logical CPUs per core that
    many others can start to take the cores' second halves from them, and on a 2-CPU machine one other does."""
    return others is not None and others >= max(1, cpus // 2)


def choose_wait_policy() -> None:
    """Before torch is imported in the console script: sleeping waits (OMP_WAIT_POLICY=PASSIVE) when the machine
    is busy with other work, torch's spinning waits otherwise. Not on systems without /proc/stat."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    try:
        with open("/proc/stat", encoding="ascii") as f:
            stat = f.read()
        cpus = len(os.sched_getaffinity(0))
    except (OSError, AttributeError):
        return
    if contended(others_running(stat), cpus):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def keep_freed_memory() -> None:
    """glibc's malloc gives large blocks back to the system as soon as they are freed and maps them afresh the next
    time, so every step's activations are page-faulted in (and zeroed by the kernel) again: a cold `generate -n 4
    --quality default` faulted 580,000-636,000 pages, a warm one 60,000-100,000 each time. With a fixed mmap threshold
    at its 32 MiB maximum (instead of one that starts at 128 KiB and creeps up) and up to 256 MiB of freed memory kept
    at the heap's top (glibc keeps 64 MiB at most), the console script reuses its own memory: 72,000 faults cold and
    under 1,000 warm (1 GiB kept gave the same; peak memory 873 MB against 882). Blocks over 32 MiB are still mapped
    apart and given back when freed, and a freed network's tensors are reused for the next (--offload). glibc only."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, 32 << 20)
    mallopt(M_TRIM_THRESHOLD, 256 << 20)
