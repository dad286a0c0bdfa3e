"""Aspect-ratio buckets and the batch sampler that draws every batch from one bucket.

FLUX trains on any size that is a multiple of 16 pixels (8x VAE downsampling, then 2x2 patches), but
a batch must share one size. Buckets are a fixed list of (width, height) of about the same area;
each sample goes to the bucket whose aspect ratio is closest to its source image's, and its source
and target are resized and center-cropped to that bucket by the same rule (so a pixel of the source
stays aligned with the same pixel of the target).

The contrastive loss pairs samples of the same task inside a batch; an anchor without a same-task
partner only adds a constant. ``BucketBatchSampler(balanced_tasks=True)`` therefore builds batches
from pairs of same-task samples, so that every task in a batch appears at least twice when the data
allows it.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Hashable, Sequence

from PIL import Image

Bucket = tuple[int, int]  # (width, height) in pixels


def make_buckets(area: int = 512 * 512, multiple: int = 16, max_ratio: float = 2.0) -> list[Bucket]:
    """Bucket sizes of at most ``area`` pixels, both sides multiples of ``multiple``.

    For each short side (a multiple of ``multiple``) the long side is the largest multiple that
    keeps ``w * h <= area``; sizes whose long side / short side exceeds ``max_ratio`` are left out.
    The list holds each size and its transpose (portrait and landscape alike).

    Args:
        area: target pixel count, e.g. 512*512 or 1024*1024.
        multiple: both sides are multiples of this (16 for FLUX: VAE x8, then 2x2 patches).
        max_ratio: the most elongated aspect ratio kept (>= 1).

    Returns:
        (width, height) pairs sorted from tallest to widest; always contains the square-most size.
    """
    if multiple < 1 or area < multiple * multiple:
        raise ValueError(f"area {area} must hold at least one {multiple}x{multiple} tile")
    if max_ratio < 1:
        raise ValueError(f"max_ratio must be >= 1, got {max_ratio}")
    buckets = set()
    w = multiple
    while w * w <= area:  # portrait and square sizes; landscape ones are their transposes
        h = (area // w) // multiple * multiple
        if h >= w and h / w <= max_ratio:
            buckets |= {(w, h), (h, w)}
        w += multiple
    if not buckets:
        raise ValueError(f"no bucket of area <= {area} with sides multiple of {multiple} and ratio "
                         f"<= {max_ratio}; raise max_ratio or area")
    return sorted(buckets, key=lambda b: b[0] / b[1])


def check_buckets(buckets: Sequence[Sequence[int]]) -> list[Bucket]:
    """Validate a user-given bucket list (e.g. from YAML) and return it as tuples."""
    out = []
    for b in buckets:
        if len(b) != 2 or not all(isinstance(v, int) and v > 0 for v in b):
            raise ValueError(f"bucket {b!r} must be [width, height] with positive integer sides")
        out.append((int(b[0]), int(b[1])))
    if not out:
        raise ValueError("bucket list is empty")
    return out


def assign_bucket(size: tuple[int, int], buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest to ``size``'s (compared in log space, so 2:1 and
    1:2 are equally far from 1:1); ties go to the earlier bucket in the list."""
    w, h = size
    if w <= 0 or h <= 0:
        raise ValueError(f"image size {size} must be positive")
    r = math.log(w / h)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - r))


