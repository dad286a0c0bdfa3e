"""The runtime that fuses k LoRAs with gates per layer and per step (``pipe.fuse_loras``).

A fusion decides, at each denoising step, the per-sample gate of each of the k LoRAs in each adapter
layer. The gates reach the layers through ``RoutingState.adapter_gates`` and are folded into the
gates of the layer's one ``x2edit.kernels.lora_linear`` call (the k LoRAs stacked, ranks zero-padded):

    y = x W^T + b + sum_j g[layer, step, b, j] * s_j (x A_j^T) B_j^T

A step may also be several passes of the transformer whose changes are averaged (``Composite``).
Every fusion has the same interface (``plan(sigma, step) -> passes``) and the same names as the CLI:

- ``sum``: a weighted sum, every gate = the LoRA's weight (1 by default): what ``set_adapters`` does;
- ``average``: gates 1 / k;
- ``switch``: LoRA Switch (Zhong et al. 2024): one LoRA per step, cycling in order;
- ``composite``: LoRA Composite (Zhong et al. 2024): the average of the k single-LoRA predictions,
  k passes per step;
- ``klora``: K-LoRA-style selection: in each layer only the LoRA whose update has the larger top-K
  magnitude acts (training-free; K-LoRA's content/style timestep factor is left out: these LoRAs have
  no such roles);
- ``gated`` (``Gated``): a learned gate g(layer, sigma, LoRA embedding, instruction). The gate model,
  the weight encoder that embeds the LoRAs and their training live one floor up, in
  ``x2edit.retrieval`` (``LearnedGate`` builds a ``Gated`` fusion); this module only runs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn

from x2edit.adapters.inject import adapter_layers
from x2edit.adapters.layers import RoutingState

TRAINING_FREE = ("sum", "average", "switch", "composite", "klora")
FUSIONS = (*TRAINING_FREE, "gated")


class Fusion:
    """k LoRAs ``names`` and their gates per layer and step. Subclasses set ``gates`` or ``plan``."""

    kind = "sum"

    def __init__(self, names: list[str], weights: list[float] | None = None):
        if not names:
            raise ValueError("a fusion needs at least one LoRA")
        if len(set(names)) != len(names):
            raise ValueError(f"a LoRA is named twice in the fusion: {names}")
        self.names = list(names)
        self.weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.names):
            raise ValueError(f"{len(self.names)} LoRAs but {len(self.weights)} weights")
        self.slots: dict[int, int] = {}  # id(layer) -> row in the fusion's per-layer gates
        self.layer_names: list[str] = []

    def bind(self, model: nn.Module) -> Fusion:
        """Find the adapter layers that hold any of the LoRAs (checks that every LoRA is loaded)."""
        found = set()
        self.slots, self.layer_names = {}, []
        for name, layer in adapter_layers(model):
            here = [n for n in self.names if n in layer.adapters]
            if here:
                found.update(here)
                self.slots[id(layer)] = len(self.layer_names)
                self.layer_names.append(name)
        missing = [n for n in self.names if n not in found]
        if missing:
            raise ValueError(f"LoRAs {missing} are not loaded in the model (load them with load_lora_weights)")
        return self

    def layer_gates(self, sigma: torch.Tensor, step: int) -> torch.Tensor:
        """(L, B, k) gate of each LoRA in each bound layer for each sample at this step."""
        w = torch.tensor(self.weights, dtype=torch.float32, device=sigma.device)
        return w.expand(len(self.layer_names), len(sigma), len(self.names))

    def plan(self, sigma: torch.Tensor, step: int) -> list[tuple]:
        """The passes of one step: [(gate_fn for RoutingState.adapter_gates, weight)]."""
        return [(self._gate_fn(self.layer_gates(sigma, step)), 1.0)]

    def set_prompts(self, prompts: list[str] | None) -> None:
        """The call's instructions (one per sample); only a gate that reads them uses them."""

    def _gate_fn(self, gates: torch.Tensor):
        slots, names = self.slots, self.names

        def gate_fn(layer) -> dict[str, torch.Tensor]:
            row = slots.get(id(layer))
            return {} if row is None else {n: gates[row, :, j] for j, n in enumerate(names)}

        return gate_fn


class Average(Fusion):
    kind = "average"

    def layer_gates(self, sigma, step):
        k = len(self.names)
        return super().layer_gates(sigma, step) / k


class Switch(Fusion):
    """LoRA Switch: at step t only LoRA t mod k acts (at its weight)."""

    kind = "switch"

    def layer_gates(self, sigma, step):
        g = super().layer_gates(sigma, step).clone()
        keep = step % len(self.names)
        g[..., [j for j in range(len(self.names)) if j != keep]] = 0.0
        return g


class Composite(Fusion):
    """LoRA Composite: the step's change is the mean of the k single-LoRA changes (k passes)."""

    kind = "composite"

    def plan(self, sigma, step):
        base = super().layer_gates(sigma, step)
        passes = []
        for j in range(len(self.names)):
            g = torch.zeros_like(base)
            g[..., j] = base[..., j]
            passes.append((self._gate_fn(g), 1.0 / len(self.names)))
        return passes


