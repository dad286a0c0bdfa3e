"""The weight encoder sees a LoRA only through its update B A: exact invariances, and what it learns."""

import pytest
import torch
from autolora_helpers import KOHYA_MODULES, random_factors, tiny_pipe

from x2edit.retrieval.encoder import (
    EncoderConfig,
    WeightEncoder,
    embed_files,
    module_set,
    module_type,
    read_factors,
)
from x2edit.retrieval.formats import write_lora


@pytest.fixture(scope="module")
def encoder():
    """A random encoder of the tiny base with every weight perturbed (no zero or symmetric init left)."""
    torch.manual_seed(0)
    enc = WeightEncoder(EncoderConfig([list(m) for m in module_set(tiny_pipe().transformer)], probes=3, dim=16,
                                      layers=1, heads=2))
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    return enc.eval()


def _embed(encoder, factors):
    with torch.no_grad():
        return encoder([factors])[0]


def test_module_set_is_read_from_the_transformer():
    names = [m[0] for m in module_set(tiny_pipe().transformer)]
    assert "transformer_blocks.0.attn.to_q" in names and "single_transformer_blocks.0.proj_out" in names
    assert module_type("single_transformer_blocks.12.attn.to_q") == "single_transformer_blocks.#.attn.to_q"
    assert module_type("transformer_blocks.3.attn.to_out.0") == "transformer_blocks.#.attn.to_out.0"


