"""A small copy of the released X2Edit dataset, written the way upstream's writers write it.

Each writer of OPPO-Mente-Lab/X2Edit (data_pipeline/*.py at 7844267) hands webdataset's
ShardWriter a dict {"__key__": "%09d" % index (a 9-digit running number), <image keys>: PIL image, "txt": str, "json": dict};
TarWriter names each member KEY + "." + dict key, encodes images by the key's extension (JPEG here)
and dumps the JSON with json.dumps. The JSON is the source dataset's own record plus the writer's
fields, with the writer's label strings and score formats. Folder names are the writers'
output_dir names. Images are tiny: the source is red, the target blue, a mask white, so a test
can tell which member a reader took.
"""

from __future__ import annotations

import tarfile

import webdataset as wds
from PIL import Image

SRC, TGT = (220, 20, 20), (20, 20, 220)


def _img(color, size=(24, 16)):
    return Image.new("RGB", size, color)


def _quality(i: int) -> dict:
    """The six quality scores the 7B-scored writers add (LIQE 1-5, CLIP-IQA+ 0-1, aesthetic v2.5 1-10)."""
    return {"liqe_score": 4.1, "liqe_score_edit": 3.9 - 0.1 * i, "liqe_score_clip": 0.71,
            "liqe_score_clip_edit": 0.68, "aesthetic_score_v2_5": 5.6, "aesthetic_score_v2_5_edit": 5.2}


def _base(i: int) -> dict:
    """The source dataset's own record, which every writer extends."""
    return {"caption_en": f"a street scene number {i}", "aesthetic_score": 6.3, "width": 1024, "height": 683}


# (folder, layout keys (source, target, extra), [(json, txt)])
def _writers() -> list[tuple[str, tuple[str, ...], list[dict]]]:
    step1x = [  # step1x_data.py: label step1x, Chinese task, Chinese instruction, "score" = str([0-10, 0-10]) or "None"
        {"instruction": "把背景换成海滩", "task": "背景更改", "score": "[9, 10]"},
        {"instruction": "把汽车的颜色改成红色", "task": "颜色更改", "score": "[8, 9]"},
        {"instruction": "把桌子换成大理石材质", "task": "材料更改", "score": "None"},
        {"instruction": "把招牌上的字改成开业", "task": "文字更改", "score": "[10, 10]"},
        {"instruction": "把招牌上的文字改成 OPEN", "task": "文字更改", "score": "[9, 9]"},
        # rescored step1x data (upstream's step1x_7b_72b folder) also carries score_7b and the quality scores
        {"instruction": "让她微笑", "task": "人物修图", "score": "[3, 3]", "score_7b": "[5, 5]", **_quality(0)},
        {"instruction": "把画面调成暖色调", "task": "色调变换", "score": "[10, 10]", "score_7b": "[]", **_quality(0)},
    ]
    kontext = [  # kontext_data.py: English instruction, instruction_zh, Chinese task, score_7b on 1-5
        {"instruction": "Move the camera to look down at the room", "instruction_zh": "相机俯拍房间", "task": "相机移动",
         "score_7b": "[4, 5]", **_quality(1)},
        {"instruction": "Can you show this car's interior?", "instruction_zh": "你能提供这辆车的内饰图片吗？",
         "task": "复杂推理", "score_7b": "[3, 4]", **_quality(1)},
        {"instruction": "Paint this cat in a new scene", "instruction_zh": "把这只猫画在另一个场景里", "task": "主题生成",
         "score_7b": "[4, 4]", **_quality(1)},
        {"instruction": "Make an ID photo of him", "instruction_zh": "生成他的证件照", "task": "证件照生成",
         "score_7b": "[5, 4]", **_quality(1)},
    ]
    gpt4o = [  # gpt4o_data.py: Chinese instruction, instruction_en, no scores of its own
        {"instruction": "让镜头拉远", "instruction_en": "Zoom out the camera", "task": "Camera Move Editing"},
        {"instruction": "这件衬衫配什么手机壳？", "instruction_en": "Which phone case matches this shirt?",
         "task": "Reasoning Editing"},
        {"instruction": "让他举起手", "instruction_en": "Make him raise his hand", "task": "动作更改",
         "aesthetic_score": 5.5},
        # rescored gpt4o data (upstream's reader checks score_7b there too)
        {"instruction": "让她看起来更年轻", "instruction_en": "Make her look younger", "task": "人物修图",
         "score_7b": "[5, 5]"},
    ]
    for m in gpt4o:
        m.setdefault("aesthetic_score", 6.4)
    kontext_style = [  # kontext_style_transfer.py: label "kontext" (lower case), dino / clip similarities
        {"instruction": "Transfer the style of the painting", "instruction_zh": "迁移这幅画的风格", "task": "style transfer",
         "dino": 0.82, "clipI": 0.71, "clipT": 0.27, **_quality(2)},
    ]
    kontext_subject = [  # kontext_subject_data.py
        {"instruction": "The toy on a beach", "instruction_zh": "玩具在沙滩上", "task": "subject", "dino": 0.9,
         "clipI": 0.8, "clipT": 0.3, "shuttle_pro": "a toy on a beach", **_quality(2)},
        {"instruction": "The cup in a kitchen", "instruction_zh": "杯子在厨房里", "task": "subject", "dino": 0.9,
         "clipI": 0.8, "clipT": 0.3, "shuttle_pro": "a cup", "caption_en": "", **_quality(2)},  # source had no caption
    ]
    bagel = [  # bagel_data.py: dict keys ".1.jpg" / ".2.jpg"; score_7b on 1-5
        {"instruction": "Turn the vessel clockwise", "task": "Camera Move Editing", "score_7b": "[5, 4]", **_quality(3)},
        {"instruction": "Show the necklace being worn", "task": "Reasoning Editing", "score_7b": "[4, 4]", **_quality(3)},
        {"instruction": "给她化一个淡妆", "task": "人物修图", "score_7b": "[5, 5]", **_quality(3)},
    ]
    style = [  # expert_style_change.py: label OmniConsistency, task "style change"
        {"instruction": "Convert the image to a Ghibli style", "task": "style change", "score_7b": "[5, 5]",
         **_quality(4)},
    ]
    textflux = [  # expert_text_change_en.py: ".1.jpg" / ".2.jpg" / ".mask.jpg"
        {"instruction": "Change the title 'Hello' to 'Hi'", "task": "text change", "score_7b": "[4, 5]", **_quality(4)},
    ]
    delete = [  # expert_subject_deletion(_filter).py: ".1.0.jpg" / ".2.jpg"; no task; score pair on 1-5
        {"instruction_en": "Delete cat in the picture", "instruction_zh": "把这张图片的猫删掉", "score": "[5, 5]"},
        {"instruction_en": "Delete lamp in the picture", "instruction_zh": "把这张图片的台灯删掉", "score": "[4, 4]"},
        {"instruction_en": "Delete car in the picture", "instruction_zh": "把这张图片的汽车删掉", "score": "[]"},
    ]
    for m in delete:
        m.update({"caption_zh": "一张照片", "label": "Delete", "aesthetic_score_ori": 6.1, "aesthetic_score_delete": 6.0,
                  "liqe_score_delete": 4.0, "liqe_score_ori": 4.1, "liqe_score_clip_delete": 0.7,
                  "liqe_score_clip_ori": 0.72})
    labels = {"step1x_score_72": "step1x", "Kontext_aspect1": "Kontext", "gpt4o_high": "gpt4o",
              "Kontext_style": "kontext", "Kontext_subject": "kontext", "bagel_stage1": "bagel",
              "style_1024": "OmniConsistency", "textflux-qwen-generate-en": "textflux"}
    out = []
    for folder, keys, metas in [
        ("step1x_score_72", ("1.0.jpg", "2.jpg"), step1x), ("Kontext_aspect1", ("1.0.jpg", "2.jpg"), kontext),
        ("gpt4o_high", ("1.0.jpg", "2.jpg"), gpt4o), ("Kontext_style", ("1.0.jpg", "2.jpg"), kontext_style),
        ("Kontext_subject", ("1.0.jpg", "2.jpg"), kontext_subject), ("bagel_stage1", (".1.jpg", ".2.jpg"), bagel),
        ("style_1024", (".1.jpg", ".2.jpg"), style),
        ("textflux-qwen-generate-en", (".1.jpg", ".2.jpg", ".mask.jpg"), textflux),
        ("delete", (".1.0.jpg", ".2.jpg"), delete),
    ]:
        for m in metas:
            if folder in labels:
                m["label"] = labels[folder]
        out.append((folder, keys, metas))
    return out