class KLoRA(Fusion):
    """K-LoRA-style selection: in each layer, the LoRA with the larger sum of its top-K |dW| entries acts."""

    kind = "klora"

    def __init__(self, names, weights=None, top_k: int = 64):
        super().__init__(names, weights)
        self.top_k = top_k
        self.choice: torch.Tensor | None = None

    def bind(self, model):
        super().bind(model)
        scores = torch.zeros(len(self.layer_names), len(self.names))
        for _, layer in adapter_layers(model):
            row = self.slots.get(id(layer))
            if row is None:
                continue
            for j, n in enumerate(self.names):
                if n in layer.adapters:
                    dw = (layer.adapters[n].delta_weight() * self.weights[j]).abs().flatten()
                    scores[row, j] = dw.topk(min(self.top_k, dw.numel())).values.sum()
        self.choice = scores.argmax(1)  # (L,)
        return self

    def layer_gates(self, sigma, step):
        g = super().layer_gates(sigma, step)
        onehot = torch.nn.functional.one_hot(self.choice.to(g.device), len(self.names)).to(g.dtype)  # (L, k)
        return g * onehot[:, None, :]


class Gated(Fusion):
    """A learned gate: per layer, per step, per sample.

    Args:
        names, weights: the LoRAs (weights multiply the learned gates).
        gate: the gate model: ``gate.slots(layer_names) -> (L,)`` indices and
            ``gate(slots, sigma (B,), embeddings (k, D), instruction (B, T) or None) -> (L, B, k)`` gates
            (``x2edit.retrieval.fusion.GateNet``).
        embeddings: (k, D) the LoRAs' weight-encoder embeddings, in ``names`` order.
        text_encoder: prompts -> (B, T) instruction embeddings, for a gate that reads the instruction;
            None: the gate sees no instruction.
    """

    kind = "gated"

    def __init__(self, names, gate: nn.Module, embeddings: torch.Tensor, weights=None,
                 text_encoder: Callable[[list[str]], torch.Tensor] | None = None):
        super().__init__(names, weights)
        if embeddings.shape[0] != len(names):
            raise ValueError(f"{len(names)} LoRAs but {embeddings.shape[0]} embeddings")
        self.gate, self.embeddings, self.text_encoder = gate, embeddings, text_encoder
        self.instruction: torch.Tensor | None = None  # (B, T) of the current call
        self._slots: torch.Tensor | None = None

    def bind(self, model):
        super().bind(model)
        self._slots = self.gate.slots(self.layer_names)
        return self

    def set_prompts(self, prompts):
        if self.text_encoder is not None and prompts:
            self.instruction = self.text_encoder(list(prompts))

    def layer_gates(self, sigma, step):
        instruction = self.instruction
        if instruction is not None and len(instruction) != len(sigma):
            instruction = instruction.repeat_interleave(len(sigma) // len(instruction), 0)
        g = self.gate(self._slots, sigma, self.embeddings, instruction)
        return g * torch.tensor(self.weights, device=g.device)


def make_fusion(kind: str, names: list[str], weights: list[float] | None = None) -> Fusion:
    """A training-free fusion by name (``TRAINING_FREE``); a learned one is built by its gate
    (``x2edit.retrieval.LearnedGate``)."""
    classes = {"sum": Fusion, "average": Average, "switch": Switch, "composite": Composite, "klora": KLoRA}
    if kind == "gated":
        raise ValueError("fusion 'gated' is a learned gate: pass fusion=x2edit.retrieval.LearnedGate() (the gate "
                         "and weight encoder shipped for x2edit-tiny, or your own files)")
    if kind not in classes:
        raise ValueError(f"unknown fusion {kind!r}: expected one of {FUSIONS}")
    return classes[kind](names, weights)


@contextlib.contextmanager
def fused_forward(model: nn.Module, fusion: Fusion) -> Iterator[None]:
    """Make each call of ``model`` (a transformer with the fusion's LoRAs) run the fusion's passes.

    Each call reads its noise level from ``timestep``; the step index is the number of distinct noise
    levels seen before in the block (a residual-reading pipeline calls the model several times per
    step). The gates are added to the layers' routing state (the one ``routing_context`` set, if any,
    so task routing keeps working), and a multi-pass step returns the weighted mean of its passes.
    """
    forward = model.forward
    own = model.__dict__.get("forward")
    seen: list[float] = []
    layers = [layer for _, layer in adapter_layers(model)]  # once per block, not per transformer call

    def call(*args, **kwargs):
        sigma = kwargs["timestep"]
        level = round(float(sigma.flatten()[0]), 6)
        if level not in seen:
            seen.append(level)
        step = seen.index(level)
        if not any(n in layer.active_adapters for layer in layers for n in fusion.names):
            return forward(*args, **kwargs)  # the LoRAs are off in this call (e.g. the base term of a reading)
        saved = [layer.routing for layer in layers]
        outs = []
        try:
            for gate_fn, weight in fusion.plan(sigma.float().flatten(), step):
                for layer, state in zip(layers, saved):
                    layer.routing = dataclasses.replace(state or RoutingState(), adapter_gates=gate_fn, timestep=sigma)
                outs.append((forward(*args, **kwargs), weight))
        finally:
            for layer, state in zip(layers, saved):
                layer.routing = state
        if len(outs) == 1:
            return outs[0][0]
        first = outs[0][0]
        mean = sum(w * (o[0] if isinstance(o, tuple) else o.sample) for o, w in outs)
        if isinstance(first, tuple):
            return (mean, *first[1:])
        first.sample = mean
        return first

    model.forward = call
    try:
        yield
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own


def lora_factors(model: nn.Module, name: str) -> dict:
    """{module: (A, B, scale)} of a loaded LoRA, as the weight encoder reads files."""
    return {m: (layer.adapters[name].lora_A[0].detach(), layer.adapters[name].lora_B[0].detach(),
                float(layer.adapters[name].scaling * layer.adapter_weights[name]))
            for m, layer in adapter_layers(model) if name in layer.adapters}
