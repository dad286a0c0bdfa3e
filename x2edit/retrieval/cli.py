"""``x2edit lora``: make a LoRA pool, train the weight encoder and the fusion gate, index and search LoRA files.

    x2edit lora pool --config configs/autolora/pool.yaml --out runs/autolora/pool
    x2edit lora train-encoder --pool runs/autolora/pool --out runs/autolora/encoder.safetensors
    x2edit lora index DIR --out INDEX.parquet [--encoder FILE] [--workers N] [--engine local|ray]
    x2edit lora search "QUERY" --index INDEX.parquet [-k 5] [--json]
    x2edit lora train-gate --pool runs/autolora/pool --out runs/autolora/gate.safetensors [--encoder FILE]

Each training command takes a YAML ``--config`` and ``key=value`` overrides of its dataclass
(``PoolConfig``, ``EncoderTrainConfig``, ``GateTrainConfig``).
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

    p = sub.add_parser("train-encoder", help="train the weight encoder on a pool's train LoRAs")
    p.add_argument("--pool", required=True, help="pool directory (x2edit lora pool)")
    p.add_argument("--out", required=True, help="encoder file to write (.safetensors)")
    p.add_argument("--config", default=None, help="EncoderTrainConfig YAML")
    p.add_argument("overrides", nargs="*", help="key=value overrides")

    p = sub.add_parser("index", help="index a folder of LoRA files (incremental)")
    p.add_argument("dir", help="folder of LoRA files (searched recursively)")
    p.add_argument("--out", required=True, help="index file (.parquet); an existing one is updated")
    p.add_argument("--encoder", default=None, help="weight encoder file (default: the shipped x2edit-tiny encoder)")
    p.add_argument("--workers", type=int, default=1, help="processes embedding new files (local, or Ray tasks)")
    p.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="local processes, or Ray Data (a local Ray, or --ray-address)")
    p.add_argument("--ray-address", default=None, help="a Ray cluster to run on (--engine ray)")

    p = sub.add_parser("search", help="find LoRAs for a description (or like a LoRA file) in an index")
    p.add_argument("query", nargs="?", default=None, help='what the LoRA should do, e.g. "a sepia tone"')
    p.add_argument("--like", default=None, metavar="FILE",
                   help="find LoRAs whose weights are like this LoRA file's (the base-free fingerprint), instead")
    p.add_argument("--index", required=True, help="index file (x2edit lora index)")
    p.add_argument("-k", type=int, default=5, help="results")
    p.add_argument("--signal", default="auto", choices=["auto", "weight", "text"],
                   help="what scores the query: auto (the weight embedding for what the encoder was trained on, "
                        "else the file text where it clearly matches, else the weights), or one signal")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("train-gate", help="train the fusion gate on composition pairs of a pool's train LoRAs")
    p.add_argument("--pool", required=True, help="pool directory (x2edit lora pool)")
    p.add_argument("--out", required=True, help="gate file to write (.safetensors)")
    p.add_argument("--encoder", default=None, help="weight encoder file (default: the shipped x2edit-tiny encoder)")
    p.add_argument("--config", default=None, help="GateTrainConfig YAML")
    p.add_argument("overrides", nargs="*", help="key=value overrides")


def run(args) -> int:
    from x2edit.retrieval.config import load

    if args.lora_command in ("pool", "train-encoder", "train-gate"):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.lora_command == "pool":
        from x2edit.retrieval.pool import PoolConfig, make_pool

        manifest = make_pool(load(PoolConfig, args.config, args.overrides), args.out, resume=not args.no_resume)
        print(json.dumps(manifest["summary"]))
    elif args.lora_command == "train-encoder":
        from x2edit.retrieval.encoder import EncoderTrainConfig, train_encoder

        summary = train_encoder(args.pool, args.out, load(EncoderTrainConfig, args.config, args.overrides))
        print(f"wrote {args.out} ({summary['train_loras']} LoRAs, {summary['steps']} steps, {summary['train_s']:.0f} s)")
        if "validation" in summary:
            v = summary["validation"]
            print(f"validation R@1 {v['R@1']:.2f} ({v['queries']} queries over {v['concepts']} held-out instances)")
    elif args.lora_command == "train-gate":
        from x2edit.retrieval.fusion import GateTrainConfig, train_gate

        summary = train_gate(args.pool, args.encoder, args.out, load(GateTrainConfig, args.config, args.overrides))
        print(f"wrote {args.out} ({summary['train_loras']} LoRAs, {summary['steps']} steps, {summary['train_s']:.0f} s)")
    elif args.lora_command == "index":
        from x2edit.retrieval.index import build_index

        if args.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {args.workers}")
        if args.ray_address and args.engine != "ray":
            raise ValueError("--ray-address is for --engine ray")
        counts = build_index(args.dir, args.out, args.encoder, args.workers, engine=args.engine,
                             ray_address=args.ray_address)
        print(f"indexed {args.dir} -> {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    elif args.lora_command == "search":
        from x2edit.retrieval.index import LoraIndex

        if (args.query is None) == (args.like is None):
            raise ValueError("give a query (what the LoRA should do) or --like FILE, one of the two")
        index = LoraIndex(args.index)
        if args.like is not None and args.signal != "auto":
            raise ValueError("--signal is for a text query; --like searches by the weight fingerprint")
        hits = (index.search(args.query, args.k, signal=args.signal) if args.like is None
                else index.search_like(args.like, args.k))
        if args.json:
            print(json.dumps(hits, indent=1))
        else:
            counts = index.signal_counts()
            how = "by the weight fingerprint" if args.like else f"by the {hits[0]['route']} signal"
            print(f"{counts['text']} LoRAs searched {how}; {counts['weight']} have the weight signal")
            for h in hits:
                words = f"  [{', '.join(h['trigger_words'])}]" if h["trigger_words"] else ""
                print(f"{h['rank']:>2}  {h['score']:.3f}  {'+'.join(h['signals']):12s} {h['path']}  {h['title']}{words}")
    return 0
