"""Merging a task's adapter into the base weights, and exporting it as a plain diffusers LoRA.

A task-level router makes the MoE mixture a constant per task: the update for task t is
``scale * sum_e g_t[e] * B_e A_e`` (plus the shared expert), which is exactly a LoRA of rank
(#selected experts) x r with A = [A_e; ...] and B = [scale * g_t[e] * B_e, ...]. That LoRA is written
in the diffusers/PEFT key format, so stock ``pipe.load_lora_weights`` reads it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from x2edit.adapters.inject import adapter_config, adapter_layers
from x2edit.adapters.layers import LoRA, MoELoRA
from x2edit.adapters.routers import TaskRouter
from x2edit.tasks import task_id as _task_id


def _resolve_task(adapter_name: str, model: nn.Module, task: str | int | None) -> int | None:
    config = adapter_config(model, adapter_name)
    if config.reading != "direct":
        raise ValueError(f"adapter {adapter_name!r} uses the {config.reading} reading: it is read against the base's "
                         "own output, so it cannot be merged or exported as a plain LoRA")
    if not config.mergeable:
        raise ValueError(f"adapter {adapter_name!r} uses a token-level router: its expert mix changes per token, "
                         "so it cannot be merged or exported as a plain LoRA (train with router='task')")
    if config.kind == "moe_lora" and task is None:
        raise ValueError(f"adapter {adapter_name!r} mixes experts per task: say which task to merge (task=...)")
    return None if task is None else _task_id(task)


def merge_adapter(model: nn.Module, adapter_name: str = "default", task: str | int | None = None) -> None:
    """Fold the adapter (for ``task``) into the base weights; checked finite; undo with ``unmerge_adapter``."""
    tid = _resolve_task(adapter_name, model, task)
    layers = [layer for _, layer in adapter_layers(model) if adapter_name in layer.adapters]
    # Check every layer before writing any, so a failure leaves the base weights bit-identical.
    for layer in layers:
        layer.merged_weight(adapter_name, tid)
    for layer in layers:
        layer.merge(adapter_name, tid)


def unmerge_adapter(model: nn.Module, adapter_name: str = "default") -> None:
    for _, layer in adapter_layers(model):
        if adapter_name in layer.merged:
            layer.unmerge(adapter_name)


def lora_factors_for_task(adapter: nn.Module, task_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (R, K), B (N, R)) of the plain LoRA equal to ``adapter`` for one task, scale folded into B."""
    if isinstance(adapter, LoRA):
        return adapter.lora_A[0].float(), adapter.scaling * adapter.lora_B[0].float()
    if not isinstance(adapter, MoELoRA) or not isinstance(adapter.router, TaskRouter):
        raise ValueError("only plain LoRA and task-routed MoE-LoRA adapters export to a plain LoRA")
    gates = adapter._with_shared(adapter.router.task_gates(torch.tensor([task_id], device=adapter.lora_A.device)))[0]
    # Experts with a gate of 0 (not in this task's top-k) drop out; the shared expert (gate 1) stays.
    keep = gates.nonzero().flatten()
    A = adapter.lora_A[keep].float()  # (k, r, K)
    B = adapter.lora_B[keep].float() * (adapter.scaling * gates[keep].float())[:, None, None]  # (k, N, r)
    return A.reshape(-1, A.shape[-1]), B.permute(1, 0, 2).reshape(B.shape[1], -1)


@torch.no_grad()
def export_diffusers_lora(model: nn.Module, save_directory: str | os.PathLike, task: str | int | None = None,
                          adapter_name: str = "default",
                          weight_name: str = "pytorch_lora_weights.safetensors") -> Path:
    """Write the adapter (for ``task``) as a diffusers/PEFT LoRA that ``load_lora_weights`` reads.

    Ranks may differ between layers (a task's top-k may differ per layer); PEFT's ``rank_pattern``
    in the written metadata records them, with ``lora_alpha`` equal to each rank so PEFT's scale is
    1 (the real scale is folded into B).
    """
    from diffusers import FluxKontextPipeline

    tid = _resolve_task(adapter_name, model, task)
    state, ranks = {}, {}
    for name, layer in adapter_layers(model):
        if adapter_name not in layer.adapters:
            continue
        A, B = lora_factors_for_task(layer.adapters[adapter_name], tid)
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise ValueError(f"adapter {adapter_name!r} has non-finite weights in {name}")
        dtype = layer.base_layer.weight.dtype
        state[f"{name}.lora_A.weight"] = A.to(dtype).contiguous().cpu()
        state[f"{name}.lora_B.weight"] = B.to(dtype).contiguous().cpu()
        ranks[name] = A.shape[0]
    rank = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank
    metadata = {"r": rank, "lora_alpha": rank, "target_modules": sorted(ranks),
                "rank_pattern": {k: v for k, v in ranks.items() if v != rank},
                "alpha_pattern": {k: v for k, v in ranks.items() if v != rank}}
    FluxKontextPipeline.save_lora_weights(save_directory, transformer_lora_layers=state, weight_name=weight_name,
                                          transformer_lora_adapter_metadata=metadata)
    return Path(save_directory) / weight_name
