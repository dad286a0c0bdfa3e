"""The x2edit_upstream reader on shards written the way upstream X2Edit's writers write them
(tests/training/upstream_writers.py): layouts, label table, task from label, instruction languages,
upstream's filter preset, truncated shards; and the one tar reader under it."""

import io
import tarfile

import numpy as np
import pytest
from upstream_writers import SRC, TGT, write_upstream_dataset

from x2edit.data_pipeline.shards import split_member
from x2edit.tasks import TASK_NAMES
from x2edit.training.data import (
    OTHER_TASK_ID,
    FilterRule,
    ScoreRule,
    build_reader,
    normalize_task,
    parse_score,
    task_slot,
    upstream_task_labels,
)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("x2edit_dataset")
    write_upstream_dataset(root)
    return root


def _reader(root, **options):
    return build_reader({"format": "x2edit_upstream", "path": str(root), **options})


def _by_folder(samples, root):
    out = {}
    for s in samples:
        folder = s.origin[len(str(root)) + 1:].split("/")[0]
        out[(folder, s.key)] = s
    return out


# -- upstream's to_type_id, written out from its code (src/custom_dataset_512.py at 7844267, lines 247-268) ---

UPSTREAM_TO_TYPE_ID = {
    1: ['删除主体', 'removal', 'remove', 'ObjectRemoval', 'WaterMarkRemoval', 'SnowRemoval'],
    2: ['添加主体', 'addition', 'add'],
    3: ['风格更改', 'style', 'style_change', 'change style'],
    4: ['背景更改', 'background_change', 'change background'],
    5: ['颜色更改', 'color_alter', 'attribute_modification', 'Colorization'],
    6: ['材料更改', 'material_alter', '材质更改', 'material_change', 'visual_material_change'],
    7: ['动作更改', 'motion_change', 'action_change'],
    8: ['替换主体', 'subject-replace', 'swap', 'replace', 'replace object'],
    9: ['人物修图', 'ps_human', 'appearance_alter', 'change expression'],
    10: ['文字更改', 'text_change', 'text change'],
    11: ['色调变换', '色调迁移', 'tune_transfer', 'tone_transfer'],
    12: ['相机移动', 'movement', 'rotation_change', 'resize', 'Camera Move Editing'],
    13: ['Reasoning', 'implicit_change', 'relation', 'Reasoning Editing', '复杂推理'],
    14: ['low_leval'],
    15: ['subject', 'style transfer'],
}
# Upstream's ids 1..15 in this project's names (its order is this project's task order); 0 is "other".
UPSTREAM_ID_NAMES = {0: "other", 1: "subject_deletion", 2: "subject_addition", 3: "style_change",
                     4: "background_change", 5: "color_change", 6: "material_change", 7: "action_change",
                     8: "subject_replacement", 9: "portrait_retouch", 10: "text_change", 11: "tone_transform",
                     12: "camera_move", 13: "implicit_change", 14: "low_level", 15: "subject_driven"}
# Task labels upstream's writers emit that to_type_id does not list: id 0 there ("other").
WRITER_LABELS_OUTSIDE_THE_TABLE = ["主题生成", "证件照生成"]  # kontext_data.py


def test_every_upstream_label_maps_to_the_class_upstream_gives_it():
    assert [UPSTREAM_ID_NAMES[i] for i in range(1, 16)] == list(TASK_NAMES)
    table = upstream_task_labels()
    expected = {label: UPSTREAM_ID_NAMES[i] for i, labels in UPSTREAM_TO_TYPE_ID.items() for label in labels}
    expected.update({label: "other" for label in WRITER_LABELS_OUTSIDE_THE_TABLE})
    assert len(expected) == 57 + 2
    assert {label: normalize_task(label, table) for label in expected} == expected
    # the OmniConsistency writer's "style change" is relabelled "style" (id 3) by upstream's reader
    assert normalize_task("style change", table) == "style_change"
    assert task_slot("other") == OTHER_TASK_ID == 15 and task_slot("subject_driven") == 14


