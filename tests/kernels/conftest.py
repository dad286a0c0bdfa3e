"""Fixtures for the kernel tests: device, fresh random seeds, backend and layout switches.

Every test draws fresh random inputs; the seed is printed in failure messages and can be pinned
with X2EDIT_TEST_SEED=<int> to reproduce a failure.

The Triton kernels launch with one fixed configuration per kernel here (X2EDIT_KERNEL_TUNING=fixed):
on a GPU, autotuning every odd test shape made `pytest tests/kernels` take minutes per test.
"""

from __future__ import annotations

import os

os.environ.setdefault("X2EDIT_KERNEL_TUNING", "fixed")  # read at launch time by x2edit.kernels.tuning

import pytest  # noqa: E402
import torch  # noqa: E402

from x2edit.kernels import use_backend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def seed() -> int:
    pinned = os.environ.get("X2EDIT_TEST_SEED")
    return int(pinned) if pinned else int.from_bytes(os.urandom(4), "little")


@pytest.fixture
def gen(seed) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


@pytest.fixture(params=["addmm", "merge", "triton", "triton_tma"])
def fast_backend(request):
    """Each backend other than the reference (Triton ones compiled on CUDA, interpreted on CPU)."""
    if request.param.startswith("triton"):
        pytest.importorskip("triton")
        if request.param == "triton_tma" and torch.cuda.is_available():
            from x2edit.kernels.env import is_hopper

            if not is_hopper(torch.device("cuda")):
                pytest.skip("triton_tma needs a Hopper GPU")
    with use_backend(request.param):
        yield request.param


@pytest.fixture
def triton_backend():
    """Run the test on the Triton path (compiled on CUDA, interpreted on CPU)."""
    pytest.importorskip("triton")
    with use_backend("triton"):
        yield


@pytest.fixture(params=["dense", "grouped"])
def layout(request, monkeypatch):
    """Rank-space layout of the Triton path: all experts dense, or tokens grouped with tile skipping.

    At test sizes E * r is small, so "grouped" lowers the dense limit to force that path.
    """
    pytest.importorskip("triton")
    from x2edit.kernels import triton_lora

    if request.param == "grouped":
        monkeypatch.setattr(triton_lora, "DENSE_RANK_LIMIT", 0)
    else:
        monkeypatch.setattr(triton_lora, "DENSE_RANK_LIMIT", 1 << 30)
    return request.param
