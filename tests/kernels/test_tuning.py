"""Launch configurations: the shipped per-GPU table wins, autotuning only for what is missing (after one
clock warm-up), and the fixed configuration under the kernel tests. The GPU is faked: these tests
check which configuration is chosen and what is timed, not speed."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton")
from x2edit.kernels import triton_lora, tuning  # noqa: E402
from x2edit.kernels.tuning import KernelConfig, Tuner  # noqa: E402

CONFIGS = [KernelConfig.of(BLOCK_M=m, num_warps=w) for m, w in ((16, 4), (32, 4), (64, 8))]
FAKE_GPU = torch.device("cuda")  # only its .type is read once the name lookup is faked


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """A machine where tuning would run: not the interpreter, mode auto, a GPU named "Test GPU 1"."""
    monkeypatch.setattr(tuning, "interpreter_enabled", lambda: False)
    monkeypatch.setenv(tuning.ENV_VAR, "auto")
    monkeypatch.setattr(tuning, "device_name", lambda device: "Test GPU 1")
    monkeypatch.setattr(tuning, "MEASURED_DIR", tmp_path)
    tuning.shipped_configs.cache_clear()
    warmups, timed = [], []
    monkeypatch.setattr(tuning, "warm_clocks", lambda device: warmups.append(device))

    def fake_bench(fn, **kwargs):
        config = fn()  # the launch returns its config here
        timed.append(config)
        return {16: 3.0, 32: 1.0, 64: 2.0}[config["BLOCK_M"]]

    monkeypatch.setattr(tuning, "do_bench", fake_bench)
    yield tmp_path, warmups, timed
    tuning.shipped_configs.cache_clear()


def test_the_kernel_tests_run_in_fixed_mode():
    assert tuning.tuning_mode() == "fixed"
    tuner = Tuner("t", CONFIGS, fits=lambda c, key: c["BLOCK_M"] >= key[0])

    def launch(config):
        raise AssertionError("fixed mode must not time anything")

    assert tuner.pick((32,), FAKE_GPU, launch) == CONFIGS[1]  # the first that fits, untimed


def test_a_shipped_config_is_used_without_timing(fake_gpu):
    folder, warmups, timed = fake_gpu
    shipped = {"gpu": "Test GPU 1", "kernels": {"t": {"4608,3072": CONFIGS[2].to_dict()}}}
    (folder / "test-gpu-1-configs.json").write_text(json.dumps(shipped))
    tuner = Tuner("t", CONFIGS)
    assert tuner.pick((4608, 3072), FAKE_GPU, lambda c: c) == CONFIGS[2]
    assert not warmups and not timed


def test_a_missing_key_is_autotuned_once_after_one_clock_warmup(fake_gpu):
    folder, warmups, timed = fake_gpu
    tuner = Tuner("t", CONFIGS)
    assert tuner.pick((4608, 3072), FAKE_GPU, lambda c: c) == CONFIGS[1]  # the fastest
    assert timed == CONFIGS and len(warmups) == 1
    assert tuner.pick((4608, 3072), FAKE_GPU, lambda c: c) == CONFIGS[1]  # remembered
    assert len(timed) == 3
    tuner.pick((8192, 3072), FAKE_GPU, lambda c: c)
    assert len(timed) == 6
    # What was tuned comes back in the shipped layout, and loads as a shipped table.
    (folder / "test-gpu-1-configs.json").write_text(json.dumps({"gpu": "Test GPU 1", "kernels": tuning.tuned_tables([tuner])}))
    tuning.shipped_configs.cache_clear()
    assert tuning.shipped_configs("Test GPU 1")["t"]["4608,3072"] == CONFIGS[1]


def test_a_config_that_fails_to_compile_is_skipped(fake_gpu):
    _, _, timed = fake_gpu

    def launch(config):
        if config["BLOCK_M"] == 32:
            raise RuntimeError("out of resource: shared memory")
        return config

    tuner = Tuner("t", CONFIGS)
    assert tuner.pick((1,), FAKE_GPU, launch) == CONFIGS[2]
    assert "out of resource" in next(iter(tuner.tuned["1"]["failed"].values()))


def test_the_shrink_keeps_its_accumulator_in_registers():
    # key[3] is the rank block: (BLOCK_M, BLOCK_R) float32 must stay <= 64 KiB.
    assert all(c["BLOCK_M"] * 256 <= 16384 for c in triton_lora.SHRINK.candidates((4096, 3072, 256, 256, "bfloat16", False)))
    assert len(triton_lora.SHRINK.candidates((4096, 3072, 16, 16, "bfloat16", False))) == len(triton_lora.SHRINK.configs)


def test_warm_up_is_skipped_off_the_gpu():
    tuning.warm_clocks(torch.device("cpu"))  # returns at once, nothing to warm
    assert "cpu" not in tuning._warmed
