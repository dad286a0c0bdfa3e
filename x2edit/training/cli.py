"""`x2edit train [--preset NAME] --config FILE [key=value ...] [--resume latest|DIR]`."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--config", default=None, help="YAML training config (see configs/)")
    parser.add_argument("--preset", default=None,
                        help="named settings applied before --config, e.g. x2edit_upstream (x2edit/training/presets/)")
    parser.add_argument("overrides", nargs="*", help="config overrides as dotted key=value, e.g. optim.lr=3e-4")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint directory")


def run(args) -> int:
    import logging

    from x2edit.training.config import load_config
    from x2edit.training.trainer import Trainer, TrainingError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = load_config(args.config, args.overrides, preset=args.preset)  # all config errors before any model is built
    try:
        out = Trainer(config).train(resume=args.resume)
    except TrainingError as e:
        raise ValueError(str(e)) from None
    print(f"done: {out}")
    return 0
