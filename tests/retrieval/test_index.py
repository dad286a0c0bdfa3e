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
    monkeypatch.setattr(index_module, "read_row", lambda p, r, e, *a: calls.append(p.name) or real(p, r, e, *a))
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
    assert counts["ok"] == 6 and counts["skipped"] == 4  # LoRAs for another base are kept, without the weight signal
    rows = {r["path"]: r for r in read_index(tmp_path / "i.parquet")[0]}
    reasons = {p: r["reason"] for p, r in rows.items() if r["status"] == "skipped"}
    assert "cannot read" in reasons["corrupt.safetensors"]
    assert "cannot read" in reasons["notes.bin"]
    assert reasons["model.safetensors"] == "not a LoRA: none of its 1 keys is a LoRA key (e.g. 'weight')"
    assert "no transformer LoRA" in reasons["text_only.safetensors"]
    assert all("\n" not in r for r in reasons.values())
    for other in ("flux_size.safetensors", "deep.safetensors"):
        row = rows[other]
        assert row["status"] == "ok" and row["reason"].startswith("no weight signal:") and "another base" in row["reason"]
        assert row["embedding"] is None and row["text_embedding"] is not None and row["fingerprint"] is not None


def test_search_ranks_by_exact_cosine(folder, tmp_path, tiny_encoder):
    from x2edit.retrieval.encoder import TextEncoder

    out = tmp_path / "i.parquet"
    build_index(folder, out, tiny_encoder)
    text = TextEncoder()
    rows = [r for r in read_index(out)[0] if r["status"] == "ok"]
    q = text(["a sepia tone"])[0].numpy()
    for signal, column in (("weight", "embedding"), ("text", "text_embedding")):  # every file has both signals
        hits = search(out, "a sepia tone", k=3, text_encoder=text, signal=signal)
        scores = np.asarray([r[column] for r in rows]) @ q
        expected = [rows[i]["path"] for i in np.argsort(-scores)[:3]]
        assert [h["path"] for h in hits] == expected and [h["rank"] for h in hits] == [1, 2, 3]
        np.testing.assert_allclose([h["score"] for h in hits], np.sort(scores)[::-1][:3], rtol=1e-5)
        assert all(h["route"] == signal and h["signals"] == [signal] and set(h["scores"]) == {"weight", "text"}
                   for h in hits)
        np.testing.assert_allclose(hits[0]["score"], hits[0]["scores"][signal], rtol=1e-5)
    assert hits[0]["file"].endswith(hits[0]["path"])
    auto = search(out, "a sepia tone", k=3, text_encoder=text)  # routed: one of the two rankings
    assert auto == search(out, "a sepia tone", k=3, text_encoder=text, signal=auto[0]["route"])
    with pytest.raises(ValueError, match="unknown signal 'mixed'"):
        search(out, "a sepia tone", text_encoder=text, signal="mixed")


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


# -- issue 23's defects: each test fails on the code before the fix -----------------------------------------
def test_each_file_is_hashed_once_and_a_renamed_file_gets_its_own_title(folder, tmp_path, tiny_encoder, monkeypatch):
    import x2edit.adapters.community as community

    loaded = []
    real_read = community.read_community_lora
    monkeypatch.setattr(community, "read_community_lora", lambda p, *a, **k: loaded.append(p.name) or real_read(p, *a, **k))
    save_file({"weight": torch.zeros(3, 3)}, str(folder / "model.safetensors"))  # weights, not a LoRA
    hashed = []
    real_sha = index_module._sha256
    monkeypatch.setattr(index_module, "_sha256", lambda p: hashed.append(p.name) or real_sha(p))
    out = tmp_path / "i.parquet"
    build_index(folder, out, tiny_encoder)
    assert sorted(hashed) == ["l0.safetensors", "l1.safetensors", "l2.safetensors", "l3.safetensors",
                              "model.safetensors"]
    assert "model.safetensors" not in loaded and len(loaded) == 4  # refused from its header: no tensor read
    (folder / "l2.safetensors").rename(folder / "night_sky.safetensors")  # no header title: the name is the title
    build_index(folder, out, tiny_encoder)
    rows = {r["path"]: r for r in read_index(out)[0]}
    assert rows["night_sky.safetensors"]["title"] == "night_sky" and "l2.safetensors" not in rows
    assert rows["l0.safetensors"]["title"] == "sepia_v2"  # a header's title still wins


