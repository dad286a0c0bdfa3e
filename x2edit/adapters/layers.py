"""Adapter layers: a wrapper around a frozen ``base_layer`` holding named low-rank adapters.

``AdapterLinear`` wraps an ``nn.Linear`` (peft style) and keeps its adapters in a ``ModuleDict``
keyed by name: the X2Edit MoE-LoRA and any number of plain LoRAs (community LoRAs loaded beside
it). Every active adapter contributes stacked low-rank factors and per-token gates; the layer
concatenates them and makes ONE call to ``kernels.lora_linear``, which computes

    y = x W^T + b + sum_e gate[..., e] * (x A_e^T) B_e^T

fused with the base matmul where a fast kernel is available.

Routing inputs (task ids, timestep) do not flow through diffusers' forward signatures, so they are
set for the duration of one call by ``routing_context`` (see ``x2edit.adapters.inject``) as a
``RoutingState`` on each layer; outside such a context ``routing`` is None. The same state may carry
``adapter_gates``: per-sample gates for named adapters supplied from outside (the multi-LoRA fusion
of ``retrieval.fusion``), folded into the gates of the one kernel call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from x2edit.adapters.config import AdapterConfig
from x2edit.adapters.routers import TaskRouter, build_router


@dataclass
class RoutingState:
    """Inputs that routers read, and the auxiliary losses they produce, for one forward call.

    Args:
        task_ids: (B,) long tensor of task ids, one per sample of the batch.
        timestep: (B,) diffusion time in [0, 1], for timestep-dependent gates.
        aux_losses: router balance losses appended by each MoE layer during the call.
        adapter_gates: called by each layer with itself; returns {adapter name: (B,) gate}, a
            per-sample multiplier of that adapter's output in this layer (adapters not named keep
            theirs). How a gated fusion of several LoRAs reaches the layers, per layer and per step.
    """

    task_ids: torch.Tensor | None = None
    timestep: torch.Tensor | None = None
    aux_losses: list[torch.Tensor] = field(default_factory=list)
    adapter_gates: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None

    @property
    def balance_loss(self) -> torch.Tensor | None:
        """Mean router balance loss over the MoE layers that ran (None if none did)."""
        return torch.stack(self.aux_losses).mean() if self.aux_losses else None


def _init_lora_pair(A: torch.Tensor, B: torch.Tensor) -> None:
    # As peft: A ~ kaiming-uniform, B = 0, so a fresh adapter is an exact no-op.
    for a in A:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    nn.init.zeros_(B)


class LoRA(nn.Module):
    """A plain LoRA update ``scale * (x A^T) B^T`` stored as one stacked expert.

    Args:
        in_features, out_features: the wrapped linear's K and N.
        rank: r.
        scaling: alpha / r.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, scaling: float, config: AdapterConfig | None = None):
        super().__init__()
        self.config = config or AdapterConfig(kind="lora", rank=rank, alpha=scaling * rank)
        self.scaling = scaling
        self.lora_A = nn.Parameter(torch.empty(1, rank, in_features))  # (1, r, K)
        self.lora_B = nn.Parameter(torch.empty(1, out_features, rank))  # (1, N, r)
        _init_lora_pair(self.lora_A.data, self.lora_B.data)

    def factors(self, x: torch.Tensor, state: RoutingState | None):
        """(A (E, r, K), B (E, N, r), gates (..., E) or None for all-ones, scale)."""
        return self.lora_A, self.lora_B, None, self.scaling

    # No router: nothing needs the gradient of a gate.
    sparse_gates = True

    def delta_weight(self, task_id: int | None = None) -> torch.Tensor:
        """(N, K) weight update this adapter adds (float32)."""
        return self.scaling * (self.lora_B[0].float() @ self.lora_A[0].float())


