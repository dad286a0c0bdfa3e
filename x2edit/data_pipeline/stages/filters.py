"""Filters: drop samples whose named scores fail threshold rules, recording which rule and value."""

from __future__ import annotations

import dataclasses
import operator
import re
from dataclasses import dataclass

from x2edit.data_pipeline.stages.base import Stage, register_stage

_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq,
        "!=": operator.ne}
_RULE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|==|!=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class Rule:
    """``score op value``, e.g. ``oracle_psnr >= 30``."""

    score: str
    op: str
    value: float

    @classmethod
    def parse(cls, text: str) -> Rule:
        m = _RULE.match(text) if isinstance(text, str) else None
        if m is None:
            raise ValueError(f"bad threshold rule {text!r}: expected '<score> <op> <number>' with op one of "
                             f"{' '.join(_OPS)}, e.g. 'oracle_psnr >= 30'")
        return cls(m.group(1), m.group(2), float(m.group(3)))

    def holds(self, x: float) -> bool:
        return _OPS[self.op](x, self.value)

    def __str__(self) -> str:
        return f"{self.score} {self.op} {self.value:g}"


@register_stage("threshold_filter")
class ThresholdFilter(Stage):
    """Keep a sample only if every rule holds.

    Args (Params):
        rules: e.g. ["oracle_psnr >= 30", "changed_ratio > 0.002"]; scores must come from earlier scorers.
        on_null: "drop" (default) or "keep" a sample whose score is None.
    """

    role = "filter"

    @dataclasses.dataclass
    class Params:
        rules: list[str] = dataclasses.field(default_factory=list)
        on_null: str = "drop"

    def validate(self):
        if self.params.on_null not in ("drop", "keep"):
            raise ValueError(f"{self.name}: on_null must be 'drop' or 'keep', got {self.params.on_null!r}")
        try:
            self.rules = [Rule.parse(r) for r in self.params.rules]
        except ValueError as e:
            raise ValueError(f"{self.name}: {e}") from None

    def needed_scores(self) -> set[str]:
        return {r.score for r in self.rules}

    def process(self, batch):
        if not hasattr(self, "rules"):
            self.validate()
        for s in batch:
            if not s.kept:
                continue
            for r in self.rules:
                if r.score not in s.scores:
                    s.drop(self.name, str(r), f"{r.score} missing")
                    break
                v = s.scores[r.score]
                if v is None:
                    if self.params.on_null == "drop":
                        s.drop(self.name, str(r), f"{r.score} is null: {s.notes.get(r.score, '')}")
                        break
                    continue
                if not r.holds(v):
                    s.drop(self.name, str(r), f"{r.score} = {v:.4g}")
                    break
        return batch
