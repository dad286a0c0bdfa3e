"""``x2edit build-data``: build, score, filter and shard editing pairs.

    x2edit build-data --out DIR [--config FILE] [--num-samples N] [--engine local|ray]
                      [--workers N] [--ray-address ADDR] [--overwrite] [key=value ...]

Without ``--config`` the Shape World default runs (``x2edit.data_pipeline.config.DEFAULT_CONFIG``).
"""

from __future__ import annotations

import argparse
import logging
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="output directory (shards, index.parquet, stats.json, manifest); required")
    parser.add_argument("--config", default=None, help="YAML config; default: the Shape World config")
    parser.add_argument("--num-samples", type=int, default=None, help="samples to plan (default: the config's)")
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="local: processes over shards (default); ray: Ray Data")
    parser.add_argument("--workers", type=int, default=None,
                        help="local processes or Ray actors per model stage (default: number of CPUs)")
    parser.add_argument("--ray-address", default=None, help="Ray cluster address (ray engine); default: start a local Ray")
    parser.add_argument("--overwrite", action="store_true", help="replace another run's shards in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--list-stages", action="store_true", help="list the registered stages and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. writer.samples_per_shard=100 task_sampler.weights.color_change=2")


def run(args: argparse.Namespace) -> int:
    from x2edit.data_pipeline.config import load_config
    from x2edit.data_pipeline.runner import build
    from x2edit.data_pipeline.stages import list_stages

    if args.list_stages:
        for name, role in list_stages().items():
            print(f"{role:13s} {name}")
        return 0
    if not args.out:
        raise ValueError("--out is required (the output directory)")
    if args.num_samples is not None and args.num_samples < 1:
        raise ValueError(f"--num-samples must be positive, got {args.num_samples}")
    if args.ray_address and args.engine != "ray":
        raise ValueError("--ray-address needs --engine ray")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = load_config(args.config, args.overrides, args.num_samples)
    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    build(config, args.out, engine=args.engine, workers=workers, ray_address=args.ray_address,
          overwrite=args.overwrite, progress=not args.no_progress)
    return 0
