"""`unclip serve` on the tiny random model set, served on 127.0.0.1 at a free port.

The real `openai` client drives the API as any program would; raw HTTP requests (httpx, and a bare socket
for a disconnect) send what no well-behaved client sends. The queue, deadlines, disconnects and stop
signals are tested with an engine that holds its job until the test lets it go, so every outcome is
certain: nothing here waits for a sleep to pass.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

pytest.importorskip("starlette", reason="the serve extra is not installed: pip install 'unclip-cli[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install 'unclip-cli[serve]'")
openai = pytest.importorskip("openai", reason="the test extra is not installed: pip install 'unclip-cli[test]'")
httpx = pytest.importorskip("httpx", reason="the test extra is not installed: pip install 'unclip-cli[test]'")

from unclip_cli import imageio  # noqa: E402
from unclip_cli.progress import Tick  # noqa: E402
from unclip_cli.requests import request_from_recipe  # noqa: E402
from unclip_cli.serve.app import Settings, create_app  # noqa: E402
from unclip_cli.serve.server import running  # noqa: E402
from held import HeldAtFirstStep, HeldEngine  # noqa: E402
from unclip_cli.serve.store import ImageStore  # noqa: E402

KEY = "test-key"
STEPS = {"prior_steps": 2, "decoder_steps": 2, "upsampler_steps": 1}  # the server's own step counts: every request is fast
MAX_BODY = 2 * 2**20
W, H = 20, 12  # a non-square input


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    """Clients must talk to 127.0.0.1 directly, whatever proxy the machine has."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


