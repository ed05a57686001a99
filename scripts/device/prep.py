"""Device side: unpack the carried 32 px image cache under RUN/cache/cache-32 and make it valid for CORPUS,
a folder of empty placeholder shards with the original names (training reads only the cache)."""
import json, lzma, shutil, sys
from pathlib import Path
from unclip_cli.data.cache import _fingerprint

corpus, run = Path(sys.argv[1]), Path(sys.argv[2])
here = Path(__file__).parent
out = run / "cache" / "cache-32"
out.mkdir(parents=True, exist_ok=True)
corpus.mkdir(parents=True, exist_ok=True)
header = json.loads(lzma.decompress((here / "records.json.xz").read_bytes()))
shards = [corpus / Path(s["path"]).name for s in header["shards"]]
for p in shards:
    p.touch()
header["shards"] = _fingerprint(shards)
with lzma.open(here / "images-32.u8.xz") as src, open(out / "images-32.u8", "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 24)
(out / "records.json").write_text(json.dumps(header, ensure_ascii=False))
n = len(header["records"])
assert (out / "images-32.u8").stat().st_size == n * 32 * 32 * 3
print(f"prep: {n} images, {len(shards)} placeholder shards", flush=True)
