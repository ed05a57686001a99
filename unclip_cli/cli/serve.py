"""`unclip serve`: OpenAI's Images API and a page at `/`, over the model set (`unclip_cli.serve`)."""

from __future__ import annotations

import os
from enum import Enum
from typing import Annotated, Optional

import typer

from unclip_cli.cli import app
from unclip_cli.cli.options import (DecoderStepsOpt, DeviceChoice, DeviceOpt, PrecisionOpt, PriorStepsOpt, QuietOpt,
                                    UpsamplerStepsOpt, WeightsOpt, resolve_weights)
from unclip_cli.errors import InputError, WeightsError

LogLevel = Enum("LogLevel", {v: v for v in ("warning", "info", "debug")}, type=str)

SERVE_EXAMPLES = """\
[b]Examples[/b]

  unclip serve                                   [dim]# http://127.0.0.1:8000/: the page; /v1: the API[/dim]
  UNCLIP_API_KEY=secret unclip serve --host 0.0.0.0 --port 8080
  unclip serve --max-queue 8 --timeout 120
  unclip serve --log-level info                  [dim]# a line per request (default: problems only)[/dim]

With the openai package: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret" or any text).
"""


@app.command("serve", epilog=SERVE_EXAMPLES)
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to listen on. Anything but a loopback address lets other "
                                                     "machines in: set an API key then.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on (0: any free port).")] = 8000,
    # -p is --prompt in the image commands; serve's old -p PORT still works, with a note
    old_port: Annotated[Optional[int], typer.Option("-p", hidden=True)] = None,
    weights: WeightsOpt = None,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="UNCLIP_API_KEY", show_default=False,
                                                   help="Require this key (Authorization: Bearer KEY) for the API.")] = None,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Requests that may wait while one runs; more are answered "
                                                               "503 with Retry-After.")] = 4,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds a job may run, from when it starts (its upload and its "
                                                             "wait in the queue not included); then it stops (504).")] = 600.0,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", help="Largest request body, its images included (413 "
                                                                         "above).")] = 20.0,
    device: DeviceOpt = DeviceChoice.auto,
    precision: PrecisionOpt = None,
    prior_steps: PriorStepsOpt = None,
    decoder_steps: DecoderStepsOpt = None,
    upsampler_steps: UpsamplerStepsOpt = None,
    quiet: QuietOpt = False,
    log_level: Annotated[LogLevel, typer.Option("--log-level", help="What the console shows: warning (problems only), info "
                                                                  "(one line per request, progress polls left out), debug (every "
                                                                  "request).")] = LogLevel.warning,
) -> None:
    """Serve OpenAI's Images API (generations, edits, variations) plus blend and nudge, and a page at /."""
    try:
        from unclip_cli.serve.app import Settings, create_app
        from unclip_cli.serve.server import bind, is_loopback, loopback_names, make_server, url_of
    except ImportError as e:
        raise InputError(f"unclip serve needs the serve extra ({e.name} is not installed)",
                         hint="pip install 'unclip-cli[serve]'") from None
    from rich.console import Console

    from unclip_cli.engine import Engine
    from unclip_cli.requests import GenerateRequest, check_number, check_whole

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if old_port is not None:
        err.print("Warning: `serve -p` is deprecated (-p is --prompt in the other commands): write --port", markup=False, style="yellow")
        port = old_port
    check_whole("--port", port, 0, 65535)
    check_whole("--max-queue", max_queue, 0, 1000)
    check_number("--timeout", timeout, 0, 7 * 24 * 3600, above=True)
    check_number("--max-upload-mb", max_upload_mb, 0, 4096, above=True)
    if api_key is not None and not api_key.strip():
        raise InputError("--api-key (or UNCLIP_API_KEY) is empty", hint="give a key, or leave both unset for no key")
    if api_key is not None and not all(" " <= c <= "~" for c in api_key.strip()):
        # HTTP headers carry ASCII: clients (the openai package, httpx, browsers) cannot send any other key.
        raise InputError("--api-key (or UNCLIP_API_KEY) must be printable ASCII (letters, digits, punctuation): clients cannot "
                         "send other characters in a header", hint="generate one, e.g. python -c 'import secrets; print(secrets.token_urlsafe())'")
    # click reads an empty variable as unset: say so, rather than start an open server that was meant to be keyed.
    unset_key = api_key is None and "UNCLIP_API_KEY" in os.environ
    steps = {k: v for k, v in {"prior_steps": prior_steps, "decoder_steps": decoder_steps, "upsampler_steps": upsampler_steps}.items()
             if v is not None}
    GenerateRequest(prompt="x", **steps).validated()  # the step options are checked as every command checks them

    weights_dir = resolve_weights(weights)
    try:  # the shipped set's files are named without its name, as the CLI's are
        shipped = weights_dir.resolve() == resolve_weights(None).resolve()
    except WeightsError:
        shipped = False
    engine = Engine.load(weights_dir, device=device.value, precision=precision.value if precision else "auto")
    sock = bind(host, port)
    loopback = is_loopback(sock)
    settings = Settings(api_key=api_key.strip() if api_key else None, max_queue=max_queue, timeout=timeout,
                        max_body_bytes=int(max_upload_mb * 2**20), steps=steps, allowed_hosts=loopback_names(sock) if loopback else None,
                        shipped=shipped)
    level = "warning" if quiet else log_level.value
    server = make_server(create_app(engine, settings), log_level=level, access_log=level != "warning")
    if level == "info":  # the page polls a job's progress about twice a second: one line per request, not per poll
        import logging

        logging.getLogger("uvicorn.access").addFilter(lambda record: "/v1/unclip/jobs/" not in str(record.args))
    url = url_of(sock)
    if unset_key:
        err.print("Warning: UNCLIP_API_KEY is set but empty: this server requires no API key", markup=False, style="yellow")
    if not loopback and settings.api_key is None:
        err.print(f"Warning: listening on {host} without an API key: anyone who can reach this machine can use it "
                  "(set --api-key or UNCLIP_API_KEY)", markup=False, style="yellow")
    err.print(f"Model {engine.name} ({engine.image_size}×{engine.image_size}) from {weights_dir} on {engine.device}", markup=False)
    err.print(f"Serving on {url}/ (the page) and {url}/v1 (the API); Ctrl-C stops", markup=False)
    server.run(sockets=[sock])
    if not server.started:
        raise InputError("the server did not start (see the messages above)")
    err.print("Stopped.", markup=False)
