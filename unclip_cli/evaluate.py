"""Quality measurements of a model set on held-out data: the library behind `unclip eval`.

Two layers, kept apart so that the numbers can be trusted:

- pure metric functions on arrays (retrieval top-k, the "own concept among 100" rate, the Fréchet
  distance, blend monotonicity, pixels changed outside a mask, ...), tested on constructed cases whose
  answers are known;
- the runner, `evaluate(engine, data, settings)`, which makes images with the engine, embeds them with
  the model set's own CLIP and feeds the metric functions. It is silent: it returns a dict and reports
  progress through a callback.

Every image the runner makes comes from fixed seeds, and `Settings` (stored in the output) says how
many of everything were used. For speed on CPUs the runner batches across prompts and images (a batch
of 1 is several times slower per image there): it hands the engine many requests at once
(`Engine.run_many`), the same requests the CLI builds, with the same per-image seeds, so image i is the one
`unclip generate PROMPT --seed SEED` draws, up to the rounding of another batch size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from unclip_cli.errors import DataError
from unclip_cli.progress import Callback, Tick, Warnings

LANGS = ("en", "zh")


# ==================================================================================================
# Pure metrics


def topk_hits(scores: np.ndarray, positives: np.ndarray, k: int) -> np.ndarray:
    """Per query, the probability that a positive candidate is among the top k, ties broken at random.

    scores (Q, C), positives (Q, C) bool with at least one True per row -> (Q,) in [0, 1]. With random
    tie-breaking a constant scorer gets exactly chance (k / C for one positive), not 0 or 1.
    """
    scores, positives = np.asarray(scores, dtype=np.float64), np.asarray(positives, dtype=bool)
    if scores.shape != positives.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and positives {positives.shape} must be the same (Q, C) shape")
    if not positives.any(axis=1).all():
        raise ValueError("every query needs at least one positive candidate")
    out = np.empty(len(scores))
    for q, (s, pos) in enumerate(zip(scores, positives)):
        best = s[pos].max()
        neg = s[~pos]
        ahead = int((neg > best).sum())  # negatives certainly ranked above the best positive
        tied_neg, tied_pos = int((neg == best).sum()), int((s[pos] == best).sum())
        room = k - ahead  # places left in the top k for the tied group
        if room <= 0:
            out[q] = 0.0
        elif room > tied_neg:
            out[q] = 1.0
        else:  # 1 - P(the first `room` places of the tied group are all negatives)
            out[q] = 1.0 - math.comb(tied_neg, room) / math.comb(tied_neg + tied_pos, room)
    return out


def retrieval(scores: np.ndarray, positives: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Mean top-k hit rate for each k: {"top1": ..., "top5": ...}."""
    return {f"top{k}": float(topk_hits(scores, positives, k).mean()) for k in ks}


def candidate_draws(own: Sequence[int], n_concepts: int, k: int = 100, seed: int = 0) -> np.ndarray:
    """For each query's own concept index, that index followed by k-1 distinct other concepts drawn at
    random (all concepts when there are at most k). The draw depends only on (seed, own concept), so
    generated and real images of one concept, and its English and Chinese prompts, share it. -> (Q, k')"""
    k = min(k, n_concepts)
    rows = []
    for c in own:
        others = np.delete(np.arange(n_concepts), c)
        pick = np.random.default_rng([seed, int(c)]).choice(others, size=k - 1, replace=False)
        rows.append(np.concatenate([[c], pick]))
    return np.asarray(rows, dtype=np.int64).reshape(len(rows), k)


