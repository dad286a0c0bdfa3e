"""The one dispatch point: `lora_linear` chooses a backend for every call.

Backends (each computes the same function; the tests hold them to the float64 reference):
  "torch"       `x2edit.kernels.reference`: two einsums; the ground truth, and what CPU tensors get
  "addmm"       `x2edit.kernels.torch_lora`: cuBLAS base matmul, then the low-rank term added in place
  "merge"       `x2edit.kernels.torch_lora`: the adapters merged into the weight for this call (gates None
                or per sample), then one cuBLAS matmul
  "triton"      `x2edit.kernels.triton_lora`: shrink kernel + one matmul kernel with the low-rank epilogue
  "triton_tma"  the same with the Hopper matmul kernel (`x2edit.kernels.triton_tma`: tensor-memory
                descriptors, persistent tiles); off in "auto" until a measured table row picks it

Setting, in order of precedence: `set_backend(name)` / `with use_backend(name):`, the environment
variable X2EDIT_KERNELS (read when this module is imported), else "auto". A forced backend that
cannot run a call is an error, never a silent fallback; forcing a Triton backend on CPU tensors is
allowed under TRITON_INTERPRET=1, which is how CI runs the kernels without a GPU.

"auto", per call (`resolve_backend`):
  1. CPU tensors, or a dtype other than float16/bfloat16/float32: "torch".
  2. CUDA: the table measured on this GPU and shipped in `x2edit/kernels/measured/<gpu-name>.json`, when it
     has a row for this call's gate kind, layer shape, token count (within 1.5x), rank space (within
     2x) and x2edit/training/inference; a row names the backend that measured fastest there.
  3. Otherwise (and on GPUs without a table) the rule, torch paths only:
       "merge" if the gates are None or per sample, nothing needs a gradient and
               `merge_is_cheaper` says so (its constants are the GPU table's, or the defaults);
       "addmm" otherwise.
  Triton is taken only where a table row measured it faster than the torch paths. On an H200
  (2026-11-28) the portable Triton kernels were 1.2-3.4x the base matmul where the torch paths were
  1.14-1.30x (x2edit/kernels/measured/nvidia-h200.json), so no shipped row picks them yet.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from x2edit.kernels.checks import LoRAShapes, check_lora_inputs
from x2edit.kernels.env import device_name, device_slug, interpreter_enabled, is_hopper, triton_available
from x2edit.kernels.reference import lora_linear_dense
from x2edit.kernels.torch_lora import lora_linear_addmm, lora_linear_merge

BACKENDS = ("auto", "torch", "addmm", "merge", "triton", "triton_tma")
TRITON_BACKENDS = ("triton", "triton_tma")
# Dtypes the fast paths are written and tested for; float64 and others use the reference.
FAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_DTYPES = FAST_DTYPES
ENV_VAR = "X2EDIT_KERNELS"
# Shipped measurements, one file per GPU name: x2edit/kernels/measured/<device_slug(name)>.json.
MEASURED_DIR = Path(__file__).resolve().parent / "measured"


def _validate_backend(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"kernels: unknown backend {name!r} from {source}; choose one of {BACKENDS}")
    return name


_backend = _validate_backend(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", f"${ENV_VAR}")


def get_backend() -> str:
    """The current backend setting: "auto" or one of the backends."""
    return _backend


def set_backend(name: str) -> None:
    """Set the backend for every later `lora_linear` call in this process.

    Args:
        name: "auto", "torch", "addmm", "merge", "triton" or "triton_tma".
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


# --------------------------------------------------------------------------------------------------
# The cost rule: merge the adapters into the weight, or add the low-rank term to the output?


@dataclass(frozen=True)
class CostModel:
    """Extra time over the base matmul of the two torch paths, from bytes and FLOPs.

    addmm pays, per call: a pass over x for the shrink (M K), one read and write of y for the
    in-place add (2 M N) and the low-rank FLOPs 2 M R (K + N). merge pays, per distinct weight: a read
    of W and a write of W' (2 N K) and 2 N K R FLOPs. The bandwidths are effective ones fitted to the
    H200 measurements (`x2edit/kernels/measured/nvidia-h200.json`): the skinny products (inner size R) run
    well below the copy bandwidth, merge's more so.
    """

    addmm_bandwidth: float = 2.5e12  # bytes/s
    merge_bandwidth: float = 1.4e12  # bytes/s
    flops: float = 7.0e14  # FLOP/s of the low-rank products

    def addmm_extra_s(self, M: int, K: int, N: int, R: int, itemsize: int) -> float:
        return itemsize * (M * K + 2 * M * N + M * R) / self.addmm_bandwidth + 2 * M * R * (K + N) / self.flops

    def merge_extra_s(self, K: int, N: int, R: int, itemsize: int, weights: int = 1) -> float:
        return weights * (itemsize * 2 * N * K / self.merge_bandwidth + 2 * N * K * R / self.flops)


