"""Adapter layers: a wrapper around a frozen ``base_layer`` holding named low-rank adapters.

``AdapterLinear`` wraps an ``nn.Linear`` (peft style) and keeps its adapters in a ``ModuleDict``
keyed by name: the X2Edit MoE-LoRA and any number of plain LoRAs (community LoRAs loaded beside
it). Every active adapter contributes stacked low-rank factors and per-token gates; the layer
concatenates them and makes ONE call to ``x2edit.kernels.lora_linear``, which computes

    y = x W^T + b + sum_e gate[..., e] * (x A_e^T) B_e^T

fused with the base matmul where a fast kernel is available.

Routing inputs (task ids, timestep) do not flow through diffusers' forward signatures, so they are
set for the duration of one call by ``routing_context`` (see ``x2edit.adapters.inject``) as a
``RoutingState`` on each layer; outside such a context ``routing`` is None. The same state may carry
``adapter_gates``: per-sample gates for named adapters supplied from outside (the multi-LoRA fusion
of ``x2edit.retrieval.fusion``), folded into the gates of the one kernel call.

A ``DoRA`` (PEFT's weight-decomposed LoRA) is not low-rank: it is folded into the call's weight (once per
``static_merge`` block); a LoRA's bias (PEFT's ``lora_bias``) joins the call's bias.

Static adapters (a plain LoRA, a task-routed MoE-LoRA while every sample has the same task) can be
folded into a transient copy of the base weight for the length of a ``static_merge`` block, when the
cost rule of ``x2edit.kernels.merge_is_cheaper`` says that beats adding their low-rank term at every call;
the base weight itself is never written. ``FusedAdapterLinear`` is diffusers' fused q/k/v projection
carrying the adapters of the three projections it replaced, computed in one kernel call with
block-stacked factors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from x2edit import kernels
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

    def single_task(self) -> int | None:
        """The task id when every sample of the call has the same one, else None (read once per state)."""
        if not hasattr(self, "_single_task"):
            ids = [] if self.task_ids is None else self.task_ids.flatten().tolist()
            self._single_task = ids[0] if ids and all(i == ids[0] for i in ids) else None
        return self._single_task

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
        bias: give B a bias b (N,) (PEFT's ``lora_bias=True``): the update is then
            ``scale * ((x A^T) B^T + b)``, b scaled with the rest as PEFT's ``lora_B(lora_A(x)) * scaling``.
            The layer adds it to its bias (see ``AdapterLinear``); ``delta_weight`` leaves it out.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, scaling: float, config: AdapterConfig | None = None,
                 bias: bool = False):
        super().__init__()
        self.config = config or AdapterConfig(kind="lora", rank=rank, alpha=scaling * rank)
        self.scaling = scaling
        self.lora_A = nn.Parameter(torch.empty(1, rank, in_features))  # (1, r, K)
        self.lora_B = nn.Parameter(torch.empty(1, out_features, rank))  # (1, N, r)
        self.register_parameter("lora_bias", nn.Parameter(torch.zeros(out_features)) if bias else None)  # (N,)
        _init_lora_pair(self.lora_A.data, self.lora_B.data)

    def factors(self, x: torch.Tensor, state: RoutingState | None):
        """(A (E, r, K), B (E, N, r), gates (..., E) or None for all-ones, scale)."""
        return self.lora_A, self.lora_B, None, self.scaling

    # No router: nothing needs the gradient of a gate.
    sparse_gates = True

    def delta_weight(self, task_id: int | None = None) -> torch.Tensor:
        """(N, K) weight update this adapter adds (float32)."""
        return self.scaling * (self.lora_B[0].float() @ self.lora_A[0].float())


class DoRA(LoRA):
    """PEFT's DoRA (``use_dora``): a LoRA whose updated weight is scaled, row by row, to a learned
    magnitude m (N,):

        W' = m / ||W + s B A||_row * (W + s B A)          (the row norm a constant: detached)

    with W the layer's base weight; PEFT computes the same as base(x) + (m/n - 1) x W^T + (m/n) s (x A^T) B^T.
    The multiplier of ``set_adapters`` and a call's scale multiply s inside the norm too (PEFT scales its
    ``scaling``); at multiplier 0 the layer skips it (PEFT would still apply m / ||W||). Not a low-rank
    term: the layer folds it into the call's weight (once per ``static_merge`` block), with the LoRAs
    before it in the active order, whose outputs it rescales as PEFT's forward does; ``merge`` writes W'.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, scaling: float, config: AdapterConfig | None = None):
        super().__init__(in_features, out_features, rank, scaling, config)
        self.magnitude = nn.Parameter(torch.ones(out_features))  # m, (N,)
        object.__setattr__(self, "_layer", None)  # the AdapterLinear holding it: kept out of the module registry

    def factors(self, x: torch.Tensor, state: RoutingState | None):
        raise RuntimeError("a DoRA is not a low-rank term: its layer folds it into the weight")

    def merge_into(self, weight: torch.Tensor, base: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
        """(N, K) float32: ``weight`` (float32, the weight so far) with this DoRA applied at ``multiplier``
        times its scale; the row norm is taken on ``base`` (the layer's base weight, (N, K)) plus s B A."""
        ba = (self.scaling * multiplier) * (self.lora_B[0].float() @ self.lora_A[0].float())  # (N, K)
        norm = torch.linalg.norm(base.to(ba.device).float() + ba, dim=1).detach()  # (N,)
        return (self.magnitude.float() / norm)[:, None] * (weight + ba)

    def delta_weight(self, task_id: int | None = None) -> torch.Tensor:
        """(N, K) float32 W' - W on the layer's unmerged base weight (not linear in the multiplier)."""
        if self._layer is None:
            raise ValueError("a DoRA's update depends on its layer's base weight: add it to an AdapterLinear first")
        base = self._layer.unmerged_weight().float()
        return self.merge_into(base, base) - base


def _beyond_low_rank(adapter: nn.Module) -> bool:
    """A DoRA or a LoRA with a bias: more than a low-rank term, run by ``AdapterLinear``'s general path."""
    return isinstance(adapter, DoRA) or getattr(adapter, "lora_bias", None) is not None


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
        if isinstance(self.router, TaskRouter) and x.dim() == 3:
            # Constant over the tokens of a sample: hand the kernel (B, E[+1]) per-sample gates, so
            # the dispatch may merge them into the weight.
            return self.lora_A, self.lora_B, self._with_shared(gates[:, 0]), self.scaling
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


def _stack_terms(terms: list[tuple], x: torch.Tensor) -> tuple:
    """One (A, B, gates, scale) for several adapters' (A, B, gates, scale): experts stacked, ranks
    padded with zeros, each adapter's scale folded into its gates. Gates stay per sample, (B, E) for x
    (B, T, K), when no adapter gates per token."""
    if len(terms) == 1:
        return terms[0]
    rank = max(t[0].shape[1] for t in terms)
    per_sample = x.dim() == 3 and all(g is None or g.dim() == 2 for _, _, g, _ in terms)
    lead = (x.shape[0],) if per_sample else x.shape[:-1]
    As, Bs, Gs = [], [], []
    for A, B, g, s in terms:
        A, B = _pad_rank(A, B, rank)
        As.append(A)
        Bs.append(B)
        if g is None:
            Gs.append(x.new_full((*lead, A.shape[0]), s))
        else:
            if not per_sample and x.dim() == 3 and g.dim() == 2:  # per sample beside per token
                g = g[:, None, :].expand(*x.shape[:-1], g.shape[-1])
            Gs.append(g.to(x.dtype) * s)
    return torch.cat(As), torch.cat(Bs), torch.cat(Gs, dim=-1), 1.0


def _adapter_task(adapter: nn.Module, routing: RoutingState | None) -> tuple[bool, int | None]:
    """(static, task id): whether ``adapter``'s update is one constant weight for the current call.

    A plain LoRA always is (task None); a task-routed MoE-LoRA while every sample routes to the same
    task. Not while its parameters need gradients (merging would cost a full dW), and never for the
    residual reading (see ``AdapterConfig.mergeable``).
    """
    if not adapter.config.mergeable:
        return False, None
    if torch.is_grad_enabled() and any(p.requires_grad for p in adapter.parameters()):
        return False, None
    if isinstance(adapter, LoRA):
        return True, None
    task = None if routing is None else routing.single_task()
    return (task is not None), task


class StaticMerge:
    """The merged weights of one ``static_merge`` block, built at each layer's first call.

    Args:
        calls: calls expected while the block is open (the denoising steps of a pipeline call): the
            cost rule weighs one merge against that many low-rank additions.
    """

    def __init__(self, calls: int = 1):
        if not isinstance(calls, int) or calls < 1:
            raise ValueError(f"static_merge: calls must be a positive int, got {calls!r}")
        self.calls = calls
        self._weights: dict[int, tuple[tuple, torch.Tensor | None]] = {}  # id(layer) -> (key, merged or None)

    def weight(self, layer: nn.Module, key: tuple, x: torch.Tensor, R: int, build,
               always: bool = False) -> torch.Tensor | None:
        """The merged weight for ``key`` (built by ``build()`` once), or None where merging costs more.
        ``always``: merge whatever the cost (a DoRA is folded into the weight at each call otherwise)."""
        hit = self._weights.get(id(layer))
        if hit is not None and hit[0] == key:
            return hit[1]
        w = layer.base_layer.weight
        M = x.numel() // x.shape[-1]
        cheaper = always or kernels.merge_is_cheaper(M, w.shape[1], w.shape[0], R, w.element_size(), calls=self.calls,
                                                     cost=kernels.cost_model(w.device))  # fmt: skip
        merged = build() if cheaper else None
        self._weights[id(layer)] = (key, merged)
        return merged


def _merged(base: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """base + deltas (float32) rounded once to the base's dtype, checked finite."""
    return _rounded(base.float() + deltas, base.dtype)


def _rounded(merged: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A merged float32 weight rounded once to ``dtype``, checked finite."""
    if not torch.isfinite(merged).all():
        raise ValueError("merging the static adapters gives non-finite weights; an adapter is corrupt")
    return merged.to(dtype)


def _times_sample_gate(gates: torch.Tensor | None, g: torch.Tensor, x: torch.Tensor, experts: int) -> torch.Tensor:
    """An adapter's gates (None: all ones; (B, E) per sample or (..., E) per token) times a per-sample gate
    ``g`` (B,): per sample, (B, E), where the adapter's own gates allow it (see ``_stack_terms``)."""
    g = g.to(x.dtype)
    if x.dim() == 3 and (gates is None or gates.dim() == 2):
        return (gates.to(x.dtype) if gates is not None else x.new_ones(x.shape[0], experts)) * g[:, None]
    g = g.reshape(-1, *([1] * (x.dim() - 1)))  # (B, 1, ..., 1)
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
        adapters: name -> ``LoRA`` | ``DoRA`` | ``MoELoRA``. A DoRA or a LoRA with a bias takes a general
            path (``_forward_general``); plain low-rank adapters keep the one fused kernel call.
        adapter_weights: name -> multiplier set by ``set_adapters`` (default 1.0).
        active_adapters: names used in forward, in order.
        merged: name -> task id it was merged for (None for plain LoRA); merged adapters are skipped.
        routing: the ``RoutingState`` of the current call, set by ``routing_context``.
        static: the ``StaticMerge`` of an open ``static_merge`` block, else None.
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
        self.static: StaticMerge | None = None  # set by x2edit.adapters.static_merge
        self._pre_merge: torch.Tensor | None = None  # the base weight before the first merge (CPU)
        self._pre_merge_bias: torch.Tensor | None = None  # and its bias (CPU), for LoRA biases merged into it

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
        if isinstance(adapter, DoRA):  # its update needs this layer's base weight
            object.__setattr__(adapter, "_layer", self)
        self.adapter_weights[name] = 1.0
        self.active_adapters.append(name)

    def delete_adapter(self, name: str, keep_merged: bool = False) -> None:
        """Remove adapter ``name``; a merged one must be unmerged first, unless ``keep_merged`` leaves its
        update baked into the base weight (diffusers' ``fuse_lora`` + ``unload_lora_weights``)."""
        if name in self.merged and not keep_merged:
            raise ValueError(f"adapter {name!r} is merged into the base weights: unmerge it first")
        if name in self.merged:  # baked in: the weight to restore on unmerging the others now holds it
            task = self.merged.pop(name)
            baked, baked_bias = self._weight_with({name: task}), self._bias_with({name: task})
            self._pre_merge = baked.to("cpu", self._pre_merge.dtype) if self.merged else None
            if self._pre_merge_bias is not None and baked_bias is not None and self.merged:
                self._pre_merge_bias = baked_bias.to("cpu", self._pre_merge_bias.dtype)
            elif not self.merged:
                self._pre_merge_bias = None
        del self.adapters[name]
        self.adapter_weights.pop(name)
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def _live(self) -> list[str]:
        """Active adapters that are not merged into the base weight and have a non-zero weight."""
        return [n for n in self.active_adapters if n not in self.merged and self.adapter_weights[n] != 0]

    def _external_gates(self) -> dict[str, torch.Tensor]:
        """{adapter name: (B,) gate} supplied from outside for this call (``RoutingState.adapter_gates``)."""
        state = self.routing
        return state.adapter_gates(self) if state is not None and state.adapter_gates is not None else {}

    def _terms(self, x: torch.Tensor, names: list[str]) -> list[tuple]:
        """(A, B, gates, scale) of each adapter in ``names``, factors in x's dtype."""
        terms, external = [], self._external_gates()
        for n in names:
            A, B, gates, scale = self.adapters[n].factors(x, self.routing)
            if n in external:  # a per-sample gate from outside (a multi-LoRA fusion), in the same call
                gates = _times_sample_gate(gates, external[n], x, A.shape[0])
            terms.append((A.to(x.dtype), B.to(x.dtype), gates, scale * self.adapter_weights[n]))
        return terms

    def _split_static(self, names: list[str]) -> tuple[list[tuple[str, int | None]], list[str]]:
        """Inside ``static_merge``: ([(name, task id)] merged for this call, [names] computed as usual)."""
        static, dynamic, external = [], [], self._external_gates()
        for n in names:
            ok, task = _adapter_task(self.adapters[n], self.routing)
            ok = ok and n not in external  # gated from outside: per sample, layer and step
            (static.append((n, task)) if ok else dynamic.append(n))
        return static, dynamic

    def static_delta(self, static: list[tuple[str, int | None]]) -> torch.Tensor:
        """(N, K) float32 sum of the updates of ``static`` [(name, task id)], with their weights."""
        delta = 0
        for n, task in static:
            delta = delta + self.adapters[n].delta_weight(task) * self.adapter_weights[n]
        return delta

    def static_key(self, static: list[tuple[str, int | None]]) -> tuple:
        """What a merged weight depends on: names, tasks, weights, and the adapters' parameter versions."""
        return tuple((n, task, self.adapter_weights[n], tuple(p._version for p in self.adapters[n].parameters()))
                     for n, task in static)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        names = self._live()
        if not names:
            return self.base_layer(x)
        if any(_beyond_low_rank(self.adapters[n]) for n in names):
            return self._forward_general(x, names)
        weight = self.base_layer.weight
        if self.static is not None:
            static, names = self._split_static(names)
            if static:
                R = sum(self.adapters[n].lora_A.shape[0] * self.adapters[n].lora_A.shape[1] for n, _ in static)
                merged = self.static.weight(
                    self, self.static_key(static), x, R,
                    lambda: _merged(self.base_layer.weight, self.static_delta(static)),
                )  # fmt: skip
                if merged is None:  # cheaper unmerged: compute them with the others
                    names = self._live()
                else:
                    weight = merged
            if not names:
                return F.linear(x, weight, self.base_layer.bias)
        sparse = all(self.adapters[n].sparse_gates for n in names)
        A, B, gates, scale = _stack_terms(self._terms(x, names), x)
        return kernels.lora_linear(x, weight, self.base_layer.bias, A, B, gates, scale, sparse_gate_grad=sparse)

    # -- DoRAs and LoRA biases -------------------------------------------------------------------
    def _forward_general(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """``forward`` with a DoRA or a LoRA bias among the live adapters ``names`` (the plain path above
        stays as it is for everything else).

        Weight: inside ``static_merge`` the static adapters are merged for the block as usual (always, with a
        DoRA among them); outside, a DoRA is folded into this call's weight together with the plain LoRAs
        around it, in the active order (``_compose``). Bias: each LoRA bias joins the base bias at its scale
        and weight (per sample when gated from outside). Routed or gated adapters then run on that weight
        and bias in one kernel call.
        """
        weight, external = self.base_layer.weight, self._external_gates()
        bias, extra = self._call_bias(x, names, external)
        rest = names
        if self.static is not None:
            static, rest = self._split_static(names)
            if static:
                R = sum(self.adapters[n].lora_A.shape[0] * self.adapters[n].lora_A.shape[1] for n, _ in static)
                dora = any(isinstance(self.adapters[n], DoRA) for n, _ in static)
                merged = self.static.weight(self, self.static_key(static), x, R, lambda: self._static_weight(static),
                                            always=dora)  # fmt: skip
                if merged is None:
                    rest = names
                else:
                    weight = merged
        if any(isinstance(self.adapters[n], DoRA) for n in rest):
            fold, rest = self._split_fold(rest, external)
            weight = _rounded(self._compose(weight.float(), self.base_layer.weight, fold), weight.dtype)
        if rest:
            sparse = all(self.adapters[n].sparse_gates for n in rest)
            A, B, gates, scale = _stack_terms(self._terms(x, rest), x)
            out = kernels.lora_linear(x, weight, bias, A, B, gates, scale, sparse_gate_grad=sparse)
        else:
            out = F.linear(x, weight, bias)
        return out if extra is None else out + extra

    def _call_bias(self, x: torch.Tensor, names: list[str], external: dict) -> tuple:
        """(bias (N,) for this call: the base bias plus scale * weight * b of each LoRA bias in ``names``,
        (B, 1, ..., N) per-sample term of the LoRA biases gated from outside, or None)."""
        bias, extra = self.base_layer.bias, None
        summed = None if bias is None else bias.float()
        for n in names:
            b = getattr(self.adapters[n], "lora_bias", None)
            if b is None:
                continue
            term = (self.adapters[n].scaling * self.adapter_weights[n]) * b.float()  # (N,)
            if n in external:
                g = external[n].float().reshape(-1, *([1] * (x.dim() - 1)))  # (B, 1, ..., 1)
                extra = g * term if extra is None else extra + g * term
            else:
                summed = term if summed is None else summed + term
        bias = None if summed is None else summed.to(x.dtype)
        return bias, None if extra is None else extra.to(x.dtype)

    def _split_fold(self, names: list[str], external: dict) -> tuple[list[tuple], list[str]]:
        """([(name, None, multiplier)] folded into this call's weight, [names] left to the kernel): the LoRAs
        and DoRAs, in order, but not a plain LoRA gated from outside (per sample: it stays low-rank)."""
        fold, rest = [], []
        for n in names:
            adapter = self.adapters[n]
            if not isinstance(adapter, LoRA) or (n in external and not isinstance(adapter, DoRA)):
                rest.append(n)
                continue
            multiplier = self.adapter_weights[n]
            if n in external:  # one weight for the call: one gate for all samples
                g = external[n].flatten()
                if not bool((g == g[0]).all()):
                    raise ValueError(f"DoRA {n!r} is gated differently per sample, and a DoRA, not being a low-rank "
                                     "update, takes one gate for the whole batch")
                multiplier = multiplier * float(g[0])
            fold.append((n, None, multiplier))
        return fold, rest

    def _compose(self, weight: torch.Tensor, base: torch.Tensor, items: list[tuple]) -> torch.Tensor:
        """(N, K) float32 ``weight`` with the adapters of ``items`` [(name, task id, multiplier)] applied in
        order: a plain update is added, a DoRA rescales the rows of the weight so far (its norm on ``base``)."""
        for n, task, multiplier in items:
            adapter = self.adapters[n]
            if isinstance(adapter, DoRA):
                weight = adapter.merge_into(weight, base, multiplier)
            else:
                weight = weight + adapter.delta_weight(task).to(weight.device) * multiplier
        return weight

    def _static_weight(self, static: list[tuple[str, int | None]]) -> torch.Tensor:
        """The merged weight of ``static`` [(name, task id)] for a ``static_merge`` block."""
        w = self.base_layer.weight
        if not any(isinstance(self.adapters[n], DoRA) for n, _ in static):
            return _merged(w, self.static_delta(static))
        return _rounded(self._compose(w.float(), w, [(n, t, self.adapter_weights[n]) for n, t in static]), w.dtype)

    def unmerged_weight(self) -> torch.Tensor:
        """The base weight before any merge, on the base weight's device."""
        w = self.base_layer.weight
        return w if self._pre_merge is None else self._pre_merge.to(w.device)

    # -- merging into the base weight ------------------------------------------------------
    # The weight before the first merge is kept (on the CPU) until the last unmerge, and every merged
    # weight is computed from it in float32 and rounded once: unmerging restores it bit for bit,
    # whatever the order, instead of subtracting a delta in the weight's precision.

    @torch.no_grad()
    def _weight_with(self, merged: dict[str, int | None]) -> torch.Tensor:
        """The pre-merge base weight plus the updates of ``merged`` (float32), checked finite."""
        original = self.unmerged_weight()
        w = self._compose(original.float(), original, [(n, t, self.adapter_weights[n]) for n, t in merged.items()])
        if not torch.isfinite(w).all():
            raise ValueError(f"merging adapters {list(merged)} gives non-finite weights; an adapter is corrupt")
        return w

    @torch.no_grad()
    def _bias_with(self, merged: dict[str, int | None]) -> torch.Tensor | None:
        """The pre-merge base bias plus scale * weight * b of the LoRA biases in ``merged`` (float32, as PEFT
        merges ``lora_B``'s bias), checked finite; None when none of them has a bias."""
        biased = [n for n in merged if getattr(self.adapters[n], "lora_bias", None) is not None]
        if not biased:
            return None
        b = self.base_layer.bias
        if b is None:
            raise ValueError(f"LoRA {biased[0]!r} has a bias (lora_bias) and its layer has none to merge it into "
                             "(PEFT refuses this merge too): keep it unfused")
        original = b if self._pre_merge_bias is None else self._pre_merge_bias.to(b.device)
        out = original.float()
        for n in biased:
            out = out + (self.adapters[n].scaling * self.adapter_weights[n]) * self.adapters[n].lora_bias.float()
        if not torch.isfinite(out).all():
            raise ValueError(f"merging adapters {biased} gives a non-finite bias; an adapter is corrupt")
        return out

    @torch.no_grad()
    def merged_weight(self, name: str, task_id: int | None = None) -> torch.Tensor:
        """The base weight with adapter ``name``'s update added (float32), checked finite (its bias too, for a
        LoRA with one); writes nothing."""
        if name in self.merged:
            raise ValueError(f"adapter {name!r} is already merged")
        self._bias_with({**self.merged, name: task_id})
        return self._weight_with({**self.merged, name: task_id})

    @torch.no_grad()
    def merge(self, name: str, task_id: int | None = None) -> None:
        """Add adapter ``name``'s update (for ``task_id``) into the base weight (a LoRA bias into its bias),
        checked finite."""
        if name in self.merged:
            raise ValueError(f"adapter {name!r} is already merged")
        after = {**self.merged, name: task_id}
        bias = self._bias_with(after)  # None unless a LoRA bias is among them; checked before anything is written
        merged = self._weight_with(after)
        w, b = self.base_layer.weight, self.base_layer.bias
        if self._pre_merge is None:
            self._pre_merge = w.detach().to("cpu", copy=True)
            self._pre_merge_bias = None if b is None else b.detach().to("cpu", copy=True)
        w.copy_(merged.to(w.dtype))
        if bias is not None:
            b.copy_(bias.to(b.dtype))
        self.merged[name] = task_id

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        """Take a merged adapter's update out again; the last unmerge restores the weight bit for bit."""
        if name not in self.merged:
            raise ValueError(f"adapter {name!r} is not merged")
        rest = {n: t for n, t in self.merged.items() if n != name}
        w, b = self.base_layer.weight, self.base_layer.bias
        if rest:
            w.copy_(self._weight_with(rest).to(w.dtype))
            if getattr(self.adapters[name], "lora_bias", None) is not None:  # its bias comes out too
                bias = self._bias_with(rest)
                b.copy_((self._pre_merge_bias.to(b.device) if bias is None else bias).to(b.dtype))
        else:
            w.copy_(self._pre_merge.to(w.device))
            if self._pre_merge_bias is not None:
                b.copy_(self._pre_merge_bias.to(b.device))
            self._pre_merge = self._pre_merge_bias = None
        self.merged = rest

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, active={self.active_adapters}, merged={list(self.merged)}"


class FusedAdapterLinear(nn.Module):
    """A fused projection (diffusers' ``to_qkv``) computing the adapters of the parts it replaced.

    diffusers' ``fuse_qkv_projections()`` concatenates the weights of ``to_q``, ``to_k`` and ``to_v``
    into one ``to_qkv`` linear and from then on calls only that. This layer wraps the fused linear
    and, at every call, gathers the active adapters of the parts (still registered under their
    attention module, where their parameters, routing, saving and merging stay as they were) and
    stacks them block by block: part j's adapters reach only the j-th third of the outputs. All of
    them, from all parts, go through ONE ``x2edit.kernels.lora_linear`` call with ``out_blocks`` = the
    number of parts; each part's adapters are padded to the same count and rank with zero adapters.
    Parts are read at each call, so an adapter loaded into a part after fusion (a community LoRA)
    takes effect.

    Args:
        base_layer: the fused ``nn.Linear`` (weights = the parts' base weights, concatenated).
        attention: the attention module the parts belong to.
        part_names: attribute names of the parts on ``attention``, in the fused order.
    """

    def __init__(self, base_layer: nn.Linear, attention: nn.Module, part_names: tuple[str, ...]):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"FusedAdapterLinear wraps nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.part_names = tuple(part_names)
        # The attention module is this layer's parent: kept outside nn.Module's registry (no cycle).
        object.__setattr__(self, "_attention", attention)
        widths = {self._parts()[j].out_features for j in range(len(part_names))}
        if len(widths) != 1 or base_layer.out_features != len(part_names) * widths.pop():
            raise ValueError(f"the fused projection's {base_layer.out_features} outputs are not {len(part_names)} "
                             "equal parts of the projections it replaced")
        self._merged_at_fusion = self._merged_state()
        self.static: StaticMerge | None = None

    in_features = property(lambda self: self.base_layer.in_features)
    out_features = property(lambda self: self.base_layer.out_features)
    weight = property(lambda self: self.base_layer.weight)
    bias = property(lambda self: self.base_layer.bias)

    def _parts(self) -> list[nn.Module]:
        return [getattr(self._attention, n) for n in self.part_names]

    def _merged_state(self) -> tuple:
        return tuple(dict(p.merged) if isinstance(p, AdapterLinear) else {} for p in self._parts())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = self._parts()
        if self._merged_state() != self._merged_at_fusion:
            raise RuntimeError(f"adapters of {self.part_names} were merged or unmerged after the projections were fused, "
                               "so the fused weight no longer matches them: unfuse_qkv_projections(), merge, fuse again")
        names = [p._live() if isinstance(p, AdapterLinear) else [] for p in parts]
        if not any(names):
            return self.base_layer(x)
        if any(_beyond_low_rank(p.adapters[n]) for p, ns in zip(parts, names) for n in ns):
            # A DoRA or a LoRA bias in a part: each part computes its own block (its base weight is that block
            # of the fused one, as checked at fusion), three matmuls instead of one.
            return torch.cat([p(x) for p in parts], dim=-1)
        weight = self.base_layer.weight
        if self.static is not None:
            split = [p._split_static(n) if n else ([], []) for p, n in zip(parts, names)]
            static = [s for s, _ in split]
            if any(static):
                key = tuple(p.static_key(s) if s else () for p, s in zip(parts, static))
                R = sum(p.adapters[n].lora_A.shape[0] * p.adapters[n].lora_A.shape[1]
                        for p, s in zip(parts, static) for n, _ in s)  # fmt: skip
                merged = self.static.weight(self, key, x, R, lambda: self._merged(parts, static))
                if merged is not None:
                    weight, names = merged, [d for _, d in split]
            if not any(names):
                return F.linear(x, weight, self.base_layer.bias)
        terms = [_stack_terms(p._terms(x, n), x) if n else None for p, n in zip(parts, names)]
        A, B, gates, scale = self._block_stack(terms, x)
        sparse = all(p.adapters[a].sparse_gates for p, n in zip(parts, names) for a in n)
        return kernels.lora_linear(x, weight, self.base_layer.bias, A, B, gates, scale, sparse_gate_grad=sparse,
                                   out_blocks=len(parts))  # fmt: skip

    def _merged(self, parts: list[nn.Module], static: list[list]) -> torch.Tensor:
        """The fused weight plus each part's static update in its block of rows."""
        w = self.base_layer.weight
        deltas = [p.static_delta(s).to(w.device) if s else torch.zeros(p.out_features, w.shape[1], device=w.device)
                  for p, s in zip(parts, static)]  # fmt: skip
        return _merged(w, torch.cat(deltas))

    def _block_stack(self, terms: list[tuple | None], x: torch.Tensor) -> tuple:
        """Block-stacked (A (P*E, r, K), B (P*E, N/P, r), gates, scale) from each part's stacked term.

        Parts are padded to the same adapter count and rank with zero adapters (an exact zero update).
        Gates stay None when no part has gates and all scales agree; otherwise each part's scale is
        folded into gates (per sample when every part's gates are per sample or None).
        """
        K, Nb = self.base_layer.in_features, self.base_layer.out_features // len(terms)
        ref = next(t for t in terms if t is not None)
        dtype, device = ref[0].dtype, ref[0].device
        E = max(t[0].shape[0] for t in terms if t is not None)
        rank = max(t[0].shape[1] for t in terms if t is not None)
        scales = {t[3] for t in terms if t is not None}
        plain = all(t is None or t[2] is None for t in terms) and len(scales) == 1
        per_sample = x.dim() == 3 and all(t is None or t[2] is None or t[2].dim() == 2 for t in terms)
        lead = (x.shape[0],) if per_sample else x.shape[:-1]
        As, Bs, Gs = [], [], []
        for t in terms:
            if t is None:
                A, B, g, s = (torch.zeros(E, rank, K, device=device, dtype=dtype),
                              torch.zeros(E, Nb, rank, device=device, dtype=dtype), None, 0.0)  # fmt: skip
            else:
                A, B, g, s = t
                A, B = _pad_rank(A, B, rank)
                if A.shape[0] < E:  # zero adapters up to the common count
                    A = torch.cat([A, A.new_zeros(E - A.shape[0], rank, K)])
                    B = torch.cat([B, B.new_zeros(E - B.shape[0], Nb, rank)])
            As.append(A)
            Bs.append(B)
            if plain:
                continue
            if g is None:
                g = x.new_full((*lead, A.shape[0] if t is None else t[0].shape[0]), 1.0)
            elif not per_sample and x.dim() == 3 and g.dim() == 2:
                g = g[:, None, :].expand(*x.shape[:-1], g.shape[-1])
            g = g.to(x.dtype) * s
            if g.shape[-1] < E:
                g = torch.cat([g, g.new_zeros(*g.shape[:-1], E - g.shape[-1])], dim=-1)
            Gs.append(g)
        if plain:
            return torch.cat(As), torch.cat(Bs), None, scales.pop()
        return torch.cat(As), torch.cat(Bs), torch.cat(Gs, dim=-1), 1.0

    def extra_repr(self) -> str:
        return f"parts={self.part_names}"
