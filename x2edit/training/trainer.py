"""The trainer behind `x2edit train`: flow matching on a FLUX-architecture transformer, on accelerate.

Five modes share one loop:
- "t2i": pretrain the whole transformer as a text-to-image model (how x2edit-tiny's base is made);
- "edit_base": the whole transformer trained to edit (a Kontext-like base);
- "edit": X2Edit: a (MoE-)LoRA on the frozen base; the source image enters as Kontext-style
  reference tokens; loss = flow matching + balance_weight * router balance + contrastive_weight *
  contrastive loss on the double blocks' image-stream outputs, grouped by task;
- "diptych_base" / "diptych": ICEdit's in-context form of the last two: a FLUX Fill model repaints the
  right half of a [source | target] canvas, prompted with the diptych template (``_diptych_batch``);
- "incontext": IC-LoRA: a task LoRA on the text-to-image base, trained as text-to-image on [before | after]
  panel sets under a joint caption (``_incontext_batch``).

Exact resume: the data order and the noise of step s are pure functions of (seed, s, rank), and
checkpoints hold the trainable weights, optimizer, LR schedule and EMA, so "stop at k, resume" gives
the same losses as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from x2edit.adapters import (
    adapter_names,
    adapter_summary,
    enable_gradient_checkpointing,
    export_diffusers_lora,
    format_summary,
    inject_adapters,
    remove_adapter,
    routing_context,
    save_adapter,
)
from x2edit.adapters.residual import adapters_disabled, residual_sample
from x2edit.files import load_state
from x2edit.registry import EMBEDDED_META
from x2edit.schedulers import (
    SIGMA_FLOOR,
    predicted_sample,
    prediction_type,
    sigma_data_of,
    velocity_from_sample,
)
from x2edit.tasks import TASK_NAMES, get_task
from x2edit.training.config import ADAPTER_MODES, BASE_MODES, DIPTYCH_MODES, TrainConfig, save_config
from x2edit.training.losses import (
    BlockOutputs,
    changed_fraction,
    contrastive_loss,
    flow_matching_loss,
    flow_matching_pair,
    mask_loss,
    sample_sigmas,
    source_start_pair,
    x0_error,
)

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, bad resume); the message names the step and checkpoint."""


# -- data --------------------------------------------------------------------------------------


class ShapeWorldSource:
    """Shape World pairs generated on the fly: item i is ``ShapeWorld.sample(seed=i)``, train split.

    In t2i mode item i is a (scene image, caption): the source scene for even i, the target for odd i.

    pool: render pairs 0..pool-1 once, with ``workers`` processes, and let item i read pair i % pool
    (epochs over a fixed set). A GPU trains x2edit-tiny's transformer on ~20k samples/s while one
    CPU process renders ~170 pairs/s (16 processes ~2.7k/s; ../shared/measurements): on the fly, the
    renderer would set the pace. The pool is a pure function of its size, so resume stays exact.
    """

    def __init__(self, resolution: int, mode: str, tasks: list[str] | None = None, pool: int = 0,
                 workers: int = 0, task_weights: dict | None = None):
        from x2edit.data_pipeline.shapeworld import ShapeWorld

        self.world, self.mode = ShapeWorld(resolution=resolution), mode
        self.tasks = TaskDraw(tasks, task_weights)
        self.pool = _render_pool(resolution, pool, self.tasks, workers) if pool else None

    def __len__(self) -> int:
        return 2**40  # effectively endless; indices never repeat in a run (the pool's repeat)

    @functools.lru_cache(maxsize=256)  # noqa: B019 (one source per run): t2i reads both scenes of a pair
    def _pair(self, seed: int, task: str | None):
        return _Rendered.of(self.world.sample(seed=seed, task=task))

    def __getitem__(self, i: int) -> dict:
        seed = i // 2 if self.mode == "t2i" else i
        if self.pool is not None:
            pair = self.pool[seed % len(self.pool)]
        else:
            pair = self._pair(seed, self.tasks(seed))
        if self.mode == "t2i":
            return {"source": None, "target": pair.source if i % 2 == 0 else pair.target,
                    "text": pair.captions[i % 2], "task": None}
        return {"source": pair.source, "target": pair.target, "text": pair.instruction,
                "task": get_task(pair.task).id, "captions": pair.captions}


class TaskDraw:
    """The task of Shape World item ``seed``: a pure function of the seed (resume stays exact).

    Without weights, as before weights existed: ``tasks[seed % len(tasks)]``, or None (the world picks
    uniformly from the seed). With weights, a seeded draw from the tasks in proportion to their weight.
    """

    def __init__(self, tasks: list[str] | None = None, weights: dict | None = None):
        self.names = [get_task(t).name for t in tasks] if tasks else None
        self.p = None
        if weights:
            self.names = self.names or list(TASK_NAMES)
            w = np.array([weights.get(n, 1.0) for n in self.names], dtype=np.float64)
            self.p = w / w.sum()

    def __call__(self, seed: int) -> str | None:
        if self.names is None:
            return None
        if self.p is None:
            return self.names[seed % len(self.names)]
        u = np.random.default_rng([seed, 0x7461736B]).random()  # 0x7461736B: "task", apart from other streams
        return self.names[min(int(np.searchsorted(np.cumsum(self.p), u, side="right")), len(self.names) - 1)]


@dataclasses.dataclass(frozen=True)
class _Rendered:
    """What training reads of a Shape World pair: (H, W, 3) uint8 images, instruction, task, captions."""

    source: np.ndarray
    target: np.ndarray
    instruction: str
    task: str
    captions: tuple[str, str]

    @classmethod
    def of(cls, pair) -> _Rendered:
        return cls(pair.source, pair.target, pair.instruction, pair.task, pair.captions)


def _render_seeds(resolution: int, seeds: range, tasks: TaskDraw) -> list[_Rendered]:
    from x2edit.data_pipeline.shapeworld import ShapeWorld

    world = ShapeWorld(resolution=resolution)
    return [_Rendered.of(world.sample(seed=s, task=tasks(s))) for s in seeds]


