"""The encoder and gate shipped for x2edit-tiny (x2edit/retrieval/models) fit the embedded base as it loads."""

import numpy as np
import torch
from autolora_helpers import random_factors
from PIL import Image

from x2edit.adapters import adapter_names, remove_adapter
from x2edit.registry import load_pipeline
from x2edit.retrieval.encoder import WeightEncoder, default_encoder_path, embed_files, module_set
from x2edit.retrieval.formats import write_lora
from x2edit.retrieval.fusion import GateNet, LearnedGate, default_gate_path


def _tiny_lora(pipe, path, seed):
    modules = {m: (k, n) for m, k, n in module_set(pipe.transformer) if m.endswith(("attn.to_q", "attn.to_v"))}
    return write_lora(path, random_factors(modules, rank=2, seed=seed, std=0.05), "peft")


def test_the_shipped_encoder_reads_x2edit_tiny_loras(tmp_path):
    pipe = load_pipeline("x2edit-tiny")
    for name in adapter_names(pipe.transformer):  # the module set is the base's own linears
        remove_adapter(pipe.transformer, name)
    encoder = WeightEncoder.load(default_encoder_path())
    assert [tuple(m) for m in encoder.config.modules] == module_set(pipe.transformer)
    emb = embed_files(encoder, [_tiny_lora(pipe, tmp_path / f"{i}.safetensors", i) for i in range(2)])
    assert emb.shape == (2, 384) and torch.isfinite(emb).all()
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    assert (emb[0] - emb[1]).abs().max() > 1e-3  # two updates, two embeddings


def test_the_shipped_gate_fuses_two_loras_on_x2edit_tiny(tmp_path):
    pipe = load_pipeline("x2edit-tiny")
    gate = GateNet.load(default_gate_path())
    assert gate.config.modules, "the shipped gate names its layers"
    assert gate.metadata["encoder"] == WeightEncoder.load(default_encoder_path()).fingerprint()  # shipped as a pair
    for i in range(2):
        pipe.load_lora_weights(str(_tiny_lora(pipe, tmp_path / f"{i}.safetensors", i)), adapter_name=f"l{i}")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    kwargs = dict(image=image, prompt="a red background", num_inference_steps=1, output_type="np",
                  generator=torch.Generator().manual_seed(0))
    summed = pipe(**kwargs).images
    pipe.fuse_loras(["l0", "l1"], fusion=LearnedGate())
    gated = pipe(**kwargs).images
    assert gated.shape == summed.shape and np.isfinite(gated).all()
    assert abs(gated - summed).max() > 0  # the gate is not the plain sum it starts from
