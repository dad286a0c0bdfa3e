"""The index of a LoRA folder: every layout, incremental rebuilds, bad files recorded, exact cosine search."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from autolora_helpers import KOHYA_MODULES, random_factors
from safetensors.torch import save_file

import x2edit.retrieval.index as index_module
from x2edit.cli import main
from x2edit.retrieval.formats import write_lora
from x2edit.retrieval.index import build_index, read_index, search


@pytest.fixture
def folder(tmp_path):
    """Four LoRAs of the tiny base in four layouts, one in a subfolder, with kohya / modelspec headers."""
    d = tmp_path / "loras"
    headers = [{"ss_output_name": "sepia_v2", "ss_tag_frequency": json.dumps({"img": {"sepia": 9, "old photo": 3}})},
               {"modelspec.title": "red background", "modelspec.trigger_phrase": "red backdrop"}, {}, {}]
    for i, (fmt, header) in enumerate(zip(("kohya", "peft", "diffusers", "comfyui"), headers)):
        write_lora(d / ("sub" if i == 3 else "") / f"l{i}.safetensors", random_factors(KOHYA_MODULES, seed=i), fmt,
                   header)
    return d


def _count_reads(monkeypatch):
    calls = []
    real = index_module.read_row
    monkeypatch.setattr(index_module, "read_row", lambda p, r, e: calls.append(p.name) or real(p, r, e))
    return calls


def test_index_records_every_layout_with_its_metadata(folder, tmp_path, tiny_encoder):
    counts = build_index(folder, tmp_path / "i.parquet", tiny_encoder)
    assert counts == {"new": 4, "changed": 0, "unchanged": 0, "reused": 0, "removed": 0, "files": 4, "skipped": 0,
                      "ok": 4}
    rows = {r["path"]: r for r in read_index(tmp_path / "i.parquet")[0]}
    assert set(rows) == {"l0.safetensors", "l1.safetensors", "l2.safetensors", os.path.join("sub", "l3.safetensors")}
    k = rows["l0.safetensors"]
    assert k["layout"] == "kohya/ComfyUI" and k["title"] == "sepia_v2" and k["trigger_words"] == ["sepia", "old photo"]
    assert json.loads(k["ranks"])["transformer_blocks.0.attn.to_q"] == 3  # the fused qkv split back to rank 3
    assert rows["l1.safetensors"]["trigger_words"] == ["red backdrop"]
    assert rows["l1.safetensors"]["layout"] == "diffusers/PEFT" and len(rows["l1.safetensors"]["targets"]) == 7
    assert all(len(r["embedding"]) == 384 and r["sha256"] for r in rows.values())


def test_rebuilds_read_only_new_and_changed_files(folder, tmp_path, tiny_encoder, monkeypatch):
    out = tmp_path / "i.parquet"
    build_index(folder, out, tiny_encoder)
    first = {r["path"]: r for r in read_index(out)[0]}
    calls = _count_reads(monkeypatch)
    hashed = []
    real_sha = index_module._sha256
    monkeypatch.setattr(index_module, "_sha256", lambda p: hashed.append(p.name) or real_sha(p))
    assert build_index(folder, out, tiny_encoder)["unchanged"] == 4 and calls == []
    assert hashed == []  # same size and mtime: not even hashed

    # touched (same bytes, new mtime): not re-read; copied under a new name: the embedding is reused
    os.utime(folder / "l0.safetensors", ns=(1, 1))
    shutil.copy(folder / "l1.safetensors", folder / "copy.safetensors")
    # changed content, a new file, a removed file
    write_lora(folder / "l2.safetensors", random_factors(KOHYA_MODULES, seed=7), "diffusers")
    write_lora(folder / "new.safetensors", random_factors(KOHYA_MODULES, seed=8), "peft")
    (folder / "sub" / "l3.safetensors").unlink()
    counts = build_index(folder, out, tiny_encoder)
    assert sorted(calls) == ["l2.safetensors", "new.safetensors"]
    assert counts == {"new": 1, "changed": 1, "unchanged": 2, "reused": 1, "removed": 1, "files": 5, "skipped": 0,
                      "ok": 5}
    rows = {r["path"]: r for r in read_index(out)[0]}
    assert rows["copy.safetensors"]["embedding"] == first["l1.safetensors"]["embedding"]
    assert rows["l2.safetensors"]["embedding"] != first["l2.safetensors"]["embedding"]


def test_another_encoder_re_embeds_everything(folder, tmp_path, tiny_encoder, monkeypatch):
    from x2edit.retrieval.encoder import WeightEncoder

    out = tmp_path / "i.parquet"
    build_index(folder, out, tiny_encoder)
    other = WeightEncoder.load(tiny_encoder)
    with torch.no_grad():
        other.head.bias.add_(0.1)
    other.save(tmp_path / "other.safetensors")
    calls = _count_reads(monkeypatch)
    assert build_index(folder, out, tmp_path / "other.safetensors")["new"] == 4 and len(calls) == 4


def test_bad_files_are_recorded_and_skipped_never_raised(folder, tmp_path, tiny_encoder):
    (folder / "corrupt.safetensors").write_bytes(b"\x00\x13not a safetensors file")
    (folder / "notes.bin").write_bytes(b"garbage that is no pickle")
    save_file({"weight": torch.zeros(3, 3)}, str(folder / "model.safetensors"))  # weights, not a LoRA
    write_lora(folder / "flux_size.safetensors",  # a LoRA for a base of another size
               random_factors({"transformer_blocks.0.attn.to_q": (3072, 3072)}, rank=1), "peft")
    write_lora(folder / "deep.safetensors",  # a LoRA for a deeper base
               random_factors({"transformer_blocks.5.attn.to_q": (32, 32)}, rank=1), "peft")
    save_file({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 8),
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(8, 2)},
              str(folder / "text_only.safetensors"))
    counts = build_index(folder, tmp_path / "i.parquet", tiny_encoder)
    assert counts["ok"] == 4 and counts["skipped"] == 6
    reasons = {r["path"]: r["reason"] for r in read_index(tmp_path / "i.parquet")[0] if r["status"] == "skipped"}
    assert "cannot read" in reasons["corrupt.safetensors"]
    assert "cannot read" in reasons["notes.bin"]
    assert "unsupported LoRA key 'weight'" in reasons["model.safetensors"]
    assert "another base" in reasons["flux_size.safetensors"] and "another base" in reasons["deep.safetensors"]
    assert "no transformer LoRA" in reasons["text_only.safetensors"]
    assert all("\n" not in r for r in reasons.values())


def test_search_ranks_by_exact_cosine(folder, tmp_path, tiny_encoder):
    from x2edit.retrieval.encoder import TextEncoder

    out = tmp_path / "i.parquet"
    build_index(folder, out, tiny_encoder)
    text = TextEncoder()
    hits = search(out, "a sepia tone", k=3, text_encoder=text)
    rows = [r for r in read_index(out)[0] if r["status"] == "ok"]
    scores = np.asarray([r["embedding"] for r in rows]) @ text(["a sepia tone"])[0].numpy()
    expected = [rows[i]["path"] for i in np.argsort(-scores)[:3]]
    assert [h["path"] for h in hits] == expected and [h["rank"] for h in hits] == [1, 2, 3]
    np.testing.assert_allclose([h["score"] for h in hits], np.sort(scores)[::-1][:3], rtol=1e-5)
    assert hits[0]["file"].endswith(hits[0]["path"])


def test_cli_index_and_search(folder, tmp_path, tiny_encoder, capsys):
    out = tmp_path / "i.parquet"
    assert main(["lora", "index", str(folder), "--out", str(out), "--encoder", str(tiny_encoder)]) == 0
    assert "new 4" in capsys.readouterr().out
    assert main(["lora", "search", "a red background", "--index", str(out), "-k", "2", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 2 and hits[0]["score"] >= hits[1]["score"]
    assert main(["lora", "search", "  ", "--index", str(out)]) == 2
    assert "query is empty" in capsys.readouterr().err
    assert main(["lora", "search", "x", "--index", str(tmp_path / "missing.parquet")]) == 2
    assert "index not found" in capsys.readouterr().err


def test_xlabs_files_are_indexed(tmp_path, tiny_encoder):
    """XLabs' processor keys (no alphas) go through the same converter as in the pipeline."""
    g = torch.Generator().manual_seed(0)
    shapes = {"double_blocks.0.processor.qkv_lora1": (32, 96), "double_blocks.0.processor.proj_lora1": (32, 32),
              "single_blocks.0.processor.qkv_lora": (32, 96), "single_blocks.0.processor.proj_lora": (160, 32)}
    state = {}
    for key, (k, n) in shapes.items():
        state[f"{key}.down.weight"] = torch.randn(4, k, generator=g) * 0.3
        state[f"{key}.up.weight"] = torch.randn(n, 4, generator=g) * 0.3
    (tmp_path / "x").mkdir()
    save_file(state, str(tmp_path / "x" / "xlabs.safetensors"))
    assert build_index(tmp_path / "x", tmp_path / "i.parquet", tiny_encoder)["ok"] == 1
    row = read_index(tmp_path / "i.parquet")[0][0]
    assert row["layout"] == "XLabs" and "single_transformer_blocks.0.attn.to_q" in row["targets"]
