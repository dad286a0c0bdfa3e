"""The LoRA pool: concept LoRAs the project makes itself, offline, on x2edit-tiny (``x2edit lora pool``).

Each LoRA carries one Shape World concept (``x2edit.data_pipeline.shapeworld.concepts``: a tone, a style, a
background colour, every object's colour or fill), several instances per concept (seed, rank,
target modules, file format), trained as the velocity of the LoRA flow (``x2edit.retrieval.flow``) from
exact (source, concept applied) pairs on the frozen base, and kept if it does its concept alone:
its one-step edit gain on held-out scenes must reach ``bar_db``. Beside them: a few LoRAs trained on
several concepts at once (the upper bound of composition), near-duplicates (another rank and format
of a kept LoRA, slightly perturbed) and noise LoRAs (random weights under a plausible, false name).

Many LoRAs train at once: every LoRA is a named adapter of the same ``AdapterLinear`` layers, and a
batch holds samples of ``loras_per_batch`` LoRAs, each sample gated to its own LoRA through
``RoutingState.adapter_gates`` (one-hot, per sample), so one forward and one kernel call per layer
train them all.

Output (``DIR``): ``loras/`` (the retrieval pool: kept concept LoRAs, near-duplicates, noise),
``joint/`` (the multi-concept LoRAs), ``rejected/`` (LoRAs below the bar), and ``pool.json``: every
LoRA with its concepts, role (train / heldout_instance / unseen_concept / near_duplicate / noise /
joint), rank, targets, format, gains and file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from x2edit.data_pipeline.metrics import psnr
from x2edit.data_pipeline.shapeworld.concepts import ConceptWorld, all_concepts, get_concept, instruction
from x2edit.files import load_state
from x2edit.retrieval.flow import LoraFlow, flow_loss, straight_path
from x2edit.retrieval.formats import FORMATS, kohya_able, write_lora

logger = logging.getLogger(__name__)

# Target-module sets of pool LoRAs (regexes over diffusers module names). All reach the patch
# embedding and the output head, through which a colour transform of each patch is most direct;
# "attn" and "mlp" are writable in kohya layouts, "x2edit" (single blocks' q/k/v) only in diffusers'.
TARGET_SETS: dict[str, tuple[str, ...]] = {
    "attn": (r"x_embedder", r"proj_out", r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)",
             r"single_transformer_blocks\.\d+\.proj_out"),
    "mlp": (r"x_embedder", r"proj_out", r"transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)",
            r"single_transformer_blocks\.\d+\.proj_out"),
    "x2edit": (r"x_embedder", r"proj_out", r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)",
               r"single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v)"),
}
ROLES = ("train", "heldout_instance", "unseen_concept", "near_duplicate", "noise", "joint")


@dataclass
class PoolConfig:
    """What ``x2edit lora pool`` makes (``configs/autolora/pool.yaml``).

    Args:
        base: the frozen base (its own editing adapters are removed for training).
        concepts: concept names (``family:value``); None: all 40 of ``concepts.FAMILIES``.
        unseen_concepts: concepts the weight encoder never sees (all their instances).
        instances: one dict per instance of every concept: rank, targets (a ``TARGET_SETS`` name),
            format (``x2edit.retrieval.formats.FORMATS``), alpha_ratio (alpha / rank). Instance i of concept
            number c is held out from the encoder when i == c mod len(instances).
        joint: concept lists, each trained as one LoRA (composition's upper bound; not in the pool).
        joint_instance: how joint LoRAs are made (as an ``instances`` entry).
        samples_per_lora: training pairs each LoRA sees; loras_per_batch x samples_per_lora_in_batch
            pairs make one step.
        family_weights: {family: w}: LoRAs of that family see w times as many pairs (harder families).
        lr, decay_fraction: AdamW learning rate, linearly decayed to 0 over the last fraction of steps.
        onestep_fraction: share of samples at the one-step point (sigma = s, x = source); the others
            on the straight path at sigma ~ U(0.05 s, s).
        sigma_start: s (x2edit-tiny's source_start).
        bank_size: training scenes per concept (train split).
        eval_pairs, eval_steps: held-out scenes (eval split) and step counts of the gain measured.
        bar_db: a LoRA is kept if its one-step gain on its own exact targets reaches this.
        near_duplicates, noise_loras: distractors written beside the kept LoRAs.
        naming: {kind: share} of how files are named, as real folders name them (``NAMINGS``): "accurate" (the
            concept's canonical words in the file name, title and trigger words), "paraphrased" (other words
            for it), "creator" (a creator's handle and version, e.g. ``mystyle_look_v3_final``: nothing about
            the concept), "misleading" (another concept's words) and "opaque" (``lora_<hex>``).
        checkpoint_every: steps between resumable checkpoints.
        threads: torch threads (0: torch's default).
        seed: everything random derives from it.
    """

    base: str = "x2edit-tiny"
    resolution: int = 64
    concepts: list | None = None
    unseen_concepts: list = field(default_factory=lambda: [
        "tone:sunset", "tone:faded", "style:cartoon", "background:purple", "background:cyan", "objects:orange",
        "objects:brown"])
    instances: list = field(default_factory=lambda: [
        {"rank": 4, "targets": "attn", "format": "peft", "alpha_ratio": 1.0},
        {"rank": 8, "targets": "x2edit", "format": "diffusers", "alpha_ratio": 0.5},
        {"rank": 2, "targets": "mlp", "format": "kohya", "alpha_ratio": 1.0}])
    joint: list = field(default_factory=lambda: [
        ["background:red", "tone:sepia"], ["style:pixel_art", "tone:night"], ["objects:yellow", "background:blue"],
        ["background:red", "style:pixel_art", "tone:sepia"], ["objects:yellow", "background:blue", "tone:night"],
        ["objects:pink", "style:posterized", "tone:warm"]])
    joint_instance: dict = field(default_factory=lambda: {"rank": 8, "targets": "attn", "format": "peft",
                                                          "alpha_ratio": 1.0})
    samples_per_lora: int = 384
    family_weights: dict = field(default_factory=dict)
    loras_per_batch: int = 16
    samples_per_lora_in_batch: int = 4
    lr: float = 2e-3
    decay_fraction: float = 0.3
    onestep_fraction: float = 0.5
    sigma_start: float = 0.5
    bank_size: int = 48
    eval_pairs: int = 8
    eval_steps: list = field(default_factory=lambda: [1, 4])
    bar_db: float = 1.0
    near_duplicates: int = 12
    noise_loras: int = 12
    naming: dict = field(default_factory=lambda: {"accurate": 0.15, "paraphrased": 0.15, "creator": 0.3,
                                                  "misleading": 0.1, "opaque": 0.3})
    checkpoint_every: int = 50
    threads: int = 0
    seed: int = 0

    def __post_init__(self):
        names = [get_concept(c).name for c in (self.concepts or [c.name for c in all_concepts()])]
        self.concepts = names
        self.unseen_concepts = [get_concept(c).name for c in self.unseen_concepts]
        missing = sorted(set(self.unseen_concepts) - set(names))
        if missing:
            raise ValueError(f"unseen_concepts {missing} are not among the pool's concepts")
        for i, inst in enumerate([*self.instances, self.joint_instance]):
            _check_instance(inst, f"instances[{i}]" if i < len(self.instances) else "joint_instance")
        for combo in self.joint:
            for c in combo:
                get_concept(c)
        if not self.instances:
            raise ValueError("instances: at least one instance per concept is needed")
        from x2edit.data_pipeline.shapeworld.concepts import FAMILIES

        for family, w in self.family_weights.items():
            if family not in FAMILIES or not isinstance(w, (int, float)) or w < 1:
                raise ValueError(f"family_weights: {family!r}: {w!r} must be a family of {list(FAMILIES)} with a "
                                 "weight >= 1")
        if not 0 < self.sigma_start <= 1:
            raise ValueError(f"sigma_start must be in (0, 1], got {self.sigma_start}")
        bad = {k: v for k, v in self.naming.items() if k not in NAMINGS or not isinstance(v, (int, float)) or v < 0}
        if bad or not self.naming or sum(self.naming.values()) <= 0:
            raise ValueError(f"naming: {{kind: share}} over {list(NAMINGS)} with positive shares, got {self.naming!r}")


def _check_instance(inst: dict, key: str) -> None:
    unknown = sorted(set(inst) - {"rank", "targets", "format", "alpha_ratio"})
    if unknown:
        raise ValueError(f"{key}: unknown keys {unknown}; valid: rank, targets, format, alpha_ratio")
    if not isinstance(inst.get("rank"), int) or inst["rank"] < 1:
        raise ValueError(f"{key}.rank must be a positive integer, got {inst.get('rank')!r}")
    if inst.get("targets") not in TARGET_SETS:
        raise ValueError(f"{key}.targets must be one of {list(TARGET_SETS)}, got {inst.get('targets')!r}")
    if inst.get("format") not in FORMATS:
        raise ValueError(f"{key}.format must be one of {FORMATS}, got {inst.get('format')!r}")
    if inst["format"] in ("kohya", "comfyui") and inst["targets"] == "x2edit":
        raise ValueError(f"{key}: targets 'x2edit' (single blocks' q/k/v) cannot be written as {inst['format']}")


@dataclass
class LoraSpec:
    """One LoRA to make: adapter name, concepts, role and instance settings."""

    name: str
    concepts: list[str]
    role: str
    rank: int
    targets: str
    format: str
    alpha_ratio: float
    seed: int
    naming: str

    @property
    def key(self) -> str:
        return "+".join(self.concepts)


def plan_pool(config: PoolConfig) -> list[LoraSpec]:
    """The LoRAs to train, in a fixed order (a pure function of the config)."""
    rng = np.random.default_rng([config.seed, 0x504F4F4C])  # "POOL"
    specs = []
    for ci, concept in enumerate(config.concepts):
        for ii, inst in enumerate(config.instances):
            if concept in config.unseen_concepts:
                role = "unseen_concept"
            else:
                role = "heldout_instance" if ii == ci % len(config.instances) else "train"
            specs.append(LoraSpec(f"c{ci:02d}i{ii}", [concept], role, inst["rank"], inst["targets"], inst["format"],
                                  float(inst.get("alpha_ratio", 1.0)), int(rng.integers(2**31)),
                                  draw_naming(config.naming, rng)))
    j = config.joint_instance
    for k, combo in enumerate(config.joint):
        specs.append(LoraSpec(f"joint{k:02d}", [get_concept(c).name for c in combo], "joint", j["rank"], j["targets"],
                              j["format"], float(j.get("alpha_ratio", 1.0)), int(rng.integers(2**31)), "accurate"))
    return specs


# -- the stacked trainer ---------------------------------------------------------------------------


def one_hot_gates(names: list[str], owners: list[str], device=None) -> dict[str, torch.Tensor]:
    """{name: (B,) 1.0 where sample b belongs to that LoRA}: per-sample routing of a stacked batch."""
    owners_arr = np.asarray(owners)
    return {n: torch.as_tensor(owners_arr == n, dtype=torch.float32, device=device) for n in names}


class PoolTrainer:
    """Trains and measures many LoRAs of one base at once (see the module docstring)."""

    def __init__(self, config: PoolConfig, specs: list[LoraSpec]):
        from x2edit.adapters import AdapterConfig, adapter_names, inject_adapters, remove_adapter
        from x2edit.registry import load_pipeline

        self.config, self.specs = config, specs
        if config.threads:
            torch.set_num_threads(config.threads)
        self.pipe = load_pipeline(config.base)
        self.pipe.set_progress_bar_config(disable=True)
        for name in adapter_names(self.pipe.transformer):  # x2edit-tiny's editing adapter: LoRAs act on the base
            remove_adapter(self.pipe.transformer, name)
        self.pipe.transformer.requires_grad_(False)
        self.flow = LoraFlow(self.pipe, config.sigma_start)
        self.world = ConceptWorld(config.resolution)
        for spec in specs:
            torch.manual_seed(spec.seed)  # LoRA initialisation differs per instance
            inject_adapters(self.pipe.transformer, AdapterConfig(kind="lora", rank=spec.rank,
                                                                 alpha=spec.rank * spec.alpha_ratio,
                                                                 targets=list(TARGET_SETS[spec.targets])),
                            spec.name, dtype=torch.float32)
        self.params = [p for p in self.pipe.transformer.parameters() if p.requires_grad]
        self._banks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.prompts = sorted({p for c in all_concepts() for p in c.phrases()})

    def bank(self, spec: LoraSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """(source, target) tokens (N, T, C) of the training scenes of a spec's concepts. A held-out instance
        trains on scenes of its own (train-split seeds from ``HELDOUT_SCENES`` on), not its concept's training
        instances' scenes: retrieving it cannot lean on shared data."""
        start = HELDOUT_SCENES if spec.role == "heldout_instance" else 0
        key = (spec.key, start)
        if key not in self._banks:
            pairs = [self.world.pair(spec.concepts, seed=start + i, split="train") for i in range(self.config.bank_size)]
            self._banks[key] = (self.flow.tokens([p.source for p in pairs]), self.flow.tokens([p.target for p in pairs]))
        return self._banks[key]

    def _lr_factor(self, step: int, steps: int) -> float:
        decay = int(steps * self.config.decay_fraction)
        return 1.0 if step < steps - decay else max(0.0, (steps - step) / max(decay, 1))

    def slots(self) -> list[int]:
        """Spec indices in the order batches take them, each repeated by its family's weight."""
        weights = self.config.family_weights
        reps = [int(round(weights.get(s.concepts[0].split(":")[0], 1.0))) if s.role != "joint" else 1
                for s in self.specs]
        expanded = [i for i, r in enumerate(reps) for _ in range(r)]
        return [expanded[i] for i in np.random.default_rng([self.config.seed, 1]).permutation(len(expanded))]

    def batch(self, step: int) -> dict:
        """The chosen LoRAs and their samples for ``step`` (a pure function of seed and step)."""
        cfg = self.config
        order = self.slots()
        n, per = len(order), cfg.samples_per_lora_in_batch
        chosen = [self.specs[order[(step * min(cfg.loras_per_batch, n) + j) % n]]
                  for j in range(min(cfg.loras_per_batch, n))]
        rng = np.random.default_rng([cfg.seed, 2, step])
        src, tgt, owners, prompts = [], [], [], []
        for spec in chosen:
            s_bank, t_bank = self.bank(spec)
            idx = torch.as_tensor(rng.integers(len(s_bank), size=per))
            src.append(s_bank[idx])
            tgt.append(t_bank[idx])
            owners += [spec.name] * per
            concepts = [get_concept(c) for c in spec.concepts]
            # Half the prompts ask for the LoRA's own concept(s); the others are any concept's words, so a
            # LoRA does its concept whatever the instruction beside it (as a style LoRA does).
            prompts += [instruction(concepts, rng) if rng.random() < 0.5 else self.prompts[rng.integers(len(self.prompts))]
                        for _ in range(per)]
        s = cfg.sigma_start
        sigma = np.where(rng.random(len(owners)) < cfg.onestep_fraction, s, rng.uniform(0.05 * s, s, len(owners)))
        return {"names": list(dict.fromkeys(c.name for c in chosen)), "owners": owners, "source": torch.cat(src),
                "target": torch.cat(tgt), "prompts": prompts, "sigma": torch.as_tensor(sigma, dtype=torch.float32)}

    def train(self, out: Path, resume: bool = True) -> dict:
        cfg = self.config
        slots = len(self.slots())
        per_step = min(cfg.loras_per_batch, slots) * cfg.samples_per_lora_in_batch
        steps = math.ceil(slots * cfg.samples_per_lora / per_step)
        opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: self._lr_factor(k, steps))
        ckpt, start = out / "train_state.pt", 0
        if resume and ckpt.is_file():
            state = load_state(ckpt)
            self.pipe.transformer.load_state_dict(state["loras"], strict=False)
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            start = state["step"]
            logger.info("resuming the pool's training at step %d of %d", start, steps)
        size = (cfg.resolution, cfg.resolution)
        log = (out / "train_log.jsonl").open("a")
        t0, losses = time.perf_counter(), []
        for step in range(start, steps):
            b = self.batch(step)
            gates = one_hot_gates(b["names"], b["owners"])
            x = straight_path(b["source"], b["target"], b["sigma"], cfg.sigma_start)
            delta = self.flow.velocity_change(x, b["source"], b["sigma"], self.flow.encode(b["prompts"]), b["names"],
                                              [(lambda layer, g=gates: g, 1.0)], size)
            loss = flow_loss(delta, b["source"], b["target"], cfg.sigma_start).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if (step + 1) % 10 == 0 or step + 1 == steps:
                rate = (step + 1 - start) / (time.perf_counter() - t0)
                record = {"step": step + 1, "steps": steps, "loss": float(np.mean(losses[-10:])),
                          "s_per_step": 1 / rate, "eta_min": (steps - step - 1) / rate / 60}
                log.write(json.dumps(record) + "\n")
                log.flush()
                logger.info("pool step %d/%d loss %.4f (%.1f s/step, %.0f min left)", step + 1, steps,
                            record["loss"], record["s_per_step"], record["eta_min"])
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
                loras = {k: v for k, v in self.pipe.transformer.state_dict().items() if ".adapters." in k}
                torch.save({"loras": loras, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                            "step": step + 1}, ckpt.with_suffix(".tmp"))
                ckpt.with_suffix(".tmp").replace(ckpt)
        log.close()
        return {"steps": steps, "samples_per_step": per_step, "train_s": time.perf_counter() - t0,
                "final_loss": float(np.mean(losses[-20:])) if losses else None}

    @torch.no_grad()
    def gains(self, specs: list[LoraSpec], steps: int) -> dict[str, float]:
        """Mean edit gain (dB) of each LoRA on ``eval_pairs`` held-out scenes of its concepts, ``steps`` steps."""
        cfg, out = self.config, {}
        chunk = max(1, cfg.loras_per_batch * cfg.samples_per_lora_in_batch // cfg.eval_pairs)
        for i in range(0, len(specs), chunk):
            group = specs[i:i + chunk]
            pairs, owners, prompts = [], [], []
            for spec in group:
                rng = np.random.default_rng([cfg.seed, 3])
                for k in range(cfg.eval_pairs):
                    pairs.append(self.world.pair(spec.concepts, seed=k, split="eval"))
                    owners.append(spec.name)
                    prompts.append(instruction([get_concept(c) for c in spec.concepts], rng))
            gates = one_hot_gates([s.name for s in group], owners)
            outputs = self.flow.edit([p.source for p in pairs], prompts, [s.name for s in group],
                                     lambda sigma, k, g=gates: [(lambda layer: g, 1.0)], steps=steps)
            for spec in group:
                vals = [psnr(o, p.target) - psnr(p.source, p.target)
                        for o, p, n in zip(outputs, pairs, owners) if n == spec.name]
                out[spec.name] = float(np.mean(vals))
        return out

    def factors(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """{module: (A (r, K), B (N, r), scale)} of the trained LoRA ``name``."""
        from x2edit.adapters import adapter_layers

        return {m: (layer.adapters[name].lora_A[0].detach().clone(), layer.adapters[name].lora_B[0].detach().clone(),
                    float(layer.adapters[name].scaling))
                for m, layer in adapter_layers(self.pipe.transformer) if name in layer.adapters}


# -- files -------------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


NAMINGS = ("accurate", "paraphrased", "creator", "misleading", "opaque")
HELDOUT_SCENES = 100_000  # first train-split scene seed of held-out instances (their concept's others: 0, 1, ...)
_CREATORS = ("mystyle", "kx", "artbyjo", "lorafarm", "zenith", "pixelmage", "dreamer", "nova", "v1sion", "ckpt")
_CREATOR_WORDS = ("look", "vibe", "mix", "magic", "aesthetic", "flux", "dream", "core", "test", "pro")
_PARAPHRASE = {"background": "{w} backdrop", "objects": "{w} objects", "material": "{w} texture",
               "tint": "{w} color wash", "tone": "{w}", "style": "{w}"}  # tone and style words are phrases


def draw_naming(shares: dict[str, float], rng: np.random.Generator) -> str:
    kinds = [k for k in NAMINGS if shares.get(k, 0) > 0]
    p = np.array([shares[k] for k in kinds], dtype=float)
    return kinds[int(rng.choice(len(kinds), p=p / p.sum()))]


def lora_words(concepts: list[str], naming: str, uid: str) -> list[str] | None:
    """The words a file of ``naming`` says about itself: the canonical descriptions ("accurate"), other words for
    the concepts ("paraphrased": a synonym that is neither the canonical one nor the held-out one the
    unseen-phrasing queries use, in another construction), another concept's description ("misleading"), or
    None (creator and opaque names say nothing). A pure function of its arguments."""
    from x2edit.data_pipeline.shapeworld.concepts import _words, all_concepts

    rng = np.random.default_rng(int(uid, 16))
    if naming == "accurate":
        return [get_concept(c).description for c in concepts]
    if naming == "paraphrased":
        out = []
        for c in concepts:
            concept = get_concept(c)
            words = _words(concept.family, concept.value)
            middle = list(words[1:-1]) or [concept.value]
            out.append(_PARAPHRASE[concept.family].format(w=middle[int(rng.integers(len(middle)))]))
        return out
    if naming == "misleading":
        others = [k for k in all_concepts() if k.name not in concepts]
        return [others[int(rng.integers(len(others)))].description for _ in concepts]
    return None


def lora_header(concepts: list[str], fmt: str, rank: int, alpha: float, naming: str, uid: str) -> dict[str, str]:
    """Header metadata as trainers write it: kohya's ``ss_*`` fields, or ``modelspec.*`` for diffusers files,
    with the title and trigger words of its ``naming`` kind (``lora_words``; a creator's or opaque name
    otherwise)."""
    words = lora_words(concepts, naming, uid)
    title = " + ".join(words) if words else _file_name(concepts, naming, uid).removesuffix(".safetensors")
    if fmt in ("kohya", "comfyui"):
        header = {"ss_network_module": "networks.lora_flux", "ss_network_dim": str(rank),
                  "ss_network_alpha": f"{alpha:g}", "ss_base_model_version": "flux1",
                  "ss_output_name": _slug(title)}
        if words:
            header["ss_tag_frequency"] = json.dumps({"img": {w: 20 for w in words}})
        return header
    header = {"modelspec.title": title, "modelspec.architecture": "flux-1-dev/lora"}
    if words:
        header["modelspec.trigger_phrase"] = ", ".join(words)
    return header


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_name(concepts: list[str], naming: str, uid: str) -> str:
    words = lora_words(concepts, naming, uid)
    if words:
        return f"{_slug(' '.join(words))}_{uid}.safetensors"
    if naming == "creator":  # e.g. mystyle_vibe_v3_final: a handle, a word, a version, nothing of the concept
        rng = np.random.default_rng([int(uid, 16), 7])
        suffix = ("", "_final", "_fp16", "-e10", "_v2fix")[int(rng.integers(5))]
        return (f"{_CREATORS[int(rng.integers(len(_CREATORS)))]}_{_CREATOR_WORDS[int(rng.integers(len(_CREATOR_WORDS)))]}"
                f"_v{int(rng.integers(1, 9))}{suffix}_{uid[:4]}.safetensors")
    return f"lora_{uid}.safetensors"


def near_duplicate(factors: dict, rng: np.random.Generator, noise: float = 0.02) -> dict:
    """Another LoRA for the same update: each module re-factored at about half its rank by SVD, with
    ``noise`` relative Gaussian noise (what re-saving, pruning or light fine-tuning leaves)."""
    out = {}
    for m, (A, B, s) in factors.items():
        U, S, Vh = torch.linalg.svd(s * B.double() @ A.double(), full_matrices=False)
        r = max(1, A.shape[0] // 2)
        Bn, An = (U[:, :r] * S[:r].sqrt()).float(), (S[:r].sqrt()[:, None] * Vh[:r]).float()
        g = torch.Generator().manual_seed(int(rng.integers(2**31)))
        Bn = Bn + noise * Bn.norm() / math.sqrt(Bn.numel()) * torch.randn(Bn.shape, generator=g)
        out[m] = (An, Bn, 1.0)
    return out


def noise_lora(modules: dict[str, tuple[int, int]], rank: int, b_std: float, rng: np.random.Generator) -> dict:
    """Random factors with a trained LoRA's scale: A rows of unit-ish norm, B ~ N(0, b_std)."""
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    return {m: (torch.randn(rank, k, generator=g) / math.sqrt(k), torch.randn(n, rank, generator=g) * b_std, 1.0)
            for m, (k, n) in modules.items()}


def make_pool(config: PoolConfig, out: str | Path, resume: bool = True) -> dict:
    """Train, measure, keep and write the pool (see the module docstring); returns the manifest."""
    from x2edit.adapters import load_community_lora
    from x2edit.adapters.community import read_community_lora

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    specs = plan_pool(config)
    trainer = PoolTrainer(config, specs)
    logger.info("pool: %d LoRAs (%d concepts x %d instances + %d joint)", len(specs), len(config.concepts),
                len(config.instances), len(config.joint))
    training = trainer.train(out, resume=resume)
    gains = {k: trainer.gains(specs, k) for k in config.eval_steps}
    rng = np.random.default_rng([config.seed, 4])
    entries = []
    for spec in specs:
        one = gains[config.eval_steps[0]][spec.name]
        passed = spec.role == "joint" or one >= config.bar_db
        folder = "joint" if spec.role == "joint" else ("loras" if passed else "rejected")
        uid = f"{int(rng.integers(16**8)):08x}"
        path = out / folder / _file_name(spec.concepts, spec.naming, uid)
        write_lora(path, trainer.factors(spec.name), spec.format,
                   lora_header(spec.concepts, spec.format, spec.rank, spec.rank * spec.alpha_ratio, spec.naming, uid),
                   kohya_alpha_ratio=spec.alpha_ratio)
        entries.append({**dataclasses.asdict(spec), "file": str(path.relative_to(out)),
                        "gain_db": {str(k): gains[k][spec.name] for k in config.eval_steps},
                        "passed": passed, "sha256": sha256_file(path)})
    kept = [e for e in entries if e["passed"] and e["role"] in ("heldout_instance", "unseen_concept")]

    # Near-duplicates of held-out LoRAs: another rank and format, slightly perturbed; measured like the rest.
    dups = []
    for k, i in enumerate(rng.choice(len(kept), size=min(config.near_duplicates, len(kept)), replace=False)):
        src = kept[int(i)]
        factors = near_duplicate(read_community_lora(out / src["file"]), rng)
        formats = [f for f in ("kohya", "comfyui", "peft", "diffusers") if f != src["format"]
                   and (f in ("peft", "diffusers") or kohya_able(factors))]
        fmt = formats[k % len(formats)]
        uid = f"{int(rng.integers(16**8)):08x}"
        naming = draw_naming(config.naming, rng)
        rank = max(A.shape[0] for A, _, _ in factors.values())
        path = write_lora(out / "loras" / _file_name(src["concepts"], naming, uid), factors, fmt,
                          lora_header(src["concepts"], fmt, rank, rank, naming, uid))
        name = f"dup{k:02d}"
        load_community_lora(trainer.pipe.transformer, path, name)
        spec = LoraSpec(name, src["concepts"], "near_duplicate", rank, src["targets"], fmt, 1.0, 0, naming)
        dups.append((spec, path, src["name"]))
    dup_gains = {k: trainer.gains([d[0] for d in dups], k) for k in config.eval_steps} if dups else {}
    for spec, path, of in dups:
        entries.append({**dataclasses.asdict(spec), "file": str(path.relative_to(out)), "near_duplicate_of": of,
                        "gain_db": {str(k): dup_gains[k][spec.name] for k in config.eval_steps},
                        "passed": dup_gains[config.eval_steps[0]][spec.name] >= config.bar_db,
                        "sha256": sha256_file(path)})

    # Noise LoRAs: random weights at a trained LoRA's scale, named after a concept they do not do.
    b_std = float(np.median([B.std().item() for e in entries if e["role"] == "train" and e["passed"]
                             for _, B, _ in read_community_lora(out / e["file"]).values()] or [0.01]))
    all_shapes = {}
    for spec in specs:
        all_shapes.setdefault(spec.targets, {m: (A.shape[1], B.shape[0]) for m, (A, B, _)
                                             in trainer.factors(spec.name).items()})
    for k in range(config.noise_loras):
        targets = list(all_shapes)[k % len(all_shapes)]
        shapes = all_shapes[targets]
        rank = int(rng.choice([2, 4, 8]))
        fmt = ("peft", "kohya", "diffusers")[k % 3] if targets != "x2edit" else "peft"
        claimed = [config.concepts[int(rng.integers(len(config.concepts)))]]
        uid = f"{int(rng.integers(16**8)):08x}"
        path = write_lora(out / "loras" / _file_name(claimed, "accurate", uid), noise_lora(shapes, rank, b_std, rng), fmt,
                          lora_header(claimed, fmt, rank, rank, "accurate", uid))
        entries.append({"name": f"noise{k:02d}", "concepts": [], "claimed": claimed, "role": "noise", "rank": rank,
                        "targets": targets, "format": fmt, "file": str(path.relative_to(out)), "passed": False,
                        "naming": "accurate", "sha256": sha256_file(path)})

    trained = [e for e in entries if e["role"] in ("train", "heldout_instance", "unseen_concept")]
    manifest = {
        "config": dataclasses.asdict(config), "training": training, "wall_s": time.perf_counter() - t0,
        "bar_db": config.bar_db,
        "summary": {"trained": len(trained), "passed": sum(e["passed"] for e in trained),
                    "concepts_with_a_kept_lora": len({c for e in trained if e["passed"] for c in e["concepts"]}),
                    "in_pool": sum(1 for e in entries if e["file"].startswith("loras/"))},
        "loras": entries,
    }
    (out / "pool.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def load_manifest(pool_dir: str | Path) -> dict:
    """The ``pool.json`` of a pool directory."""
    path = Path(pool_dir) / "pool.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: make the pool with `x2edit lora pool --out {pool_dir}`")
    return json.loads(path.read_text())
