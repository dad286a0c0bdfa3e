"""Configs: YAML <-> dataclasses, overrides, and one clear error before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from x2edit.data_pipeline.config import DEFAULT_CONFIG, BuildConfig, load_config
from x2edit.data_pipeline.pipeline import Pipeline

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "build_data"


def _pipeline(overrides=(), path=None):
    return Pipeline(load_config(path, list(overrides)))


def test_default_matches_the_example_file():
    with open(CONFIGS / "shapeworld.yaml") as f:
        raw = yaml.safe_load(f)
    assert BuildConfig.from_dict(raw).to_dict() == BuildConfig.from_dict(DEFAULT_CONFIG).to_dict()
    assert load_config(str(CONFIGS / "shapeworld.yaml")).fingerprint() == load_config(None).fingerprint()


def test_roundtrip_and_overrides():
    cfg = load_config(None, ["writer.samples_per_shard=7", "task_sampler.weights.color_change=2.5",
                             "shapeworld_expert.resolution=128", "stages.0.split=eval", "batch_size=4"],
                      num_samples=33)
    assert cfg.num_samples == 33 and cfg.batch_size == 4 and cfg.writer.samples_per_shard == 7
    p = Pipeline(cfg)
    assert p.source.params.split == "eval"
    assert p.stages[0].params.weights == {"color_change": 2.5}
    assert p.stages[1].params.resolution == 128
    assert BuildConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    assert cfg.fingerprint() != load_config(None).fingerprint()


@pytest.mark.parametrize("overrides,exc,match", [
    (["stages.2.type=teleporter"], ValueError, "unknown stage 'teleporter'"),
    (["shapeworld_expert.colour=red"], ValueError, "unknown parameter.*colour"),
    (["shapeworld_expert.resolution=big"], ValueError, "resolution='big' should be int"),
    (['threshold_filter.rules=["oracle_psnr >> 3"]'], ValueError, "bad threshold rule"),
    (['threshold_filter.rules=["oracle_psnr >= high"]'], ValueError, "bad threshold rule"),
    (['threshold_filter.rules=["clip_direction >= 0.2"]'], ValueError, "clip_direction are not written"),
    (["task_sampler.weights.colour_change=1"], ValueError, "unknown task 'colour_change'"),
    (["task_sampler.default_weight=0"], ValueError, "all task weights are zero"),
    (["stages.3.type=vlm_judge"], ValueError, "missing required parameter.*path"),
    (["no_such_thing=1"], ValueError, "neither a setting"),
    (["writer.samples_per_shard=0"], ValueError, "samples_per_shard"),
    (["shapeworld_source.split=test"], ValueError, "split must be one of"),
    (["oops"], ValueError, "key=value"),
])
def test_config_errors(overrides, exc, match):
    with pytest.raises(exc, match=match):
        _pipeline(overrides)


def test_missing_model_path_is_named():
    with pytest.raises(FileNotFoundError, match="'/nope/FLUX.1-Kontext-dev' is not a directory"):
        _pipeline(["stages.4.type=diffusers_edit", "stages.4.path=/nope/FLUX.1-Kontext-dev"])


def test_dependencies_are_checked():
    cfg = load_config(None)
    cfg.stages = [s for s in cfg.stages if s.type != "template_instructions"]
    with pytest.raises(ValueError, match="lack instruction"):
        Pipeline(cfg)
    cfg = load_config(None)
    cfg.stages = [cfg.stages[0], cfg.stages[2]]  # expert before the task sampler
    with pytest.raises(ValueError, match="needs task, which no earlier stage provides"):
        Pipeline(cfg)
    cfg = load_config(None)
    cfg.stages = cfg.stages[1:]
    with pytest.raises(ValueError, match="first stage must be a source"):
        Pipeline(cfg)


def test_expert_task_support_is_checked(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    cfg = load_config(None)
    raw = cfg.to_dict()
    raw["stages"].insert(4, {"type": "diffusers_inpaint", "path": str(d), "prompt": "background"})
    with pytest.raises(ValueError, match="does not handle"):
        Pipeline(BuildConfig.from_dict(raw))
    raw["stages"][1]["default_weight"] = 0
    raw["stages"][1]["weights"] = {"subject_deletion": 1}
    assert Pipeline(BuildConfig.from_dict(raw)).stages[3].name == "diffusers_inpaint"


def test_unreadable_configs(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [\n  - type: x\n")
    with pytest.raises(ValueError, match="cannot parse config.*line"):
        load_config(str(bad))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(str(tmp_path / "list.yaml"))
    (tmp_path / "extra.yaml").write_text("stages: [{type: shapeworld_source}]\nshards: 3\n")
    with pytest.raises(ValueError, match="unknown key.*shards"):
        load_config(str(tmp_path / "extra.yaml"))


def test_example_configs_parse():
    for path in CONFIGS.glob("*.yaml"):
        cfg = load_config(str(path))
        assert cfg.stages[0].type.endswith("_source")
    # The real-photo example names paths that do not exist here: one clear error, nothing done.
    with pytest.raises(FileNotFoundError, match="/data/photos"):
        Pipeline(load_config(str(CONFIGS / "real_photos.yaml")))
