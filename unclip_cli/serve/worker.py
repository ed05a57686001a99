"""The one thread that runs the engine, fed by a bounded queue.

The event loop submits a job and awaits its asyncio future; the worker thread runs jobs one at a time
and settles each future through the loop (`call_soon_threadsafe`), so the loop never waits on the model.
A job stops between sampler steps when it is cancelled (its client went away, the server is stopping) or
its deadline passes: the engine's progress callback raises `Cancelled`, and the engine lets it through.

    worker = Worker(engine, max_queue=4)
    worker.start()                                   # on the event loop
    job = worker.submit(request, timeout=600)        # or Busy; the 600 s count from when the job starts running
    result = await job.future                        # engine Result, or Cancelled / another exception
    worker.stop(); worker.join()
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from unclip_cli.progress import Tick, Warnings

log = logging.getLogger("unclip.serve")
MAX_SEGMENTS = 2000  # measured stage runs kept per job (compose: 5 priors + 4 decoders + upsampler a batch, 10 batches: 110)
TIMINGS_KEPT = 4  # finished jobs' step times kept per operation (the newest of each quality and image count), for `last_timing`
TIMING_SEGMENTS = 256  # of each such job, its first stage runs: the first batch of every phase and every stage's pace


class Cancelled(Exception):
    """A job stopped before it finished: `reason` is "disconnected", "stopped" (by its client, by id), "deadline" or
    "shutdown"."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Busy(Exception):
    """The queue is full (or the server is stopping): try again after `retry_after` seconds."""

    def __init__(self, retry_after: int, stopping: bool = False):
        super().__init__("busy")
        self.retry_after, self.stopping = retry_after, stopping


@dataclass(eq=False)
class Job:
    request: Any
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    timeout: float | None = None  # seconds the job may run once it starts (its wait in the queue is not its time)
    deadline: float | None = None  # time.monotonic(), set when it starts
    id: str | None = None
    state: str = "queued"  # queued | running | done
    tick: Tick | None = None
    warnings: tuple[str, ...] = ()  # what the engine warned of before sampling (its `Warnings`), shown by the status at once
    # The job's measured step times, for the page's estimate of the time left: one entry per run of a stage (a stage
    # starts again in each batch, and mix and compose run the prior once per text), in order, each
    # (stage, total, batch, batches, steps done, seconds, seconds of its first step, the batch's images or 0 if not said).
    # The seconds since the previous tick
    # (or the job's start) count to the tick's stage: work between stages (encoding a text, resizing) goes to the stage
    # that follows it, in its first step, which is also the slow one of a cold stage (memory first touched): apart, so that
    # the page's estimate of the steps left reads the steady pace.
    segments: list = field(default_factory=list)
    last_tick: float | None = None  # time.monotonic() of the latest tick, or of the job's start
    cancel_reason: str | None = None
    _cancel: threading.Event = field(default_factory=threading.Event)

    def cancel(self, reason: str) -> None:
        """Stop the job: skipped if still queued, stopped at its next sampler step if running."""
        if self.cancel_reason is None:
            self.cancel_reason = reason
        self._cancel.set()

    def check(self, tick: Tick | Warnings | None = None) -> None:
        """The engine's progress callback: records progress and warnings and raises Cancelled when the job must stop."""
        if isinstance(tick, Warnings):
            self.warnings = tuple(dict.fromkeys(self.warnings + tick.lines))
        elif tick is not None:
            self.tick = tick
            self._measure(tick)
        if self._cancel.is_set():
            raise Cancelled(self.cancel_reason or "shutdown")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise Cancelled("deadline")

    def _measure(self, tick: Tick) -> None:
        now = time.monotonic()
        seconds = now - (self.last_tick if self.last_tick is not None else now)
        self.last_tick = now
        last = self.segments[-1] if self.segments else None
        if last is not None and last[:4] == (tick.stage, tick.total, tick.batch, tick.batches) and tick.step >= last[4]:
            self.segments[-1] = (*last[:4], tick.step, last[5] + seconds, *last[6:])  # one assignment: status() may read it meanwhile
        elif len(self.segments) < MAX_SEGMENTS:
            self.segments.append((tick.stage, tick.total, tick.batch, tick.batches, tick.step, seconds, seconds, tick.size))

    def timing(self) -> dict:
        """The measured segments and the seconds since the latest tick (part of a step that is still running)."""
        since = 0.0 if self.last_tick is None else time.monotonic() - self.last_tick
        return {"segments": [[*s[:5], round(s[5], 4), round(s[6], 4), s[7]] for s in list(self.segments)], "since_tick": round(since, 4)}

    def settle(self, outcome: Any) -> None:
        """Hand the outcome (a result or an exception) to the awaiting handler, from any thread."""

        def put() -> None:
            if self.future.done():  # the handler gave up waiting
                return
            if isinstance(outcome, BaseException):
                self.future.set_exception(outcome)
            else:
                self.future.set_result(outcome)

        self.state = "done"
        try:
            self.loop.call_soon_threadsafe(put)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


