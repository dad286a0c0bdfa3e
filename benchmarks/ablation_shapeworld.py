"""Ablation of X2Edit's claims in small, on Shape World: same base, data, steps and seeds.

Variants (adapter on the frozen x2edit-tiny base):
    lora          one LoRA with the same trainable parameter count as the MoE-LoRA
    moe           MoE-LoRA, token top-k router on [token ; task embedding], no contrastive loss
    moe+con       the same + X2Edit's contrastive loss (T=0.5, weight 0.1)
    moe_task+con  task-level router (one mix per task: mergeable) + contrastive loss

For each variant and seed: train, then measure the per-task edit gain on the held-out split.
``--reading residual`` reads every variant as the change it makes to the source (see
x2edit/adapters/residual.py); ``direct`` is the plain LoRA reading. ``--source-start 0.5`` trains and
evaluates every variant as a one-step edit from the source (AdapterConfig.source_start) with the
edit-relative loss: x2edit-tiny's recipe is ``--reading residual --source-start 0.5``.
Writes OUT/ablation.json and OUT/ablation.md (mean +- spread over seeds, training seconds).

    python benchmarks/ablation_shapeworld.py --base runs/x2edit-tiny-base/pipeline \\
        --data data/shapeworld --steps 400 --seeds 0 1 --out runs/ablation
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

MOE = {"kind": "moe_lora", "rank": 8, "num_experts": 6, "top_k": 2, "shared_expert": True, "task_embed_dim": 64,
       "targets": "x2edit"}
VARIANTS = {
    "lora": ({"kind": "lora", "targets": "x2edit"}, 0.0),  # rank chosen to match the MoE-LoRA's parameters
    "moe": ({**MOE, "router": "token_topk"}, 0.0),
    "moe+con": ({**MOE, "router": "token_topk"}, 0.1),
    "moe_task+con": ({**MOE, "router": "task"}, 0.1),
}


def matched_lora_rank(base: str) -> int:
    """Rank of a plain LoRA on the same targets with (about) the MoE-LoRA's trainable parameter count."""
    from x2edit.adapters import AdapterConfig, adapter_summary, inject_adapters
    from x2edit.registry import load_pipeline

    counts = {}
    for kind, cfg in (("moe", AdapterConfig(**MOE)), ("lora1", AdapterConfig(kind="lora", rank=1, targets="x2edit"))):
        t = load_pipeline(base).transformer
        inject_adapters(t, cfg)
        counts[kind] = adapter_summary(t)["adapter_params"]
    return max(1, round(counts["moe"] / counts["lora1"]))


LOCAL_TASKS = ("subject_deletion", "subject_addition", "color_change", "material_change", "action_change",
               "subject_replacement", "portrait_retouch", "text_change", "implicit_change")


def one_step(args) -> float | None:
    """The noise level every variant edits from in one step: ``--source-start``, else its base's own."""
    if args.source_start is not None:
        return args.source_start
    from x2edit.registry import load_pipeline

    return load_pipeline(args.base).default_source_start


def default_weighting(args) -> str:
    """x2edit-tiny's loss for its reading: edit-relative x0 error for one-step, x0 error for residual."""
    if args.one_step is not None:
        return "x0_edit"
    return "x0" if args.reading == "residual" else "none"