def test_the_three_layouts_are_read_without_settings(released):
    reader = _reader(released)
    samples = _by_folder(reader, released)
    layouts = {}
    for s in reader.scan(images=False):
        layouts[s.raw.notes["layout"]] = layouts.get(s.raw.notes["layout"], 0) + 1
    assert layouts == {"1.0.jpg + 2.jpg": 18, ".1.jpg + .2.jpg": 5, ".1.0.jpg + .2.jpg": 5}
    for key in [("step1x_score_72", "000000000"), ("bagel_stage1", "000000000"), ("delete", "000000000"),
                ("textflux-qwen-generate-en", "000000000")]:  # the text edit's KEY..mask.jpg is not the target
        src, tgt = (np.asarray(im, dtype=int).reshape(-1, 3).mean(0) for im in (samples[key].source,
                                                                                 samples[key].target))
        assert np.abs(src - SRC).max() < 12 and np.abs(tgt - TGT).max() < 12, key
    # the truncated deletion shard gives the two samples before the damage, and is counted once
    assert [k for f, k in samples if f == "delete"] == ["000000000", "000000001", "000000002", "000000003",
                                                        "000000004"]
    assert reader.stats.dropped_by_reason["truncated_shard"] == 1
    assert "2 samples read before it" in reader.stats.examples["truncated_shard"][0]

    # one layout named: the others are missing members, with what each sample has
    only_a = _reader(released, source_suffix="1.0.jpg", target_suffix="2.jpg", on_other_task="train")
    assert len(list(only_a)) == 18 and only_a.stats.dropped_by_reason["missing_member"] == 10
    with pytest.raises(ValueError, match="both source_suffix and target_suffix"):
        _reader(released, source_suffix="1.0.jpg")


def test_a_sample_of_no_known_layout_is_a_missing_member(tmp_path):
    # expert_subject_deletion.py before its filter writes dict keys "1.jpg", "2.jpg", "3.jpg" (not a training layout)
    import webdataset as wds
    from PIL import Image

    with wds.TarWriter(str(tmp_path / "raw.tar")) as sink:
        sink.write({"__key__": "000000000", "1.jpg": Image.new("RGB", (8, 8)), "2.jpg": Image.new("RGB", (8, 8)),
                    "json": {"instruction_en": "Delete cat", "label": "Delete"}})
    reader = _reader(tmp_path)
    assert list(reader.scan()) == []
    (example,) = reader.stats.examples["missing_member"]
    assert "no source + target pair of any layout (1.0.jpg + 2.jpg, .1.0.jpg + .2.jpg, .1.jpg + .2.jpg); " \
           "has 1.jpg, 2.jpg, json" in example


def test_tasks_as_upstream_assigns_them(released):
    samples = _by_folder(_reader(released, on_other_task="train"), released)
    tasks = {k: s.task for k, s in samples.items()}
    assert tasks[("step1x_score_72", "000000000")] == "background_change"       # 背景更改
    assert tasks[("step1x_score_72", "000000006")] == "tone_transform"          # 色调变换
    assert tasks[("Kontext_aspect1", "000000000")] == "camera_move"             # 相机移动
    assert tasks[("Kontext_aspect1", "000000001")] == "implicit_change"         # 复杂推理
    assert tasks[("Kontext_aspect1", "000000002")] == tasks[("Kontext_aspect1", "000000003")] == "other"
    assert tasks[("gpt4o_high", "000000000")] == tasks[("bagel_stage1", "000000000")] == "camera_move"
    assert tasks[("bagel_stage1", "000000001")] == "implicit_change"            # Reasoning Editing
    assert tasks[("Kontext_style", "000000000")] == tasks[("Kontext_subject", "000000000")] == "subject_driven"
    assert tasks[("style_1024", "000000000")] == "style_change"
    assert tasks[("textflux-qwen-generate-en", "000000000")] == "text_change"
    # the deletion data has no task key: its label "Delete" gives upstream's 'removal'
    assert {tasks[k] for k in tasks if k[0] == "delete"} == {"subject_deletion"}
    assert len(tasks) == 28

    skipped = _reader(released)  # default: "other" labels are skipped and counted
    assert len(list(skipped)) == 26 and skipped.stats.dropped_by_reason["other_task"] == 2
    assert "'主题生成'" in skipped.stats.examples["other_task"][0]


