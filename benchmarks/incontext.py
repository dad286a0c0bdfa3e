"""Kontext-layout editing against ICEdit's diptych, on the same held-out Shape World pairs.

For each model (``--model NAME=BASE``, a registered name or a pipeline directory; a Fill model runs as a
diptych): the edit gain per task with its standard error (label routing, ``x2edit eval``'s metric), the
image + text tokens one edit costs, the median seconds per single edit and the peak memory above the
loaded model (each model in its own process, so the peaks do not mix), all measured in one run on one
machine. ``NAME=sets:BASE[+ADAPTER]`` edits each pair as a 2-panel IC-LoRA set: the right panel of
[source | ?] is made under the set's joint caption, which describes the target scene (more than an instruction
says: IC-LoRA's form), by training-free SDEdit-style inpainting on a text-to-image base with its task LoRA, or
by a Fill base (``x2edit.incontext.inpaint_set``).
``--best-of N`` adds best-of-N sampling for models that sample from noise: N seeds per pair, the
one the judge prefers kept. The judge here is the oracle (PSNR to Shape World's exact target): an upper
bound on what any judge can pick, at N times the cost; a one-step model is deterministic and gains nothing.

    python benchmarks/incontext.py --model kontext=x2edit-tiny --model diptych=x2edit-tiny-fill \\
        --model "diptych from noise=runs/fill/base_noise/pipeline" --best-of 4 --out benchmarks/results/incontext

Writes OUT/incontext.json and OUT/incontext.md (``--grids``: OUT/NAME.png, one edit per task of each model).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(base: str, n_per_task: int, best_of: int, timing_edits: int, seed: int, incontext_steps: int | None = None,
            grid: str | None = None) -> dict:
    """One model's numbers (run in a fresh process: ``--worker``)."""
    import torch
    from PIL import Image

    from x2edit.data_pipeline.metrics import psnr
    from x2edit.data_pipeline.shapeworld import ShapeWorld
    from x2edit.registry import load_pipeline
    from x2edit.tasks import TASK_NAMES
    from x2edit.training.evaluation import edit_metrics, run_edits, run_set_edits

    torch.manual_seed(seed)
    incontext = base.startswith("sets:")  # edited as a 2-panel IC-LoRA set
    base, _, adapter = base.removeprefix("sets:").partition("+")  # BASE+ADAPTER: a task LoRA on the base
    pipe = load_pipeline(base)
    pipe.set_progress_bar_config(disable=True)
    diptych = pipe.editing_mode == "diptych"
    if adapter:
        pipe.load_adapter(adapter, adapter_name="incontext", replace=True)  # in place of the base's own
    one_step = pipe.source_start() is not None
    pairs = list(ShapeWorld(resolution=64).eval_pairs(n_per_task=n_per_task))
    labels = [p.task for p in pairs]

    def edit_all(s):  # uint8 outputs of every pair, seeds s + i
        if not incontext:
            return run_edits(pipe, pairs, seed=s, tasks=labels)
        return run_set_edits(pipe, pairs, steps=incontext_steps, seed=s, tasks=labels)

    def edit_one(p, s):  # one edit as a user makes it
        if incontext:  # the right panel made from the left under the set's caption
            return run_set_edits(pipe, [p], steps=incontext_steps, seed=s, tasks=[p.task])[0]
        return pipe.edit(Image.fromarray(p.source), p.instruction, task=p.task, output_type="np",
                         generator=torch.Generator().manual_seed(s)).images[0]

    rss_loaded = _rss_mb()
    outputs = edit_all(seed)
    if grid:  # one pair per task: source | instruction | output | target
        from x2edit.training.evaluation import edit_grid

        first = {}
        for p, o in zip(pairs, outputs):
            first.setdefault(p.task, (p, o))
        edit_grid([v[0] for v in first.values()], [v[1] for v in first.values()]).save(grid)
    gains = [edit_metrics(o, p.source, p.target, p.mask)["edit_gain_db"] for p, o in zip(pairs, outputs)]

    # Tokens of one 64x64 edit: image tokens (a diptych's or a set's canvas is twice the image) + text tokens.
    grid = pipe.vae_scale_factor * 2
    doubled = diptych or incontext or (pipe.reference_tokens and not one_step)
    image_tokens = (64 // grid) * (64 // grid) * (2 if doubled else 1)
    text_tokens = pipe.text_length() if pipe.text_encoder_2 is not None else pipe.tokenizer.model_max_length

    times = []
    for p in pairs[:timing_edits]:
        t0 = time.perf_counter()
        edit_one(p, seed)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB, over the whole process

    best = None
    if best_of > 1 and not one_step:
        scores = []  # (N, pairs): seed set 0 is the single-sample run above
        for k in range(best_of):
            outs = outputs if k == 0 else edit_all(seed + 1000 * k)
            scores.append([psnr(o, p.target) for p, o in zip(pairs, outs)])
        chosen = np.max(np.array(scores), axis=0)  # the oracle judge keeps the output closest to the target
        best = [c - psnr(p.source, p.target) for c, p in zip(chosen, pairs)]

    def per_task(values):
        out = {}
        for t in TASK_NAMES:
            v = [g for g, lab in zip(values, labels) if lab == t]
            if v:
                out[t] = {"gain_db": float(np.mean(v)), "se": float(np.std(v, ddof=1) / math.sqrt(len(v))), "n": len(v)}
        means = [r["gain_db"] for r in out.values()]
        out["mean"] = {"gain_db": float(np.mean(means)),
                       "se": float(math.sqrt(sum(r["se"] ** 2 for r in out.values())) / len(means)), "n": len(values)}
        return out

    layout = (f"IC-LoRA set, {'Fill' if diptych else 'SDEdit'} inpainting" if incontext
              else "diptych (Fill)" if diptych else "Kontext")
    return {"base": base, "adapter": adapter or None, "layout": layout, "one_step": one_step,
            "steps": 1 if one_step else pipe.default_num_inference_steps, "image_tokens": image_tokens,
            "text_tokens": text_tokens, "seconds_per_edit": statistics.median(times),
            "memory_above_loaded_mb": peak - rss_loaded, "per_task": per_task(gains),
            "best_of": {"n": best_of, "judge": "oracle (PSNR to the exact target): an upper bound",
                        "per_task": per_task(best)} if best is not None else None}


def markdown(results: dict) -> str:
    models = results["models"]
    names = list(models)
    lines = [f"Held-out Shape World, {results['args']['n_per_task']} pairs per task, label routing; one run on one "
             f"machine ({results['machine']}).", "",
             "| model | layout | steps | image + text tokens | s per edit | memory above the model (MB) | "
             "mean gain (dB) |", "|---|---|---:|---:|---:|---:|---:|"]
    for name in names:
        m = models[name]
        mean = m["per_task"]["mean"]
        lines.append(f"| {name} | {m['layout']} | {m['steps']} | {m['image_tokens']} + {m['text_tokens']} | "
                     f"{m['seconds_per_edit']:.3f} | {m['memory_above_loaded_mb']:.0f} | "
                     f"{mean['gain_db']:+.2f} ± {mean['se']:.2f} |")
    lines += ["", "Edit gain per task (dB, ± standard error):", "",
              "| task | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    tasks = [t for t in models[names[0]]["per_task"] if t != "mean"]
    for t in tasks + ["mean"]:
        cells = []
        values = {n: models[n]["per_task"][t]["gain_db"] for n in names if t in models[n]["per_task"]}
        top = max(values, key=values.get)
        for n in names:
            r = models[n]["per_task"].get(t)
            cell = "-" if r is None else f"{r['gain_db']:+.2f} ± {r['se']:.2f}"
            cells.append(f"**{cell}**" if n == top else cell)
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    bests = {n: m["best_of"] for n, m in models.items() if m["best_of"]}
    if bests:
        lines += ["", "Best-of-N (models sampled from noise; the oracle judge, an upper bound):", "",
                  "| model | N | mean gain, 1 sample | mean gain, best of N | cost |", "|---|---:|---:|---:|---:|"]
        for n, b in bests.items():
            one, best = models[n]["per_task"]["mean"], b["per_task"]["mean"]
            lines.append(f"| {n} | {b['n']} | {one['gain_db']:+.2f} ± {one['se']:.2f} | "
                         f"{best['gain_db']:+.2f} ± {best['se']:.2f} | {b['n']}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True,
                    help="NAME=BASE[+ADAPTER] (repeatable; the adapter in place of the base's own); NAME=sets:BASE[+ADAPTER]: edited as a 2-panel IC-LoRA set, the right "
                         "panel of [source | ?] inpainted under the set's joint caption (a text-to-image base with "
                         "its task LoRA: SDEdit-style; a Fill base: by Fill)")
    ap.add_argument("--incontext-steps", type=int, default=None,
                    help="denoising steps of IC-LoRA inpainting (default: the base's own; x2edit-tiny-t2i: 10)")
    ap.add_argument("--grids", action="store_true", help="also write OUT/NAME.png: one edit per task of each model")
    ap.add_argument("--grid", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n-per-task", type=int, default=20)
    ap.add_argument("--best-of", type=int, default=1)
    ap.add_argument("--timing-edits", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.worker, args.n_per_task, args.best_of, args.timing_edits, args.seed,
                                 args.incontext_steps, args.grid)))
        return 0
    if args.out is None:
        ap.error("--out is required")
    models = {}
    for spec in args.model:
        name, _, base = spec.partition("=")
        if not base:
            ap.error(f"--model takes NAME=BASE, got {spec!r}")
        cmd = [sys.executable, __file__, "--worker", base, "--model", spec, "--n-per-task", str(args.n_per_task),
               "--best-of", str(args.best_of), "--timing-edits", str(args.timing_edits), "--seed", str(args.seed),
               *(["--incontext-steps", str(args.incontext_steps)] if args.incontext_steps else [])]
        if args.grids:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            cmd += ["--grid", str(Path(args.out) / (re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") + ".png"))]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{name}: {done.stderr.strip().splitlines()[-1]}")
        models[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name}: mean gain {models[name]['per_task']['mean']['gain_db']:+.2f} dB", flush=True)
    import platform

    import torch

    machine = f"{platform.machine()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}"
    results = {"args": vars(args), "machine": machine, "models": models}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "incontext.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "incontext.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
