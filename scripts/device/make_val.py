"""Here: the held-out check data clip_phase.py reads on the device machine (val32.npz, concepts.json).
Usage: python make_val.py CORPUS OUT_DIR"""
import json
import sys
from pathlib import Path

import numpy as np

from unclip_cli.data.cache import square_resize
from unclip_cli.evaluate import LANGS, load_eval_data

data, out = load_eval_data(sys.argv[1]), Path(sys.argv[2])
index = {c: i for i, c in enumerate(data.concepts)}
images = np.stack([np.asarray(square_resize(it.image.convert("RGB"), 32), dtype=np.uint8) for it in data.items])
np.savez_compressed(out / "val32.npz", images=images, own=np.array([index[it.concept] for it in data.items]))
(out / "concepts.json").write_text(json.dumps({"concept_text": data.concept_text, "langs": list(LANGS)}, ensure_ascii=False))
print(f"{len(images)} held-out images, {len(data.concepts)} concepts")
