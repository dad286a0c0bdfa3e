"""Community LoRAs (kohya, XLabs, diffusers/PEFT files) loaded beside the MoE-LoRA.

Files are read and converted to diffusers/PEFT keys by diffusers' own Flux LoRA converters
(``FluxLoraLoaderMixin.lora_state_dict``); this module only places each (A, B) pair as a plain
``LoRA`` adapter in the matching ``AdapterLinear``, so it runs in the same fused kernel call as the
MoE-LoRA and can be gated with it (``set_adapters``).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict

import torch
import torch.nn as nn

from x2edit.adapters.config import AdapterConfig
from x2edit.adapters.inject import _set_submodule
from x2edit.adapters.layers import AdapterLinear, LoRA

logger = logging.getLogger(__name__)


def _alpha_for(module: str, rank: int, alphas: dict | None, metadata: dict | None) -> float:
    """LoRA alpha of one module: an explicit ``.alpha`` tensor, else PEFT metadata, else rank (scale 1)."""
    for key in (f"transformer.{module}.alpha", f"{module}.alpha"):
        if alphas and key in alphas:
            return float(alphas[key])
    if metadata:
        pattern = metadata.get("alpha_pattern") or {}
        if module in pattern:
            return float(pattern[module])
        if metadata.get("lora_alpha") is not None:
            # PEFT's lora_alpha pairs with its r; a module of another rank keeps that ratio.
            return float(metadata["lora_alpha"]) * rank / float((metadata.get("rank_pattern") or {}).get(module, metadata.get("r", rank)))
    return float(rank)


def load_community_lora(model: nn.Module, source: str | os.PathLike | dict, adapter_name: str,
                        prefix: str = "transformer", **kwargs) -> list[str]:
    """Load a Flux LoRA file (any format diffusers converts) into ``model`` as adapter ``adapter_name``.

    Args:
        model: the transformer (with or without adapters already).
        source: a .safetensors file, a directory (with ``weight_name=`` in kwargs), or a state dict.
        adapter_name: name of the new adapter.
        prefix: the component prefix of keys in the file (diffusers writes ``transformer.``).
    Returns the adapted module names. On error the model is left unchanged.
    """
    from diffusers import FluxKontextPipeline

    if isinstance(source, (str, os.PathLike)) and not os.path.exists(source):
        raise FileNotFoundError(f"LoRA file not found: {source}")
    state, alphas, metadata = FluxKontextPipeline.lora_state_dict(
        source, return_alphas=True, return_lora_metadata=True, **kwargs
    )
    pairs: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    skipped = []
    for key, value in state.items():
        k = key[len(prefix) + 1:] if key.startswith(prefix + ".") else key
        if "." not in k or k.split(".", 1)[0] in ("text_encoder", "text_encoder_2"):
            skipped.append(key)
            continue
        if k.endswith(".lora_A.weight"):
            pairs[k[: -len(".lora_A.weight")]]["A"] = value
        elif k.endswith(".lora_B.weight"):
            pairs[k[: -len(".lora_B.weight")]]["B"] = value
        else:
            raise ValueError(f"unsupported LoRA key {key!r} (only lora_A/lora_B pairs on linears are supported; "
                             "DoRA magnitudes and LoRA biases are not)")
    if skipped:
        logger.warning("ignoring %d text-encoder LoRA keys (x2edit applies community LoRAs to the transformer)",
                       len(skipped))
    if not pairs:
        raise ValueError("the LoRA file holds no transformer LoRA weights")

    # Validate everything before touching the model.
    plan = []
    for module_name, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA for {module_name} has only {sorted(ab)}; both lora_A and lora_B are needed")
        try:
            target = model.get_submodule(module_name)
        except AttributeError:
            raise ValueError(f"LoRA targets {module_name!r}, which this model does not have; is the LoRA for "
                             "another base model?") from None
        if not isinstance(target, (nn.Linear, AdapterLinear)):
            raise ValueError(f"LoRA targets {module_name!r}, a {type(target).__name__}, not a linear layer")
        A, B = ab["A"], ab["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != target.in_features or B.shape[0] != target.out_features \
                or B.shape[1] != A.shape[0]:
            raise ValueError(f"LoRA for {module_name}: A {tuple(A.shape)} and B {tuple(B.shape)} do not fit a linear "
                             f"{target.in_features}->{target.out_features}; is the LoRA for another base model?")
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise ValueError(f"LoRA for {module_name} holds non-finite values (NaN/inf)")
        if isinstance(target, AdapterLinear) and adapter_name in target.adapters:
            raise ValueError(f"an adapter named {adapter_name!r} is already loaded; pick another adapter_name")
        plan.append((module_name, target, A, B))

    for module_name, target, A, B in plan:
        if isinstance(target, nn.Linear):
            target = AdapterLinear(target)
            _set_submodule(model, module_name, target)
        rank = A.shape[0]
        scaling = _alpha_for(module_name, rank, alphas, metadata) / rank
        lora = LoRA(target.in_features, target.out_features, rank, scaling,
                    AdapterConfig(kind="lora", rank=rank, alpha=scaling * rank, targets=[module_name]))
        with torch.no_grad():
            lora.lora_A.copy_(A[None])
            lora.lora_B.copy_(B[None])
        lora.requires_grad_(False)
        target.add_adapter(adapter_name, lora)
    return [p[0] for p in plan]
