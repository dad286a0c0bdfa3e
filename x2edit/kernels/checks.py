"""Input validation shared by every backend of `lora_linear`.

The checks run once, at the public boundary, so that the torch reference and the Triton kernels see
the same, already-validated arguments and a bad call fails the same way on both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Gates may be kept in float32 (as routers usually produce them) even when the activations are half.
GATE_DTYPES_EXTRA = (torch.float32,)


@dataclass(frozen=True)
class LoRAShapes:
    """Sizes of one `lora_linear` call, after validation."""

    lead: tuple[int, ...]  # x's leading dims; the output is (*lead, N)
    M: int  # number of tokens, prod(lead)
    K: int  # input features
    N: int  # output features
    E: int  # adapters / experts
    r: int  # rank of each adapter
    gates_per_sample: bool = False  # gates were given as (B, E) for x (B, T, K)
    blocks: int = 1  # output blocks (q, k, v of a fused projection); adapter group j writes block j only
    has_gates: bool = False  # False: every gate is 1

    @property
    def gate_kind(self) -> str:
        """"none" (all ones), "sample" (one gate vector per sample) or "token" (one per token)."""
        if not self.has_gates:
            return "none"
        return "sample" if self.gates_per_sample else "token"

    @property
    def R(self) -> int:
        """Width of the rank space, E * r."""
        return self.E * self.r


def _name_shape(name: str, t: torch.Tensor) -> str:
    return f"{name} {tuple(t.shape)} {t.dtype} on {t.device}"


def check_lora_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    gates: torch.Tensor | None,
    scale: float,
    out: torch.Tensor | None,
    out_blocks: int = 1,
) -> tuple[LoRAShapes, torch.Tensor | None]:
    """Validate a `lora_linear` call and return its sizes and the per-token gates.

    Gates of shape (B, E) for an x of shape (B, T, K) (one gate vector per sample) are expanded
    here to per-token gates (B, T, E) with `expand`, so autograd sums their gradient over T.
    `out_blocks` > 1 splits the N outputs and the E adapters into that many equal groups, adapter
    group j writing output block j only; lora_B is then (E, N / out_blocks, r).

    Returns:
        (shapes, gates) where gates is None or has shape (*lead, E).
    """
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"lora_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"lora_linear: x must be a floating-point tensor, got {_name_shape('x', x)}")
    if x.ndim < 1:
        raise ValueError("lora_linear: x must have at least one dimension (..., K)")
    if weight.ndim != 2:
        raise ValueError(f"lora_linear: weight must be (N, K), got {_name_shape('weight', weight)}")
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(
            f"lora_linear: x's last dim must equal weight's in_features: {_name_shape('x', x)} vs "
            f"{_name_shape('weight', weight)}"
        )
    if lora_A.ndim != 3 or lora_B.ndim != 3:
        raise ValueError(
            "lora_linear: lora_A must be (E, r, K) and lora_B (E, N, r) (stack a single adapter with "
            f"unsqueeze(0)); got {_name_shape('lora_A', lora_A)}, {_name_shape('lora_B', lora_B)}"
        )
    if isinstance(out_blocks, bool) or not isinstance(out_blocks, int) or out_blocks < 1:
        raise TypeError(f"lora_linear: out_blocks must be a positive int, got {out_blocks!r}")
    E, r, K_a = lora_A.shape
    if out_blocks > 1 and E >= 1 and (N % out_blocks or E % out_blocks):
        raise ValueError(
            f"lora_linear: out_blocks={out_blocks} must divide both the output features N={N} and the number "
            f"of adapters E={E} (pad each block's adapters to the same count with zero adapters)"
        )
    Nb = N // out_blocks
    if E < 1:
        raise ValueError("lora_linear: need at least one adapter (lora_A.shape[0] >= 1)")
    if r < 1:
        raise ValueError(
            "lora_linear: rank must be >= 1 (lora_A.shape[1] == 0); for a layer without an adapter "
            "call torch.nn.functional.linear"
        )
    if K_a != K or tuple(lora_B.shape) != (E, Nb, r):
        blocks = f", out_blocks={out_blocks}" if out_blocks > 1 else ""
        raise ValueError(
            f"lora_linear: adapter shapes do not match the base layer (N={N}, K={K}{blocks}): expected lora_A "
            f"({E}, {r}, {K}) and lora_B ({E}, {Nb}, {r}), got {_name_shape('lora_A', lora_A)} and "
            f"{_name_shape('lora_B', lora_B)}"
        )
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (N,)):
        shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"lora_linear: bias must be None or ({N},), got {shape}")

    # One dtype for every matmul operand: mixing would make the kernels silently cast.
    for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(
                f"lora_linear: {name} has dtype {t.dtype} but x has {x.dtype}; cast the adapter to the "
                "base layer's dtype (x, weight, bias, lora_A, lora_B must agree)"
            )
    for name, t in (
        ("weight", weight),
        ("lora_A", lora_A),
        ("lora_B", lora_B),
        ("bias", bias),
        ("gates", gates),
    ):
        if t is not None and t.device != x.device:
            raise ValueError(f"lora_linear: {name} is on {t.device} but x is on {x.device}")
    if isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)):
        raise TypeError(f"lora_linear: scale must be a Python number, got {type(scale).__name__}")

    lead = tuple(x.shape[:-1])
    per_sample = False
    if gates is not None:
        if not isinstance(gates, torch.Tensor):
            raise TypeError(f"lora_linear: gates must be a tensor or None, got {type(gates).__name__}")
        if gates.dtype != x.dtype and gates.dtype not in GATE_DTYPES_EXTRA:
            raise TypeError(f"lora_linear: gates must be float32 or x's dtype {x.dtype}, got {gates.dtype}")
        if tuple(gates.shape) == (*lead, E):
            pass
        elif x.ndim == 3 and tuple(gates.shape) == (x.shape[0], E):
            gates = gates[:, None, :].expand(x.shape[0], x.shape[1], E)  # per sample -> per token
            per_sample = True
        else:
            raise ValueError(
                f"lora_linear: gates must be (*x.shape[:-1], E) = {(*lead, E)} per token, or (B, E) per "
                f"sample for x of shape (B, T, K); got {tuple(gates.shape)}"
            )

    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"lora_linear: out must be a tensor or None, got {type(out).__name__}")
        if tuple(out.shape) != (*lead, N) or out.dtype != x.dtype or out.device != x.device:
            raise ValueError(
                f"lora_linear: out must be {(*lead, N)} {x.dtype} on {x.device}, got {_name_shape('out', out)}"
            )
        if not out.is_contiguous():
            raise ValueError("lora_linear: out must be contiguous")
        if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias, lora_A, lora_B, gates)
        ):
            raise RuntimeError(
                "lora_linear: out= does not support autograd (an input requires grad); call without out= "
                "or under torch.no_grad()"
            )

    M = 1
    for d in lead:
        M *= d
    shapes = LoRAShapes(lead=lead, M=M, K=K, N=N, E=E, r=r, gates_per_sample=per_sample, blocks=out_blocks,
                        has_gates=gates is not None)  # fmt: skip
    return shapes, gates
