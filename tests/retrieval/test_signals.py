"""The index's three signals (issue 23, item 4): a LoRA for a base no encoder knows is indexed and found by its
text and by its base-free weight fingerprint; a text query is routed to the weight or the text signal by thresholds
calibrated on the encoder's training phrasings."""

import json

import numpy as np
import pytest
import torch
from autolora_helpers import KOHYA_MODULES, random_factors

from x2edit.cli import main
from x2edit.retrieval.formats import write_lora
from x2edit.retrieval.index import LoraIndex, build_index
from x2edit.retrieval.signals import Routing, calibrate_routing, file_text, spectrum_fingerprint

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
    sepia = next(h for h in index.search("sepia tone", k=4, signal="weight") if h["path"] == "tiny_sepia.safetensors")
    assert sepia["signals"] == ["weight"] and set(sepia["scores"]) == {"weight", "text"}
    neon = next(h for h in index.search("sepia tone", k=4, signal="weight") if h["path"].startswith("neon"))
    assert neon["signals"] == ["text"]  # no weight signal: its text scores it on the weight route too

    like = index.search_like(folder / "neon_city_nights.safetensors", k=2)
    assert {h["path"] for h in like} == {"neon_city_nights.safetensors", "copies/neon_resaved.safetensors"}
    assert all(h["score"] > 0.9999 and h["signals"] == ["fingerprint"] for h in like)

    assert main(["lora", "search", "neon", "--index", str(tmp_path / "i.parquet"), "-k", "1"]) == 0
    out = capsys.readouterr().out
    assert "4 LoRAs searched by the text signal" in out  # a clear text match for a query new to the encoder
    assert "1 have the weight signal" in out
    assert "text " in out.splitlines()[1] and "neon_city_nights.safetensors" in out
    assert main(["lora", "search", "--like", str(folder / "watercolor_v2.safetensors"), "--index",
                 str(tmp_path / "i.parquet"), "-k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["path"] == "watercolor_v2.safetensors"
    for argv in (["neon", "--like", str(folder / "watercolor_v2.safetensors")], []):
        assert main(["lora", "search", *argv, "--index", str(tmp_path / "i.parquet")]) == 2
        assert "a query" in capsys.readouterr().err


def _routed_index(path, routing: Routing | None):
    """Three files in a 4-d space: by weight a query along e0 finds "w.safetensors", by text "t.safetensors"."""
    from x2edit.retrieval.index import write_index

    e = np.eye(4, dtype=np.float32)
    files = {"w": (e[0], e[2]), "t": (e[2], e[0]), "other": (e[3], e[3])}  # name: (weight, text embedding)
    rows = [{"path": f"{n}.safetensors", "size": 1, "mtime_ns": 1, "sha256": n, "status": "ok", "reason": "",
             "layout": "diffusers/PEFT", "ranks": "{}", "targets": [], "num_modules": 0, "title": n,
             "trigger_words": [], "metadata": "{}", "embedding": w.tolist(), "text_embedding": t.tolist(),
             "fingerprint": [1.0]} for n, (w, t) in files.items()]
    meta = {"x2edit.encoder": "synthetic", "x2edit.text_model": "none", "x2edit.root": "/loras"}
    if routing is not None:
        meta["x2edit.routing"] = routing.to_meta()
    write_index(rows, path, meta)
    return LoraIndex(path)


def test_a_query_is_routed_to_the_weights_when_known_else_to_a_clear_text_match(tmp_path):
    """Known to the encoder (near a training phrasing): ranked by weights, even with a clear text match; new: by
    text where a file's text matches at least ``text_match``, by weights where none does; forcing a signal wins."""
    vocabulary = np.array([[0.6, 0.8, 0, 0]], dtype=np.float32)  # one training phrasing
    index = _routed_index(tmp_path / "i.parquet", Routing(text_match=0.7, known=0.9, vocabulary=vocabulary))
    top = lambda q, **kw: (lambda h: (h["path"], h["route"]))(index.search_embedding(np.asarray(q, np.float32), 1, **kw)[0])  # noqa: E731

    known = [0.6, 0.8, 0, 0]  # the training phrasing itself; text cosine with "t" 0.6 < 0.7 anyway
    assert top(known) == ("w.safetensors", "weight")
    clear = [0.8, 0, 0.6, 0]  # new (0.48 to the phrasing); "t"'s text at 0.8 >= 0.7: by text
    assert top(clear) == ("t.safetensors", "text")
    vague = [0.6, 0.64, 0, 0.48]  # new (0.87); the best text cosine 0.6 ("t") < 0.7: by weights, "w" first
    assert top(vague) == ("w.safetensors", "weight")
    assert top(clear, signal="weight") == ("w.safetensors", "weight")
    assert top(known, signal="text") == ("t.safetensors", "text")
    # known beats a clear text match
    both = _routed_index(tmp_path / "j.parquet", Routing(0.7, 0.9, np.array([[0.8, 0, 0.6, 0]], np.float32)))
    assert both.search_embedding(np.asarray(clear, np.float32), 1)[0]["route"] == "weight"
    # an index without routing (no encoder calibration): every query is new, TEXT_MATCH decides
    plain = _routed_index(tmp_path / "k.parquet", None)
    assert plain.search_embedding(np.asarray(known, np.float32), 1)[0]["route"] == "weight"  # 0.6 < 0.66
    assert plain.search_embedding(np.asarray(clear, np.float32), 1)[0]["route"] == "text"


def test_routing_thresholds_are_calibrated_on_phrasings_and_survive_the_index_metadata():
    g = np.random.default_rng(0)
    base = g.standard_normal((3, 8))
    phrases = np.concatenate([base[c] + 0.3 * g.standard_normal((4, 8)) for c in range(3)])
    phrases /= np.linalg.norm(phrases, axis=1, keepdims=True)
    concept_of = [c for c in "abc" for _ in range(4)]
    text_match, known = calibrate_routing(phrases, concept_of)
    same = [float(phrases[i] @ phrases[j]) for i in range(12) for j in range(12) if i != j and i // 4 == j // 4]
    assert text_match == pytest.approx(np.median(same)) and known == pytest.approx(np.percentile(same, 90))
    assert text_match < known
    with pytest.raises(ValueError, match="two phrasings of one concept"):
        calibrate_routing(phrases[:3], ["a", "b", "c"])
    r = Routing.from_meta(Routing(text_match, known, phrases.astype(np.float32)).to_meta())
    assert (r.text_match, r.known) == (text_match, known)
    np.testing.assert_allclose(r.vocabulary, phrases, atol=1e-3)  # float16 in the index
    assert len(Routing.from_meta(None).vocabulary) == 0
    with pytest.raises(ValueError, match="routing field is damaged"):
        Routing.from_meta('{"text_match": 0.5}')
