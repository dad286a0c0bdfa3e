"""Injecting adapters into a model, routing them per call, and summarising them."""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.utils.checkpoint

from x2edit.adapters.config import AdapterConfig
from x2edit.adapters.layers import (
    AdapterLinear,
    FusedAdapterLinear,
    LoRA,
    MoELoRA,
    RoutingState,
    StaticMerge,
    check_adapter_name,
)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLinear]]:
    """(module name, AdapterLinear) for every wrapped linear of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear):
            yield name, module


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def make_adapter(config: AdapterConfig, in_features: int, out_features: int,
                 task_embedding: nn.Module | None = None) -> nn.Module:
    """A fresh LoRA or MoELoRA for one linear of the given shape (``task_embedding``: a shared table)."""
    if config.kind == "lora":
        return LoRA(in_features, out_features, config.rank, config.scaling, config)
    return MoELoRA(in_features, out_features, config, task_embedding)


def inject_adapters(model: nn.Module, config: AdapterConfig, adapter_name: str = "default",
                    freeze_base: bool = True, dtype: torch.dtype | None = None) -> list[str]:
    """Wrap every ``nn.Linear`` whose name matches ``config``'s targets and add an adapter to it.

    Args:
        model: e.g. a diffusers ``FluxTransformer2DModel``.
        config: what to inject and where.
        adapter_name: key of the new adapter in every wrapped layer.
        freeze_base: set ``requires_grad=False`` on everything except adapter parameters.
        dtype: the adapter weights' dtype (default: each base layer's; training uses float32).
    Returns the names of the adapted modules. Raises ``ValueError`` if no module matched.
    """
    patterns = [re.compile(p) for p in config.target_patterns]
    targets = []
    check_adapter_name(adapter_name)  # before any layer is wrapped
    shared = None  # one task embedding for all layers (upstream X2Edit), made at the first layer
    for name, module in list(model.named_modules()):
        if not any(p.fullmatch(name) for p in patterns):
            continue
        if isinstance(module, nn.Linear) and not name.endswith(".base_layer"):
            module = AdapterLinear(module)
            _set_submodule(model, name, module)
        if isinstance(module, AdapterLinear):
            adapter = make_adapter(config, module.in_features, module.out_features, shared)
            if config.shared_task_embedding and shared is None:
                shared = adapter.router.task_embedding
            module.add_adapter(adapter_name, adapter, dtype)
            targets.append(name)
    if not targets:
        raise ValueError(f"no linear layer of {type(model).__name__} matches the adapter targets "
                         f"{list(config.target_patterns)}")
    if freeze_base:
        for pname, p in model.named_parameters():
            p.requires_grad_(".adapters." in pname)
    return targets


def remove_adapter(model: nn.Module, adapter_name: str) -> None:
    """Delete one adapter everywhere; layers left with no adapter are unwrapped back to nn.Linear."""
    found = False
    for name, layer in list(adapter_layers(model)):
        if adapter_name in layer.adapters:
            layer.delete_adapter(adapter_name)
            found = True
        if not layer.adapters:
            _set_submodule(model, name, layer.base_layer)
    if not found:
        raise ValueError(f"no adapter named {adapter_name!r} in the model")


def adapter_names(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for _, layer in adapter_layers(model):
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def adapter_config(model: nn.Module, adapter_name: str = "default") -> AdapterConfig:
    for _, layer in adapter_layers(model):
        if adapter_name in layer.adapters:
            return layer.adapters[adapter_name].config
    raise ValueError(f"no adapter named {adapter_name!r} in the model (have: {adapter_names(model)})")


def set_adapters(model: nn.Module, names: list[str] | str, weights: list[float] | float | None = None) -> None:
    """Activate ``names`` (others off) with per-adapter multipliers, as diffusers' ``set_adapters``."""
    names = [names] if isinstance(names, str) else list(names)
    weights = [1.0] * len(names) if weights is None else weights
    weights = [weights] * len(names) if isinstance(weights, (int, float)) else list(weights)
    if len(weights) != len(names):
        raise ValueError(f"set_adapters got {len(names)} names and {len(weights)} weights")
    missing = sorted(set(names) - set(adapter_names(model)))
    if missing:
        raise ValueError(f"unknown adapters {missing}; loaded: {adapter_names(model)}")
    # A merged adapter's update sits in the base weight at the weight it was merged with, and unmerging
    # subtracts it at the current weight: changing it in between would corrupt the base weights.
    for _, layer in adapter_layers(model):
        for n, w in zip(names, weights):
            if n in layer.merged and float(w) != layer.adapter_weights[n]:
                raise ValueError(f"adapter {n!r} is merged into the base weights: unmerge it before changing its "
                                 "weight")
    for _, layer in adapter_layers(model):
        layer.active_adapters = [n for n in names if n in layer.adapters]
        for n, w in zip(names, weights):
            if n in layer.adapters:
                layer.adapter_weights[n] = float(w)


@contextlib.contextmanager
def routing_context(model: nn.Module, task_ids: torch.Tensor | list[int] | None = None,
                    timestep: torch.Tensor | None = None) -> Iterator[RoutingState]:
    """Set the routing inputs of every adapter layer for the calls inside the block.

    Args:
        model: a model with injected adapters.
        task_ids: (B,) task ids, one per sample of each forward batch inside the block.
        timestep: (B,) diffusion time in [0, 1] (for timestep-aware gates).
    Yields the ``RoutingState``; after a training forward, ``state.balance_loss`` is the mean
    router balance loss over MoE layers.
    """
    if task_ids is not None and not torch.is_tensor(task_ids):
        task_ids = torch.tensor(task_ids, dtype=torch.long)
    state = RoutingState(task_ids=task_ids, timestep=timestep)
    layers = [layer for _, layer in adapter_layers(model)]
    for layer in layers:
        layer.routing = state
    try:
        yield state
    finally:
        for layer in layers:
            layer.routing = None


