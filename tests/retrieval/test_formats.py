"""Writing LoRAs in community layouts, read back through the one community reader."""

import pytest
import torch
from autolora_helpers import KOHYA_MODULES, random_factors

from x2edit.adapters.community import read_community_lora, read_lora_header
from x2edit.retrieval.formats import bfl_name, kohya_able, write_lora


@pytest.mark.parametrize("fmt", ["peft", "diffusers", "kohya", "comfyui"])
def test_every_layout_reads_back_to_the_same_update(fmt, tmp_path):
    f = random_factors(KOHYA_MODULES, rank=2, seed=1, scale=0.25)
    path = write_lora(tmp_path / "l.safetensors", f, fmt, {"ss_output_name": "x"}, kohya_alpha_ratio=0.5)
    back = read_community_lora(path)
    assert sorted(back) == sorted(f)
    for m, (A, B, s) in back.items():
        A0, B0, s0 = f[m]
        torch.testing.assert_close(s * B @ A, s0 * B0 @ A0, atol=1e-6, rtol=1e-5)
    layout, header = read_lora_header(path)
    assert layout == ("kohya/ComfyUI" if fmt in ("kohya", "comfyui") else "diffusers/PEFT")
    assert header["ss_output_name"] == "x"


def test_kohya_names_only_what_flux_checkpoints_name():
    assert bfl_name("transformer_blocks.3.attn.to_k") == ("double_blocks.3.img_attn.qkv", 1)
    assert bfl_name("proj_out") == ("final_layer.linear", None)
    assert kohya_able(KOHYA_MODULES) and not kohya_able(["single_transformer_blocks.0.attn.to_q"])
    with pytest.raises(ValueError, match="peft or diffusers layout"):
        write_lora("/tmp/never.safetensors", random_factors({"single_transformer_blocks.0.attn.to_q": (32, 32)}),
                   "kohya")