def write_upstream_dataset(root) -> dict[str, list[str]]:
    """Write every writer's shard under ``root/FOLDER/0/00000.tar`` plus a truncated second deletion
    shard (``delete/0/00001.tar``, cut inside its third sample); returns {folder: [keys]}."""
    written = {}
    for folder, keys, metas in _writers():
        out = root / folder / "0"
        out.mkdir(parents=True, exist_ok=True)
        with wds.TarWriter(str(out / "00000.tar")) as sink:
            for index, meta in enumerate(metas):
                base = {**_base(index), **meta} if folder != "delete" else dict(meta)
                sample = {"__key__": f"{index:09d}", keys[0]: _img(SRC), keys[1]: _img(TGT),
                          "txt": base.get("instruction", base.get("instruction_zh", "")), "json": base}
                if len(keys) > 2:
                    sample[keys[2]] = _img((255, 255, 255))
                sink.write(sample)
        written[folder] = [f"{i:09d}" for i in range(len(metas))]
    # a deletion shard cut short inside its third sample: its first two stay usable
    cut = root / "delete" / "0" / "00001.tar"
    with wds.TarWriter(str(cut)) as sink:
        for index in range(3, 6):
            sink.write({"__key__": f"{index:09d}", ".1.0.jpg": _img(SRC), ".2.jpg": _img(TGT), "txt": "删掉",
                        "json": {"instruction_en": "Delete dog in the picture", "instruction_zh": "把这张图片的狗删掉",
                                 "label": "Delete", "score": "[5, 4]"}})
    data = cut.read_bytes()
    with tarfile.open(cut) as tf:
        third = [m for m in tf.getmembers() if m.name.startswith("000000005")][1]
    cut.write_bytes(data[: third.offset_data + 7])
    written["delete"] += ["000000003", "000000004"]
    return written
