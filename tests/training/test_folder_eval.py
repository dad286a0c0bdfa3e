"""`x2edit eval --folder`: cases.jsonl parsing, L1 / CLIP / judge scores on known values, skipped
cases, tables, and edits made by a tiny real pipeline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from x2edit.cli import main
from x2edit.data_pipeline.stages.base import build_params
from x2edit.data_pipeline.stages.scorers import VlmJudge
from x2edit.training.folder_eval import (
    format_table,
    l1,
    make_outputs,
    read_cases,
    score_cases,
    summarize,
    write_results,
)

BLACK = np.zeros((32, 32, 3), np.uint8)
WHITE = np.full((32, 32, 3), 255, np.uint8)


def _png(path: Path, array: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path.name


def _jsonl(folder: Path, lines: list) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines)
    (folder / "cases.jsonl").write_text(text + "\n")


class FakeChat:
    """The ``ChatModel`` interface answering from a script, recording what it was asked."""

    def __init__(self, answers):
        self.answers, self.asked = list(answers), []

    def generate(self, prompt, images=(), max_new_tokens=128):
        self.asked.append((prompt, [im.shape for im in images]))
        return self.answers.pop(0)


class FakeClip:
    """``ClipScorer``'s embedding functions: an image embeds as its mean RGB, a text as (1, 0, 0)."""

    def encode_images(self, images):
        return np.stack([im.reshape(-1, 3).mean(0) + 1.0 for im in images])

    def encode_texts(self, texts):
        return np.tile([1.0, 0.0, 0.0], (len(texts), 1))


@pytest.fixture
def folder(tmp_path):
    """Four cases over black / white / red images; outputs by "another model" in tmp/outputs."""
    d, outs = tmp_path / "cases", tmp_path / "outputs"
    red = np.zeros((32, 32, 3), np.uint8)
    red[..., 0] = 255
    _png(d / "img" / "black.png", BLACK)
    _png(d / "img" / "white.png", WHITE)
    _png(d / "ref" / "red.png", red)
    _jsonl(
        d,
        [
            {"id": "same", "source": "img/black.png", "instruction": "keep it", "task": "color_change"},
            {
                "id": "flip",
                "source": "img/black.png",
                "instruction": "make it white",
                "task": "color_change",
                "target": "ref/red.png",
            },
            {"id": "gone", "source": "img/white.png", "instruction": "make it red", "task": "tone_transform"},
            {"id": "broken", "source": "img/white.png", "instruction": "make it blue", "task": "my_label"},
        ],
    )
    _png(outs / "same.png", BLACK)
    _png(outs / "flip.png", WHITE)
    (outs / "broken.png").write_bytes(b"not a png at all")
    return d, outs


def _judge(tmp_path, answers):
    judge = VlmJudge(build_params(VlmJudge, {"path": str(tmp_path)}, "t"), name="--judge")
    judge.model = FakeChat(answers)
    return judge


# -- reading ---------------------------------------------------------------------------------


def test_read_cases_native_and_gedit_keys(tmp_path):
    _jsonl(
        tmp_path,
        [
            {
                "id": "a",
                "source": "a.png",
                "instruction": "make it red",
                "task": "color_change",
                "target": "t.png",
            },
            {
                "key": "9f3e",
                "input_image": "in/b.jpg",
                "instruction": "add a hat",
                "task_type": "subject-add",
                "instruction_language": "en",
            },
            {
                "key": "c1",
                "input_image": "c.png",
                "instruction": "change the background",
                "task_type": "background_change",
            },
            "",
            {"id": "d", "source": "d.png", "instruction": "do it"},
        ],
    )
    a, b, c, d = read_cases(tmp_path)
    assert (a.id, a.source, a.group, a.task, a.target) == (
        "a",
        tmp_path / "a.png",
        "color_change",
        "color_change",
        tmp_path / "t.png",
    )
    assert (b.id, b.source, b.instruction, b.group, b.task) == (
        "9f3e",
        tmp_path / "in/b.jpg",
        "add a hat",
        "subject-add",
        None,
    )
    assert (c.group, c.task, c.target) == ("background_change", "background_change", None)
    assert (d.group, d.task) == ("unlabeled", None)


