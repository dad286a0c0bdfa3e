"""The one dispatch point: `lora_linear` chooses the Triton kernels or the torch reference.

Backend setting, in order of precedence:
  1. `set_backend(name)` / `with use_backend(name):` in code,
  2. the environment variable X2EDIT_KERNELS (read when this module is imported),
  3. "auto".
Names: "auto" (Triton when x is a CUDA tensor of a supported dtype and triton is installed, torch
otherwise), "triton" (always Triton; an error where it cannot run) and "torch" (always the
reference). Forcing "triton" on CPU tensors is allowed only under TRITON_INTERPRET=1, which is how
CI runs the kernels without a GPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from kernels.checks import check_lora_inputs
from kernels.env import interpreter_enabled, triton_available
from kernels.reference import lora_linear_dense

BACKENDS = ("auto", "triton", "torch")
# Dtypes the Triton kernels are written and tested for; float64 and others use the reference.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ENV_VAR = "X2EDIT_KERNELS"


def _validate_backend(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"kernels: unknown backend {name!r} from {source}; choose one of {BACKENDS}")
    return name


_backend = _validate_backend(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", f"${ENV_VAR}")


def get_backend() -> str:
    """The current backend setting: "auto", "triton" or "torch"."""
    return _backend


def set_backend(name: str) -> None:
    """Set the backend for every later `lora_linear` call in this process.

    Args:
        name: "auto", "triton" or "torch".
    """
    global _backend
    _backend = _validate_backend(name, "set_backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run the enclosed code with backend `name`, then restore the previous one."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def resolve_backend(x: torch.Tensor) -> str:
    """The backend a call with activations `x` takes now: "triton" or "torch".

    Raises:
        ImportError: "triton" is forced and triton is not installed.
        RuntimeError: "triton" is forced for tensors it cannot run on.
    """
    setting = get_backend()
    if setting == "torch":
        return "torch"
    if setting == "auto":
        ok = x.is_cuda and x.dtype in TRITON_DTYPES and triton_available()
        return "triton" if ok else "torch"
    # setting == "triton": refuse loudly rather than fall back.
    if not triton_available():
        raise ImportError(
            "kernels backend 'triton' is forced but triton is not installed: pip install 'x2edit[triton]', "
            "or set_backend('auto')"
        )
    if x.dtype not in TRITON_DTYPES:
        raise RuntimeError(
            f"kernels backend 'triton' supports {[str(d) for d in TRITON_DTYPES]}, got {x.dtype}; use "
            "set_backend('torch') for other dtypes"
        )
    if not x.is_cuda and not interpreter_enabled():
        raise RuntimeError(
            f"kernels backend 'triton' needs CUDA tensors (x is on {x.device}); on CPU it runs only "
            "under the Triton interpreter (set TRITON_INTERPRET=1 before triton is imported)"
        )
    return "triton"


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    gates: torch.Tensor | None = None,
    scale: float = 1.0,
    *,
    out: torch.Tensor | None = None,
    sparse_gate_grad: bool = False,
) -> torch.Tensor:
    """Linear layer with E gated low-rank adapters, on the fastest available backend.

    y = x W^T + b + scale * sum_e gates[..., e] * (x A_e^T) B_e^T

    One function covers a plain LoRA (E=1, gates None), a gated multi-LoRA (K adapters, per-sample
    or per-token gates; pad different ranks to the largest with zero rows/columns) and a MoE-LoRA (a
    shared expert is one more expert with gate 1; top-k routing gives gates that are mostly exactly
    zero, which the Triton path skips tile by tile when E * r is large).

    Args:
        x: (..., K) activations; any strides.
        weight: (N, K) base weight; bias: (N,) or None.
        lora_A: (E, r, K) down projections; lora_B: (E, N, r) up projections; r >= 1.
        gates: (..., E) per token, (B, E) per sample when x is (B, T, K), or None for all ones.
            float32 or x's dtype.
        scale: multiplier of the adapter sum (alpha / r for a classic LoRA).
        out: optional contiguous (..., N) tensor in x's dtype to write into; only without autograd.
        sparse_gate_grad: False (default): dL/dgates is exact everywhere, also where a gate is 0;
            that needs every expert's low-rank code, so while gates require grad the Triton path
            skips unused experts only in the up projection. True: dL/dgates is 0 wherever
            gates == 0 -- what a top-k router's scatter or mask discards anyway -- and training
            skips unused experts as inference does.

    Returns:
        (..., N) tensor in x's dtype; differentiable w.r.t. x, weight, bias, lora_A, lora_B and gates.
    """
    shapes, gates = check_lora_inputs(x, weight, bias, lora_A, lora_B, gates, scale, out)
    if resolve_backend(x) == "torch":
        return lora_linear_dense(x, weight, bias, lora_A, lora_B, gates, scale, shapes, out, sparse_gate_grad)
    from kernels import triton_lora  # lazy: triton is imported only on this path

    return triton_lora.lora_linear_triton(
        x, weight, bias, lora_A, lora_B, gates, float(scale), shapes, out, sparse_gate_grad
    )
