"""Engines a test holds, for the server's and the page's tests of jobs that run while the test looks at them."""

from __future__ import annotations

import threading

from unclip_cli.progress import Tick
from unclip_cli.serve.worker import Cancelled


class HeldEngine:
    """The tiny engine behind a gate: a job reports sampler steps until the test opens the gate (then it
    runs for real) or the server cancels it (the Cancelled raised by the callback is recorded)."""

    def __init__(self, engine):
        self.engine = engine
        self.gate, self.started, self.stopped = threading.Event(), threading.Event(), threading.Event()
        self.reasons: list[str] = []
        self.runs = 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def run(self, request, callback=None):
        self.runs += 1
        self.started.set()
        try:
            while not self.gate.wait(0.01):  # one "sampler step" every 10 ms
                callback(Tick("decoder", 1, 2))
        except Cancelled as c:
            self.reasons.append(c.reason)
            self.stopped.set()
            raise
        return self.engine.run(request, callback)


class HeldAtFirstStep(HeldEngine):
    """The tiny engine held at its first sampler step, after what it hands the server before sampling (its warnings)."""

    def run(self, request, callback=None):
        def held(event):
            callback(event)
            if isinstance(event, Tick) and not self.gate.is_set():
                self.started.set()
                while not self.gate.wait(0.01):
                    callback(event)

        return self.engine.run(request, held)
