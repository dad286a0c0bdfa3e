"""Benchmark the LoRA / MoE-LoRA / gated multi-LoRA linear on FLUX shapes, every backend side by side.

Needs a CUDA GPU; refuses (exit status 2) without one. `benchmarks/gpu_check.sh` runs it.

    python benchmarks/lora_kernels.py --out DIR --quick --no-e2e   # t2i tokens, three linears, rank 64
    python benchmarks/lora_kernels.py --out DIR                    # everything, end to end first
    python benchmarks/lora_kernels.py --out DIR --deadline 200     # start no measurement after 200 s

Writes DIR/kernels[-quick].json (every measurement, the environment, the targets) and
DIR/kernels[-quick].md (tables: times and ratios to the base matmul); the full run also writes
DIR/<gpu-name>.json, the dispatch table derived from its measurements (x2edit/kernels/measured's format),
and DIR/<gpu-name>-configs.json, the Triton launch configurations it tuned: copy both into
x2edit/kernels/measured/ to ship them.

What is timed, per FLUX linear (K -> N) and token count M, in bfloat16 (CUDA events, median, rotating
input sets larger than L2 so that no call finds its operands cached, after a clock warm-up):
  base            F.linear(x, W, b) alone (cuBLAS)
  torch unfused   F.linear(x, W, b) + s * F.linear(F.linear(x, A), B)        (LoRA)
  peft            a peft LoRA Linear layer around the same nn.Linear         (LoRA)
  x2edit loop     MoE-LoRA as a per-expert Python loop                       (MoE)
  torch loop      the adapters of a gated multi-LoRA one after another       (multi-LoRA)
  torch           kernels' reference: two einsums over every adapter
  addmm, merge    kernels' torch paths (cuBLAS base + in-place low-rank add; merged weight per call)
  triton          the portable Triton kernels
  triton_tma      the Hopper kernel (TMA descriptors, persistent tiles), on Hopper only
  auto            what kernels.lora_linear picks on this GPU (the product)
Groups: "gemm r1" (a rank-1 adapter: the Triton matmul against cuBLAS), LoRA r16/r64 (r128 in the
full run), MoE-LoRA (shared + top-2 of 12, rank 64, per-token gates), four rank-16 adapters with soft
per-token gates; a training step (forward + backward of x and the adapters) of LoRA r64 and MoE-LoRA;
and a full-size FLUX.1-dev transformer forward (random weights) without adapters, with X2Edit's
token-routed MoE-LoRA on each backend, with a task-routed MoE-LoRA merged by static_merge, and with
diffusers' fused q/k/v projections.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from x2edit import kernels
from x2edit.kernels import lora_linear, moe_lora_loop_reference, use_backend
from x2edit.kernels.env import device_slug, interpreter_enabled, is_hopper

# The linears of FLUX.1 (inner dim 3072, MLP ratio 4): name -> (in_features K, out_features N).
FLUX_LINEARS = {
    "attn q/k/v/out 3072->3072": (3072, 3072),
    "ff up 3072->12288": (3072, 12288),
    "ff down 12288->3072": (12288, 3072),
    "single in 3072->21504": (3072, 21504),  # fused q, k, v and MLP-in of a single block
    "single out 15360->3072": (15360, 3072),  # attention + MLP out of a single block
}
QUICK_LINEARS = ("attn q/k/v/out 3072->3072", "ff up 3072->12288", "ff down 12288->3072")
# Token counts at 1024 x 1024: 4096 image + 512 text; an edit appends 4096 reference image tokens.
TOKEN_COUNTS = {"t2i 4096+512": 4096 + 512, "edit 2x4096+512": 2 * 4096 + 512}
LORA_RANKS = (16, 64, 128)
MOE = {"experts": 12, "top_k": 2, "rank": 64}  # plus one shared expert (gate 1)
MULTI = {"adapters": 4, "rank": 16}

# Issue 16's targets (H100/H200, bf16), as the largest allowed ratio to the base matmul.
TARGETS = {"gemm": 1.05, "lora_wide": 1.05, "lora_3072": 1.10, "moe": 1.25, "multi": 1.10, "e2e": 1.10}
MOE_MIN_SPEEDUP_OVER_LOOP = 3.0
JUDGED = ("auto", "triton", "triton_tma")  # the rows held to the targets
TORCH_BACKENDS = ("torch", "addmm", "merge")
TRITON_BACKENDS = ("triton", "triton_tma")
TRITON_MARGIN = 0.97  # a Triton backend enters the dispatch table only if at least 3% faster

# FLUX.1-dev's transformer config (black-forest-labs/FLUX.1-dev, transformer/config.json).
FLUX_DEV_CONFIG = dict(
    patch_size=1,
    in_channels=64,
    out_channels=None,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)


@dataclass
class Row:
    group: str  # "gemm r1", "lora r64", "moe-lora 1+12 top-2 r64", "multi-lora 4 x r16", "train ..."
    linear: str  # FLUX_LINEARS key
    tokens: str  # TOKEN_COUNTS key
    M: int
    impl: str
    ms: float
    ratio: float = float("nan")  # ms / base ms at the same linear and M (training: base fwd+bwd)
    target: str = ""
    met: bool | None = None
    error: str = ""  # why this implementation did not run (compile failure, ...): ms is NaN


def timed(timer: Callable, calls: list[Callable[[], object]], log: Callable[[str], None]) -> tuple[float, str]:
    """(ms, "") or (NaN, the error): one backend that fails on this GPU must not end the whole run."""
    try:
        return timer(calls), ""
    except Exception as exc:  # noqa: BLE001 (recorded in the results, and printed)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        log(f"    FAILED: {error}")
        return float("nan"), error


class Deadline:
    """Stops starting new measurements after `seconds` (None: never); records that it did."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds
        self.hit = False

    def passed(self) -> bool:
        if self.end is not None and time.monotonic() > self.end:
            self.hit = True
        return self.hit


