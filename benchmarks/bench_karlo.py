"""A converted Karlo set against diffusers' UnCLIPPipeline, same machine, same run: seconds per image.

    python benchmarks/bench_karlo.py --size karlo --device cuda            # a GPU: Karlo itself, fp16, 4 images
    python benchmarks/bench_karlo.py --size karlo --device cuda --offload on   # as on a 12 GB GPU: one network at a time
    python benchmarks/bench_karlo.py --size reduced --device cpu --steps 2 2 2 --repeats 1 --no-results   # CPU smoke test

Builds a random-weight Karlo pipeline with diffusers' own classes from the hub's own config files
(tests/data/karlo-hub; size `karlo`: kakaobrain/karlo-v1-alpha's, 3,726 M parameters, ~7.4 GB in fp16; `reduced`:
the test fixture's layer counts and widths), saves it with the hub's config texts, converts it with `unclip convert
karlo`'s code, and then times text-to-image both ways with the same steps and batch: our engine (`Engine.run`, the
set's own recipe) and diffusers' pipeline, each after a warm-up run, each the median of `--repeats` runs. Random
weights make meaningless pictures at the speed of real ones. Peak accelerator memory is reported per side: unclip's
while diffusers' pipeline waits on the host, diffusers' after unclip's engine is freed. Needs diffusers and transformers.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_run_options, append_results, apply_threads, load_note, machine_lines, peak_reset, timed  # noqa: E402

import torch  # noqa: E402




def _peak(device: str) -> str:
    return f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.startswith("cuda") else "n/a (CPU)"



def prepare(size: str, device: str, dtype: torch.dtype, work: Path):
    """A random-weight Karlo pipeline of `size` built by diffusers' classes from the hub's configs, saved with the hub's
    texts and converted: (the pipeline, on the host; the converted set's folder; facts for the report)."""
    from unclip_cli.convert import karlo, random_karlo

    t0 = time.perf_counter()
    print(f"building a random {size} pipeline on {device}…", file=sys.stderr)
    configs = random_karlo.hub_configs()
    configs = random_karlo.reduce(configs) if size == "reduced" else configs
    pipe, var = random_karlo.build_from_configs(configs, seed=0, device=device, dtype=dtype)
    src, _ = random_karlo.save_as_hub(pipe, var, configs, work)
    del var
    pipe.to("cpu")  # out of the accelerator's memory while unclip is timed
    t_build = time.perf_counter() - t0
    print("converting…", file=sys.stderr)
    t0 = time.perf_counter()
    dst = karlo.convert(src, work / "converted", dtype=torch.float16 if dtype == torch.float16 else torch.float32, force=True)
    facts = {"build_s": t_build, "convert_s": time.perf_counter() - t0,
             "src_gb": sum(f.stat().st_size for f in src.rglob("*.safetensors")) / 1e9,
             "dst_gb": sum(f.stat().st_size for f in dst.glob("*.safetensors")) / 1e9}
    return pipe, dst, facts


PROMPT = "a photo of a corgi on a beach"


def time_unclip(dst: Path, device: str, dtype: torch.dtype, n: int, steps, repeats: int, offload: str = "off", precision: str = "fp32"):
    """Load the converted set (every network read before timing) and time Engine.run; the engine is freed on return.
    -> ((median s, runs, peak memory), load s, image size, whether random weights gave NaN)."""
    from unclip_cli.engine import Engine
    from unclip_cli.requests import GenerateRequest

    peak_reset(device)
    t0 = time.perf_counter()
    engine = Engine.load(dst, device=device, dtype=dtype, offload=offload)
    if not engine.models.offload:
        for stage in engine.models.stages:
            stage.model
    load_s = time.perf_counter() - t0
    nan = []
    finish = Engine.to_images
    Engine.to_images = lambda self, x: nan.append(not bool(torch.isfinite(x).all())) or finish(self, x.nan_to_num())
    ps, ds, ss = steps
    req = GenerateRequest(prompt=PROMPT, n=n, seed=0, batch_size=n, prior_steps=ps, decoder_steps=ds, upsampler_steps=ss,
                          precision=precision)
    try:
        timing = timed(lambda: engine.run(req), device, repeats) + (_peak(device),)
    finally:
        Engine.to_images = finish
    return timing, load_s, engine.image_size, any(nan)


def time_diffusers(pipe, device: str, n: int, steps, repeats: int, bf16: bool = False):
    """Time diffusers' UnCLIPPipeline (the pipeline built by `prepare`, not from_pretrained: diffusers' model_index names
    text_proj's class, which it does not export); bf16: under CPU bfloat16 autocast, as unclip's --precision bf16."""
    import contextlib

    peak_reset(device)
    theirs = pipe.to(device)
    theirs.set_progress_bar_config(disable=True)
    gen = torch.Generator(device).manual_seed(0)
    ps, ds, ss = steps

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            theirs(PROMPT, num_images_per_prompt=n, prior_num_inference_steps=ps, decoder_num_inference_steps=ds,
                   super_res_num_inference_steps=ss, generator=gen, output_type="np")

    return timed(run, device, repeats) + (_peak(device),)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("reduced", "karlo"), default="karlo")
    ap.add_argument("--offload", choices=("auto", "on", "off"), default="off", help="unclip's --offload (default off: all on the device)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("float16", "float32"), default=None, help="default: float16 on CUDA, float32 on CPU")
    ap.add_argument("-n", type=int, default=4, help="images per run (one batch)")
    ap.add_argument("--steps", type=int, nargs=3, default=(25, 25, 7), metavar=("PRIOR", "DECODER", "SUPER_RES"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", help="where the random pipeline and the converted set go (default: a temporary folder)")
    add_run_options(ap)
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    start_load = os.getloadavg()
    dtype = getattr(torch, args.dtype or ("float16" if args.device.startswith("cuda") else "float32"))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-karlo-"))
    pipe, dst, facts = prepare(args.size, args.device, dtype, work)
    n, (ps, ds, ss) = args.n, args.steps
    results = {}
    print("timing unclip…", file=sys.stderr)
    results["unclip"], t_load, size, nan = time_unclip(dst, args.device, dtype, n, args.steps, args.repeats, args.offload)
    gc.collect()  # unclip's engine is gone before diffusers' peak is measured
    print("timing diffusers…", file=sys.stderr)
    results["diffusers"] = time_diffusers(pipe, args.device, n, args.steps, args.repeats)

    body = machine_lines() + [
        load_note(start_load),
        f"- Device: {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
        + f", {str(dtype).replace('torch.', '')}; unclip --offload {args.offload}",
        f"- Random-weight Karlo pipeline, size `{args.size}` ({facts['src_gb']:.2f} GB of diffusers safetensors); built and saved in "
        f"{facts['build_s']:.0f} s, converted in {facts['convert_s']:.0f} s to {facts['dst_gb']:.2f} GB; unclip loaded it in {t_load:.1f} s",
        f"- {n} images at {size} px in one batch, steps prior/decoder/super-res {ps}/{ds}/{ss}, guidance 4 / 8; median of "
        f"{args.repeats} runs after a warm-up" + ("; random weights gave NaN in unclip's output (timed anyway)" if nan else ""),
        "",
        "| implementation | s per run | s per image | runs (s) | peak memory |",
        "|---|---|---|---|---|",
    ]
    for name, (med, times, peak) in results.items():
        body.append(f"| {name} | {med:.2f} | {med / n:.2f} | {', '.join(f'{t:.2f}' for t in times)} | {peak} |")
    print("\n".join(body))
    if not args.no_results:
        print(f"appended to {append_results(f'karlo — unclip vs diffusers ({args.size}, {args.device})', body)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
