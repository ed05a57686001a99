"""A seeded fuzz of `unclip serve`'s request parsing (issue 23): a few hundred generated JSON and multipart
requests, each sent by a real HTTP client to a real server over the tiny set. Whatever comes in, the answer
is never a 500, a refusal is always OpenAI's error shape, and a refused request never runs the model.

The cases are drawn from a fixed seed, so every run sends the same requests; a failure names its case.
"""

from __future__ import annotations

import io
import json
import random
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette", reason="the serve extra is not installed: pip install 'unclip-cli[serve]'")
httpx = pytest.importorskip("httpx", reason="the test extra is not installed: pip install 'unclip-cli[test]'")

from unclip_cli.serve.app import Settings, create_app  # noqa: E402
from unclip_cli.serve.server import running  # noqa: E402

KEY = "fuzz-key"
STEPS = {"prior_steps": 1, "decoder_steps": 1, "upsampler_steps": 1}
SEED = 23
JSON_CASES, FORM_CASES = 260, 200
MAX_BODY = 256 * 2**10


class Counted:
    def __init__(self, engine):
        self.engine, self.runs = engine, 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def run(self, request, callback=None):
        self.runs += 1
        return self.engine.run(request, callback)


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _images(rng: random.Random) -> list[bytes]:
    """Uploads: good and bad images, and bytes that are no image at all."""
    noise = Image.fromarray(np.random.default_rng(SEED).integers(0, 256, (12, 20, 3), dtype=np.uint8), "RGB")
    holed = noise.convert("RGBA")
    holed.putpixel((3, 3), (0, 0, 0, 0))
    mask = Image.new("RGBA", (20, 12), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (2, 2, 8, 8))
    gif = io.BytesIO()
    noise.convert("P").save(gif, format="GIF")
    huge = bytearray(_png(Image.new("L", (1, 1))))  # a header claiming 100000x100000 pixels
    huge[16:24] = struct.pack(">II", 100_000, 100_000)
    huge[29:33] = struct.pack(">I", zlib.crc32(bytes(huge[12:29])))
    good = _png(noise)
    return [good, _png(holed), _png(mask), _png(Image.new("L", (20, 12), 255)), gif.getvalue(), bytes(huge), good[:40], b"",
            b"GIF89a" + bytes(rng.randrange(256) for _ in range(30)), bytes(rng.randrange(256) for _ in range(200)),
            _png(Image.new("RGB", (1, 1))), _png(Image.new("I;16", (4, 4)))]


TEXTS = ["a cat", "cat face", "猫", "🐱 rocket", "", "   ", "x" * 5000, "cat \ud800", "\udcff face", "a \udfff b", "a\x1b[2Jb", "a\nb", "\u202eevil", "\x00",
         "NaN", "auto", "true", "1", "-1", "0", "11", "1e999", "0x10", " 3 ", "２", "1.5", "256x256", "16x16", "1024x1536", "b64_json", "url",
         "png", "webp", "jpeg", "low", "hd", "transparent", "opaque", "a cat", "a dog"]
VALUES = [None, True, False, 0, -1, 1, 2, 3, 10, 11, 10**30, -(10**30), 1.5, 0.3, 2.5, float("nan"), [], {}, [1, 2], {"a": 1}, *TEXTS]
FIELDS = ["prompt", "n", "size", "quality", "response_format", "seed", "stream", "background", "output_format", "output_compression",
          "model", "user", "style", "moderation", "strength", "frames", "to", "from", "amount", "mask", "image", "invented", "markup"]


def _json_case(rng: random.Random) -> tuple[bytes, str]:
    """(body, content type) for POST /v1/images/generations."""
    kind = rng.random()
    if kind < 0.7:
        fields = {"prompt": rng.choice(["a cat", "cat face", "猫"] if rng.random() < 0.7 else TEXTS)} if rng.random() < 0.6 else {}
        for name in rng.sample(FIELDS, rng.randrange(0, 4)):
            fields[name] = rng.choice(VALUES)
        fields.setdefault("response_format", "b64_json")
        text = json.dumps(fields)  # NaN goes out as the bare literal: not JSON, but Python's json reads it
        return text.encode(), rng.choice(["application/json", "application/json; charset=utf-8", "application/vnd.x+json"])
    body = rng.choice([b"", b"{", b"[1, 2]", b'"prompt"', b"null", b"{\"prompt\": \"a \xff cat\"}", b"\xef\xbb\xbf{\"prompt\": \"x\"}",
                       b"[" * 5000 + b"]" * 5000, b'{"prompt": "x", "n": 1e999}', b'{"prompt": "x", "n": 2, "n": "two"}',
                       b'{"prompt": "x", "seed": 123456789012345678901234567890}', b"\x00\x01\x02", b'{"prompt": "\\ud800"}',
                       b'{"prompt": ' + b'"' + b"a" * (MAX_BODY + 10) + b'"}', bytes(rng.randrange(256) for _ in range(64))])
    return body, rng.choice(["application/json", "text/plain", "multipart/form-data", "", "application/x-www-form-urlencoded"])


