"""The index's three signals (issue 23, item 4): a LoRA for a base no encoder knows is indexed and found by its
text and by its base-free weight fingerprint; a text query mixes the weight and text signals by a tuned w."""

import json

import numpy as np
import pytest
import torch
from autolora_helpers import KOHYA_MODULES, random_factors

from x2edit.cli import main
from x2edit.retrieval.formats import write_lora
from x2edit.retrieval.index import LoraIndex, build_index, read_index
from x2edit.retrieval.signals import file_text, spectrum_fingerprint, tune_hybrid_weight

# A FLUX.1-size module set no encoder here was trained for (the tiny encoder's base is 32 wide).
FLUX_MODULES = {"transformer_blocks.0.attn.to_q": (3072, 3072), "transformer_blocks.0.attn.to_k": (3072, 3072),
                "single_transformer_blocks.0.proj_out": (15360, 3072)}


def _flux_lora(seed: int, rank: int = 4) -> dict:
    return random_factors(FLUX_MODULES, rank=rank, seed=seed, std=0.02)


def test_the_fingerprint_is_of_the_update_alone_and_tells_loras_apart():
    """The same update in another layout, with its rank zero-padded, or its scale folded into B, gives the same
    fingerprint; another LoRA does not; nothing depends on module names (any base)."""
    a = random_factors(KOHYA_MODULES, rank=3, seed=1)
    padded = {m: (torch.cat([A, torch.zeros(2, A.shape[1])]), torch.cat([B, torch.zeros(B.shape[0], 2)], 1), s)
              for m, (A, B, s) in a.items()}
    folded = {m: (A, B * s, 1.0) for m, (A, B, s) in a.items()}
    renamed = {f"blocks.{i}": f for i, f in enumerate(a.values())}
    f = spectrum_fingerprint(a)
    assert f.dtype == np.float32 and abs(np.linalg.norm(f) - 1) < 1e-5
    for same in (padded, folded, renamed):
        np.testing.assert_allclose(spectrum_fingerprint(same), f, atol=1e-5)
    other = random_factors(KOHYA_MODULES, rank=1, seed=2)
    assert float(spectrum_fingerprint(other) @ f) < 0.99
    with pytest.raises(ValueError, match="no modules"):
        spectrum_fingerprint({})


def test_file_text_reads_the_name_title_triggers_and_descriptive_fields():
    text = file_text("styles/mystyle_v3-finalCut.safetensors", "Moody Film", ["moodyfilm", "grain"],
                     {"modelspec.description": "a grainy film look", "ss_network_dim": "16"})
    assert text == "Moody Film. moodyfilm, grain. mystyle v3 final Cut. a grainy film look"
    assert file_text("x.safetensors", "x", [], {}) == "x"  # the stem is the title: said once


