"""Facts about the running environment that every kernel module reads: is triton installed, does it
run through its CPU interpreter, which GPU is this.

This module sits below `x2edit.kernels.dispatch` and the backends (it imports neither), so the backends can
ask these questions without importing the dispatch point that imports them.
"""

from __future__ import annotations

import importlib.util
import os
import re

import torch


def triton_available() -> bool:
    """Whether the triton package can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def device_name(device: torch.device) -> str:
    """The GPU's marketing name as torch reports it ("NVIDIA H200"), or "cpu"."""
    if device.type != "cuda":
        return device.type
    return torch.cuda.get_device_name(device)


def device_slug(name: str) -> str:
    """File-name form of a device name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def is_hopper(device: torch.device) -> bool:
    """Compute capability 9.x (H100, H200): the chips with tensor-memory descriptors (TMA) and wgmma."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