def test_instruction_language_and_fallback(released):
    def instructions(**options):
        return {k: s.instruction for k, s in _by_folder(_reader(released, **options), released).items()}

    en, zh = instructions(), instructions(language="zh")
    kontext, gpt4o, delete, bagel = (("Kontext_aspect1", "000000000"), ("gpt4o_high", "000000000"),
                                     ("delete", "000000000"), ("bagel_stage1", "000000000"))
    assert (en[kontext], zh[kontext]) == ("Move the camera to look down at the room", "相机俯拍房间")
    assert (en[gpt4o], zh[gpt4o]) == ("Zoom out the camera", "让镜头拉远")    # gpt4o: Chinese in "instruction"
    assert (en[delete], zh[delete]) == ("Delete cat in the picture", "把这张图片的猫删掉")
    assert en[bagel] == zh[bagel] == "Turn the vessel clockwise"              # one language only: fall back
    mix = instructions(language="mix")
    assert mix == instructions(language="mix")                                # the same every pass
    both = [k for k in mix if en[k] != zh[k]]
    assert {mix[k] == en[k] for k in both} == {True, False}                   # both languages drawn
    assert mix != instructions(language="mix", seed=1)
    assert instructions(instruction_key="instruction_zh", on_unknown_task="skip")[kontext] == "相机俯拍房间"
    with pytest.raises(ValueError, match="instruction_key.*or language"):
        _reader(released, instruction_key="instruction", language="zh")


# what upstream's verify_keys (custom_dataset_1024.py) does with each sample of the fixture
UPSTREAM_FILTER_DROPS = {
    ("step1x_score_72", "000000001"): "filter: sum(score) >= 18 [label=step1x, lacks score_7b]",     # [8, 9]
    ("step1x_score_72", "000000003"): "filter: drop [label=step1x, task=文字更改, instruction without /[a-zA-Z]/]",
    ("step1x_score_72", "000000006"): "filter: sum(score_7b) >= 9 [label=step1x, has score_7b]",     # "[]"
    ("gpt4o_high", "000000002"): "filter: aesthetic_score >= 6 [label=gpt4o, lacks score_7b]",      # 5.5
    ("gpt4o_high", "000000003"): "filter: drop [label=gpt4o, has score_7b, task in 动作更改/人物修图/文字更改]",
    ("Kontext_subject", "000000001"): 'filter: drop [caption_en=""]',
    ("delete", "000000001"): "filter: sum(score) >= 9 [label=Delete]",                                # [4, 4]
    ("delete", "000000002"): "filter: sum(score) >= 9 [label=Delete]",                                # "[]"
    ("Kontext_aspect1", "000000002"): "other_task",
    ("Kontext_aspect1", "000000003"): "other_task",
}


def test_upstream_filter_preset_keeps_what_upstream_keeps(released):
    reader = _reader(released, filter_preset="x2edit_upstream")
    outcomes = {}
    for s in reader.scan():
        outcomes[(s.raw.origin[len(str(released)) + 1:].split("/")[0], s.raw.key)] = s.outcome
    dropped = {k: v for k, v in outcomes.items() if v != "kept"}
    assert dropped == UPSTREAM_FILTER_DROPS
    # kept on purpose: step1x "None" score (upstream keeps it), step1x with score_7b whatever its "score"
    assert outcomes[("step1x_score_72", "000000002")] == outcomes[("step1x_score_72", "000000005")] == "kept"
    assert outcomes[("step1x_score_72", "000000004")] == "kept"   # 文字更改 with Latin text, [9, 9] = 18
    assert reader.stats.kept == 28 - len(UPSTREAM_FILTER_DROPS)
    assert [s.key for s in _reader(released, filter_preset="x2edit_upstream")]  # streams too
    with pytest.raises(ValueError, match="unknown filter_preset 'x2edit'"):
        _reader(released, filter_preset="x2edit")


