"""Adapter configuration: one dataclass that the CLI, YAML files, saved adapters and tests share."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

# Target presets: regular expressions matched (re.fullmatch) against module names of a diffusers
# FluxTransformer2DModel.
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    # The attention and feed-forward linears of both block types (the set diffusers' Flux/Kontext
    # LoRA trainers target).
    "attn_ff": (
        r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
        r"transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)",
        r"single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v)",
        r"single_transformer_blocks\.\d+\.(proj_mlp|proj_out)",
    ),
    # X2Edit's placement: q/k/v + output projection of the image stream in the double blocks,
    # q/k/v in the single blocks.
    "x2edit": (
        r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)",
        r"single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v)",
    ),
}

ADAPTER_KINDS = ("lora", "moe_lora")
ROUTERS = ("token_topk", "task")
READINGS = ("direct", "residual")


@dataclass
class AdapterConfig:
    """What adapter to inject and where.

    Args:
        kind: "lora" (one low-rank update) or "moe_lora" (routed experts + optional shared expert).
        rank: rank r of every expert.
        alpha: scaling numerator; the update is scaled by alpha / rank (default: alpha = rank).
        targets: a preset name from ``TARGET_PRESETS`` or a list of regexes over module names. The
            default is X2Edit's placement ("x2edit": 0.99B parameters, 8.3% of FLUX.1-dev, at rank 64
            with 12+1 experts); "attn_ff" adds the feed-forward linears (3.48B, 29%).
        num_experts: routed experts E (moe_lora).
        top_k: experts kept per token (token_topk) or per task (task router); None keeps all (dense softmax).
        shared_expert: add one always-on expert with gate 1 (moe_lora).
        router: "token_topk" (a gate on the token's hidden state joined with a learned task
            embedding, X2Edit) or "task" (one learned mix per task: constant per task, so mergeable).
        num_task_slots: rows of the task embedding / task logits table (X2Edit: 16 for 15 tasks).
        task_embed_dim: width of the learned task embedding fed to a token router; 0 disables the
            task input; None means the layer's in_features (as X2Edit).
        renormalize: renormalise the top-k gate weights to sum to one (X2Edit: False).
        shared_task_embedding: one task embedding table for every adapted layer (as upstream X2Edit)
            instead of one per layer; it is saved once, under the first layer's key.
        gate_bias: give the token router's gate a bias (upstream X2Edit: no bias).
        reading: how an editing adapter's effect is read (see ``x2edit.adapters.residual``):
            "direct": the adapted transformer's output is the prediction, as for any LoRA;
            "residual": the change the adapter makes to the base's output is the change to the
            source image, so an adapter at initialisation returns the source unchanged.
        source_start: None (default): the adapter is sampled as any flow model, from noise over
            several steps. A noise level s in (0, 1]: the adapter edits in one step from the source
            itself, handed to the transformer as the sample at noise level s with no noise added
            (the one-step image translation of img2img-turbo, Parmar et al. 2024). Training uses
            exactly that input; the pipeline starts from the source tokens at s and its single Euler
            step lands on the predicted image. Deterministic: the output is the model's estimate of
            the mean edit, not a sample, and no sampling noise reaches the unchanged background.
        max_sequence_length: text tokens per instruction the adapter was trained with (T5's or the
            sentence encoder's sequence length; the trainer writes ``model.max_text_tokens`` here).
            The pipeline encodes instructions to this length unless the call passes
            ``max_sequence_length``; None (files from before this setting): the pipeline's default.
    """

    kind: str = "moe_lora"
    rank: int = 64
    alpha: float | None = None
    targets: str | list[str] = "x2edit"
    num_experts: int = 12
    top_k: int | None = 2
    shared_expert: bool = True
    router: str = "token_topk"
    num_task_slots: int = 16
    task_embed_dim: int | None = None
    renormalize: bool = False
    shared_task_embedding: bool = False
    gate_bias: bool = True
    reading: str = "direct"
    source_start: float | None = None
    max_sequence_length: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in ADAPTER_KINDS:
            raise ValueError(f"unknown adapter kind {self.kind!r}: expected one of {ADAPTER_KINDS}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"adapter rank must be a positive integer, got {self.rank!r}")
        if self.kind == "moe_lora":
            if self.router not in ROUTERS:
                raise ValueError(f"unknown router {self.router!r}: expected one of {ROUTERS}")
            if self.num_experts < 1:
                raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
            if self.top_k is not None and not 1 <= self.top_k <= self.num_experts:
                raise ValueError(f"top_k must be in 1..num_experts={self.num_experts} or None, got {self.top_k}")
            if self.shared_task_embedding and (self.router != "token_topk" or self.task_embed_dim == 0):
                raise ValueError("shared_task_embedding shares the token router's task embedding: it needs "
                                 "router='token_topk' and task_embed_dim != 0")
        if self.reading not in READINGS:
            raise ValueError(f"unknown adapter reading {self.reading!r}: expected one of {READINGS}")
        if self.source_start is not None and (isinstance(self.source_start, bool)
                                              or not isinstance(self.source_start, (int, float))
                                              or not 0 < self.source_start <= 1):
            raise ValueError(f"source_start must be a noise level in (0, 1] or None, got {self.source_start!r}")
        if self.max_sequence_length is not None and (isinstance(self.max_sequence_length, bool)
                                                     or not isinstance(self.max_sequence_length, int)
                                                     or self.max_sequence_length < 1):
            raise ValueError(f"max_sequence_length must be a positive integer or None, got {self.max_sequence_length!r}")
        if isinstance(self.targets, str) and self.targets not in TARGET_PRESETS:
            raise ValueError(f"unknown target preset {self.targets!r}: expected one of {list(TARGET_PRESETS)} "
                             "or a list of module-name regexes")

    @property
    def scaling(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    @property
    def target_patterns(self) -> tuple[str, ...]:
        return TARGET_PRESETS[self.targets] if isinstance(self.targets, str) else tuple(self.targets)

    @property
    def mergeable(self) -> bool:
        """True when the update is constant per task (plain LoRA or a task-level router) and reads directly."""
        return (self.kind == "lora" or self.router == "task") and self.reading == "direct"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> AdapterConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown adapter config keys {unknown}: valid keys are {sorted(names)}")
        return cls(**d)
