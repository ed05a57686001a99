"""The web app: OpenAI's Images API (and two endpoints of our own) over one engine, and the page at `/`.

`create_app(engine, settings)` builds it; handlers translate and do not decide: a body becomes API fields,
`api.prepare` turns them into a validated unclip request (in a thread: it decodes images), the worker
runs it on the engine's thread, and `api.encode` turns the result into OpenAI's response (in a thread: it
encodes images). The event loop only reads bodies, waits and answers.

Routes (all under /v1 need the API key when one is set, as `Authorization: Bearer KEY`):

    GET  /                          the page (one static file; it uses the API below)
    GET  /v1/models, /v1/models/ID  the loaded model set, as OpenAI lists models
    POST /v1/images/generations     JSON: prompt, n, size, quality, response_format, seed, ...
    POST /v1/images/edits           multipart: image (or image[]), mask, prompt, n, size, ...
    POST /v1/images/variations      multipart: image, n, size, strength, ...
    POST /v1/unclip/blend           multipart: image[] twice (or image_a, image_b), frames, ...
    POST /v1/unclip/nudge           multipart: image, to, from, amount, n, ...
    POST /v1/unclip/mix             multipart: image[] (0-8), prompt[] (repeated), weights "0.5,0.3,0.2", n, ...
    POST /v1/unclip/compose         JSON: prompt and/or objects [{prompt, box}], background_prompt, method, n, ...
    GET  /v1/unclip/jobs/ID         a job's place in the queue or its progress and measured step times (ID: the x-unclip-job
                                    header it was sent with, 16-64 of A-Z a-z 0-9 _ -, chosen at random so that no other
                                    client can guess it; "unknown" before it is queued and once it is over; the job's
                                    answer carries its step times in x-unclip-timing). A job also sent with
                                    `x-unclip-keep: 1` runs on when its client goes away (the page was reloaded), and
                                    its answer is kept too ("done") until fetched, deleted, or an hour has passed. A
                                    running job's "warnings" (what x-unclip-warnings will say) are there before its first step
    GET  /v1/unclip/jobs/ID/answer  that kept answer, as the job's request had it (fetching it forgets it)
    DELETE /v1/unclip/jobs/ID       stop a job (queued or running; its request is answered 499 job_stopped), or forget
                                    its kept answer: {"status": "stopped", "forgotten" or "unknown" (nothing to do)}
    GET  /v1/unclip/timing?op=OP&quality=Q&n=N  the step times this server measured in its last finished job of OP (of
                                    that quality and image count if it ran one): {"quality", "n", "segments"}, segments
                                    as the job status has them, or null before the first; the page's time left reads
                                    the stages its job has not reached from them
    POST /v1/unclip/check           multipart: image: {"warnings": [...]}, what a job with that image would warn of it (an image
                                    far from what the set was trained on), as the engine says it; the page asks when one is loaded
    GET  /v1/unclip/layout?prompt=P where compose puts the objects of the sentence P: {"objects": [{"prompt", "box"}]}, as
                                    `unclip compose P` reads it (the page previews them while the sentence is typed)
    GET  /v1/unclip/concepts?q=Q    the concepts the set was trained on that match Q, as `unclip concepts Q --json`
                                    (&limit=N, default 20, 0: all)
    GET  /v1/images/files/NAME      an image of a `url` response (no key needed: NAME is a random id), kept an hour

Errors are OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 bad input, 401 wrong or
missing key, 403 another origin or host, 404 (a trailing slash too: nothing is redirected), 413 body too
large, 503 queue full or stopping (with Retry-After), 504 a job that ran past the server's limit (the
message says how far it got), 500 a fault (with `x-should-retry: false`, so that clients do not repeat a
costly job).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from importlib import resources
from urllib.parse import urlsplit

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from unclip_cli.errors import InputError, UnclipError
from unclip_cli.serve import api
from unclip_cli.serve.store import ImageStore
from unclip_cli.serve.worker import Busy, Cancelled, Worker

log = logging.getLogger("unclip.serve")

FORM_CHUNK = 256 * 2**10  # a buffered form is parsed in pieces of this size, the event loop free between them
DRAIN_BYTES = 16 * 2**20  # of a body over the limit, read (and dropped) before answering 413, so the client sees the answer
MAX_FIELD_BYTES = 64 * 2**10  # a text field of a form (a prompt is at most 4,000 characters)
TIMING_HEADER_SEGMENTS = 256  # stage runs in x-unclip-timing (about 30 bytes each)
KEPT_BYTES = 64 * 2**20  # answers of `x-unclip-keep` jobs, kept until fetched or deleted (the oldest dropped beyond this)
ANSWER_HEADERS = ("x-unclip-warnings", "x-unclip-names", "x-unclip-timing", "x-unclip-seed", "retry-after", "x-should-retry")  # kept with an answer
JOB_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")  # 16 random characters of these are 96 bits: not guessable
# A Host header: a name or an IPv4 address, or an IPv6 address in brackets, then an optional port. Nothing else
# (userinfo such as "127.0.0.1:1@evil.example", paths, spaces) may pass the host check.
HOST = re.compile(r"(?P<name>[a-z0-9_.-]+|\[[0-9a-f:.]+(?:%[a-z0-9._-]+)?\])(?::(?P<port>[0-9]{1,5}))?")
PAGE_HEADERS = {
    # The page is one file: nothing may come from elsewhere, and it may only talk to this server.
    "content-security-policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data: blob:; "
                               "connect-src 'self' blob:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


@dataclass
class Settings:
    """The server's policy; every limit a request cannot change."""

    api_key: str | None = None
    max_queue: int = 4  # jobs waiting while one runs; more are answered 503
    timeout: float = 600.0  # seconds a job may run, from when it starts (reading its upload and its wait in the queue excluded)
    max_body_bytes: int = 20 * 2**20  # a whole request body, its files included
    max_pixels: int = 4096 * 4096  # per uploaded image, read from its header before decoding
    max_output_pixels: int = 4096 * 4096  # n x the pixels of each image a request returns (10 at 1024x1024 fit)
    max_files: int = 4
    max_fields: int = 32
    url_ttl: float = 3600.0
    store_bytes: int = 256 * 2**20  # images kept for url responses, at most
    steps: dict = field(default_factory=dict)  # prior_steps / decoder_steps / upsampler_steps overriding every request's quality
    allowed_hosts: tuple[str, ...] | None = None  # Host header names answered (None: any); a loopback bind answers loopback names only
    shipped: bool = False  # the engine's set is the shipped one: file names (x-unclip-names) leave its name out, as the CLI's do


