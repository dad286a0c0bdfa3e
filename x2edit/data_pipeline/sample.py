"""The record that flows through the stages of ``x2edit build-data``."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Fields a stage can declare in ``requires`` / ``provides``. "edit" is Shape World's exact scene
# edit (kept in ``extra``), "captions" a (source, target) pair of scene descriptions.
FIELDS = ("seed", "source", "target", "mask", "instruction", "task", "edit", "captions")


@dataclass
class Sample:
    """One editing pair in the making.

    Args:
        key: unique, stable id; the WebDataset key of the written sample (no dots or slashes).
        shard: output shard index.
        source, target: (H, W, 3) uint8 images, or None until a stage provides them.
        mask: (H, W) bool edited region, or None when unknown.
        instruction, task: the instruction text and task name.
        seed: the generator seed (Shape World) or None.
        scores: name -> number, or None when a scorer could not score (see ``notes``).
        notes: name -> why that score is None.
        provenance: JSON-able facts about where the sample came from and what made it.
        dropped: None while the sample is kept, else (stage, rule, detail). Dropped samples pass
            through the remaining stages untouched and are written to the index, not the shards.
        extra: stage-to-stage data that is not written (e.g. Shape World's scene edit).
    """

    key: str
    shard: int = 0
    source: np.ndarray | None = None
    target: np.ndarray | None = None
    mask: np.ndarray | None = None
    instruction: str | None = None
    task: str | None = None
    seed: int | None = None
    scores: dict[str, float | None] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    dropped: tuple[str, str, str] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def kept(self) -> bool:
        return self.dropped is None

    def drop(self, stage: str, rule: str, detail: str = "") -> None:
        """Mark the sample dropped (first reason wins)."""
        if self.dropped is None:
            self.dropped = (stage, rule, detail)

    def set_score(self, name: str, value: float | None, note: str | None = None) -> None:
        """Record a score; a None value needs a ``note`` saying why."""
        if value is None:
            self.scores[name] = None
            self.notes[name] = note or "no score"
        else:
            self.scores[name] = float(value)
            self.notes.pop(name, None)
