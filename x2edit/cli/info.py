"""`x2edit info`: versions, devices, kernel backend, registered base models and tasks."""

from __future__ import annotations

import importlib.metadata as md
import platform


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print as JSON")


def collect() -> dict:
    import torch

    from x2edit import kernels
    from x2edit.registry import BASE_MODELS
    from x2edit.tasks import TASKS

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    devices = ["cpu"] + [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    return {
        "versions": {p: version(p) for p in ("x2edit", "torch", "diffusers", "transformers", "peft", "accelerate",
                                              "triton", "sentence-transformers", "ray", "gradio")},
        "python": platform.python_version(),
        "devices": devices,
        "kernel_backend": kernels.get_backend(),
        "base_models": {m.name: {"source": m.source, "mode": m.mode, "weights_gb_bf16": m.weights_gb,
                                 "available": m.available, "description": m.description}
                        for m in BASE_MODELS.values()},
        "tasks": {t.name: t.description for t in TASKS},
    }


def run(args) -> int:
    info = collect()
    if args.json:
        import json

        print(json.dumps(info, indent=2))
        return 0
    print(f"x2edit {info['versions']['x2edit']} on Python {info['python']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v and k != "x2edit"))
    print("not installed: " + (", ".join(k for k, v in info["versions"].items() if not v) or "-"))
    print("devices: " + ", ".join(info["devices"]) + f"   (kernel backend: {info['kernel_backend']})")
    print("\nbase models:")
    for name, m in info["base_models"].items():
        state = "" if m["available"] else "  [not bundled yet]"
        print(f"  {name:20s} {m['mode']:8s} {m['weights_gb_bf16']:6.2f} GB  {m['source']}{state}")
    print(f"\ntasks ({len(info['tasks'])}):")
    for name, desc in info["tasks"].items():
        print(f"  {name:20s} {desc}")
    return 0
