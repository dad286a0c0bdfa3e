"""The ``x2edit`` command line: the top floor of the package, the only one that may import every layer.

Each command lives in the package that owns it and is imported only when that command runs, so
``x2edit --help`` stays fast and optional dependencies are needed only by their commands. A command
module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module implementing it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "edit": ("x2edit.cli.edit", "edit an image from an instruction"),
    "app": ("x2edit.cli.app", "the editing app in the browser (Gradio): edit, chain, batch, history, LoRA search"),
    "info": ("x2edit.cli.info", "versions, devices, registered base models and tasks"),
    "demo": ("x2edit.training.demo", "run the embedded x2edit-tiny on held-out Shape World edits of all 15 tasks"),
    "eval": ("x2edit.training.eval_command", "benchmark edits: Shape World (exact targets) or real images (GEdit-Bench form)"),
    "train": ("x2edit.training.cli", "train a MoE-LoRA editing adapter (or pretrain a base) with flow matching"),
    "build-data": ("x2edit.data_pipeline.cli", "build, score, filter and shard editing pairs (Shape World by default)"),
    "data": ("x2edit.training.data_command", "inspect training data: layouts, task labels, scores, what a config keeps"),
    "lora": ("x2edit.retrieval.cli", "AutoLoRA: make a LoRA pool, train the weight encoder and fusion gate, index and search LoRAs"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="x2edit", description="Instruction-based image editing on FLUX-family models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        # Arguments are added lazily (see main) unless this command is the one being run.
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    command = argv[0] if argv and argv[0] in COMMANDS else None
    if command is None:
        args = parser.parse_args(argv)  # prints help / errors for unknown commands
        parser.print_help()
        return 0 if not argv else 2
    module = importlib.import_module(COMMANDS[command][0])
    sub = argparse.ArgumentParser(prog=f"x2edit {command}", description=COMMANDS[command][1])
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # the user's input: one line, exit status 2, no traceback
        print(f"x2edit {command}: error: {e}", file=sys.stderr)
        return 2
