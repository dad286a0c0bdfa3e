"""Writing a LoRA update in the community layouts that diffusers' Flux converters read.

The pool (``x2edit.retrieval.pool``) writes its LoRAs as people publish theirs, so that the index and the
encoder are exercised on real layouts; everything is read back through the one reader,
``x2edit.adapters.community.read_community_lora``:

- ``peft``: diffusers/PEFT keys ``transformer.{module}.lora_A.weight`` with ``LoraConfig`` metadata
  (``r``, ``lora_alpha``, ``rank_pattern``) in the header, as ``save_lora_weights`` writes them;
- ``diffusers``: the same keys with no metadata (strength 1: each module's scale is folded into B);
- ``kohya``: sd-scripts keys named after the original FLUX modules (``lora_unet_double_blocks_0_
  img_attn_qkv.lora_down.weight`` / ``lora_up`` / ``alpha``); q, k and v share one fused key, written
  block-diagonally so that diffusers' converter splits it back exactly;
- ``comfyui``: the same modules as ``diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight``.

kohya layouts reach only the modules FLUX's original checkpoints name one to one (see
``KOHYA_MODULES``); a single block's q/k/v live in its fused ``linear1``, which diffusers splits only
at FLUX.1's sizes, so LoRAs on them are written in the diffusers layouts.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

FORMATS = ("peft", "diffusers", "kohya", "comfyui")

# diffusers module (regex) -> original FLUX (BFL) module, and the position in a fused q/k/v key.
KOHYA_MODULES: tuple[tuple[str, str, int | None], ...] = (
    (r"transformer_blocks\.(\d+)\.attn\.to_q", "double_blocks.{0}.img_attn.qkv", 0),
    (r"transformer_blocks\.(\d+)\.attn\.to_k", "double_blocks.{0}.img_attn.qkv", 1),
    (r"transformer_blocks\.(\d+)\.attn\.to_v", "double_blocks.{0}.img_attn.qkv", 2),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0", "double_blocks.{0}.img_attn.proj", None),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj", "double_blocks.{0}.img_mlp.0", None),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2", "double_blocks.{0}.img_mlp.2", None),
    (r"single_transformer_blocks\.(\d+)\.proj_out", "single_blocks.{0}.linear2", None),
    (r"x_embedder", "img_in", None),
    (r"proj_out", "final_layer.linear", None),
)

Factors = dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # module -> (A (r, K), B (N, r), scale)


def bfl_name(module: str) -> tuple[str, int | None]:
    """(original FLUX module name, q/k/v position or None) of a diffusers module; ValueError if kohya
    layouts cannot name it."""
    for pattern, name, part in KOHYA_MODULES:
        m = re.fullmatch(pattern, module)
        if m:
            return name.format(*m.groups()), part
    raise ValueError(f"{module!r} has no kohya/ComfyUI key for this base (kohya names only "
                     f"{[p for p, _, _ in KOHYA_MODULES]}); write it in the peft or diffusers layout")


def kohya_able(modules) -> bool:
    """Whether every module can be written in the kohya / ComfyUI layouts."""
    try:
        for m in modules:
            bfl_name(m)
    except ValueError:
        return False
    return True


def _kohya_state(factors: Factors, comfyui: bool, alpha_ratio: float) -> dict[str, torch.Tensor]:
    """kohya keys; alpha = alpha_ratio * rank (final_layer: rank, which diffusers requires), with the
    LoRA's own scale and the alpha compensated in the up weights so the update is unchanged."""
    groups: dict[str, dict[int | None, tuple]] = {}
    for module, (A, B, scale) in factors.items():
        name, part = bfl_name(module)
        groups.setdefault(name, {})[part] = (A, B * scale)
    state = {}
    for name, parts in groups.items():
        if None in parts:
            down, up = parts[None]
        else:  # fused q/k/v: down stacked, up block-diagonal (diffusers' converter detects it and splits exactly)
            if sorted(parts) != [0, 1, 2] or len({parts[i][0].shape[0] for i in parts}) != 1:
                raise ValueError(f"kohya's fused {name} needs q, k and v LoRAs of one rank")
            down = torch.cat([parts[i][0] for i in range(3)])
            up = torch.block_diag(*[parts[i][1] for i in range(3)])
        rank = down.shape[0]
        alpha = float(rank) if name.startswith("final_layer") else alpha_ratio * rank
        key = f"diffusion_model.{name}" if comfyui else "lora_unet_" + name.replace(".", "_")
        state[f"{key}.lora_down.weight"] = down.contiguous()
        state[f"{key}.lora_up.weight"] = (up / (alpha / rank)).contiguous()
        state[f"{key}.alpha"] = torch.tensor(alpha)
    return state


def _peft_state(factors: Factors, with_metadata: bool) -> tuple[dict, dict | None]:
    state, ranks, scales = {}, {}, {}
    for module, (A, B, scale) in factors.items():
        state[f"transformer.{module}.lora_A.weight"] = A.contiguous()
        ranks[module], scales[module] = A.shape[0], scale
        # Without metadata diffusers runs every module at strength 1: fold the scale into B.
        state[f"transformer.{module}.lora_B.weight"] = (B if with_metadata else B * scale).contiguous()
    if not with_metadata:
        return state, None
    r = max(ranks.values(), key=list(ranks.values()).count)  # the most common rank is the default
    alpha = r * max(scales.values(), key=list(scales.values()).count)
    config = {"r": r, "lora_alpha": alpha, "target_modules": sorted(factors),
              "rank_pattern": {m: k for m, k in ranks.items() if k != r},
              "alpha_pattern": {m: scales[m] * ranks[m] for m in factors if scales[m] * ranks[m] != alpha}}
    # As save_lora_weights packs it: keys prefixed by the component.
    return state, {f"transformer.{k}": v for k, v in config.items()}


def write_lora(path: str | os.PathLike, factors: Factors, fmt: str, header: dict[str, str] | None = None,
               kohya_alpha_ratio: float = 1.0) -> Path:
    """Write ``factors`` ({module: (A, B, scale)}, update = scale * B @ A) as a LoRA file in ``fmt``.

    Args:
        path: the .safetensors file to write.
        fmt: one of ``FORMATS``.
        header: extra string metadata for the header (kohya ``ss_*`` fields, ``modelspec.*``).
        kohya_alpha_ratio: kohya/ComfyUI alpha as a fraction of each module's rank.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}: expected one of {FORMATS}")
    metadata = {"format": "pt", **(header or {})}
    if fmt in ("kohya", "comfyui"):
        state = _kohya_state(factors, fmt == "comfyui", kohya_alpha_ratio)
    else:
        state, config = _peft_state(factors, with_metadata=fmt == "peft")
        if config is not None:
            metadata["lora_adapter_metadata"] = json.dumps(config, indent=2, sort_keys=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu() for k, v in state.items()}, str(path), metadata=metadata)
    return path