def own_concept_hits(image_emb: np.ndarray, concept_emb: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Top-1 retrieval of each image's own concept (column 0 of its draw) among the drawn concepts.
    image_emb (Q, D) and concept_emb (C, D) unit-norm, draws (Q, k) -> (Q,) hit probabilities."""
    scores = np.einsum("qd,qkd->qk", image_emb, concept_emb[draws])  # (Q, k)
    positives = np.zeros_like(scores, dtype=bool)
    positives[:, 0] = True
    return topk_hits(scores, positives, 1)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition (float64)."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, as in FID):
    |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    Tr (S_a S_b)^(1/2) = Tr (S_a^(1/2) S_b S_a^(1/2))^(1/2), whose argument is symmetric PSD, so two
    symmetric eigendecompositions replace scipy's general sqrtm. a (N, D), b (M, D), N, M >= 2."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Fréchet distance needs at least two samples in each set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrt_psd(cov_a)
    inner = root_a @ cov_b @ root_a
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt)
    return max(value, 0.0)  # rounding can leave -1e-15 for identical sets


# Octave bands of spatial frequency, in cycles per pixel: detail 8-16, 4-8 and 2-4 pixels across.
SHARPNESS_BANDS = ((1 / 16, 1 / 8), (1 / 8, 1 / 4), (1 / 4, 1 / 2))


def band_power(images: Sequence[Image.Image], size: int, bands=SHARPNESS_BANDS, per_image: bool = False) -> np.ndarray:
    """Mean spectral power of the images' luminance in each frequency band, at `size` px: (len(bands),), or each
    image's (N, len(bands)) with `per_image`.

    Each image is resized to size x size (bicubic) and made grey on [0, 1]; its mean is removed and a 2-D
    Hann window tapers the borders (so a border's jump adds no false detail); the power of its Fourier
    transform is summed over the frequencies of each band (radius in cycles per pixel; the top band ends
    at the Nyquist limit, inclusive) and divided by the pixel count. Soft pictures have little power in
    the high bands; grain and ringing have too much, so compare with real images band by band."""
    f = np.fft.fftfreq(size)
    radius = np.hypot(f[:, None], f[None, :])
    window = np.outer(np.hanning(size), np.hanning(size))
    masks = [(radius >= lo) & ((radius < hi) if k < len(bands) - 1 else (radius <= hi + 1e-9))
             for k, (lo, hi) in enumerate(bands)]
    rows = np.zeros((len(images), len(bands)))
    for i, img in enumerate(images):
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        grey = np.asarray(img, dtype=np.float64) @ np.array([0.299, 0.587, 0.114]) / 255
        power = np.abs(np.fft.fft2((grey - grey.mean()) * window)) ** 2 / size**2
        rows[i] = [power[m].sum() for m in masks]
    return rows if per_image else rows.sum(0) / max(1, len(images))


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of (N, D) arrays -> (N,)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)).clip(1e-12)


def blend_monotonicity(sim_a: Sequence[float], sim_b: Sequence[float]) -> float:
    """Fraction of consecutive frame pairs whose similarity to B rises while that to A falls."""
    da, db = np.diff(np.asarray(sim_a, dtype=np.float64)), np.diff(np.asarray(sim_b, dtype=np.float64))
    if len(da) == 0:
        raise ValueError("a blend needs at least two frames")
    return float(((db > 0) & (da < 0)).mean())


def blend_progress(sim_a: Sequence[float], sim_b: Sequence[float]) -> float:
    """Fraction of consecutive frame pairs that move toward B relative to A (sim_b - sim_a rises). Laxer
    than `blend_monotonicity`: mid-blend frames sit far from both ends, where the two similarities are
    small and each can wobble while the frame still moves on toward B."""
    margin = np.asarray(sim_b, dtype=np.float64) - np.asarray(sim_a, dtype=np.float64)
    if len(margin) < 2:
        raise ValueError("a blend needs at least two frames")
    return float((np.diff(margin) > 0).mean())


def pixels_changed_outside(before: np.ndarray, after: np.ndarray, repaint: np.ndarray) -> int:
    """Number of pixels outside the repaint mask whose value differs. before/after (H, W, C) uint8,
    repaint (H, W) bool, True = may change."""
    before, after = np.asarray(before), np.asarray(after)
    if before.shape != after.shape:
        raise ValueError(f"image shapes differ: {before.shape} vs {after.shape}")
    changed = (before != after).reshape(*before.shape[:2], -1).any(-1)
    return int((changed & ~np.asarray(repaint, dtype=bool)).sum())


SEAM_RADIUS = 8  # px either side of a mask border that count as the seam (the default --feather at 256 px)


def seam_score(image, repaint: np.ndarray, radius: int = SEAM_RADIUS) -> float | None:
    """How visible an edit's border is: the gradient energy (mean squared luminance step between neighbouring
    pixels, in [0, 1] units) within `radius` px of the mask's border, over that of the rest of the image.
    About 1 when the border is as busy as the picture elsewhere; a hard seam raises it. A step spread over a
    band of n px carries 1/n of its energy, so feathering lowers it as it looks: softer. The band is the same
    whatever the feather, so scores compare across feathers. None for an image too small to have pixels
    outside the band, or a mask without a border."""
    lum = np.asarray(Image.fromarray(np.asarray(image)).convert("L"), dtype=np.float64) / 255  # a PIL image or (H, W, 3) uint8
    m = torch.from_numpy(np.asarray(repaint, dtype=np.float32))[None, None]
    near_in = torch.nn.functional.max_pool2d(m, 2 * radius + 1, 1, radius)[0, 0].numpy() > 0
    near_out = torch.nn.functional.max_pool2d(1 - m, 2 * radius + 1, 1, radius)[0, 0].numpy() > 0
    band = near_in & near_out
    if not band.any() or band.all():
        return None
    steps, in_band = [], []
    for d, b in ((np.diff(lum, axis=1), band[:, 1:] & band[:, :-1]), (np.diff(lum, axis=0), band[1:] & band[:-1])):
        steps.append(d.ravel() ** 2)
        in_band.append(b.ravel())
    steps, in_band = np.concatenate(steps), np.concatenate(in_band)
    if in_band.all() or not in_band.any():
        return None
    return float(steps[in_band].mean() / max(steps[~in_band].mean(), 1e-12))


def mask_box(repaint: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box (left, top, right, bottom), PIL-style, of the True pixels of a (H, W) mask."""
    ys, xs = np.nonzero(repaint)
    if len(ys) == 0:
        raise ValueError("the mask is empty")
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def reconstruction_mse(x: torch.Tensor, target: torch.Tensor) -> float:
    """Mean squared error of images in [-1, 1], measured on the [0, 1] scale."""
    return float((((x.float().clamp(-1, 1) - target.float()) / 2) ** 2).mean())


def center_mask(size: int, fraction: float = 0.5) -> np.ndarray:
    """A (size, size) bool mask, True on a centred square whose side is `fraction` of the image."""
    side = max(1, round(size * fraction))
    lo = (size - side) // 2
    m = np.zeros((size, size), dtype=bool)
    m[lo : lo + side, lo : lo + side] = True
    return m


# ==================================================================================================
# Held-out data


@dataclass
class Item:
    """One real held-out image."""

    key: str
    image: Image.Image
    concept: str
    style: str | None
    captions: dict[str, list[str]]
    text: str  # the sample's own caption (.txt)


@dataclass
class EvalData:
    items: list[Item]  # held-out images, in a fixed (hash) order
    concepts: list[str]  # every concept of the corpus: the retrieval candidates
    concept_text: dict[str, list[str | None]]  # per language, per concept: its shortest caption
    prompts: list[dict]  # {"prompt", "lang", "concept", ["key"]}
    partners: dict[str, Image.Image]  # item key -> an image of the same concept in another style
    shards: dict[str, list[str]]
    notes: list[str] = field(default_factory=list)

    def concept_index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.concepts)}