# -- the server and its clients -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_engine):
    """One server for the tests that need no special engine: an API key, the tiny set, 2 MiB bodies."""
    app = create_app(tiny_engine, Settings(api_key=KEY, steps=STEPS, max_body_bytes=MAX_BODY, max_pixels=4096 * 4096,
                                           allowed_hosts=("127.0.0.1", "localhost", "::1")))
    with running(app) as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def raw(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=60, trust_env=False) as c:
        yield c


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def picture(seed: int = 0, size=(W, H)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def opened(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def recipe_of(data: bytes, tmp_path: Path, name: str = "served.png") -> dict:
    path = tmp_path / name
    path.write_bytes(data)
    return imageio.read_recipe(path)


def error_of(r: httpx.Response, status: int, param=None, code=None) -> dict:
    """The answer is OpenAI's error shape, with this status, param and code."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    assert body["error"]["param"] == param, body
    if code is not None:
        assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    return body["error"]


# ======================================================================================================
# The openai client
def test_generate_b64_recipe_replays_and_unclip_info_reads_it(client, tiny_engine, tmp_path):
    raw = client.images.with_raw_response.generate(model="dall-e-2", prompt="a red circle", n=2, response_format="b64_json",
                                                   extra_body={"seed": 7})
    assert raw.headers["x-unclip-native-size"] == "16x16" and raw.headers["x-unclip-seed"] == "7"
    res = raw.parse()
    assert isinstance(res.created, int) and abs(res.created - time.time()) < 600
    assert len(res.data) == 2 and all(d.url is None for d in res.data)
    images = [base64.b64decode(d.b64_json) for d in res.data]
    recipes = [recipe_of(b, tmp_path, f"{i}.png") for i, b in enumerate(images)]
    assert [r["seed"] for r in recipes] == [7, 8] and recipes[0]["prompt"] == "a red circle"
    assert recipes[0]["steps"]["decoder"] == 2 and recipes[0]["model"] == tiny_engine.name

    # The recipe is the CLI's: it rebuilds the request, and the engine makes the same pixels again.
    again = tiny_engine.run(request_from_recipe(recipes[1]))
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(opened(images[1]).convert("RGB")))

    from typer.testing import CliRunner

    from unclip_cli.cli import _register, app

    _register()
    r = CliRunner().invoke(app, ["info", str(tmp_path / "1.png")])
    assert r.exit_code == 0 and "a red circle" in r.output and "8" in r.output, r.output


def test_generate_url_upscaled(client, server, tmp_path):
    raw = client.images.with_raw_response.generate(prompt="a blue square", size="256x256", response_format="url", quality="low")
    res = raw.parse()
    assert raw.headers["x-unclip-native-size"] == "16x16"
    url = res.data[0].url
    assert url.startswith(server + "/v1/images/files/") and res.data[0].b64_json is None
    with httpx.Client(trust_env=False) as anyone:  # the random name is the key, as with OpenAI's image URLs
        got = anyone.get(url)
        assert got.status_code == 200 and got.headers["content-type"] == "image/png"
        assert anyone.get(url.rsplit("/", 1)[0] + "/not-an-id.png").status_code == 404
    assert opened(got.content).size == (256, 256)
    recipe = recipe_of(got.content, tmp_path)
    assert recipe["upscaled"] == {"size": [256, 256], "filter": "lanczos"} and recipe["size"] == [16, 16]
    assert recipe["quality"] == "fast"


@pytest.mark.parametrize("fmt, magic", [("webp", b"RIFF"), ("jpeg", b"\xff\xd8")])
def test_output_formats(client, fmt, magic):
    res = client.images.generate(prompt="a cat", output_format=fmt, output_compression=80, response_format="b64_json")
    assert base64.b64decode(res.data[0].b64_json).startswith(magic)


def _edit_inputs():
    image = picture(1)
    mask = Image.new("RGBA", (W, H), (0, 0, 0, 255))
    ImageDraw.Draw(mask).rectangle((2, 2, 8, 7), fill=(0, 0, 0, 0))  # transparent = repaint, as OpenAI
    repaint = np.asarray(mask.getchannel("A")) < 128
    return image, mask, repaint


def test_edit_image_and_mask_keeps_unmasked_pixels(client):
    image, mask, repaint = _edit_inputs()
    # File names and content types lie: formats are detected from the bytes.
    res = client.images.edit(image=("photo.jpg", png(image), "text/plain"), mask=("mask.gif", png(mask), "image/gif"),
                             prompt="a green star", n=2, response_format="b64_json")
    assert len(res.data) == 2
    for d in res.data:
        out = np.asarray(opened(base64.b64decode(d.b64_json)).convert("RGB"))
        assert out.shape == (H, W, 3)
        assert np.array_equal(out[~repaint], np.asarray(image)[~repaint])


def test_edit_image_list_uses_its_own_alpha(client):
    """`image=[...]` goes out as `image[]`; without a mask, the image's transparent pixels are repainted."""
    image, mask, repaint = _edit_inputs()
    rgba = image.convert("RGBA")
    rgba.putalpha(mask.getchannel("A"))
    res = client.images.edit(image=[("a.png", png(rgba), "image/png")], prompt="a green star", response_format="b64_json")
    out = np.asarray(opened(base64.b64decode(res.data[0].b64_json)).convert("RGB"))
    assert np.array_equal(out[~repaint], np.asarray(image)[~repaint])


def test_edit_refuses_two_images_and_no_mask(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(image=[png(picture(1)), png(picture(2))], prompt="x")
    assert e.value.param == "image"
    with pytest.raises(openai.BadRequestError) as e:  # opaque image, no mask: nothing says what to repaint
        client.images.edit(image=png(picture(1)), prompt="x")
    assert e.value.param == "mask" and "mask" in e.value.message


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the client marks the endpoint retired at OpenAI
def test_variations_url_with_strength(client, tmp_path):
    res = client.images.create_variation(image=png(picture(3, (16, 16))), n=2, response_format="url", extra_body={"strength": 0.3})
    assert len(res.data) == 2
    with httpx.Client(trust_env=False) as anyone:
        recipes = [recipe_of(anyone.get(d.url).content, tmp_path, f"v{i}.png") for i, d in enumerate(res.data)]
    assert all(r["op"] == "vary" and r["strength"] == 0.3 for r in recipes)
    assert recipes[1]["seed"] == recipes[0]["seed"] + 1


def test_models(client, tiny_engine):
    models = client.models.list()
    assert [m.id for m in models.data] == [tiny_engine.name] and models.data[0].object == "model"
    assert client.models.retrieve(tiny_engine.name).id == tiny_engine.name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("dall-e-3")


def test_unknown_fields_and_names_are_accepted(raw):
    r = raw.post("/v1/images/generations", json={"prompt": "a cat", "model": "gpt-image-9", "style": "vivid", "user": "u1",
                                                 "background": "opaque", "moderation": "low", "invented": {"x": 1},
                                                 "quality": "hd", "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"created", "data"} and set(r.json()["data"][0]) == {"b64_json"}


def test_warnings_come_in_a_header(raw):
    r = raw.post(GEN, json={"prompt": " ".join(["word"] * 40), "response_format": "b64_json"})
    assert r.status_code == 200 and "truncated" in json.loads(r.headers["x-unclip-warnings"])[0]


# ======================================================================================================
# Raw requests: our own endpoints, multipart by hand, and malformed input
def test_blend_and_nudge(raw, tiny_engine, tmp_path):
    a, b = png(picture(4, (16, 16))), png(picture(5, (16, 16)))
    r = raw.post("/v1/unclip/blend", files=[("image[]", ("a", a)), ("image[]", ("b", b))],
                 data={"frames": "3", "seed": "11", "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    frames = [recipe_of(base64.b64decode(d["b64_json"]), tmp_path, f"f{i}.png") for i, d in enumerate(r.json()["data"])]
    assert [f["frame"] for f in frames] == [0, 1, 2] and all(f["seed"] == 11 for f in frames)
    # the files are named as the CLI names this run (its inputs by their file names, the tiny set's name, the server's steps)
    from unclip_cli.cli.images import run_name

    stem = run_name(request_from_recipe(frames[0], image_a="a", image_b="b"), tiny_engine, False)
    assert stem.startswith("a-b-blend-tiny-") and stem.endswith("-11"), stem
    assert json.loads(r.headers["x-unclip-names"]) == [f"{stem}-{i}.png" for i in range(3)]
    r = raw.post("/v1/unclip/nudge", files={"image": ("a", a)},
                 data={"to": "a blue square", "from": "a red circle", "amount": "0.4", "n": "2", "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 2


def _bomb_png() -> bytes:
    """25 million pixels in a few kilobytes."""
    return png(Image.new("1", (5000, 5000)))


def _huge_header_png() -> bytes:
    """A valid 1x1 PNG whose header claims 100000x100000 pixels."""
    data = bytearray(png(Image.new("L", (1, 1))))
    ihdr = bytearray(data[12:29])  # type + 13 bytes of IHDR data
    ihdr[4:12] = struct.pack(">II", 100_000, 100_000)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


GEN = "/v1/images/generations"
EDIT, VARY = "/v1/images/edits", "/v1/images/variations"


@pytest.mark.parametrize("path, kw, status, param, code", [
    (GEN, {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, None, "invalid_json"),
    (GEN, {"content": b"[1, 2]", "headers": {"content-type": "application/json"}}, 400, None, "invalid_json"),
    (GEN, {"content": b'{"prompt": "x"}', "headers": {"content-type": "text/plain"}}, 400, None, "invalid_content_type"),
    (GEN, {"json": {"n": 2}}, 400, "prompt", None),
    (GEN, {"json": {"prompt": "  "}}, 400, "prompt", None),
    (GEN, {"json": {"prompt": 5}}, 400, "prompt", None),
    (GEN, {"json": {"prompt": "x", "n": 0}}, 400, "n", None),
    (GEN, {"json": {"prompt": "x", "n": 11}}, 400, "n", None),
    (GEN, {"json": {"prompt": "x", "n": "two"}}, 400, "n", None),
    (GEN, {"json": {"prompt": "x", "n": True}}, 400, "n", None),
    (GEN, {"json": {"prompt": "x", "seed": -1}}, 400, "seed", None),
    (GEN, {"json": {"prompt": "x", "size": "1024x1536"}}, 400, "size", None),
    (GEN, {"json": {"prompt": "x", "size": "big"}}, 400, "size", None),
    (GEN, {"json": {"prompt": "x", "response_format": "png"}}, 400, "response_format", None),
    (GEN, {"json": {"prompt": "x", "stream": True}}, 400, "stream", "unsupported_value"),
    (GEN, {"json": {"prompt": "x", "background": "transparent"}}, 400, "background", "unsupported_value"),
    (GEN, {"json": {"prompt": "x", "output_format": "gif"}}, 400, "output_format", None),
    (GEN, {"json": {"prompt": "x", "quality": "ultra"}}, 400, "quality", None),
    (GEN, {"json": {"prompt": "x\x1b[2J"}}, 400, "prompt", None),
    (VARY, {"files": {"image": ("a.png", b"hello, not an image")}}, 400, "image", None),
    (VARY, {"files": {"image": ("a.png", png(picture(1)))}, "data": {"n": "0"}}, 400, "n", None),
    (VARY, {"files": {"image": ("a.png", png(picture(1)))}, "data": {"strength": "strong"}}, 400, "strength", None),
    (VARY, {"data": {"image": "not a file", "n": "1"}, "files": {"other": ("o", b"")}}, 400, "image", None),
    (VARY, {"data": {"n": "1"}, "files": {"other": ("o", b"")}}, 400, "image", "missing_field"),
    (VARY, {"data": {"n": "1"}}, 400, None, "invalid_content_type"),
    (VARY, {"json": {"image": "x"}}, 400, None, "invalid_content_type"),
    (VARY, {"files": {"image": ("bomb.png", _bomb_png())}}, 400, "image", "image_too_large"),
    (VARY, {"files": {"image": ("bomb.png", _huge_header_png())}}, 400, "image", "image_too_large"),
    (VARY, {"files": [("image", ("a", b"x"))] * 5}, 400, None, "invalid_form"),
    (EDIT, {"files": {"image": ("a.png", png(picture(1))), "mask": ("m.png", png(Image.new("L", (W // 2, H // 2), 255)))},
            "data": {"prompt": "x"}}, 400, "mask", None),
    (EDIT, {"files": {"image": ("a.png", png(picture(1))), "mask": ("m.png", png(Image.new("L", (W, H), 0)))},
            "data": {"prompt": "x"}}, 400, "mask", None),
    (EDIT, {"files": {"image": ("a.png", png(picture(1))), "mask": ("m.png", png(Image.new("L", (W, H), 255))),
                      "markup": ("k.png", b"x")}, "data": {"prompt": "x"}}, 400, "markup", "unsupported_value"),
    (EDIT, {"files": {"image": ("a.png", png(picture(1))), "mask": ("m.png", png(_edit_inputs()[1]))}}, 400, "prompt", None),
    (EDIT, {"files": {"image": ("a.png", png(picture(1))), "mask": ("m.png", png(_edit_inputs()[1]))},
            "data": {"prompt": "x", "size": "256x256"}}, 400, "size", None),
    ("/v1/unclip/blend", {"files": {"image": ("a.png", png(picture(1)))}}, 400, "image", None),
    ("/v1/unclip/blend", {"files": [("image[]", ("a", png(picture(1))))] * 2, "data": {"frames": "11"}}, 400, "frames", None),
    ("/v1/unclip/nudge", {"files": {"image": ("a.png", png(picture(1)))}}, 400, "to", None),
    (VARY, {"files": {"image": ("big.bin", os.urandom(MAX_BODY + 1000))}}, 413, None, "request_too_large"),
])
def test_bad_requests_get_openai_errors(raw, path, kw, status, param, code):
    error_of(raw.post(path, **kw), status, param, code)


def test_keys_origins_and_routes(server, raw):
    with httpx.Client(base_url=server, timeout=30, trust_env=False) as anon:
        error_of(anon.get("/v1/models"), 401, code="invalid_api_key")
        error_of(anon.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401, code="invalid_api_key")
        error_of(anon.post(GEN, json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"}), 401, code="invalid_api_key")
        page = anon.get("/")  # the page needs no key; it asks for one
        assert page.status_code == 200 and "default-src 'none'" in page.headers["content-security-policy"]
    error_of(raw.get("/v1/models", headers={"Origin": "http://evil.example"}), 403, code="cross_origin")
    error_of(raw.get("/v1/models", headers={"Host": "evil.example"}), 403, code="forbidden_host")
    assert raw.get("/v1/models", headers={"Origin": server}).status_code == 200
    error_of(raw.get("/v1/nothing"), 404)
    error_of(raw.get(GEN), 405)
    assert raw.get("/v1/unclip/jobs/no-such-job").json()["status"] == "unknown"


def test_page_fetches_nothing_from_elsewhere(raw):
    import re

    html = raw.get("/").text
    assert not re.search(r"""(src|href|action)\s*=\s*["']?(https?:)?//""", html)
    assert not re.search(r"""(fetch|import)\(\s*["'](https?:)?//""", html)


def test_image_store_expires_and_bounds_memory():
    store = ImageStore(ttl=3600, max_bytes=10)
    first = store.put(b"12345678", "image/png", "png")
    second = store.put(b"abcdef", "image/png", "png")  # 14 bytes would exceed 10: the oldest goes
    assert store.get(first) is None and store.get(second).data == b"abcdef"
    assert first != second and first.endswith(".png")
    gone = ImageStore(ttl=0)
    assert gone.get(gone.put(b"x", "image/png", "png")) is None
    assert store.get("../../etc/passwd") is None


# ======================================================================================================
# The queue, deadlines, disconnects, faults and stopping, with an engine the test holds
def test_a_jobs_status_has_its_warnings_before_its_first_step(tiny_engine):
    """What the job's answer will warn of (x-unclip-warnings) is in its status while it runs: the page shows it then."""
    engine = HeldAtFirstStep(tiny_engine)
    app = create_app(engine, Settings(steps=STEPS))
    job, answer = "job-warned-0123456789", {}
    with running(app) as (url, _), httpx.Client(base_url=url, timeout=60, trust_env=False) as c:
        t = threading.Thread(target=lambda: answer.update(r=c.post(GEN, json={"prompt": " ".join(["apple"] * 200)},
                                                                   headers={"x-unclip-job": job})), daemon=True)
        t.start()
        assert engine.started.wait(30)
        status = c.get(f"/v1/unclip/jobs/{job}").json()
        assert status["status"] == "running" and (status["stage"], status["step"]) == ("prior", 1)
        assert len(status["warnings"]) == 1 and status["warnings"][0].startswith("prompt truncated to ")
        engine.gate.set()
        t.join(60)
    assert answer["r"].status_code == 200 and json.loads(answer["r"].headers["x-unclip-warnings"]) == status["warnings"]


def test_worker_times_each_run_of_a_stage(monkeypatch):
    """What the page estimates the time left from: each run of a stage in order (a stage runs again in each batch, and
    twice in one batch as mix's prior does for two texts), its steps and seconds, its first step's seconds apart, the
    batch's images, and the seconds since the last step; on a fake clock."""
    import asyncio

    from unclip_cli.serve import worker as worker_module

    class Clock:
        now = 100.0

        def monotonic(self):
            return self.now

    clock, seen = Clock(), {}
    monkeypatch.setattr(worker_module, "time", clock)
    ticks = [("prior", 1, 2, 1, 0.5), ("prior", 2, 2, 1, 0.25), ("prior", 1, 2, 1, 0.5), ("prior", 2, 2, 1, 0.5),
             ("decoder", 1, 3, 1, 1.0), ("decoder", 1, 3, 1, 0.0), ("decoder", 3, 3, 1, 2.0), ("prior", 1, 2, 2, 0.5)]

    class Engine:
        def run(self, request, callback):
            for stage, step, total, batch, seconds in ticks:
                clock.now += seconds
                callback(Tick(stage, step, total, batch, 2))
            clock.now += 0.125
            seen["status"] = worker.status("job-0123456789abcdef")
            return "done"

    async def main():
        worker.start()
        job = worker.submit(None, job_id="job-0123456789abcdef")
        assert await job.future == "done"
        worker.stop()
        return job

    worker = worker_module.Worker(Engine())
    job = asyncio.run(main())
    assert worker.join(10)
    segments = [["prior", 2, 1, 2, 2, 0.75, 0.5, 0], ["prior", 2, 1, 2, 2, 1.0, 0.5, 0], ["decoder", 3, 1, 2, 3, 3.0, 1.0, 0],
                ["prior", 2, 2, 2, 1, 0.5, 0.5, 0]]  # (the test's ticks say no image count)
    assert seen["status"] == {"status": "running", "stage": "prior", "step": 1, "total": 2, "batch": 2, "batches": 2,
                              "segments": segments, "since_tick": 0.125}
    assert job.timing()["segments"] == segments


def test_the_answer_carries_the_jobs_step_times(raw):
    r = raw.post(GEN, json={"prompt": "x", "n": 2, "response_format": "b64_json"}, headers={"x-unclip-job": "job-timing-0123456789"})
    assert r.status_code == 200, r.text
    segments = json.loads(r.headers["x-unclip-timing"])
    stages = [s[0] for s in segments]
    assert stages[:2] == ["prior", "decoder"] and segments[0][1] == STEPS["prior_steps"] and segments[1][1] == STEPS["decoder_steps"]
    assert all(s[4] == s[1] and s[5] >= s[6] >= 0 and s[7] == 2 for s in segments), segments  # every step of every run was timed
    assert "x-unclip-timing" not in raw.post(GEN, json={"prompt": "x", "response_format": "b64_json"}).headers  # no job id


def test_client_disconnect_stops_the_job(tiny_engine):
    engine = HeldEngine(tiny_engine)
    app = create_app(engine, Settings(steps=STEPS))
    with running(app) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps({"prompt": "x"}).encode()
        sock = socket.create_connection((host, int(port)), timeout=30)
        sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (url.removeprefix("http://").encode(), len(body), body))
        assert engine.started.wait(30)
        sock.close()
        assert engine.stopped.wait(30)
        assert engine.reasons == ["disconnected"]
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as c:  # and the next job runs
            engine.gate.set()
            assert c.post(GEN, json={"prompt": "x"}).status_code == 200


def _send_keeping(url: str, job_id: str) -> socket.socket:
    """A generate sent with a job id and x-unclip-keep on a bare socket (the test closes it: a client going away)."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "x", "response_format": "b64_json"}).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nx-unclip-job: %s\r\n"
                 b"x-unclip-keep: 1\r\nContent-Length: %d\r\n\r\n%s" % (url.removeprefix("http://").encode(), job_id.encode(), len(body), body))
    return sock


def _until(fn, timeout: float = 30.0):
    """Poll fn() until it returns something true (a job's status changes on the server's side)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = fn()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_a_kept_job_runs_on_when_its_client_leaves_and_its_answer_waits(tiny_engine):
    """What the page does across a reload: the job runs to its end, its status says done, and its answer (images,
    warnings, step times) is fetched once by the job's id; a server that never had the job says unknown."""
    engine = HeldEngine(tiny_engine)
    app = create_app(engine, Settings(steps=STEPS))
    with running(app) as (url, _), httpx.Client(base_url=url, timeout=60, trust_env=False) as c:
        job = "page-kept-0123456789"
        sock = _send_keeping(url, job)
        assert engine.started.wait(30)
        sock.close()  # the client goes away (a job not kept stops at its next step: the test above)
        _until(lambda: c.get(f"/v1/unclip/jobs/{job}").json().get("stage") == "decoder")  # the held job's steps go on
        assert c.get(f"/v1/unclip/jobs/{job}").json()["status"] == "running" and engine.reasons == []
        assert c.get(f"/v1/unclip/jobs/{job}/answer").status_code == 404  # not done yet
        engine.gate.set()
        _until(lambda: c.get(f"/v1/unclip/jobs/{job}").json()["status"] == "done")
        r = c.get(f"/v1/unclip/jobs/{job}/answer")
        assert r.status_code == 200 and len(r.json()["data"]) == 1 and r.json()["data"][0]["b64_json"], r.text
        assert [s[0] for s in json.loads(r.headers["x-unclip-timing"])][:2] == ["decoder", "prior"]  # the held "steps", then its own
        assert r.headers["x-unclip-seed"].isdigit()
        e = error_of(c.get(f"/v1/unclip/jobs/{job}/answer"), 404, code="job_not_found")  # fetched once
        assert "fetched already" in e["message"]
        assert c.get(f"/v1/unclip/jobs/{job}").json()["status"] == "unknown"
        assert engine.runs == 1 and engine.reasons == []  # never stopped


def test_a_kept_job_can_be_stopped_by_its_id(tiny_engine):
    engine = HeldEngine(tiny_engine)
    app = create_app(engine, Settings(steps=STEPS))
    with running(app) as (url, _), httpx.Client(base_url=url, timeout=60, trust_env=False) as c:
        job = "page-stop-0123456789"
        answered = {}
        t = threading.Thread(target=lambda: answered.setdefault("r", c.post(GEN, json={"prompt": "x"}, headers={
            "x-unclip-job": job, "x-unclip-keep": "1"})), daemon=True)
        t.start()
        assert engine.started.wait(30)
        r = c.delete(f"/v1/unclip/jobs/{job}")
        assert r.status_code == 200 and r.json()["status"] == "stopped"
        t.join(30)
        error_of(answered["r"], 499, code="job_stopped")
        assert engine.reasons == ["stopped"]
        assert c.delete(f"/v1/unclip/jobs/{job}").json()["status"] == "unknown"  # over: nothing to do
        engine.gate.set()
        # A kept answer nobody fetches can be forgotten the same way (the page forgets those it had from the request).
        _send_keeping(url, "page-forget-0123456789").close()
        _until(lambda: c.get("/v1/unclip/jobs/page-forget-0123456789").json()["status"] == "done")
        assert c.delete("/v1/unclip/jobs/page-forget-0123456789").json()["status"] == "forgotten"
        assert c.get("/v1/unclip/jobs/page-forget-0123456789/answer").status_code == 404


def test_check_says_what_a_job_would_warn_of_an_image(tiny_weights, tmp_path):
    """POST /v1/unclip/check: the engine's own test of an image far from the set (the page asks as an image is loaded,
    not when the job starts), by the upload's name; a model's own output passes; no image or not an image is a 400."""
    from unclip_cli.engine import Engine

    weights = tmp_path / "set"
    shutil.copytree(tiny_weights, weights)
    shutil.copy(Path(__file__).parent.parent / "weights" / "emoji" / "domain.json", weights)
    y, x = np.mgrid[0:120, 0:200]
    photo = Image.fromarray(np.stack([x * 255 // 200, y * 255 // 120, np.full_like(x, 128)], -1).astype(np.uint8))
    emoji = Image.new("RGB", (64, 64), (255, 255, 255))
    ImageDraw.Draw(emoji).ellipse((12, 12, 52, 52), fill=(250, 200, 40))
    with running(create_app(Engine.load(weights, device="cpu"), Settings(steps=STEPS))) as (url, _), \
            httpx.Client(base_url=url, timeout=60, trust_env=False) as c:
        r = c.post("/v1/unclip/check", files={"image": ("my photo.png", png(photo))})
        assert r.json() == {"warnings": ["my photo.png is far from the emoji this model knows: expect abstract results"]}, r.text
        assert c.post("/v1/unclip/check", files={"image": ("face.png", png(emoji))}).json() == {"warnings": []}
        error_of(c.post("/v1/unclip/check", files={"mask": ("m.png", png(emoji))}), 400, param="image", code="missing_image")
        error_of(c.post("/v1/unclip/check", files={"image": ("x.png", b"not an image")}), 400, param="image")


def test_a_fault_in_naming_loses_no_images(raw, monkeypatch):
    import unclip_cli.cli.images as images

    monkeypatch.setattr(images, "run_name", lambda *a, **k: 1 / 0)
    r = raw.post(GEN, json={"prompt": "a red circle", "n": 1, "response_format": "b64_json"})
    assert r.status_code == 200 and len(r.json()["data"]) == 1 and json.loads(r.headers["x-unclip-names"]) == [], r.text


def test_layout_reads_a_sentence_as_compose_does(raw):
    """GET /v1/unclip/layout: where `unclip compose` puts a sentence's objects (the page previews them as it is typed)."""
    from unclip_cli.layout import parse

    for sentence in ("cat face left of red heart", "two stars", "a rocket"):
        got = raw.get("/v1/unclip/layout", params={"prompt": sentence}).json()
        assert got == {"objects": [{"prompt": p, "box": list(b)} for p, b in parse(sentence)]}, got
    assert [o["prompt"] for o in raw.get("/v1/unclip/layout", params={"prompt": "two stars"}).json()["objects"]] == ["star", "star"]
    error_of(raw.get("/v1/unclip/layout", params={"prompt": " "}), 400, param="prompt")


def test_concepts_are_searched_as_the_cli_does(tiny_engine, tiny_weights, tmp_path):
    """GET /v1/unclip/concepts answers what `unclip concepts Q --json` prints, by the same function."""
    from test_concepts import tiny_set

    from clirun import cli
    from unclip_cli.engine import Engine

    ws = tiny_set(tiny_weights, tmp_path)
    with running(create_app(Engine.load(ws, device="cpu"), Settings(steps=STEPS))) as (url, _), \
            httpx.Client(base_url=url, timeout=60, trust_env=False) as c:
        for q, how in (("cat", "name"), ("a sleeping cat", "words"), ("a blue bicycle", "meaning"), ("12345", "meaning"), ("", "name")):
            got = c.get("/v1/unclip/concepts", params={"q": q, "limit": "2"}).json()
            assert got == json.loads(cli("concepts", q, "--limit", "2", "--json", "--weights", ws).out), q
            assert got["matched_by"] == how and len(got["concepts"]) <= 2, got
        assert c.get("/v1/unclip/concepts", params={"q": "12345"}).json()["far"] is True
        assert c.get("/v1/unclip/concepts", params={"limit": "0"}).json()["total"] == 3
        error_of(c.get("/v1/unclip/concepts", params={"limit": "-1"}), 400, param="limit", code="invalid_value")
        error_of(c.get("/v1/unclip/concepts", params={"q": "x" * 5000}), 400, param="q", code="invalid_value")
    with running(create_app(tiny_engine, Settings(steps=STEPS))) as (url, _), httpx.Client(base_url=url, timeout=60, trust_env=False) as c:
        assert "lists no concepts" in error_of(c.get("/v1/unclip/concepts"), 404, code="no_concepts")["message"]


def test_deadline_stops_the_job(tiny_engine):
    engine = HeldEngine(tiny_engine)
    app = create_app(engine, Settings(steps=STEPS, timeout=1.0))
    with running(app) as (url, _), httpx.Client(base_url=url, timeout=60, trust_env=False) as c:
        r = c.post(GEN, json={"prompt": "x"})
        error_of(r, 504, code="timeout")
        assert r.headers["x-should-retry"] == "false"
        assert engine.reasons == ["deadline"]


def test_a_fault_is_500_and_not_retried(tiny_engine):
    class Broken(HeldEngine):
        def run(self, request, callback=None):
            self.runs += 1
            raise RuntimeError("boom")

    engine = Broken(tiny_engine)
    with running(create_app(engine, Settings(steps=STEPS))) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=2, timeout=60)
        with pytest.raises(openai.InternalServerError) as e:
            client.images.generate(prompt="x")
        assert e.value.response.headers["x-should-retry"] == "false" and "boom" not in e.value.message
    assert engine.runs == 1  # the client did not repeat the job


def test_stop_signal_answers_the_running_job_and_stops(tiny_engine):
    engine = HeldEngine(tiny_engine)
    app = create_app(engine, Settings(steps=STEPS))
    with running(app) as (url, server):
        answers: list = []
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as c:
            t = threading.Thread(target=lambda: answers.append(c.post(GEN, json={"prompt": "x"})), daemon=True)
            t.start()
            assert engine.started.wait(30)
            server.handle_exit(signal.SIGTERM, None)  # what the signal handler calls
            t.join(30)
        error_of(answers[0], 503, code="server_shutting_down")
        assert engine.reasons == ["shutdown"]
    assert app.state.worker.join(0)


# ======================================================================================================
# The command
def _cli(*args: str):
    from typer.testing import CliRunner

    from unclip_cli.cli import _register, app

    _register()
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("args, match", [
    (["--port", "70000"], "--port must be between 0 and 65535"),
    (["--max-queue", "-1"], "--max-queue must be between 0"),
    (["--prior-steps", "0"], "--prior-steps must be between 1"),
    (["--timeout", "0"], "--timeout must be more than 0"),
])
def test_serve_command_checks_its_options(args, match, tiny_weights):
    r = _cli("serve", "--weights", str(tiny_weights), *args)
    assert r.exit_code != 0 and match in str(r.exception), (r.output, r.exception)


def test_serve_command_warns_without_key_off_loopback(tiny_weights, monkeypatch):
    from unclip_cli.serve import server as srv

    monkeypatch.setattr(srv, "is_loopback", lambda sock: False)  # the socket stays on 127.0.0.1: tests bind nothing else

    def run(self, sockets=None):
        self.started = True
        sockets[0].close()

    monkeypatch.setattr(srv.Server, "run", run)
    r = _cli("serve", "--weights", str(tiny_weights), "--port", "0", "--device", "cpu")
    assert r.exit_code == 0, (r.output, r.exception)
    assert "without an API key" in r.output and "Stopped." in r.output


def test_serve_process_stops_cleanly_on_sigterm(tiny_weights):
    proc, url, seen = _serve_proc(tiny_weights)
    try:
        assert url.startswith("http://127.0.0.1:"), "".join(seen)
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as c:
            assert c.get("/v1/models").status_code == 200
            assert c.post(GEN, json={"prompt": "x", "response_format": "b64_json"}).status_code == 200
        proc.send_signal(signal.SIGTERM)
        code = _stopped(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    rest = "".join(seen)
    assert code == 0, rest
    assert "Stopped." in rest and "Traceback" not in rest


# ======================================================================================================
# Issue 23: the second hostile pass
class Counted:
    """The tiny engine, counting the runs it is asked for: a refused request must not reach it."""

    def __init__(self, engine):
        self.engine, self.runs = engine, 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def run(self, request, callback=None):
        self.runs += 1
        return self.engine.run(request, callback)


@pytest.fixture(scope="module")
def counted(tiny_engine):
    """A server like `server` over a Counted engine: (base URL, engine, httpx client with the key)."""
    engine = Counted(tiny_engine)
    app = create_app(engine, Settings(api_key=KEY, steps=STEPS, max_body_bytes=MAX_BODY, allowed_hosts=("127.0.0.1", "localhost", "::1")))
    with running(app) as (url, _), httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                                                 trust_env=False) as c:
        yield url, engine, c


def refused(counted, r: httpx.Response, status: int, param=None, code=None) -> dict:
    """OpenAI's error shape, and no model run for it."""
    runs = counted[1].runs
    error = error_of(r, status, param, code)
    assert counted[1].runs == runs
    return error


def test_text_that_is_not_unicode_is_refused_before_the_model_runs(counted):
    _, engine, c = counted
    before = engine.runs
    for prompt in ["cat \ud800", "\udcff face", "a \udfff"]:  # lone surrogates: JSON's escapes, a shell's undecodable bytes
        body = json.dumps({"prompt": prompt, "response_format": "b64_json"})  # ASCII JSON with \u escapes
        e = error_of(c.post(GEN, content=body, headers={"content-type": "application/json"}), 400, "prompt", "invalid_value")
        assert "unicode" in e["message"].lower()
    assert engine.runs == before


def test_trailing_slash_is_not_redirected(counted, server):
    _, engine, c = counted
    for path in [GEN + "/", EDIT + "/", VARY + "/", "/v1/unclip/blend/"]:
        for headers, status, code in [({"Host": "evil.example"}, 403, "forbidden_host"),
                                      ({"Origin": "http://evil.example"}, 403, "cross_origin"),
                                      ({"Authorization": "Bearer wrong"}, 401, "invalid_api_key"),
                                      ({}, 404, None)]:
            r = c.post(path, json={"prompt": "x"}, headers=headers)
            assert r.status_code != 307 and "location" not in r.headers, (path, headers, r.headers)
            error_of(r, status, code=code)
    assert engine.runs == 0


@pytest.mark.parametrize("host", ["127.0.0.1:1@evil.example", "localhost@evil.example", "127.0.0.1:8000/evil", "[::1]:1@evil",
                                  "evil.example#127.0.0.1", "127.0.0.1:99999999", "127.0.0.1\\@evil"])
def test_host_header_must_be_a_host_and_port(raw, host):
    error_of(raw.get("/v1/models", headers={"Host": host}), 403, code="forbidden_host")
    error_of(raw.get("/", headers={"Host": host}), 403, code="forbidden_host")


@pytest.mark.parametrize("host", ["127.0.0.1:80", "localhost", "LOCALHOST:1234", "[::1]:8000", "[::1]"])
def test_loopback_host_headers_are_answered(raw, host):
    assert raw.get("/v1/models", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("to, from_", [("a cat", "a cat"), ("A Cat ", "a  cat"), ("a red circle", "a red circle")])
def test_nudge_with_the_same_texts_names_the_api_fields(counted, to, from_):
    _, engine, c = counted
    r = c.post("/v1/unclip/nudge", files={"image": ("a.png", png(picture(1)))}, data={"to": to, "from": from_})
    e = refused(counted, r, 400, "to", "invalid_value")
    assert "--" not in e["message"] and "from" in e["message"], e


def test_nudge_texts_with_one_embedding_found_by_the_engine_name_the_api_fields(counted):
    """Texts that differ only past CLIP's context pass the request's check and embed alike: the engine's refusal
    speaks the API's names too."""
    filler = " ".join(["cat"] * 300)
    r = counted[2].post("/v1/unclip/nudge", files={"image": ("a.png", png(picture(1)))},
                        data={"to": f"a {filler} dog", "from": f"a {filler} bird"})
    e = error_of(r, 400, "to", "invalid_value")
    assert "--" not in e["message"] and "same CLIP embedding" in e["message"], e


def test_float_image_without_numbers_is_named_once(counted):
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), np.nan, np.float32), "F").save(buf, format="TIFF")
    e = refused(counted, counted[2].post(VARY, files={"image": ("x.tif", buf.getvalue())}), 400, "image")
    assert "image image" not in e["message"] and "NaN" in e["message"], e


def test_output_pixels_of_a_request_are_bounded(counted):
    """A 2048x2048 upload as an edit with n=5 would return 21 million pixels: refused before decoding."""
    big = Image.new("RGBA", (2048, 2048), (10, 20, 30, 255))
    ImageDraw.Draw(big).rectangle((0, 0, 100, 100), fill=(0, 0, 0, 0))
    r = counted[2].post(EDIT, files={"image": ("a.png", png(big))}, data={"prompt": "x", "n": "5"})
    e = refused(counted, r, 400, "n", "output_too_large")
    assert "2048x2048" in e["message"], e


@pytest.mark.parametrize("path, files, data", [
    (VARY, {"image": ("a.png", png(picture(1)))}, {}),
    ("/v1/unclip/nudge", {"image": ("a.png", png(picture(1)))}, {"to": "a dog"}),
    ("/v1/unclip/blend", [("image[]", ("a", png(picture(1)))), ("image[]", ("b", png(picture(2))))], {}),
])
@pytest.mark.parametrize("stream", ["true", "True"])
def test_stream_is_refused_everywhere(counted, path, files, data, stream):
    refused(counted, counted[2].post(path, files=files, data={**data, "stream": stream}), 400, "stream", "unsupported_value")


@pytest.mark.parametrize("job_id", ["job-1", "12345678", "a" * 15, "bad id with spaces 1234", "x" * 65])
def test_job_ids_must_be_unguessable(counted, job_id):
    r = counted[2].post(GEN, json={"prompt": "x"}, headers={"x-unclip-job": job_id})
    refused(counted, r, 400, None, "invalid_job_id")


def test_a_queued_client_that_leaves_logs_nothing(tiny_engine, caplog):
    engine = HeldEngine(tiny_engine)
    app = create_app(engine, Settings(steps=STEPS))
    with running(app) as (url, _), httpx.Client(base_url=url, timeout=60, trust_env=False) as c:
        first = threading.Thread(target=c.post, args=(GEN,), kwargs={"json": {"prompt": "x"}}, daemon=True)
        first.start()
        assert engine.started.wait(30)
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps({"prompt": "y"}).encode()
        for _ in range(2):  # each queued client goes away before its turn
            sock = socket.create_connection((host, int(port)), timeout=30)
            sock.sendall(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (GEN.encode(), url.removeprefix("http://").encode(), len(body), body))
            deadline = time.monotonic() + 30
            while app.state.worker.counts()["queued"] != 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert app.state.worker.counts()["queued"] == 1
            sock.close()
            while app.state.worker.counts()["queued"] != 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert app.state.worker.counts()["queued"] == 0
        engine.gate.set()
        first.join(60)
    import gc

    gc.collect()  # an unretrieved exception is reported when its future is collected
    assert "never retrieved" not in caplog.text, caplog.text


class Unstoppable(HeldEngine):
    """The tiny engine run without the worker's callback: nothing can stop it, so a 504 can only come before it starts."""

    def run(self, request, callback=None):
        self.runs += 1
        return self.engine.run(request)


def test_the_time_limit_starts_when_the_job_runs(tiny_engine):
    """A slow upload does not spend the job's time: the body comes after the whole limit has passed."""
    app = create_app(Unstoppable(tiny_engine), Settings(steps=STEPS, timeout=1.0))
    with running(app) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps({"prompt": "x", "response_format": "b64_json"}).encode()
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            sock.sendall(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                         % (GEN.encode(), url.removeprefix("http://").encode(), len(body)))
            time.sleep(1.5)  # the upload is slower than the whole limit
            sock.sendall(body)
            answer = sock.makefile("rb").readline()
        assert answer.startswith(b"HTTP/1.1 200"), answer


def test_a_job_past_its_time_says_how_far_it_got(tiny_engine):
    engine = HeldEngine(tiny_engine)
    with running(create_app(engine, Settings(steps=STEPS, timeout=1.0))) as (url, _), httpx.Client(base_url=url, timeout=60,
                                                                                                    trust_env=False) as c:
        e = error_of(c.post(GEN, json={"prompt": "x"}), 504, code="timeout")
    assert "decoder" in e["message"] and "step 1 of 2" in e["message"], e


# -- the command, as a process ---------------------------------------------------------------------------
def _serve_proc(tiny_weights, *args, env=None):
    """`unclip serve` on a free port: (process, base URL, its stderr lines, read as they come by a thread)."""
    proc = subprocess.Popen([sys.executable, "-m", "unclip_cli", "serve", "--weights", str(tiny_weights), "--port", "0", "--device",
                             "cpu", *sum((["--" + k.replace("_", "-"), str(v)] for k, v in STEPS.items()), []), *args],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    lines: list[str] = []
    serving = threading.Event()

    def pump() -> None:  # a thread, not select(): a buffered reader may hold several lines that select() cannot see
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("Serving on "):
                serving.set()
        serving.set()

    proc.pump = threading.Thread(target=pump, daemon=True)
    proc.pump.start()
    serving.wait(120)
    url = next((line.split()[2].rstrip("/") for line in list(lines) if line.startswith("Serving on ")), None)
    if url is None:
        proc.kill()
        pytest.fail("".join(lines))
    return proc, url, lines


def _stopped(proc) -> int:
    """Wait for a served process to end (after a stop signal); its exit code."""
    code = proc.wait(timeout=60)
    proc.pump.join(30)
    return code


def test_serve_on_another_loopback_address_with_an_empty_key_variable(tiny_weights):
    """--host 127.0.0.2 answers its own URL; an empty UNCLIP_API_KEY is said at start; keys in query strings stay out of the log."""
    proc, url, seen = _serve_proc(tiny_weights, "--host", "127.0.0.2", "--log-level", "info", env={"UNCLIP_API_KEY": ""})
    try:
        assert url.startswith("http://127.0.0.2:")
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as c:
            assert c.get("/").status_code == 200
            assert c.get("/v1/models?api_key=sk-secret-4242").status_code == 200
            assert c.post(GEN, json={"prompt": "x", "response_format": "b64_json"}).status_code == 200
            error_of(c.get("/v1/models", headers={"Host": "127.0.0.3"}), 403, code="forbidden_host")
        proc.send_signal(signal.SIGTERM)
        code = _stopped(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(seen)
    assert code == 0, log
    assert any("UNCLIP_API_KEY" in line and "empty" in line for line in seen), log
    assert "sk-secret-4242" not in log and "GET /v1/models?[query hidden]" in log, log  # the access log is on


def test_sigterm_while_a_client_uploads_answers_it_at_once(tiny_weights):
    proc, url, seen = _serve_proc(tiny_weights)
    try:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            stream = sock.makefile("rb")
            # One whole request first: the connection is being served before the upload starts.
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: %s\r\n\r\n" % url.removeprefix("http://").encode())
            head = stream.readline()
            assert head.startswith(b"HTTP/1.1 200"), head
            headers = list(iter(stream.readline, b"\r\n"))
            stream.read(next(int(line.split(b":")[1]) for line in headers if line.lower().startswith(b"content-length")))
            sock.sendall(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"prompt\": "
                         % (GEN.encode(), url.removeprefix("http://").encode()))
            time.sleep(0.5)  # the server reads what came (a local socket: well within this)
            proc.send_signal(signal.SIGTERM)
            status = stream.readline()
            headers = list(iter(stream.readline, b"\r\n"))
            length = next(int(line.split(b":")[1]) for line in headers if line.lower().startswith(b"content-length"))
            body = json.loads(stream.read(length))
        code = _stopped(proc)
        rest = "".join(seen)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert status.startswith(b"HTTP/1.1 503"), (status, rest)
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == "server_shutting_down"
    # (uvicorn's graceful shutdown would have waited 10 s, then cancelled the request: a plain-text 500)
    assert code == 0 and "Traceback" not in rest, rest


# Each kind of key once and both ways of giving it (a process each, ~3 s: all six pairs cost the suite 17 s).
@pytest.mark.parametrize("how, key", [("env", "clé-secrète"), ("option", "key\u200b"), ("env", "ключ")])
def test_serve_refuses_a_key_clients_cannot_send(tiny_weights, key, how):
    """As a process with a time limit: a server that starts with such a key would never return."""
    args = [sys.executable, "-m", "unclip_cli", "serve", "--weights", str(tiny_weights), "--port", "0", "--device", "cpu"]
    p = subprocess.run(args + (["--api-key", key] if how == "option" else []), capture_output=True, text=True, timeout=60,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **({"UNCLIP_API_KEY": key} if how == "env" else {})})
    assert p.returncode == 1 and "Traceback" not in p.stderr, (p.returncode, p.stderr)
    errors = [line for line in p.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "--api-key" in errors[0] and "ASCII" in errors[0], p.stderr


def test_mix_and_compose_endpoints_replay_the_cli(raw, tiny_engine, tmp_path):
    """/v1/unclip/mix (multipart) and /v1/unclip/compose (JSON) make what the same request makes in the engine."""
    from unclip_cli.requests import request_from_recipe

    a, b = picture(4, (16, 16)), picture(5, (16, 16))
    r = raw.post("/v1/unclip/mix", files=[("image[]", ("a", png(a))), ("image[]", ("b", png(b)))],
                 data={"prompt[]": ["a red circle"], "weights": "0.5,0.3,0.2", "seed": "7", "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    data = base64.b64decode(r.json()["data"][0]["b64_json"])
    rec = recipe_of(data, tmp_path, "mix.png")
    assert (rec["op"], rec["weights"], rec["prompts"]) == ("mix", [0.5, 0.3, 0.2], ["a red circle"])
    again = tiny_engine.run(request_from_recipe(rec, images=[png(a), png(b)]))
    assert np.array_equal(np.asarray(opened(data).convert("RGB")), np.asarray(again.images[0]))
    error_of(raw.post("/v1/unclip/mix", files=[("image[]", ("a", png(a)))], data={"weights": "1,x", "prompt[]": ["a cat"]}), 400, "weights")
    error_of(raw.post("/v1/unclip/mix", files=[("image[]", ("a", png(a)))], data={"weights": "1,2,3", "prompt[]": ["a cat"]}), 400, "weights")
    r = raw.post("/v1/unclip/compose", json={"objects": [{"prompt": "a red circle", "box": [0, 0, 0.5, 0.5]}, ["a star", [0.5, 0.5, 1, 1]]],
                                            "method": "paste", "seed": 3, "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    rec = recipe_of(base64.b64decode(r.json()["data"][0]["b64_json"]), tmp_path, "compose.png")
    assert rec["objects"] == [["a red circle", [0, 0, 0.5, 0.5]], ["a star", [0.5, 0.5, 1, 1]]] and rec["method"] == "paste"
    error_of(raw.post("/v1/unclip/compose", json={"objects": [["a cat", [0.6, 0, 0.2, 1]]]}), 400, "objects")
    error_of(raw.post("/v1/unclip/compose", json={"prompt": "a cat", "method": "magic"}), 400, "method")


@pytest.mark.parametrize("filename, named", [("cat.png", "cat.png"), ("C:\\photos\\猫 1.jpg", "猫 1.jpg"), ("a/b/c.png", "c.png"),
                                             (None, "image"), ("", "image"), ("dir/", "image"), ("a\nb.png", "image"),
                                             ("\x1b[2J.png", "image"), ("x\x9b2J.png", "image"), ("x" * 101, "image")])
def test_an_upload_is_named_by_its_file_name_when_plain(filename, named):
    """Warnings and recipes name an uploaded image by its file name as the CLI names a file; a name that is not plain
    printable text of at most 100 characters leaves it "image"."""
    from unclip_cli.requests import source_name
    from unclip_cli.serve import api

    data = api.upload(b"\x89PNG", filename)
    assert data == b"\x89PNG" and source_name(data) == named and imageio._name(data, "image") == named
