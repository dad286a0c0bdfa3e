"""x2edit: instruction-based image editing on FLUX-family diffusion transformers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from x2edit.tasks import TASK_NAMES, TASKS, Task, get_task, task_id

__version__ = "0.1.0"

# Heavy imports (diffusers, transformers) are resolved on first attribute access so that
# `import x2edit` and `x2edit --help` stay fast.
_LAZY = {
    "X2EditPipeline": "x2edit.pipeline",
    "X2EditDiptychPipeline": "x2edit.pipeline_diptych",
    "list_base_models": "x2edit.registry",
    "get_base_model": "x2edit.registry",
    "TaskClassifier": "x2edit.task_classifier",
    "AdapterConfig": "x2edit.adapters",
    "inject_adapters": "x2edit.adapters",
}

if TYPE_CHECKING:  # pragma: no cover
    from x2edit.adapters import AdapterConfig, inject_adapters
    from x2edit.pipeline import X2EditPipeline
    from x2edit.pipeline_diptych import X2EditDiptychPipeline
    from x2edit.registry import get_base_model, list_base_models
    from x2edit.task_classifier import TaskClassifier


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'x2edit' has no attribute {name!r}")


__all__ = ["TASKS", "TASK_NAMES", "Task", "get_task", "task_id", "X2EditPipeline", "X2EditDiptychPipeline",
           "list_base_models",
           "get_base_model", "TaskClassifier", "AdapterConfig", "inject_adapters"]
