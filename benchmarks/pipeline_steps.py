"""Steps on a one-step editing base: the editing adapter and community LoRAs at 1, 2, 4 and 8 steps.

    python benchmarks/pipeline_steps.py --pool runs/autolora/pool --out benchmarks/results/pipeline_steps \
        [--base x2edit-tiny] [--steps 1 2 4 8] [--n-per-task 20] [--loras 12] [--scenes 4] [--quick] [--threads 1]

A base that edits in one step from the source (``pipe.source_start()`` = s) takes ``num_inference_steps=n``:
n Euler steps at s, s (n-1)/n, ..., s/n down to 0 (``x2edit.pipeline``). For each step count n:

1. Editing adapter: mean held-out edit gain, PSNR(output, target) - PSNR(source, target) in dB, with its
   standard error over pairs, of ``--base`` with its own adapter on the held-out Shape World pairs of all 15
   tasks (``--n-per-task`` each), routed by the instruction classifier: ``x2edit demo``'s pairs, routing and
   metric (``x2edit.training.demo``, ``x2edit.training.evaluation``).
2. Community LoRAs: the pool's kept single-concept held-out instances (role ``heldout_instance``; up to
   ``--loras``, spread evenly over the manifest), each alone on ``--scenes`` held-out scenes of its concept
   (``ConceptWorld`` eval split) with a phrasing of it, on the pool's base: the mean gain through the
   pipeline with the base's editing adapter at weight 1 ("pipe, editor on") and 0 ("pipe, editor off"), and
   by the LoRA flow (``x2edit.retrieval.flow``), which integrates the LoRA's change of the base's velocity
   alone (the pipeline adds the base's own velocity too, so the two differ even at 1 step with the editor off);
   and the same pipeline calls with the LoRA at weight 0 ("no LoRA"): what x2edit-tiny's base and editor make
   of the concept's instruction by themselves.

Writes ``OUT/pipeline_steps.json`` and ``OUT/pipeline_steps.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

# Through the pipeline with the LoRA (editor on / off), by the LoRA flow, and the same calls with the LoRA at
# weight 0: what the base and its editor do for the instruction alone, which the LoRA's gain is to be read against.
LORA_CASES = ("pipe, editor on", "pipe, editor off", "flow", "no LoRA, editor on", "no LoRA, editor off")
EDITOR_WEIGHT = {"pipe, editor on": 1.0, "pipe, editor off": 0.0, "no LoRA, editor on": 1.0, "no LoRA, editor off": 0.0}


def mean_se(gains: list[float]) -> dict:
    """{"gain_db": mean, "se_db": standard error of the mean (None for one value), "n"} of per-edit gains."""
    g = np.asarray(gains, dtype=np.float64)
    se = float(g.std(ddof=1) / np.sqrt(len(g))) if len(g) > 1 else None
    return {"gain_db": float(g.mean()), "se_db": se, "n": len(g)}


# -- 1. the editing adapter ----------------------------------------------------------------------


def adapter_steps(base: str, steps: list[int], n_per_task: int) -> dict:
    """Held-out edit gain of ``base`` with its own adapter at each step count, as ``x2edit demo`` measures it."""
    from x2edit.data_pipeline.shapeworld import ShapeWorld
    from x2edit.registry import load_pipeline
    from x2edit.training.evaluation import evaluate_pairs

    pipe = load_pipeline(base, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if pipe.source_start() is None:
        raise SystemExit(f"--base {base} does not edit in one step from the source (no source_start): its step "
                         "count is a sampler's, not what this benchmark measures")
    pairs = list(ShapeWorld(resolution=64).eval_pairs(n_per_task=n_per_task))  # the demo's default size
    tasks = pipe.task_classifier([p.instruction for p in pairs])  # classifier routing, as the demo by default
    result = {"base": base, "source_start": pipe.source_start(), "pairs": len(pairs), "n_per_task": n_per_task,
              "routing": "classifier",
              "classifier_accuracy": float(np.mean([t == p.task for t, p in zip(tasks, pairs)])), "steps": {}}
    for n in steps:
        t0 = time.perf_counter()
        table, rows, _ = evaluate_pairs(pipe, pairs, steps=n, tasks=tasks)
        # the demo's mean is over tasks; with n_per_task pairs each it is the mean over pairs
        result["steps"][str(n)] = {**mean_se([r["edit_gain_db"] for r in rows]),
                                   "demo_mean_gain_db": table["mean"]["edit_gain_db"],
                                   "wall_s": time.perf_counter() - t0}
    return result


# -- 2. community LoRAs --------------------------------------------------------------------------


def pick_loras(manifest: dict, count: int) -> tuple[list[dict], int]:
    """(up to ``count`` kept single-concept held-out LoRAs spread evenly over the manifest, how many were kept)."""
    kept = [e for e in manifest["loras"]
            if e["role"] == "heldout_instance" and e["passed"] and len(e["concepts"]) == 1]
    if not kept:
        raise SystemExit("the pool has no kept single-concept LoRA of role heldout_instance")
    at = np.linspace(0, len(kept) - 1, min(count, len(kept))).round().astype(int)
    return [kept[i] for i in at], len(kept)


def lora_steps(pool: Path, manifest: dict, steps: list[int], count: int, n_scenes: int) -> dict:
    """Gain of pool LoRAs at each step count through the pipeline (editing adapter on and off) and the LoRA flow."""
    from PIL import Image

    from x2edit.adapters import adapter_names
    from x2edit.data_pipeline.shapeworld.concepts import ConceptWorld, get_concept, instruction
    from x2edit.registry import load_pipeline
    from x2edit.retrieval.flow import LoraFlow
    from x2edit.training.evaluation import edit_metrics

    cfg = manifest["config"]
    pipe = load_pipeline(cfg["base"])
    pipe.set_progress_bar_config(disable=True)
    # The pool's LoRAs are trained as the flow from noise level sigma_start: the pipeline reads them from there.
    # A base that records no start of its own (the tests' tiny base) is given the pool's, and the JSON says so.
    start, start_from = pipe.source_start(), "base"
    if start is None:
        pipe.default_source_start, start, start_from = cfg["sigma_start"], cfg["sigma_start"], "pool (base has none)"
    elif start != cfg["sigma_start"]:
        raise SystemExit(f"the pool's LoRAs were trained from sigma {cfg['sigma_start']}, but its base {cfg['base']} "
                         f"edits from {start}")
    editors = adapter_names(pipe.transformer)  # the base's own adapters: no community LoRA is loaded yet
    cases = [c for c in LORA_CASES if editors or "editor on" not in c]  # without an editing adapter "on" is "off"
    flow, world = LoraFlow(pipe, cfg["sigma_start"]), ConceptWorld(cfg["resolution"])
    specs, kept = pick_loras(manifest, count)
    gains = {(case, n): [] for case in cases for n in steps}
    t0 = time.perf_counter()
    for spec in specs:
        name = spec["name"]
        pipe.load_lora_weights(str(pool / spec["file"]), adapter_name=name)
        rng = np.random.default_rng(0)
        pairs = [world.pair(spec["concepts"], seed=k, split="eval") for k in range(n_scenes)]
        prompts = [instruction([get_concept(c) for c in spec["concepts"]], rng) for _ in pairs]
        sources = [p.source for p in pairs]
        h, w = sources[0].shape[:2]
        for n in steps:
            for case in cases:
                if case == "flow":  # every adapter but the LoRA off, one pass per step
                    outs = flow.edit(sources, prompts, [name], lambda sigma, k: [(None, 1.0)], steps=n)
                else:
                    lora_weight = 0.0 if case.startswith("no LoRA") else 1.0
                    pipe.set_adapters([*editors, name], [EDITOR_WEIGHT[case]] * len(editors) + [lora_weight])
                    images = pipe(image=[Image.fromarray(s) for s in sources], prompt=prompts, height=h, width=w,
                                  num_inference_steps=n, output_type="np").images  # (B, H, W, 3) in [0, 1]
                    outs = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
                gains[case, n] += [edit_metrics(o, p.source, p.target, p.mask)["edit_gain_db"]
                                   for o, p in zip(outs, pairs)]
        pipe.delete_adapters(name)
    return {"pool": str(pool), "base": cfg["base"], "source_start": start, "source_start_from": start_from,
            "editing_adapters": editors, "kept_single_concept_heldout": kept, "loras": len(specs),
            "scenes_per_lora": n_scenes, "edits_per_case": len(specs) * n_scenes,
            "names": [s["name"] for s in specs], "files": [s["file"] for s in specs],
            "concepts": [s["concepts"][0] for s in specs],
            "steps": {str(n): {case: mean_se(gains[case, n]) if case in cases else None for case in LORA_CASES}
                      for n in steps},
            "wall_s": time.perf_counter() - t0}


# -- report --------------------------------------------------------------------------------------


def _cell(v: dict | None) -> str:
    if v is None:
        return "-"
    return f"{v['gain_db']:+.2f}" + ("" if v["se_db"] is None else f" ± {v['se_db']:.2f}")


def markdown(result: dict) -> str:
    a, lo = result["adapter"], result["loras"]
    lines = ["| steps | editing adapter | LoRA, pipe, editor on | LoRA, pipe, editor off | LoRA flow | "
             "no LoRA, editor on | no LoRA, editor off |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for n in result["steps"]:
        row = lo["steps"][str(n)]
        lines.append(f"| {n} | {_cell(a['steps'][str(n)])} | " + " | ".join(_cell(row[c]) for c in LORA_CASES) + " |")
    lines += ["", f"Mean held-out edit gain in dB (± standard error over edits). Editing adapter: {a['base']}'s own, on "
              f"{a['pairs']} held-out Shape World pairs ({a['n_per_task']} per task, classifier routing, as `x2edit "
              f"demo`). LoRAs: {lo['loras']} of the {lo['kept_single_concept_heldout']} kept single-concept held-out "
              f"LoRAs of `{lo['pool']}` ({', '.join(lo['concepts'])}), alone, on {lo['scenes_per_lora']} held-out "
              f"scenes each ({lo['edits_per_case']} edits per cell), on {lo['base']} (source start "
              f"{lo['source_start']}, from the {lo['source_start_from']}); \"editor\": the base's editing adapter "
              f"{lo['editing_adapters'] or '(none: its columns are -)'} at weight 1 or 0. "
              f"{result['wall_s']:.0f} s. Command: `{result['command']}`"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", required=True, help="pool directory (x2edit lora pool)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--base", default="x2edit-tiny", help="the base whose own editing adapter part 1 measures")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--n-per-task", type=int, default=20, help="held-out pairs per task (15 tasks)")
    parser.add_argument("--loras", type=int, default=12, help="pool LoRAs (kept single-concept held-out instances)")
    parser.add_argument("--scenes", type=int, default=4, help="held-out scenes per LoRA")
    parser.add_argument("--quick", action="store_true", help="steps 1 and 2, 1 pair per task, 2 LoRAs x 2 scenes")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.n_per_task, args.loras, args.scenes = [1, 2], 1, 2, 2
    if min(args.steps + [args.n_per_task, args.loras, args.scenes]) < 1:
        raise SystemExit("--steps, --n-per-task, --loras and --scenes must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from x2edit.retrieval.pool import load_manifest

    pool, out = Path(args.pool), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = {"command": " ".join(["python benchmarks/pipeline_steps.py", *argv]), "quick": args.quick,
              "steps": args.steps,
              "adapter": adapter_steps(args.base, args.steps, args.n_per_task),
              "loras": lora_steps(pool, load_manifest(pool), args.steps, args.loras, args.scenes)}
    result["wall_s"] = time.perf_counter() - t0
    (out / "pipeline_steps.json").write_text(json.dumps(result, indent=1))
    (out / "pipeline_steps.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
