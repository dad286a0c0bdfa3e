"""Adapters: LoRA and X2Edit's task-aware MoE-LoRA on a frozen FLUX transformer.

- ``AdapterConfig``: what to inject and where (config.py)
- ``AdapterLinear`` / ``LoRA`` / ``DoRA`` / ``MoELoRA``: the layers (layers.py); routers in routers.py
- ``inject_adapters`` / ``routing_context`` / ``set_adapters`` / ``enable_gradient_checkpointing`` (inject.py)
- ``static_merge``: static adapters folded into transient merged weights for a block (inject.py)
- ``fuse_qkv_projections``: diffusers' q/k/v fusion with the adapters kept, one kernel call (inject.py)
- ``save_adapter`` / ``load_adapter`` (io.py); merge and diffusers export (merge.py)
- ``residual_reading``: read an editing adapter as the change it makes to the source (residual.py)
- ``load_community_lora``: kohya / XLabs / diffusers LoRA files (DoRA, LoRA biases, Control LoRAs too)
  beside the MoE-LoRA; ``read_community_file`` reads one without a model (community.py)
"""

from x2edit.adapters.community import CommunityLora, load_community_lora, read_community_file
from x2edit.adapters.config import TARGET_PRESETS, AdapterConfig
from x2edit.adapters.inject import (
    adapter_config,
    adapter_layers,
    adapter_names,
    adapter_summary,
    enable_gradient_checkpointing,
    format_summary,
    fuse_qkv_projections,
    inject_adapters,
    remove_adapter,
    routing_context,
    set_adapters,
    static_merge,
)
from x2edit.adapters.io import base_fingerprint, load_adapter, read_adapter_header, save_adapter
from x2edit.adapters.layers import AdapterLinear, DoRA, FusedAdapterLinear, LoRA, MoELoRA, RoutingState
from x2edit.adapters.merge import export_diffusers_lora, merge_adapter, unmerge_adapter
from x2edit.adapters.residual import adapters_disabled, residual_adapters, residual_reading
from x2edit.adapters.routers import TaskRouter, TokenTopKRouter, balance_loss

__all__ = [
    "AdapterConfig", "TARGET_PRESETS", "AdapterLinear", "FusedAdapterLinear", "LoRA", "DoRA", "MoELoRA", "RoutingState", "TaskRouter",
    "TokenTopKRouter", "balance_loss", "inject_adapters", "remove_adapter", "routing_context", "set_adapters",
    "enable_gradient_checkpointing", "adapter_config", "adapter_layers", "adapter_names", "adapter_summary", "format_summary", "save_adapter",
    "load_adapter", "read_adapter_header", "base_fingerprint", "merge_adapter", "unmerge_adapter",
    "export_diffusers_lora", "load_community_lora", "read_community_file", "CommunityLora", "adapters_disabled", "residual_adapters", "residual_reading",
    "static_merge", "fuse_qkv_projections",
]
