"""`x2edit eval`: benchmark an editing model.

Shape World (exact targets): per task, edit gain in dB = PSNR(output, target) - PSNR(source, target)
and the mean error inside / outside the edited region, on the fixed held-out split.

    x2edit eval --out DIR [--base NAME|DIR] [--adapter FILE] [--n-per-task K] [--steps N]
                [--routing labels|classifier]
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="output directory for metrics.json, rows.jsonl, grid.png")
    parser.add_argument("--base", default="x2edit-tiny", help="registered name or pipeline directory")
    parser.add_argument("--adapter", default=None, help="x2edit adapter file to load on the base")
    parser.add_argument("--n-per-task", type=int, default=20, help="held-out Shape World pairs per task")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--routing", choices=["labels", "classifier"], default="labels",
                        help="route the MoE-LoRA with the true task labels or the instruction classifier")


def evaluate_shapeworld(pipe, n_per_task: int = 20, resolution: int = 64, steps: int = 28, seed: int = 0,
                        routing: str = "labels"):
    """(per-task table, per-pair rows, pairs, outputs) of ``pipe`` on the held-out Shape World split."""
    from data_pipeline.shapeworld import ShapeWorld
    from training.evaluation import edit_metrics, run_edits, summarize

    pairs = list(ShapeWorld(resolution=resolution).eval_pairs(n_per_task=n_per_task))
    tasks = [p.task for p in pairs] if routing == "labels" else None
    outputs = run_edits(pipe, pairs, steps=steps, seed=seed, tasks=tasks)
    rows = [{"task": p.task, "instruction": p.instruction, **edit_metrics(o, p.source, p.target, p.mask)}
            for p, o in zip(pairs, outputs)]
    return summarize(rows), rows, pairs, outputs


def run(args) -> int:
    import torch

    from training.evaluation import edit_grid, format_table
    from x2edit.registry import load_pipeline

    if args.n_per_task < 1 or args.steps < 1:
        raise ValueError("--n-per-task and --steps must be >= 1")
    if args.adapter and not Path(args.adapter).is_file():
        raise FileNotFoundError(f"adapter file not found: {args.adapter}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pipe = load_pipeline(args.base, torch_dtype=torch.float32, device="cuda" if torch.cuda.is_available() else "cpu")
    pipe.set_progress_bar_config(disable=True)
    if args.adapter:
        pipe.load_adapter(args.adapter, adapter_name="eval")
    table, rows, pairs, outputs = evaluate_shapeworld(pipe, args.n_per_task, args.resolution, args.steps, args.seed,
                                                      args.routing)
    (out / "metrics.json").write_text(json.dumps(table, indent=2))
    with (out / "rows.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    firsts = {}
    for p, o in zip(pairs, outputs):
        firsts.setdefault(p.task, (p, o))
    edit_grid([v[0] for v in firsts.values()], [v[1] for v in firsts.values()]).save(out / "grid.png")
    print(format_table(table))
    print(f"\nwrote {out}/metrics.json, rows.jsonl, grid.png in {time.perf_counter() - t0:.1f} s")
    return 0
