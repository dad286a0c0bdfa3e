"""Routers: strategy objects that turn (tokens, task ids) into per-token expert gates.

Every router maps ``x: (B, T, K)`` and ``task_ids: (B,)`` to ``gates: (B, T, E)`` (zeros for
experts not selected) and a router-balance loss. The MoE-LoRA layer multiplies expert e's
low-rank update by ``gates[..., e]``; it never looks inside the router.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def balance_loss(probs: torch.Tensor, gates: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss, 1.0 when perfectly balanced.

    Args:
        probs: (M, E) router softmax probabilities.
        gates: (M, E) the kept gates (non-zero where an expert was selected).
        top_k: experts selected per row.
    Returns E * sum_e f_e * P_e with f_e the fraction of routing slots sent to expert e and P_e the
    mean probability of e. Gradient flows through P_e only (f_e is a count).
    """
    num_experts = probs.shape[-1]
    frac = (gates != 0).float().sum(0) / (gates.shape[0] * top_k)
    return num_experts * (frac * probs.float().mean(0)).sum()


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax in at least float32: bf16 router probabilities are too coarse to rank experts."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1)


def _top_k(probs: torch.Tensor, top_k: int | None, renormalize: bool) -> torch.Tensor:
    """Keep the top-k probabilities per row (others set to 0); X2Edit does not renormalise."""
    if top_k is None or top_k >= probs.shape[-1]:
        return probs
    vals, idx = probs.topk(top_k, dim=-1)
    if renormalize:
        vals = vals / vals.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, idx, vals)


class TokenTopKRouter(nn.Module):
    """X2Edit's router: a linear gate on [token hidden state ; learned task embedding], top-k.

    Args:
        in_features: K, the width of the tokens the adapted linear reads.
        num_experts: E routed experts.
        top_k: experts kept per token.
        num_task_slots: rows of the task embedding table.
        task_embed_dim: width of the task embedding (0: route on the token alone).
        renormalize: renormalise kept gate weights to sum to one.
        bias: give the gate a bias (upstream X2Edit's gate has none).
        task_embedding: an ``nn.Embedding`` to use instead of a new one (shared by every layer when
            ``AdapterConfig.shared_task_embedding``); its width is the task embedding's.
    """

    def __init__(self, in_features: int, num_experts: int, top_k: int | None, num_task_slots: int = 16,
                 task_embed_dim: int = 0, renormalize: bool = False, bias: bool = True,
                 task_embedding: nn.Embedding | None = None):
        super().__init__()
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        if task_embedding is None and task_embed_dim > 0:
            task_embedding = nn.Embedding(num_task_slots, task_embed_dim)
            nn.init.normal_(task_embedding.weight, std=0.02)
        self.task_embedding = task_embedding
        width = task_embedding.embedding_dim if task_embedding is not None else 0
        self.gate = nn.Linear(in_features + width, num_experts, bias=bias)
        nn.init.normal_(self.gate.weight, std=0.02)
        if bias:
            nn.init.zeros_(self.gate.bias)

    @property
    def needs_task(self) -> bool:
        return self.task_embedding is not None

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (B, T, K); task_ids: (B,). The gate reads [x ; task embedding]; its two column blocks are
        # applied apart, so no (B, T, K + D) concatenation is made (and kept for backward, in the gate's
        # dtype: 0.9 GB per layer at FLUX size, batch 4): the task's part is one row per sample.
        w, k = self.gate.weight, x.shape[-1]  # w: (E, K + D)
        logits = F.linear(x.to(w.dtype), w[:, :k], self.gate.bias)  # (B, T, E)
        if self.task_embedding is not None:
            emb = self.task_embedding(task_ids).to(w.dtype)  # (B, D)
            logits = logits + F.linear(emb, w[:, k:])[:, None, :]
        probs = _softmax(logits)  # (B, T, E)
        gates = _top_k(probs, self.top_k, self.renormalize)
        aux = balance_loss(probs.flatten(0, 1), gates.flatten(0, 1), self.top_k or self.num_experts)
        return gates.to(x.dtype), aux


class TaskRouter(nn.Module):
    """One learned expert mix per task: gates are constant over tokens, so the adapter merges.

    Args:
        num_experts: E routed experts.
        top_k: experts kept per task (None: dense softmax mix).
        num_task_slots: rows of the logits table.
    """

    def __init__(self, num_experts: int, top_k: int | None, num_task_slots: int = 16, renormalize: bool = False):
        super().__init__()
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        # Small random init so that top-k picks differ between tasks from the start.
        self.logits = nn.Parameter(torch.randn(num_task_slots, num_experts) * 0.02)

    needs_task = True

    def task_gates(self, task_ids: torch.Tensor) -> torch.Tensor:
        """(B,) task ids -> (B, E) gates."""
        return _top_k(_softmax(self.logits[task_ids]), self.top_k, self.renormalize)

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        probs = _softmax(self.logits[task_ids])  # (B, E)
        gates = _top_k(probs, self.top_k, self.renormalize)
        aux = balance_loss(probs, gates, self.top_k or self.num_experts)
        return gates[:, None, :].expand(-1, x.shape[1], -1).to(x.dtype), aux


def build_router(config, in_features: int, task_embedding: nn.Embedding | None = None) -> nn.Module:
    """The router named by ``config.router`` for a layer reading ``in_features``-wide tokens.

    task_embedding: a table shared across layers (``config.shared_task_embedding``), else None.
    """
    if config.router == "task":
        return TaskRouter(config.num_experts, config.top_k, config.num_task_slots, config.renormalize)
    task_dim = in_features if config.task_embed_dim is None else config.task_embed_dim
    return TokenTopKRouter(in_features, config.num_experts, config.top_k, config.num_task_slots, task_dim,
                           config.renormalize, bias=config.gate_bias, task_embedding=task_embedding)


__all__ = ["TokenTopKRouter", "TaskRouter", "build_router", "balance_loss"]