def _hash_order(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _sample_fields(meta: dict, text: str) -> tuple[str, str | None, dict[str, list[str]]]:
    """(concept, style, captions per language) of a sample; plain img2dataset samples use their caption
    as the concept."""
    caps = meta.get("captions")
    if isinstance(caps, dict):
        captions = {lang: [c for c in caps.get(lang, []) if isinstance(c, str) and c.strip()] for lang in LANGS}
    else:
        captions = {"en": [text] if text else [], "zh": []}
    concept = str(meta.get("concept") or text or "").strip()
    return concept, meta.get("style"), captions


def load_eval_data(spec, prompts_file: str | os.PathLike | None = None, max_items: int | None = None) -> EvalData:
    """Read held-out images and the concept vocabulary from shards.

    `spec` is what `expand_shards` takes (the corpus folder, a glob, a list). Shards named `val-*` are
    the held-out split; when there are none, every shard is. The other shards contribute only their
    metadata (the concepts and captions every retrieval ranks against) and, per held-out concept, one
    image in another style (the "two real styles" reference of `vary`). Prompts come from
    `prompts_file`, else `eval_prompts.json` beside the shards, else one English and one Chinese prompt
    per held-out image (its caption).
    """
    from unclip_cli.data.shards import DEFAULT_BACKGROUND, _decode_sample, _group_members, expand_shards, iter_samples

    paths = expand_shards(spec)
    held = [p for p in paths if p.name.startswith("val-")] or paths
    rest = [p for p in paths if p not in held]
    notes = [] if any(p.name.startswith("val-") for p in paths) else ["no val-* shards: every shard is treated as held out"]

    items: list[Item] = []
    captions_of: dict[str, dict[str, set[str]]] = defaultdict(lambda: {lang: set() for lang in LANGS})
    for s in iter_samples(held):
        concept, style, caps = _sample_fields(s["meta"], s["text"])
        if not concept:
            continue
        items.append(Item(s["key"], s["image"], concept, style, caps, s["text"]))
        for lang in LANGS:
            captions_of[concept][lang].update(caps[lang])
    if not items:
        raise DataError(f"no usable held-out images in {', '.join(map(str, held))}",
                        hint="each sample needs an image and a caption or a 'concept' in its .json")
    items.sort(key=lambda it: _hash_order(it.key))
    if max_items is not None and len(items) > max_items:
        notes.append(f"used {max_items} of {len(items)} held-out images")
        items = items[:max_items]

    # Another style of each held-out concept: first from the held-out images themselves, then from
    # the other shards (read once; only the needed images are decoded).
    partners: dict[str, Image.Image] = {}
    by_concept: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        by_concept[it.concept].append(it)
    for group in by_concept.values():
        for it in group:
            other = next((o for o in group if o.style != it.style and o.style is not None), None)
            if other is not None:
                partners[it.key] = other.image
    for path in rest:
        for key, members in _group_members(path):
            try:
                meta = json.loads(members["json"]) if "json" in members else {}
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            text = members["txt"].decode("utf-8", "replace").strip() if "txt" in members else str(meta.get("caption", ""))
            concept, style, caps = _sample_fields(meta if isinstance(meta, dict) else {}, text)
            if not concept:
                continue
            for lang in LANGS:
                captions_of[concept][lang].update(caps[lang])
            needy = [it for it in by_concept.get(concept, ()) if it.key not in partners and style is not None and it.style != style]
            if needy:
                image = _decode_sample(path, key, members, DEFAULT_BACKGROUND)["image"]
                for it in needy:
                    partners[it.key] = image

    concepts = sorted(captions_of)
    concept_text = {
        lang: [min(captions_of[c][lang], key=lambda t: (len(t), t)) if captions_of[c][lang] else None for c in concepts]
        for lang in LANGS
    }
    prompts = _load_prompts(prompts_file, held, items, set(concepts), notes)
    return EvalData(items, concepts, concept_text, prompts, partners,
                    {"held_out": [str(p) for p in held], "other": [str(p) for p in rest]}, notes)


def _load_prompts(prompts_file, held, items, concepts: set[str], notes: list[str]) -> list[dict]:
    path = Path(prompts_file) if prompts_file else held[0].parent / "eval_prompts.json"
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"cannot read the prompt list {path}: {e}", hint="it must be a JSON list of {prompt, lang, concept}") from e
        prompts = [p for p in raw if isinstance(p, dict) and p.get("prompt") and p.get("concept") in concepts]
        if len(prompts) < len(raw):
            notes.append(f"{len(raw) - len(prompts)} of {len(raw)} prompts in {path.name} skipped (unknown concept or no text)")
        for p in prompts:
            p.setdefault("lang", "en")
        return prompts
    if prompts_file:
        raise DataError(f"prompt list {path} not found")
    notes.append("no eval_prompts.json: prompts are the held-out images' captions (English: the .txt; Chinese: the first)")
    prompts = []
    for it in items:
        for lang, text in (("en", it.text or next(iter(it.captions["en"]), "")), ("zh", next(iter(it.captions["zh"]), ""))):
            if text:
                prompts.append({"prompt": text, "lang": lang, "concept": it.concept, "key": it.key})
    return prompts


