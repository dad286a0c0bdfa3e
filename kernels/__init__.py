"""Fused LoRA / gated multi-LoRA / MoE-LoRA linear kernels with one dispatch point.

    from kernels import lora_linear
    y = lora_linear(x, weight, bias, lora_A, lora_B, gates, scale)
    # y = x W^T + b + scale * sum_e gates[..., e] * (x A_e^T) B_e^T

`lora_linear` runs the Triton kernels (`kernels.triton_lora`) on CUDA when triton is installed, and
the torch reference (`kernels.reference`) otherwise; `set_backend` / `use_backend` / the
X2EDIT_KERNELS environment variable force either. triton is imported only when its path is taken.
"""

from kernels.dispatch import (
    BACKENDS,
    get_backend,
    lora_linear,
    resolve_backend,
    set_backend,
    triton_available,
    use_backend,
)
from kernels.reference import lora_linear_reference, moe_lora_loop_reference

__all__ = [
    "BACKENDS",
    "get_backend",
    "lora_linear",
    "lora_linear_reference",
    "moe_lora_loop_reference",
    "resolve_backend",
    "set_backend",
    "triton_available",
    "use_backend",
]
