"""Fixtures for build-data tests: tiny seeded models saved to disk and loaded by path, as users would."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="session")
def tiny_kontext_dir(tmp_path_factory):
    """A tiny FLUX.1-Kontext pipeline (x2edit.testing) saved with save_pretrained."""
    from diffusers import FluxKontextPipeline

    from x2edit.testing import tiny_kontext_components

    path = tmp_path_factory.mktemp("tiny_kontext")
    FluxKontextPipeline(**tiny_kontext_components(seed=0)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_fill_dir(tmp_path_factory):
    """A tiny FLUX.1-Fill pipeline (x2edit.testing) saved with save_pretrained."""
    from diffusers import FluxFillPipeline

    from x2edit.testing import tiny_fill_components

    path = tmp_path_factory.mktemp("tiny_fill")
    FluxFillPipeline(**tiny_fill_components(seed=0)).save_pretrained(path)
    return str(path)


def _char_tokenizer(specials: list[str], bos: str, eos: str):
    """A character-level tokenizer built offline with the tokenizers library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]"] + [chr(c) for c in range(32, 127)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", bos_token=bos,
                                   eos_token=eos, additional_special_tokens=specials)


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}</s>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory):
    """A tiny seeded LLaVA (CLIP vision tower + Llama) with processor and chat template, saved by path.

    Qwen2-VL / Qwen2.5-VL processors need a video processor, which needs torchvision (not installable
    here); LLaVA goes through the same generic path: AutoProcessor, AutoModelForImageTextToText,
    chat template with image entries, generate.
    """
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = _char_tokenizer(["<image>", "<|user|>", "<|assistant|>"], "<s>", "</s>")
    tok.chat_template = CHAT_TEMPLATE
    ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=16, vision_feature_select_strategy="default",
                          chat_template=CHAT_TEMPLATE, image_token="<image>", num_additional_image_tokens=1)
    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=32, patch_size=16, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                bos_token_id=tok.bos_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    path = tmp_path_factory.mktemp("tiny_vlm")
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory):
    """A tiny seeded Llama causal LM with a chat template, saved by path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _char_tokenizer(["<|user|>", "<|assistant|>"], "<s>", "</s>")
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                         bos_token_id=tok.bos_token_id)).eval()
    path = tmp_path_factory.mktemp("tiny_llm")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture
def photo_dir(tmp_path):
    """A folder of small real image files: 5 good PNG/JPEG photos-to-be and one corrupt file."""
    from PIL import Image

    d = tmp_path / "photos"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        img = (rng.random((40, 48, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"img{i}.{'png' if i % 2 else 'jpg'}")
        (d / f"img{i}.txt").write_text(f"make the picture number {i} red")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (d / "broken.txt").write_text("make it blue")
    return d