def create_app(engine, settings: Settings | None = None) -> Starlette:
    """The app over `engine` (anything with `run(request, callback)`, `name` and `image_size`)."""
    settings = settings or Settings()
    worker = Worker(engine, max_queue=settings.max_queue)
    store = ImageStore(ttl=settings.url_ttl, max_bytes=settings.store_bytes)
    kept = ImageStore(ttl=settings.url_ttl, max_bytes=KEPT_BYTES)  # answers of `x-unclip-keep` jobs, for a client that left
    keeping: dict[str, str] = {}  # such a job's id -> "preparing" (read, not queued yet) or "finishing" (run, being encoded)
    native = engine.image_size
    created = int(time.time())
    limiter = anyio.CapacityLimiter(2)  # threads decoding uploads and encoding results, beside the engine's
    page = resources.files("unclip_cli.serve").joinpath("page.html").read_text(encoding="utf-8")

    # -- checks every /v1 request passes -------------------------------------------------------------
    def guard(request: Request, key: bool = True) -> None:
        host = request.headers.get("host", "")
        if (host or settings.allowed_hosts is not None) and _hostname(host) is None:
            raise api.ApiError(403, f"the Host header {host[:100]!r} is not a host name and port", code="forbidden_host")
        if settings.allowed_hosts is not None and _hostname(host) not in settings.allowed_hosts:
            raise api.ApiError(403, f"this server answers requests for {', '.join(settings.allowed_hosts)} only, not {host!r}",
                               code="forbidden_host")
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc.lower() != host.lower():
            raise api.ApiError(403, "requests from other origins are refused (this server allows no CORS)", code="cross_origin")
        if key and settings.api_key is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not given.strip():
                raise api.ApiError(401, "no API key was given: send it as the header 'Authorization: Bearer KEY'",
                                   code="invalid_api_key")
            if not secrets.compare_digest(given.strip().encode(), settings.api_key.encode()):
                raise api.ApiError(401, "incorrect API key provided", code="invalid_api_key")

    # -- bodies ---------------------------------------------------------------------------------------
    async def read_body(request: Request, limit: int) -> bytes:
        """The body, or a 503 as soon as the server is stopping (a slow upload must not hold the shutdown up)."""
        reading = asyncio.ensure_future(_read_body(request, limit))
        stopping = asyncio.ensure_future(worker.stopping.wait())
        try:
            await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not reading.done():
                reading.cancel()
        if reading.cancelled() or not reading.done():
            busy(Busy(worker.retry_after(), stopping=True))
        return reading.result()

    async def _read_body(request: Request, limit: int) -> bytes:
        declared = request.headers.get("content-length", "")
        over = declared.isdigit() and int(declared) > limit
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                over = over or size > limit
                if not over:
                    chunks.append(chunk)
                elif size > limit + DRAIN_BYTES:
                    break
        except ClientDisconnect:
            raise api.ApiError(400, "the client went away while sending the request") from None
        if over:
            raise api.ApiError(413, f"the request body is larger than this server's limit of {_mib(limit)}",
                               code="request_too_large")
        return b"".join(chunks)

    async def json_fields(request: Request) -> api.Fields:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json" and not kind.endswith("+json"):
            raise api.ApiError(400, "send the request as JSON, with the header 'Content-Type: application/json'",
                               code="invalid_content_type")
        body = await read_body(request, min(settings.max_body_bytes, 2**20))
        try:
            values = json.loads(body)
        except (ValueError, RecursionError):
            raise api.ApiError(400, "the body is not valid JSON", code="invalid_json") from None
        if not isinstance(values, dict):
            raise api.ApiError(400, "the body must be a JSON object", code="invalid_json")
        return api.Fields(values)

    async def form_fields(request: Request) -> api.Fields:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "multipart/form-data":
            raise api.ApiError(400, "send the request as multipart/form-data (images as file parts)", code="invalid_content_type")
        body = await read_body(request, settings.max_body_bytes)
        offset = 0

        async def replay():  # the body as read, in pieces, then the connection's own messages (a disconnect)
            nonlocal offset
            if offset <= len(body):
                await asyncio.sleep(0)  # let other requests in between pieces
                piece, offset = body[offset:offset + FORM_CHUNK], offset + FORM_CHUNK
                return {"type": "http.request", "body": piece, "more_body": offset < len(body)}
            return await request.receive()

        try:
            form = await Request(request.scope, replay).form(max_files=settings.max_files, max_fields=settings.max_fields,
                                                              max_part_size=MAX_FIELD_BYTES)
        except HTTPException as e:
            raise api.ApiError(400, f"the multipart form could not be read: {e.detail}", code="invalid_form") from None
        values: dict = {}
        files: dict[str, list[bytes]] = {}
        try:
            for name, value in form.multi_items():
                if isinstance(value, str) and name.endswith("[]"):  # a list field (mix's prompt[]), every value kept
                    values.setdefault(name, []).append(value)
                elif isinstance(value, str):
                    values[name] = value
                else:
                    files.setdefault(name, []).append(api.upload(await value.read(), value.filename))
        finally:
            await form.close()
        return api.Fields(values, files, form=True)

    # -- running a job ------------------------------------------------------------------------------
    async def run(request: Request, req, job_id: str | None, gone: asyncio.Future, keep: bool):
        """Run a request on the worker: its result and job. A client that goes away stops the job, unless it asked
        to `keep` it: then the job runs to its end and its answer is kept for the client's return."""
        try:
            job = worker.submit(req, timeout=settings.timeout, job_id=job_id)
        except Busy as b:
            busy(b)
        try:
            await asyncio.wait({job.future, gone}, return_when=asyncio.FIRST_COMPLETED)
            if keep:
                await asyncio.wait({job.future})
        except asyncio.CancelledError:
            worker.withdraw(job, "shutdown")
            raise
        if not job.future.done():
            worker.withdraw(job, "disconnected")
            raise api.ApiError(499, "the client closed the request; its job was stopped", code="client_closed_request")
        try:
            return job.future.result(), job
        except Cancelled as c:
            raise _cancelled(c, settings, worker, job) from None
        except InputError as e:  # found by the engine itself (a nudge whose two texts mean the same)
            raise api.input_error(e, ["prompt", "to", "from", "image"]) from None
        except UnclipError as e:
            raise api.ApiError(500, str(e), code="model_error") from None
        except Exception as e:
            log.error("the engine failed on %s %s", request.method, request.url.path, exc_info=e)
            if isinstance(e, MemoryError) or "out of memory" in str(e).lower():
                raise api.ApiError(500, "the server ran out of memory running the model: ask for fewer images (n) or a lower "
                                        "quality", code="out_of_memory") from None
            raise api.ApiError(500, f"the model run failed ({type(e).__name__}); the server's log has the details",
                               code="internal_error") from None

    async def images(request: Request, op: str) -> Response:
        guard(request)
        job_id = request.headers.get("x-unclip-job")
        if job_id is not None and not JOB_ID.fullmatch(job_id):
            raise api.ApiError(400, "the x-unclip-job header must be 16-64 letters, digits, '-' or '_', chosen at random (such as "
                                    "22 random base64url characters): another client could guess a shorter or predictable id "
                                    "and read the job's progress", code="invalid_job_id")
        keep = request.headers.get("x-unclip-keep") == "1" and job_id is not None and job_id not in keeping
        fields = await (json_fields(request) if op in api.JSON_OPS else form_fields(request))
        busy(worker.room())  # a full queue is answered before any image is decoded
        gone = asyncio.ensure_future(_disconnected(request))
        if keep:
            keeping[job_id] = "preparing"
        try:
            response = await answer_job(request, op, fields, job_id, gone, keep)
        except api.ApiError as e:
            if keep and e.code != "job_stopped":
                keep_answer(job_id, error_response(e))
            raise
        else:  # kept whether or not the client is still there: it may be going away (a reload) as the answer leaves
            if keep:
                keep_answer(job_id, response)
            return response
        finally:
            gone.cancel()
            if keep:
                keeping.pop(job_id, None)

    def keep_answer(job_id: str, response: Response) -> None:
        headers = {k: v for k, v in response.headers.items() if k in ANSWER_HEADERS}
        kept.put(response.body, response.media_type or "application/json", name=job_id, status=response.status_code, headers=headers)

    async def answer_job(request: Request, op: str, fields: api.Fields, job_id: str | None, gone: asyncio.Future, keep: bool) -> Response:
        planned = await anyio.to_thread.run_sync(api.prepare, op, fields, native, settings.steps, settings.max_pixels,
                                                 settings.max_output_pixels, limiter=limiter)
        if keep and keeping.get(job_id) == "stopped":  # stopped (DELETE) while its images were read
            raise api.ApiError(499, "the job was stopped (DELETE /v1/unclip/jobs/ID)", code="job_stopped")
        result, job = await run(request, planned.request, job_id, gone, keep)
        if keep:
            keeping[job_id] = "finishing"
        files = str(request.url_for("image_file", name="-"))[:-1]

        def respond() -> tuple[bytes, list[str]]:  # encoding images and base64 takes a while: not on the event loop
            encoded = api.encode(result.images, result.recipes, planned.output)
            body = api.images_response(encoded, planned.output, lambda e: files + store.put(e.data, e.content_type, e.extension))
            try:
                names = _file_names(planned.request, engine, settings.shipped, result.recipes, planned.output)
            except Exception:  # a fault in naming must not lose a finished job's images: they go without names
                log.error("could not name the images of %s", op, exc_info=True)
                names = []
            return json.dumps(body).encode(), names

        headers = {api.NATIVE_SIZE_HEADER: f"{native}x{native}", "x-unclip-seed": str(planned.request.seed)}
        if result.warnings:
            headers["x-unclip-warnings"] = json.dumps(result.warnings, ensure_ascii=True)
        if job_id is not None:  # the job's measured step times, for the page's estimate of the next job's time left: its
            # first TIMING_HEADER_SEGMENTS stage runs (a few KB), which hold the first batch of every phase and every stage's speed
            segments = job.timing()["segments"][:TIMING_HEADER_SEGMENTS]
            headers["x-unclip-timing"] = json.dumps(segments, ensure_ascii=True, separators=(",", ":"))
        body, names = await anyio.to_thread.run_sync(respond, limiter=limiter)
        headers["x-unclip-names"] = json.dumps(names, ensure_ascii=True)
        return Response(body, media_type="application/json", headers=headers)

    def busy(b: Busy | None) -> None:
        if b is None:
            return
        if b.stopping:
            raise api.ApiError(503, "the server is shutting down", code="server_shutting_down", headers={"retry-after": str(b.retry_after)})
        raise api.ApiError(503, f"the server is busy: {worker.max_queue} job(s) are already waiting; try again in {b.retry_after} s",
                           code="server_busy", headers={"retry-after": str(b.retry_after)})

    # -- endpoints ------------------------------------------------------------------------------------
    def endpoint(fn):
        """A handler whose ApiErrors become OpenAI-shaped answers."""

        async def handle(request: Request) -> Response:
            try:
                return await fn(request)
            except api.ApiError as e:
                return error_response(e)

        return handle

    def model_entry() -> dict:
        return {"id": engine.name, "object": "model", "created": created, "owned_by": "unclip"}

    async def list_models(request: Request) -> Response:
        guard(request)
        return JSONResponse({"object": "list", "data": [model_entry()]})

    async def get_model(request: Request) -> Response:
        guard(request)
        if request.path_params["model"] != engine.name:
            raise api.ApiError(404, f"the model {request.path_params['model']!r} does not exist; this server has {engine.name!r}",
                               param="model", code="model_not_found")
        return JSONResponse(model_entry())

    async def job_status(request: Request) -> Response:
        guard(request)
        # An unknown job has not arrived yet (its upload is still being read) or is over: not an error.
        job_id = request.path_params["job"]
        status = worker.status(job_id) or ({"status": keeping[job_id]} if job_id in keeping else None) or (
            {"status": "done"} if kept.get(job_id) is not None else {"status": "unknown"})
        return JSONResponse({"id": job_id, **status, **worker.counts()})

    async def job_answer(request: Request) -> Response:
        guard(request)
        item = kept.pop(request.path_params["job"])
        if item is None:
            raise api.ApiError(404, "no answer is kept for this job: it is still running, was never sent with x-unclip-keep, "
                                    "was fetched already, or the server was restarted", code="job_not_found")
        return Response(item.data, status_code=item.status, media_type=item.content_type, headers=item.headers)

    async def stop_job(request: Request) -> Response:
        guard(request)
        job_id = request.path_params["job"]
        stopped, forgotten = worker.withdraw_id(job_id, "stopped"), kept.pop(job_id) is not None
        if keeping.get(job_id) == "preparing":  # read, not queued yet: it stops before it starts
            keeping[job_id] = stopped = "stopped"
        # Nothing to stop or forget (over, fetched, never sent, or the server restarted) is no error: the outcome is the same.
        return JSONResponse({"id": job_id, "status": "stopped" if stopped else "forgotten" if forgotten else "unknown"})

    async def last_timing(request: Request) -> Response:
        guard(request)
        q = request.query_params
        op, quality, n = q.get("op", ""), q.get("quality"), q.get("n")
        if op not in api.PLANS:
            raise api.ApiError(400, f"op must be one of {', '.join(api.PLANS)}, not {api.shown(op[:40])}", param="op", code="invalid_value")
        if quality is not None and quality not in api.API_QUALITY:
            raise api.ApiError(400, f"quality must be one of {', '.join(api.API_QUALITY)}, not {api.shown(quality[:40])}", param="quality",
                               code="invalid_value")
        if n is not None and not (n.isdigit() and len(n) <= 3):
            raise api.ApiError(400, f"n must be a whole number, not {api.shown(n[:40])}", param="n", code="invalid_value")
        found = worker.last_timing(op, api.API_QUALITY.get(quality), None if n is None else int(n))
        return JSONResponse({"op": op, "quality": None, "n": None, "segments": None, **(found or {})})

    async def check_image(request: Request) -> Response:
        """What a job with this image would warn of it, before any job: the engine's own test (`domain.image_warning`)."""
        guard(request)
        fields = await form_fields(request)
        if not fields.files.get("image"):
            raise api.ApiError(400, "send the image to check as the file part `image`", param="image", code="missing_image")

        def check() -> list[str]:
            from unclip_cli.domain import image_warning
            from unclip_cli.requests import source_name

            req = api.prepare("vary", api.Fields({}, {"image": fields.files["image"][:1]}, form=True), native, settings.steps,
                              settings.max_pixels).request
            domain = getattr(engine, "domain", None)
            found = list(req.inputs().warnings) + ([image_warning(domain, source_name(src), im)
                                                    for src, im in zip(req.sources(), req.inputs().images)] if domain else [])
            return list(dict.fromkeys(w for w in found if w))

        try:
            warnings = await anyio.to_thread.run_sync(check, limiter=limiter)
        except InputError as e:
            raise api.input_error(e, ["image"]) from None
        return JSONResponse({"warnings": warnings})

    async def layout(request: Request) -> Response:
        guard(request)
        from unclip_cli.layout import parse
        from unclip_cli.requests import check_text

        try:
            prompt = check_text("prompt", request.query_params.get("prompt", ""))
        except InputError as e:
            raise api.input_error(e, ["prompt"]) from None
        return JSONResponse({"objects": [{"prompt": phrase, "box": list(box)} for phrase, box in parse(prompt)]})

    async def concepts(request: Request) -> Response:
        guard(request)
        from unclip_cli.domain import find_concepts
        from unclip_cli.requests import check_text

        listed = getattr(engine, "concepts", None)
        if listed is None:
            raise api.ApiError(404, f"the model set {engine.name} lists no concepts (it has no concepts.json)", code="no_concepts")
        limit = request.query_params.get("limit", "20")
        if not limit.isdigit() or len(limit) > 6:
            raise api.ApiError(400, f"limit must be a whole number (0: all), not {limit[:20]!r}", param="limit", code="invalid_value")
        try:
            q = check_text("q", request.query_params.get("q", ""), allow_empty=True)
        except InputError as e:
            raise api.input_error(e, ["q"]) from None
        # By name or shared words at once; by meaning in a thread, as it encodes the text with the set's CLIP (after
        # the running job, which holds the engine).
        found = await anyio.to_thread.run_sync(find_concepts, listed, q, int(limit), lambda: engine, limiter=limiter)
        return JSONResponse(found)

    async def image_file(request: Request) -> Response:
        guard(request, key=False)  # the random name is the key, as with OpenAI's image URLs
        item = store.get(request.path_params["name"])
        if item is None:
            raise api.ApiError(404, "no such image: image URLs are kept for an hour", code="image_not_found")
        return Response(item.data, media_type=item.content_type,
                        headers={"cache-control": "private, max-age=3600", "x-content-type-options": "nosniff"})

    async def index(request: Request) -> Response:
        guard(request, key=False)
        return HTMLResponse(page, headers=PAGE_HEADERS)

    def op_endpoint(op: str):
        async def handle(request: Request) -> Response:
            return await images(request, op)

        return handle

    routes = [
        Route("/", endpoint(index), methods=["GET"]),
        Route("/v1/models", endpoint(list_models), methods=["GET"]),
        Route("/v1/models/{model:path}", endpoint(get_model), methods=["GET"]),
        Route("/v1/images/generations", endpoint(op_endpoint("generate")), methods=["POST"]),
        Route("/v1/images/edits", endpoint(op_endpoint("edit")), methods=["POST"]),
        Route("/v1/images/variations", endpoint(op_endpoint("vary")), methods=["POST"]),
        Route("/v1/unclip/blend", endpoint(op_endpoint("blend")), methods=["POST"]),
        Route("/v1/unclip/nudge", endpoint(op_endpoint("nudge")), methods=["POST"]),
        Route("/v1/unclip/mix", endpoint(op_endpoint("mix")), methods=["POST"]),
        Route("/v1/unclip/compose", endpoint(op_endpoint("compose")), methods=["POST"]),
        Route("/v1/unclip/jobs/{job}", endpoint(job_status), methods=["GET"]),
        Route("/v1/unclip/jobs/{job}", endpoint(stop_job), methods=["DELETE"]),
        Route("/v1/unclip/jobs/{job}/answer", endpoint(job_answer), methods=["GET"]),
        Route("/v1/unclip/timing", endpoint(last_timing), methods=["GET"]),
        Route("/v1/unclip/check", endpoint(check_image), methods=["POST"]),
        Route("/v1/unclip/layout", endpoint(layout), methods=["GET"]),
        Route("/v1/unclip/concepts", endpoint(concepts), methods=["GET"]),
        Route("/v1/images/files/{name}", endpoint(image_file), methods=["GET"], name="image_file"),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            worker.stop()
            await anyio.to_thread.run_sync(worker.join, 30.0)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        try:  # a URL that is not ours is checked as ours are: Host, Origin, then (under /v1) the key
            guard(request, key=request.url.path.startswith("/v1"))
        except api.ApiError as e:
            return error_response(e)
        path = request.url.path
        message = {404: f"unknown URL: {request.method} {path}" + (f" (did you mean {path.rstrip('/')}?)" if path.endswith("/") else ""),
                   405: f"method {request.method} is not allowed for {path}"}.get(exc.status_code, str(exc.detail))
        return error_response(api.ApiError(exc.status_code, message, headers=exc.headers))

    async def crash(request: Request, exc: Exception) -> Response:
        log.error("unexpected error in %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(api.ApiError(500, f"the server failed ({type(exc).__name__}): this is a bug in unclip",
                                           code="internal_error"))

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error, Exception: crash})
    # Starlette answers a path with a trailing slash by a redirect, before any handler checks the Host, Origin or key
    # (and echoes the Host into its location): such paths are 404s in OpenAI's shape instead.
    app.router.redirect_slashes = False
    app.state.worker, app.state.store, app.state.settings, app.state.engine = worker, store, settings, engine
    return app