def test_unreadable_files_and_undecodable_names_are_skipped_and_the_index_is_written(folder, tmp_path, tiny_encoder):
    os.symlink("/proc/self/mem", folder / "mem.safetensors")  # stat works, reading fails with EIO
    bad = os.fsencode(str(folder)) + b"/caf\xe9.safetensors"  # latin-1 bytes: not UTF-8
    shutil.copy(folder / "l0.safetensors", bad.decode("utf-8", "surrogateescape"))
    counts = build_index(folder, tmp_path / "i.parquet", tiny_encoder)
    assert counts["ok"] == 4 and counts["skipped"] == 2
    reasons = {r["path"]: r["reason"] for r in read_index(tmp_path / "i.parquet")[0] if r["status"] == "skipped"}
    assert reasons["mem.safetensors"].startswith("cannot read the file")
    assert reasons["caf\\xe9.safetensors"] == "the file name is not valid UTF-8: rename the file to index it"


def test_symlinked_folders_and_upper_case_suffixes_are_found_and_an_empty_folder_is_an_error(folder, tmp_path,
                                                                                               tiny_encoder, capsys):
    elsewhere = tmp_path / "elsewhere"
    write_lora(elsewhere / "Linked.SafeTensors", random_factors(KOHYA_MODULES, seed=5), "peft")
    os.symlink(elsewhere, folder / "linked")
    os.symlink(folder, folder / "sub" / "loop")  # a link back up: followed once, no loop
    counts = build_index(folder, tmp_path / "i.parquet", tiny_encoder)
    assert counts["ok"] == 5 and counts["files"] == 5
    assert os.path.join("linked", "Linked.SafeTensors") in {r["path"] for r in read_index(tmp_path / "i.parquet")[0]}
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no LoRAs here")
    before = (tmp_path / "i.parquet").read_bytes()
    assert main(["lora", "index", str(tmp_path / "empty"), "--out", str(tmp_path / "i.parquet"), "--encoder",
                 str(tiny_encoder)]) == 2
    assert "no LoRA files (.safetensors, .bin) under" in capsys.readouterr().err
    assert (tmp_path / "i.parquet").read_bytes() == before  # the index already written is kept


def test_index_files_missing_columns_or_with_ragged_embeddings_are_named(folder, tmp_path, tiny_encoder):
    import pyarrow.parquet as pq

    from x2edit.retrieval.index import LoraIndex, write_index

    out = tmp_path / "i.parquet"
    build_index(folder, out, tiny_encoder)
    rows, meta = read_index(out)
    table = pq.read_table(out)
    pq.write_table(table.drop_columns(["status"]), tmp_path / "cut.parquet")
    with pytest.raises(ValueError, match=r"without the columns \['status'\]: rebuild it"):
        read_index(tmp_path / "cut.parquet")
    rows[1]["embedding"] = rows[1]["embedding"][:10]
    write_index(rows, tmp_path / "ragged.parquet", meta)
    with pytest.raises(ValueError, match=r"missing or of different lengths \(\[10, 384\]"):
        LoraIndex(tmp_path / "ragged.parquet")
    rows[1]["embedding"] = None  # a usable file without the weight signal (another base): searched by its text
    write_index(rows, tmp_path / "no_weight.parquet", meta)
    assert LoraIndex(tmp_path / "no_weight.parquet").signal_counts()["weight"] == len(rows) - 1
    rows[1]["text_embedding"] = None  # every usable file has the text signal: a missing one is a damaged index
    write_index(rows, tmp_path / "null.parquet", meta)
    with pytest.raises(ValueError, match="text signals are missing or of different lengths"):
        LoraIndex(tmp_path / "null.parquet")