def fit_to_bucket(img: Image.Image, bucket: Bucket) -> Image.Image:
    """Resize so the image covers ``bucket`` (keeping its aspect ratio), then center-crop to it."""
    bw, bh = bucket
    w, h = img.size
    if (w, h) == (bw, bh):
        return img
    scale = max(bw / w, bh / h)
    # ceil keeps both sides >= the bucket's after rounding (no 1-pixel gaps at the crop edge)
    rw, rh = max(bw, math.ceil(w * scale - 1e-6)), max(bh, math.ceil(h * scale - 1e-6))
    img = img.resize((rw, rh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (rw - bw) // 2, (rh - bh) // 2
    return img.crop((left, top, left + bw, top + bh))


def fit_pair(source: Image.Image, target: Image.Image, bucket: Bucket) -> tuple[Image.Image, Image.Image]:
    """Fit source and target to the same bucket by the same rule.

    When the two differ in resolution but share an aspect ratio (readers drop pairs whose ratios
    differ), the crop covers the same relative region of both.
    """
    return fit_to_bucket(source, bucket), fit_to_bucket(target, bucket)


class BucketBatchSampler:
    """Batches of indices, each batch from one bucket, reshuffled per epoch, deterministic per seed.

    A ``torch.utils.data.DataLoader(dataset, batch_sampler=...)`` takes it as is (it has
    ``batch_size`` and ``drop_last`` so accelerate can shard it across processes).

    Args:
        sizes: (width, height) of each sample's source image, in dataset order.
        buckets: bucket list (``make_buckets``); sample i goes to ``assign_bucket(sizes[i])``.
        batch_size: samples per batch.
        tasks: task name (or any hashable; None counts as one group) per sample; needed for
            ``balanced_tasks``.
        balanced_tasks: build batches from same-task pairs (a triple when the batch size is odd), so
            each task in a batch appears at least twice; samples left without a partner in their
            bucket are batched together at the end of the epoch (or dropped with ``drop_last``).
        seed: base seed; epoch e uses ``seed + e`` (call ``set_epoch`` before each epoch).
        drop_last: drop batches smaller than ``batch_size``, and, with ``balanced_tasks``, the
            batches of partner-less leftovers.
    """

    def __init__(self, sizes: Sequence[tuple[int, int]], buckets: Sequence[Bucket], batch_size: int, *,
                 tasks: Sequence[Hashable] | None = None, balanced_tasks: bool = False, seed: int = 0,
                 drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if balanced_tasks and batch_size < 2:
            raise ValueError("balanced_tasks needs batch_size >= 2 (a task needs a partner in the batch)")
        if balanced_tasks and tasks is None:
            raise ValueError("balanced_tasks needs the task of every sample (tasks=...)")
        if tasks is not None and len(tasks) != len(sizes):
            raise ValueError(f"{len(tasks)} tasks for {len(sizes)} samples")
        self.batch_size, self.drop_last = batch_size, drop_last
        self.balanced_tasks, self.seed, self.epoch = balanced_tasks, seed, 0
        self.buckets = list(buckets)
        self.bucket_of = [assign_bucket(s, self.buckets) for s in sizes]  # per sample
        self.tasks = list(tasks) if tasks is not None else [None] * len(sizes)
        self._plan: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        yield from self._batches()

    def __len__(self) -> int:
        return len(self._batches())

    def _batches(self) -> list[list[int]]:
        if self._plan is not None and self._plan[0] == self.epoch:
            return self._plan[1]
        rng = random.Random(self.seed + self.epoch)
        by_bucket: dict[Bucket, list[int]] = defaultdict(list)
        for i, b in enumerate(self.bucket_of):
            by_bucket[b].append(i)
        batches, leftovers = [], []
        for bucket in self.buckets:  # fixed order: the result depends only on the seed
            idx = by_bucket.get(bucket, [])
            rng.shuffle(idx)
            if self.balanced_tasks:
                full, rest = self._balanced(idx, rng)
                batches += full
                leftovers += [rest[i:i + self.batch_size] for i in range(0, len(rest), self.batch_size)]
            else:
                batches += [idx[i:i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
            leftovers = []
        rng.shuffle(batches)
        plan = batches + [b for b in leftovers if b]
        self._plan = (self.epoch, plan)
        return plan

    def _balanced(self, idx: list[int], rng: random.Random) -> tuple[list[list[int]], list[int]]:
        """Full batches of same-task groups (pairs, one triple if the size is odd) from one bucket's
        shuffled indices; returns (batches, leftover indices that could not be placed so)."""
        pools: dict[Hashable, list[int]] = defaultdict(list)
        for i in idx:
            pools[self.tasks[i]].append(i)
        order = list(pools)  # insertion order follows the shuffled indices: seeded
        batches = []
        while True:
            batch, room = [], self.batch_size
            if room % 2:  # an odd batch needs one task three times
                triples = [t for t in order if len(pools[t]) >= 3]
                if not triples:
                    break
                t = rng.choice(triples)
                batch += [pools[t].pop() for _ in range(3)]
                room -= 3
            while room >= 2:
                pairs = [t for t in order if len(pools[t]) >= 2]
                if not pairs:
                    break
                # weight by what is left so big tasks do not pile up at the end of the epoch
                t = rng.choices(pairs, weights=[len(pools[p]) for p in pairs])[0]
                batch += [pools[t].pop(), pools[t].pop()]
                room -= 2
            if room:
                for i in batch:  # not enough pairs for a full batch: return them to their pools
                    pools[self.tasks[i]].append(i)
                break
            batches.append(batch)
        leftovers = [i for t in order for i in pools[t]]
        return batches, leftovers
