"""Fusing k LoRAs with gates per layer and per step (``pipe.fuse_loras``, ``x2edit lora train-gate``).

A fusion decides, at each denoising step, the per-sample gate of each of the k LoRAs in each adapter
layer. The gates reach the layers through ``RoutingState.adapter_gates`` and are folded into the
gates of the layer's one ``kernels.lora_linear`` call (the k LoRAs stacked, ranks zero-padded):

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
- ``gated``: the learned gate ``GateNet``: g(layer, sigma, LoRA embedding, the others' embeddings,
  instruction embedding) in (0, 2), initialised to 1 everywhere (the plain sum), trained with the
  base and the LoRAs frozen on composition pairs (``train_gate``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from x2edit.adapters import RoutingState, adapter_layers

logger = logging.getLogger(__name__)

FUSIONS = ("sum", "average", "switch", "composite", "klora", "gated")
GATE_FORMAT = "x2edit-lora-gate"


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


# -- the learned gate ----------------------------------------------------------------------------


@dataclass
class GateConfig:
    """Sizes of a ``GateNet``.

    Args:
        modules: the base's linear modules (one learned layer embedding each; ``encoder.module_set``).
        lora_dim: width of the LoRA embeddings (the weight encoder's text space).
        text_dim: width of the instruction embedding (0: the gate does not read the instruction).
        hidden: MLP width; sigma_freqs: sinusoidal features of sigma.
    """

    modules: list
    lora_dim: int = 384
    text_dim: int = 384
    hidden: int = 64
    sigma_freqs: int = 4
    base: dict = field(default_factory=dict)


class GateNet(nn.Module):
    """g(layer, sigma, LoRA embedding, mean of the other LoRAs' embeddings[, instruction]) in (0, 2).

    The output layer starts at zero, so a fresh gate is 1 everywhere: the plain sum of the LoRAs.
    """

    def __init__(self, config: GateConfig):
        super().__init__()
        self.config = config
        h = config.hidden
        self.index = {m: i for i, m in enumerate(config.modules)}
        self.layer = nn.Embedding(len(config.modules), h)
        self.sigma = nn.Linear(2 * config.sigma_freqs, h)
        self.lora = nn.Linear(config.lora_dim, h)
        self.others = nn.Linear(config.lora_dim, h)
        self.instruction = nn.Linear(config.text_dim, h) if config.text_dim else None
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(h, h), nn.GELU(), nn.Linear(h, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def slots(self, layer_names: list[str]) -> torch.Tensor:
        missing = [n for n in layer_names if n not in self.index]
        if missing:
            raise ValueError(f"the gate was trained for another base: it has no layer {missing[0]!r}")
        return torch.tensor([self.index[n] for n in layer_names])

    def sigma_features(self, sigma: torch.Tensor) -> torch.Tensor:
        f = 2.0 ** torch.arange(self.config.sigma_freqs, device=sigma.device) * math.pi
        a = sigma.float()[:, None] * f  # (B, F)
        return torch.cat([a.sin(), a.cos()], -1)

    def forward(self, slots: torch.Tensor, sigma: torch.Tensor, lora_emb: torch.Tensor,
                instruction: torch.Tensor | None = None) -> torch.Tensor:
        """(L, B, k) gates.

        Args:
            slots: (L,) module indices of the layers; sigma: (B,) noise levels;
            lora_emb: (k, D) the LoRAs' embeddings; instruction: (B, T) or None.
        """
        k = len(lora_emb)
        others = (lora_emb.sum(0, keepdim=True) - lora_emb) / max(k - 1, 1)  # (k, D) the others' mean
        h = (self.layer(slots.to(lora_emb.device))[:, None, None] + self.sigma(self.sigma_features(sigma))[None, :, None]
             + (self.lora(lora_emb) + self.others(others))[None, None])  # (L, B, k, H)
        if self.instruction is not None and instruction is not None:
            h = h + self.instruction(instruction.float())[None, :, None]
        return 2 * torch.sigmoid(self.mlp(h)[..., 0])

    def save(self, path: str | Path, metadata: dict | None = None) -> Path:
        from retrieval.config import save_model

        return save_model(self, path, GATE_FORMAT, metadata)

    @classmethod
    def load(cls, path: str | Path) -> GateNet:
        from retrieval.config import load_model

        return load_model(cls, GateConfig, path, GATE_FORMAT, "fusion gate")


def default_gate_path() -> Path:
    """The gate trained on x2edit-tiny's pool, shipped in the package (``retrieval/models``)."""
    path = Path(__file__).parent / "models" / "x2edit-tiny-gate.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no shipped gate at {path}: train one with `x2edit lora train-gate` and pass gate=")
    return path


class Gated(Fusion):
    """The learned gate: per layer, per step, per sample (see ``GateNet``).

    Args:
        names, weights: the LoRAs (weights multiply the learned gates).
        gate: the trained ``GateNet``.
        embeddings: (k, D) the LoRAs' weight-encoder embeddings, in ``names`` order.
        instruction: (B, T) instruction embeddings, or None.
    """

    kind = "gated"

    def __init__(self, names, gate: GateNet, embeddings: torch.Tensor, weights=None,
                 instruction: torch.Tensor | None = None):
        super().__init__(names, weights)
        if embeddings.shape[0] != len(names):
            raise ValueError(f"{len(names)} LoRAs but {embeddings.shape[0]} embeddings")
        self.gate, self.embeddings, self.instruction = gate, embeddings, instruction
        self._slots: torch.Tensor | None = None

    def bind(self, model):
        super().bind(model)
        self._slots = self.gate.slots(self.layer_names)
        return self

    def layer_gates(self, sigma, step):
        instruction = self.instruction
        if instruction is not None and len(instruction) != len(sigma):
            instruction = instruction.repeat_interleave(len(sigma) // len(instruction), 0)
        g = self.gate(self._slots, sigma, self.embeddings, instruction)
        return g * torch.tensor(self.weights, device=g.device)


def make_fusion(kind: str, names: list[str], weights: list[float] | None = None, **gated) -> Fusion:
    """A fusion by name (``FUSIONS``); ``gated`` takes gate=, embeddings=, instruction=."""
    classes = {"sum": Fusion, "average": Average, "switch": Switch, "composite": Composite, "klora": KLoRA}
    if kind == "gated":
        return Gated(names, weights=weights, **gated)
    if kind not in classes:
        raise ValueError(f"unknown fusion {kind!r}: expected one of {FUSIONS}")
    return classes[kind](names, weights)


# -- the fusion in a pipeline call ---------------------------------------------------------------


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


# -- training the gate ---------------------------------------------------------------------------

# Families whose concepts compose into one exact, checkable target. Sketch and neon redraw the whole
# image as lines, so a background or object colour under them cannot be read; a tint over a tone is
# two colour casts of the whole image, which cannot be read apart.
COMPOSABLE = ("background", "objects", "style", "tone", "tint")
LINE_STYLES = ("style:sketch", "style:neon")


def compatible(concepts: list[str]) -> bool:
    """Whether a concept combination has a readable exact target (module comment above)."""
    fams = [c.split(":")[0] for c in concepts]
    values = [c.split(":")[1] for c in concepts if c.split(":")[0] in ("background", "objects")]
    if len(set(fams)) != len(fams) or len(set(values)) != len(values) or {"tone", "tint"} <= set(fams):
        return False
    return not (any(c in LINE_STYLES for c in concepts) and ({"background", "objects"} & set(fams)))


@dataclass
class GateTrainConfig:
    """``x2edit lora train-gate``: steps x scenes per step, each step one combination of ``train`` LoRAs.

    Args:
        steps, scenes_per_step, lr: the optimisation.
        sizes: how many LoRAs a combination has (drawn uniformly).
        onestep_fraction: share of samples at the one-step point; the others on the straight path.
        hidden, use_instruction: the gate's size and inputs.
        seed, threads: as elsewhere.
    """

    steps: int = 300
    scenes_per_step: int = 8
    lr: float = 3e-3
    sizes: list = field(default_factory=lambda: [2, 3])
    onestep_fraction: float = 0.5
    hidden: int = 64
    use_instruction: bool = True
    seed: int = 0
    threads: int = 0


def lora_factors(model: nn.Module, name: str) -> dict:
    """{module: (A, B, scale)} of a loaded LoRA, as the weight encoder reads files."""
    return {m: (layer.adapters[name].lora_A[0].detach(), layer.adapters[name].lora_B[0].detach(),
                float(layer.adapters[name].scaling * layer.adapter_weights[name]))
            for m, layer in adapter_layers(model) if name in layer.adapters}


def train_gate(pool_dir: str | Path, encoder_path: str | Path | None, out: str | Path,
               config: GateTrainConfig) -> dict:
    """Train a ``GateNet`` on composition pairs of the pool's ``train`` LoRAs (base and LoRAs frozen).

    Each step draws a combination (one LoRA per concept, concepts of different ``COMPOSABLE``
    families), ``scenes_per_step`` training scenes with their exact composed targets, and noise
    levels; the loss is the LoRA flow's relative error (``retrieval.flow.flow_loss``) of the gated sum.
    """
    from data_pipeline.shapeworld.concepts import ConceptWorld, get_concept, instruction
    from retrieval.encoder import TextEncoder, module_set
    from retrieval.flow import LoraFlow, flow_loss, straight_path
    from retrieval.index import load_encoder
    from retrieval.pool import load_manifest
    from x2edit.adapters import adapter_names, load_community_lora, remove_adapter
    from x2edit.registry import load_pipeline

    if config.threads:
        torch.set_num_threads(config.threads)
    pool_dir, t0 = Path(pool_dir), time.perf_counter()
    manifest = load_manifest(pool_dir)
    pcfg = manifest["config"]
    pipe = load_pipeline(pcfg["base"])
    pipe.set_progress_bar_config(disable=True)
    for name in adapter_names(pipe.transformer):
        remove_adapter(pipe.transformer, name)
    pipe.transformer.requires_grad_(False)
    entries = [e for e in manifest["loras"] if e["role"] == "train" and e["passed"]
               and e["concepts"][0].split(":")[0] in COMPOSABLE]
    if len(entries) < 2:
        raise ValueError(f"{pool_dir} has {len(entries)} kept train LoRAs of composable families; at least 2 are needed")
    encoder = load_encoder(encoder_path)
    by_concept: dict[str, list[str]] = {}
    for i, e in enumerate(entries):
        load_community_lora(pipe.transformer, pool_dir / e["file"], f"g{i:03d}")
        by_concept.setdefault(e["concepts"][0], []).append(f"g{i:03d}")
    with torch.no_grad():
        emb = {f"g{i:03d}": encoder([lora_factors(pipe.transformer, f"g{i:03d}")])[0] for i in range(len(entries))}
    gate = GateNet(GateConfig([m for m, _, _ in module_set(pipe.transformer)], lora_dim=encoder.config.text_dim,
                              text_dim=encoder.config.text_dim if config.use_instruction else 0, hidden=config.hidden,
                              base={"name": pcfg["base"]}))
    text = TextEncoder(encoder.config.text_model)
    flow, world = LoraFlow(pipe, pcfg["sigma_start"]), ConceptWorld(pcfg["resolution"])
    s, size = flow.s, (pcfg["resolution"], pcfg["resolution"])
    opt = torch.optim.AdamW(gate.parameters(), lr=config.lr, weight_decay=1e-4)
    concepts = sorted(by_concept)
    sizes = [k for k in config.sizes if k <= len({c.split(":")[0] for c in concepts})]
    if not sizes:
        raise ValueError(f"the pool's train LoRAs cover too few families for combinations of {config.sizes} LoRAs")
    log, losses = [], []
    for step in range(config.steps):
        rng = np.random.default_rng([config.seed, 5, step])
        for _ in range(1000):  # a combination of distinct composable families with an exact, readable target
            k = int(rng.choice(sizes))
            combo = sorted(rng.choice(concepts, size=k, replace=False).tolist())
            if compatible(combo):
                break
        else:
            raise ValueError(f"no compatible combination of {sizes} concepts among {concepts}")
        names = [by_concept[c][int(rng.integers(len(by_concept[c])))] for c in combo]
        pairs = [world.pair(combo, seed=int(rng.integers(2**31)), split="train") for _ in range(config.scenes_per_step)]
        prompts = [instruction([get_concept(c) for c in combo], rng) for _ in pairs]
        src, tgt = flow.tokens([p.source for p in pairs]), flow.tokens([p.target for p in pairs])
        sigma = torch.as_tensor(np.where(rng.random(len(pairs)) < config.onestep_fraction, s,
                                         rng.uniform(0.05 * s, s, len(pairs))), dtype=torch.float32)
        fusion = Gated(names, gate, torch.stack([emb[n] for n in names]),
                       instruction=text(prompts) if config.use_instruction else None).bind(pipe.transformer)
        x = straight_path(src, tgt, sigma, s)
        delta = flow.velocity_change(x, src, sigma, flow.encode(prompts), names, fusion.plan(sigma, 0), size)
        loss = flow_loss(delta, src, tgt, s).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 10 == 0:
            log.append({"step": step + 1, "loss": float(np.mean(losses[-10:]))})
            logger.info("gate step %d/%d loss %.4f", step + 1, config.steps, log[-1]["loss"])
    result = {"steps": config.steps, "train_s": time.perf_counter() - t0, "log": log,
              "train_loras": len(entries), "concepts": concepts}
    gate.save(out, metadata={"pool": str(pool_dir), "encoder": encoder.fingerprint(),
                             "config": dataclasses.asdict(config), "final_loss": log[-1]["loss"] if log else None})
    return result
