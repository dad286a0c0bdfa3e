"""A validated chain of stages built from a ``BuildConfig``.

Building a ``Pipeline`` checks everything that can be checked without doing work: stage types
and parameters, each stage's declared dependencies against what earlier stages provide, filter
rules against the scores earlier scorers write, the tasks a sampler draws against what the
experts can do, and the fields a written sample needs.
"""

from __future__ import annotations

import time

from x2edit.data_pipeline.config import BuildConfig
from x2edit.data_pipeline.sample import Sample
from x2edit.data_pipeline.stages import STAGES
from x2edit.data_pipeline.stages.base import Stage, build_params
from x2edit.data_pipeline.stages.experts import Expert
from x2edit.data_pipeline.stages.filters import ThresholdFilter
from x2edit.data_pipeline.stages.sampler import TaskSampler
from x2edit.data_pipeline.stages.sources import Source

# What a written sample must have.
WRITER_NEEDS = frozenset({"source", "target", "instruction", "task"})


def make_stage(spec, index: int) -> Stage:
    cls = STAGES.get(spec.type)
    if cls is None:
        raise ValueError(f"stages[{index}]: unknown stage {spec.type!r}; known: {', '.join(sorted(STAGES))}")
    stage = cls(build_params(cls, spec.params, f"stage {spec.label}"), spec.label)
    stage.validate()
    return stage


class Pipeline:
    """Source + processing stages, validated.

    Args:
        config: the build config.
    """

    def __init__(self, config: BuildConfig):
        self.config = config
        stages = [make_stage(spec, i) for i, spec in enumerate(config.stages)]
        labels = [s.name for s in stages]
        dup = sorted({n for n in labels if labels.count(n) > 1})
        if dup:
            raise ValueError(f"stage name(s) {', '.join(dup)} used twice; give repeated stages distinct 'name's")
        if not isinstance(stages[0], Source):
            raise ValueError(f"the first stage must be a source ({', '.join(_of_role('source'))}), got {stages[0].name!r}")
        extra_sources = [s.name for s in stages[1:] if isinstance(s, Source)]
        if extra_sources:
            raise ValueError(f"only one source per config; extra: {', '.join(extra_sources)}")
        self.source: Source = stages[0]
        self.stages: list[Stage] = stages[1:]
        self._check_dependencies()

    def _check_dependencies(self) -> None:
        have = set(self.source.provides)
        scores: set[str] = set()
        sampler: TaskSampler | None = None
        for st in self.stages:
            missing = sorted(st.requires - have)
            if missing:
                hint = {"instruction": "an instruction writer (template_instructions, chat_instructions)",
                        "target": "an expert", "task": "task_sampler", "seed": "shapeworld_source",
                        "edit": "shapeworld_expert", "mask": "an expert or source that gives masks",
                        "source": "a source of images"}
                raise ValueError(f"stage {st.name!r} needs {', '.join(missing)}, which no earlier stage provides "
                                 f"(add {hint.get(missing[0], 'a stage that provides it')} before it)")
            have |= st.provides
            scores |= set(st.score_names())
            if isinstance(st, ThresholdFilter):
                unknown = sorted(st.needed_scores() - scores)
                if unknown:
                    raise ValueError(f"stage {st.name!r}: score(s) {', '.join(unknown)} are not written by any "
                                     f"earlier scorer (available: {', '.join(sorted(scores)) or 'none'})")
            if isinstance(st, TaskSampler):
                sampler = st
            if isinstance(st, Expert) and sampler is not None:
                unsupported = [t for t in sampler.active_tasks() if t not in st.supported_tasks()]
                if unsupported:
                    listed = f" or list them in {st.name}.tasks" if hasattr(st.params, "tasks") else ""
                    raise ValueError(f"{sampler.name} draws task(s) {', '.join(unsupported)} that {st.name} does not "
                                     f"handle (it makes {', '.join(st.supported_tasks())}); set their weights to "
                                     f"0{listed}")
        missing = sorted(WRITER_NEEDS - have)
        if missing:
            raise ValueError(f"the written samples would lack {', '.join(missing)}: add stages that provide them")

    # -- running ----------------------------------------------------------------------------

    def setup(self) -> None:
        for st in [self.source, *self.stages]:
            st.setup()

    def score_names(self) -> list[str]:
        names: list[str] = []
        for st in self.stages:
            names += [n for n in st.score_names() if n not in names]
        return names

    def run_stages(self, batch: list[Sample], stages: list[Stage] | None = None) -> list[Sample]:
        """Run ``stages`` (default: all after the source) over a batch, timing each per sample."""
        for st in self.stages if stages is None else stages:
            t0 = time.perf_counter()
            batch = st.process(batch)
            share = (time.perf_counter() - t0) / max(len(batch), 1)
            for s in batch:
                t = s.extra.setdefault("timings", {})
                t[st.name] = t.get(st.name, 0.0) + share
        return batch


def _of_role(role: str) -> list[str]:
    return sorted(n for n, c in STAGES.items() if c.role == role)