def error_response(e: api.ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _cancelled(c: Cancelled, settings: Settings, worker: Worker, job=None) -> api.ApiError:
    if c.reason == "deadline":
        t = getattr(job, "tick", None)
        where = "" if t is None else (f" in its {t.stage} stage, at step {t.step} of {t.total}"
                                      + (f" of batch {t.batch} of {t.batches}" if t.batches > 1 else ""))
        return api.ApiError(504, f"the job ran longer than this server's limit of {settings.timeout:g} s and was stopped{where}; "
                                 "ask for fewer images (n) or a lower quality", code="timeout")
    if c.reason == "disconnected":
        return api.ApiError(499, "the client closed the request; its job was stopped", code="client_closed_request")
    if c.reason == "stopped":
        return api.ApiError(499, "the job was stopped (DELETE /v1/unclip/jobs/ID)", code="job_stopped")
    return api.ApiError(503, "the server is shutting down; the job was stopped", code="server_shutting_down",
                        headers={"retry-after": str(worker.retry_after())})


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read: what comes next is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _file_names(req, engine, shipped: bool, recipes: list[dict], output: api.Output) -> list[str]:
    """The names the CLI would give a run's files (`run_name`: `cat-face-42-0.png`), each image's index from its recipe;
    an upload is named by its file name, as the CLI names an input by its path (blocking: it may decode the inputs)."""
    import dataclasses

    from unclip_cli.cli.images import run_name
    from unclip_cli.requests import source_name

    named = {f: source_name(getattr(req, f)) for f in ("image", "image_a", "image_b", "mask")
             if isinstance(getattr(req, f, None), bytes)}
    if isinstance(getattr(req, "images", None), list):
        named["images"] = [source_name(p) if isinstance(p, bytes) else p for p in req.images]
    by_name = dataclasses.replace(req, **named)
    by_name._inputs = req.inputs()  # the images as decoded go along, as Request's own copies carry them (an edit's default
    # feather is named by its image's size)
    stem = run_name(by_name, engine, shipped)
    ext = {"jpeg": "jpg"}.get(output.format, output.format)
    return [f"{stem}-{r.get('index', i) if isinstance(r.get('index'), int) else i}.{ext}" for i, r in enumerate(recipes)]


def _hostname(host: str) -> str | None:
    """The name in a Host header, without its port ("[::1]:8000" -> "::1"); None if it is not a host and port."""
    m = HOST.fullmatch(host.strip().lower())
    if m is None:
        return None
    return m.group("name").strip("[]")


def _mib(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n / 2**10:g} KiB"
