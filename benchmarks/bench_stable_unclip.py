"""A converted Stable unCLIP set against diffusers' Stable unCLIP pipelines, same machine, same run: seconds per image.

    python benchmarks/bench_stable_unclip.py --device cuda                          # a GPU: -small at 768 px, fp16, every operation
    python benchmarks/bench_stable_unclip.py --device cuda --variant h --ops vary    # -unclip (ViT-H), variations only
    python benchmarks/bench_stable_unclip.py --device cuda --offload on              # one network at a time, as on a small GPU
    python benchmarks/bench_stable_unclip.py --size reduced --device cpu --steps 2 2 --repeats 1 --no-results   # CPU smoke test

    # The CPU measurement at 512 px (seconds per decoder step, peak memory), on an idle machine, in two processes so the
    # peak is the engine's alone: the first builds and converts (random weights, ~7 GB of RAM), the second measures.
    python benchmarks/bench_stable_unclip.py --device cpu --prepare-only --workdir ~/unclip-runs/bench-su
    python benchmarks/bench_stable_unclip.py --device cpu --workdir ~/unclip-runs/bench-su --px 512 --cpu-steps

Builds random-weight pipelines with diffusers' and transformers' own classes from the hub's config files
(tests/data/stable-unclip-hub: `stabilityai/stable-diffusion-2-1-unclip-small` or `-unclip`; size `full`, or `reduced`:
the test fixture's layer counts and widths) and, for -small, Karlo's prior and its text encoder from Karlo's hub configs
(tests/data/karlo-hub); saves them with the hub's config texts, converts them with `unclip convert stable-unclip`'s code,
and times each operation: where diffusers has a pipeline for it, both ways with the same steps and batch
(`vary` at strength 1 against StableUnCLIPImg2ImgPipeline, `generate` against StableUnCLIPPipeline, each with its own
noise), else ours alone (`blend`, `nudge`, `edit`, `mix`: no diffusers counterpart). Each time is the median of
`--repeats` runs after a warm-up. Random weights make meaningless pictures at the speed of real ones. Peak accelerator
memory per side; on a CPU, the process's peak resident memory.

`--cpu-steps` times `vary` at two decoder step counts and reports the difference per step (the seconds one guided UNet
step takes) and the rest (image encoder, VAE encode/decode), plus the process's peak resident memory. Needs diffusers
and transformers.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_run_options, append_results, apply_threads, load_note, machine_lines, peak_reset, timed  # noqa: E402

import torch  # noqa: E402

OPS = ("vary", "generate", "blend", "nudge", "edit", "mix")
PROMPT = "a photo of a corgi on a beach"




def _peak(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB RSS (process)"



def prepare(args, dtype, work: Path):
    """Build, save and convert (skipped where `work` already holds the converted set): (the diffusers folder, Karlo's
    prior folder or None, the converted set). Each pipeline is freed once saved (full size, by parameter count: ~6.5 GB, then ~4.6 GB)."""
    from unclip_cli.convert import random_karlo, stable_unclip
    from unclip_cli.convert import random_stable_unclip as R

    folder = R.HUB_FOLDERS[0 if args.variant == "small" else 1]
    src, prior, dst = work / folder, (work / "karlo-v1-alpha") if args.variant == "small" else None, work / "converted"
    if (dst / "decoder.safetensors").is_file() and (src / "model_index.json").is_file():
        return src, prior, dst
    configs = R.hub_configs(folder)
    configs = R.reduce(configs) if args.size == "reduced" else configs
    print(f"building a random {args.size} {folder} on {args.device}…", file=sys.stderr)
    pipe = R.build_from_configs(configs, seed=0, device=args.device, dtype=dtype)
    R.save_as_hub(pipe, configs, src)
    del pipe
    gc.collect()
    if prior is not None:
        R.save_karlo_prior(prior, seed=1, changes=random_karlo.REDUCED if args.size == "reduced" else {})
    print("converting…", file=sys.stderr)
    stable_unclip.convert(src, dst, prior=prior, dtype=torch.float16 if dtype == torch.float16 else torch.float32, force=True)
    return src, prior, dst


def inputs(px: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    a, b = (Image.fromarray((rng.random((px, px, 3)) * 255).astype(np.uint8)) for _ in range(2))
    mask = Image.new("L", (px, px), 0)
    mask.paste(255, (px // 4, px // 4, 3 * px // 4, 3 * px // 4))
    return a, b, mask


def requests(ops, n: int, steps, px: int | None):
    from unclip_cli.requests import BlendRequest, EditRequest, GenerateRequest, MixRequest, NudgeRequest, VaryRequest

    a, b, mask = inputs(px or 768)
    ps, ds = steps
    common = dict(seed=0, decoder_steps=ds, batch_size=n, size=px)
    made = {"vary": VaryRequest(image=a, n=n, strength=1.0, **common),
            "generate": GenerateRequest(prompt=PROMPT, n=n, prior_steps=ps, **common),
            "blend": BlendRequest(image_a=a, image_b=b, frames=max(2, n), **common),
            "nudge": NudgeRequest(image=a, to="a cat", n=n, **common),
            "edit": EditRequest(image=a, mask=mask, prompt=PROMPT, n=n, prior_steps=ps, **common),
            "mix": MixRequest(images=[a, b], prompts=[PROMPT], n=n, prior_steps=ps, **common)}
    return {op: made[op] for op in ops}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=("small", "h"), default="small", help="-unclip-small (ViT-L, with Karlo's prior) or -unclip (ViT-H)")
    ap.add_argument("--size", choices=("reduced", "full"), default="full")
    ap.add_argument("--px", type=int, default=None, help="output size (default: the set's own, 768 for the full configs)")
    ap.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    ap.add_argument("--offload", choices=("auto", "on", "off"), default="off", help="unclip's --offload (default off: all on the device)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("float16", "float32"), default=None, help="default: float16 on CUDA, float32 on CPU")
    ap.add_argument("-n", type=int, default=1, help="images per run (one batch)")
    ap.add_argument("--steps", type=int, nargs=2, default=(25, 20), metavar=("PRIOR", "DECODER"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", help="where the random pipelines and the converted set go (kept and reused; default: a temporary folder)")
    ap.add_argument("--prepare-only", action="store_true", help="build, save and convert into --workdir, then stop")
    ap.add_argument("--cpu-steps", action="store_true", help="seconds per decoder step and peak memory of vary (ours only)")
    add_run_options(ap)
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    start_load = os.getloadavg()
    dtype = getattr(torch, args.dtype or ("float16" if args.device.startswith("cuda") else "float32"))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-stable-unclip-")).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    if args.variant == "h":
        args.ops = [op for op in args.ops if op not in ("generate", "edit", "mix")]  # no prior makes ViT-H embeddings
    t0 = time.perf_counter()
    src, prior, dst = prepare(args, dtype, work)
    t_prepare = time.perf_counter() - t0
    if args.prepare_only:
        print(f"prepared in {t_prepare:.0f} s: {dst}", file=sys.stderr)
        return 0

    from unclip_cli.engine import Engine

    peak_reset(args.device)
    t0 = time.perf_counter()
    engine = Engine.load(dst, device=args.device, dtype=dtype, offload=args.offload)
    load_s = time.perf_counter() - t0
    px = args.px or engine.image_size
    body = machine_lines() + [
        load_note(start_load),
        f"- Device: {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
        + f", {str(dtype).replace('torch.', '')}; unclip --offload {args.offload}",
        f"- Random-weight {src.name} (`{args.size}` configs) converted{' with Karlo' + chr(39) + 's prior' if prior else ''}; "
        f"{sum(f.stat().st_size for f in dst.glob('*.safetensors')) / 1e9:.2f} GB; prepared in {t_prepare:.0f} s; unclip loaded it "
        f"in {load_s:.1f} s (networks read on first use)",
    ]
    if args.cpu_steps:
        from unclip_cli.requests import VaryRequest

        a = inputs(px)[0]
        lo, hi = 2, 4
        run = {k: timed(lambda k=k: engine.run(VaryRequest(image=a, seed=0, strength=1.0, decoder_steps=k, size=args.px)), args.device,
                        args.repeats)[0] for k in (lo, hi)}
        per_step = (run[hi] - run[lo]) / (hi - lo)
        body += [f"- `vary` at {px} px, 1 image: {run[lo]:.1f} s with {lo} decoder steps, {run[hi]:.1f} s with {hi}: "
                 f"**{per_step:.1f} s per guided decoder step**, {run[lo] - lo * per_step:.1f} s for the rest (image encoder, VAE); "
                 f"peak memory {_peak(args.device)}; median of {args.repeats} runs after a warm-up",
                 f"- So a 20-step `vary` at {px} px: about {(run[lo] - lo * per_step + 20 * per_step) / 60:.1f} min per image"]
        print("\n".join(body))
        if not args.no_results:
            print(f"appended to {append_results(f'Stable unCLIP on the CPU ({src.name}, {px} px)', body)}", file=sys.stderr)
        return 0

    n, (ps, ds) = args.n, args.steps
    results: dict[str, dict[str, tuple]] = {}
    for op, req in requests(args.ops, n, (ps, ds), args.px).items():
        print(f"timing unclip {op}…", file=sys.stderr)
        peak_reset(args.device)
        results[op] = {"unclip": timed(lambda req=req: engine.run(req), args.device, args.repeats) + (_peak(args.device),)}
    del engine
    gc.collect()  # unclip's engine is gone before diffusers' peak is measured

    theirs_ops = [op for op in ("vary", "generate") if op in args.ops]
    if theirs_ops:
        from diffusers import DDPMScheduler, StableUnCLIPImg2ImgPipeline, StableUnCLIPPipeline
        from diffusers.models import PriorTransformer
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        img2img = StableUnCLIPImg2ImgPipeline.from_pretrained(src, torch_dtype=dtype).to(args.device)
        img2img.set_progress_bar_config(disable=True)
        gen = torch.Generator(args.device).manual_seed(0)
        a = inputs(px)[0]
        if "vary" in theirs_ops:
            print("timing diffusers vary…", file=sys.stderr)
            peak_reset(args.device)
            results["vary"]["diffusers"] = timed(lambda: img2img(image=a, num_inference_steps=ds, num_images_per_prompt=n, height=px,
                                                                 width=px, generator=gen, output_type="np"),
                                                 args.device, args.repeats) + (_peak(args.device),)
        if "generate" in theirs_ops:
            # Karlo's prior under DDPM with its cosine schedule written out (see random_stable_unclip.text_to_image)
            sched = {k: v for k, v in DDPMScheduler.load_config(prior, subfolder="prior_scheduler").items() if not k.startswith("_")}
            c = img2img.components
            text2img = StableUnCLIPPipeline(
                prior_tokenizer=CLIPTokenizer.from_pretrained(prior, subfolder="tokenizer"),
                prior_text_encoder=CLIPTextModelWithProjection.from_pretrained(prior, subfolder="text_encoder", torch_dtype=dtype),
                prior=PriorTransformer.from_pretrained(prior, subfolder="prior", torch_dtype=dtype),
                prior_scheduler=DDPMScheduler(**{**sched, "beta_schedule": "squaredcos_cap_v2"}),
                **{k: c[k] for k in ("image_normalizer", "image_noising_scheduler", "tokenizer", "text_encoder", "unet", "scheduler", "vae")},
            ).to(args.device)
            text2img.set_progress_bar_config(disable=True)
            print("timing diffusers generate…", file=sys.stderr)
            peak_reset(args.device)
            results["generate"]["diffusers"] = timed(lambda: text2img(PROMPT, num_images_per_prompt=n, prior_num_inference_steps=ps,
                                                                      num_inference_steps=ds, height=px, width=px, generator=gen,
                                                                      output_type="np"),
                                                     args.device, args.repeats) + (_peak(args.device),)

    body += [
        f"- {n} image(s) per run at {px} px in one batch, prior {ps} / decoder {ds} steps (blend: {max(2, n)} frames; edit repaints the middle "
        f"quarter); the sets' own guidance (decoder 10, prior 4); median of {args.repeats} runs after a warm-up",
        "",
        "| operation | implementation | s per run | s per image | runs (s) | peak memory |",
        "|---|---|---|---|---|---|",
    ]
    for op, sides in results.items():
        for name, (med, times, peak) in sides.items():
            body.append(f"| {op} | {name} | {med:.2f} | {med / n:.2f} | {', '.join(f'{t:.2f}' for t in times)} | {peak} |")
        if "diffusers" not in sides:
            body.append(f"| {op} | diffusers | — (no pipeline does this) | | | |")
    print("\n".join(body))
    if not args.no_results:
        print(f"appended to {append_results(f'Stable unCLIP — unclip vs diffusers ({src.name}, {args.size}, {args.device})', body)}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