# ==================================================================================================
# Engine runs: requests batched across inputs (`Engine.run_many`), with the CLI's per-image seeds


def embed_images(engine, images: Sequence[Image.Image], batch: int = 64) -> np.ndarray:
    """Unit-norm CLIP image embeddings (N, D), each image prepared as `Engine.encode_image` does."""
    from unclip_cli.engine import to_tensor

    clip = engine.models.clip.model
    out = []
    with torch.no_grad():
        for s in range(0, len(images), batch):
            x = torch.stack([to_tensor(im, clip.cfg.image_size) for im in images[s : s + batch]])
            out.append(clip.encode_image(x.to(engine.device, engine.dtype)).float().cpu())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros((0, clip.cfg.embed_dim))


def embed_texts(engine, texts: Sequence[str], batch: int = 256) -> np.ndarray:
    out = [engine.encode_text(list(texts[s : s + batch]))[0].cpu() for s in range(0, len(texts), batch)]
    return torch.cat(out).numpy().astype(np.float64)


def generate_batch(engine, prompts: Sequence[str], seeds: Sequence[int], base, callback=None) -> tuple[list[Image.Image], torch.Tensor]:
    """Image i is `unclip generate prompts[i] --seed seeds[i]` with `base`'s sampling settings, all in one
    batch. Returns the images and the prior's z_i (B, D)."""
    from unclip_cli.requests import GenerateRequest

    reqs = [_like(base, GenerateRequest, prompt=p, seed=s) for p, s in zip(prompts, seeds)]
    results = engine.run_many(reqs, batch_size=len(reqs), callback=callback)
    return [r.images[0] for r in results], torch.stack([r.z_i[0] for r in results])


def _like(base, cls, **fields):
    """A request of `cls` with the sampling settings of `base` (a request) and the given fields."""
    shared = {f: getattr(base, f) for f in ("quality", "prior_steps", "decoder_steps", "upsampler_steps", "decoder_candidates",
                                           "guidance", "prior_guidance")}
    if not cls.uses_prior:
        shared.pop("prior_guidance")
    return cls(**shared, **fields)


# ==================================================================================================
# The runner


@dataclass(frozen=True)
class Settings:
    """How much of everything one evaluation uses. Stored in metrics.json beside the numbers."""

    mode: str
    prompts: int | None  # held-out prompts to generate from (None: all)
    images_per_prompt: int
    quality: str  # the engine's step preset for every sampling run
    vary_sources: int
    variations: int
    strength: float
    blend_pairs: int
    blend_frames: int
    edits: int
    candidates: int = 100  # concepts in each "own concept" draw
    max_items: int | None = None  # held-out images read (None: all)
    batch_size: int = 20
    seed: int = 0
    steps: tuple[int, int, int] | None = None  # (prior, decoder, upsampler) steps instead of the quality preset


QUICK = Settings("quick", prompts=40, images_per_prompt=1, quality="fast", vary_sources=6, variations=2, strength=0.5,
                 blend_pairs=3, blend_frames=5, edits=6, max_items=1000)
FULL = Settings("full", prompts=None, images_per_prompt=1, quality="default", vary_sources=32, variations=4, strength=0.5,
                blend_pairs=12, blend_frames=8, edits=32)


def _mean(v) -> float | None:
    v = [float(x) for x in v]
    return float(np.mean(v)) if v else None


