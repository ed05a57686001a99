"""`unclip eval`: measure a model set on held-out data; write metrics.json and print a table."""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional

import typer

import unclip_cli
from unclip_cli.cli import app
from unclip_cli.cli.data import default_corpus_dir
from unclip_cli.cli.options import P_OUTPUT, DeviceChoice, DeviceOpt, PrecisionOpt, QuietOpt, WeightsOpt, resolve_weights

EVAL_EXAMPLES = """\
[b]Examples[/b]

  unclip eval --quick                  [dim]# shipped model, $UNCLIP_DATA or ~/.cache/unclip/emoji[/dim]
  unclip eval --weights runs/set --out runs/set/metrics.json
  unclip eval --quick --json | jq .metrics.generate
"""
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the metrics as JSON on stdout instead of the table.",
                                       rich_help_panel=P_OUTPUT)]


@app.command("eval", epilog=EVAL_EXAMPLES)
def eval_cmd(
    weights: WeightsOpt = None,
    data: Annotated[Optional[str], typer.Option("--data", metavar="SHARDS", show_default=False,
                                                help="Corpus folder, glob or brace range of shards; val-*.tar are the held-out split "
                                                     "(default: where `unclip data emoji` builds it, $UNCLIP_DATA or ~/.cache/unclip/emoji).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="40 prompts and few sampling steps: 1-2 minutes on a 2-core CPU (the full 996 prompts: about 45 "
                                                                "minutes; --max-prompts 200: about 16; README, Evaluation).")] = False,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", metavar="FILE",
                                                   help="Held-out prompt list (default: eval_prompts.json beside the shards).")] = None,
    max_prompts: Annotated[Optional[int], typer.Option("--max-prompts", metavar="N", min=1,
                                                     help="Generate from only the first N held-out prompts (default: all; 40 with --quick).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", metavar="FILE", help="Where to write the metrics (replaced if present).")] = Path("metrics.json"),
    seed: Annotated[int, typer.Option("--seed", help="Seed of every sampling run and random draw.")] = 0,
    classifier: Annotated[Optional[Path], typer.Option("--classifier", metavar="FILE", show_default="the shipped one",
                                                       help="Concept classifier trained apart from the model (`unclip train classifier`): "
                                                            "the independent yardstick.")] = None,
    device: DeviceOpt = DeviceChoice.auto,
    precision: PrecisionOpt = None,
    sections: Annotated[Optional[str], typer.Option("--sections", metavar="LIST", show_default="all",
                                                    help="Comma-separated parts to measure: clip, generate, vary, blend, edit, "
                                                         "classifier (which brings generate along; generate and classifier "
                                                         "alone take about half the time).")] = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Measure quality on held-out data: CLIP retrieval, generate, prior, vary, inversion, blend, edit."""
    from rich.console import Console

    from unclip_cli import evaluate as ev
    from unclip_cli.checkpoint import atomic_write
    from unclip_cli.engine import Engine
    from unclip_cli.errors import DataError, InputError
    from unclip_cli.requests import GenerateRequest, shown

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    weights_dir = resolve_weights(weights)
    out = out.expanduser()
    if out.is_dir():
        raise InputError(f"--out {out} is a folder", hint="give a file name, e.g. --out metrics.json")
    settings = dataclasses.replace(ev.QUICK if quick else ev.FULL, seed=seed)
    parts = ev.SECTIONS if sections is None else tuple(p.strip() for p in sections.split(",") if p.strip())
    bad = [p for p in parts if p not in ev.SECTIONS]
    if bad or not parts:
        raise InputError(f"--sections: {'unknown part ' + shown(bad[0]) if bad else 'names no part'}",
                         hint=f"choose from {', '.join(ev.SECTIONS)}")
    if max_prompts is not None:
        settings = dataclasses.replace(settings, prompts=max_prompts if settings.prompts is None else min(max_prompts, settings.prompts))
    started = time.time()
    default_data = data is None
    data = str(default_corpus_dir()) if default_data else data
    if not quiet:
        err.print(f"Reading held-out data from {data}…", markup=False)
    if default_data and not Path(data).exists():
        raise DataError(f"no corpus at {data}", hint="build it with `unclip data emoji`, or pass --data SHARDS")
    dataset = ev.load_eval_data(data, prompts, max_items=settings.max_items)
    concepts = _load_classifier(classifier)
    engine = Engine.load(weights_dir, device=device.value, precision=precision.value if precision else "auto")
    if not quiet:
        n_prompts = min(settings.prompts or len(dataset.prompts), len(dataset.prompts))
        err.print(f"{settings.mode} evaluation of {engine.name} ({weights_dir}): {len(dataset.items)} held-out images, "
                  f"{len(dataset.concepts)} concepts, {n_prompts} prompts × {settings.images_per_prompt}, "
                  f"quality {settings.quality}", markup=False)
    from unclip_cli.cli.progress import Bars

    with Bars(err, enabled=not quiet and err.is_terminal) as bars:
        result = ev.evaluate(engine, dataset, settings, progress=bars, classifier=concepts, sections=parts)
    report = {
        "model": {"name": engine.name, "path": str(weights_dir), "model_hash": engine.models.model_hash,
                  "base_size": engine.base_size, "image_size": engine.image_size},
        "data": {"spec": data, **dataset.shards, "held_out_images": len(dataset.items), "concepts": len(dataset.concepts),
                 "prompts_available": len(dataset.prompts)},
        **result,
        "machine": ev.machine_info(engine.device),
        "device": str(engine.device),
        "precision": engine.precision_of(GenerateRequest(prompt="x")),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": _command(weights_dir, data, quick, prompts, out, seed, device.value, classifier, max_prompts,
                            precision.value if precision else None, None if sections is None else ",".join(parts)),
        "wall_seconds": round(time.time() - started, 1),
        "version": unclip_cli.__version__,
    }
    text = json.dumps(report, indent=2, ensure_ascii=False, default=float) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: Path(tmp).write_text(text))
    for note in report["notes"]:
        err.print(f"Note: {note}", markup=False)
    if json_:
        sys.stdout.write(text)
    else:
        out_console = Console(highlight=False)
        if not out_console.is_terminal:
            out_console = Console(highlight=False, width=140)  # a file or pipe: no wrapping at 80 columns
        out_console.print(metrics_table(report))
    if not quiet:
        err.print(f"Wrote {out} ({report['wall_seconds']:.0f} s).", markup=False)


SHIPPED_CLASSIFIER = Path(__file__).resolve().parents[2] / "weights" / "classifier" / "emoji-concepts.safetensors"


def _load_classifier(path: Optional[Path]):
    """The concept classifier checkpoint: --classifier, else the shipped one if this copy has it, else None."""
    from unclip_cli import checkpoint

    if path is None:
        if not SHIPPED_CLASSIFIER.is_file():
            return None
        path = SHIPPED_CLASSIFIER
    return checkpoint.load(path.expanduser(), "classifier")


def _command(weights_dir, data, quick, prompts, out, seed, device, classifier=None, max_prompts=None, precision=None,
             sections=None) -> str:
    """The command line that reproduces this run, with every choice spelled out."""
    args = ["unclip", "eval", "--weights", str(weights_dir), "--data", str(data)]
    args += ["--quick"] if quick else []
    args += ["--prompts", str(prompts)] if prompts else []
    args += ["--max-prompts", str(max_prompts)] if max_prompts else []
    args += ["--classifier", str(classifier)] if classifier else []
    args += ["--out", str(out), "--seed", str(seed), "--device", device]
    args += ["--precision", precision] if precision else []
    args += ["--sections", sections] if sections else []
    return shlex.join(args)


def _f(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _langs(d: dict | None, digits: int = 3) -> str:
    if not d:
        return "–"
    return "  ".join(f"{k} {_f(v, digits)}" for k, v in d.items() if v is not None)


def metrics_table(report: dict):
    """The readable summary: one row per number, with its reference and sample count."""
    from rich.table import Table

    m, s = report["metrics"], report["settings"]
    t = Table(title=f"unclip eval ({s['mode']}) — {report['model']['name']} {report['model']['model_hash']}", title_justify="left")
    for col in ("section", "metric", "value", "reference", "samples"):
        t.add_column(col, justify="right" if col in ("value", "samples") else "left")
    clip = m.get("clip", {})
    for lang in ("en", "zh"):
        c = clip.get(lang)
        if not c:
            continue
        chance = c["chance_image_to_text"]
        t.add_row("clip", f"image→text top-1 / top-5 ({lang})", f"{_f(c['image_to_text']['top1'])} / {_f(c['image_to_text']['top5'])}",
                  f"chance {_f(chance['top1'])} / {_f(chance['top5'])}", f"{c['queries_image']} images × {c['candidates']} concepts")
        t.add_row("clip", f"text→image top-1 / top-5 ({lang})", f"{_f(c['text_to_image']['top1'])} / {_f(c['text_to_image']['top5'])}",
                  "", f"{c['queries_text']} concepts × {c['queries_image']} images")
    g = m.get("generate")
    if g:
        for lang in ("en", "zh"):
            if lang in g["own_concept_rate"] and g["own_concept_rate"][lang] is not None:
                t.add_row("generate", f"own concept among {g['candidates'].get(lang)} ({lang})", _f(g["own_concept_rate"][lang]),
                          f"real held-out {_f(g['own_concept_rate_real'].get(lang))}",
                          f"{g['prompts'].get(lang)} prompts × {g['images_per_prompt']}")
        t.add_row("generate", "Fréchet distance, CLIP features", _f(g["frechet_clip"]),
                  f"real vs real {_f(g['frechet_clip_real_vs_real'])}", f"{g['n_generated']} vs {g['n_real']} real")
    sh = m.get("sharpness")
    if sh:
        t.add_row("sharpness", f"detail power {' / '.join(sh['bands_px'])} px, share of real", " / ".join(_f(v, 2) for v in sh["share_of_real"]),
                  f"1 = real ({sh['size']} px)", f"{sh['n_generated']} vs {sh['n_real']} real")
    p = m.get("prior")
    if p:
        t.add_row("prior", "cosine to the concept's real z_i", _langs(p["cosine_to_concept"]),
                  f"other concept {_langs(p['cosine_to_other_concept'])}", str(p["n"]))
    v = m.get("vary")
    if v:
        t.add_row("vary", f"cosine to source (strength {v['strength']:g})", _f(v["cosine_to_source"]),
                  f"two styles {_f(v['cosine_two_real_styles'])}; other concepts {_f(v['cosine_different_concepts'])}",
                  f"{v['sources']} × {v['variations_per_source']}")
    i = m.get("inversion")
    if i:
        t.add_row("inversion", f"reconstruction MSE at {i['resolution']} px", f"{i['mse']:.5f}", f"PSNR {i['psnr_db']:.1f} dB", str(i["n"]))
    b = m.get("blend")
    if b:
        t.add_row("blend", "monotone frame steps", _f(b["monotone_fraction"]), "1 = steadily from A to B",
                  f"{b['pairs']} pairs × {b['frames']} frames")
        if "progress_fraction" in b:
            t.add_row("blend", "frame steps toward B (vs A)", _f(b["progress_fraction"]), "sim to B minus sim to A rises",
                      f"{b['pairs']} pairs × {b['frames']} frames")
    c = m.get("classifier")
    if c:
        for lang, g in c["generated"].items():
            real = c["real_for_the_same_prompts"].get(lang, {})
            t.add_row("classifier", f"concept top-1 / top-5, generated ({lang})", f"{_f(g['top1'])} / {_f(g['top5'])}",
                      f"real held-out {_f(real.get('top1'))} / {_f(real.get('top5'))}", f"{c['prompts'][lang]} prompts, {c['classes']} classes")
    e = m.get("edit")
    if e:
        t.add_row("edit", "pixels changed outside the mask", str(e["pixels_changed_outside_mask"]), "must be 0", str(e["n"]))
        t.add_row("edit", "prompt score in mask, before → after",
                  f"{_f(e['prompt_score_in_mask_before'])} → {_f(e['prompt_score_in_mask_after'])}",
                  f"improved in {_f(e['improved_fraction'], 2)}", str(e["n"]))
    sec = report.get("seconds", {})
    t.caption = (f"{report['machine']['cpu']} ({report['machine']['cores']} cores), torch {report['machine']['torch']}, "
                 f"{report['device']}; quality {s['quality']}, seed {s['seed']}; "
                 + ", ".join(f"{k} {v:.0f} s" for k, v in sec.items()))
    return t
