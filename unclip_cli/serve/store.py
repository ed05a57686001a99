"""Images kept for `url` responses: in memory, under random ids, for an hour (as OpenAI's URLs last); and the
answers of jobs sent with `x-unclip-keep`, under the job's own id, for a client that went away (a reload) and comes back.

Nothing from a request reaches the file system: a request can only name an id, looked up in a dict.
The oldest items go first when `max_bytes` would be exceeded.
"""

from __future__ import annotations

import collections
import secrets
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Stored:
    data: bytes
    content_type: str
    expires: float  # time.monotonic()
    status: int = 200
    headers: dict = field(default_factory=dict)


class ImageStore:
    def __init__(self, ttl: float = 3600.0, max_bytes: int = 256 * 2**20):
        self.ttl, self.max_bytes = ttl, max_bytes
        self._items: collections.OrderedDict[str, Stored] = collections.OrderedDict()  # oldest first
        self._bytes = 0
        self._lock = threading.Lock()  # put() runs in encoding threads, get() on the event loop

    def put(self, data: bytes, content_type: str, extension: str = "", name: str | None = None, status: int = 200,
            headers: dict | None = None) -> str:
        """Keep an image (or an answer: `status`, `headers`); returns its name (`<random id>.<extension>` unless given)."""
        name = name or f"{secrets.token_urlsafe(18)}.{extension}"
        with self._lock:
            self._expire(time.monotonic())
            if name in self._items:
                self._drop(name)
            while self._items and self._bytes + len(data) > self.max_bytes:
                self._drop(next(iter(self._items)))
            self._items[name] = Stored(data, content_type, time.monotonic() + self.ttl, status, dict(headers or {}))
            self._bytes += len(data)
        return name

    def get(self, name: str) -> Stored | None:
        with self._lock:
            self._expire(time.monotonic())
            return self._items.get(name)

    def pop(self, name: str) -> Stored | None:
        with self._lock:
            item = self._items.get(name)
            if item is not None:
                self._drop(name)
            return item

    def __len__(self) -> int:
        return len(self._items)

    def _expire(self, now: float) -> None:
        while self._items:
            name, item = next(iter(self._items.items()))
            if item.expires > now:
                break
            self._drop(name)

    def _drop(self, name: str) -> None:
        self._bytes -= len(self._items.pop(name).data)
