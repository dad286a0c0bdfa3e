"""GPU memory and step time of X2Edit MoE-LoRA training on a full-size FLUX transformer.

One training step as the trainer runs it (x2edit/training/trainer.py): a frozen bfloat16 FLUX.1
transformer (FLUX.1-dev's published config; FLUX.1 Kontext [dev]'s transformer has the same) with
random weights, X2Edit's MoE-LoRA (float32, X2Edit's placement, shared + top-2 of 12 experts,
rank 64, router on [token ; task embedding]), routed gradient checkpointing, an edit batch at
1024 x 1024 (4096 target + 4096 Kontext reference + 512 text tokens per sample), flow-matching +
router balance + X2Edit's contrastive loss on the 19 double blocks' target tokens, backward, grad
clipping, AdamW on the adapter. The settings come from a training recipe (default
configs/flux_kontext/x2edit.yaml, read by training.config.load_config); flags override them.

    python benchmarks/train_memory.py --out DIR                 # on CUDA: measure + estimate (~3 min on an H100)
    python benchmarks/train_memory.py --out DIR --estimate      # anywhere: the meta-device estimate only (~30 s)
    python benchmarks/train_memory.py --out DIR --measure       # CUDA only; exit status 2 without CUDA
    python benchmarks/train_memory.py --out DIR --batch 4 2 --contrastive both   # more runs, one model
    python benchmarks/train_memory.py --out DIR --config tiny --resolution 64 --batch 2   # a small model

Writes OUT/train_memory.json and OUT/train_memory.md.

Measured (CUDA): torch.cuda.max_memory_allocated / max_memory_reserved over the steady steps (after
one warm-up step that creates the optimizer state), the median step time, and the split: base
weights, adapter weights, gradients, optimizer state (each read off the tensors), activations =
peak - all of those (an upper bound: not every gradient is alive at the peak). The VAE, CLIP-L and
T5-XXL are not built: their weight bytes, counted from their published configs on the meta device,
are added as constants (T5-XXL and CLIP-L only where the recipe keeps the text encoders on the GPU).
Inputs are random tensors (no VAE encoding, no text encoding). kernels.lora_linear runs its torch
backend unless --kernels says otherwise (faster end to end than the Triton one in the measurements
so far, and what the estimate runs).

Estimated (meta device; the default without CUDA): no memory and no GPU are used; every number is
labelled an estimate, unmeasured.
  - weights, gradients and optimizer state: exact bytes from the real model built on the meta
    device with the real injection (AdamW: two float32 moments per trainable parameter;
    8-bit AdamW: one byte per moment plus float32 block scales for tensors of >= 4096 elements);
  - activations: one training step in the steady state (the optimizer state made first by a step
    on zero gradients) runs on meta tensors through the real code (the trainer's forward call
    layout, training.losses, routed checkpointing; AdamW one parameter at a time standing in for the
    fused AdamW the trainer runs on CUDA),
    while a dispatch mode follows every tensor storage from allocation to release: the peak of
    live bytes is the estimate, with checkpointing's recomputation and the order in which backward
    frees things included;
  - attention: the meta device runs SDPA's math path, which keeps the (B, H, L, L) probabilities
    for backward (28 GiB per block at 1024 x 1024 and batch 4); FlashAttention on the GPU keeps q,
    k, v, out and the logsumexp (B, H, L) instead. The estimate runs a stand-in that keeps exactly
    those and allocates FlashAttention-2's backward buffers (dq, dk, dv, a float32 dq
    accumulator); both values are reported for one block;
  - the contrastive loss skips anchors without a same-task partner, which needs the data (not
    available on meta); the benchmark's batches are same-task pairs, so the estimate takes "every
    anchor has a partner" (batch 1 on one process has none: the term is then off, as in training);
  - left out: the CUDA context and kernels (~0.5-1 GB), cuBLAS/cuDNN workspaces, the caching
    allocator's rounding and fragmentation (reserved - allocated, typically 1-10%), the VAE and
    text encoders' own activations (they run before the transformer, under no_grad), the Triton
    kernels' saved tensors (the estimate runs the torch reference of kernels.lora_linear), and
    8-bit AdamW's own temporaries (the step is simulated with torch's AdamW).
The breakdown also lists, per block, the bytes saved for backward (saved_tensors_hooks,
deduplicated by storage) and what the forward leaves alive for backward.

A GPU session. The device machine lacks diffusers: carry it as a wheel, fetched here once, in the
repository root:
    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1
(its other needs are on the machine; Python 3.12 takes importlib.metadata from the standard library).
Then one run (carry [".whl"], timeout_s 540; about 4-5 minutes of device time on an H100), this line:
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit; nvidia-smi --query-gpu=name,memory.total --format=csv; python3 benchmarks/train_memory.py --out $OUT --contrastive both 2>&1 | tee $OUT/log.txt; python3 -m pytest -q -m gpu tests/training/test_train_memory.py 2>&1 | tail -5
It measures the recipe (batch 4) with and without the contrastive loss, writes the estimate beside
each, and runs the small-model GPU test. Put the measured peak into README.md ("Training on real
FLUX") and the recipe's header.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import platform
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F

# Run as a script from anywhere: the repository root (not benchmarks/) must be first on the path.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path[:1]:
    sys.path.insert(0, str(ROOT))

from benchmarks.lora_kernels import FLUX_DEV_CONFIG, build_flux  # noqa: E402

DEFAULT_RECIPE = ROOT / "configs" / "flux_kontext" / "x2edit.yaml"

# name -> FluxTransformer2DModel config; "flux.1-dev" is also FLUX.1 Kontext [dev]'s transformer.
CONFIGS = {
    "flux.1-dev": FLUX_DEV_CONFIG,
    "tiny": dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                 axes_dims_rope=(4, 6, 6)),
}

GIB = 2**30
# One "80 GB" H100 (H100 80GB HBM3): 81559 MiB as nvidia-smi reports it on the device machines.
H100_BYTES = 81559 * 2**20
CUDA_CONTEXT_BYTES = 1 * GIB  # CUDA context + kernel images: not visible to torch's allocator
FIT_MARGIN = 0.10  # "fits": estimate/measurement + context within 90% of the card
PIXELS_PER_TOKEN = 16  # FLUX: VAE 8x down, then 2x2 latent patches packed into one token


# --------------------------------------------------------------------------------------------------
# What one run is


@dataclasses.dataclass
class Spec:
    """One configuration of the step: the recipe's settings, with the flags applied.

    Args:
        config_name, config: the FluxTransformer2DModel config and its name.
        adapter: the ``AdapterConfig`` injected (the recipe's ``adapter``).
        batch, resolution, text_tokens: samples per step, image side in pixels, text tokens per sample.
        checkpointing: routed gradient checkpointing (``model.gradient_checkpointing``).
        contrastive: X2Edit's contrastive loss at ``contrastive_weight`` (on only where a batch has pairs).
        text_encoder_on_gpu: T5-XXL and CLIP-L on the GPU (``model.text_encoder_device: null``).
        optimizer: "adamw" or "adamw8bit" (``optim.use_8bit_adam``).
        loss, optim: the recipe's ``LossConfig`` and ``OptimConfig`` (weights, lr, betas, clipping).
    """

    config_name: str
    config: dict
    adapter: object
    batch: int
    resolution: int
    text_tokens: int
    checkpointing: bool
    contrastive: bool
    contrastive_weight: float
    text_encoder_on_gpu: bool
    optimizer: str
    loss: object
    optim: object

    @property
    def image_tokens(self) -> int:
        return (self.resolution // PIXELS_PER_TOKEN) ** 2

    @property
    def contrastive_active(self) -> bool:
        """The contrastive term needs a same-task partner in the batch (one process: batch >= 2)."""
        return self.contrastive and self.batch >= 2

    def label(self) -> str:
        return (f"batch {self.batch}, {self.resolution}px ({self.image_tokens}+{self.image_tokens}+{self.text_tokens} "
                f"tokens), contrastive {'on' if self.contrastive_active else 'off'}")

    def summary(self) -> dict:
        a = self.adapter
        return {"config": self.config_name, "blocks": [self.config["num_layers"], self.config["num_single_layers"]],
                "batch": self.batch, "resolution": self.resolution,
                "target_tokens": self.image_tokens, "reference_tokens": self.image_tokens,
                "text_tokens": self.text_tokens, "gradient_checkpointing": self.checkpointing,
                "contrastive": self.contrastive_active, "contrastive_weight": self.contrastive_weight,
                "text_encoder_on_gpu": self.text_encoder_on_gpu, "optimizer": self.optimizer,
                "adapter": {"kind": a.kind, "rank": a.rank, "num_experts": a.num_experts, "top_k": a.top_k,
                            "shared_expert": a.shared_expert, "router": a.router, "targets": a.targets}}


def make_specs(args) -> list[Spec]:
    """Specs from the recipe YAML and the command line: one per batch size (x contrastive on/off)."""
    from x2edit.training.config import load_config

    recipe = load_config(args.recipe)
    if args.config in CONFIGS:
        name, config = args.config, dict(CONFIGS[args.config])
    else:
        path = Path(args.config)
        if not path.is_file():
            raise ValueError(f"--config: {args.config!r} is neither one of {list(CONFIGS)} nor a JSON file")
        name, config = path.stem, json.loads(path.read_text())
    adapter = recipe.adapter
    changes = {k: v for k, v in (("rank", args.rank), ("num_experts", args.experts)) if v is not None}
    if "num_experts" in changes and adapter.top_k is not None:
        changes["top_k"] = min(adapter.top_k, changes["num_experts"])
    adapter = dataclasses.replace(adapter, **changes)
    resolution = args.resolution or recipe.data.resolution
    if resolution % PIXELS_PER_TOKEN:
        raise ValueError(f"--resolution must be a multiple of {PIXELS_PER_TOKEN} pixels, got {resolution}")
    text_encoder_on_gpu = (recipe.model.text_encoder_device is None if args.text_encoder is None
                           else args.text_encoder == "gpu")
    optimizer = args.optimizer or ("adamw8bit" if recipe.optim.use_8bit_adam else "adamw")
    checkpointing = recipe.model.gradient_checkpointing if args.checkpointing is None else args.checkpointing
    wants = {"on": [True], "off": [False], "both": [True, False]}[args.contrastive] if args.contrastive else \
        [recipe.loss.contrastive_weight > 0]
    specs = []
    for batch in args.batch or [recipe.batch_size]:
        for contrastive in wants:
            spec = Spec(name, config, adapter, batch, resolution, args.text_tokens or recipe.model.max_text_tokens,
                        checkpointing, contrastive, recipe.loss.contrastive_weight or 0.2, text_encoder_on_gpu,
                        optimizer, recipe.loss, recipe.optim)
            if contrastive and not spec.contrastive_active and len(wants) == 2:
                continue  # batch 1: "on" would be the same run as "off"
            specs.append(spec)
    return specs


# --------------------------------------------------------------------------------------------------
# The model and one training step (shared by the measured and the estimated path)


def build_model(spec: Spec, device: str):
    """The frozen bf16 transformer with X2Edit's MoE-LoRA in float32, as the trainer sets it up.

    On "meta" nothing is allocated; on CUDA both are built directly on the GPU (no CPU copy).
    """
    from accelerate import init_empty_weights

    from x2edit.adapters import enable_gradient_checkpointing, inject_adapters

    if device == "meta":
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with init_empty_weights():
                from diffusers import FluxTransformer2DModel

                model = FluxTransformer2DModel(**spec.config)
        finally:
            torch.set_default_dtype(previous)
        adapter_place = init_empty_weights()
    else:
        model = build_flux(spec.config, device, torch.bfloat16)
        adapter_place = torch.device(device)
    with adapter_place:  # adapters are created where they live: no 4 GB float32 detour through the CPU
        inject_adapters(model, spec.adapter, dtype=torch.float32)
    if spec.checkpointing:
        enable_gradient_checkpointing(model)  # replays the task routing in the recomputation
    return model.train()


def make_optimizer(spec: Spec, params: list):
    o = spec.optim
    if spec.optimizer == "adamw8bit":
        import bitsandbytes as bnb  # checked before anything is built

        return bnb.optim.AdamW8bit(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    # The trainer runs fused AdamW on CUDA (no foreach copies of the moments). Fused kernels do not run on
    # meta tensors: the estimate steps one parameter at a time (foreach=False), whose temporaries are at
    # most one parameter's size, as the fused kernel's are.
    kind = {"fused": True} if params[0].device.type == "cuda" else {"foreach": False}
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, **kind)


def edit_batch(spec: Spec, device, seed: int) -> dict:
    """Random stand-ins for what the trainer feeds the transformer (latent tokens, T5/CLIP embeddings).

    Tasks come in same-task pairs ([0, 0, 1, 1, ...]) so that every contrastive anchor has a partner.
    """
    cfg, B, T, L = spec.config, spec.batch, spec.image_tokens, spec.text_tokens
    side = spec.resolution // PIXELS_PER_TOKEN
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        if device == "meta":
            return torch.empty(*shape, device="meta", dtype=dtype)
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(device=device, dtype=dtype)
    ref_ids = ids.clone()
    ref_ids[:, 0] = 1  # Kontext: reference tokens are marked by position-id coordinate 1
    sigmas = torch.rand(B, generator=g).clamp(1e-4, 1 - 1e-4).to(device)
    return {"x0": randn(B, T, cfg["in_channels"]), "noise": randn(B, T, cfg["in_channels"]),
            "reference": randn(B, T, cfg["in_channels"]), "ids": ids, "ref_ids": ref_ids, "sigmas": sigmas,
            "prompt_embeds": randn(B, L, cfg["joint_attention_dim"]),
            "pooled": randn(B, cfg["pooled_projection_dim"]),
            "text_ids": torch.zeros(L, 3, device=device, dtype=dtype),
            "task": torch.tensor([i // 2 for i in range(B)], device=device)}


def step_loss(spec: Spec, model, batch: dict) -> torch.Tensor:
    """Forward and loss, laid out as Trainer.compute_loss does it: flow matching on the target tokens
    + balance_weight * router balance + contrastive_weight * X2Edit's contrastive loss."""
    from x2edit.adapters import routing_context
    from x2edit.training.losses import BlockOutputs, contrastive_loss, flow_matching_loss, flow_matching_pair

    x0, sigmas = batch["x0"], batch["sigmas"]  # x0: (B, T, C) target latent tokens
    xt, target = flow_matching_pair(x0, sigmas, noise=batch["noise"])
    T = x0.shape[1]
    guidance = torch.full((len(x0),), 1.0, device=x0.device) if model.config.guidance_embeds else None
    # The double blocks' target-token outputs stay alive until backward: part of what is measured.
    blocks = BlockOutputs(model, spec.loss.contrastive_blocks, num_tokens=T) if spec.contrastive_active else None
    call = dict(hidden_states=torch.cat([xt, batch["reference"]], 1), timestep=sigmas, guidance=guidance,
                pooled_projections=batch["pooled"], encoder_hidden_states=batch["prompt_embeds"],
                txt_ids=batch["text_ids"], img_ids=torch.cat([batch["ids"], batch["ref_ids"]], 0), return_dict=False)
    with routing_context(model, task_ids=batch["task"]) as routing:
        with blocks or contextlib.nullcontext():
            pred = model(**call)[0][:, :T]  # (B, T, C): the reference tokens' outputs are dropped
    loss = flow_matching_loss(pred, target, sigmas)
    if routing.balance_loss is not None and spec.loss.balance_weight > 0:
        loss = loss + spec.loss.balance_weight * routing.balance_loss
    if blocks is not None:
        terms = [contrastive_loss(h, batch["task"], spec.loss.contrastive_temperature, spec.loss.contrastive_pool)
                 for h in blocks.outputs]
        terms = [t for t in terms if t is not None]
        if terms:
            loss = loss + spec.contrastive_weight * torch.stack(terms).mean()
    return loss


def finish_step(spec: Spec, optimizer, params: list) -> None:
    """After backward, as Trainer.train: clip, step, drop the gradients."""
    if spec.optim.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, spec.optim.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_step(spec: Spec, model, optimizer, params: list, batch: dict) -> torch.Tensor:
    """One optimizer step; returns the loss."""
    loss = step_loss(spec, model, batch)
    loss.backward()
    finish_step(spec, optimizer, params)
    return loss.detach()


# --------------------------------------------------------------------------------------------------
# Exact sizes


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def weight_bytes(model) -> dict:
    """Base (frozen) and adapter weight bytes, and the trainable parameter count."""
    adapter = [p for n, p in model.named_parameters() if ".adapters." in n]
    base = [p for n, p in model.named_parameters() if ".adapters." not in n]
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {"base_weights": tensor_bytes(base) + tensor_bytes(model.buffers()),
            "adapter_weights": tensor_bytes(adapter), "gradients": tensor_bytes(trainable),
            "base_params": sum(p.numel() for p in base), "adapter_params": sum(p.numel() for p in adapter),
            "trainable_params": sum(p.numel() for p in trainable)}


def optimizer_state_bytes(optimizer: str, params: list) -> int:
    """AdamW: exp_avg + exp_avg_sq in float32 (+ a step scalar); bitsandbytes' AdamW8bit: uint8 moments
    with one float32 absmax per 256-element block for tensors of >= 4096 elements, float32 below."""
    total = 0
    for p in params:
        n = p.numel()
        if optimizer == "adamw8bit" and n >= 4096:
            total += 2 * n + 2 * 4 * math.ceil(n / 256)
        else:
            total += 2 * 4 * n
        total += 4
    return total


# VAE, CLIP-L and T5-XXL of FLUX.1 [dev] / Kontext [dev] (their published configs): weights only.
def companion_weight_bytes() -> dict:
    """bfloat16 weight bytes of the components the benchmark does not build, counted on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with init_empty_weights():
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2, use_quant_conv=False, use_post_quant_conv=False)
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                            projection_dim=768, hidden_act="quick_gelu"))
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                     num_heads=64, feed_forward_proj="gated-gelu", tie_word_embeddings=False))
    # T5's encoder.embed_tokens is its `shared` embedding (one tensor in the published checkpoint: 4.76B
    # parameters); transformers 5 builds it as a second tensor unless the weights tie it.
    t5_params = sum(p.numel() for n, p in t5.named_parameters() if n != "encoder.embed_tokens.weight")
    return {"vae": 2 * sum(p.numel() for p in vae.parameters()),
            "clip_l": 2 * sum(p.numel() for p in clip.parameters()), "t5_xxl": 2 * t5_params}


def constants_for(spec: Spec, companions: dict) -> dict:
    """Weights of components not built, that the trainer keeps on the GPU (the VAE always)."""
    if spec.config_name != "flux.1-dev":
        return {}
    out = {"vae": companions["vae"]}
    if spec.text_encoder_on_gpu:
        out.update(clip_l=companions["clip_l"], t5_xxl=companions["t5_xxl"])
    return out


# --------------------------------------------------------------------------------------------------
# The meta-device estimate


class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Follows every storage allocated under it from allocation to release; ``peak`` is the most bytes
    alive at once. Works on meta tensors (storages keep their Python objects, so a weakref sees the free).

    Args:
        existing: tensors allocated before (the weights): views of them (``W.t()`` in every linear) are
            not new memory.
    """

    def __init__(self, existing=()):
        super().__init__()
        self.existing = self.keys(existing)
        self.live: dict[int, tuple[weakref.ref, int]] = {}
        self.current = self.peak = 0
        self.phase, self.peak_phase = "", ""  # set by the caller: where the peak happened
        self.phase_peaks: dict[str, int] = {}
        self.at_peak: set[int] = set()
        self._snapshot_at = self.snapshots = 0

    def _freed(self, key: int) -> None:
        self.current -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.live and key not in self.existing:
                    n = storage.nbytes()
                    self.live[key] = (weakref.ref(storage, lambda _, k=key: self._freed(k)), n)
                    self.current += n
        if self.current > self.phase_peaks.get(self.phase, 0):
            self.phase_peaks[self.phase] = self.current
        if self.current > self.peak:
            self.peak, self.peak_phase = self.current, self.phase
            if self.peak > self._snapshot_at * 1.002:  # which storages make the peak (to 0.2%)
                self.at_peak, self._snapshot_at = set(self.live), self.peak
                self.snapshots += 1
        return out

    @staticmethod
    def keys(tensors) -> set[int]:
        return {t.untyped_storage()._cdata for t in tensors}


class _FlashAttention(torch.autograd.Function):
    """Stands in for SDPA on meta tensors with FlashAttention-2's memory: it keeps q, k, v, out and the
    logsumexp (B, H, L) float32 for backward, whose buffers are dq, dk, dv and a float32 dq accumulator."""

    @staticmethod
    def forward(ctx, q, k, v):
        B, H, L, _ = q.shape
        out = q.new_empty(B, L, H, v.shape[-1]).transpose(1, 2)  # (B, H, L, D), written as (B, L, H, D)
        lse = q.new_empty(B, H, L, dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq_accum = q.new_empty(q.shape, dtype=torch.float32)  # noqa: F841 (alive while dq, dk, dv are made)
        softmax_d = lse.new_empty(lse.shape)  # noqa: F841
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class MetaAttention:
    """While entered, SDPA on meta tensors goes to ``_FlashAttention`` (``flash``) or to the meta device's
    own SDPA (the math path, which keeps the (B, H, L, L) attention probabilities for backward).

    torch.nn.functional's attribute is swapped for the duration, not a TorchFunctionMode: checkpointing
    recomputes blocks in backward, where such modes are not active, and the recomputation must save what
    the forward saved. ``phase`` is "attention" while an SDPA call runs (for ``SavedBytes``).
    """

    def __init__(self, flash: bool = True):
        self.flash, self.phase = flash, "other"

    def __enter__(self):
        self._original = original = F.scaled_dot_product_attention

        def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
            self.phase = "attention"
            try:
                if self.flash and query.is_meta and attn_mask is None and not dropout_p and not is_causal:
                    return _FlashAttention.apply(query, key, value)
                return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                **kwargs)
            finally:
                self.phase = "other"

        torch.nn.functional.scaled_dot_product_attention = sdpa
        return self

    def __exit__(self, *exc):
        torch.nn.functional.scaled_dot_product_attention = self._original
        return False


class AllAnchorsPaired(torch.overrides.TorchFunctionMode):
    """The contrastive loss's two data-dependent steps (``if not valid.any()`` and ``x[valid]``) on meta
    tensors read as "every anchor has a same-task partner", which the benchmark's same-task pairs make
    true (the forward only: backward does not branch on data)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__bool__ and args[0].is_meta:
            return True
        if (func is torch.Tensor.__getitem__ and args[0].is_meta and isinstance(args[1], torch.Tensor)
                and args[1].dtype == torch.bool and args[1].shape == args[0].shape[:1]):
            return args[0].clone()  # an all-true mask selects every row
        return func(*args, **kwargs)


class SavedBytes:
    """Bytes saved for backward under it (``torch.autograd.graph.saved_tensors_hooks``), each storage once,
    minus ``exclude`` storages (parameters, the block's own inputs), by phase of ``MetaAttention``."""

    def __init__(self, mode: MetaAttention, exclude: set[int] = frozenset()):
        self.mode, self.exclude, self.seen, self.by_phase = mode, set(exclude), set(), {}

    def _pack(self, t):
        storage = t.untyped_storage()
        if storage._cdata not in self.seen and storage._cdata not in self.exclude:
            self.seen.add(storage._cdata)
            self.by_phase[self.mode.phase] = self.by_phase.get(self.mode.phase, 0) + storage.nbytes()
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.by_phase.values())


def block_saved_bytes(spec: Spec, model, flash: bool) -> dict:
    """Bytes one double and one single block save for backward at this batch (what a recomputation in
    backward holds), with their attention share; the block's inputs and the weights not counted."""
    from x2edit.adapters import routing_context

    B, L = spec.batch, spec.text_tokens
    Timg, C = 2 * spec.image_tokens, model.inner_dim
    ids = torch.zeros(L + Timg, 3, device="meta")
    rotary = model.pos_embed(ids)
    out = {}
    for kind, block in (("double", model.transformer_blocks[0]), ("single", model.single_transformer_blocks[0])):
        hidden = torch.empty(B, Timg, C, device="meta", dtype=torch.bfloat16, requires_grad=True)
        text = torch.empty(B, L, C, device="meta", dtype=torch.bfloat16, requires_grad=True)
        temb = torch.empty(B, C, device="meta", dtype=torch.bfloat16)
        exclude = LiveBytes.keys([*model.parameters(), hidden, text, temb, *rotary])
        mode = MetaAttention(flash=flash)
        with mode, routing_context(model, task_ids=torch.zeros(B, dtype=torch.long, device="meta")):
            with SavedBytes(mode, exclude) as saved:
                block(hidden, text, temb, rotary)
        out[kind] = {"saved": saved.total, "attention": saved.by_phase.get("attention", 0)}
    return out


def simulate(spec: Spec, model) -> dict:
    """One training step on the meta device, in the steady state (AdamW's state already made): the peak of
    the bytes allocated during the step, the phase it falls in, and how much of it is gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(dataclasses.replace(spec, optimizer="adamw"), params)
    for p in params:  # a step on zero gradients makes the optimizer state, outside the tracker
        p.grad = torch.zeros_like(p)
    finish_step(spec, optimizer, params)
    tracker = LiveBytes(existing=[*model.parameters(), *model.buffers(), *optimizer_state(optimizer)])
    mode = MetaAttention(flash=True)
    with tracker, mode:
        batch = edit_batch(spec, "meta", seed=0)
        tracker.phase = "forward"
        with SavedBytes(mode, LiveBytes.keys(model.parameters())) as saved, AllAnchorsPaired():
            loss = step_loss(spec, model, batch)
        tracker.phase = "backward"
        loss.backward()
        grads = {p.grad.untyped_storage()._cdata: p.grad.numel() * p.grad.element_size() for p in params}
        tracker.phase = "optimizer step"  # clipping and AdamW's temporaries
        finish_step(spec, optimizer, params)
        del loss, batch
    return {"dynamic_peak": tracker.peak, "peak_phase": tracker.peak_phase, "phase_peaks": tracker.phase_peaks,
            "gradients_in_peak": sum(n for k, n in grads.items() if k in tracker.at_peak),
            "forward_saved_for_backward": saved.total}  # what the forward leaves for backward


def optimizer_state(optimizer) -> list[torch.Tensor]:
    return [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]


def estimate(spec: Spec, companions: dict, model=None) -> dict:
    """The meta-device estimate of one spec (see the module docstring); every number unmeasured.

    Args:
        model: ``build_model(spec, "meta")`` if already built (specs that differ only in batch and loss share it).
    """
    t0 = time.perf_counter()
    model = model if model is not None else build_model(spec, "meta")
    w = weight_bytes(model)
    params = [p for p in model.parameters() if p.requires_grad]
    sim = simulate(spec, model)
    blocks = {"flash": block_saved_bytes(spec, model, flash=True),
              "meta_sdpa": block_saved_bytes(spec, model, flash=False)}
    state = optimizer_state_bytes(spec.optimizer, params)  # alive through the step
    activations = sim["dynamic_peak"] - sim["gradients_in_peak"]
    constants = constants_for(spec, companions)
    static = w["base_weights"] + w["adapter_weights"] + sum(constants.values()) + state
    peak = static + sim["dynamic_peak"]
    per_block = {kind: {"saved_for_backward": blocks["flash"][kind]["saved"],
                        "attention_flash": blocks["flash"][kind]["attention"],
                        "attention_meta_sdpa": blocks["meta_sdpa"][kind]["attention"]}
                 for kind in ("double", "single")}
    return {
        "kind": "estimate (meta device, unmeasured)",
        "spec": spec.summary(),
        "params": {k: w[k] for k in ("base_params", "adapter_params", "trainable_params")},
        "bytes": {
            "base_weights": w["base_weights"], "adapter_weights": w["adapter_weights"],
            "constants_not_built": constants, "gradients": w["gradients"],
            "gradients_alive_at_peak": sim["gradients_in_peak"], "optimizer_state": state,
            "activations_at_peak": activations,
            "forward_saved_for_backward": sim["forward_saved_for_backward"], "per_block": per_block,
            "peak": int(peak),
        },
        "peak_during": sim["peak_phase"],
        # weights + optimizer state + constants + the bytes allocated in each phase at its own peak
        "peak_by_phase": {k: int(static + v) for k, v in sim["phase_peaks"].items() if k},
        "fits_h100_80gb": fit(peak),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def fit(peak_bytes: float) -> dict:
    """Whether ``peak_bytes`` + the CUDA context stays within (1 - FIT_MARGIN) of one 80 GB H100."""
    need = peak_bytes + CUDA_CONTEXT_BYTES
    budget = (1 - FIT_MARGIN) * H100_BYTES
    return {"fits": need <= budget, "needed_with_context": int(need), "budget": int(budget),
            "headroom_to_full_card": int(H100_BYTES - need)}


# --------------------------------------------------------------------------------------------------
# The measurement (CUDA)


def measure_all(specs: list[Spec], companions: dict, steps: int, log=print) -> list[dict]:
    """Build the model once on the GPU, then run ``steps`` training steps per spec (the first a warm-up
    that creates the optimizer state); peak memory over the steady steps and their median time."""
    first = specs[0]
    for spec in specs[1:]:  # make_specs varies only the batch and the contrastive term
        assert (spec.config, spec.adapter, spec.checkpointing) == (first.config, first.adapter, first.checkpointing)
    t0 = time.perf_counter()
    model = build_model(first, "cuda")
    w = weight_bytes(model)
    built = torch.cuda.memory_allocated()
    log(f"built in {time.perf_counter() - t0:.0f} s: {built / GIB:.2f} GiB allocated (base "
        f"{w['base_weights'] / GIB:.2f} + adapters {w['adapter_weights'] / GIB:.2f} GiB)")
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for spec in sorted(specs, key=lambda s: s.batch):  # smallest first: an out-of-memory run ends the list
        optimizer = make_optimizer(spec, params)
        times, row = [], {"kind": "measured", "spec": spec.summary()}
        try:
            for step in range(steps):
                batch = edit_batch(spec, "cuda", seed=step)
                torch.cuda.synchronize()
                t = time.perf_counter()
                loss = train_step(spec, model, optimizer, params, batch)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
                log(f"{spec.label()}: step {step} {times[-1]:.2f} s, loss {loss.item():.4f}, "
                    f"peak {torch.cuda.max_memory_allocated() / GIB:.2f} GiB")
                if step == 0:  # the warm-up made the optimizer state and the autotuned kernels
                    torch.cuda.reset_peak_memory_stats()
            allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
            state = tensor_bytes(optimizer_state(optimizer))
            constants = constants_for(spec, companions)
            row["bytes"] = {
                "base_weights": w["base_weights"], "adapter_weights": w["adapter_weights"],
                "allocated_after_build": built, "constants_not_built": constants, "gradients": w["gradients"],
                "optimizer_state": state,
                "activations_at_peak": allocated - built - w["gradients"] - state,
                "max_allocated": allocated, "max_reserved": reserved,
                "peak": allocated + sum(constants.values()),
                "peak_reserved": reserved + sum(constants.values()),
            }
            row["step_seconds"] = statistics.median(times[1:]) if len(times) > 1 else times[0]
            row["step_times"] = times
            row["fits_h100_80gb"] = fit(row["bytes"]["peak_reserved"])
        except torch.cuda.OutOfMemoryError as e:
            row["error"] = f"out of memory: {str(e).splitlines()[0]}"
            row["bytes"] = {"max_allocated": torch.cuda.max_memory_allocated(),
                            "max_reserved": torch.cuda.max_memory_reserved()}
            log(f"{spec.label()}: {row['error']}")
        optimizer.zero_grad(set_to_none=True)
        del optimizer
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------
# Output


def environment() -> dict:
    from x2edit import kernels

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__, "kernels_backend": kernels.get_backend()}
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["gpu_memory"] = torch.cuda.get_device_properties(0).total_memory
        env["cuda"] = torch.version.cuda
    return env


def gib(n) -> str:
    """Bytes as GiB: two decimals, or two significant digits below 0.01 GiB (small configs)."""
    return f"{n / GIB:.2f}" if abs(n) >= 0.01 * GIB else f"{n / GIB:.2g}"


def markdown(env: dict, mode: str, estimates: list[dict], measured: list[dict]) -> str:
    lines = ["# Training memory: X2Edit MoE-LoRA on a FLUX transformer", ""]
    if mode == "estimate":
        why = "no CUDA device" if not torch.cuda.is_available() else "--estimate"
        lines += [f"**Meta-device estimate, not measured on a GPU** ({why}); torch {env['torch']}, {env['date']}.", ""]
    else:
        lines += [f"Measured on {env['gpu']} ({gib(env['gpu_memory'])} GiB), torch {env['torch']}, kernels backend "
                  f"{env['kernels_backend']}, {env['date']}; beside each, the meta-device estimate.", ""]
    spec = estimates[0]["spec"]
    a = spec["adapter"]
    n_double, n_single = spec["blocks"]
    lines += [f"Transformer {spec['config']} (bf16, random weights), {a['kind']} {a['router']} rank {a['rank']}, "
              f"{a['num_experts']}+{int(a['shared_expert'])} experts top-{a['top_k']} on `{a['targets']}` "
              f"(float32; {estimates[0]['params']['adapter_params']:,} parameters), gradient checkpointing "
              f"{'on' if spec['gradient_checkpointing'] else 'off'}, {spec['optimizer']}, text encoders on the "
              f"{'GPU' if spec['text_encoder_on_gpu'] else 'CPU'}. GiB = 2^30 bytes.", "",
              "| run | what | peak GiB | base | adapter | constants | grads | optimizer | activations + temporaries | step s | fits one 80 GB H100 (+1 GiB context, 10% margin) |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    rows = [(e, "estimate, unmeasured") for e in estimates] + [(m, "measured") for m in measured]
    for r, what in sorted(rows, key=lambda rw: (rw[0]["spec"]["batch"], not rw[0]["spec"]["contrastive"], rw[1])):
        s = r["spec"]
        run = f"batch {s['batch']}, {s['resolution']}px, contrastive {'on' if s['contrastive'] else 'off'}"
        if "error" in r:
            lines.append(f"| {run} | {what} | {r['error']} | | | | | | | | **no** |")
            continue
        b = r["bytes"]
        peak = gib(b["peak"]) + (f" ({gib(b['peak_reserved'])} reserved)" if "peak_reserved" in b else "")
        grads = b.get("gradients_alive_at_peak", b["gradients"])
        opt = b["optimizer_state"]
        f = r["fits_h100_80gb"]
        verdict = f"{'yes' if f['fits'] else '**no**'} ({gib(f['headroom_to_full_card'])} GiB left of {gib(H100_BYTES)})"
        step = f"{r['step_seconds']:.2f}" if "step_seconds" in r else "-"
        lines.append(f"| {run} | {what} | {peak} | {gib(b['base_weights'])} | {gib(b['adapter_weights'])} "
                     f"| {gib(sum(b['constants_not_built'].values()))} | {gib(grads)} | {gib(opt)} "
                     f"| {gib(b['activations_at_peak'])} | {step} | {verdict} |")
    lines += ["", "Columns: weights of the frozen base and the adapter; constants = weights of components not built "
              "(VAE; CLIP-L and T5-XXL when the text encoders are on the GPU), counted from their configs; grads "
              "and optimizer state alive at the peak (measured rows: all of them); activations + temporaries = the rest "
              "of the peak (measured rows: an upper bound, as not every gradient is alive at the peak)."]
    shares = contrastive_shares(rows)
    if shares:
        lines += ["", f"Contrastive loss (flattened target tokens of the {n_double} double blocks, float32 for the loss) adds "
                  "to the peak: " + "; ".join(f"{what} at batch {b}: {gib(d)} GiB" for what, b, d in shares) + "."]
    lines += ["", "## Estimates: when the peak happens and what the activations are (meta device, unmeasured)", ""]
    for e in estimates:
        b, s = e["bytes"], e["spec"]
        phases = ", ".join(f"{k} {gib(v)}" for k, v in e["peak_by_phase"].items() if k)
        lines.append(f"- batch {s['batch']}, contrastive {'on' if s['contrastive'] else 'off'}: peak during the "
                     f"{e['peak_during']} (GiB at each phase's own peak: {phases}); saved for backward at the end of "
                     f"the forward (checkpoint inputs of the {n_double + n_single} blocks, contrastive features, output "
                     "layers): "
                     f"{gib(b['forward_saved_for_backward'])} GiB; one block's saved activations, held while it is "
                     "recomputed in backward: " + "; ".join(
                         f"{kind} {gib(blk['saved_for_backward'])} GiB, of which attention "
                         f"{gib(blk['attention_flash'])} GiB with FlashAttention (q, k, v, out, logsumexp), where the "
                         f"meta device's SDPA (math path) keeps {gib(blk['attention_meta_sdpa'])} GiB"
                         for kind, blk in b["per_block"].items()))
    lines += ["", "Not in the estimate: CUDA context and kernels (~0.5-1 GB, the 1 GiB above), cuBLAS/cuDNN "
              "workspaces, the caching allocator's rounding and fragmentation (reserved - allocated), the VAE and "
              "text encoders' activations (before the transformer runs), the Triton kernels' own saved tensors "
              "(the estimate runs kernels' torch reference)."]
    return "\n".join(lines) + "\n"


def contrastive_shares(rows) -> list[tuple[str, int, int]]:
    """(what, batch, peak with contrastive - peak without) for every pair of rows that differ only in it."""
    out = []
    for r, what in rows:
        if not r["spec"]["contrastive"] or "error" in r:
            continue
        for q, what_q in rows:
            s, t = dict(r["spec"], contrastive=None), dict(q["spec"], contrastive=None)
            if what_q == what and not q["spec"]["contrastive"] and s == t and "error" not in q:
                out.append((what, r["spec"]["batch"], r["bytes"]["peak"] - q["bytes"]["peak"]))
    return out


def write_results(out_dir: Path, env: dict, mode: str, estimates: list[dict], measured: list[dict]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "train_memory.json", out_dir / "train_memory.md"
    payload = {"environment": env, "mode": mode,
               "note": ("meta-device estimate: every number is an estimate, unmeasured" if mode == "estimate" else
                        "measured on the GPU; the 'estimates' are meta-device estimates, unmeasured"),
               "h100_bytes": H100_BYTES, "cuda_context_bytes": CUDA_CONTEXT_BYTES, "fit_margin": FIT_MARGIN,
               "estimates": estimates, "measured": measured}
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md_path.write_text(markdown(env, mode, estimates, measured))
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for train_memory.json and .md")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--estimate", action="store_true", help="meta-device estimate only (default without CUDA)")
    what.add_argument("--measure", action="store_true", help="measure on CUDA (exit 2 without a CUDA device)")
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE, help="training YAML the settings come from")
    parser.add_argument("--config", default="flux.1-dev", help=f"transformer config: {list(CONFIGS)} or a JSON file")
    parser.add_argument("--batch", type=int, nargs="+", help="batch sizes, one run each (default: the recipe's)")
    parser.add_argument("--resolution", type=int, help="image side in pixels (default: the recipe's data.resolution)")
    parser.add_argument("--text-tokens", type=int, help="text tokens (default: the recipe's model.max_text_tokens)")
    parser.add_argument("--rank", type=int)
    parser.add_argument("--experts", type=int, help="routed experts (the shared one comes on top)")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--contrastive", choices=["on", "off", "both"],
                        help="contrastive loss (default: the recipe's; 'both' also runs without it, for its share)")
    parser.add_argument("--text-encoder", choices=["gpu", "cpu"], help="where T5-XXL and CLIP-L live (default: the recipe's)")
    parser.add_argument("--optimizer", choices=["adamw", "adamw8bit"], help="default: the recipe's optim.use_8bit_adam")
    parser.add_argument("--kernels", choices=["torch", "triton", "auto"], default="torch",
                        help="x2edit.kernels.lora_linear backend (default torch: faster end to end on the GPU so far, and the "
                             "path the estimate runs)")
    parser.add_argument("--steps", type=int, default=4, help="measured steps per run, the first a warm-up")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if args.measure and not cuda:
        print("benchmarks/train_memory.py --measure needs a CUDA GPU and none is visible to torch; nothing was "
              "measured (without --measure it writes the meta-device estimate)", file=sys.stderr)
        return 2
    if args.steps < 2:
        parser.error("--steps must be >= 2 (one warm-up step, then the measured ones)")
    try:
        specs = make_specs(args)
    except ValueError as e:
        parser.error(str(e))
    mode = "measure" if cuda and not args.estimate else "estimate"
    if mode == "measure" and specs[0].optimizer == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            print("benchmarks/train_memory.py: optim.use_8bit_adam needs bitsandbytes: pip install bitsandbytes",
                  file=sys.stderr)
            return 2
    if mode == "estimate":
        print("no CUDA device: writing the meta-device estimate (unmeasured)" if not cuda else
              "--estimate: writing the meta-device estimate (unmeasured)")
    from x2edit import kernels

    kernels.set_backend(args.kernels)
    companions = companion_weight_bytes() if any(s.config_name == "flux.1-dev" for s in specs) else {}
    estimates, meta_model = [], build_model(specs[0], "meta")  # specs differ only in batch and loss
    for spec in specs:
        estimates.append(estimate(spec, companions, meta_model))
        e = estimates[-1]
        print(f"estimate, {spec.label()}: peak {gib(e['bytes']['peak'])} GiB (unmeasured; {e['seconds']} s)")
    measured = measure_all(specs, companions, args.steps) if mode == "measure" else []
    json_path, md_path = write_results(args.out, environment(), mode, estimates, measured)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
