"""Running the app under uvicorn: binding, stop signals, and a server in a thread for tests and benchmarks.

We bind the listening socket ourselves, so that the address is known (and an error reported) before the
server starts, `--port 0` picks a free port, and a test's requests wait in the socket's backlog rather
than racing the start-up. On SIGINT or SIGTERM the worker stops first (queued jobs are answered 503 and the
running one stops at its next sampler step), so uvicorn's graceful shutdown has nothing long to wait for.
"""

from __future__ import annotations

import contextlib
import copy
import ipaddress
import logging
import signal
import socket
import threading
from typing import Iterator

import uvicorn

from unclip_cli.errors import InputError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one), or an InputError saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise InputError(f"cannot listen on {host!r}: {getattr(e, 'strerror', None) or e}",
                         hint="use an address such as 127.0.0.1") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror or e})",
                         hint="pick another --port, or stop what is using this one") from None
    sock.set_inheritable(True)
    return sock


def is_loopback(sock: socket.socket) -> bool:
    return ipaddress.ip_address(sock.getsockname()[0].split("%")[0]).is_loopback


def loopback_names(sock: socket.socket) -> tuple[str, ...]:
    """The Host names a loopback server answers: the usual loopback names and the address it is bound to (any
    of 127.0.0.0/8 is loopback; `--host 127.0.0.2` must answer its own URL)."""
    bound = sock.getsockname()[0].split("%")[0].lower()
    return tuple(dict.fromkeys(("127.0.0.1", "localhost", "::1", bound)))


class HideQuery(logging.Filter):
    """The access log shows paths without their query strings: a client may put a key there (`?api_key=`)
    and the log must not keep it. The API itself reads nothing from query strings."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0] + "?[query hidden]", *args[3:])
        return True


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


class Server(uvicorn.Server):
    """uvicorn's server that stops the app's worker as soon as a stop signal arrives, and records it
    (`stopped_by`) instead of raising it again once shut down."""

    def __init__(self, config: uvicorn.Config, worker=None):
        super().__init__(config)
        self.worker = worker
        self.stopped_by: int | None = None

    def handle_exit(self, sig: int, frame) -> None:
        self.stopped_by = sig
        if self.worker is not None:
            self.worker.stop_soon()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        before = {sig: signal.signal(sig, self.handle_exit) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)


def make_server(app, *, log_level: str = "info", access_log: bool = True) -> Server:
    from uvicorn.config import LOGGING_CONFIG

    logging_config = copy.deepcopy(LOGGING_CONFIG)
    for handler in logging_config.get("handlers", {}).values():
        if "stream" in handler:
            handler["stream"] = "ext://sys.stderr"  # logs on stderr, as every command's notes; stdout stays empty
    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, log_config=logging_config, lifespan="on",
                            timeout_graceful_shutdown=10, server_header=False)
    access = logging.getLogger("uvicorn.access")  # configured by uvicorn.Config above
    if not any(isinstance(f, HideQuery) for f in access.filters):
        access.addFilter(HideQuery())
    return Server(config, worker=getattr(app.state, "worker", None))


@contextlib.contextmanager
def running(app, host: str = "127.0.0.1", **kw) -> Iterator[tuple[str, Server]]:
    """Serve `app` on host at a free port in a background thread: yields (base URL, server), then stops it.
    Requests made at once wait in the socket's backlog until the server is up."""
    sock = bind(host, 0)
    server = make_server(app, log_level=kw.pop("log_level", "warning"), access_log=kw.pop("access_log", False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="unclip-serve", daemon=True)
    thread.start()
    try:
        yield url_of(sock), server
    finally:
        server.should_exit = True
        if server.worker is not None:
            server.worker.stop_soon()
        thread.join(30)
        sock.close()
