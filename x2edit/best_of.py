"""Best-of-N editing: N seeds of one edit, the one a judge scores highest kept (ICEdit's seed search, and
what ``x2edit edit --best-of N`` runs).

A judge is any callable ``judge(source, output, instruction) -> float | None`` on PIL images (higher is
better; None: it could not score that output). ``x2edit.data_pipeline.stages.scorers.VlmJudge.score_edit``
is the project's VLM judge in that form (VIEScore's overall score, 0..10). The cost is N edits plus N judge
calls; ``BestOfN`` reports both times.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass
class BestOfN:
    """The kept output and how it was chosen: ``scores[i]`` is seed ``seeds[i]``'s score (None: unscored)."""

    image: object
    seeds: list[int]
    scores: list[float | None]
    chosen: int
    edit_seconds: float
    judge_seconds: float


def best_of_n(pipe, image, prompt: str, n: int, judge: Callable, seed: int = 0, **edit_kwargs) -> BestOfN:
    """Edit ``image`` with seeds seed..seed+n-1 through ``pipe.edit`` and keep the output ``judge`` scores best.

    Refused for a pipeline that edits deterministically (one step from the source: every seed gives the same
    image). If the judge scores none of the outputs, seed ``seed``'s is kept, with a warning.
    """
    import torch

    from x2edit.images import as_rgb_image

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"best-of-N needs N >= 1, got {n!r}")
    if n > 1 and pipe.source_start() is not None:
        raise ValueError(f"this model edits deterministically in one step from the source (source_start="
                         f"{pipe.source_start()}): every seed gives the same image, so best-of-{n} cannot help; it "
                         "is for models sampled from noise")
    source = as_rgb_image(image)
    seeds = list(range(seed, seed + n))
    outputs, t0 = [], time.perf_counter()
    for s in seeds:
        outputs.append(pipe.edit(source, prompt, generator=torch.Generator().manual_seed(s), **edit_kwargs).images[0])
    edit_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = [judge(source, out, prompt) for out in outputs] if n > 1 else [None]
    judge_seconds = time.perf_counter() - t0
    scored = [i for i, sc in enumerate(scores) if sc is not None]
    if n > 1 and not scored:
        logger.warning("the judge scored none of the %d outputs; keeping seed %d's", n, seed)
    chosen = max(scored, key=lambda i: scores[i]) if scored else 0
    return BestOfN(outputs[chosen], seeds, scores, chosen, edit_seconds, judge_seconds)
