"""``x2edit lora``: make a LoRA pool, train the weight encoder and the fusion gate, index and search LoRA files.

    x2edit lora pool --config configs/autolora/pool.yaml --out runs/autolora/pool

Each training command takes a YAML ``--config`` and ``key=value`` overrides of its dataclass
(``PoolConfig``).
"""

from __future__ import annotations

import argparse
import json
import logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="lora_command", metavar="SUBCOMMAND", required=True)
    p = sub.add_parser("pool", help="train the concept LoRA pool on a base (Shape World, offline)")
    p.add_argument("--config", default=None, help="pool config YAML (default: the built-in defaults)")
    p.add_argument("--out", required=True, help="output directory (loras/, joint/, rejected/, pool.json)")
    p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists in --out")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config")


def run(args) -> int:
    from retrieval.config import load

    if args.lora_command == "pool":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.lora_command == "pool":
        from retrieval.pool import PoolConfig, make_pool

        manifest = make_pool(load(PoolConfig, args.config, args.overrides), args.out, resume=not args.no_resume)
        print(json.dumps(manifest["summary"]))
    return 0