class MoELoRA(nn.Module):
    """X2Edit's MoE-LoRA: E routed experts + optional shared expert, gated by a router.

    The shared expert is stored as the last row of the stacked factors with a constant gate of 1,
    so routed and shared experts go through the kernel in one call.
    """

    def __init__(self, in_features: int, out_features: int, config: AdapterConfig,
                 task_embedding: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.scaling = config.scaling
        self.num_routed = config.num_experts
        rows = config.num_experts + int(config.shared_expert)
        self.lora_A = nn.Parameter(torch.empty(rows, config.rank, in_features))  # (E[+1], r, K)
        self.lora_B = nn.Parameter(torch.empty(rows, out_features, config.rank))  # (E[+1], N, r)
        _init_lora_pair(self.lora_A.data, self.lora_B.data)
        self.router = build_router(config, in_features, task_embedding)

    @property
    def sparse_gates(self) -> bool:
        """True when top-k zeroes some gates: their gradient is discarded by the router's scatter, so
        the kernel may skip unselected experts in backward too."""
        return self.config.top_k is not None and self.config.top_k < self.config.num_experts

    def _with_shared(self, gates: torch.Tensor) -> torch.Tensor:
        if self.lora_A.shape[0] == self.num_routed:
            return gates
        return torch.cat([gates, gates.new_ones(*gates.shape[:-1], 1)], dim=-1)

    def factors(self, x: torch.Tensor, state: RoutingState | None):
        task_ids = None if state is None else state.task_ids
        if self.router.needs_task:
            if task_ids is None:
                raise ValueError("this MoE-LoRA routes by task: run the model inside "
                                 "x2edit.adapters.routing_context(model, task_ids=...); with gradient checkpointing, "
                                 "enable it by x2edit.adapters.enable_gradient_checkpointing(model) so that the "
                                 "routing reaches the recomputation in backward")
            if task_ids.shape[0] != x.shape[0]:
                raise ValueError(f"routing_context got {task_ids.shape[0]} task ids for a batch of {x.shape[0]}")
            task_ids = task_ids.to(x.device)
        x3 = x if x.dim() == 3 else x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, K)
        gates, aux = self.router(x3, task_ids)  # (B, T, E)
        if state is not None:
            state.aux_losses.append(aux)
        gates = self._with_shared(gates).reshape(*x.shape[:-1], -1)  # (..., E[+1])
        return self.lora_A, self.lora_B, gates, self.scaling

    def delta_weight(self, task_id: int | None = None) -> torch.Tensor:
        """(N, K) update for one task; only defined for the task router (constant gates)."""
        if not isinstance(self.router, TaskRouter):
            raise ValueError(f"a {type(self.router).__name__} gates each token differently, so its experts cannot "
                             "be merged into one weight; train with router='task' to merge or export")
        if task_id is None:
            raise ValueError("merging a task-routed MoE-LoRA needs the task to merge for")
        ids = torch.tensor([task_id], device=self.lora_A.device)
        gates = self._with_shared(self.router.task_gates(ids))[0]  # (E[+1],)
        return self.scaling * torch.einsum("e,enr,erk->nk", gates.float(), self.lora_B.float(), self.lora_A.float())


def _pad_rank(A: torch.Tensor, B: torch.Tensor, rank: int):
    r = A.shape[1]
    if r == rank:
        return A, B
    return F.pad(A, (0, 0, 0, rank - r)), F.pad(B, (0, rank - r))


def _times_sample_gate(gates: torch.Tensor | None, g: torch.Tensor, x: torch.Tensor, experts: int) -> torch.Tensor:
    """An adapter's gates (..., E) (None: all ones) times a per-sample gate ``g`` (B,), broadcast over tokens."""
    g = g.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))  # (B, 1, ..., 1)
    return (gates if gates is not None else x.new_ones(*x.shape[:-1], experts)) * g


def check_adapter_name(name) -> None:
    """Adapter names key a ModuleDict: no dots, not empty, and not one of nn.Module's own attributes."""
    if not isinstance(name, str) or not name or "." in name or hasattr(nn.ModuleDict, name):
        raise ValueError(f"invalid adapter name {name!r}: use a non-empty name without dots that is not an "
                         "nn.Module attribute (e.g. not 'eval', 'train' or 'to')")