@pytest.mark.parametrize(
    "lines,match",
    [
        ([], "has no cases"),
        (["", "  "], "has no cases"),
        ([{"id": "a", "source": "a.png", "instruction": "x"}, "{oops"], "line 2: not valid JSON"),
        (["[1, 2]"], "line 1: expected a JSON object"),
        ([{"id": "a", "source": "a.png"}], "line 1: missing 'instruction'"),
        ([{"key": "a", "instruction": "x"}], "line 1: missing 'input_image'"),
        (
            [{"id": "a", "source": "a.png", "instruction": "  "}],
            "line 1: 'instruction' must be a non-empty string",
        ),
        ([{"id": 3, "source": "a.png", "instruction": "x"}], "line 1: 'id' must be a non-empty string"),
        (
            [{"id": "../a", "source": "a.png", "instruction": "x"}],
            "line 1: id '../a' must be usable as a file name",
        ),
        (
            [{"id": "a", "source": "a.png", "instruction": "x", "task": "all"}],
            "line 1: task 'all' is reserved",
        ),
        (
            [
                {"id": "a", "source": "a.png", "instruction": "x"},
                {"id": "a", "source": "b.png", "instruction": "y"},
            ],
            "line 2: id 'a' is already used on line 1",
        ),
    ],
)
def test_read_cases_errors_name_the_line(tmp_path, lines, match):
    _jsonl(tmp_path, lines)
    with pytest.raises(ValueError, match=match):
        read_cases(tmp_path)


def test_read_cases_splits_lines_on_newlines_only(tmp_path):
    good = json.dumps({"id": "a", "source": "a.png", "instruction": "x\u2028y"}, ensure_ascii=False)
    (tmp_path / "cases.jsonl").write_bytes(good.encode() + b"\n" + b'{"id": "\xff"}\n')
    with pytest.raises(ValueError, match="line 2: not UTF-8 text"):
        read_cases(tmp_path)
    (tmp_path / "cases.jsonl").write_bytes(good.encode())
    assert read_cases(tmp_path)[0].instruction == "x\u2028y"


# -- scores ----------------------------------------------------------------------------------


def test_l1_known_values():
    assert l1(BLACK, BLACK) == 0.0
    assert l1(WHITE, BLACK) == 1.0
    half = BLACK.copy()
    half[:, :16] = 255
    assert l1(half, BLACK) == pytest.approx(0.5)
    big_white = np.full((64, 48, 3), 255, np.uint8)  # other size: resized to the reference's first
    assert l1(big_white, BLACK) == pytest.approx(1.0)


def test_scores_skips_judge_and_clip_on_other_models_outputs(folder, tmp_path):
    d, outs = folder
    cases = read_cases(d)
    judge = _judge(
        tmp_path,
        [
            '{"score": [8, 6], "reasoning": "ok"}',
            '{"score": [9, 7]}',  # same
            "I cannot rate this.",
            '```json\n{"score": [4, 5]}\n```',
        ],
    )  # flip: SC unparseable
    rows, skipped = score_cases(cases, outs, clip=FakeClip(), judge=judge)

    assert set(skipped) == {"gone", "broken"}
    assert skipped["gone"].startswith("output: image not found") and "outputs/gone.png" in skipped["gone"]
    assert skipped["broken"].startswith("output: ") and "broken.png" in skipped["broken"]
    same, flip, gone, broken = rows
    assert gone == {
        "id": "gone",
        "task": "tone_transform",
        "instruction": "make it red",
        "skipped": skipped["gone"],
    }

    assert same["l1"] == 0.0 and "l1_target" not in same and "clip_i_target" not in same
    assert flip["l1"] == 1.0 and flip["l1_target"] == pytest.approx(2 / 3)  # white vs red: 2 of 3 channels
    # Fake CLIP: black -> (1, 1, 1), white -> (256, 256, 256), red -> (256, 1, 1), text -> (1, 0, 0).
    assert same["clip_i"] == pytest.approx(1.0) and same["clip_t"] == pytest.approx(1 / math.sqrt(3))
    assert flip["clip_i"] == pytest.approx(1.0)  # cosine ignores scale
    assert flip["clip_i_target"] == pytest.approx(258 / math.sqrt(3 * (256**2 + 2)))

    assert (same["sc"], same["pq"]) == (6.0, 7.0)  # VIEScore: min of each pair
    assert same["o"] == pytest.approx(math.sqrt(6 * 7)) and "notes" not in same
    assert flip["sc"] is None and flip["pq"] == 4.0 and flip["o"] is None
    assert flip["notes"]["sc"].startswith("unparseable judge answer: no score list")
    assert set(flip["notes"]) == {"sc", "o"}
    # SC sees source + output with the instruction, PQ the output alone; skipped cases are not asked.
    asked = judge.model.asked
    assert len(asked) == 4 and "keep it" in asked[0][0] and asked[0][1] == [(32, 32, 3)] * 2
    assert asked[1][1] == [(32, 32, 3)] and "make it white" in asked[2][0]

    table = summarize(rows)
    assert list(table) == ["color_change", "all"]
    cc = table["color_change"]
    assert cc["n"] == 2 and cc["l1"] == pytest.approx(0.5) and cc["l1_target"] == pytest.approx(2 / 3)
    assert cc["o"] == pytest.approx(math.sqrt(42)) and cc["n_o"] == 1 and cc["n_sc"] == 1 and "n_pq" not in cc
    assert cc["pq"] == pytest.approx(5.5) and "n_l1_target" in cc
    assert table["all"] == cc

    text = format_table(table, skipped, n_cases=len(cases))
    assert (
        text.splitlines()[0]
        == "| task | L1 src | L1 tgt | CLIP-I src | CLIP-I tgt | CLIP-T | SC | PQ | O | n |"
    )
    assert "| color_change | 0.500 | 0.667 |" in text and "| all |" in text
    assert "cases scored, where fewer than n: L1 tgt 1, CLIP-I tgt 1, SC 1, O 1" in text
    assert "skipped 2 of 4 cases: gone (output: image not found" in text

    write_results(tmp_path / "res", table, rows, skipped, text)
    metrics = json.loads((tmp_path / "res" / "metrics.json").read_text())
    assert metrics["skipped"] == skipped and metrics["all"]["n"] == 2
    assert len((tmp_path / "res" / "rows.jsonl").read_text().splitlines()) == 4
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == ["metrics.json", "rows.jsonl", "table.md"]


