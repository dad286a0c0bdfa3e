"""Built-in stages, registered by name on import (see ``base.STAGES``)."""

from data_pipeline.stages import experts, filters, instructions, sampler, scorers, sources  # noqa: F401
from data_pipeline.stages.base import STAGES, Stage, list_stages, register_stage

__all__ = ["STAGES", "Stage", "list_stages", "register_stage"]
