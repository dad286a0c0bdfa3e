"""The learned fusion gate of AutoLoRA: the model, building a ``Gated`` fusion with it, and training it.

The runtime that applies gates to k LoRAs per layer and step (the training-free fusions, ``Gated``,
``fused_forward``) is the core's, ``x2edit.adapters.fusion``; this layer adds what needs the weight
encoder and Shape World: the gate network ``GateNet``, ``LearnedGate`` (what a pipeline is handed as
``fuse_loras(names, fusion=LearnedGate())``: it embeds the LoRAs with the weight encoder and the
instruction with the text encoder) and ``train_gate`` (``x2edit lora train-gate``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from x2edit.adapters.fusion import Gated, lora_factors

logger = logging.getLogger(__name__)

GATE_FORMAT = "x2edit-lora-gate"


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
        from x2edit.retrieval.config import save_model

        return save_model(self, path, GATE_FORMAT, metadata)

    @classmethod
    def load(cls, path: str | Path) -> GateNet:
        from x2edit.retrieval.config import load_model

        return load_model(cls, GateConfig, path, GATE_FORMAT, "fusion gate")


def default_gate_path() -> Path:
    """The gate trained on x2edit-tiny's pool, shipped in the package (``x2edit/retrieval/models``)."""
    path = Path(__file__).parent / "models" / "x2edit-tiny-gate.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no shipped gate at {path}: train one with `x2edit lora train-gate` and pass gate=")
    return path


class LearnedGate:
    """The learned fusion, ready to hand to a pipeline: ``pipe.fuse_loras(names, fusion=LearnedGate())``.

    Loads the gate and the weight encoder once; each call builds a ``Gated`` fusion for the LoRAs
    ``names`` of a transformer (their embeddings from the weights as loaded, the instruction through the
    shared text encoder when the gate reads it).

    Args:
        gate: a ``GateNet`` file (default: the one shipped for x2edit-tiny).
        encoder: a weight-encoder file (default: the one shipped for x2edit-tiny).
    """

    kind = "gated"

    def __init__(self, gate: str | Path | None = None, encoder: str | Path | None = None):
        from x2edit.retrieval.encoder import load_encoder

        self.gate = GateNet.load(gate or default_gate_path())
        self.encoder = load_encoder(encoder)
        # The gate reads the LoRAs' embeddings: another encoder's would be inputs it never saw.
        trained_with = self.gate.metadata.get("encoder")
        if trained_with and trained_with != self.encoder.fingerprint():
            raise ValueError(f"the gate was trained on the embeddings of weight encoder {trained_with}, not of this "
                             f"one ({self.encoder.fingerprint()}): pass encoder= the one it was trained with, or "
                             "retrain it (x2edit lora train-gate --encoder FILE)")

    def __call__(self, transformer: nn.Module, names: list[str], weights: list[float] | None = None) -> Gated:
        factors = [lora_factors(transformer, n) for n in names]
        with torch.no_grad():
            for f in factors:
                self.encoder.check(f)
            embeddings = self.encoder(factors)
        text = None
        if self.gate.instruction is not None:
            from x2edit.retrieval.encoder import shared_text_encoder

            text = shared_text_encoder(self.encoder.config.text_model)
        return Gated(names, self.gate, embeddings, weights=weights, text_encoder=text)


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
        onestep_fraction: share of samples at the one-step point (sigma = s); the others on the straight path
            at sigma uniform in (0, s], the whole range an n-step edit from the source visits.
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


def train_gate(pool_dir: str | Path, encoder_path: str | Path | None, out: str | Path,
               config: GateTrainConfig) -> dict:
    """Train a ``GateNet`` on composition pairs of the pool's ``train`` LoRAs (base and LoRAs frozen).

    Each step draws a combination (one LoRA per concept, concepts of different ``COMPOSABLE``
    families), ``scenes_per_step`` training scenes with their exact composed targets, and noise
    levels; the loss is the LoRA flow's relative error (``x2edit.retrieval.flow.flow_loss``) of the gated sum.
    """
    from x2edit.adapters import adapter_names, load_community_lora, remove_adapter
    from x2edit.data_pipeline.shapeworld.concepts import ConceptWorld, get_concept, instruction
    from x2edit.registry import load_pipeline
    from x2edit.retrieval.encoder import TextEncoder, load_encoder, module_set
    from x2edit.retrieval.flow import LoraFlow, flow_loss, straight_path
    from x2edit.retrieval.pool import load_manifest

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
        # the one-step point, else anywhere on the flow's range (0, s]: what n-step edits visit
        sigma = torch.as_tensor(np.where(rng.random(len(pairs)) < config.onestep_fraction, s,
                                         s * (1 - rng.random(len(pairs)))), dtype=torch.float32)
        fusion = Gated(names, gate, torch.stack([emb[n] for n in names]),
                       text_encoder=text if config.use_instruction else None).bind(pipe.transformer)
        fusion.set_prompts(prompts)
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