@contextlib.contextmanager
def static_merge(model: nn.Module, calls: int = 1) -> Iterator[StaticMerge]:
    """Fold the static adapters into transient merged weights while the block runs.

    Static: plain LoRAs (community LoRAs too) and task-routed MoE-LoRAs while all samples of a call
    have one task (``routing_context``), with the multipliers of ``set_adapters``; not while their
    parameters need gradients, and not residual-reading adapters. At its first call in the block, each
    adapter layer (fused q/k/v projections too) decides with ``x2edit.kernels.merge_is_cheaper`` whether one
    merge beats ``calls`` low-rank additions at that call's token count; if so it builds
    ``W + sum of the static updates`` (float32, rounded once) beside its base weight and uses it for
    the rest of the block, rebuilding only if the adapters, their weights or the task change. Dynamic
    adapters (token-routed MoE-LoRA) still run, on top of the merged weight, in one kernel call.

    The base weights are never written, so they are bit-identical after the block; the merged copies
    (one per merged layer: about 3.6 GB in bfloat16 for X2Edit's placement on FLUX.1-dev) are dropped
    at its end.

    Args:
        model: a model with adapters.
        calls: calls expected inside the block: a pipeline's denoising steps for one generation (or 1
            per step, for gates that change with the timestep).
    Yields the ``StaticMerge`` state.
    """
    state = StaticMerge(calls)
    layers = [m for m in model.modules() if isinstance(m, (AdapterLinear, FusedAdapterLinear))]
    saved = [(layer, layer.static) for layer in layers]
    for layer in layers:
        layer.static = state
    try:
        yield state
    finally:
        for layer, previous in saved:
            layer.static = previous


# Fused projections of diffusers' attention modules: fused attribute -> the projections it replaces.
FUSED_PROJECTIONS = {"to_qkv": ("to_q", "to_k", "to_v"), "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}


def fuse_qkv_projections(model: nn.Module) -> list[str]:
    """diffusers' ``model.fuse_qkv_projections()``, keeping the adapters of the fused projections.

    diffusers replaces q, k and v by one ``to_qkv`` linear (and the context stream's projections by
    ``to_added_qkv``) and calls only that; adapters on the parts would be skipped silently. Each fused
    linear is wrapped in a ``FusedAdapterLinear`` that computes the parts' adapters (MoE-LoRA, LoRA,
    community LoRAs loaded before or after this call) block-stacked in the same kernel call. Undo with
    diffusers' ``model.unfuse_qkv_projections()``.

    Returns the names of the wrapped fused projections.
    """
    model.fuse_qkv_projections()
    wrapped = []
    for name, module in list(model.named_modules()):
        if not getattr(module, "fused_projections", False):
            continue
        for fused_name, parts in FUSED_PROJECTIONS.items():
            fused = getattr(module, fused_name, None)
            if isinstance(fused, nn.Linear) and all(hasattr(module, p) for p in parts):
                setattr(module, fused_name, FusedAdapterLinear(fused, module, parts))
                wrapped.append(f"{name}.{fused_name}" if name else fused_name)
    return wrapped


@contextlib.contextmanager
def _replayed(routed: list[tuple[AdapterLinear, RoutingState]]) -> Iterator[None]:
    """Give each layer its forward-time routing again for a recomputation.

    A copy with an empty loss list: the balance losses the recomputation produces are not read (the
    forward's are already in the loss being differentiated).
    """
    saved = [(layer, layer.routing) for layer, _ in routed]
    for layer, state in routed:
        layer.routing = dataclasses.replace(state, aux_losses=[])
    try:
        yield
    finally:
        for layer, state in saved:
            layer.routing = state


def routed_checkpoint(block: nn.Module, *args):
    """``torch.utils.checkpoint`` of one block that replays the block's routing in the recomputation.

    Routing inputs live on the adapter layers only for the length of a ``routing_context``, but
    checkpointing recomputes the block in backward, usually after that context has closed (and a
    training loop may route the next batch differently by then). The routing states of the block's
    layers are read at forward time and set again for the recomputation, so token- and task-level
    routers see the same task ids, and their balance losses are counted once (in the forward).
    """
    routed = [(layer, layer.routing) for _, layer in adapter_layers(block) if layer.routing is not None]
    return torch.utils.checkpoint.checkpoint(
        block.__call__, *args, use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _replayed(routed)))


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on a diffusers model's gradient checkpointing in a form that routed adapters survive.

    Use instead of ``model.enable_gradient_checkpointing()`` when the model carries task-routed
    MoE-LoRA adapters (stock checkpointing recomputes them without their task ids).
    """
    model.enable_gradient_checkpointing(gradient_checkpointing_func=routed_checkpoint)


def adapter_summary(model: nn.Module) -> dict:
    """Parameter counts: trainable, adapter, total, and the adapters' share of the model."""
    total = sum(p.numel() for p in model.parameters())
    adapter = sum(p.numel() for n, p in model.named_parameters() if ".adapters." in n)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layers = sum(1 for _ in adapter_layers(model))
    return {"adapted_layers": layers, "adapter_params": adapter, "trainable_params": trainable,
            "total_params": total, "adapter_share": adapter / max(total - adapter, 1)}


def format_summary(summary: dict) -> str:
    return (f"{summary['adapted_layers']} adapted layers, {summary['adapter_params']:,} adapter parameters "
            f"({100 * summary['adapter_share']:.2f}% of the {summary['total_params'] - summary['adapter_params']:,}"
            f" base parameters), {summary['trainable_params']:,} trainable")
