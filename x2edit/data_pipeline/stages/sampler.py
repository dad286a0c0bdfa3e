"""The task sampler: gives each sample a task, by per-task weights, deterministically per key."""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from x2edit.data_pipeline.stages.base import Stage, register_stage
from x2edit.tasks import TASK_NAMES, get_task


@register_stage("task_sampler")
class TaskSampler(Stage):
    """Draw a task per sample.

    Args (Params):
        weights: task name -> weight; tasks not listed get ``default_weight``.
        default_weight: weight of unlisted tasks (0 restricts sampling to the listed ones).
        seed: mixes into the per-sample draw (same seed + key -> same task).
        keep_existing: keep a task the source already gave (e.g. a parquet column); a label that is
            not a task name drops the sample with the reason.
    """

    role = "sampler"

    @dataclasses.dataclass
    class Params:
        weights: dict[str, float] = dataclasses.field(default_factory=dict)
        default_weight: float = 1.0
        seed: int = 0
        keep_existing: bool = True

    @property
    def provides(self):
        return frozenset({"task"})

    def validate(self):
        for name, w in self.params.weights.items():
            try:
                get_task(name)
            except ValueError as e:
                raise ValueError(f"{self.name}.weights: {e}") from None
            if w < 0:
                raise ValueError(f"{self.name}.weights: weight of {name} must be >= 0, got {w}")
        if self.params.default_weight < 0:
            raise ValueError(f"{self.name}: default_weight must be >= 0")
        if self.probabilities().sum() <= 0:
            raise ValueError(f"{self.name}: all task weights are zero")

    def probabilities(self) -> np.ndarray:
        """(num_tasks,) sampling probabilities in ``TASK_NAMES`` order (unnormalised if all zero)."""
        w = np.array([float(self.params.weights.get(t, self.params.default_weight)) for t in TASK_NAMES])
        return w / w.sum() if w.sum() > 0 else w

    def active_tasks(self) -> tuple[str, ...]:
        return tuple(t for t, p in zip(TASK_NAMES, self.probabilities()) if p > 0)

    def process(self, batch):
        p = self.probabilities()
        for s in batch:
            if not s.kept:
                continue
            if s.task is not None and self.params.keep_existing:
                try:
                    s.task = get_task(s.task).name
                except ValueError:
                    s.drop(self.name, "unknown task", f"{s.task!r} is not a task of x2edit.tasks")
                continue
            rng = np.random.default_rng([self.params.seed, zlib.crc32(s.key.encode())])
            s.task = TASK_NAMES[int(rng.choice(len(TASK_NAMES), p=p))]
        return batch