def run_variant(name: str, adapter: dict, contrastive: float, args, seed: int) -> dict:
    from x2edit.training.config import config_from_dict
    from x2edit.training.eval_command import evaluate_shapeworld
    from x2edit.training.trainer import Trainer

    source = "shapeworld" if args.data == "shapeworld" else {"format": "x2edit", "path": args.data}
    config = config_from_dict({
        "mode": "edit", "output_dir": str(Path(args.out) / f"{name}_seed{seed}"), "seed": seed, "steps": args.steps,
        "batch_size": args.batch_size, "checkpoint_every": 0, "validate_every": 0, "log_every": 0,
        "num_threads": args.threads, "model": {"base": args.base, "max_text_tokens": 32},
        "adapter": {**adapter, "reading": args.reading, "source_start": args.source_start},
        "data": {"source": source, "resolution": 64,
                 "task_weights": dict.fromkeys(LOCAL_TASKS, args.local_weight) if args.local_weight != 1 else None},
        "loss": {"contrastive_weight": contrastive, "weighting": args.weighting or default_weighting(args),
                 "mask_weight": args.mask_weight},
        # x2edit-tiny's schedule (WSD, decay over the second half) with its one-step recipe; constant before
        "optim": {"lr": args.lr, "warmup_steps": min(100, args.steps // 10),
                  "decay_steps": args.steps // 2 if args.one_step is not None else 0}})
    t0 = time.perf_counter()
    trainer = Trainer(config)
    trainer.train()
    train_s = time.perf_counter() - t0
    steps = None if args.one_step is not None else args.eval_steps  # a one-step adapter takes its own one step
    table, _, _, _ = evaluate_shapeworld(trainer.pipe, args.n_per_task, 64, steps, seed=0)
    return {"train_seconds": train_s, "table": table,
            "trainable_params": sum(p.numel() for p in trainer.params)}


def mean_and_error(values: list[float]) -> dict:
    """Mean, standard error over seeds (sample std / sqrt(n); 0 for one seed) and spread (max - min)."""
    v = np.asarray(values, dtype=np.float64)
    err = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
    return {"mean": float(v.mean()), "stderr": err, "spread": float(np.ptp(v))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="frozen base pipeline directory (e.g. the tiny base)")
    ap.add_argument("--data", default="shapeworld", help="build-data output directory, or 'shapeworld' (on the fly)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--n-per-task", type=int, default=8)
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--reading", default="direct", choices=["direct", "residual"],
                    help="how every variant's adapter is read (default: direct)")
    ap.add_argument("--source-start", type=float, default=None,
                    help="train and edit in one step from the source at this noise level (x2edit-tiny: 0.5)")
    ap.add_argument("--weighting", default=None, choices=["none", "x0", "x0_edit"],
                    help="loss weighting (default: x0_edit one step from the source, x0 for the residual reading)")
    ap.add_argument("--mask-weight", type=float, default=0.0, help="the edit-region probe's loss weight (every variant)")
    ap.add_argument("--local-weight", type=float, default=1.0, help="sampling weight of the local tasks (every variant)")
    args = ap.parse_args(argv)
    args.one_step = one_step(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rank = matched_lora_rank(args.base)
    results = {}
    for name in args.variants:
        adapter, contrastive = VARIANTS[name]
        adapter = {**adapter, "rank": rank} if adapter["kind"] == "lora" else adapter
        results[name] = [run_variant(name, adapter, contrastive, args, s) for s in args.seeds]
    tasks = [t for t in results[args.variants[0]][0]["table"] if t != "mean"] + ["mean"]
    summary = {name: {t: mean_and_error([r["table"][t]["edit_gain_db"] for r in runs]) for t in tasks}
               for name, runs in results.items()}
    meta = {name: {"train_seconds": float(np.mean([r["train_seconds"] for r in runs])),
                   "trainable_params": runs[0]["trainable_params"]} for name, runs in results.items()}
    (out / "ablation.json").write_text(json.dumps({"args": vars(args), "lora_rank": rank, "edit_gain_db": summary,
                                                   "cost": meta, "runs": results}, indent=2))
    names = list(results)
    start = args.one_step
    lines = [f"Edit gain (dB) on held-out Shape World ({args.n_per_task} pairs per task), mean (standard error over "
             f"seeds {args.seeds}); {args.steps} steps x batch {args.batch_size}; {args.reading} reading"
             + (f", one step from the source at sigma {start}." if start else "."), "",
             "| task | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for t in tasks:
        lines.append(f"| {t} | " + " | ".join(f"{summary[n][t]['mean']:+.2f} ({summary[n][t]['stderr']:.2f})"
                                              for n in names) + " |")
    lines.append("| trainable params | " + " | ".join(f"{meta[n]['trainable_params']:,}" for n in names) + " |")
    lines.append("| train s / run | " + " | ".join(f"{meta[n]['train_seconds']:.0f}" for n in names) + " |")
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