def _render_pool(resolution: int, size: int, tasks: TaskDraw, workers: int = 0) -> list[_Rendered]:
    """Pairs 0..size-1 exactly as ``ShapeWorldSource`` renders them, in ``workers`` processes (0: all CPUs)."""
    import os
    from concurrent.futures import ProcessPoolExecutor

    workers = workers or os.cpu_count() or 1
    chunk = max(1, min(2000, -(-size // (4 * workers))))
    spans = [range(a, min(a + chunk, size)) for a in range(0, size, chunk)]
    t0 = time.perf_counter()
    if workers == 1 or len(spans) == 1:
        pool = [p for span in spans for p in _render_seeds(resolution, span, tasks)]
    else:
        with ProcessPoolExecutor(workers) as ex:
            pool = [p for part in ex.map(_render_seeds, [resolution] * len(spans), spans, [tasks] * len(spans))
                    for p in part]
    logger.info("rendered a pool of %d Shape World pairs in %.1f s (%d processes)", size,
                time.perf_counter() - t0, workers)
    return pool


class ReaderSource:
    """A map-style view of one or more ``x2edit.training.data`` readers (build-data shards, upstream X2Edit
    shards, ...) with the plan of which items form each batch.

    Items are the usable records of every source (an index of metadata and image references: no
    pixels held), concatenated in config order; item i decodes its pair and fits it to its
    aspect-ratio bucket (``data.buckets``) or to one ``resolution`` square (None if its pixels turn out
    corrupt). ``batch(n)`` gives the items of global batch n (n = step * processes + rank): the
    mixture picks the source (``SourceMixture``), and the source's own k-th batch is a pure function
    of k: its bucket plan (``EpochBatches``) or its epoch permutations (``batch_indices``). So the
    data of a step depend only on (seed, step, rank), and a resumed run draws what an uninterrupted
    one would.

    Args:
        specs: reader configs, each with an optional ``weight`` (default 1): a batch comes from
            source s with probability weight_s / sum of weights, whatever the sources' sizes.
        config: the run's config (``data`` section, batch size, seed, mode).
        multiple: the model's pixel grid; bucket sides divide by it.
    """

    def __init__(self, specs: list[dict], config: TrainConfig, multiple: int = 16):
        from x2edit.training.buckets import BucketBatchSampler, make_buckets
        from x2edit.training.data import OTHER_TASK, OTHER_TASK_ID, EditDataset

        d = config.data
        bucketed = d.buckets
        buckets = make_buckets(d.resolution**2, multiple, d.max_aspect) if bucketed else [(d.resolution, d.resolution)]
        keep = {get_task(t).name for t in d.tasks} if d.tasks else None
        self.mode, self.batch_size, self.seed = config.mode, config.batch_size, config.seed
        self.datasets, self.offsets, self.names, weights = [], [], [], []
        for i, spec in enumerate(specs):
            spec = dict(spec)
            weights.append(float(spec.pop("weight", 1.0)))
            name = f"data source {i} ({spec.get('format')} at {spec.get('path')})"
            spec["filters"] = [*spec.get("filters", []), *d.filters]
            ds = EditDataset(spec, buckets=buckets)
            logger.info("%s: %s", name, ds.stats.summary())
            if keep is not None:
                ds.records = [r for r in ds.records if r.task in keep]
            if not ds.records:
                raise ValueError(f"no training samples left from {name} after its filters, data.filters "
                                 f"{d.filters} and data.tasks {d.tasks}")
            for r in ds.records:  # training reads no score; an index of millions of samples holds less
                r.scores = {}
            if self.mode in ADAPTER_MODES:
                unlabeled = [r for r in ds.records if r.task is None]
                if unlabeled:
                    raise ValueError(f"{name}: {len(unlabeled)} samples have no task label (first: {unlabeled[0].origin}:"
                                     f"{unlabeled[0].key}); edit training routes by task")
                if any(r.task == OTHER_TASK for r in ds.records) and config.adapter.num_task_slots <= OTHER_TASK_ID:
                    raise ValueError(f"{name} keeps 'other' samples (on_other_task: train), routed to task slot "
                                     f"{OTHER_TASK_ID}: adapter.num_task_slots must be > {OTHER_TASK_ID}")
            self.offsets.append(sum(len(x) for x in self.datasets))
            self.datasets.append(ds)
            self.names.append(name)
        self.mixture = SourceMixture(weights, config.seed)
        self.plans = [None] * len(self.datasets)
        if bucketed:
            contrastive = config.mode in ADAPTER_MODES and config.loss.contrastive_weight > 0
            self.plans = [EpochBatches(BucketBatchSampler(
                ds.sizes, buckets, config.batch_size, tasks=ds.tasks,
                balanced_tasks=contrastive and config.batch_size >= 2, seed=config.seed, drop_last=True), name)
                for ds, name in zip(self.datasets, self.names)]

    def __len__(self) -> int:
        return self.offsets[-1] + len(self.datasets[-1])

    def batch(self, n: int) -> list[int]:
        """Item indices of global batch ``n``."""
        s, k = self.mixture.locate(n)
        plan = self.plans[s]
        local = plan[k] if plan is not None else batch_indices(k, self.batch_size, 0, 1, len(self.datasets[s]),
                                                               self.seed)
        return [self.offsets[s] + i for i in local]

    def __getitem__(self, i: int) -> dict | None:
        from x2edit.training.data import task_slot

        s = int(np.searchsorted(self.offsets, i, side="right")) - 1
        sample = self.datasets[s][i - self.offsets[s]]
        if sample is None:
            return None
        return {"source": np.asarray(sample.source) if self.mode != "t2i" else None,
                "target": np.asarray(sample.target), "text": sample.instruction,
                "task": task_slot(sample.task) if sample.task is not None else None, "captions": sample.captions,
                "panels": [np.asarray(p) for p in sample.panels], "set_caption": sample.set_caption,
                "origin": f"{sample.origin}:{sample.key}"}


class SourceMixture:
    """Which source each global batch comes from, as a pure function of (seed, n).

    Batch n comes from source s with probability weights[s] / sum(weights), a seeded draw per batch
    (SimpleTuner's per-step choice of dataset); ``locate(n)`` = (s, k): batch n is the k-th batch
    drawn from s. Draws are made in seeded chunks and the counts before each chunk are kept, so
    locating batch n costs O(n / CHUNK) the first time, in any process, at any resume step.
    """

    CHUNK = 4096

    def __init__(self, weights: list[float], seed: int):
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or not len(w) or not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError(f"source weights must be positive numbers, got {weights}")
        self.p, self.seed = w / w.sum(), seed
        self._before = [np.zeros(len(w), dtype=np.int64)]  # per chunk: batches drawn from each source before it
        self._cache: dict[int, np.ndarray] = {}

    def _draws(self, chunk: int) -> np.ndarray:
        if chunk not in self._cache:
            if len(self._cache) > 8:
                self._cache.clear()
            rng = np.random.default_rng([self.seed, 0x6D6978, chunk])  # 0x6D6978: "mix", apart from other streams
            self._cache[chunk] = rng.choice(len(self.p), size=self.CHUNK, p=self.p)
        return self._cache[chunk]

    def locate(self, n: int) -> tuple[int, int]:
        if len(self.p) == 1:
            return 0, n
        chunk, pos = divmod(n, self.CHUNK)
        while len(self._before) <= chunk:
            c = len(self._before) - 1
            self._before.append(self._before[c] + np.bincount(self._draws(c), minlength=len(self.p)))
        draws = self._draws(chunk)
        s = int(draws[pos])
        return s, int(self._before[chunk][s] + np.count_nonzero(draws[:pos] == s))


class EpochBatches:
    """The n-th batch of an endless run of a ``BucketBatchSampler``'s epochs: a pure function of n,
    so resuming at a step draws the same batches as the uninterrupted run."""

    def __init__(self, sampler, name: str = "the data"):
        self.sampler, self.name, self._lengths = sampler, name, []

    def _plan(self, epoch: int) -> list[list[int]]:
        self.sampler.set_epoch(epoch)
        plan = list(self.sampler)  # cached per epoch by the sampler
        if not plan:
            raise ValueError(f"no full batch of {self.name} fits in any aspect-ratio bucket: lower batch_size or "
                             "add data")
        return plan

    def __getitem__(self, n: int) -> list[int]:
        epoch = 0
        while True:
            if epoch == len(self._lengths):
                self._lengths.append(len(self._plan(epoch)))
            if n < self._lengths[epoch]:
                return list(self._plan(epoch)[n])
            n -= self._lengths[epoch]
            epoch += 1


def make_source(config: TrainConfig, multiple: int = 16):
    """The training data of ``config``; ``multiple``: the model's pixel grid (bucket sides divide by it)."""
    d = config.data
    if d.readers:
        return ReaderSource(d.readers, config, multiple)
    if d.source == "shapeworld":
        return ShapeWorldSource(d.resolution, config.mode, d.tasks, d.pool, d.pool_workers, d.task_weights)
    raise ValueError(f"data.source must be 'shapeworld' or a reader mapping, got {d.source!r}")


def batch_indices(step: int, batch: int, rank: int, world: int, size: int, seed: int) -> list[int]:
    """Indices of the samples of ``step`` on process ``rank``: a pure function, so resume is exact."""
    start = (step * world + rank) * batch
    if size >= 2**40:
        return list(range(start, start + batch))
    out = []
    for p in range(start, start + batch):
        epoch, pos = divmod(p, size)
        perm = np.random.default_rng([seed, epoch]).permutation(size)
        out.append(int(perm[pos]))
    return out


# -- model -------------------------------------------------------------------------------------


def build_new_pipeline(config: TrainConfig):
    """A new pixel-space FLUX-architecture pipeline with the bundled MiniLM text encoder (t2i from scratch)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import AutoModel, AutoTokenizer

    from x2edit.pipeline import X2EditPipeline
    from x2edit.pixel_vae import PixelShuffleVAE
    from x2edit.schedulers import FlowMatchSampleScheduler
    from x2edit.testing import minilm_path

    torch.manual_seed(config.seed)
    text_path = config.model.text_encoder or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(text_path)
    tokenizer.model_max_length = config.model.max_text_tokens
    text_encoder = AutoModel.from_pretrained(text_path).float().eval()  # a carried fp16 copy loads as float32 too
    vae = PixelShuffleVAE(factor=config.model.vae_factor)
    # FLUX's own scheduler for velocity models, so the saved pipeline loads in stock diffusers
    flow = config.model.prediction_type == "flow"
    scheduler = FlowMatchEulerDiscreteScheduler() if flow else FlowMatchSampleScheduler(
        prediction_type=config.model.prediction_type)
    tcfg = dict(config.model.transformer)
    expected_in = 4 * vae.config.latent_channels
    if tcfg.setdefault("in_channels", expected_in) != expected_in:
        raise ValueError(f"model.transformer.in_channels must be 4 x latent channels = {expected_in}")
    tcfg.setdefault("joint_attention_dim", text_encoder.config.hidden_size)
    tcfg.setdefault("pooled_projection_dim", text_encoder.config.hidden_size)
    try:
        transformer = FluxTransformer2DModel(**tcfg)
    except TypeError as e:
        raise ValueError(f"model.transformer: {e}") from None
    return X2EditPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                          tokenizer=tokenizer, transformer=transformer)


def base_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """The frozen base's weight dtype: ``model.dtype``, with "auto" = bfloat16 on CUDA (a 12B FLUX
    transformer plus T5-XXL is ~67 GB in float32), float32 elsewhere; t2i trains in float32."""
    if config.mode not in ADAPTER_MODES or config.model.dtype == "float32":  # the others train the whole transformer
        return torch.float32
    if config.model.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, config.model.dtype)


def load_base_pipeline(config: TrainConfig, dtype: torch.dtype = torch.float32):
    if config.model.base is None:
        pipe = build_new_pipeline(config)
    else:
        from x2edit.registry import load_pipeline

        pipe = load_pipeline(config.model.base, torch_dtype=dtype)
    if pipe.text_encoder_2 is None and config.mode not in ADAPTER_MODES:
        # A sentence encoder's length is the model's own budget, saved with the base it trains (up to the encoder's
        # positions): a base may be given a longer one than it started with.
        limit = getattr(pipe.text_encoder.config, "max_position_embeddings", config.model.max_text_tokens)
        pipe.tokenizer.model_max_length = min(config.model.max_text_tokens, limit)
    else:  # an adapter is encoded as its base encodes at inference (its tokenizer's budget); CLIP: never beyond 77
        pipe.tokenizer.model_max_length = min(pipe.tokenizer.model_max_length, config.model.max_text_tokens)
    if config.mode in DIPTYCH_MODES:
        pipe = as_fill_pipeline(pipe, config)
    return pipe


def as_fill_pipeline(pipe, config: TrainConfig):
    """The diptych modes' pipeline: a Fill base as it is; in diptych_base mode, a text-to-image / Kontext base
    becomes one (its adapters removed, its input layer widened with zero-initialised condition channels)."""
    from x2edit.pipeline_diptych import X2EditDiptychPipeline, fill_transformer_from

    if isinstance(pipe, X2EditDiptychPipeline):
        fill = pipe
    elif config.mode != "diptych_base":
        raise ValueError(f"model.base {config.model.base} is not a Fill model: a diptych adapter needs one (train it "
                         "with mode: diptych_base, or use flux.1-fill-dev)")
    else:
        for name in adapter_names(pipe.transformer):
            remove_adapter(pipe.transformer, name)
        transformer = fill_transformer_from(pipe.transformer, pipe.vae.config.latent_channels, pipe.vae_scale_factor)
        fill = X2EditDiptychPipeline(scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=pipe.text_encoder,
                                     tokenizer=pipe.tokenizer, transformer=transformer,
                                     text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2)
    if config.model.diptych_template is not None:
        fill.diptych_template = config.model.diptych_template
    return fill


# -- trainer -----------------------------------------------------------------------------------


class Trainer:
    """Runs one training configuration. ``Trainer(config).train(resume=None|"latest"|path)``."""

    def __init__(self, config: TrainConfig):
        from accelerate import Accelerator

        self.config = config
        self.out = Path(config.output_dir)
        # cpu=True without CUDA: accelerate then runs several CPU processes (torchrun / MPI) over gloo.
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        if config.tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if config.time_budget_s and self.accelerator.num_processes > 1:
            raise ValueError("time_budget_s is for one-process runs: several processes would each read their own clock")
        self._deadline: tuple[float, float] | None = None  # (start, budget) of a time-budgeted loop
        # Seconds the training loop ran before this process (a resumed run's checkpoint says), and when it
        # started here: a time budget counts both, so a run resumed across sessions keeps one budget.
        self._loop_seconds, self._loop_start = 0.0, None
        device = self.accelerator.device
        self.pipe = load_base_pipeline(config, base_dtype(config, device))
        self.pipe.set_progress_bar_config(disable=True)
        self.transformer = self.pipe.transformer
        self.prediction = prediction_type(self.pipe.scheduler)  # a property of the base model
        self.sigma_data = sigma_data_of(self.pipe.scheduler)
        for module in (self.pipe.text_encoder, self.pipe.vae):
            module.requires_grad_(False)
        self.residual = config.mode in ADAPTER_MODES and config.adapter.reading == "residual"
        self.diptych = config.mode in DIPTYCH_MODES
        if self.residual and self.diptych:
            raise ValueError("adapter.reading: residual reads the source from reference tokens, which a diptych has "
                             "none of: use adapter.reading: direct")
        if self.residual and self.prediction != "flow":
            raise ValueError(f"adapter.reading: residual needs a flow (velocity) base; {config.model.base} reads "
                             f"its output as {self.prediction!r}")
        if config.mode != "t2i":
            own = adapter_names(self.transformer)
            if own:  # e.g. x2edit-tiny ships its editing adapter: train the new one (or the base) on the base alone
                logger.info("removing the base's own adapter(s) %s: training on the base alone", own)
                for name in own:
                    remove_adapter(self.transformer, name)
        # How the source reaches the model: as the sample itself at a noise level (one step), as reference
        # tokens, or both. edit_base sets it (and saves it with the base); an adapter follows its base.
        self.source_start, self.reference = None, True
        if config.mode in BASE_MODES:
            self.source_start, self.reference = config.model.source_start, config.model.reference_tokens
            self.pipe.default_source_start = self.source_start
            if not self.diptych:
                self.pipe.reference_tokens = self.reference
        elif config.mode == "incontext":  # text-to-image on the canvas: from noise, nothing in context
            self.reference = False
            if self.pipe.default_source_start is not None:
                raise ValueError(f"model.base {config.model.base} edits in one step from the source: IC-LoRA trains on "
                                 "a text-to-image base, sampled from noise")
        elif config.mode in ADAPTER_MODES:
            self.source_start = config.adapter.source_start
            if self.source_start is None:
                self.source_start = self.pipe.default_source_start
            self.reference = getattr(self.pipe, "reference_tokens", True)
            if self.residual and not self.reference:
                raise ValueError(f"adapter.reading: residual reads the source from reference tokens, which the base "
                                 f"{config.model.base} is trained without: use adapter.reading: direct")
        if self.diptych:  # the canvas's left half carries the source; Fill has no reference tokens
            self.reference = False
        if config.mode in ADAPTER_MODES:
            torch.manual_seed(config.seed)  # adapter and router initialisation
            # The adapter records the text length it is trained with, so the pipeline encodes the same.
            adapter = dataclasses.replace(config.adapter, max_sequence_length=config.model.max_text_tokens)
            inject_adapters(self.transformer, adapter, ADAPTER_NAME, dtype=torch.float32)
        else:
            self.transformer.requires_grad_(True)
        if config.model.gradient_checkpointing:
            enable_gradient_checkpointing(self.transformer)  # routed adapters keep their task ids in backward
        self.text_device = torch.device(config.model.text_encoder_device or device)
        for name, module in self.pipe.components.items():  # one by one: T5 never visits the GPU if kept on the CPU
            if isinstance(module, torch.nn.Module):
                module.to(self.text_device if name.startswith("text_encoder") else device)
        self.params = [p for p in self.transformer.parameters() if p.requires_grad]
        # The edit-region probe (loss.mask_weight): trained with the model, not part of it.
        self.mask_head = None
        if config.loss.mask_weight:
            torch.manual_seed(config.seed + 1)
            self.mask_head = torch.nn.Linear(self.transformer.inner_dim, 1).to(device)
            self.params += list(self.mask_head.parameters())
        self.source = make_source(config, multiple=self.pipe.vae_scale_factor * 2)
        self.optimizer = self._make_optimizer()
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.ema = None
        if config.optim.ema_decay:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.params, decay=config.optim.ema_decay)
        self.model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            self.transformer, self.optimizer, self.lr_scheduler)
        if self.mask_head is not None:  # its gradients are averaged over processes as the model's are
            self.mask_head = self.accelerator.prepare(self.mask_head)
        self.step = 0
        self.last_checkpoint: Path | None = None

    def _steps_left(self, step: int) -> float:
        """Steps left after ``step``; under a time budget, at most the budget's unspent fraction of the steps."""
        left = self.config.steps - step
        if self._deadline is not None:
            start, budget = self._deadline
            left = min(left, (1 - (time.perf_counter() - start) / budget) * self.config.steps)
        return left

    def _lr_factor(self, step: int) -> float:
        """Warmup-stable-decay multiplier of optim.lr at ``step`` (see OptimConfig)."""
        o = self.config.optim
        if step < o.warmup_steps:
            return step / o.warmup_steps
        if o.decay_steps:  # linear to 0 over the last decay_steps (or that fraction of the time budget)
            return min(1.0, max(0.0, self._steps_left(step) / o.decay_steps))
        return 1.0

    def _make_optimizer(self):
        o = self.config.optim
        if o.use_8bit_adam:
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise ImportError("optim.use_8bit_adam needs bitsandbytes: pip install 'x2edit[train]'") from None
            cls = bnb.optim.AdamW8bit
        else:
            cls = torch.optim.AdamW
        # fused AdamW on CUDA: one kernel, no foreach copy of the moments (3.7 GB at FLUX size)
        fused = {"fused": True} if cls is torch.optim.AdamW and self.accelerator.device.type == "cuda" else {}
        return cls(self.params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, **fused)

    # -- batches -----------------------------------------------------------------------------
    def _images_to_tokens(self, images: list[np.ndarray], reference: bool):
        """uint8 (H, W, 3) images -> packed latents (B, T, C) and their position ids (T, 3)."""
        pipe, device = self.pipe, self.accelerator.device
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1)  # (B, 3, H, W)
        tokens = pipe._pack_pixels(x, device)  # (B, H/p * W/p, 4C), encoded as the pipeline encodes (p: pixels per token)
        patch = pipe.vae_scale_factor * 2
        ids = pipe._prepare_latent_image_ids(len(images), x.shape[-2] // patch, x.shape[-1] // patch, device,
                                             tokens.dtype)
        if reference:
            ids[..., 0] = 1  # Kontext: reference tokens are marked by position-id coordinate 1
        return tokens, ids

    def batch(self, step: int) -> dict:
        acc = self.accelerator
        if isinstance(self.source, ReaderSource):
            idx = self.source.batch(step * acc.num_processes + acc.process_index)
        else:
            idx = batch_indices(step, self.config.batch_size, acc.process_index, acc.num_processes,
                                len(self.source), self.config.seed)
        items = [it for it in (self.source[i] for i in idx) if it is not None]  # None: pixels found corrupt
        if not items:
            raise TrainingError(f"step {step}: every sample of the batch failed to decode (items {idx}); see the "
                                "warnings above")
        batch = {"source": [it["source"] for it in items], "target": [it["target"] for it in items],
                 "text": [it["text"] for it in items],
                 "task": None if items[0]["task"] is None else torch.tensor([it["task"] for it in items])}
        if self.diptych:
            batch = _diptych_batch(batch, self.pipe.diptych_template)
        elif self.config.mode == "incontext":
            missing = [it.get("origin", "?") for it in items if it.get("captions") is None]
            if missing:
                raise TrainingError(f"mode incontext needs each pair's scene captions (x2edit build-data writes them "
                                    f"for Shape World); {missing[0]} has none")
            batch = _incontext_batch(batch, items)
        if self.config.data.prompt_dropout:  # drawn from (seed, step, rank): a resumed run drops the same
            g = np.random.default_rng([self.config.seed, step, acc.process_index, 0xD0])
            batch["text"] = ["" if g.random() < self.config.data.prompt_dropout else t for t in batch["text"]]
        return batch

    def _fill_condition(self, sources: list[np.ndarray]) -> torch.Tensor:
        """(B, T, 4C + 4f^2) Fill condition of [source | source] canvases: the packed masked canvas (right half
        zeroed in [-1, 1] pixels, as FluxFillPipeline masks) and the packed right-half mask."""
        pipe, device = self.pipe, self.accelerator.device
        x = torch.from_numpy(np.stack(sources)).permute(0, 3, 1, 2).float().div(127.5).sub(1)  # (B, 3, H, 2W)
        mask = torch.zeros_like(x[:, :1])
        mask[..., x.shape[-1] // 2:] = 1
        b, _, h, w = x.shape
        m, masked = pipe.prepare_mask_latents(mask, (x * (1 - mask)).to(device=device, dtype=pipe.vae.dtype), b,
                                              pipe.vae.config.latent_channels, 1, h, w, self.transformer.dtype,
                                              device, None)
        return torch.cat([masked, m], dim=-1)

    # -- one step ----------------------------------------------------------------------------
    def compute_loss(self, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        cfg, device = self.config, self.accelerator.device
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 7919 + self.accelerator.process_index)
        with torch.no_grad():
            x0, latent_ids = self._images_to_tokens(batch["target"], reference=False)
            prompt_embeds, pooled, text_ids = (t.to(device=device, dtype=self.transformer.dtype) for t in
                                               self.pipe.encode_prompt(batch["text"], device=self.text_device,
                                                                       max_sequence_length=cfg.model.max_text_tokens))
            ref = cond = None
            if cfg.mode not in ("t2i", "incontext"):  # incontext: text-to-image on the set's canvas
                ref, ref_ids = self._images_to_tokens(batch["source"], reference=True)
            if self.diptych:
                cond = self._fill_condition(batch["source"])
            elif cfg.data.self_reference and torch.rand((), generator=g).item() < cfg.data.self_reference:
                ref, ref_ids = x0, latent_ids.clone()  # the image itself in context (Kontext pretraining)
                ref_ids[..., 0] = 1
        start = self.source_start
        if start is None:
            sigmas = sample_sigmas(len(x0), cfg.loss.timestep_sampling, cfg.loss.shift, generator=g, device=device)
            xt, target = flow_matching_pair(x0, sigmas, generator=g)
        else:  # one-step edit from the source itself at a fixed noise level
            sigmas = torch.full((len(x0),), float(start), device=device)
            xt, target = source_start_pair(x0, ref, start)
        hidden, img_ids = xt, latent_ids
        if cond is not None:  # Fill: the condition rides along each token's channels
            hidden = torch.cat([xt, cond], dim=2)
        if ref is not None and self.reference:
            hidden, img_ids = torch.cat([xt, ref], 1), torch.cat([latent_ids, ref_ids], 0)
        unwrapped = self.accelerator.unwrap_model(self.model)
        guidance = torch.full((len(x0),), 1.0, device=device) if unwrapped.config.guidance_embeds else None
        want_contrast = cfg.mode in ADAPTER_MODES and cfg.loss.contrastive_weight > 0 and batch["task"] is not None
        # Target tokens only: the reference tokens behind them are the source image (X2Edit does the same).
        blocks = BlockOutputs(unwrapped, cfg.loss.contrastive_blocks, num_tokens=x0.shape[1]) if want_contrast else None
        probe = BlockOutputs(unwrapped, [-1], num_tokens=x0.shape[1]) if self.mask_head is not None else None
        call = dict(hidden_states=hidden, timestep=sigmas, guidance=guidance, pooled_projections=pooled,
                    encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=img_ids, return_dict=False)
        with routing_context(unwrapped, task_ids=batch["task"]) as routing:
            with blocks or _Null(), probe or _Null():
                pred = self.model(**call)[0][:, : x0.shape[1]]
            if self.residual:  # the base's own output, for the change the adapter makes to it
                with torch.no_grad(), adapters_disabled(unwrapped, [ADAPTER_NAME]):
                    base_pred = self.model(**call)[0][:, : x0.shape[1]]
        if self.diptych and cfg.loss.diptych_region == "right":  # the edited half's tokens only
            right = _right_half_tokens(batch["source"][0], self.pipe.vae_scale_factor * 2, device)
            pred, xt, target, x0 = pred[:, right], xt[:, right], target[:, right], x0[:, right]
            ref = ref[:, right] if ref is not None else None
        x0_reading = self.residual or self.prediction != "flow"
        x0_loss = cfg.loss.weighting in ("x0", "x0_edit")
        if x0_reading or x0_loss:
            x0_hat = (residual_sample(pred, base_pred, ref) if self.residual
                      else predicted_sample(pred, xt, sigmas, self.prediction, self.sigma_data))
        changed = None  # (B, T) per target token, the fraction of its pixels the edit changes
        if cfg.loss.mask_weight or cfg.loss.region_weight:
            changed = changed_fraction(batch["source"], batch["target"], self.pipe.vae_scale_factor * 2)
        if x0_loss:  # the error of the implied x0, equal weight at every sigma
            fm = x0_error(x0_hat, x0, ref if cfg.loss.weighting == "x0_edit" else None,
                          1 + cfg.loss.region_weight * changed if cfg.loss.region_weight else None)
        else:  # on the velocity; an x0 reading is scored on the velocity it implies (as JiT)
            if x0_reading:
                pred = velocity_from_sample(xt, x0_hat, sigmas, floor=SIGMA_FLOOR)
            fm = flow_matching_loss(pred, target, sigmas, cfg.loss.weighting)
        loss, parts = fm, {"flow_matching": fm.item()}
        if probe is not None:  # where the edit is: per target token, the fraction of its pixels that change
            logits = self.mask_head(probe.outputs[0]).squeeze(-1).float()  # (B, T)
            m = mask_loss(logits, changed)
            loss = loss + cfg.loss.mask_weight * m
            parts["mask"] = m.item()
        if routing.balance_loss is not None and cfg.loss.balance_weight > 0:
            loss = loss + cfg.loss.balance_weight * routing.balance_loss
            parts["balance"] = routing.balance_loss.item()
        if blocks is not None:
            terms = [contrastive_loss(h, batch["task"].to(device), cfg.loss.contrastive_temperature,
                                      cfg.loss.contrastive_pool) for h in blocks.outputs]
            terms = [t for t in terms if t is not None]
            if terms:
                con = torch.stack(terms).mean()
                loss = loss + cfg.loss.contrastive_weight * con
                parts["contrastive"] = con.item()
        parts["loss"] = loss.item()
        return loss, parts

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        if not self.accelerator.is_main_process:
            return self.out
        d = self.out / "checkpoints" / f"step_{self.step:07d}"
        tmp = d.with_name(d.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        trainable = {n: p.detach().cpu().contiguous() for n, p in
                     self.accelerator.unwrap_model(self.model).named_parameters() if p.requires_grad}
        if self.mask_head is not None:
            trainable.update({f"{MASK_HEAD}.{n}": p.detach().cpu().contiguous()
                              for n, p in self.accelerator.unwrap_model(self.mask_head).named_parameters()})
        save_file(trainable, str(tmp / "trainable.safetensors"))
        state = {"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict()}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        torch.save(state, tmp / "optimizer.pt")
        running = time.perf_counter() - self._loop_start if self._loop_start is not None else 0.0
        loop_seconds = self._loop_seconds + running
        (tmp / "trainer_state.json").write_text(json.dumps({"step": self.step, "loop_seconds": round(loop_seconds, 3),
                                                            "fingerprint": self.config.fingerprint()}))
        shutil.rmtree(d, ignore_errors=True)
        tmp.rename(d)  # a checkpoint directory exists only once complete
        done = sorted(p for p in (self.out / "checkpoints").glob("step_*") if not p.name.endswith(".tmp"))
        for old in done[: -self.config.keep_checkpoints]:
            shutil.rmtree(old)
        self.last_checkpoint = d
        return d

    def load_checkpoint(self, resume: str) -> None:
        d = Path(resume)
        if resume == "latest":
            found = sorted(p for p in (self.out / "checkpoints").glob("step_*") if not p.name.endswith(".tmp"))
            if not found:
                raise TrainingError(f"--resume latest: no checkpoint under {self.out / 'checkpoints'}")
            d = found[-1]
        if not (d / "trainer_state.json").is_file():
            raise TrainingError(f"{d} is not a checkpoint directory")
        state = json.loads((d / "trainer_state.json").read_text())
        if state["fingerprint"] != self.config.fingerprint():
            raise TrainingError(f"checkpoint {d} was made with a different config (fingerprint {state['fingerprint']}"
                                f" != {self.config.fingerprint()}); only {list(TrainConfig.RESUMABLE_CHANGES)} "
                                "may change on resume")
        weights = load_file(str(d / "trainable.safetensors"))
        head = {k.removeprefix(f"{MASK_HEAD}."): weights.pop(k) for k in list(weights) if k.startswith(f"{MASK_HEAD}.")}
        if head:  # (the fingerprint check above makes sure the run has the probe too)
            self.accelerator.unwrap_model(self.mask_head).load_state_dict(head)
        model = self.accelerator.unwrap_model(self.model)
        missing = model.load_state_dict(weights, strict=False)
        if missing.unexpected_keys:
            raise TrainingError(f"checkpoint {d} has weights this model lacks: {missing.unexpected_keys[:3]}")
        opt = load_state(d / "optimizer.pt", TrainingError)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.lr_scheduler.load_state_dict(opt["lr_scheduler"])
        if self.ema is not None and "ema" in opt:
            self.ema.load_state_dict(opt["ema"])
        self.step, self.last_checkpoint = state["step"], d
        self._loop_seconds = float(state.get("loop_seconds", 0.0))  # checkpoints of earlier releases: none

    # -- validation --------------------------------------------------------------------------
    def validate(self) -> dict:
        from x2edit.data_pipeline.metrics import psnr
        from x2edit.data_pipeline.shapeworld import ShapeWorld
        from x2edit.training.evaluation import edit_grid, evaluate_pairs

        cfg = self.config
        world = ShapeWorld(resolution=cfg.data.resolution)
        pairs = list(world.eval_pairs(n_per_task=cfg.data.validation_pairs))
        out_dir = self.out / "validation"
        out_dir.mkdir(parents=True, exist_ok=True)
        self.transformer.eval()
        if cfg.mode == "incontext":  # the right panel made from the left, training-free, under the set's caption
            from x2edit.incontext import inpaint_set, joint_caption
            from x2edit.training.evaluation import edit_metrics

            outputs = [np.asarray(inpaint_set(self.pipe, [p.source, None], joint_caption("EDIT", p.instruction,
                                                                                        list(p.captions)),
                                              task=p.task, num_inference_steps=20,
                                              generator=torch.Generator().manual_seed(cfg.seed))[1]) for p in pairs]
            gains = [edit_metrics(o, p.source, p.target, p.mask)["edit_gain_db"] for o, p in zip(outputs, pairs)]
            metrics = {"val/edit_gain_db": float(np.mean(gains))}
        elif cfg.mode != "t2i":
            steps = 1 if self.source_start is not None else 20
            table, _, outputs = evaluate_pairs(self.pipe, pairs, steps=steps, seed=cfg.seed,
                                               tasks=[p.task for p in pairs])
            metrics = {"val/edit_gain_db": table["mean"]["edit_gain_db"]}
        else:
            # t2i: generate each target scene from its caption; the grid shows a blank "source".
            pairs = [dataclasses.replace(p, source=np.full_like(p.target, 255), instruction=p.captions[1])
                     for p in pairs]
            h, w = pairs[0].target.shape[:2]
            images = self.pipe(prompt=[p.instruction for p in pairs], height=h, width=w, num_inference_steps=20,
                               output_type="np", generator=torch.Generator().manual_seed(cfg.seed)).images
            outputs = list((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
            metrics = {"val/psnr": float(np.mean([psnr(o, p.target) for o, p in zip(outputs, pairs)]))}
        edit_grid(pairs, outputs).save(out_dir / f"step_{self.step:07d}.png")
        self.transformer.train()
        return metrics

    # -- the loop ----------------------------------------------------------------------------
    def train(self, resume: str | None = None, on_step=None) -> Path:
        """Train to ``config.steps``; returns the output directory. ``on_step(step, parts)`` sees each loss."""
        from tqdm.auto import tqdm

        cfg, acc = self.config, self.accelerator
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self.load_checkpoint(resume)
        if acc.is_main_process:
            save_config(cfg, self.out / "config.yaml")
            logger.info(format_summary(adapter_summary(self.transformer)) if cfg.mode in ADAPTER_MODES else
                        f"{sum(p.numel() for p in self.params):,} trainable parameters")
        writer = _Metrics(self.out, acc.is_main_process)
        self.transformer.train()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not acc.is_main_process, desc=f"train {cfg.mode}")
        t0 = self._loop_start = time.perf_counter()
        if cfg.time_budget_s:  # the budget counts the loop's time before a resume too
            self._deadline = (t0 - self._loop_seconds, cfg.time_budget_s)
        while self.step < cfg.steps:
            if self._deadline is not None and self._steps_left(self.step) <= 0:
                logger.info("time budget of %.0f s reached at step %d of %d", cfg.time_budget_s, self.step, cfg.steps)
                break
            batch = self.batch(self.step)
            loss, parts = self.compute_loss(batch, self.step)
            if not math.isfinite(parts["loss"]):
                raise TrainingError(f"loss is {parts['loss']} at step {self.step}; last good checkpoint: "
                                    f"{self.last_checkpoint or 'none (none saved yet)'}")
            acc.backward(loss)
            if cfg.optim.max_grad_norm:
                acc.clip_grad_norm_(self.params, cfg.optim.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.step(self.params)
            self.step += 1
            if on_step is not None:
                on_step(self.step, parts)
            bar.update(1)
            bar.set_postfix(loss=f"{parts['loss']:.4f}")
            if cfg.log_every and self.step % cfg.log_every == 0:
                writer.log(self.step, {**{f"train/{k}": v for k, v in parts.items()},
                                       "train/samples_per_s": cfg.batch_size * acc.num_processes * cfg.log_every
                                       / (time.perf_counter() - t0)})
                t0 = time.perf_counter()
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
            if cfg.validate_every and self.step % cfg.validate_every == 0 and acc.is_main_process:
                writer.log(self.step, self.validate())
        bar.close()
        writer.close()
        self.save_final()
        # Every process waits for the main one's files, then the process group goes down in order (a rank
        # leaving while gloo's threads still run aborted at exit: "terminate called without an active exception").
        acc.wait_for_everyone()
        acc.end_training()
        return self.out

    def save_final(self) -> None:
        if not self.accelerator.is_main_process:
            return
        if self.ema is not None:
            self.ema.copy_to(self.params)
        cfg = self.config
        if cfg.mode not in ADAPTER_MODES:
            self.pipe.save_pretrained(self.out / "pipeline")
            if cfg.mode in BASE_MODES:  # what the base is trained for travels with it (x2edit.registry reads it)
                settings = {"source_start": self.source_start, "max_area": cfg.data.resolution**2}
                if self.diptych:
                    settings["template"] = self.pipe.diptych_template
                else:
                    settings["reference_tokens"] = self.reference
                if self.source_start is not None:
                    settings["num_inference_steps"] = 1
                (self.out / "pipeline" / EMBEDDED_META).write_text(json.dumps(settings, indent=2))
            return
        save_adapter(self.transformer, self.out / "adapter.safetensors", ADAPTER_NAME,
                     metadata={"steps": self.step, "config_fingerprint": cfg.fingerprint()})
        if cfg.adapter.mergeable:
            for task in TASK_NAMES:
                export_diffusers_lora(self.transformer, self.out / "lora_per_task" / task, task=task)


ADAPTER_NAME = "default"  # the name of the adapter being trained (as saved by save_adapter)


def _diptych_batch(batch: dict, template: str) -> dict:
    """An edit batch as diptychs: source [source | source] (the start of a one-step edit, and Fill's condition
    once its right half is masked), target [source | target], the instruction inside ``template``."""
    return {**batch, "source": [np.concatenate([s, s], axis=1) for s in batch["source"]],
            "target": [np.concatenate([s, t], axis=1) for s, t in zip(batch["source"], batch["target"])],
            "text": [template.format(instruction=t) for t in batch["text"]]}


def _incontext_batch(batch: dict, items: list[dict]) -> dict:
    """An edit batch as IC-LoRA sets: the canvas of each item's panels is the image to generate (nothing in
    context). A pair is the 2-panel set [source | target] under "[EDIT] instruction [LEFT] source caption [RIGHT]
    target caption"; a set of more panels (build-data's colour sets) is [source | target | panel 2 | ...] under
    the joint caption written with it. A batch is one canvas size: its sets have one panel count."""
    from x2edit.incontext import check_caption, joint_caption, tile

    counts = sorted({2 + len(it.get("panels") or ()) for it in items})
    if len(counts) > 1:
        raise TrainingError(f"mode incontext: one batch mixes sets of {' and '.join(map(str, counts))} panels; "
                            "train on data of one set size")
    texts = []
    for text, it in zip(batch["text"], items):
        if it.get("panels"):
            if it.get("set_caption") is None:
                raise TrainingError(f"mode incontext: the {counts[0]}-panel set {it.get('origin', '?')} has no "
                                    "set_caption")
            check_caption(it["set_caption"], counts[0])
            texts.append(it["set_caption"])
        else:
            texts.append(joint_caption("EDIT", text, list(it["captions"])))
    return {**batch, "source": None, "text": texts,
            "target": [tile([s, t, *(it.get("panels") or ())]) for s, t, it in zip(batch["source"], batch["target"], items)]}


def _right_half_tokens(canvas: np.ndarray, patch: int, device) -> torch.Tensor:
    """(T,) bool: the packed tokens (row-major, ``patch`` pixels a side) of a canvas's right half."""
    cols = canvas.shape[1] // patch
    rows = canvas.shape[0] // patch
    return (torch.arange(rows * cols, device=device) % cols) >= cols // 2
MASK_HEAD = "mask_head"  # the edit-region probe's key prefix in a checkpoint's trainable.safetensors


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class _Metrics:
    """metrics.jsonl always; TensorBoard too when the tensorboard package is installed."""

    def __init__(self, out: Path, active: bool):
        self.active, self.path, self.tb = active, out / "metrics.jsonl", None
        if active:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                pass

    def log(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