# --------------------------------------------------------------------------------------------------
# Timers


def cuda_timer(warmup: int, reps: int) -> Callable[[list[Callable[[], object]]], float]:
    """Median milliseconds of one call, cycling through `calls` (one per rotating input set)."""

    def time_calls(calls: list[Callable[[], object]]) -> float:
        for i in range(warmup):  # the first call also tunes the Triton kernels for a new shape
            calls[i % len(calls)]()
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            starts[i].record()
            calls[i % len(calls)]()
            ends[i].record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))

    return time_calls


def warm_up_gpu(seconds: float = 3.0) -> None:
    """Matrix products until the clocks are up: the first shape timed on a cold H200 ran 2x slower."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(4):
            a @ a
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------------
# Inputs and implementations


def topk_gates(M: int, experts: int, k: int, device, gen: torch.Generator) -> torch.Tensor:
    """(M, 1 + experts) float32 gates: a shared expert (1) + top-k of a softmax, not renormalised."""
    logits = torch.randn(M, experts, generator=gen, device=device)
    top = logits.softmax(-1).topk(k, dim=-1)
    routed = torch.zeros(M, experts, device=device).scatter(-1, top.indices, top.values)
    return torch.cat([torch.ones(M, 1, device=device), routed], dim=-1)


def make_sets(
    kind: str, M: int, K: int, N: int, E: int, r: int, device, dtype, l2_bytes: int, seed: int = 0
) -> list[dict]:
    """Rotating input sets (activations, base weights, adapters, gates) for one measurement.

    Enough sets that together they overflow L2 four times; B is non-zero so the update is real.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    set_bytes = (M * K + N * K + E * r * (K + N) + M * N) * torch.finfo(dtype).bits // 8
    n_sets = min(8, max(2, math.ceil(4 * l2_bytes / set_bytes)))

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * std).to(dtype)

    sets = []
    for _ in range(n_sets):
        s = {
            "x": randn(M, K),
            "weight": randn(N, K, std=K**-0.5),
            "bias": randn(N),
            "lora_A": randn(E, r, K, std=K**-0.5),
            "lora_B": randn(E, N, r, std=r**-0.5),
            "gates": None,
        }
        if kind == "moe":
            s["gates"] = topk_gates(M, MOE["experts"], MOE["top_k"], device, gen)
        elif kind == "multi":
            s["gates"] = torch.rand(M, E, generator=gen, device=device)  # AutoLoRA-style soft gates
        sets.append(s)
    return sets


