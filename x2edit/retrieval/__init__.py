"""AutoLoRA, the retrieval layer: LoRA files found by what their weights do, and fused with a learned gate.

    from x2edit.retrieval import LoraIndex, LearnedGate
    index = LoraIndex("loras.parquet")                     # built by `x2edit lora index DIR --out ...`
    index.search("a sepia tone", k=3)
    pipe(image=img, prompt="make it sepia", lora_index=index, auto_lora_top_k=2)
    pipe.fuse_loras(["a", "b"], fusion=LearnedGate())     # the gate shipped for x2edit-tiny

Modules: ``pool`` (concept LoRAs on Shape World), ``encoder`` (the weight encoder and its training),
``index`` (index files and search), ``fusion`` (the learned gate and its training), ``flow`` (the LoRA
flow they train in), ``formats`` (community file layouts). The fusion runtime the pipeline runs is the
core's (``x2edit.adapters.fusion``). See docs/autolora.md.
"""

from __future__ import annotations

_LAZY = {"LoraIndex": "x2edit.retrieval.index", "LearnedGate": "x2edit.retrieval.fusion"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'x2edit.retrieval' has no attribute {name!r}")


__all__ = ["LoraIndex", "LearnedGate"]
