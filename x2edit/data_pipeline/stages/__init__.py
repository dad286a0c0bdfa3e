"""Built-in stages, registered by name on import (see ``base.STAGES``)."""

from x2edit.data_pipeline.stages import experts, filters, instructions, sampler, scorers, sources  # noqa: F401
from x2edit.data_pipeline.stages.base import STAGES, Stage, register_stage


def list_stages() -> dict[str, str]:
    """name -> role of every registered stage (the built-in ones are registered by this package's import)."""
    return {name: cls.role for name, cls in sorted(STAGES.items())}


__all__ = ["STAGES", "Stage", "list_stages", "register_stage"]