def _n_chunks(n: int, size: int) -> int:
    return -(-n // size)


def _chunks(n: int, size: int):
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


class _Counter:
    """Progress of one section in sampler steps: `cb` is the engine callback; `add` counts other work."""

    def __init__(self, progress: Callback, section: str, total: int):
        self.progress, self.section, self.total, self.done = progress, section, max(1, total), 0

    def cb(self, tick=None) -> None:
        if not isinstance(tick, Warnings):  # a step (the engine's warnings are no work done)
            self.add(1)

    def add(self, k: int) -> None:
        self.done = min(self.total, self.done + k)
        if self.progress:
            self.progress(Tick(self.section, self.done, self.total))


SECTIONS = ("clip", "generate", "vary", "blend", "edit", "classifier")


def evaluate(engine, data: EvalData, settings: Settings = QUICK, progress: Callback = None, classifier=None,
             sections: Sequence[str] = SECTIONS) -> dict:
    """Measure a model set on held-out data: {"settings", "sampling", "seconds", "metrics", "notes"}.
    Every section states its own sample counts inside "metrics". `sections` picks some of SECTIONS (the
    classifier's scores the generated images, so it brings generate along)."""
    from unclip_cli.requests import BlendRequest, GenerateRequest

    fixed = {}
    if settings.steps:
        fixed = dict(zip(("prior_steps", "decoder_steps", "upsampler_steps"), settings.steps), decoder_candidates=1)
    base = GenerateRequest(prompt="-", quality=settings.quality, seed=settings.seed, **fixed).validated()
    steps, guidance, prior_guidance = base.steps, base.guidance_scale, base.prior_guidance_scale
    blend_steps = _like(base, BlendRequest).steps  # what `unclip blend` takes: more decoder steps
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown eval sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    wanted = set(sections) | ({"generate"} if "classifier" in sections else set())
    run = {
        "clip": _clip_section,
        "generate": _generate_section,
        "vary": _vary_section,
        "blend": _blend_section,
        "edit": _edit_section,
        "classifier": _classifier_section,
    }
    ctx = _Context(engine, data, settings, base, steps, guidance, prior_guidance, progress, blend_steps, classifier)
    metrics, seconds = {}, {}
    for name, fn in run.items():
        if name not in wanted:
            continue
        t = time.perf_counter()
        metrics.update(fn(ctx))
        seconds[name] = round(time.perf_counter() - t, 2)
    return {
        "settings": dataclasses.asdict(settings),
        "sampling": {"steps": dataclasses.asdict(steps), "blend_steps": dataclasses.asdict(blend_steps),
                     "guidance": guidance, "prior_guidance": prior_guidance},
        "seconds": seconds,
        "metrics": metrics,
        "notes": list(data.notes) + ctx.notes,
    }


@dataclass
class _Context:
    engine: object
    data: EvalData
    settings: Settings
    base: object  # a request with the sampling settings of every run
    steps: object
    guidance: float
    prior_guidance: float
    progress: Callback
    blend_steps: object  # the blend command's steps: more decoder steps than the others (engine.quality_steps)
    classifier: object = None  # a loaded concept classifier checkpoint (the independent yardstick), or None
    notes: list[str] = field(default_factory=list)
    _cache: dict = field(default_factory=dict)

    @property
    def up_steps(self) -> int:
        """Upsampler sampler steps per run: each stage reports its own."""
        return self.steps.upsampler * len(self.engine.models.upsamplers)

    def item_emb(self) -> np.ndarray:
        if "items" not in self._cache:
            self._cache["items"] = embed_images(self.engine, [it.image for it in self.data.items])
        return self._cache["items"]

    def concept_emb(self, lang: str) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings of the concepts that have a caption in `lang`, their concept indices)."""
        if lang not in self._cache:
            texts = self.data.concept_text[lang]
            idx = np.array([i for i, t in enumerate(texts) if t], dtype=np.int64)
            emb = embed_texts(self.engine, [texts[i] for i in idx]) if len(idx) else np.zeros((0, 1))
            self._cache[lang] = (emb, idx)
        return self._cache[lang]

    def sources(self, n: int) -> list[Item]:
        """Up to n held-out images of distinct concepts, those with a partner style first."""
        seen, out = set(), []
        for want_partner in (True, False):
            for it in self.data.items:
                if len(out) == n:
                    return out
                if it.concept in seen or (it.key in self.data.partners) != want_partner:
                    continue
                seen.add(it.concept)
                out.append(it)
        return out


def _clip_section(ctx: _Context) -> dict:
    """Retrieval over all concepts: each held-out image ranks every concept's caption, and each concept
    caption ranks every held-out image (a hit: any image of that concept)."""
    d = ctx.data
    index = d.concept_index()
    bar = _Counter(ctx.progress, "clip", 1)
    img = ctx.item_emb()
    own = np.array([index[it.concept] for it in d.items])
    out = {"n_images": len(d.items), "n_concepts": len(d.concepts)}
    for lang in LANGS:
        emb, idx = ctx.concept_emb(lang)
        if len(idx) == 0:
            continue
        has = np.isin(own, idx)
        if not has.any():
            continue
        pos_col = {c: j for j, c in enumerate(idx)}
        scores = img[has] @ emb.T  # (N, C)
        positives = np.zeros_like(scores, dtype=bool)
        positives[np.arange(len(scores)), [pos_col[c] for c in own[has]]] = True
        queried = np.array(sorted(set(own[has])))  # concepts with at least one held-out image
        t2i_pos = (own[has][None, :] == queried[:, None])  # (Q, N)
        t2i_scores = emb[[pos_col[c] for c in queried]] @ img[has].T
        C = len(idx)
        out[lang] = {
            "image_to_text": retrieval(scores, positives), "text_to_image": retrieval(t2i_scores, t2i_pos),
            "candidates": C, "queries_image": int(has.sum()), "queries_text": len(queried),
            "chance_image_to_text": {"top1": 1 / C, "top5": min(1.0, 5 / C)},
        }
    bar.add(1)
    return {"clip": out}


def _generate_section(ctx: _Context) -> dict:
    d, st = ctx.data, ctx.settings
    prompts = d.prompts[: st.prompts] if st.prompts else list(d.prompts)
    if not prompts:
        ctx.notes.append("no prompts: generate and prior not measured")
        return {}
    index = d.concept_index()
    jobs = [(p, j, st.seed + 1000 * i + j) for i, p in enumerate(prompts) for j in range(st.images_per_prompt)]
    total = len(jobs)
    bar = _Counter(ctx.progress, "generate", _n_chunks(total, st.batch_size) * (ctx.steps.prior + ctx.steps.decoder + ctx.up_steps))
    images, z_prior = [], []
    for sl in _chunks(total, st.batch_size):
        batch = jobs[sl]
        ims, z = generate_batch(ctx.engine, [p["prompt"] for p, _, _ in batch], [s for _, _, s in batch], ctx.base, bar.cb)
        images += ims
        z_prior.append(z.float().cpu().numpy())
    z_prior = np.concatenate(z_prior).astype(np.float64)
    ctx._cache["generated"] = (images, jobs)
    gen = embed_images(ctx.engine, images)
    items_emb = ctx.item_emb()
    item_rows = defaultdict(list)
    for r, it in enumerate(d.items):
        item_rows[it.concept].append(r)
    key_row = {it.key: r for r, it in enumerate(d.items)}

    own_rate, real_rate, n_prompts, n_candidates = {}, {}, {}, {}
    for lang in LANGS:
        emb, idx = ctx.concept_emb(lang)
        pos = {c: j for j, c in enumerate(idx)}
        sel = [n for n, (p, _, _) in enumerate(jobs) if p["lang"] == lang and index[p["concept"]] in pos]
        if not sel:
            continue
        own = [pos[index[jobs[n][0]["concept"]]] for n in sel]
        draws = candidate_draws(own, len(idx), st.candidates, st.seed)
        n_candidates[lang] = draws.shape[1]
        own_rate[lang] = float(own_concept_hits(gen[sel], emb, draws).mean())
        n_prompts[lang] = len({id(jobs[n][0]) for n in sel})
        # The ceiling: the real held-out image(s) the prompt was written for, with the same draws.
        real_hits = []
        for n, draw in zip(sel, draws):
            p = jobs[n][0]
            rows = [key_row[p["key"]]] if p.get("key") in key_row else item_rows.get(p["concept"], [])
            if rows:
                real_hits.append(own_concept_hits(items_emb[rows], emb, np.repeat(draw[None], len(rows), 0)).mean())
        if real_hits:
            real_rate[lang] = float(np.mean(real_hits))
    all_sel = [n for n, (p, _, _) in enumerate(jobs) if p["lang"] in own_rate]
    weights = {lang: sum(1 for n in all_sel if jobs[n][0]["lang"] == lang) for lang in own_rate}
    overall = sum(own_rate[lang] * w for lang, w in weights.items()) / max(1, sum(weights.values())) if own_rate else None

    real_all = items_emb
    fd = frechet_distance(gen, real_all) if len(gen) >= 2 and len(real_all) >= 2 else None
    # The same measure between two disjoint sets of real held-out images, the smaller as large as the
    # generated set where possible: what sampling noise alone gives at these sample sizes.
    order = np.random.default_rng(st.seed).permutation(len(real_all))
    m = min(len(gen), len(real_all) // 2)
    fd_ref = frechet_distance(real_all[order[:m]], real_all[order[m:]]) if m >= 2 else None

    # Prior: sampled z_i against the real z_i of the prompt's concept (mean cosine over its images),
    # beside the same against a random other concept's images.
    cos_own, cos_other = defaultdict(list), defaultdict(list)
    concepts_with_items = sorted(item_rows)
    for n, (p, _, _) in enumerate(jobs):
        rows = item_rows.get(p["concept"])
        if not rows:
            continue
        cos_own[p["lang"]].append(float((items_emb[rows] @ z_prior[n]).mean()))
        others = [c for c in concepts_with_items if c != p["concept"]]
        if others:
            c = others[np.random.default_rng([st.seed, n]).integers(len(others))]
            cos_other[p["lang"]].append(float((items_emb[item_rows[c]] @ z_prior[n]).mean()))
    return {
        "sharpness": _sharpness(images, d.items),
        "generate": {
            "own_concept_rate": {**own_rate, "all": overall},
            "own_concept_rate_real": real_rate,
            "candidates": n_candidates,
            "prompts": n_prompts,
            "images_per_prompt": st.images_per_prompt,
            "n_generated": len(gen),
            "frechet_clip": fd,
            "frechet_clip_real_vs_real": fd_ref, "n_real_vs_real": [m, len(real_all) - m],
            "n_real": len(real_all),
        },
        "prior": {
            "cosine_to_concept": {lang: _mean(v) for lang, v in cos_own.items()},
            "cosine_to_other_concept": {lang: _mean(v) for lang, v in cos_other.items()},
            "n": sum(len(v) for v in cos_own.values()),
        },
    }


def reference_size(items: Sequence[Item]) -> int:
    """The side of the real held-out images (the most common one), the size sharpness is measured at."""
    sizes = [max(it.image.size) for it in items]
    return max(set(sizes), key=sizes.count)


def _sharpness(generated: Sequence[Image.Image], items: Sequence[Item]) -> dict:
    """Generated images' power in the detail bands as a share of real held-out images', at the real images'
    size (the most common one): 1 in every band is as sharp as real; a set whose images are smaller is
    upsampled (bicubic) to that size, as a viewer would show it."""
    size = reference_size(items)
    rows, real = band_power(generated, size, per_image=True), band_power([it.image for it in items], size)
    gen = rows.mean(0) if len(rows) else np.zeros(len(SHARPNESS_BANDS))
    # the standard error of the generated mean (sampling noise: which prompts and seeds), as a share of real
    se = rows.std(0, ddof=1) / np.sqrt(len(rows)) / np.maximum(real, 1e-30) if len(rows) > 1 else None
    return {"size": size, "bands_px": [f"{round(1 / hi)}-{round(1 / lo)}" for lo, hi in SHARPNESS_BANDS],
            "generated": gen.tolist(), "real": real.tolist(), "share_of_real": (gen / np.maximum(real, 1e-30)).tolist(),
            "share_of_real_se": None if se is None else se.tolist(),
            "n_generated": len(generated), "n_real": len(items), "generated_size": max(generated[0].size) if generated else None}


def _vary_section(ctx: _Context) -> dict:
    st = ctx.settings
    src = ctx.sources(st.vary_sources)
    if not src:
        return {}
    images = [it.image for it in src]
    seeds = [st.seed + 1000 * j for j in range(len(src))]
    # Each chunk: the strength-0 reconstruction (base resolution, no upsampler: the inversion error
    # itself), then the variations, each batch inverting its images together.
    from unclip_cli.requests import VaryRequest

    chunk = max(1, st.batch_size // st.variations)
    d = ctx.steps.decoder
    bar = _Counter(ctx.progress, "vary", _n_chunks(len(src), chunk) * (2 * max(0, d - 1) + 2 * d + ctx.up_steps))
    variations, mse = [], []
    for sl in _chunks(len(src), chunk):
        x0, x = ctx.engine.reconstruct(images[sl], d, ctx.guidance, bar.cb)
        mse += [reconstruction_mse(x[i], x0[i]) for i in range(len(x0))]
        reqs = [_like(ctx.base, VaryRequest, image=im, n=st.variations, strength=st.strength, seed=s) for im, s in zip(images[sl], seeds[sl])]
        variations += [r.images for r in ctx.engine.run_many(reqs, batch_size=len(reqs) * st.variations, callback=bar.cb)]
    src_emb = embed_images(ctx.engine, images)
    var_emb = embed_images(ctx.engine, [v for vs in variations for v in vs])
    cos_var = cosine_rows(np.repeat(src_emb, st.variations, 0), var_emb)

    # References: two real styles of one concept; two different concepts.
    pair_keys = [it.key for it in ctx.data.items if it.key in ctx.data.partners][:500]
    row = {it.key: r for r, it in enumerate(ctx.data.items)}
    items_emb = ctx.item_emb()
    cos_styles = None
    if pair_keys:
        partner_emb = embed_images(ctx.engine, [ctx.data.partners[k] for k in pair_keys])
        cos_styles = _mean(cosine_rows(items_emb[[row[k] for k in pair_keys]], partner_emb))
    concepts = np.array([it.concept for it in ctx.data.items])
    rng = np.random.default_rng(st.seed)
    a, b = rng.integers(len(concepts), size=(2, 500))
    diff = concepts[a] != concepts[b]
    cos_diff = _mean(cosine_rows(items_emb[a[diff]], items_emb[b[diff]])) if diff.any() else None

    m = float(np.mean(mse))
    return {
        "vary": {
            "cosine_to_source": float(cos_var.mean()), "strength": st.strength,
            "sources": len(src), "variations_per_source": st.variations,
            "cosine_two_real_styles": cos_styles, "n_style_pairs": len(pair_keys),
            "cosine_different_concepts": cos_diff,
        },
        "inversion": {
            "mse": m, "psnr_db": float(10 * np.log10(1 / max(m, 1e-12))), "n": len(mse),
            "resolution": ctx.engine.base_size, "steps": ctx.steps.decoder,
        },
    }


def _blend_section(ctx: _Context) -> dict:
    st = ctx.settings
    src = ctx.sources(2 * st.blend_pairs)
    pairs = [(src[2 * p].image, src[2 * p + 1].image) for p in range(len(src) // 2)]
    if not pairs:
        return {}
    chunk = max(1, st.batch_size // st.blend_frames)
    steps = ctx.blend_steps
    bar = _Counter(ctx.progress, "blend", _n_chunks(len(pairs), chunk) * (max(0, steps.decoder - 1) + steps.decoder + ctx.up_steps))
    from unclip_cli.requests import BlendRequest

    frames = []
    for sl in _chunks(len(pairs), chunk):
        reqs = [_like(ctx.base, BlendRequest, image_a=a, image_b=b, frames=st.blend_frames, seed=st.seed) for a, b in pairs[sl]]
        frames += [r.images for r in ctx.engine.run_many(reqs, batch_size=len(reqs) * st.blend_frames, callback=bar.cb)]
    ends = embed_images(ctx.engine, [im for pair in pairs for im in pair])
    mono, progress, first_a, last_b = [], [], [], []
    for p, fr in enumerate(frames):
        emb = embed_images(ctx.engine, fr)
        sim_a, sim_b = emb @ ends[2 * p], emb @ ends[2 * p + 1]
        mono.append(blend_monotonicity(sim_a, sim_b))
        progress.append(blend_progress(sim_a, sim_b))
        first_a.append(sim_a[0])
        last_b.append(sim_b[-1])
    return {"blend": {"monotone_fraction": _mean(mono), "progress_fraction": _mean(progress), "pairs": len(pairs), "frames": st.blend_frames,
                      "first_frame_cosine_to_a": _mean(first_a), "last_frame_cosine_to_b": _mean(last_b)}}


def _edit_section(ctx: _Context) -> dict:
    """Repaint the centre (half the side) of held-out images with another held-out concept's caption."""
    st = ctx.settings
    src = ctx.sources(st.edits)
    if len(src) < 2:
        return {}
    index = ctx.data.concept_index()
    names = ctx.data.concept_text["en"]
    size = src[0].image.size[0]
    images = [it.image.convert("RGB").resize((size, size)) if it.image.size != (size, size) else it.image.convert("RGB") for it in src]
    prompts = [names[index[src[(j + 1) % len(src)].concept]] or src[(j + 1) % len(src)].concept for j in range(len(src))]
    repaint = center_mask(size)
    seeds = [st.seed + 1000 * j for j in range(len(src))]
    bar = _Counter(ctx.progress, "edit", _n_chunks(len(src), st.batch_size) * (ctx.steps.prior + ctx.steps.decoder + ctx.up_steps))
    from unclip_cli.requests import EditRequest

    mask = Image.fromarray(repaint.astype(np.uint8) * 255, "L")
    edited = []
    for sl in _chunks(len(src), st.batch_size):
        reqs = [_like(ctx.base, EditRequest, image=im, mask=mask, prompt=p, seed=s) for im, p, s in zip(images[sl], prompts[sl], seeds[sl])]
        edited += [r.images[0] for r in ctx.engine.run_many(reqs, batch_size=len(reqs), callback=bar.cb)]
    changed = [pixels_changed_outside(np.asarray(a), np.asarray(b), repaint) for a, b in zip(images, edited)]
    seam = [x for x in (seam_score(im, repaint) for im in edited) if x is not None]
    seam_source = [x for x in (seam_score(im, repaint) for im in images) if x is not None]
    box = mask_box(repaint)
    z_t = embed_texts(ctx.engine, prompts)
    before = cosine_rows(embed_images(ctx.engine, [im.crop(box) for im in images]), z_t)
    after = cosine_rows(embed_images(ctx.engine, [im.crop(box) for im in edited]), z_t)
    return {"edit": {
        "pixels_changed_outside_mask": int(sum(changed)), "images_with_changes_outside": int(sum(c > 0 for c in changed)),
        "prompt_score_in_mask_before": float(before.mean()), "prompt_score_in_mask_after": float(after.mean()),
        "improved_fraction": float((after > before).mean()), "n": len(src), "mask_fraction": float(repaint.mean()),
        "feather": reqs[0].feather_px, "seam_score": _mean(seam), "seam_score_of_sources": _mean(seam_source), "seam_radius": SEAM_RADIUS,
    }}


