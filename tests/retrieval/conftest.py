"""Fixtures for the AutoLoRA tests: the tiny base saved as a pipeline directory, and a tiny pool, weight
encoder and gate trained in seconds on it by the same code as the shipped ones (session-wide: several
test files read them). Helpers are in autolora_helpers.py.
"""

import contextlib

import numpy as np
import pytest
import torch
from autolora_helpers import RES, tiny_pipe


@contextlib.contextmanager
def one_thread():
    """Tiny models run faster on one thread: a second one costs more than it gains, and on a busy
    machine many times more (measured: the tiny pool took 55 s on two threads and 5 s on one)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    """The tiny base saved as a pipeline directory (what ``load_pipeline`` and the commands read)."""
    path = tmp_path_factory.mktemp("tiny_base")
    tiny_pipe().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_pool(tiny_base_dir, tmp_path_factory):
    """(pool directory, manifest): 4 concepts x 3 instances + 1 joint LoRA, trained for a few steps."""
    from x2edit.retrieval.pool import PoolConfig, make_pool

    out = tmp_path_factory.mktemp("pool")
    config = PoolConfig(
        base=str(tiny_base_dir), resolution=RES,
        concepts=["tone:night", "tone:grayscale", "background:red", "background:blue"],
        unseen_concepts=["background:blue"],
        instances=[{"rank": 4, "targets": "attn", "format": "peft", "alpha_ratio": 1.0},
                   {"rank": 2, "targets": "attn", "format": "kohya", "alpha_ratio": 0.5},
                   {"rank": 2, "targets": "mlp", "format": "diffusers", "alpha_ratio": 1.0}],
        joint=[["background:red", "tone:night"]], samples_per_lora=32, loras_per_batch=13, samples_per_lora_in_batch=4,
        lr=1e-2, bank_size=6, eval_pairs=2, eval_steps=[1], bar_db=-50.0, near_duplicates=2, noise_loras=2,
        checkpoint_every=0, seed=0)
    with one_thread():
        return out, make_pool(config, out)


@pytest.fixture(scope="session")
def tiny_encoder(tiny_pool, tmp_path_factory):
    """A weight encoder trained on the tiny pool (path)."""
    from x2edit.retrieval.encoder import EncoderTrainConfig, train_encoder

    path = tmp_path_factory.mktemp("encoder") / "encoder.safetensors"
    with one_thread():
        train_encoder(tiny_pool[0], path, EncoderTrainConfig(steps=30, dim=32, layers=1, heads=2, batch=16))
    return path


@pytest.fixture(scope="session")
def tiny_gate(tiny_pool, tiny_encoder, tmp_path_factory):
    from x2edit.retrieval.fusion import GateTrainConfig, train_gate

    path = tmp_path_factory.mktemp("gate") / "gate.safetensors"
    with one_thread():
        train_gate(tiny_pool[0], tiny_encoder, path, GateTrainConfig(steps=4, scenes_per_step=2, hidden=16))
    return path


@pytest.fixture
def image16():
    return np.random.default_rng(0).integers(0, 256, (RES, RES, 3), dtype=np.uint8)
