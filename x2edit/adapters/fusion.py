"""The runtime that fuses k LoRAs with gates per layer and per step (``pipe.fuse_loras``).

A fusion decides, at each denoising step, the per-sample gate of each of the k LoRAs in each adapter
layer. The gates reach the layers through ``RoutingState.adapter_gates`` and are folded into the
gates of the layer's one ``x2edit.kernels.lora_linear`` call (the k LoRAs stacked, ranks zero-padded):

    y = x W^T + b + sum_j g[layer, step, b, j] * s_j (x A_j^T) B_j^T

A step may also be several passes of the transformer whose changes are averaged (``Composite``).
Every fusion has the same interface (``plan(sigma, step) -> passes``) and the same names as the CLI;
options go by keyword through ``make_fusion`` (``make_fusion("switch", names, tau=3)``):

- ``sum``: a weighted sum, every gate = the LoRA's weight (1 by default): what ``set_adapters`` does;
- ``average``: gates 1 / k;
- ``switch``: LoRA Switch (Zhong et al. 2024): one LoRA at a time, cycling in order, the next one every
  ``tau`` steps (5 by default, the paper's setting);
- ``composite``: LoRA Composite (Zhong et al. 2024): the average of the k single-LoRA predictions,
  k passes per step;
- ``klora``: K-LoRA (Ouyang et al. 2025): exactly two LoRAs, the subject (content) one first and the style
  one second; in each attention layer and at each step only one of them acts, the one whose top-K update
  magnitude is larger once the style's is scaled by a factor that grows over the steps (the subject leads
  early, the style late); other layers keep both;
- ``topk_select``: per-layer top-K magnitude selection over any k LoRAs, fixed over steps: in each layer
  only the LoRA whose update has the largest sum of its K largest magnitudes acts (no roles, no step
  dependence; what ``klora`` named before it followed the paper);
- ``gated`` (``Gated``): a learned gate g(layer, sigma, LoRA embedding, instruction). The gate model,
  the weight encoder that embeds the LoRAs and their training live one floor up, in
  ``x2edit.retrieval`` (``LearnedGate`` builds a ``Gated`` fusion); this module only runs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import re
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn

from x2edit.adapters.inject import adapter_layers
from x2edit.adapters.layers import RoutingState

TRAINING_FREE = ("sum", "average", "switch", "composite", "klora", "topk_select")
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
    """LoRA Switch (Zhong et al. 2024, "Multi-LoRA Composition for Image Generation"): one LoRA acts at a
    time (at its weight), in the order named, and the next one takes over every ``tau`` steps: at step t
    LoRA floor(t / tau) mod k acts.

    Args:
        tau: the switching interval in denoising steps. 5 by default: the paper's setting (its switch-step
            ablation peaks at 5; its code's ``--switch_step`` defaults to 5). That code switches in a
            step-end callback once ``step > 0 and step % tau == 0``, so its first LoRA runs tau + 1 steps;
            here every LoRA runs tau steps, as the paper's "every tau steps" reads. tau=1: one LoRA per step.
    """

    kind = "switch"

    def __init__(self, names, weights=None, tau: int = 5):
        super().__init__(names, weights)
        if isinstance(tau, bool) or not isinstance(tau, int) or tau < 1:
            raise ValueError(f"the switch interval tau must be a whole number of steps >= 1, got {tau!r}")
        self.tau = tau

    def layer_gates(self, sigma, step):
        g = super().layer_gates(sigma, step).clone()
        keep = (step // self.tau) % len(self.names)
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


# A layer of an attention block: q/k/v/out projections of FLUX's ``attn`` (double and single blocks, the
# text stream's add_*_proj / to_add_out included) and SD-style ``attn1`` / ``attn2``.
_ATTENTION = re.compile(r"(^|\.)attn\d*\.")


def is_attention_layer(name: str) -> bool:
    """Whether the adapter layer ``name`` (a module path) is a projection of an attention block."""
    return _ATTENTION.search(name) is not None


def _update_magnitudes(layer, names: list[str], weights: list[float]) -> list[torch.Tensor]:
    """|dW| of each LoRA in ``layer``, flattened (N * K,): its (N, K) update at its weight and scale."""
    return [(layer.adapters[n].delta_weight() * abs(w)).abs().flatten() for n, w in zip(names, weights)]


class KLoRA(Fusion):
    """K-LoRA (Ouyang et al., CVPR 2025, arXiv 2502.18461, "Unlocking Training-Free Fusion of Any Subject and
    Style LoRAs"): two LoRAs, ``names = [subject (content) LoRA, style LoRA]``; in each attention layer
    and at each step exactly one of them acts (at its weight).

    In attention layer l at step t of T, with dW_c, dW_s the two (N, K) updates (weight * scale * B A):

        S_c = sum of the K largest |dW_c|,   S_s = sum of the K largest |dW_s|,   K = r_c * r_s
        S(t) = alpha * t / T + beta                         (pattern "s")
        S*(t) = (alpha * t / T + beta) mod alpha            (pattern "s*")
        the subject LoRA acts iff S_c / gamma > S(t) * S_s; else the style LoRA

    gamma balances the two LoRAs' overall sizes: the mean over the layers that hold both of
    sum|dW_c| / sum|dW_s|, averaged again without the layers at 3 times that mean or more. S grows over the
    steps (by default from beta = 0.5 to alpha + beta = 2), so the subject wins more layers early and the
    style more late. Scaling a LoRA's weight changes gamma as much as its scores, so the weights do not
    move the choice. Layers outside attention blocks keep both LoRAs (the paper selects in attention layers; its FLUX code
    also selects in the MLP/norm layers of LoRAs that have them: ``attention_only=False``).

    Args:
        names: [subject LoRA, style LoRA] (K-LoRA is defined for exactly two).
        weights: per-LoRA multipliers of the gate of the LoRA that acts.
        top_k: K; None: r_c * r_s, the product of the two LoRAs' ranks in that layer (the paper's code).
        alpha, beta: S's slope and offset. Pattern "s" (the method's S): alpha 1.5, beta 0.5. Pattern "s*"
            (the paper's supplement; its code's default, recommended there for FLUX): alpha 1.5,
            beta 0.85 * alpha.
        pattern: "s" or "s*".
        steps: T, the denoising steps of the run: t / T = step / steps, as the paper counts. None: t / T is
            read from the noise level, 1 - sigma (the same for a uniform schedule that starts at sigma = 1;
            FLUX's shifted schedule keeps sigma high longer, so the style takes over later than with steps).
        attention_only: select in attention layers only (the paper); False: in every layer holding both.
    """

    kind = "klora"

    def __init__(self, names, weights=None, top_k: int | None = None, alpha: float = 1.5,
                 beta: float | None = None, pattern: str = "s", steps: int | None = None,
                 attention_only: bool = True):
        super().__init__(names, weights)
        if len(self.names) != 2:
            raise ValueError(f"K-LoRA fuses exactly two LoRAs [subject, style], got {len(self.names)}: "
                             f"use 'topk_select' for k LoRAs")
        if pattern not in ("s", "s*"):
            raise ValueError(f"K-LoRA's pattern is 's' or 's*', got {pattern!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a whole number >= 1 or None (r_c * r_s), got {top_k!r}")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"steps must be a whole number >= 1 or None (t / T from sigma), got {steps!r}")
        self.top_k, self.pattern, self.steps, self.attention_only = top_k, pattern, steps, attention_only
        self.alpha = float(alpha)
        self.beta = float(beta) if beta is not None else (0.5 if pattern == "s" else 0.85 * self.alpha)
        if pattern == "s*" and self.alpha <= 0:
            raise ValueError(f"pattern 's*' takes S mod alpha: alpha must be > 0, got {alpha}")
        self.scores: torch.Tensor | None = None  # (L, 2) S_c, S_s of each bound layer
        self.selects: torch.Tensor | None = None  # (L,) bool: the layer picks one LoRA (else both act)
        self.gamma = 1.0

    def bind(self, model):
        super().bind(model)
        n_layers = len(self.layer_names)
        scores, totals = torch.zeros(n_layers, 2), torch.zeros(n_layers, 2)
        both = torch.zeros(n_layers, dtype=torch.bool)
        for _, layer in adapter_layers(model):
            row = self.slots.get(id(layer))
            if row is None or not all(n in layer.adapters for n in self.names):
                continue  # a layer with one of the two has nothing to choose: that one acts
            mags = _update_magnitudes(layer, self.names, self.weights)
            ranks = [layer.adapters[n].lora_A.shape[-2] for n in self.names]  # lora_A: (E, r, K)
            k = self.top_k or ranks[0] * ranks[1]
            for j, m in enumerate(mags):
                scores[row, j] = m.topk(min(k, m.numel())).values.sum()
                totals[row, j] = m.sum()
            both[row] = True
        attention = torch.tensor([is_attention_layer(n) for n in self.layer_names], dtype=torch.bool)
        self.selects = both & attention if self.attention_only else both
        self.scores = scores
        # gamma over every layer with both, attention or not (as the paper's code does); a zero update has
        # no ratio
        keep = both & (totals > 0).all(1)
        ratios = totals[keep, 0] / totals[keep, 1]
        if len(ratios):
            ratios = ratios[ratios < 3 * ratios.mean()]  # the smallest ratio always stays
            self.gamma = float(ratios.mean())
        return self

    def progress(self, sigma: torch.Tensor, step: int) -> torch.Tensor:
        """(B,) t / T of each sample: step / steps, or 1 - sigma without ``steps``."""
        if self.steps is not None:
            return torch.full_like(sigma, min(step / self.steps, 1.0), dtype=torch.float32)
        return (1.0 - sigma.float()).clamp(0.0, 1.0)

    def factor(self, sigma: torch.Tensor, step: int) -> torch.Tensor:
        """(B,) S(t) (or S*(t)), the multiplier of the style LoRA's score."""
        s = self.alpha * self.progress(sigma, step) + self.beta
        return torch.remainder(s, self.alpha) if self.pattern == "s*" else s

    def layer_gates(self, sigma, step):
        g = super().layer_gates(sigma, step).clone()  # (L, B, 2)
        scores = self.scores.to(g.device)
        subject = scores[:, :1] / self.gamma > self.factor(sigma, step)[None, :] * scores[:, 1:]  # (L, B)
        selects = self.selects.to(g.device)[:, None]  # (L, 1)
        g[..., 1] = torch.where(selects & subject, 0.0, g[..., 1])
        g[..., 0] = torch.where(selects & ~subject, 0.0, g[..., 0])
        return g


class TopKSelect(Fusion):
    """Per-layer top-K magnitude selection, fixed over steps: in each layer only the LoRA whose update has the
    largest sum of its ``top_k`` largest |dW| entries acts (any k; chosen once, at bind). Not K-LoRA: no
    subject/style roles, no step factor, every layer."""

    kind = "topk_select"

    def __init__(self, names, weights=None, top_k: int = 64):
        super().__init__(names, weights)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a whole number >= 1, got {top_k!r}")
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


def make_fusion(kind: str, names: list[str], weights: list[float] | None = None, **options) -> Fusion:
    """A training-free fusion by name (``TRAINING_FREE``), with its options by keyword (``tau`` of
    ``switch``; ``top_k``, ``alpha``, ``beta``, ``pattern``, ``steps``, ``attention_only`` of ``klora``;
    ``top_k`` of ``topk_select``); a learned one is built by its gate (``x2edit.retrieval.LearnedGate``)."""
    classes = {"sum": Fusion, "average": Average, "switch": Switch, "composite": Composite, "klora": KLoRA,
               "topk_select": TopKSelect}
    if kind == "gated":
        raise ValueError("fusion 'gated' is a learned gate: pass fusion=x2edit.retrieval.LearnedGate() (the gate "
                         "and weight encoder shipped for x2edit-tiny, or your own files)")
    if kind not in classes:
        raise ValueError(f"unknown fusion {kind!r}: expected one of {FUSIONS}")
    cls = classes[kind]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "names", "weights")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"fusion {kind!r} has no option {unknown}: its options are {allowed or 'none'}")
    return cls(names, weights, **options)


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
