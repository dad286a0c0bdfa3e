"""Fused LoRA / gated multi-LoRA / MoE-LoRA linear kernels with one dispatch point.

    from x2edit.kernels import lora_linear
    y = lora_linear(x, weight, bias, lora_A, lora_B, gates, scale)
    # y = x W^T + b + scale * sum_e gates[..., e] * (x A_e^T) B_e^T

`lora_linear` validates its arguments and takes one backend per call (`x2edit.kernels.dispatch`): on CUDA
the fastest path measured for this GPU and call shape (plain torch: cuBLAS plus an in-place low-rank
add, or the adapters merged into the weight for the call; Triton where a shipped table row measured
it faster), the torch reference (`x2edit.kernels.reference`) on CPU. `set_backend` / `use_backend` / the
X2EDIT_KERNELS environment variable force one. triton is imported only when its path is taken.
"""

from x2edit.kernels.dispatch import (
    BACKENDS,
    CostModel,
    cost_model,
    get_backend,
    lora_linear,
    merge_is_cheaper,
    resolve_backend,
    set_backend,
    triton_available,
    use_backend,
)
from x2edit.kernels.reference import lora_linear_reference, moe_lora_loop_reference

__all__ = [
    "BACKENDS",
    "CostModel",
    "cost_model",
    "get_backend",
    "lora_linear",
    "lora_linear_reference",
    "merge_is_cheaper",
    "moe_lora_loop_reference",
    "resolve_backend",
    "set_backend",
    "triton_available",
    "use_backend",
]
