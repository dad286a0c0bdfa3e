"""The report of a ``tiny_gpu.sh`` / ``tiny_cpu.sh`` run: device, stage wall times, steps and samples seen,
eval tables, router accuracy, bar.

    python -m x2edit.training.recipes.report WORK OUT --adapter-config configs/x2edit_tiny/gpu/adapter.yaml

Reads what the stages wrote under WORK (times.txt, base/ and adapter/ metrics.jsonl and config.yaml,
the bundle, eval_labels/ and eval_classifier/ metrics.json, demo/metrics.json) and writes
OUT/report.json and OUT/report.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from x2edit.tasks import TASK_NAMES

# The release bar on the held-out split (x2edit eval --n-per-task 20; issues 13 and 21).
BAR = {"labels": {"mean": 3.0, "every_task": 0.5}, "classifier": {"mean": 2.5, "every_task": 0.0}}


def _stage(run: Path) -> dict:
    """Steps, batch, samples seen and the last logged throughput of one training stage."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] \
        if (run / "metrics.jsonl").is_file() else []
    steps = max((r["step"] for r in rows), default=0)
    rates = [r["train/samples_per_s"] for r in rows if "train/samples_per_s" in r]
    return {"steps": steps, "planned_steps": config["steps"], "batch_size": config["batch_size"],
            "samples_seen": steps * config["batch_size"], "samples_per_s": rates[-1] if rates else None,
            "time_budget_s": config.get("time_budget_s"), "pool": config["data"].get("pool")}


def _bar(table: dict, routing: str) -> dict:
    gains = {t: table[t]["edit_gain_db"] for t in TASK_NAMES if t in table}
    want = BAR[routing]
    return {"mean": table["mean"]["edit_gain_db"], "worst_task": min(gains, key=gains.get),
            "worst_gain": min(gains.values()),
            "met": table["mean"]["edit_gain_db"] >= want["mean"] and min(gains.values()) >= want["every_task"],
            "bar": want}


def build_report(work: Path, adapter_config: str) -> dict:
    import torch

    times: dict[str, int] = {}
    for line in (work / "times.txt").read_text().splitlines():  # a stage resumed in a later run: its parts add up
        name, seconds = line.split()
        times[name] = times.get(name, 0) + int(seconds)
    labels = json.loads((work / "eval_labels" / "metrics.json").read_text())
    classifier = json.loads((work / "eval_classifier" / "metrics.json").read_text())
    demo = json.loads((work / "demo" / "metrics.json").read_text())
    bundle = work / "x2edit-tiny"
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)",
        "torch": torch.__version__,
        "adapter_config": adapter_config,
        "stage_seconds": times,
        "base": _stage(work / "base"),
        "adapter": _stage(work / "adapter"),
        "bundle_mb": round(sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file()) / 1e6, 2),
        "eval_labels": labels,
        "eval_classifier": classifier,
        "demo": {"mean_gain_db": demo["mean"]["edit_gain_db"], "classifier_accuracy": demo.get("classifier_accuracy")},
        "router_accuracy": classifier.get("router_accuracy"),
        "bar": {"labels": _bar(labels, "labels"), "classifier": _bar(classifier, "classifier")},
    }


def markdown(r: dict) -> str:
    fmt = lambda v: "-" if v is None else f"{v:+.2f}"  # noqa: E731
    lines = [f"# x2edit-tiny run on {r['gpu']}", "",
             f"torch {r['torch']}; adapter config `{r['adapter_config']}`; bundle {r['bundle_mb']} MB.", "",
             "| stage | wall s | steps (planned) | batch | samples seen | samples/s (last log) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in ("base", "adapter"):
        s = r[name]
        rate = "-" if s["samples_per_s"] is None else f"{s['samples_per_s']:,.0f}"
        lines.append(f"| {name} | {r['stage_seconds'].get(name, '-')} | {s['steps']:,} ({s['planned_steps']:,}) | "
                     f"{s['batch_size']} | {s['samples_seen']:,} | {rate} |")
    rest = ", ".join(f"{k} {v} s" for k, v in r["stage_seconds"].items() if k not in ("base", "adapter"))
    lines += ["", f"Other stages: {rest}.", "",
              "Held-out edit gain (dB), `x2edit eval` (label routing | classifier routing):", "",
              "| task | labels | classifier |", "|---|---:|---:|"]
    for task in [*TASK_NAMES, "mean"]:
        if task in r["eval_labels"]:
            lines.append(f"| {task} | {fmt(r['eval_labels'][task]['edit_gain_db'])} | "
                         f"{fmt(r['eval_classifier'].get(task, {}).get('edit_gain_db'))} |")
    for routing, b in r["bar"].items():
        lines.append(f"\nBar, {routing} routing (mean >= {b['bar']['mean']}, every task >= {b['bar']['every_task']}): "
                     f"{'met' if b['met'] else 'NOT met'} (mean {b['mean']:+.2f}, worst {b['worst_task']} "
                     f"{b['worst_gain']:+.2f}).")
    if r.get("router_accuracy") is not None:
        lines.append(f"\nThe task router sent {100 * r['router_accuracy']:.1f}% of the held-out instructions to their "
                     "task.")
    lines.append(f"\nDemo: mean {fmt(r['demo']['mean_gain_db'])} dB, classifier accuracy "
                 f"{r['demo']['classifier_accuracy']}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--adapter-config", default="")
    args = ap.parse_args(argv)
    report = build_report(args.work, args.adapter_config)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    (args.out / "report.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