def test_rank_reparametrisation_and_zero_padding_leave_the_embedding_unchanged(encoder):
    """B A = (B M)(M^-1 A) for any invertible M, and zero rows/columns of a padded rank add nothing."""
    f = random_factors(KOHYA_MODULES, rank=3, seed=1)
    g = torch.Generator().manual_seed(2)
    reparam, padded = {}, {}
    for m, (A, B, s) in f.items():
        M = torch.randn(3, 3, generator=g) + 3 * torch.eye(3)
        reparam[m] = (torch.linalg.solve(M, A), B @ M, s)
        padded[m] = (torch.cat([A, torch.zeros(5, A.shape[1])]), torch.cat([B, torch.zeros(B.shape[0], 5)], 1), s)
    e = _embed(encoder, f)
    torch.testing.assert_close(_embed(encoder, reparam), e, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(_embed(encoder, padded), e, atol=1e-5, rtol=1e-4)
    # ... while another update of the same shapes embeds elsewhere (the test is not of a constant map).
    assert (_embed(encoder, random_factors(KOHYA_MODULES, rank=3, seed=9)) - e).abs().max() > 1e-2


def test_the_files_of_one_update_in_every_layout_embed_the_same(encoder, tmp_path):
    """kohya (fused q/k/v, alpha != rank), ComfyUI, diffusers/PEFT with metadata and without, read
    through the community reader: one embedding."""
    f = random_factors(KOHYA_MODULES, rank=2, seed=3, scale=0.5)
    paths = [write_lora(tmp_path / f"{fmt}.safetensors", f, fmt, kohya_alpha_ratio=0.5)
             for fmt in ("kohya", "comfyui", "peft", "diffusers")]
    emb = embed_files(encoder, paths)
    for e in emb[1:]:
        torch.testing.assert_close(e, emb[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(emb[0], _embed(encoder, f), atol=1e-5, rtol=1e-4)
    # The kohya file really is another factorisation (one fused qkv key of rank 6), read back exactly.
    A, B, s = read_factors(paths[0])["transformer_blocks.0.attn.to_q"]
    A0, B0, s0 = f["transformer_blocks.0.attn.to_q"]
    torch.testing.assert_close(s * B @ A, s0 * B0 @ A0, atol=1e-5, rtol=1e-5)


def test_the_overall_strength_is_ignored_but_the_update_is_not(encoder):
    f = random_factors(KOHYA_MODULES, seed=4)
    stronger = {m: (A, B, 3 * s) for m, (A, B, s) in f.items()}
    one_module = {m: (A, 5 * B, s) if m == "x_embedder" else (A, B, s) for m, (A, B, s) in f.items()}
    e = _embed(encoder, f)
    torch.testing.assert_close(_embed(encoder, stronger), e, atol=1e-5, rtol=1e-4)
    assert (_embed(encoder, one_module) - e).abs().max() > 1e-3


def test_modules_a_lora_does_not_touch_are_masked_out(encoder):
    """Whatever the encoder holds for an absent module (here its position embedding) cannot reach the
    embedding; the same change for a present module does."""
    f = random_factors({m: KOHYA_MODULES[m] for m in ("x_embedder", "proj_out")}, seed=5)
    e = _embed(encoder, f)
    shift = torch.randn(encoder.config.dim, generator=torch.Generator().manual_seed(0))
    for module, moves in (("transformer_blocks.0.attn.to_q", False), ("x_embedder", True)):
        i = encoder.index[module]
        with torch.no_grad():
            encoder.pos[i] += shift
        try:
            changed = (_embed(encoder, f) - e).abs().max().item()
        finally:
            with torch.no_grad():
                encoder.pos[i] -= shift
        assert (changed > 1e-3) == moves, (module, changed)


def test_a_lora_for_another_base_is_refused(encoder):
    with pytest.raises(ValueError, match="another base"):
        encoder.check({"transformer_blocks.7.attn.to_q": (torch.zeros(2, 32), torch.zeros(32, 2), 1.0)})
    with pytest.raises(ValueError, match="another base"):
        encoder.check({"x_embedder": (torch.zeros(2, 64), torch.zeros(32, 2), 1.0)})


def test_save_and_load_keep_the_embedding(encoder, tmp_path):
    f = random_factors(KOHYA_MODULES, seed=6)
    once = WeightEncoder.load(encoder.save(tmp_path / "a.safetensors"))  # float16 on disk
    twice = WeightEncoder.load(once.save(tmp_path / "b.safetensors"))
    torch.testing.assert_close(_embed(twice, f), _embed(once, f))
    assert once.fingerprint() == twice.fingerprint()
    torch.testing.assert_close(_embed(once, f), _embed(encoder, f), atol=5e-3, rtol=0)


def test_training_aligns_held_out_loras_with_their_concepts(tiny_pool, tiny_encoder):
    """The tiny pool's held-out instances (never trained on) embed nearest their own concept's text, and
    closer to it than the untrained encoder puts them."""
    from x2edit.data_pipeline.shapeworld.concepts import get_concept
    from x2edit.retrieval.encoder import TextEncoder

    pool, manifest = tiny_pool
    trained = WeightEncoder.load(tiny_encoder)
    fresh = WeightEncoder(trained.config)
    held = [e for e in manifest["loras"] if e["role"] == "heldout_instance"]
    concepts = sorted({e["concepts"][0] for e in manifest["loras"] if e["role"] == "train"})
    text = TextEncoder()(
        [get_concept(c).description for c in concepts])
    margins = {}
    for name, enc in (("trained", trained), ("fresh", fresh)):
        emb = embed_files(enc, [pool / e["file"] for e in held])
        sims = emb @ text.T
        own = torch.tensor([concepts.index(e["concepts"][0]) for e in held])
        margins[name] = (sims[torch.arange(len(held)), own] - sims.mean(1)).mean().item()
        if name == "trained":
            assert (sims.argmax(1) == own).all(), sims
    assert margins["trained"] > margins["fresh"] + 0.05


def test_probes_start_from_the_base_inputs_mean_and_principal_directions():
    """init_probes: per module type, row 0 is the inputs' mean and rows 1.. their top principal
    directions scaled by their spread (sign aside), over every module of that type together."""
    from x2edit.retrieval.encoder import base_activations

    pipe = tiny_pipe()
    torch.manual_seed(0)
    enc = WeightEncoder(EncoderConfig([list(m) for m in module_set(pipe.transformer)], probes=3, dim=16,
                                      layers=1, heads=2))
    lin = pipe.transformer.transformer_blocks[0].attn.to_q
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, lin.in_features, generator=g) * torch.linspace(0.1, 3, lin.in_features) + 1.5
    acts = base_activations(pipe.transformer, lambda: lin(x))
    assert set(acts) == {"transformer_blocks.0.attn.to_q"} and torch.equal(acts["transformer_blocks.0.attn.to_q"], x)
    enc.init_probes(acts)
    probe = enc.probe[enc._key[enc.type_of["transformer_blocks.0.attn.to_q"]]].detach()
    torch.testing.assert_close(probe[0], x.mean(0))
    centred = x - x.mean(0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    for i in (1, 2):
        expected = vh[i - 1] * s[i - 1] / 40 ** 0.5
        assert min((probe[i] - expected).abs().max(), (probe[i] + expected).abs().max()) < 1e-4
    # a module type with no recorded inputs keeps its (random) probes
    other = enc._key[enc.type_of["transformer_blocks.0.attn.to_k"]]
    assert not torch.allclose(enc.probe[other][0], probe[0][: enc.probe[other].shape[1]])


def test_modules_whose_update_is_zero_leave_the_embedding_unchanged_and_an_all_zero_lora_is_refused(encoder, tmp_path,
                                                                                                   tiny_encoder):
    """Issue 23, defect 8: the embedding is a function of the updates B A alone. Modules with B = 0 (an
    untrained or padded module) used to move the cosine to the same LoRA without them down to 0.38; an
    all-zero LoRA was indexed as "ok"."""
    from x2edit.retrieval.index import build_index, read_index

    f = random_factors({m: KOHYA_MODULES[m] for m in ("x_embedder", "proj_out")}, seed=5)
    padded = dict(f)
    for m, (k, n) in KOHYA_MODULES.items():
        if m not in f:
            padded[m] = (torch.randn(3, k), torch.zeros(n, 3), 0.7)  # B = 0: B A = 0 whatever A is
    assert torch.nn.functional.cosine_similarity(_embed(encoder, f), _embed(encoder, padded), dim=0) > 0.9999
    zero = {m: (A, torch.zeros_like(B), s) for m, (A, B, s) in f.items()}
    with pytest.raises(ValueError, match="changes nothing: every module's update B A is zero"):
        _embed(encoder, zero)
    write_lora(tmp_path / "loras" / "zero.safetensors", zero, "peft")
    write_lora(tmp_path / "loras" / "real.safetensors", f, "peft")
    build_index(tmp_path / "loras", tmp_path / "i.parquet", tiny_encoder)
    rows = {r["path"]: r for r in read_index(tmp_path / "i.parquet")[0]}
    assert rows["zero.safetensors"]["status"] == "skipped" and "changes nothing" in rows["zero.safetensors"]["reason"]
    assert rows["real.safetensors"]["status"] == "ok"


def test_training_calibrates_the_routing_on_its_phrasings_and_the_index_carries_it(tiny_pool, tiny_encoder, tmp_path,
                                                                                  monkeypatch):
    """train_encoder records its training phrasings and the routing thresholds calibrated on them alone; an index
    built with the encoder carries them embedded, and a training phrasing is routed to the weight signal."""
    from x2edit.data_pipeline.shapeworld.concepts import get_concept
    from x2edit.retrieval.encoder import TextEncoder
    from x2edit.retrieval.index import LoraIndex, build_index, read_index
    from x2edit.retrieval.signals import calibrate_routing

    routing = WeightEncoder.load(tiny_encoder).config.routing
    pool, manifest = tiny_pool
    concepts = sorted({e["concepts"][0] for e in manifest["loras"] if e["role"] == "train" and e["passed"]})
    assert routing["phrases"] == [p for c in concepts for p in get_concept(c).phrases()]
    assert "background:blue" not in concepts  # the unseen concept's phrasings are not the encoder's
    text = TextEncoder()
    expected = calibrate_routing(text(routing["phrases"]).numpy(), [c for c in concepts for _ in get_concept(c).phrases()])
    assert (routing["text_match"], routing["known"]) == pytest.approx(expected)
    folder = tmp_path / "loras"
    write_lora(folder / "a.safetensors", random_factors(KOHYA_MODULES, seed=1), "peft", {"modelspec.title": "night"})
    build_index(folder, tmp_path / "i.parquet", tiny_encoder)
    index = LoraIndex(tmp_path / "i.parquet", text_encoder=text)
    assert index.routing.vocabulary.shape == (len(routing["phrases"]), 384)
    assert index.routing.known == pytest.approx(routing["known"])
    assert index.search(routing["phrases"][0], k=1)[0]["route"] == "weight"
    # re-indexing the unchanged folder carries the embedded phrasings over: the text model is not needed
    meta = read_index(tmp_path / "i.parquet")[1]
    import x2edit.retrieval.encoder as encoder_module

    def no_model(*args):
        raise AssertionError("the text model was loaded to re-index an unchanged folder")

    monkeypatch.setattr(encoder_module, "shared_text_encoder", no_model)
    assert build_index(folder, tmp_path / "i.parquet", tiny_encoder)["unchanged"] == 1
    assert read_index(tmp_path / "i.parquet")[1]["x2edit.routing"] == meta["x2edit.routing"]


def test_validation_holds_out_an_instance_per_concept_and_scores_it_against_all_the_others(tiny_pool, tmp_path):
    """validation=True: the last kept instance of each concept with at least 2 is not fitted, and R@1 of the
    concept's phrasings finding it (among every kept train LoRA less the concept's fitted ones) is reported."""
    import numpy as np

    from x2edit.data_pipeline.shapeworld.concepts import get_concept
    from x2edit.retrieval.encoder import EncoderTrainConfig, train_encoder

    pool, manifest = tiny_pool
    kept = [e for e in manifest["loras"] if e["role"] == "train" and e["passed"]]
    counts = {c: sum(e["concepts"][0] == c for e in kept) for c in {e["concepts"][0] for e in kept}}
    held_concepts = sorted(c for c, n in counts.items() if n >= 2)
    assert held_concepts
    config = dict(steps=4, dim=32, layers=1, heads=2, batch=16, threads=1)
    summary = train_encoder(pool, tmp_path / "e.safetensors", EncoderTrainConfig(**config, validation=True))
    v = summary["validation"]
    assert summary["train_loras"] == len(kept) - len(held_concepts)
    assert v["concepts"] == len(held_concepts) and 0 <= v["R@1"] <= 1
    assert v["queries"] == sum(len(get_concept(c).phrases()) for c in held_concepts)
    assert np.isfinite([p["loss"] for p in summary["curve"]]).all()
    plain = train_encoder(pool, tmp_path / "f.safetensors", EncoderTrainConfig(**config))
    assert "validation" not in plain and plain["train_loras"] == len(kept)