def test_groups_keep_task_order_then_labels(tmp_path):
    rows = [
        {"id": "1", "task": "zeta", "l1": 0.2},
        {"id": "2", "task": "tone_transform", "l1": 0.4},
        {"id": "3", "task": "subject_deletion", "l1": 0.0},
        {"id": "4", "task": "alpha", "l1": 0.6},
        {"id": "5", "task": "alpha", "skipped": "source: gone"},
    ]
    table = summarize(rows)
    assert list(table) == ["subject_deletion", "tone_transform", "alpha", "zeta", "all"]
    assert table["alpha"] == {"l1": pytest.approx(0.6), "n": 1}
    assert table["all"] == {"l1": pytest.approx(0.3), "n": 4}


def test_all_skipped_gives_an_empty_table(tmp_path):
    rows = [{"id": "1", "task": "a", "skipped": "source: gone"}]
    table = summarize(rows)
    assert table == {"all": {"n": 0}}
    assert "skipped 1 of 1 cases: 1 (source: gone)" in format_table(table, {"1": "source: gone"}, 1)


# -- edits by a tiny real pipeline -----------------------------------------------------------


def test_make_outputs_with_a_tiny_pipeline(tmp_path):
    from x2edit import X2EditPipeline
    from x2edit.testing import tiny_sentence_components

    rng = np.random.default_rng(0)
    d = tmp_path / "cases"
    _png(d / "a.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    (d / "bad.png").write_bytes(b"\x89PNG broken")
    _jsonl(
        d,
        [
            {"id": "a", "source": "a.png", "instruction": "make it red", "task": "color_change"},
            {"id": "a2", "source": "a.png", "instruction": "make it red", "task": "color_change"},
            {"id": "bad", "source": "bad.png", "instruction": "make it blue"},
            {"id": "missing", "source": "nope.png", "instruction": "make it blue"},
        ],
    )
    pipe = X2EditPipeline(**tiny_sentence_components())
    pipe.set_progress_bar_config(disable=True)
    cases = read_cases(d)
    out = tmp_path / "outputs"
    failed = make_outputs(pipe, cases, out, steps=2, seed=0)

    assert set(failed) == {"bad", "missing"}
    assert failed["bad"].startswith("source: ") and failed["missing"].startswith("source: image not found")
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "a2.png"]  # no temporary files left
    a, a2 = (np.asarray(Image.open(out / f"{n}.png")) for n in ("a", "a2"))
    assert a.shape == (32, 32, 3) and not np.array_equal(a, a2)  # seed + position: different noise

    again = make_outputs(pipe, cases[:1], tmp_path / "again", steps=2, seed=0)
    assert again == {} and np.array_equal(np.asarray(Image.open(tmp_path / "again" / "a.png")), a)

    rows, skipped = score_cases(cases, out, failed)
    assert skipped == failed and 0 < rows[0]["l1"] < 1 and rows[2]["skipped"] == failed["bad"]


