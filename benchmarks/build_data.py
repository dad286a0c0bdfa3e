"""Benchmark `x2edit build-data`: Shape World generation speed and the engines' throughput.

    python benchmarks/build_data.py --out results/build_data            # ~2 minutes on 2 cores
    python benchmarks/build_data.py --out results/build_data --quick    # fewer samples

Writes OUT/build_data.json (every measurement plus the environment) and OUT/build_data.md.

What is measured:
  generation   ShapeWorld(resolution).sample(seed) in a loop on one core (source, target, mask and
               instruction; no encoding, no scoring) at 64, 128 and 256 px.
  engines      the default build-data config (Shape World -> task sampler -> exact expert ->
               templates -> oracle + pixel scores -> filter -> PNG/tar/parquet) end to end into a
               fresh directory: local with 1 and 2 worker processes, Ray Data with 1 and 2 workers.
               pairs/s = planned samples / wall time of the processing (pool start-up included for
               local; Ray's own start-up, `ray.init`, is measured apart and excluded).
  ratios       scaling = pairs/s with 2 workers / with 1; Ray / local at the same worker count.
The machine may be shared: the load average before each run is recorded beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from x2edit.data_pipeline.config import load_config
from x2edit.data_pipeline.runner import build
from x2edit.data_pipeline.shapeworld import ShapeWorld

HERE, ROOT = Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def bench_generation(resolution: int, n: int) -> dict:
    sw = ShapeWorld(resolution)
    sw.sample(0)  # warm caches (fonts, outlines)
    load = _load()
    t0 = time.perf_counter()
    for seed in range(n):
        sw.sample(seed)
    dt = time.perf_counter() - t0
    return {"resolution": resolution, "pairs": n, "seconds": round(dt, 3), "pairs_per_second": round(n / dt, 1),
            "load_before": load}


def bench_engine(engine: str, workers: int, n: int, per_shard: int) -> dict:
    cfg = load_config(None, [f"writer.samples_per_shard={per_shard}"], n)
    out = Path(tempfile.mkdtemp(prefix=f"bench_{engine}{workers}_"))
    load = _load()
    try:
        stats = build(cfg, out, engine=engine, workers=workers, progress=False, echo=lambda *_: None)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    run = stats["run"]
    stage_ms = {k: round(1000 * v["seconds_per_sample"], 3) for k, v in stats["stages"].items()
                if v["seconds_per_sample"] is not None}
    return {"engine": engine, "workers": workers, "pairs": n, "kept": stats["totals"]["kept"],
            "seconds": run["seconds"], "pairs_per_second": run["pairs_per_second"], "load_before": load,
            "stage_ms_per_sample": stage_ms}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder for build_data.json and build_data.md")
    ap.add_argument("--quick", action="store_true", help="fewer samples")
    ap.add_argument("--samples", type=int, default=None, help="samples per engine run (default 4000; quick 1000)")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray runs")
    args = ap.parse_args(argv)
    n = args.samples or (1000 if args.quick else 4000)
    per_shard = max(50, n // 16)
    gen_n = 300 if args.quick else 1000

    results: dict = {"generation": [], "engines": [], "ray_init_seconds": None}
    for res in (64, 128, 256):
        r = bench_generation(res, gen_n if res == 64 else gen_n // 4)
        print(f"generation {res}px: {r['pairs_per_second']} pairs/s", flush=True)
        results["generation"].append(r)
    for w in (1, 2):
        r = bench_engine("local", w, n, per_shard)
        print(f"local x{w}: {r['pairs_per_second']} pairs/s", flush=True)
        results["engines"].append(r)
    if not args.no_ray:
        try:
            import ray
        except ImportError:
            print("ray not installed: skipping the Ray runs (pip install x2edit[ray])")
        else:
            for w in (1, 2):
                t0 = time.perf_counter()
                ray.init(num_cpus=w, include_dashboard=False, log_to_driver=False, configure_logging=False)
                init = time.perf_counter() - t0
                try:
                    r = bench_engine("ray", w, n, per_shard)
                finally:
                    ray.shutdown()
                r["ray_init_seconds"] = round(init, 2)
                print(f"ray x{w}: {r['pairs_per_second']} pairs/s (ray.init {init:.1f} s apart)", flush=True)
                results["engines"].append(r)

    rate = {(r["engine"], r["workers"]): r["pairs_per_second"] for r in results["engines"]}
    ratios = {}
    for eng in ("local", "ray"):
        if (eng, 1) in rate and (eng, 2) in rate:
            ratios[f"{eng} scaling 2/1 workers"] = round(rate[(eng, 2)] / rate[(eng, 1)], 2)
    for w in (1, 2):
        if ("ray", w) in rate and ("local", w) in rate:
            ratios[f"ray/local at {w} worker(s)"] = round(rate[("ray", w)] / rate[("local", w)], 2)
    results["ratios"] = ratios
    results["env"] = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
                      "platform": platform.platform(), "cpus": os.cpu_count(), "samples_per_run": n,
                      "samples_per_shard": per_shard}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "build_data.json").write_text(json.dumps(results, indent=1))
    lines = ["# build-data benchmark", "",
             f"{results['env']['date']}, {results['env']['cpus']} CPUs, Python {results['env']['python']}; "
             f"{n} samples per engine run, {per_shard} per shard. Load average before each run is shown: "
             "the machine may be shared.", "",
             "## Shape World generation (one core, no encoding or scoring)", "",
             "| resolution | pairs | pairs/s | load |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['resolution']} | {r['pairs']} | {r['pairs_per_second']} | {r['load_before']} |"
              for r in results["generation"]]
    lines += ["", "## build-data, default config, end to end", "",
              "| engine | workers | pairs | seconds | pairs/s | load |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['engine']} | {r['workers']} | {r['pairs']} | {r['seconds']} | {r['pairs_per_second']} | "
              f"{r['load_before']} |" for r in results["engines"]]
    lines += ["", "| ratio | value |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in ratios.items()]
    one = next((r for r in results["engines"] if r["engine"] == "local" and r["workers"] == 1), None)
    if one:
        lines += ["", "Per-stage cost, local x1 (ms per sample):", "", "| stage | ms |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in one["stage_ms_per_sample"].items()]
    (out / "build_data.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'build_data.json'} and {out / 'build_data.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
