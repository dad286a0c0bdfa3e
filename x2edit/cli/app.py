"""`x2edit app`: the Gradio editing app (``x2edit/app/``), offline on x2edit-tiny by default."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--base", default=None, help="registered base model name or local pipeline directory "
                                                       "(default: x2edit-tiny)")
    parser.add_argument("--adapter", default=None, help="x2edit adapter file (.safetensors) offered beside the base's own")
    parser.add_argument("--lora-index", default=None, metavar="INDEX",
                        help="AutoLoRA index to search in the LoRA panel (x2edit lora index DIR --out INDEX)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=int, default=None, help="port (default: the first free one from 7860)")
    parser.add_argument("--max-file-size", default="20mb", help="largest upload accepted, e.g. 20mb, 500kb (default 20mb)")
    parser.add_argument("--output-dir", default=None, help="where results, history and zips go (default: a new temporary folder)")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="weights dtype (default: bfloat16 on CUDA, float32 on CPU)")


def run(args) -> int:
    from pathlib import Path

    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError("the editing app needs Gradio: pip install 'x2edit[app]'") from None
    from x2edit.adapters import read_adapter_header
    from x2edit.app.handlers import AppConfig, parse_file_size
    from x2edit.registry import resolve_base, resolve_device

    # Everything checkable before loading the model.
    parse_file_size(args.max_file_size)
    if args.port is not None and not 0 < args.port < 65536:
        raise ValueError(f"--port must be 1..65535, got {args.port}")
    if args.base is not None:
        resolve_base(args.base)
    if args.adapter:
        read_adapter_header(args.adapter)
    if args.lora_index is not None and not Path(args.lora_index).is_file():
        raise FileNotFoundError(f"LoRA index not found: {args.lora_index} (build one with `x2edit lora index DIR "
                                f"--out {args.lora_index}`)")
    resolve_device(args.device)
    from x2edit.app.ui import launch

    config = AppConfig(base=args.base, adapter=args.adapter, lora_index=args.lora_index, host=args.host,
                       port=args.port, max_file_size=args.max_file_size, output_dir=args.output_dir,
                       device=args.device, dtype=args.dtype)
    launch(config, block=True)
    return 0