def peft_layer(s: dict, r: int, scale: float) -> torch.nn.Module:
    import inspect

    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear

    N, K = s["weight"].shape
    base = torch.nn.Linear(K, N, device=s["x"].device, dtype=s["x"].dtype)
    with torch.no_grad():
        base.weight.copy_(s["weight"])
        base.bias.copy_(s["bias"])
    kwargs = {"r": r, "lora_alpha": scale * r}
    if "config" in inspect.signature(PeftLoraLinear.__init__).parameters:  # peft >= 0.18
        kwargs["config"] = LoraConfig(r=r, lora_alpha=scale * r)
    layer = PeftLoraLinear(base, "default", **kwargs)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(s["lora_A"][0])
        layer.lora_B["default"].weight.copy_(s["lora_B"][0])
    return layer.to(device=s["x"].device, dtype=s["x"].dtype)


def backends_here(device) -> list[str]:
    """The kernels backends to time on `device` (triton_tma only on Hopper, Triton only if installed)."""
    names = ["torch", "addmm", "merge"]
    if kernels.triton_available():
        names.append("triton")
        dev = torch.device(device)
        if is_hopper(dev) or (dev.type == "cpu" and interpreter_enabled()):
            names.append("triton_tma")
    return names + ["auto"]


def implementations(kind: str, scale: float, device) -> dict[str, Callable[[dict], Callable[[], object]]]:
    """name -> builder(input set) -> zero-argument call, for one row group."""

    def base(s):
        return lambda: F.linear(s["x"], s["weight"], s["bias"])

    def backend(name):
        def build(s):
            def call():
                with use_backend(name):
                    return lora_linear(s["x"], s["weight"], s["bias"], s["lora_A"], s["lora_B"], s["gates"], scale)

            return call

        return build

    impls: dict = {"base": base}
    if kind == "gemm":  # rank-1: the fused kernel is the Triton matmul plus a negligible epilogue
        for name in backends_here(device):
            if name in TRITON_BACKENDS:
                impls[name] = backend(name)
        return impls
    if kind == "lora":

        def unfused(s):
            A, B = s["lora_A"][0], s["lora_B"][0]
            return lambda: F.linear(s["x"], s["weight"], s["bias"]) + scale * F.linear(F.linear(s["x"], A), B)

        def peft(s):
            layer = peft_layer(s, s["lora_A"].shape[1], scale)
            return lambda: layer(s["x"])

        impls.update({"torch unfused": unfused, "peft": peft})
    elif kind == "moe":

        def loop(s):
            return lambda: moe_lora_loop_reference(
                s["x"], s["weight"], s["bias"], s["lora_A"], s["lora_B"], s["gates"], scale
            )

        impls["x2edit loop"] = loop
    else:

        def adapter_loop(s):  # multi-LoRA as a peft-like sum of gated unfused adapters
            def call():
                y = F.linear(s["x"], s["weight"], s["bias"])
                for e in range(s["lora_A"].shape[0]):
                    h = F.linear(F.linear(s["x"], s["lora_A"][e]), s["lora_B"][e])
                    y = y + (scale * s["gates"][:, e : e + 1]).to(h.dtype) * h
                return y

            return call

        impls["torch loop"] = adapter_loop
    for name in backends_here(device):
        if name == "merge" and kind != "lora":
            continue  # per-token gates do not merge
        impls[name] = backend(name)
    return impls


def row_groups(lora_ranks) -> list[tuple[str, str, int, int]]:
    """(kind, group name, E, r) of every row group."""
    groups = [("gemm", "gemm r1", 1, 1)]
    groups += [("lora", f"lora r{r}", 1, r) for r in lora_ranks]
    groups.append(("moe", f"moe-lora 1+{MOE['experts']} top-{MOE['top_k']} r{MOE['rank']}", 1 + MOE["experts"], MOE["rank"]))  # fmt: skip
    groups.append(
        ("multi", f"multi-lora {MULTI['adapters']} x r{MULTI['rank']}", MULTI["adapters"], MULTI["rank"])
    )
    return groups