# -- command line ----------------------------------------------------------------------------


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    return err


def test_cli_argument_errors_are_one_line(folder, tmp_path, capsys):
    d, outs = folder
    base = ["eval", "--out", str(tmp_path / "res")]
    assert main(base + ["--folder", str(tmp_path / "nope")]) == 2
    err = _error_line(capsys)
    assert err.startswith("x2edit eval: error: --folder") and err.endswith("is not a directory")
    (tmp_path / "empty").mkdir()
    assert main(base + ["--folder", str(tmp_path / "empty")]) == 2
    assert "cases.jsonl not found" in _error_line(capsys)
    assert main(base + ["--folder", str(d), "--outputs", str(tmp_path / "nope")]) == 2
    assert "--outputs" in _error_line(capsys)
    assert main(base + ["--folder", str(d), "--outputs", str(outs), "--adapter", "x.safetensors"]) == 2
    assert "pass one or the other" in _error_line(capsys)
    assert main(base + ["--folder", str(d), "--outputs", str(outs), "--judge", str(tmp_path / "no_vlm")]) == 2
    assert "--judge: model path" in _error_line(capsys)
    assert not (tmp_path / "res").exists()  # nothing written before the arguments are checked


def test_cli_clip_without_open_clip(folder, tmp_path, capsys):
    try:
        import open_clip  # noqa: F401
    except ImportError:
        d, outs = folder
        weights = tmp_path / "clip.pt"
        weights.write_bytes(b"")
        assert (
            main(
                [
                    "eval",
                    "--out",
                    str(tmp_path / "res"),
                    "--folder",
                    str(d),
                    "--outputs",
                    str(outs),
                    "--clip",
                    str(weights),
                ]
            )
            == 2
        )
        assert r"pip install x2edit[clip]" in _error_line(capsys)
    else:
        pytest.skip("open_clip is installed")


def test_cli_scores_another_models_outputs(folder, tmp_path, capsys):
    d, outs = folder
    res = tmp_path / "res"
    assert main(["eval", "--out", str(res), "--folder", str(d), "--outputs", str(outs)]) == 0
    out = capsys.readouterr().out
    assert "| task | L1 src | L1 tgt | n |" in out and "skipped 2 of 4 cases" in out
    metrics = json.loads((res / "metrics.json").read_text())
    assert metrics["color_change"] == {"l1": 0.5, "l1_target": pytest.approx(2 / 3), "n": 2, "n_l1_target": 1}
    assert set(metrics["skipped"]) == {"gone", "broken"}
    assert (res / "table.md").read_text().startswith("| task |") and not (res / "outputs").exists()


def test_cli_edits_with_a_saved_tiny_pipeline(tmp_path, capsys):
    from x2edit import X2EditPipeline
    from x2edit.testing import tiny_sentence_components

    X2EditPipeline(**tiny_sentence_components()).save_pretrained(tmp_path / "pipe")
    d = tmp_path / "cases"
    _png(d / "a.png", np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    _jsonl(
        d, [{"key": "k1", "input_image": "a.png", "instruction": "make it red", "task_type": "color_alter"}]
    )
    res = tmp_path / "res"
    assert (
        main(
            ["eval", "--out", str(res), "--folder", str(d), "--base", str(tmp_path / "pipe"), "--steps", "2"]
        )
        == 0
    )
    assert "edited 1/1 k1" in capsys.readouterr().out
    assert Image.open(res / "outputs" / "k1.png").size == (32, 32)
    metrics = json.loads((res / "metrics.json").read_text())
    assert metrics["color_alter"]["n"] == 1 and 0 < metrics["all"]["l1"] < 1 and metrics["skipped"] == {}


def test_cli_refuses_options_of_the_other_mode(folder, tmp_path, capsys):
    d, outs = folder
    base = ["eval", "--out", str(tmp_path / "res")]
    assert main(base + ["--folder", str(d), "--outputs", str(outs), "--n-per-task", "5", "--routing", "labels"]) == 2
    assert _error_line(capsys).endswith("--n-per-task, --routing: Shape World options, not used with --folder")
    assert main(base + ["--judge", str(tmp_path / "vlm")]) == 2  # Shape World mode
    assert _error_line(capsys).endswith("--judge: options of --folder (real images); pass --folder CASES")
    assert not (tmp_path / "res").exists()
