"""Adapter files: safetensors with the adapter config and the base model's fingerprint in the header.

Keys are ``{module name}.{parameter}``, e.g. ``transformer_blocks.0.attn.to_q.lora_A`` with shape
(E[+1], r, K). Loading refuses, with a message naming the problem: files of another format,
adapters made for a different base, unknown or missing keys, wrong shapes, non-finite values.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from x2edit.adapters.config import AdapterConfig
from x2edit.adapters.inject import adapter_config, adapter_layers, inject_adapters, remove_adapter
from x2edit.files import atomic_path

FORMAT = "x2edit-adapter"
FORMAT_VERSION = "1"
# Config keys of a diffusers FluxTransformer2DModel that decide whether an adapter fits it.
_FINGERPRINT_KEYS = ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim",
                     "in_channels", "joint_attention_dim", "pooled_projection_dim")


def base_fingerprint(model: nn.Module) -> dict:
    """What identifies the architecture an adapter was made for (class + shape-defining config)."""
    cfg = getattr(model, "config", None) or {}
    return {"class": type(model).__name__, **{k: cfg[k] for k in _FINGERPRINT_KEYS if k in cfg}}


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """``{module name}.{parameter}`` -> tensor; a parameter shared by several layers (a shared task
    embedding) appears once, under the first layer that holds it."""
    state, seen = {}, set()
    for name, layer in adapter_layers(model):
        if adapter_name in layer.adapters:
            for pname, p in layer.adapters[adapter_name].named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    state[f"{name}.{pname}"] = p.detach()
    if not state:
        raise ValueError(f"no adapter named {adapter_name!r} in the model")
    return state


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                 metadata: dict | None = None) -> Path:
    """Write one adapter to ``path`` (a .safetensors file), atomically; refuses non-finite weights."""
    path = Path(path)
    state = adapter_state_dict(model, adapter_name)
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"refusing to save adapter {adapter_name!r}: non-finite values in {bad[:3]}")
    header = {"format": FORMAT, "format_version": FORMAT_VERSION,
              "config": adapter_config(model, adapter_name).to_json(),
              "base": json.dumps(base_fingerprint(model), sort_keys=True)}
    if metadata:
        header["user"] = json.dumps(metadata, sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # no half-written adapter file, ever
        save_file({k: v.contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=header)
    return path


def read_adapter_header(path: str | os.PathLike) -> dict:
    """The adapter file's header: {"config": AdapterConfig, "base": dict, "user": dict}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not an x2edit adapter (header format={meta.get('format')!r}); "
                         "community LoRAs are loaded with pipe.load_lora_weights")
    return {"config": AdapterConfig.from_dict(json.loads(meta["config"])),
            "base": json.loads(meta.get("base", "{}")), "user": json.loads(meta.get("user", "{}"))}


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> AdapterConfig:
    """Inject the adapter stored at ``path`` into ``model`` and load its weights, checked.

    On any error the model is left as it was.
    """
    header = read_adapter_header(path)
    config, base = header["config"], header["base"]
    mine = base_fingerprint(model)
    diff = {k: (base[k], mine.get(k)) for k in base if base[k] != mine.get(k)}
    if diff:
        raise ValueError(f"adapter {path} was made for a different base model: "
                         + ", ".join(f"{k}={a} (this model: {b})" for k, (a, b) in diff.items()))
    inject_adapters(model, config, adapter_name)
    try:
        expected = adapter_state_dict(model, adapter_name)
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            unknown, missing = sorted(keys - set(expected)), sorted(set(expected) - keys)
            if unknown:
                raise ValueError(f"adapter {path} has {len(unknown)} keys this model has no place for, e.g. {unknown[:3]}")
            if missing:
                raise ValueError(f"adapter {path} lacks {len(missing)} keys, e.g. {missing[:3]}")
            with torch.no_grad():
                for k, target in expected.items():
                    t = f.get_tensor(k)
                    if t.shape != target.shape:
                        raise ValueError(f"adapter {path}: {k} has shape {tuple(t.shape)}, expected {tuple(target.shape)}")
                    if not torch.isfinite(t).all():
                        raise ValueError(f"adapter {path}: {k} holds non-finite values (NaN/inf)")
                    target.copy_(t.to(target.dtype))
    except Exception:
        remove_adapter(model, adapter_name)
        raise
    return config