def bench_linears(
    timer: Callable,
    device,
    dtype=torch.bfloat16,
    linears: dict[str, tuple[int, int]] = FLUX_LINEARS,
    token_counts: dict[str, int] = TOKEN_COUNTS,
    lora_ranks=LORA_RANKS,
    l2_bytes: int = 50 * 2**20,
    log: Callable[[str], None] = print,
    deadline: Deadline | None = None,
) -> list[Row]:
    """Time every implementation on every (linear, token count); return the rows with ratios."""
    deadline = deadline or Deadline(None)
    rows: list[Row] = []
    for tokens, M in token_counts.items():
        for linear, (K, N) in linears.items():
            base_ms = None
            for kind, group, E, r in row_groups(lora_ranks):
                if deadline.passed():
                    return rows
                sets = make_sets(kind, M, K, N, E, r, device, dtype, l2_bytes)
                group_rows = []
                with torch.no_grad():
                    for impl, build in implementations(kind, 1.0, device).items():  # scale 1: alpha = rank
                        if impl == "base" and base_ms is not None:
                            continue  # the base matmul is timed once per (linear, M)
                        ms, error = timed(timer, [build(s) for s in sets], log)
                        if impl == "base":
                            base_ms = ms
                        group_rows.append(Row(group, linear, tokens, M, impl, ms, error=error))
                        log(f"{tokens:>16} {linear:>28} {group:>26} {impl:>14}: {ms:8.3f} ms")
                del sets
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                for row in group_rows:
                    row.ratio = row.ms / base_ms
                judge(group_rows, kind, r, K, N)
                rows.extend(group_rows)
    return rows


def target_for(kind: str, r: int, K: int, N: int) -> float | None:
    """Issue 16's largest allowed ratio to the base matmul for a row group, or None."""
    if kind == "gemm":
        return TARGETS["gemm"]
    if kind == "lora":
        if r > 64:
            return None
        return TARGETS["lora_3072"] if (K, N) == (3072, 3072) else TARGETS["lora_wide"]
    return TARGETS[kind]


def judge(group_rows: list[Row], kind: str, r: int, K: int, N: int) -> None:
    """Fill target / met on the rows held to the targets (auto and the Triton backends)."""
    limit = target_for(kind, r, K, N)
    if limit is None:
        return
    loop = next((row for row in group_rows if row.impl == "x2edit loop"), None)
    for row in group_rows:
        if row.impl not in JUDGED:
            continue
        row.target, row.met = f"<= {limit:.2f}x base", row.ratio <= limit
        if kind == "moe" and loop is not None:
            speedup = loop.ms / row.ms
            row.target += f", >= {MOE_MIN_SPEEDUP_OVER_LOOP:.0f}x loop ({speedup:.1f}x)"
            row.met = row.met and speedup >= MOE_MIN_SPEEDUP_OVER_LOOP


# --------------------------------------------------------------------------------------------------
# A training step of the adapted layers: forward + backward of x and the adapters (W frozen)


def bench_training(
    timer: Callable,
    device,
    dtype=torch.bfloat16,
    linears: dict[str, tuple[int, int]] = FLUX_LINEARS,
    M: int = TOKEN_COUNTS["t2i 4096+512"],
    tokens: str = "t2i 4096+512",
    log: Callable[[str], None] = print,
    deadline: Deadline | None = None,
) -> list[Row]:
    """Forward + backward (dx, dA, dB and, for MoE, dgates) per backend, against the base layer's."""
    deadline = deadline or Deadline(None)
    rows: list[Row] = []
    for linear, (K, N) in linears.items():
        base_ms = None
        for kind, group, E, r in (("lora", "train lora r64", 1, 64), ("moe", f"train moe-lora 1+{MOE['experts']} top-{MOE['top_k']} r64", 1 + MOE["experts"], 64)):  # fmt: skip
            if deadline.passed():
                return rows
            impls = _training_calls(make_sets(kind, M, K, N, E, r, device, dtype, l2_bytes=1)[0], device,
                                    with_base=base_ms is None)  # fmt: skip
            group_rows = []
            for impl, call in impls.items():
                ms, error = timed(timer, [call], log)
                if impl == "base":
                    base_ms = ms
                group_rows.append(Row(group, linear, tokens, M, impl, ms, error=error))
                log(f"{'train':>16} {linear:>28} {group:>26} {impl:>14}: {ms:8.3f} ms")
            for row in group_rows:
                row.ratio = row.ms / base_ms
            rows.extend(group_rows)
    return rows