def classify(ck, images: Sequence[Image.Image], batch: int = 256) -> torch.Tensor:
    """Logits (N, concepts) of a concept classifier checkpoint for images of any size."""
    from unclip_cli.engine import to_tensor

    model = ck.model.float().eval()
    with torch.no_grad():
        out = [model(torch.stack([to_tensor(im) for im in images[s : s + batch]])) for s in range(0, len(images), batch)]
    return torch.cat(out) if out else torch.zeros(0, len(ck.extra["concepts"]))


def concept_hits(logits: torch.Tensor, labels: Sequence[int], ks=(1, 5)) -> dict[str, np.ndarray]:
    """Per image, whether its label is among the classifier's top k (label -1, a concept the classifier
    never saw in training, is a miss): {"top1": (N,), "top5": (N,)}."""
    scores = logits.double().numpy()
    out = {}
    for k in ks:
        hits = np.zeros(len(labels))
        known = [n for n, c in enumerate(labels) if c >= 0]
        if known:
            positives = np.zeros((len(known), scores.shape[1]), dtype=bool)
            positives[np.arange(len(known)), [labels[n] for n in known]] = True
            hits[known] = topk_hits(scores[known], positives, k)
        out[f"top{k}"] = hits
    return out


def _classifier_section(ctx: _Context) -> dict:
    """The independent yardstick: a concept classifier trained apart from the model set (no CLIP, training
    split only) names the concept of each generated image, beside the same on real held-out images."""
    if ctx.classifier is None:
        ctx.notes.append("no concept classifier given (--classifier): the independent yardstick was not measured")
        return {}
    if "generated" not in ctx._cache:
        return {}
    images, jobs = ctx._cache["generated"]
    index = {c: k for k, c in enumerate(ctx.classifier.extra["concepts"])}
    items = ctx.data.items
    real = concept_hits(classify(ctx.classifier, [it.image for it in items]), [index.get(it.concept, -1) for it in items])
    gen = concept_hits(classify(ctx.classifier, images), [index.get(p["concept"], -1) for p, _, _ in jobs])
    key_row = {it.key: r for r, it in enumerate(items)}
    out = {"generated": {}, "real_for_the_same_prompts": {}, "share_of_real": {}, "prompts": {}}
    for lang in LANGS:
        sel = [n for n, (p, _, _) in enumerate(jobs) if p["lang"] == lang]
        rows = [key_row[jobs[n][0]["key"]] for n in sel if jobs[n][0].get("key") in key_row]
        if not sel:
            continue
        out["prompts"][lang] = len(sel)
        out["generated"][lang] = {k: float(v[sel].mean()) for k, v in gen.items()}
        if rows:
            out["real_for_the_same_prompts"][lang] = {k: float(v[rows].mean()) for k, v in real.items()}
            out["share_of_real"][lang] = {k: out["generated"][lang][k] / max(out["real_for_the_same_prompts"][lang][k], 1e-9)
                                          for k in gen}
    out["real_all_held_out"] = {k: float(v.mean()) for k, v in real.items()}
    out["n_real"] = len(items)
    out["classes"] = len(index)
    out["unknown_concepts"] = int(sum(index.get(p["concept"], -1) < 0 for p, _, _ in jobs))
    out["classifier"] = {"uid": ctx.classifier.extra.get("uid"), "trained_steps": ctx.classifier.extra.get("trained_steps")}
    return {"classifier": out}


# ==================================================================================================
# Facts about the run


def machine_info(device: str | torch.device | None = None) -> dict:
    """CPU model, cores, torch and Python versions, and the accelerator if one is used."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    info = {"cpu": cpu, "cores": cores, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(terse=True)}
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info