class AdapterLinear(nn.Module):
    """A frozen ``nn.Linear`` plus named adapters, computed in one fused call.

    Attributes:
        base_layer: the wrapped linear (frozen).
        adapters: name -> ``LoRA`` | ``MoELoRA``.
        adapter_weights: name -> multiplier set by ``set_adapters`` (default 1.0).
        active_adapters: names used in forward, in order.
        merged: name -> task id it was merged for (None for plain LoRA); merged adapters are skipped.
        routing: the ``RoutingState`` of the current call, set by ``routing_context``.
    """

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"AdapterLinear wraps nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.adapter_weights: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged: dict[str, int | None] = {}
        self.routing: RoutingState | None = None

    in_features = property(lambda self: self.base_layer.in_features)
    out_features = property(lambda self: self.base_layer.out_features)
    weight = property(lambda self: self.base_layer.weight)
    bias = property(lambda self: self.base_layer.bias)

    def add_adapter(self, name: str, adapter: nn.Module, dtype: torch.dtype | None = None) -> None:
        """Add ``adapter`` under ``name`` on the base weight's device, in ``dtype`` (default: the base's).

        Training keeps adapters in float32 on a bf16/fp16 base (as peft's ``autocast_adapter_dtype``):
        the forward casts the factors to the activations' dtype, the optimizer updates float32 weights.
        """
        check_adapter_name(name)
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} is already loaded here; pick another adapter_name")
        w = self.base_layer.weight
        self.adapters[name] = adapter.to(device=w.device, dtype=dtype or (w.dtype if w.is_floating_point() else None))
        self.adapter_weights[name] = 1.0
        self.active_adapters.append(name)

    def delete_adapter(self, name: str, keep_merged: bool = False) -> None:
        """Remove adapter ``name``; a merged one must be unmerged first, unless ``keep_merged`` leaves its
        update baked into the base weight (diffusers' ``fuse_lora`` + ``unload_lora_weights``)."""
        if name in self.merged and not keep_merged:
            raise ValueError(f"adapter {name!r} is merged into the base weights: unmerge it first")
        self.merged.pop(name, None)
        del self.adapters[name]
        self.adapter_weights.pop(name)
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        names = [n for n in self.active_adapters if n not in self.merged and self.adapter_weights[n] != 0]
        if not names:
            return self.base_layer(x)
        sparse = all(self.adapters[n].sparse_gates for n in names)
        state = self.routing
        external = state.adapter_gates(self) if state is not None and state.adapter_gates is not None else {}
        terms = []
        for n in names:
            A, B, gates, scale = self.adapters[n].factors(x, self.routing)
            if n in external:  # a per-sample gate from outside (a multi-LoRA fusion), in the same call
                gates = _times_sample_gate(gates, external[n], x, A.shape[0])
            terms.append((A.to(x.dtype), B.to(x.dtype), gates, scale * self.adapter_weights[n]))
        if len(terms) == 1:
            A, B, gates, scale = terms[0]
        else:
            # Several adapters: stack them as experts of one call (ranks padded with zeros), with
            # each adapter's scale folded into its gates.
            rank = max(t[0].shape[1] for t in terms)
            lead = x.shape[:-1]
            As, Bs, Gs = [], [], []
            for A_, B_, g, s in terms:
                A_, B_ = _pad_rank(A_, B_, rank)
                As.append(A_)
                Bs.append(B_)
                Gs.append(g.to(x.dtype) * s if g is not None else x.new_full((*lead, A_.shape[0]), s))
            A, B, gates, scale = torch.cat(As), torch.cat(Bs), torch.cat(Gs, dim=-1), 1.0
        return kernels.lora_linear(x, self.base_layer.weight, self.base_layer.bias, A, B, gates, scale,
                                   sparse_gate_grad=sparse)

    # -- merging into the base weight ------------------------------------------------------
    @torch.no_grad()
    def merged_weight(self, name: str, task_id: int | None = None) -> torch.Tensor:
        """The base weight with adapter ``name``'s update added (float32), checked finite; writes nothing."""
        if name in self.merged:
            raise ValueError(f"adapter {name!r} is already merged")
        delta = self.adapters[name].delta_weight(task_id) * self.adapter_weights[name]
        merged = self.base_layer.weight.float() + delta.to(self.base_layer.weight.device)
        if not torch.isfinite(merged).all():
            raise ValueError(f"merging adapter {name!r} gives non-finite weights; the adapter is corrupt")
        return merged

    @torch.no_grad()
    def merge(self, name: str, task_id: int | None = None) -> None:
        """Add adapter ``name``'s update (for ``task_id``) into the base weight, checked finite."""
        w = self.base_layer.weight
        w.copy_(self.merged_weight(name, task_id).to(w.dtype))
        self.merged[name] = task_id

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        """Subtract a merged adapter's update again."""
        if name not in self.merged:
            raise ValueError(f"adapter {name!r} is not merged")
        task_id = self.merged.pop(name)
        delta = self.adapters[name].delta_weight(task_id) * self.adapter_weights[name]
        w = self.base_layer.weight
        w.copy_((w.float() - delta.to(w.device)).to(w.dtype))

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, active={self.active_adapters}, merged={list(self.merged)}"