DEFAULT_COST = CostModel()


def merge_is_cheaper(
    M: int, K: int, N: int, R: int, itemsize: int = 2, weights: int = 1, calls: int = 1,
    cost: CostModel = DEFAULT_COST,
) -> bool:  # fmt: skip
    """Whether merging the adapters into the weight beats adding the low-rank term to the output.

    Args:
        M: tokens per call; K, N: the layer's in and out features; R: the rank space E * r.
        itemsize: bytes per element of the activations and weights.
        weights: distinct merged weights needed (one per sample for per-sample gates).
        calls: calls that reuse the merged weights (1 per call; the steps of a denoising loop for a
            merge kept for the whole loop, as `x2edit.adapters.static_merge` does).
    """
    return cost.merge_extra_s(K, N, R, itemsize, weights) < calls * cost.addmm_extra_s(M, K, N, R, itemsize)


# --------------------------------------------------------------------------------------------------
# Measured tables, per GPU name


@dataclass(frozen=True)
class TableRow:
    """One measured call shape and the backend that was fastest there."""

    gates: str  # "none" | "sample" | "token"
    K: int
    N: int
    M: int
    R: int
    backend: str
    grad: bool = False  # measured as a training step (forward + backward)
    blocks: int = 1
    ms: dict = field(default_factory=dict, compare=False)  # the measured times, for the record

    def matches(self, kind: str, K: int, N: int, M: int, R: int, grad: bool, blocks: int) -> bool:
        return (
            (self.gates, self.K, self.N, self.grad, self.blocks) == (kind, K, N, grad, blocks)
            and abs(math.log(M / self.M)) <= math.log(1.5)
            and abs(math.log(R / self.R)) <= math.log(2.0)
        )


@dataclass(frozen=True)
class GpuTable:
    """What was measured on one GPU model: the rule's cost constants and the per-shape rows."""

    gpu: str
    cost: CostModel = DEFAULT_COST
    rows: tuple[TableRow, ...] = ()
    source: str = ""

    def lookup(self, kind: str, K: int, N: int, M: int, R: int, grad: bool, blocks: int) -> TableRow | None:
        """The matching row nearest in token count, then rank space, or None."""
        if M == 0:
            return None
        found = [row for row in self.rows if row.matches(kind, K, N, M, R, grad, blocks)]
        if not found:
            return None
        return min(found, key=lambda row: (abs(math.log(M / row.M)), abs(math.log(R / row.R))))

    @classmethod
    def from_dict(cls, data: dict) -> GpuTable:
        for row in data.get("rows", ()):
            if row.get("backend") not in BACKENDS[1:]:
                raise ValueError(f"measured table for {data.get('gpu')!r}: unknown backend in row {row}")
        return cls(
            gpu=data["gpu"], cost=CostModel(**data.get("cost", {})), source=data.get("source", ""),
            rows=tuple(TableRow(**row) for row in data.get("rows", ())),
        )  # fmt: skip


@functools.cache
def gpu_table(name: str) -> GpuTable | None:
    """The shipped table for GPU `name` ("NVIDIA H200"), or None for a GPU nobody measured."""
    path = MEASURED_DIR / f"{device_slug(name)}.json"
    if not path.is_file():
        return None
    return GpuTable.from_dict(json.loads(path.read_text()))


def cost_model(device: torch.device) -> CostModel:
    """The cost rule's constants for `device`: its GPU's measured table's, else the defaults."""
    table = gpu_table(device_name(device)) if device.type == "cuda" else None
    return table.cost if table is not None else DEFAULT_COST


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def auto_backend(
    shapes: LoRAShapes, itemsize: int, grad: bool, table: GpuTable | None, hopper: bool = False
) -> str:
    """What "auto" picks on a CUDA device with measured table `table` (None: an unknown GPU).

    Pure: no tensor is read, so the rule is tested without a GPU.
    """
    kind, K, N, M, R = shapes.gate_kind, shapes.K, shapes.N, shapes.M, shapes.R
    if table is not None:
        row = table.lookup(kind, K, N, M, R, grad, shapes.blocks)
        usable = row is not None and (
            row.backend not in TRITON_BACKENDS
            or (triton_available() and (row.backend != "triton_tma" or hopper))
        )
        if usable and (row.backend != "merge" or (kind != "token" and not grad)):
            return row.backend
    cost = table.cost if table is not None else DEFAULT_COST
    if kind != "token" and not grad:
        weights = shapes.lead[0] if kind == "sample" else 1
        if merge_is_cheaper(M, K, N, R, itemsize, weights=weights, cost=cost):
            return "merge"
    return "addmm"


