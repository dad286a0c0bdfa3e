"""`x2edit train` configuration: nested dataclasses loaded from YAML plus ``key=value`` overrides.

Unknown keys and wrong types are refused before anything is built, with the dotted key named.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from x2edit.adapters import AdapterConfig
from x2edit.tasks import TASK_NAMES, get_task

MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
MODES = ("t2i", "edit_base", "edit", "diptych_base", "diptych", "incontext")
BASE_MODES = ("edit_base", "diptych_base")  # the whole transformer trained to edit
DIPTYCH_MODES = ("diptych_base", "diptych")  # a FLUX Fill model repaints the right half of [source | target]
ADAPTER_MODES = ("edit", "diptych", "incontext")  # an adapter trained on a frozen base


@dataclass
class ModelConfig:
    """The base model.

    Args:
        base: registered name or saved-pipeline directory to start from; None builds a new model
            from ``transformer`` + ``vae_factor`` + ``text_encoder`` (base pretraining).
        transformer: FluxTransformer2DModel config for a new model.
        vae_factor: pixel-space VAE factor for a new model.
        prediction_type: how a new model's output is read: "flow" (FLUX's velocity), "sample" (x0, as
            JiT argues for pixel patches as wide as the model) or "edm" (EDM-preconditioned x0); see
            x2edit/schedulers.py. A base's own scheduler says which for adapters trained on it.
        text_encoder: sentence-encoder directory for a new model; None = bundled all-MiniLM-L6-v2.
        max_text_tokens: text tokens per prompt (T5's or the sentence encoder's sequence length). An
            edit adapter records it (``AdapterConfig.max_sequence_length``) and the pipeline encodes
            instructions to the same length at inference.
        gradient_checkpointing: recompute block activations in backward (routed adapters replay
            their task ids: ``x2edit.adapters.enable_gradient_checkpointing``). Real FLUX needs it.
        dtype: the frozen base's weights in edit mode: "auto" (bfloat16 on CUDA, float32 on CPU),
            "float32", "bfloat16" or "float16". The adapter being trained stays float32 (its
            factors are cast to the activations' dtype in the forward). t2i trains the whole
            transformer, which stays float32 (use ``mixed_precision`` there).
        text_encoder_device: where the frozen text encoders live and run: None (the training
            device) or "cpu" (T5-XXL is 9.5 GB in bf16; on the CPU it costs encoding time per step
            instead of GPU memory). The embeddings move to the training device.
        source_start: edit_base only: the base learns to edit in one step from the source itself,
            handed to it as the sample at this noise level with no noise (as ``adapter.source_start``);
            None: from noise, as FLUX.1 Kontext. The saved base records it, and adapters trained on it
            inherit it.
        reference_tokens: edit_base only: the source also enters as Kontext reference tokens (position id
            1). In the one-step form the sample already is the source, so they can be left out: half the
            image tokens, 1.7x the training speed on x2edit-tiny. The saved base records it.
        diptych_template: diptych modes: the prompt around each instruction, with ``{instruction}``; None:
            ICEdit's (``x2edit.pipeline_diptych.DIPTYCH_TEMPLATE``). A diptych_base records it, and the
            pipeline uses it at inference, as ICEdit does: the same text in training and inference.

    In diptych_base mode, ``source_start`` is the noise level of a one-step edit from the [source | source]
    canvas; a base of the text-to-image / Kontext layout becomes a Fill model first (its input layer widened
    with zero-initialised condition channels, ``x2edit.pipeline_diptych.fill_transformer_from``).
    """

    base: str | None = None
    transformer: dict = field(default_factory=dict)
    vae_factor: int = 4
    prediction_type: str = "flow"
    text_encoder: str | None = None
    max_text_tokens: int = 32
    gradient_checkpointing: bool = False
    dtype: str = "auto"
    text_encoder_device: str | None = None
    source_start: float | None = None
    reference_tokens: bool = True
    diptych_template: str | None = None


@dataclass
class DataConfig:
    """Training data.

    Args:
        source: "shapeworld" (pairs generated on the fly, deterministic per index) or a reader
            config for ``x2edit.training.data`` (e.g. {"format": "x2edit", "path": "shards/"}).
        sources: several readers in one run, instead of ``source``: a list of reader configs, each
            with its own filters and an optional ``weight`` (default 1). Each batch comes from one
            source, source s with probability weight_s / sum of weights (whatever the sources'
            sizes), drawn from the seed and the step, so resume stays exact.
        resolution: image side for Shape World / bucket area side for readers.
        filters: score filter expressions for readers, e.g. ["oracle >= 0.9"].
        tasks: restrict to these tasks (None: all).
        validation_pairs: held-out Shape World pairs per task rendered in validation grids.
        buckets: readers only: batch by aspect-ratio buckets of about ``resolution``^2 pixels (each
            batch from one bucket; in edit mode with the contrastive loss, built from same-task pairs)
            instead of fitting every pair to one ``resolution`` square.
        max_aspect: the most elongated bucket kept (long side / short side).
        pool: Shape World only: render pairs 0..pool-1 once at the start and reuse them over epochs
            (0: render each item on the fly, never repeating). For a GPU, whose training outpaces the
            renderer (``x2edit.training.trainer.ShapeWorldSource``).
        pool_workers: processes rendering the pool (0: one per CPU).
        self_reference: t2i only: the fraction of steps whose batch also carries each target image as
            Kontext reference tokens (in-context pretraining: FLUX.1 Kontext's base learns generation
            both with and without an image in context). It teaches the frozen base to read reference
            tokens, which the editing adapter then only has to redirect; 0 is plain text-to-image.
        task_weights: Shape World only: relative sampling weight per task name (tasks not named: 1),
            e.g. more of the local edits, whose change is small and slow to learn.
        prompt_dropout: the fraction of samples whose text is replaced by the empty prompt (drawn from the
            seed and the step); ICEdit: 0.1.
    """

    source: str | dict = "shapeworld"
    sources: list | None = None
    resolution: int = 64
    buckets: bool = False
    max_aspect: float = 2.0
    filters: list = field(default_factory=list)
    tasks: list | None = None
    validation_pairs: int = 1
    self_reference: float = 0.0
    pool: int = 0
    pool_workers: int = 0
    task_weights: dict | None = None
    prompt_dropout: float = 0.0

    def __post_init__(self):
        if isinstance(self.prompt_dropout, bool) or not isinstance(self.prompt_dropout, (int, float)) \
                or not 0 <= self.prompt_dropout < 1:
            raise ValueError(f"data.prompt_dropout is a fraction in [0, 1), got {self.prompt_dropout!r}")
        if self.task_weights is not None:
            for name, w in self.task_weights.items():
                if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < float("inf"):
                    raise ValueError(f"data.task_weights.{name} must be a number >= 0, got {w!r}")
            self.task_weights = {get_task(k).name: float(w) for k, w in self.task_weights.items()}
            if not any(self.task_weights.get(get_task(t).name, 1.0) for t in (self.tasks or TASK_NAMES)):
                raise ValueError("data.task_weights gives every task weight 0")
            if self.source != "shapeworld" or self.sources:
                raise ValueError("data.task_weights weighs Shape World's tasks: it needs data.source: shapeworld")
        if self.pool < 0 or self.pool_workers < 0:
            raise ValueError(f"data.pool and data.pool_workers must be >= 0, got {self.pool} and {self.pool_workers}")
        if self.pool and (self.source != "shapeworld" or self.sources):
            raise ValueError("data.pool pre-renders Shape World pairs: it needs data.source: shapeworld")
        if self.sources is None:
            return
        if self.source != "shapeworld":
            raise ValueError("give data.source (one reader) or data.sources (several), not both")
        if not self.sources:
            raise ValueError("data.sources is empty: list reader configs, or leave it out")
        for i, spec in enumerate(self.sources):
            if not isinstance(spec, dict) or "format" not in spec:
                raise ValueError(f"data.sources[{i}]: expected a reader mapping with a format, got {spec!r}")
            w = spec.get("weight", 1.0)
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0 or w == float("inf"):
                raise ValueError(f"data.sources[{i}].weight must be a positive number, got {w!r}")

    @property
    def readers(self) -> list[dict]:
        """The reader configs of the run (with their weights): ``sources``, or ``source`` as one."""
        if self.sources:
            return list(self.sources)
        return [self.source] if isinstance(self.source, dict) else []


@dataclass
class LossConfig:
    """Objective weights and flow-matching settings (X2Edit: contrastive T=0.5, weight 0.1).

    weighting: "none" (plain velocity MSE), SD3's "sigma_sqrt" / "cosmap", or "x0": the MSE of the x0
    the output implies, the same weight at every sigma (the velocity loss weights the x0 error by
    1/sigma^2, which for x0 and residual readings lets the near-clean steps dominate), or "x0_edit":
    that error divided by each pair's own edit energy, so each pair counts as in the edit gain
    (``x2edit.training.losses.x0_error``; edit modes only).
    mask_weight: edit modes: weight of the auxiliary edit-region loss. A linear probe on the last double
    block's target tokens predicts, per token, the fraction of its pixels that the edit changes (binary
    cross-entropy against the pair's own source/target difference): a direct signal of *where* the
    instruction applies, which the image loss gives only weakly for a small object. The probe is
    trained with the model, kept in checkpoints, and not part of the saved model.
    region_weight: x0 losses in edit modes: a token's error counts 1 + region_weight x the fraction of its
    pixels the edit changes (each pair's weights normalised to mean 1): more of the loss inside a small edit.
    diptych_region: diptych modes: the tokens the loss covers: "canvas" (both halves, ICEdit) or "right" (the
    edited half only; the left half is the source, which the model sees unmasked in its condition).
    """

    timestep_sampling: str = "logit_normal"
    shift: float = 1.0
    weighting: str = "none"
    balance_weight: float = 0.01
    contrastive_weight: float = 0.1
    contrastive_temperature: float = 0.5
    contrastive_pool: str = "flatten"
    contrastive_blocks: str | list = "all"
    mask_weight: float = 0.0
    region_weight: float = 0.0
    diptych_region: str = "canvas"


@dataclass
class OptimConfig:
    """AdamW settings and the learning-rate schedule.

    The schedule is warmup-stable-decay (WSD): linear warmup over ``warmup_steps``, then ``lr``, then
    a linear decay to 0 over the last ``decay_steps`` steps (0: no decay). The decay may be set or
    changed on resume: a run trained at a constant rate can be cooled down from any checkpoint.
    """

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    warmup_steps: int = 0
    decay_steps: int = 0
    use_8bit_adam: bool = False
    max_grad_norm: float = 1.0
    ema_decay: float | None = None


@dataclass
class TrainConfig:
    """Everything one training run needs.

    Args:
        mode: "t2i" (pretrain the whole transformer as text-to-image), "edit_base" (train the whole
            transformer to edit, the tiny analogue of FLUX.1 Kontext: a base that edits), "edit" (train
            an adapter on the frozen base, source image as reference tokens), or the in-context pair (ICEdit):
            "diptych_base" (the whole transformer as a FLUX Fill model repainting the right half of a
            [source | target] canvas) and "diptych" (an adapter on a frozen Fill base, the same way). The
            diptych modes read the same data as edit mode. "incontext" (IC-LoRA): a task LoRA on the frozen
            text-to-image base, trained as text-to-image on 2-panel [before | after] sets of captioned pairs
            (Shape World on the fly, or x2edit shards of it) under a joint caption ("[EDIT] instruction [LEFT]
            source caption [RIGHT] target caption"; ``x2edit.incontext``).
        output_dir: checkpoints, logs, validation grids and the final model/adapter.
        steps: optimizer steps; batch_size: samples per step and process.
        checkpoint_every / validate_every / log_every: in steps (0 disables).
        mixed_precision: "no", "bf16" or "fp16" (accelerate).
        tf32: on CUDA, let float32 matmuls and convolutions use TF32 tensor cores (what x2edit-tiny's GPU
            recipe trains with instead of bf16 autocast).
        time_budget_s: stop the training loop after this many seconds (one process only) and save as at
            the last step. The learning-rate decay (``optim.decay_steps``, as a fraction of ``steps``)
            then follows whichever is further along, the steps or the budget, so it ends inside the
            budget. A run that stops by time depends on the machine's speed: it is not repeatable.
    """

    mode: str = "edit"
    output_dir: str = "runs/x2edit"
    seed: int = 0
    steps: int = 1000
    batch_size: int = 8
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    validate_every: int = 500
    log_every: int = 10
    mixed_precision: str = "no"
    num_threads: int | None = None
    tf32: bool = False
    time_budget_s: float | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    # Keys that may change between a checkpoint and its resume without changing what is learned.
    RESUMABLE_CHANGES: typing.ClassVar[tuple[str, ...]] = (
        "steps", "checkpoint_every", "keep_checkpoints", "validate_every", "log_every", "output_dir", "num_threads",
        "optim.decay_steps", "tf32", "time_budget_s")

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.batch_size < 1 or self.steps < 1:
            raise ValueError("batch_size and steps must be >= 1")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be a positive number of seconds, got {self.time_budget_s}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.mode == "t2i" and self.model.base is None and not self.model.transformer:
            raise ValueError("t2i pretraining from scratch needs model.transformer (a FluxTransformer2DModel config)")
        if self.data.buckets and not self.data.readers:
            raise ValueError("data.buckets needs a reader source (Shape World scenes are all square)")
        if self.loss.weighting not in ("none", "sigma_sqrt", "cosmap", "x0", "x0_edit"):
            raise ValueError("loss.weighting must be none, sigma_sqrt, cosmap, x0 or x0_edit, got "
                             f"{self.loss.weighting!r}")
        if self.mode == "incontext" and (self.loss.weighting == "x0_edit" or self.loss.mask_weight
                                         or self.loss.region_weight):
            raise ValueError("mode incontext trains on captioned sets as text-to-image: no x0_edit weighting, "
                             "mask_weight or region_weight")
        if self.loss.weighting == "x0_edit" and self.mode == "t2i":
            raise ValueError("loss.weighting x0_edit divides by each pair's edit (source vs target): it needs an edit "
                             "mode (edit or edit_base)")
        if self.loss.region_weight < 0 or (self.loss.region_weight and (
                self.mode == "t2i" or self.loss.weighting not in ("x0", "x0_edit"))):
            raise ValueError(f"loss.region_weight must be >= 0 and needs an edit mode with an x0 loss (loss.weighting "
                             f"x0 or x0_edit), got {self.loss.region_weight} with {self.loss.weighting} in mode {self.mode}")
        if self.loss.mask_weight < 0 or (self.loss.mask_weight and self.mode == "t2i"):
            raise ValueError(f"loss.mask_weight must be >= 0 and needs an edit mode, got {self.loss.mask_weight} in "
                             f"mode {self.mode}")
        m = self.model
        if m.source_start is not None and self.mode not in BASE_MODES:
            raise ValueError("model.source_start sets how an editing base is trained: it needs mode: edit_base or "
                             "diptych_base (an adapter has adapter.source_start; it reads its base's)")
        if not m.reference_tokens and self.mode != "edit_base":
            raise ValueError("model.reference_tokens sets how a Kontext-layout editing base is trained: it needs mode: "
                             "edit_base (a diptych canvas carries the source in its left half)")
        if self.loss.diptych_region not in ("canvas", "right"):
            raise ValueError(f"loss.diptych_region must be canvas or right, got {self.loss.diptych_region!r}")
        if self.mode not in DIPTYCH_MODES and (m.diptych_template is not None or self.loss.diptych_region != "canvas"):
            raise ValueError("model.diptych_template and loss.diptych_region are for the diptych modes (diptych_base, "
                             f"diptych), not {self.mode}")
        if m.diptych_template is not None and (not isinstance(m.diptych_template, str)
                                               or "{instruction}" not in m.diptych_template):
            raise ValueError(f"model.diptych_template must contain '{{instruction}}', got {m.diptych_template!r}")
        if self.mode in DIPTYCH_MODES and (self.loss.mask_weight or self.loss.region_weight):
            raise ValueError("loss.mask_weight and loss.region_weight are built for the Kontext layout; the diptych "
                             "modes do not support them yet")
        if m.source_start is not None and (isinstance(m.source_start, bool) or not 0 < m.source_start <= 1):
            raise ValueError(f"model.source_start must be a noise level in (0, 1] or null, got {m.source_start!r}")
        if not m.reference_tokens and m.source_start is None and self.mode == "edit_base":
            raise ValueError("model.reference_tokens: false needs model.source_start: from noise, the reference tokens "
                             "are the only way the source reaches the model")
        if not 0.0 <= self.data.self_reference <= 1.0:
            raise ValueError(f"data.self_reference is a fraction of steps in [0, 1], got {self.data.self_reference}")
        if self.data.self_reference and self.mode != "t2i":
            raise ValueError("data.self_reference is for t2i pretraining; edit batches carry their source")
        if self.model.dtype not in MODEL_DTYPES:
            raise ValueError(f"model.dtype must be one of {list(MODEL_DTYPES)}, got {self.model.dtype!r}")
        if self.mode not in ADAPTER_MODES and self.model.dtype not in ("auto", "float32"):
            raise ValueError(f"model.dtype: {self.mode} trains the whole transformer, whose weights stay float32; "
                             "use mixed_precision: bf16 for bf16 compute")
        if self.model.text_encoder_device not in (None, "cpu"):
            raise ValueError(f"model.text_encoder_device must be null (the training device) or 'cpu', got "
                             f"{self.model.text_encoder_device!r}")
        if self.model.prediction_type not in ("flow", "sample", "edm"):
            raise ValueError(f"model.prediction_type must be 'flow', 'sample' or 'edm', got "
                             f"{self.model.prediction_type!r}")
        if not 0 <= self.optim.decay_steps <= self.steps:
            raise ValueError(f"optim.decay_steps must be in 0..steps={self.steps}, got {self.optim.decay_steps}")
        if self.adapter.max_sequence_length not in (None, self.model.max_text_tokens):
            raise ValueError(f"adapter.max_sequence_length is written by the trainer from model.max_text_tokens "
                             f"({self.model.max_text_tokens}); set model.max_text_tokens instead")
        if self.mode in ADAPTER_MODES and self.model.base is None:
            raise ValueError(f"{self.mode} training needs model.base: the frozen base model to adapt")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of everything that decides what is learned (not run length, paths or logging).

        Settings at their default value are left out, so a release that adds a setting (at a
        default that keeps the old behaviour) still resumes the checkpoints of earlier runs.
        """
        d = _without_defaults(self)
        for key in self.RESUMABLE_CHANGES:
            *parents, leaf = key.split(".")
            node = d
            for p in parents:
                node = node.get(p, {})
            node.pop(leaf, None)
        d = {k: v for k, v in d.items() if v != {}}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _without_defaults(obj) -> dict:
    """A dataclass as a dict of the fields that differ from their defaults (nested dataclasses alike)."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            nested = _without_defaults(value)
            if nested:
                out[f.name] = nested
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if value != default:
            out[f.name] = value
    return out


def check_type(value, tp, key: str):
    """Validate (and lightly coerce: int -> float, list -> tuple) ``value`` against annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return check_type(value, arg, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"{key}: {value!r} matches none of {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise ValueError(f"{key}: expected None")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, bool):  # YAML 1.1 reads a bare no/yes (mixed_precision: no) as a bool
        return "yes" if value else "no"
    if tp is tuple or origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
        raise ValueError(f"{key}: expected a list, got {type(value).__name__}")
    base = origin or tp
    if base is typing.Any:
        return value
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ValueError(f"{key}: expected {getattr(base, '__name__', base)}, got {type(value).__name__} {value!r}")
    return value


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ValueError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key {prefix}{unknown[0]!r}; valid keys under "
                         f"{prefix.rstrip('.') or 'the top level'}: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = check_type(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


def _set_dotted(d: dict, key: str, value) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ValueError(f"override {key}: {p} is not a section")
    d[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """``["optim.lr=3e-4", "adapter.rank=16"]`` -> nested dict; values are parsed as YAML scalars."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        _set_dotted(out, key.strip(), yaml.safe_load(raw))
    return out


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_dict(data: dict) -> TrainConfig:
    """A checked ``TrainConfig`` from a nested dict (as YAML would give)."""
    return _build(TrainConfig, data, "")


# Named settings shipped with x2edit (``x2edit train --preset NAME``): partial configs under
# x2edit/training/presets/, e.g. upstream X2Edit's recipe.
PRESETS_DIR = Path(__file__).parent / "presets"


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                preset: str | None = None) -> TrainConfig:
    """Read a YAML config and apply ``key=value`` overrides; all errors name the offending key.

    preset: a name from ``list_presets()``, applied first (the file and the overrides go on top).
    """
    data = {}
    if preset is not None:
        if preset not in list_presets():
            raise ValueError(f"unknown preset {preset!r}: available are {list_presets()}")
        data = _read_yaml(PRESETS_DIR / f"{preset}.yaml")
    if path is not None:
        data = _merge(data, _read_yaml(Path(path)))
    return config_from_dict(_merge(data, parse_overrides(overrides or [])))


def save_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(json.loads(json.dumps(config.to_dict(), default=list)), sort_keys=False))
