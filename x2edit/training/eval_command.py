"""`x2edit eval`: benchmark an editing model.

Shape World (exact targets, the default): per task, edit gain in dB = PSNR(output, target) -
PSNR(source, target) and the mean error inside / outside the edited region, on the fixed held-out split.

    x2edit eval --out DIR [--base NAME|DIR] [--adapter FILE] [--n-per-task K] [--steps N]
                [--routing labels|classifier]

Real images (``--folder``, GEdit-Bench form; see x2edit/training/folder_eval.py and docs/eval.md): L1 to
the source (and target), CLIP-I / CLIP-T and a VLM judge's SC / PQ / O, per task.

    x2edit eval --out DIR --folder CASES [--base NAME|DIR] [--adapter FILE | --outputs IMAGES]
                [--clip WEIGHTS] [--judge VLM_DIR] [--steps N] [--seed S] [--guidance G]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

# Options of one mode only; given in the other they are refused. Shape World's default here, not in
# argparse, so that run() can tell an option the user gave from one left at its default.
SHAPEWORLD_ONLY = {"n_per_task": 20, "resolution": 64, "routing": "labels"}
FOLDER_ONLY = ("outputs", "clip", "judge")


def add_arguments(parser) -> None:
    parser.add_argument(
        "--out",
        required=True,
        help="output directory for metrics.json, rows.jsonl, grid.png (folder mode: table.md and outputs/)",
    )
    parser.add_argument(
        "--base", default=None, help="registered name or pipeline directory (default: x2edit-tiny)"
    )
    parser.add_argument("--adapter", default=None, help="x2edit adapter file to load on the base")
    parser.add_argument("--n-per-task", type=int, default=None,
                        help=f"held-out Shape World pairs per task ({SHAPEWORLD_ONLY['n_per_task']})")
    parser.add_argument("--resolution", type=int, default=None,
                        help=f"Shape World image size ({SHAPEWORLD_ONLY['resolution']})")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--routing",
        choices=["labels", "classifier"],
        default=None,
        help="route the MoE-LoRA with the true task labels (default) or the instruction classifier",
    )
    folder = parser.add_argument_group("real images (GEdit-Bench form; see docs/eval.md)")
    folder.add_argument(
        "--folder", default=None, help="folder with cases.jsonl: score these edits instead of Shape World"
    )
    folder.add_argument(
        "--outputs", default=None, help="score DIR/<id>.png made by any model instead of editing"
    )
    folder.add_argument("--guidance", type=float, default=2.5, help="guidance scale of the edits")
    folder.add_argument("--clip", default=None, help="local open_clip weights file: adds CLIP-I and CLIP-T")
    folder.add_argument("--clip-model", default="ViT-B-32", help="open_clip architecture of --clip")
    folder.add_argument("--judge", default=None, help="local VLM directory (e.g. Qwen2.5-VL): adds SC, PQ, O")


def evaluate_shapeworld(pipe, n_per_task: int = SHAPEWORLD_ONLY["n_per_task"],
                        resolution: int = SHAPEWORLD_ONLY["resolution"], steps: int | None = None, seed: int = 0,
                        routing: str = SHAPEWORLD_ONLY["routing"]):
    """(per-task table, per-pair rows, pairs, outputs) of ``pipe`` on the held-out Shape World split.

    With classifier routing the instructions are routed as the pipeline would (its ``task_classifier``),
    and each row records the task it was routed to."""
    from x2edit.data_pipeline.shapeworld import ShapeWorld
    from x2edit.training.evaluation import edit_metrics, run_edits, summarize

    pairs = list(ShapeWorld(resolution=resolution).eval_pairs(n_per_task=n_per_task))
    tasks = [p.task for p in pairs] if routing == "labels" else pipe.task_classifier([p.instruction for p in pairs])
    outputs = run_edits(pipe, pairs, steps=steps, seed=seed, tasks=tasks)
    rows = [
        {"task": p.task, "routed": t, "instruction": p.instruction, **edit_metrics(o, p.source, p.target, p.mask)}
        for p, t, o in zip(pairs, tasks, outputs)
    ]
    return summarize(rows), rows, pairs, outputs


def router_accuracy(rows: list[dict]) -> float:
    """Share of the rows routed to their own task."""
    return sum(r["routed"] == r["task"] for r in rows) / len(rows)


def run(args) -> int:
    given = [f"--{k.replace('_', '-')}" for k in SHAPEWORLD_ONLY if getattr(args, k) is not None]
    if args.folder is not None:
        if given:  # silently ignoring them would report a benchmark the user did not ask for
            raise ValueError(f"{', '.join(given)}: Shape World options, not used with --folder")
        from x2edit.training.folder_eval import run as run_folder

        return run_folder(args)
    stray = [f"--{k}" for k in FOLDER_ONLY if getattr(args, k) is not None]
    if stray:
        raise ValueError(f"{', '.join(stray)}: options of --folder (real images); pass --folder CASES")
    for k, default in SHAPEWORLD_ONLY.items():
        if getattr(args, k) is None:
            setattr(args, k, default)
    import torch

    from x2edit.registry import DEFAULT_BASE, load_pipeline
    from x2edit.training.evaluation import edit_grid, format_table

    if args.n_per_task < 1 or (args.steps is not None and args.steps < 1):
        raise ValueError("--n-per-task and --steps must be >= 1")
    if args.adapter and not Path(args.adapter).is_file():
        raise FileNotFoundError(f"adapter file not found: {args.adapter}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pipe = load_pipeline(
        args.base or DEFAULT_BASE,
        torch_dtype=torch.float32,
        device="cuda" if torch.cuda.is_available() else "cpu",
    )
    pipe.set_progress_bar_config(disable=True)
    if args.adapter:
        pipe.load_adapter(args.adapter, adapter_name="evaluated", replace=True)
    table, rows, pairs, outputs = evaluate_shapeworld(
        pipe, args.n_per_task, args.resolution, args.steps, args.seed, args.routing
    )
    extra = {"router_accuracy": router_accuracy(rows)} if args.routing == "classifier" else {}
    (out / "metrics.json").write_text(json.dumps({**table, **extra}, indent=2))
    with (out / "rows.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    firsts = {}
    for p, o in zip(pairs, outputs):
        firsts.setdefault(p.task, (p, o))
    edit_grid([v[0] for v in firsts.values()], [v[1] for v in firsts.values()]).save(out / "grid.png")
    print(format_table(table))
    if extra:
        print(f"\nthe task classifier routed {100 * extra['router_accuracy']:.1f}% of the instructions to their task")
    print(f"\nwrote {out}/metrics.json, rows.jsonl, grid.png in {time.perf_counter() - t0:.1f} s")
    return 0