def test_score_rules_and_conditional_filters():
    assert parse_score("[]", "sum") == 0.0 and parse_score("[]") is None and parse_score("None", "sum") is None
    r = ScoreRule.parse("sum(score_7b) >= 9")
    assert (r.score, r.reduce, str(r)) == ("score_7b", "sum", "sum(score_7b) >= 9")
    assert r.value({"score_7b": "[4, 5]"}, "mean") == 9 and ScoreRule.parse("score_7b >= 4.5").value(
        {"score_7b": "[4, 5]"}, "mean") == 4.5
    rule = FilterRule.parse({"when": {"label": ["step1x", "gpt4o"], "lacks": "score_7b"}, "keep": ["sum(score) >= 18"],
                             "if_missing": "keep"})
    assert rule.check({"label": "step1x", "score": "None"}, "mean") is None            # missing: kept
    assert rule.check({"label": "step1x", "score": "[9, 8]"}, "mean") == (
        "filter: sum(score) >= 18 [label in step1x/gpt4o, lacks score_7b]", "score = 17")
    assert rule.check({"label": "step1x", "score": "[1, 1]", "score_7b": "[5, 5]"}, "mean") is None  # not its case
    assert rule.check({"label": "Kontext", "score": "[1, 1]"}, "mean") is None
    strict = FilterRule.parse({"when": {"label": "Delete"}, "keep": ["sum(score) >= 9"]})
    assert strict.check({"label": "Delete"}, "mean")[0] == "missing_score: score [label=Delete]"
    for bad, message in [({"keep": "sc > 1"}, "keep must be a list"), ({"when": {"a": 1}}, "either keep"),
                         ({"keep": ["x > 1"], "drop": True}, "either keep"), ({"keep": ["x > 1"], "if": 1}, "unknown key"),
                         ({"keep": ["sum(x >= 1"]}, "bad threshold rule"), ({"keep": ["x > 1"], "if_missing": "no"},
                                                                            "if_missing"),
                         ({"when": {"without": {"x": "("}}, "drop": True}, "bad regular expression")]:
        with pytest.raises(ValueError, match=message):
            FilterRule.parse(bad)


def test_split_member_follows_webdataset():
    from webdataset.tariterators import base_plus_ext

    for name in ["000000001.1.0.jpg", "000000001..1.jpg", "000000001..1.0.jpg", "k.json", "dir.x/k..mask.jpg",
                 "a/b/k.tar.gz", "noext", ".hidden"]:
        key, suffix = base_plus_ext(name)
        assert split_member(name) == ((key, suffix) if key is not None else (None, "")), name


def test_truncated_upstream_shard_in_every_mode(tmp_path, released):
    # index (spans) and streaming (bytes) both keep the two samples before the cut
    cfg = {"format": "x2edit_upstream", "path": str(released / "delete" / "0" / "00001.tar")}
    streamed = build_reader(cfg)
    assert [s.key for s in streamed] == ["000000003", "000000004"]
    indexed = build_reader(cfg)
    assert [r.key for r in indexed.index()] == ["000000003", "000000004"]
    assert indexed.stats.dropped_by_reason == {"truncated_shard": 1}
    # a shard cut inside a JSON member's header block: tarfile reads it as a clean end, the missing
    # end-of-archive marker tells the damage
    data = (released / "delete" / "0" / "00000.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        second_json = [m for m in tf.getmembers() if m.name == "000000001.json"][0]
    (tmp_path / "cut.tar").write_bytes(data[:second_json.offset])
    cut = build_reader({**cfg, "path": str(tmp_path / "cut.tar")})
    assert [s.key for s in cut] == ["000000000"]
    assert "no end-of-archive marker" in cut.stats.examples["truncated_shard"][0]
    assert cut.stats.dropped_by_reason == {"truncated_shard": 1}  # the sample it cut is part of that drop
    # cut right after a whole sample: that last sample is complete, so it is used
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        third = [m for m in tf.getmembers() if m.name.startswith("000000002")][0]
    (tmp_path / "cut.tar").write_bytes(data[:third.offset])
    assert [r.key for r in build_reader({**cfg, "path": str(tmp_path / "cut.tar")}).index()] == ["000000000",
                                                                                                 "000000001"]