def test_loras_of_a_base_without_an_encoder_are_found_by_text_and_by_fingerprint(tmp_path, tiny_encoder, capsys):
    folder = tmp_path / "flux"
    write_lora(folder / "neon_city_nights.safetensors", _flux_lora(1), "peft",
               {"modelspec.title": "Neon City", "modelspec.trigger_phrase": "neon lights, cyberpunk street"})
    write_lora(folder / "watercolor_v2.safetensors", _flux_lora(2, rank=2), "diffusers")
    write_lora(folder / "copies" / "neon_resaved.safetensors", _flux_lora(1), "diffusers")  # the first, re-saved
    write_lora(folder / "tiny_sepia.safetensors", random_factors(KOHYA_MODULES, seed=3), "peft",
               {"modelspec.title": "sepia tone"})
    counts = build_index(folder, tmp_path / "i.parquet", tiny_encoder)
    assert counts["ok"] == 4 and counts["skipped"] == 0
    index = LoraIndex(tmp_path / "i.parquet")
    assert index.signal_counts() == {"weight": 1, "text": 4, "fingerprint": 4}

    hits = index.search("cyberpunk neon street at night", k=4)
    assert hits[0]["path"] == "neon_city_nights.safetensors" and hits[0]["signals"] == ["text"]
    np.testing.assert_allclose(hits[0]["score"], hits[0]["scores"]["text"], rtol=1e-5)  # text alone, unmixed
    assert index.search("a watercolor painting", k=1)[0]["path"] == "watercolor_v2.safetensors"
    sepia = next(h for h in index.search("sepia tone", k=4) if h["path"] == "tiny_sepia.safetensors")
    assert sepia["signals"] == ["weight", "text"]

    like = index.search_like(folder / "neon_city_nights.safetensors", k=2)
    assert {h["path"] for h in like} == {"neon_city_nights.safetensors", "copies/neon_resaved.safetensors"}
    assert all(h["score"] > 0.9999 and h["signals"] == ["fingerprint"] for h in like)

    assert main(["lora", "search", "neon", "--index", str(tmp_path / "i.parquet"), "-k", "1"]) == 0
    out = capsys.readouterr().out
    assert f"4 LoRAs searched by weight and text (w = {index.hybrid_weight:g})" in out
    assert "1 have the weight signal" in out
    assert "text " in out.splitlines()[1] and "neon_city_nights.safetensors" in out
    assert main(["lora", "search", "--like", str(folder / "watercolor_v2.safetensors"), "--index",
                 str(tmp_path / "i.parquet"), "-k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["path"] == "watercolor_v2.safetensors"
    for argv in (["neon", "--like", str(folder / "watercolor_v2.safetensors")], []):
        assert main(["lora", "search", *argv, "--index", str(tmp_path / "i.parquet")]) == 2
        assert "a query" in capsys.readouterr().err


def test_the_hybrid_weight_is_recorded_in_the_index_and_renews_the_search_cache(folder_of_two, tmp_path,
                                                                                tiny_encoder):
    out = tmp_path / "i.parquet"
    build_index(folder_of_two, out, tiny_encoder, hybrid_weight=0.8)
    assert read_index(out)[1]["x2edit.hybrid_weight"] == "0.8"
    index = LoraIndex(out)
    q = index.signals["text"][0]
    hit = index.search_embedding(np.asarray(q), k=1)[0]
    np.testing.assert_allclose(hit["score"], 0.8 * hit["scores"]["weight"] + 0.2 * hit["scores"]["text"], rtol=1e-5)
    text_only = LoraIndex(out, hybrid_weight=0.0)  # another w: the cached search matrix is made again
    hit = text_only.search_embedding(np.asarray(q), k=1)[0]
    np.testing.assert_allclose(hit["score"], hit["scores"]["text"], rtol=1e-5)
    build_index(folder_of_two, out, tiny_encoder)  # a rebuild without --hybrid-weight keeps the recorded one
    assert read_index(out)[1]["x2edit.hybrid_weight"] == "0.8"
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        build_index(folder_of_two, out, tiny_encoder, hybrid_weight=1.5)


@pytest.fixture
def folder_of_two(tmp_path):
    d = tmp_path / "two"
    write_lora(d / "a.safetensors", random_factors(KOHYA_MODULES, seed=7), "peft", {"modelspec.title": "red"})
    write_lora(d / "b.safetensors", random_factors(KOHYA_MODULES, seed=8), "kohya", {"modelspec.title": "blue"})
    return d


def test_tune_hybrid_weight_picks_the_w_that_ranks_the_relevant_file_first():
    # 3 queries over 3 files: the weight signal alone gets queries 0 and 1 right, the text alone query 2; the mix
    # at w near 0.5 gets all three.
    weight = np.array([[0.9, 0.1, 0.0], [0.0, 0.8, 0.5], [0.6, 0.0, 0.5]])
    text = np.array([[0.2, 0.5, 0.0], [0.0, 0.3, 0.4], [0.0, 0.0, 0.9]])
    w, table = tune_hybrid_weight(weight, text, np.array([0, 1, 2]))
    assert table[1.0] == pytest.approx(2 / 3) and table[0.0] == pytest.approx(1 / 3) and table[w] == 1.0
    assert 0.25 < w < 0.75