def _training_calls(s: dict, device, with_base: bool) -> dict[str, Callable[[], object]]:
    """name -> one forward + backward on input set `s` (x, A, B and gates require grad; W frozen)."""
    x = s["x"].requires_grad_(True)
    A, B = s["lora_A"].requires_grad_(True), s["lora_B"].requires_grad_(True)
    g = s["gates"].requires_grad_(True) if s["gates"] is not None else None
    dy = torch.randn(x.shape[0], s["weight"].shape[0], device=x.device, dtype=x.dtype)
    wrt = [t for t in (x, A, B, g) if t is not None]
    calls: dict[str, Callable[[], object]] = {}
    if with_base:
        calls["base"] = lambda: torch.autograd.grad(F.linear(x, s["weight"], s["bias"]), [x], dy)
    for name in backends_here(device):
        if name == "merge":
            continue  # never used while adapters train

        def call(name=name):
            with use_backend(name):
                y = lora_linear(x, s["weight"], s["bias"], A, B, g, 1.0, sparse_gate_grad=g is not None)
            return torch.autograd.grad(y, wrt, dy)

        calls[name] = call
    return calls


# --------------------------------------------------------------------------------------------------
# The dispatch table a GPU's measurements give


def dispatch_table(rows: list[Row], gpu: str, source: str) -> dict:
    """x2edit/kernels/measured's format: per measured call shape, the fastest backend.

    A Triton backend is taken only where it beat every torch backend by 3% (timing noise), so the
    table never trades a measured torch win for a Triton one.
    """
    shape_of = {name: KN for name, KN in FLUX_LINEARS.items()}
    groups: dict[tuple, dict[str, float]] = {}
    for row in rows:
        if row.linear in shape_of and row.impl in TORCH_BACKENDS + TRITON_BACKENDS and math.isfinite(row.ms):
            groups.setdefault((row.group, row.linear, row.M), {})[row.impl] = row.ms
    table_rows = []
    for (group, linear, M), ms in groups.items():
        K, N = shape_of[linear]
        train = group.startswith("train ")
        name = group.removeprefix("train ")
        if name.startswith("gemm"):
            continue  # rank 1: a diagnosis of the matmul, not a call shape to dispatch
        if name.startswith("lora"):
            gates, R = "none", int(name.split("r")[-1])
        elif name.startswith("moe"):
            gates, R = "token", (1 + MOE["experts"]) * MOE["rank"]
        else:
            gates, R = "token", MULTI["adapters"] * MULTI["rank"]
        torch_ms = {b: v for b, v in ms.items() if b in TORCH_BACKENDS}
        triton_ms = {b: v for b, v in ms.items() if b in TRITON_BACKENDS}
        if not torch_ms:
            continue
        best = min(torch_ms, key=torch_ms.get)
        if triton_ms and min(triton_ms.values()) < TRITON_MARGIN * torch_ms[best]:
            best = min(triton_ms, key=triton_ms.get)
        table_rows.append({"gates": gates, "K": K, "N": N, "M": M, "R": R, "grad": train, "backend": best,
                           "ms": {b: round(v, 5) for b, v in ms.items()}})  # fmt: skip
    current = kernels.dispatch.gpu_table(gpu)
    cost = asdict(current.cost) if current is not None else asdict(kernels.dispatch.DEFAULT_COST)
    return {"gpu": gpu, "source": source, "cost": cost, "rows": table_rows,
            "notes": ["generated by benchmarks/lora_kernels.py; cost: the constants in force when it ran"]}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# End to end


