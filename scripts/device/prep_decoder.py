"""Device side: rebuild the decoder's training cache (SIZE px, as packed) from the staged parts under
RUN/cache/cache-SIZE, derive the 32 px one CLIP reads if SIZE is not 32 (RUN/cache/cache-32, Lanczos as
`unclip data cache` resizes), and make them valid for CORPUS, a folder of empty placeholder shards with the
original names (training reads only the caches).

Usage: python prep_decoder.py STAGE CORPUS RUN    (STAGE holds part-*, parts.json and records.json.xz)
"""
import hashlib
import json
import lzma
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from unclip_cli.data.cache import _fingerprint, square_resize

stage, corpus, run = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
t0 = time.time()
manifest = json.loads((stage / "parts.json").read_text())
missing = [name for name in manifest["sha256"] if not (stage / name).is_file()]
if missing:
    sys.exit(f"MISSING {', '.join(missing)}: make the staging calls first (scripts/device/README.md)")
data = bytearray()
for name, digest in sorted(manifest["sha256"].items()):
    chunk = (stage / name).read_bytes()
    if hashlib.sha256(chunk).hexdigest() != digest:
        sys.exit(f"DAMAGED {name}: stage it again")
    data += chunk
header = json.loads(lzma.decompress((stage / "records.json.xz").read_bytes()))
n, s = manifest["images"], manifest["size"]
sorted_images = np.frombuffer(lzma.decompress(bytes(data)), dtype=np.uint8).reshape(n, s, s, 3)
images = np.empty_like(sorted_images)
images[np.array(header.pop("order"))] = sorted_images  # back to the cache's own row order

corpus.mkdir(parents=True, exist_ok=True)
shards = [corpus / Path(sh["path"]).name for sh in header["shards"]]
for p in shards:
    p.touch()
header["shards"] = _fingerprint(shards)
for size, pixels in ((s, images), (32, None))[: 1 if s == 32 else 2]:
    out = run / "cache" / f"cache-{size}"
    out.mkdir(parents=True, exist_ok=True)
    if pixels is None:
        pixels = np.stack([np.asarray(square_resize(Image.fromarray(im), size)) for im in images])
    pixels.tofile(out / f"images-{size}.u8")
    (out / "records.json").write_text(json.dumps({**header, "size": size}, ensure_ascii=False))
print(f"prep_decoder: {n} images at {' and '.join(sorted({str(s), '32'}))} px, {len(shards)} placeholder shards, {time.time() - t0:.1f} s", flush=True)
