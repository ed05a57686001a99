"""Device side: train CLIP in chunks; after each, held-out image->concept retrieval (en, zh; the eval's
concept texts, 32 px Lanczos images). Keeps the chunk with the best mean top-1 as RUN/frozen_clip."""
import json, lzma, shutil, sys, time
from pathlib import Path
import numpy as np, torch
from unclip_cli.train.loop import TrainOptions, build_task, train
from unclip_cli.train.stages import frozen_clip, to_unit
from unclip_cli.evaluate import retrieval

run, corpus = Path(sys.argv[1]), sys.argv[2]
seconds, chunk, batch, lr = float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
here = Path(__file__).parent
val = np.load(here / "val32.npz")
concepts = json.loads(lzma.decompress((here / "concepts.json.xz").read_bytes()))
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def options(k: int, minutes: float) -> TrainOptions:
    return TrainOptions(stage="clip", run=run, data=corpus, batch_size=batch, lr=lr, resume=k > 0, max_minutes=minutes,
                        checkpoint_minutes=1e9)


# One task for all chunks: building it (fitting the vocabulary, tokenising every caption) costs more than
# a chunk of GPU training. Each resumed chunk loads its state into the same model.
task = build_task(options(0, chunk), dev)
keep = run / "clip-chunks"
keep.mkdir(parents=True, exist_ok=True)


@torch.no_grad()
def score(clip):
    img = torch.cat([clip.encode_image(to_unit(val["images"][s:s + 256]).to(dev)) for s in range(0, len(val["images"]), 256)])
    out = {}
    for lang in concepts["langs"]:
        texts = concepts["concept_text"][lang]
        idx = [i for i, t in enumerate(texts) if t]
        emb = torch.cat([clip.encode_text(clip.tokenize([texts[i] for i in idx[s:s + 512]])[0].to(dev))[0] for s in range(0, len(idx), 512)])
        col = {c: j for j, c in enumerate(idx)}
        has = np.array([o in col for o in val["own"]])
        scores = (img[torch.from_numpy(has).to(dev)] @ emb.T).float().cpu().numpy()
        pos = np.zeros_like(scores, dtype=bool)
        pos[np.arange(len(scores)), [col[o] for o in val["own"][has]]] = True
        out[lang] = retrieval(scores, pos)
    return out


start, k, best = time.time(), 0, None
while time.time() - start < seconds - 5:
    t = time.time()
    res = train(options(k, min(chunk, (seconds - (time.time() - start)) / 60)), task=task)
    (run / "frozen_clip.safetensors").unlink(missing_ok=True)
    clip, uid, extra = frozen_clip(run, dev)
    clip.eval()
    m = score(clip)
    mean = (m["en"]["top1"] + m.get("zh", m["en"])["top1"]) / 2
    shutil.copy(run / "frozen_clip.safetensors", keep / f"chunk-{k}.safetensors")
    print(json.dumps({"chunk": k, "step": res["step"], "images_seen": res["images_seen"], "loss_avg": res["loss_avg"],
                      "secs": round(time.time() - t, 1), "val": m, "mean_top1": mean}), flush=True)
    if best is None or mean > best[1]:
        best = (k, mean)
    elif k - best[0] >= 2:
        print("held-out retrieval fell for two chunks: stopping", flush=True)
        break
    k += 1
shutil.copy(keep / f"chunk-{best[0]}.safetensors", run / "frozen_clip.safetensors")
print(json.dumps({"chosen_chunk": best[0], "mean_top1": best[1]}), flush=True)