def flux_inputs(
    config: dict, image_tokens: int, reference_tokens: int, text_tokens: int, device, dtype
) -> dict:
    """Inputs of one FLUX transformer forward at batch 1 (Kontext-style reference tokens)."""
    side = int(math.isqrt(image_tokens))

    def grid_ids(first: float) -> torch.Tensor:
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        ids = torch.stack([torch.full_like(rows, first), rows, cols], dim=-1).reshape(-1, 3)
        return ids.to(device=device, dtype=dtype)

    img_ids = grid_ids(0)
    if reference_tokens:
        img_ids = torch.cat([img_ids, grid_ids(1)])  # reference tokens: first id coordinate 1
    total = image_tokens + reference_tokens
    return {
        "hidden_states": torch.randn(1, total, config["in_channels"], device=device, dtype=dtype),
        "encoder_hidden_states": torch.randn(
            1, text_tokens, config["joint_attention_dim"], device=device, dtype=dtype
        ),  # fmt: skip
        "pooled_projections": torch.randn(1, config["pooled_projection_dim"], device=device, dtype=dtype),
        "timestep": torch.full((1,), 0.5, device=device, dtype=dtype),
        "guidance": torch.full((1,), 3.5, device=device, dtype=dtype),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(text_tokens, 3, device=device, dtype=dtype),
        "return_dict": False,
    }


def build_flux(config: dict, device, dtype) -> torch.nn.Module:
    """A FluxTransformer2DModel with random weights, built directly on `device` in `dtype`."""
    from diffusers import FluxTransformer2DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in bf16 on the GPU: no fp32 copy of 12B parameters
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    # Small weights keep 57 blocks' activations finite, so routing sees real numbers (NaN gates
    # would make every expert look used).
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, 0.02)
                if module.bias is not None:
                    module.bias.zero_()
    return model.to(device=device, dtype=dtype).eval()


# name -> (image tokens, reference tokens, text tokens) of the end-to-end forward
E2E_CASES = {"t2i 4096+512": (4096, 0, 512), "edit 2x4096+512": (4096, 4096, 512)}
STEPS = 28  # the denoising steps a static_merge block serves in a pipeline call


def bench_e2e(
    timer: Callable, device, dtype=torch.bfloat16, config: dict = FLUX_DEV_CONFIG, cases: dict = E2E_CASES,
    deadline: Deadline | None = None, log: Callable[[str], None] = print,
) -> dict:  # fmt: skip
    """Full transformer forward: base; X2Edit's token-routed MoE-LoRA per backend; a task-routed
    MoE-LoRA merged by static_merge; and both after diffusers' QKV fusion. Ratios to the base."""
    try:
        from x2edit.adapters import (
            AdapterConfig,
            fuse_qkv_projections,
            inject_adapters,
            routing_context,
            set_adapters,
            static_merge,
        )
    except ImportError as exc:
        return {"skipped": f"x2edit.adapters is not importable: {exc}"}
    deadline = deadline or Deadline(None)
    model = build_flux(config, device, dtype)
    results: dict = {"config": config, "cases": {}}
    inputs = {name: flux_inputs(config, *tokens, device, dtype) for name, tokens in cases.items()}

    def measure(case: str, label: str, routing=None, block=contextlib.nullcontext) -> None:
        if deadline.passed():
            return
        inp, c = inputs[case], results["cases"][case]
        with block(), (routing_context(model, task_ids=routing) if routing else contextlib.nullcontext()):
            ms, error = timed(timer, [lambda: model(**inp)], log)
        c[f"{label}_ms"] = ms
        if error:
            c[f"{label}_error"] = error
        if "base_ms" in c and label != "base":
            c[f"{label}_ratio"] = ms / c["base_ms"]
        log(f"{'e2e':>16} {case:>28} {label:>40}: {ms:8.1f} ms")

    with torch.no_grad():
        for case, inp in inputs.items():
            out = model(**inp)[0]
            results["cases"][case] = {"base_output_finite": bool(torch.isfinite(out).all())}
            measure(case, "base")
        token = AdapterConfig(kind="moe_lora", rank=MOE["rank"], num_experts=MOE["experts"], top_k=MOE["top_k"],
                              shared_expert=True, targets="x2edit")  # fmt: skip
        task = AdapterConfig(kind="moe_lora", rank=MOE["rank"], num_experts=MOE["experts"], top_k=MOE["top_k"],
                             shared_expert=True, targets="x2edit", router="task")  # fmt: skip
        inject_adapters(model, token, adapter_name="token")
        inject_adapters(model, task, adapter_name="task")
        task_ids = torch.tensor([3], device=device)
        # The reference ("torch", two einsums) measured 1.33x here on the H200: not timed again.
        backends = [b for b in backends_here(device) if b not in ("merge", "torch")]
        set_adapters(model, ["token"])
        for case in inputs:
            for backend in backends:
                with use_backend(backend):
                    measure(case, f"moe_lora_{backend}", routing=task_ids)
        set_adapters(model, ["task"])
        for case, inp in inputs.items():
            measure(case, "task_moe_lora_auto", routing=task_ids)
            if deadline.passed():
                break
            # The merge itself, paid once per block (a pipeline call): the first call minus a later one.
            with static_merge(model, calls=STEPS), routing_context(model, task_ids=task_ids):
                torch.cuda.synchronize() if torch.cuda.is_available() else None
                start = time.perf_counter()
                model(**inp)
                torch.cuda.synchronize() if torch.cuda.is_available() else None
                results["cases"][case]["task_static_merge_first_call_ms"] = 1e3 * (time.perf_counter() - start)
            measure(case, "task_moe_lora_static_merge", routing=task_ids,
                    block=lambda: static_merge(model, calls=STEPS))  # fmt: skip
        if not deadline.passed():
            fuse_qkv_projections(model)
            set_adapters(model, [])
            for case in inputs:
                measure(case, "fused_qkv_base")
            set_adapters(model, ["token"])
            for case in inputs:
                measure(case, "fused_qkv_moe_lora_auto", routing=task_ids)
    for c in results["cases"].values():
        for key in ("moe_lora_auto_ratio", "task_moe_lora_static_merge_ratio"):
            if key in c:
                c[key.replace("_ratio", "_met")] = c[key] <= TARGETS["e2e"]
        c["target"] = f"<= {TARGETS['e2e']:.2f}x base"
    results["truncated"] = deadline.hit
    return results