def resolve_backend(
    x: torch.Tensor, shapes: LoRAShapes | None = None, grad: bool = False
) -> str:
    """The backend a call with activations `x` (and validated sizes `shapes`) takes now.

    Without `shapes`, "auto" on CUDA answers for a plain LoRA of rank 16 on a square layer of
    x's width (the rule's most common case).

    Raises:
        ImportError: a Triton backend is forced and triton is not installed.
        RuntimeError: a backend is forced for a call it cannot run.
    """
    setting = get_backend()
    if setting == "auto":
        if not x.is_cuda or x.dtype not in FAST_DTYPES:
            return "torch"
        if shapes is None:
            K = x.shape[-1] if x.ndim else 1
            shapes = LoRAShapes(lead=tuple(x.shape[:-1]), M=max(1, x.numel() // max(K, 1)), K=K, N=K, E=1, r=16)
        return auto_backend(shapes, x.element_size(), grad, gpu_table(device_name(x.device)), is_hopper(x.device))
    if setting in ("torch", "addmm"):
        return setting
    if setting == "merge":
        if shapes is not None and shapes.gate_kind == "token":
            raise RuntimeError(
                "kernels backend 'merge' is forced but the gates change per token: merging needs gates that "
                "are None or per sample ((B, E) for x (B, T, K)); use 'addmm' or 'auto'"
            )
        return setting
    # A Triton backend: refuse loudly rather than fall back.
    if not triton_available():
        raise ImportError(
            f"kernels backend {setting!r} is forced but triton is not installed: pip install 'x2edit[triton]', "
            "or set_backend('auto')"
        )
    if x.dtype not in TRITON_DTYPES:
        raise RuntimeError(
            f"kernels backend {setting!r} supports {[str(d) for d in TRITON_DTYPES]}, got {x.dtype}; use "
            "set_backend('torch') for other dtypes"
        )
    if not x.is_cuda and not interpreter_enabled():
        raise RuntimeError(
            f"kernels backend {setting!r} needs CUDA tensors (x is on {x.device}); on CPU it runs only "
            "under the Triton interpreter (set TRITON_INTERPRET=1 before triton is imported)"
        )
    if setting == "triton_tma" and x.is_cuda and not is_hopper(x.device):
        raise RuntimeError(
            f"kernels backend 'triton_tma' needs a Hopper GPU (compute capability 9.x) for its tensor-memory "
            f"descriptors; {device_name(x.device)} is not one: use 'triton' or 'auto'"
        )
    return setting


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
    out_blocks: int = 1,
) -> torch.Tensor:
    """Linear layer with E gated low-rank adapters, on the fastest backend for this call.

    y = x W^T + b + scale * sum_e gates[..., e] * (x A_e^T) B_e^T

    One function covers a plain LoRA (E=1, gates None), a gated multi-LoRA (K adapters, per-sample
    or per-token gates; pad different ranks to the largest with zero rows/columns) and a MoE-LoRA (a
    shared expert is one more expert with gate 1; top-k routing gives gates that are mostly exactly
    zero, which the Triton path skips tile by tile when E * r is large). Block-stacked adapters of a
    fused projection (diffusers' `fuse_qkv_projections`: q, k, v in one linear) are one call with
    `out_blocks=3`: the adapters of q, then k, then v, each group reaching its third of the outputs.

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
        out_blocks: P >= 1 equal output blocks; adapters j * E / P ... (j + 1) * E / P - 1 reach only
            output block j, and lora_B is (E, N / P, r). P must divide N and E.

    Returns:
        (..., N) tensor in x's dtype; differentiable w.r.t. x, weight, bias, lora_A, lora_B and gates.
    """
    shapes, gates = check_lora_inputs(x, weight, bias, lora_A, lora_B, gates, scale, out, out_blocks)
    backend = resolve_backend(x, shapes, _needs_grad(x, weight, bias, lora_A, lora_B, gates))
    args = (x, weight, bias, lora_A, lora_B, gates, float(scale), shapes, out, sparse_gate_grad)
    if backend == "torch":
        return lora_linear_dense(*args)
    if backend == "addmm":
        return lora_linear_addmm(*args)
    if backend == "merge":
        return lora_linear_merge(*args)
    from x2edit.kernels import triton_lora  # lazy: triton is imported only on this path

    return triton_lora.lora_linear_triton(*args, tma=backend == "triton_tma")