@pytest.mark.slow
def test_workers_finish_and_give_the_rows_of_one_process(folder, tmp_path, tiny_encoder):
    """--workers 2 used to hang for ever (fork after OpenMP); spawned workers give the one-process rows."""
    import subprocess
    import sys

    for i in range(4):
        write_lora(folder / f"w{i}.safetensors", random_factors(KOHYA_MODULES, seed=40 + i), "kohya")
    torch.ones(64, 64) @ torch.ones(64, 64)  # OpenMP is up in this process, as in the CLI's
    code = ("import sys; from x2edit.cli import main; import torch; torch.ones(256, 256) @ torch.ones(256, 256); "
            f"sys.exit(main(['lora', 'index', {str(folder)!r}, '--out', {str(tmp_path / 'w.parquet')!r}, "
            f"'--encoder', {str(tiny_encoder)!r}, '--workers', '2']))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    build_index(folder, tmp_path / "one.parquet", tiny_encoder)
    many = {r["path"]: r["embedding"] for r in read_index(tmp_path / "w.parquet")[0]}
    one = {r["path"]: r["embedding"] for r in read_index(tmp_path / "one.parquet")[0]}
    assert many.keys() == one.keys() and len(one) == 8
    for path in one:
        np.testing.assert_allclose(many[path], one[path], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_the_ray_engine_indexes_on_a_local_ray_as_one_process_does(folder, tmp_path, tiny_encoder):
    """x2edit lora index --engine ray: index_chunk as Ray Data tasks on a local Ray (2 CPUs), piece by piece; the
    rows equal the one-process index's, a bad file is recorded, not fatal."""
    pytest.importorskip("ray.data")
    from x2edit.cli import main

    for i in range(4):
        write_lora(folder / f"r{i}.safetensors", random_factors(KOHYA_MODULES, seed=60 + i), "kohya")
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    assert main(["lora", "index", str(folder), "--out", str(tmp_path / "ray.parquet"), "--encoder", str(tiny_encoder),
                 "--workers", "2", "--engine", "ray"]) == 0
    build_index(folder, tmp_path / "one.parquet", tiny_encoder)
    ray_rows = {r["path"]: r for r in read_index(tmp_path / "ray.parquet")[0]}
    one_rows = {r["path"]: r for r in read_index(tmp_path / "one.parquet")[0]}
    assert ray_rows.keys() == one_rows.keys() and len(one_rows) == 9
    for path, row in one_rows.items():
        assert {k: v for k, v in ray_rows[path].items() if k != "embedding"} == \
            {k: v for k, v in row.items() if k != "embedding"}, path
        if row["status"] == "ok":
            np.testing.assert_allclose(ray_rows[path]["embedding"], row["embedding"], rtol=1e-5, atol=1e-6)
    assert ray_rows["broken.safetensors"]["status"] == "skipped"
    with pytest.raises(ValueError, match="unknown engine"):
        build_index(folder, tmp_path / "x.parquet", tiny_encoder, engine="spark")
    assert main(["lora", "index", str(folder), "--out", str(tmp_path / "x.parquet"), "--ray-address", "auto"]) == 2


# -- search sized for 1M rows (issue 23, item 2) -------------------------------------------------------------
def _synthetic_index(path, n, dim=16, seed=0, twins=()):
    """An index of n random unit embeddings (rows in `twins` copy row 0's embedding), 1 in 7 rows skipped."""
    from x2edit.retrieval.index import write_index

    g = np.random.default_rng(seed)
    emb = g.standard_normal((n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    for t in twins:
        emb[t] = emb[0]
    rows = [{"path": f"l{i:05d}.safetensors", "size": 1, "mtime_ns": 1, "sha256": str(i),
             "status": "skipped" if i % 7 == 3 else "ok", "reason": "", "layout": "diffusers/PEFT", "ranks": "{}",
             "targets": [], "num_modules": 0, "title": f"lora {i}", "trigger_words": [], "metadata": "{}",
             # the text signal equal to the weight one: either route ranks by the embeddings themselves
             "embedding": emb[i].tolist(), "text_embedding": emb[i].tolist(), "fingerprint": emb[i, :4].tolist()}
            for i in range(n)]
    write_index(rows, path, {"x2edit.encoder": "synthetic", "x2edit.text_model": "none", "x2edit.root": "/loras"})
    return emb


def test_search_matches_brute_force_and_the_embedding_cache_is_reused_and_renewed(tmp_path):
    from x2edit.retrieval.index import LoraIndex

    out = tmp_path / "i.parquet"
    emb = _synthetic_index(out, 500, twins=(5, 9))
    ok = np.array([i for i in range(500) if i % 7 != 3])
    q = emb[0] + 0.3 * emb[1]
    q /= np.linalg.norm(q)
    scores = emb[ok] @ q
    expected = [f"l{ok[j]:05d}.safetensors" for j in np.argsort(-scores, kind="stable")[:10]]

    stale = tmp_path / "i.parquet.search.npy"  # the previous version's mixed matrix: removed with the new caches
    np.save(stale, np.zeros((2, 2), np.float32))
    first = LoraIndex(out)
    assert isinstance(first.signals["weight"], np.memmap)  # the cache was written and is mapped, not copied
    assert not stale.exists()
    assert (tmp_path / "i.parquet.search-weight.npy").is_file()
    hits = first.search_embedding(q, k=10)
    assert [h["path"] for h in hits] == expected
    np.testing.assert_allclose([h["score"] for h in hits], np.sort(scores)[::-1][:10], rtol=1e-5)
    assert [h["path"] for h in hits[:3]] == ["l00000.safetensors", "l00005.safetensors", "l00009.safetensors"]
    distinct = first.search_embedding(q, k=10, distinct=True)  # the twins of row 0 are skipped
    assert [h["path"] for h in distinct][:1] == ["l00000.safetensors"]
    assert not {"l00005.safetensors", "l00009.safetensors"} & {h["path"] for h in distinct} and len(distinct) == 10

    cached = np.load(tmp_path / "i.parquet.search-weight.npy", mmap_mode="r")
    again = LoraIndex(out)  # the cache matches the index file: read from it
    np.testing.assert_array_equal(np.asarray(again.signals["weight"]), np.asarray(cached))
    _synthetic_index(out, 300, seed=1)  # the index rebuilt: the stale cache is not used
    renewed = LoraIndex(out)
    assert renewed.signals["weight"].shape[0] == len([i for i in range(300) if i % 7 != 3])
    emb1 = _synthetic_index(tmp_path / "check.parquet", 300, seed=1)
    np.testing.assert_array_equal(np.asarray(renewed.signals["weight"]), emb1[[i for i in range(300) if i % 7 != 3]])


def test_search_works_where_the_cache_cannot_be_written(tmp_path, monkeypatch):
    """A read-only index folder (a shared mount, say): the embeddings are read from the Parquet column."""
    from x2edit.retrieval.index import LoraIndex

    out = tmp_path / "i.parquet"
    emb = _synthetic_index(out, 50)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(np, "save", refuse)
    index = LoraIndex(out)
    assert not (tmp_path / "i.parquet.search-weight.npy").exists()
    assert not isinstance(index.signals["weight"], np.memmap)
    assert index.search_embedding(emb[11], k=1)[0]["path"] == "l00011.safetensors"


def test_a_stopped_run_keeps_its_progress_and_the_next_reads_only_the_rest(folder, tmp_path, tiny_encoder,
                                                                           monkeypatch):
    """Indexing sized for 100k files: the index is written after each piece (here every file), so a run
    stopped part-way (a crash, a session ending) keeps what it read; the next run reads only the rest."""
    out = tmp_path / "i.parquet"
    real = index_module.read_row
    calls = []

    def stop_at_third(p, r, e, *a):
        if len(calls) == 2:
            raise RuntimeError("the session ended under the run")
        calls.append(p.name)
        return real(p, r, e, *a)

    monkeypatch.setattr(index_module, "read_row", stop_at_third)
    with pytest.raises(RuntimeError, match="session ended"):
        build_index(folder, out, tiny_encoder, piece_files=1, save_every_s=0)
    kept = {r["path"] for r in read_index(out)[0]}
    assert len(kept) == 2 and {os.path.basename(p) for p in kept} == set(calls)
    monkeypatch.setattr(index_module, "read_row", real)
    again = _count_reads(monkeypatch)
    counts = build_index(folder, out, tiny_encoder)
    assert counts["unchanged"] == 2 and counts["new"] == 2 and len(again) == 2 and not set(again) & set(calls)
    assert counts["ok"] == 4