# --------------------------------------------------------------------------------------------------
# Output


def environment() -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "kernels_backend": kernels.get_backend(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def _table(rows: list[Row], title: str) -> list[str]:
    lines = [f"## {title}", "", "| group | linear | tokens | impl | ms | x base | target | met |",
             "|---|---|---|---|---:|---:|---|---|"]  # fmt: skip
    for r in rows:
        met = "" if r.met is None else ("yes" if r.met else "**no**")
        target = f"failed: {r.error}" if r.error else r.target
        lines.append(f"| {r.group} | {r.linear} | {r.tokens} | {r.impl} | {r.ms:.3f} | {r.ratio:.3f} | {target} | {met} |")  # fmt: skip
    return lines + [""]


def markdown(env: dict, rows: list[Row], e2e: dict | None, training: list[Row] | None = None,
             truncated: bool = False) -> str:  # fmt: skip
    lines = [
        "# Kernel benchmark",
        "",
        f"{env.get('gpu', 'no GPU')}, torch {env['torch']}, triton {env['triton']}, bfloat16, {env['date']}.",
        "Median time per call (CUDA events, rotating inputs, after a clock warm-up); `x base` = time / "
        "base matmul time (training: / the base layer's forward + backward).",
        "",
    ]
    if truncated:
        lines += ["**Truncated**: the run's deadline passed before every measurement was taken.", ""]
    lines += _table(rows, "Linears (inference)")
    if training:
        lines += _table(training, "Training step of the adapted layer (forward + backward)")
    if e2e is not None:
        lines += ["## Full FLUX.1-dev transformer forward (random weights, batch 1)", ""]
        if "skipped" in e2e:
            lines.append(f"Skipped: {e2e['skipped']}")
        else:
            labels = sorted({k[:-3] for c in e2e["cases"].values() for k in c if k.endswith("_ms")} - {"base"})
            lines += ["| tokens | what | ms | x base |", "|---|---|---:|---:|"]
            for name, c in e2e["cases"].items():
                if "base_ms" in c:
                    lines.append(f"| {name} | base | {c['base_ms']:.1f} | 1.000 |")
                for label in labels:
                    if f"{label}_ms" in c:
                        ratio = c.get(f"{label}_ratio", float("nan"))
                        lines.append(f"| {name} | {label} | {c[f'{label}_ms']:.1f} | {ratio:.3f} |")
            lines += ["", f"Target: MoE-LoRA (auto) and the merged task adapter <= {TARGETS['e2e']:.2f}x base."]
    return "\n".join(lines) + "\n"


def write_results(
    out_dir: Path, env: dict, rows: list[Row], e2e: dict | None, training: list[Row] | None = None,
    name: str = "kernels", truncated: bool = False,
) -> tuple[Path, Path]:  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    payload = {"environment": env, "targets": TARGETS, "truncated": truncated, "rows": [asdict(r) for r in rows],
               "training": [asdict(r) for r in training or []], "e2e": e2e}  # fmt: skip
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md_path.write_text(markdown(env, rows, e2e, training, truncated))
    return json_path, md_path


def write_tables(out_dir: Path, gpu: str, rows: list[Row], json_name: str) -> list[Path]:
    """The dispatch table and the tuned launch configurations, named for the GPU (x2edit/kernels/measured)."""
    slug = device_slug(gpu)
    table = dispatch_table(rows, gpu, source=f"benchmarks/results/<date>-{slug}-{json_name}")
    paths = [out_dir / f"{slug}.json"]
    paths[0].write_text(json.dumps(table, indent=1) + "\n")
    if kernels.triton_available():
        from x2edit.kernels import triton_lora, tuning

        tuned = tuning.tuned_tables(triton_lora.TUNERS)
        paths.append(out_dir / f"{slug}-configs.json")
        paths[1].write_text(json.dumps({"gpu": gpu, "kernels": tuned}, indent=1) + "\n")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the result files")
    parser.add_argument("--quick", action="store_true", help="t2i tokens, three linears, rank 64, t2i end to end")
    parser.add_argument("--no-e2e", action="store_true", help="skip the full-transformer forward")
    parser.add_argument("--no-train", action="store_true", help="skip the training-step rows")
    parser.add_argument("--deadline", type=float, default=None, help="seconds after which no measurement starts")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print(
            "benchmarks/lora_kernels.py needs a CUDA GPU (CUDA-event timing, cuBLAS and the Triton kernels compiled); "
            "no CUDA device is visible to torch. Nothing was measured.",
            file=sys.stderr,
        )
        return 2

    torch.backends.cuda.matmul.allow_tf32 = False
    device = "cuda"
    deadline = Deadline(args.deadline)
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    timer = cuda_timer(args.warmup, args.reps)
    warm_up_gpu()
    e2e = None
    if not args.no_e2e:  # first, so a deadline cuts the (many) linear rows rather than it
        cases = dict(list(E2E_CASES.items())[:1]) if args.quick else E2E_CASES
        e2e = bench_e2e(cuda_timer(2, 5), device, cases=cases, deadline=deadline)
        torch.cuda.empty_cache()
    if args.quick:
        linears = {k: FLUX_LINEARS[k] for k in QUICK_LINEARS}
        tokens = dict(list(TOKEN_COUNTS.items())[:1])
        rows = bench_linears(timer, device, linears=linears, token_counts=tokens, lora_ranks=(64,), l2_bytes=l2,
                             deadline=deadline)  # fmt: skip
        train_linears = dict(list(linears.items())[:1])
    else:
        rows = bench_linears(timer, device, lora_ranks=(16, 64), l2_bytes=l2, deadline=deadline)
        train_linears = {k: FLUX_LINEARS[k] for k in QUICK_LINEARS}
    training = None if args.no_train else bench_training(timer, device, linears=train_linears, deadline=deadline)
    env = environment()
    name = "kernels-quick" if args.quick else "kernels"
    paths = list(write_results(args.out, env, rows, e2e, training, name=name, truncated=deadline.hit))
    if not args.quick:
        paths += write_tables(args.out, env["gpu"], rows + (training or []), f"{name}.json")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