class Worker:
    """Runs `engine.run(request, callback)` for one job at a time on its own thread. At most `max_queue`
    jobs wait while one runs; `submit` raises Busy beyond that."""

    def __init__(self, engine, max_queue: int = 4):
        if max_queue < 0:
            raise ValueError("max_queue must be at least 0")
        self.engine, self.max_queue = engine, max_queue
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._by_id: dict[str, Job] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._seconds_per_job = 5.0  # a running mean of job times, for Retry-After; a guess until the first job
        self._timings: dict[str, list[dict]] = {}  # op -> its last finished jobs' {quality, n, segments}, newest first
        self.stopping = asyncio.Event()  # set on the event loop once `stop` is called: requests still being read give up

    # -- the event loop's side ---------------------------------------------------------------------
    def start(self) -> None:
        """Start the thread; call on the event loop that will await the jobs."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._serve, name="unclip-engine", daemon=True)
        self._thread.start()

    def room(self) -> Busy | None:
        """None if a job would be taken now, else the Busy that `submit` would raise."""
        with self._cond:
            pending = len(self._waiting) + (self._running is not None)
            if self._stopping or pending > self.max_queue:
                return Busy(self.retry_after(), stopping=self._stopping)
        return None

    def submit(self, request, timeout: float | None = None, job_id: str | None = None) -> Job:
        loop = asyncio.get_running_loop()
        with self._cond:
            full = self.room()
            if full is not None:
                raise full
            if job_id in self._by_id:  # ids are the client's: a clash gets no progress reports rather than another's
                job_id = None
            job = Job(request, loop.create_future(), loop, timeout=timeout, id=job_id)
            self._waiting.append(job)
            if job_id is not None:
                self._by_id[job_id] = job
            self._cond.notify()
        return job

    def withdraw(self, job: Job, reason: str) -> None:
        """Cancel a job: a queued one leaves the queue at once (its place is free), a running one stops
        at its next sampler step."""
        job.cancel(reason)
        # Nobody awaits the job's outcome any more: take it when it comes, so that asyncio does not log it as lost.
        job.future.add_done_callback(lambda f: f.cancelled() or f.exception())
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                self._forget(job)
                job.settle(Cancelled(reason))

    def withdraw_id(self, job_id: str, reason: str) -> bool:
        """`withdraw` the job sent with this id; False if there is none (not arrived yet, or over)."""
        with self._cond:
            job = self._by_id.get(job_id)
        if job is not None:
            self.withdraw(job, reason)
        return job is not None

    def retry_after(self) -> int:
        """Seconds until a place in the queue is likely to be free: when the running job ends."""
        return max(1, math.ceil(self._seconds_per_job))

    def status(self, job_id: str) -> dict | None:
        """What a job is doing: queued (and its place), running (and its progress), or None if unknown."""
        with self._cond:
            job = self._by_id.get(job_id)
            if job is None:
                return None
            if job.state == "queued":
                return {"status": "queued", "position": next((i + 1 for i, j in enumerate(self._waiting) if j is job), 0)}
            t = job.tick
            progress = {"stage": t.stage, "step": t.step, "total": t.total, "batch": t.batch, "batches": t.batches} if t else {}
            warned = {"warnings": list(job.warnings)} if job.warnings else {}
            return {"status": job.state, **progress, **warned, **(job.timing() if job.state == "running" else {})}

    def last_timing(self, op: str, quality: str | None = None, n: int | None = None) -> dict | None:
        """The step times this server measured in its last finished job of `op` ({quality, n, segments}), of the same
        quality and image count if it ran one, else of the same quality, else any; None before the first. A page's
        estimate of the time left reads the stages its own job has not reached from them."""
        with self._cond:
            kept = list(self._timings.get(op, ()))
        return (next((t for t in kept if t["quality"] == quality and t["n"] == n), None)
                or next((t for t in kept if t["quality"] == quality), None) or (kept[0] if kept else None))

    def _keep_timing(self, job: Job) -> None:
        op, quality, n = (getattr(job.request, k, None) for k in ("op", "quality", "count"))
        if not isinstance(op, str) or not job.segments:
            return
        timing = {"quality": quality, "n": n, "segments": job.timing()["segments"][:TIMING_SEGMENTS]}
        with self._cond:
            others = [t for t in self._timings.get(op, ()) if (t["quality"], t["n"]) != (quality, n)]
            self._timings[op] = [timing, *others][:TIMINGS_KEPT]

    def counts(self) -> dict:
        with self._cond:
            return {"running": int(self._running is not None), "queued": len(self._waiting), "max_queue": self.max_queue}

    def stop(self) -> None:
        """Stop taking jobs, fail the queued ones and stop the running one at its next step (Cancelled
        "shutdown"). Thread-safe, but not from a signal handler: use `stop_soon` there."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.stopping.set)
        with self._cond:
            self._stopping = True
            while self._waiting:
                job = self._waiting.popleft()
                job.cancel("shutdown")
                self._forget(job)
                job.settle(Cancelled("shutdown"))
            if self._running is not None:
                self._running.cancel("shutdown")
            self._cond.notify_all()

    def stop_soon(self) -> None:
        """`stop` from anywhere, a signal handler included (it runs on the event loop)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.stop)
        else:
            self.stop()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    # -- the worker thread -------------------------------------------------------------------------
    def _forget(self, job: Job) -> None:
        if job.id is not None and self._by_id.get(job.id) is job:
            del self._by_id[job.id]

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._waiting:
                    return
                job = self._waiting.popleft()
                self._running = job
                job.state = "running"
            started = time.monotonic()
            job.last_tick = started
            if job.timeout is not None:
                job.deadline = started + job.timeout
            try:
                job.check()  # cancelled or out of time while it waited
                outcome = self.engine.run(job.request, callback=job.check)
            except Exception as e:  # every outcome goes to the handler, which answers for it
                outcome = e
                if not isinstance(e, Cancelled):
                    log.debug("job failed", exc_info=True)
            seconds = time.monotonic() - started
            with self._cond:
                self._running = None
                self._forget(job)
                if not isinstance(outcome, Cancelled):
                    self._seconds_per_job = 0.7 * self._seconds_per_job + 0.3 * seconds
            if not isinstance(outcome, Exception):  # a job cut short would say its later stages take no time
                self._keep_timing(job)
            job.settle(outcome)
