"""`x2edit data inspect` on upstream-written shards, on a training config's sources, and on the worked
config for the released X2Edit dataset (configs/x2edit_dataset/flux_dev_1024.yaml)."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from test_upstream_data import UPSTREAM_FILTER_DROPS
from upstream_writers import write_upstream_dataset

from x2edit.cli import main
from x2edit.training.data import EditDataset, build_reader
from x2edit.training.data_command import detect_format, inspect_source
from x2edit.training.trainer import ReaderSource

WORKED = Path(__file__).parents[2] / "configs" / "x2edit_dataset" / "flux_dev_1024.yaml"


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("X2Edit-Dataset")
    write_upstream_dataset(root)
    return root


def _inspect(capsys, *argv):
    code = main(["data", "inspect", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_explains_every_sample_it_drops(released, tmp_path, capsys):
    spec = {"format": "x2edit_upstream", "filter_preset": "x2edit_upstream"}
    (tmp_path / "reader.yaml").write_text(yaml.safe_dump(spec))
    code, out, _ = _inspect(capsys, released, "--config", tmp_path / "reader.yaml", "--drops", -1,
                            "--json", tmp_path / "report.json")
    assert code == 0
    assert "layouts (source + target): 1.0.jpg + 2.jpg: 18, .1.jpg + .2.jpg: 5, .1.0.jpg + .2.jpg: 5" in out
    assert "Delete          | removal -> subject_deletion (from label): 5, 3" in out
    assert "Kontext         | 主题生成 -> other: 1, 0" in out
    assert "OmniConsistency | style change -> style_change: 1, 1" in out
    assert "score_7b  " in out and "score   " in out and "not a number: 'None' x1" in out
    (report,) = json.loads((tmp_path / "report.json").read_text())
    # every dropped sample is listed under the reason upstream's reader would drop it for
    listed = {(where.split(str(released) + "/")[1].split("/")[0], where.split(":")[1]): reason
              for reason, wheres in report["drops"].items() if reason != "truncated_shard"
              for where in (w.split(": ")[0] for w in wheres)}
    assert listed == UPSTREAM_FILTER_DROPS
    assert report["drops"]["truncated_shard"][0].startswith(str(released / "delete" / "0" / "00001.tar"))
    assert report["scores"]["score"] == "lists (1 of 0, 10 of 2), items 3..10, sums 0..20; not a number: 'None' x1"
    assert report["scores"]["score_7b"] == "lists (1 of 0, 11 of 2), items 3..5, sums 0..10"
    # what it reports kept is what training indexes
    assert report["kept"] == len(EditDataset({**spec, "path": str(released)})) == 18
    # --drops -1 lists every dropped sample (the reader's stats keep only the first three per reason)
    many = inspect_source({"format": "x2edit_upstream", "path": str(released), "filters": ["width > 2000"]},
                          images=False, drops=-1)
    assert many["outcomes"]["filter: width > 2000"] == 21 and many["outcomes"]["missing_score: width"] == 5
    assert all(len(many["drops"][r]) == n for r, n in many["outcomes"].items() if r != "kept")
    few = inspect_source({"format": "x2edit_upstream", "path": str(released), "filters": ["width > 2000"]},
                         images=False, drops=3)
    assert len(few["drops"]["filter: width > 2000"]) == 3


def test_inspect_a_training_config_picks_its_sources(released, tmp_path, capsys):
    sources = [{"format": "x2edit_upstream", "path": str(released / "delete"), "weight": 3},
               {"format": "x2edit_upstream", "path": str(released / "bagel_stage1"), "filter_preset": "x2edit_upstream"}]
    cfg = {"mode": "edit", "model": {"base": "somewhere"}, "data": {"sources": sources, "filters": ["sum(score) >= 9"]}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    code, out, _ = _inspect(capsys, "--config", tmp_path / "train.yaml", "--no-images")
    assert code == 0
    assert f"x2edit_upstream data at {released / 'delete'} (weight 3, 75% of batches)" in out
    assert "samples: seen 6, kept 3; dropped: filter: sum(score) >= 9: 2, truncated_shard: 1" in out
    assert "samples: seen 3, kept 0; dropped: missing_score: score: 3" in out  # data.filters apply to every source
    code, out, _ = _inspect(capsys, released / "bagel_stage1", "--config", tmp_path / "train.yaml")
    assert code == 0 and "delete" not in out and out.count(" data at ") == 1
    code, _, err = _inspect(capsys, released / "gpt4o_high", "--config", tmp_path / "train.yaml")
    assert code == 2 and "no source of" in err and "is at or under" in err


def test_detect_format(released, tmp_path):
    assert detect_format(str(released)) == "x2edit_upstream"
    from x2edit.data_pipeline.shards import write_tar
    write_tar(tmp_path / "shard-000000.tar", [{"__key__": "k", "src.png": b"", "tgt.png": b"", "json": b"{}"}])
    assert detect_format(str(tmp_path)) == "x2edit"
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="cannot tell the format"):
        detect_format(str(tmp_path / "x.parquet"))


def test_worked_config_for_the_released_dataset(released, tmp_path, capsys):
    """The shipped config names every writer's folder: on a copy laid out that way, every source reads,
    every label maps, and the run's data source builds."""
    for missing, like in [("Kontext", "Kontext_aspect1"), ("Kontext_aspect", "Kontext_aspect1"),
                          ("bagel_reason", "bagel_stage1"), ("textflux-qwen-generate-ch", "textflux-qwen-generate-en")]:
        if not (released / missing).exists():
            shutil.copytree(released / like, released / missing)
    text = WORKED.read_text().replace("/data/X2Edit-Dataset", str(released))
    (tmp_path / "worked.yaml").write_text(text)
    code, out, _ = _inspect(capsys, "--config", tmp_path / "worked.yaml", "--json", tmp_path / "r.json")
    assert code == 0
    reports = json.loads((tmp_path / "r.json").read_text())
    assert len(reports) == 8 and all(r["kept"] > 0 for r in reports)
    assert not any("unknown_task" in r["outcomes"] for r in reports)
    assert sum(r["share"] for r in reports) == pytest.approx(1.0)
    every = {x["task"] for r in reports for x in r["labels"]}
    assert every == {"background_change", "color_change", "material_change", "text_change", "portrait_retouch",
                     "tone_transform", "camera_move", "implicit_change", "other", "action_change", "subject_driven",
                     "style_change", "subject_deletion"}
    from x2edit.training.config import load_config

    cfg = load_config(tmp_path / "worked.yaml", ["data.resolution=16", "data.buckets=false", "batch_size=2"])
    src = ReaderSource(cfg.data.sources, cfg)
    assert len(src.datasets) == 8 and len(src) == sum(r["kept"] for r in reports)
    assert len({src.mixture.locate(n)[0] for n in range(200)}) == 8
    assert build_reader({k: v for k, v in cfg.data.sources[-1].items() if k != "weight"}).format == "x2edit_upstream"


def test_the_docs_examples_build():
    """The reader configs and filter rules docs/training_data.md shows are valid as written."""
    import re

    from x2edit.training.data import FilterRule

    doc = (Path(__file__).parents[2] / "docs" / "training_data.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", doc, re.S)]
    readers = [b["data"]["source"] for b in blocks if "source" in b.get("data", {})]
    readers += [s for b in blocks for s in b.get("data", {}).get("sources", [])]
    assert len(readers) == 5
    for spec in readers:
        build_reader({k: v for k, v in spec.items() if k != "weight"})
    rules = [r for b in blocks for r in b.get("filters", [])]
    assert len(rules) == 3 and all(FilterRule.parse(r).when for r in rules)
    (aliases,) = [b["task_aliases"] for b in blocks if "task_aliases" in b]
    build_reader({"format": "x2edit_upstream", "path": "x", "task_aliases": aliases})
