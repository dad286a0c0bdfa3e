"""Launch configurations of the Triton kernels: shipped per GPU name, tuned only where missing.

A kernel's configuration (tile sizes, warps, pipeline stages) is chosen per explicit key (the sizes
that change the best tile: a token-count bucket, N, K, the rank block, the dtype), in this order:

  1. this process's memo of earlier choices;
  2. the table tuned on this GPU model and shipped in `x2edit/kernels/measured/<gpu-name>-configs.json`
     (written by the full run of `benchmarks/lora_kernels.py` on that GPU: `<gpu-name>-configs.json`);
  3. "fixed" mode (X2EDIT_KERNEL_TUNING=fixed, which the kernel tests set, and always under the
     Triton interpreter): the first configuration that fits, so every shape compiles once and
     nothing is timed;
  4. otherwise autotuning: once per process, the GPU first runs matrix products for about a second so
     that its clocks are up (the first kernel timed on a cold H200 ran 2x slower), then every
     configuration is timed (`triton.testing.do_bench`, median) and the fastest kept. A
     configuration that fails to compile or runs out of resources is skipped.

This module imports triton; only the Triton backends import it.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from triton.testing import do_bench

from x2edit.kernels.env import device_name, device_slug, interpreter_enabled

ENV_VAR = "X2EDIT_KERNEL_TUNING"  # "auto" (default) or "fixed"
MEASURED_DIR = Path(__file__).resolve().parent / "measured"
WARMUP_SECONDS = 1.0


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration: the kernel's tile constexprs plus warps and pipeline stages."""

    meta: tuple[tuple[str, int | bool], ...]  # sorted (name, value) pairs, e.g. (("BLOCK_M", 64), ...)
    num_warps: int = 4
    num_stages: int = 3

    @classmethod
    def of(cls, num_warps: int = 4, num_stages: int = 3, **meta) -> KernelConfig:
        return cls(tuple(sorted(meta.items())), num_warps, num_stages)

    @property
    def kwargs(self) -> dict:
        """Keyword arguments of a launch: the constexprs, num_warps and num_stages."""
        return {**dict(self.meta), "num_warps": self.num_warps, "num_stages": self.num_stages}

    def __getitem__(self, name: str):
        return dict(self.meta)[name]

    def to_dict(self) -> dict:
        return self.kwargs

    @classmethod
    def from_dict(cls, d: dict) -> KernelConfig:
        d = dict(d)
        return cls.of(num_warps=d.pop("num_warps", 4), num_stages=d.pop("num_stages", 3), **d)


def tuning_mode() -> str:
    """ "fixed" (first fitting config, never timed) or "auto" (shipped table, else autotune)."""
    if interpreter_enabled():
        return "fixed"
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in ("auto", "fixed"):
        raise ValueError(f"${ENV_VAR} must be 'auto' or 'fixed', got {mode!r}")
    return mode


def key_string(key: Sequence) -> str:
    return ",".join(str(k) for k in key)


@functools.cache
def shipped_configs(gpu: str) -> dict[str, dict[str, KernelConfig]]:
    """kernel name -> key string -> config, tuned on GPU model `gpu`; empty where none is shipped."""
    path = MEASURED_DIR / f"{device_slug(gpu)}-configs.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {
        kernel: {key: KernelConfig.from_dict(cfg) for key, cfg in table.items()}
        for kernel, table in data.get("kernels", {}).items()
    }


_warmed: set[str] = set()


def warm_clocks(device: torch.device, seconds: float = WARMUP_SECONDS) -> None:
    """Run bf16 matrix products for `seconds` so the GPU leaves its idle clocks before anything is timed."""
    if device.type != "cuda" or str(device) in _warmed:
        return
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(8):
            a @ a
        torch.cuda.synchronize(device)
    _warmed.add(str(device))


class Tuner:
    """Chooses and remembers the launch configuration of one kernel per key.

    Args:
        name: the kernel's name in the shipped tables.
        configs: the candidate configurations (the first that fits is the "fixed" one).
        fits: (config, key) -> whether the config may run for that key (resource budgets); None: all.
    """

    def __init__(
        self,
        name: str,
        configs: Sequence[KernelConfig],
        fits: Callable[[KernelConfig, tuple], bool] | None = None,
        interpreter_config: KernelConfig | None = None,
    ):
        self.name = name
        self.configs = list(configs)
        self.fits = fits
        self.interpreter_config = interpreter_config
        self.memo: dict[tuple, KernelConfig] = {}
        self.tuned: dict[str, dict] = {}  # key string -> {"config": ..., "ms": {...}} of autotuned keys

    def candidates(self, key: tuple) -> list[KernelConfig]:
        kept = [c for c in self.configs if self.fits is None or self.fits(c, key)]
        return kept or self.configs[-1:]

    def pick(self, key: tuple, device: torch.device, launch: Callable[[KernelConfig], object]) -> KernelConfig:
        """The configuration for `key`; `launch(config)` runs the kernel once (used only to time it)."""
        if key in self.memo:
            return self.memo[key]
        if interpreter_enabled() and self.interpreter_config is not None:
            config = self.interpreter_config
        elif tuning_mode() == "fixed" or device.type != "cuda":
            config = self.candidates(key)[0]
        else:
            config = shipped_configs(device_name(device)).get(self.name, {}).get(key_string(key))
            if config is None:
                config = self._autotune(key, device, launch)
        self.memo[key] = config
        return config

    def _autotune(self, key: tuple, device: torch.device, launch: Callable[[KernelConfig], object]) -> KernelConfig:
        warm_clocks(device)
        timings: dict[KernelConfig, float] = {}
        failures: dict[KernelConfig, str] = {}
        for config in self.candidates(key):
            try:
                timings[config] = do_bench(lambda c=config: launch(c), warmup=5, rep=20,
                                           return_mode="median")  # fmt: skip
            except Exception as exc:  # a config that does not compile or fit is skipped, not fatal
                failures[config] = f"{type(exc).__name__}: {exc}"[:300]
        if not timings:
            raise RuntimeError(f"kernels: no launch configuration of {self.name} ran for key {key}: "
                               f"{sorted(failures.values())[:3]}")  # fmt: skip
        best = min(timings, key=timings.get)
        self.tuned[key_string(key)] = {
            "config": best.to_dict(),
            "ms": {json.dumps(c.to_dict(), sort_keys=True): ms for c, ms in timings.items()},
            "failed": {json.dumps(c.to_dict(), sort_keys=True): why for c, why in failures.items()},
        }
        return best


def tuned_tables(tuners: Sequence[Tuner]) -> dict:
    """What this process autotuned, in the shipped-table layout (for `benchmarks/tune_kernels.py`)."""
    return {t.name: {k: v["config"] for k, v in t.tuned.items()} for t in tuners if t.tuned}