def _form_case(rng: random.Random, images: list[bytes]) -> tuple[str, bytes, str]:
    """(path, body, content type): a multipart form, sometimes broken on purpose."""
    path = rng.choice(["/v1/images/edits", "/v1/images/variations", "/v1/unclip/blend", "/v1/unclip/nudge"])
    boundary = "fuzz" + "".join(rng.choice("abcdef0123456789") for _ in range(12))
    parts: list[tuple[str, bytes, str | None]] = []
    for _ in range(rng.choice([0, 1, 1, 1, 2, 2, 6])):
        parts.append((rng.choice(["image", "image[]", "mask", "image_a", "image_b", "other"]), rng.choice(images), rng.choice(["a.png", "x\r\ny.png", "../../etc/passwd", "猫.png"])))
    wanted = {"/v1/images/edits": ["prompt"], "/v1/unclip/nudge": ["to"]}.get(path, [])
    for name in wanted + rng.sample(FIELDS, rng.randrange(0, 4)):
        value = rng.choice(TEXTS) if name not in wanted or rng.random() < 0.4 else "a cat"
        parts.append((name, value.encode("utf-8", "surrogatepass") if rng.random() < 0.9 else b"a \xff\xfe cat", None))
    parts.append(("response_format", b"b64_json", None))
    out = io.BytesIO()
    for name, data, filename in parts:
        out.write(f"--{boundary}\r\n".encode())
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out.write(f"Content-Disposition: {disposition}\r\n".encode("utf-8", "surrogatepass"))
        if filename is not None:
            out.write(b"Content-Type: application/octet-stream\r\n")
        out.write(b"\r\n" + data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    body, kind = out.getvalue(), f"multipart/form-data; boundary={boundary}"
    spoil = rng.random()
    if spoil < 0.08:
        body = body[: rng.randrange(len(body))]  # cut short
    elif spoil < 0.12:
        kind = "multipart/form-data"  # no boundary
    elif spoil < 0.16:
        kind = "multipart/form-data; boundary=other"
    elif spoil < 0.19:
        body = body.replace(b"\r\n", b"\n")
    elif spoil < 0.21:
        kind = "application/json"
    return path, body, kind


def test_fuzzed_requests_are_answered_in_openai_shape_and_refusals_run_nothing(tiny_engine):
    rng = random.Random(SEED)
    engine = Counted(tiny_engine)
    app = create_app(engine, Settings(api_key=KEY, steps=STEPS, max_body_bytes=MAX_BODY, allowed_hosts=("127.0.0.1", "localhost", "::1")))
    images = _images(rng)
    cases = [("/v1/images/generations", *_json_case(rng)) for _ in range(JSON_CASES)] + [_form_case(rng, images) for _ in range(FORM_CASES)]
    seen: dict[int, int] = {}
    with running(app) as (url, _), httpx.Client(base_url=url, timeout=60, trust_env=False,
                                                 headers={"Authorization": f"Bearer {KEY}"}) as c:
        for i, (path, body, kind) in enumerate(cases):
            runs = engine.runs
            r = c.post(path, content=body, headers={"content-type": kind} if kind else {})
            where = f"case {i}: POST {path} ({kind!r}, {len(body)} bytes {body[:120]!r}) -> {r.status_code} {r.text[:300]}"
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            assert r.status_code < 500, where
            if r.status_code == 200:
                assert engine.runs == runs + 1, where
                assert set(r.json()) == {"created", "data"} and r.json()["data"], where
                continue
            assert engine.runs == runs, where  # refused: the model did not run
            error = r.json()
            assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "param", "code"}, where
            assert error["error"]["type"] == "invalid_request_error" and isinstance(error["error"]["message"], str), where
            assert error["error"]["param"] is None or isinstance(error["error"]["param"], str), where
    # The generator reaches both outcomes: some requests run, most are refused.
    assert seen.get(200, 0) >= 10 and seen.get(400, 0) >= len(cases) // 2, seen
