"""`x2edit eval --folder DIR`: score instruction edits of real images, GEdit-Bench style.

Input folder:

    DIR/cases.jsonl     one JSON object per line:
                        {"id": "cat_01", "source": "images/cat.png", "instruction": "make the cat black",
                         "task": "color_change", "target": "refs/cat_black.png"}
                        task and target are optional. A GEdit-Bench-like line is read too:
                        {"key": ..., "input_image": ..., "instruction": ..., "task_type": ...}
                        Paths are relative to DIR. Other keys are ignored; blank lines are skipped.

``task`` (or ``task_type``) groups the cases in the tables; a name from ``x2edit.tasks`` also routes
the MoE-LoRA, any other value is a free-form label and the pipeline classifies the instruction. The
outputs are either made by the pipeline (written to ``OUT/outputs/<id>.png``) or read from
``--outputs DIR2`` as ``DIR2/<id>.png``, so the edits of any other model can be scored the same way.

Scores per case (outputs are resized, bicubic, to the reference's size before pixel comparisons):
    l1, l1_target        mean |output - source| and |output - target|, 0..1 (preservation proxy)
    clip_i, clip_i_target  cos(CLIP(output), CLIP(source)) and vs the target           (--clip)
    clip_t               cos(CLIP(output), CLIP(instruction))                            (--clip)
    sc, pq, o            VLM judge, 0..10: semantic consistency, perceptual quality and
                         O = sqrt(SC * PQ), GEdit-Bench's overall, per case              (--judge)

A case whose source, output or target cannot be read is skipped with the reason; a judge answer
that cannot be parsed leaves that score None with the reason in the row's ``notes``.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from x2edit.files import atomic_path

CASES_FILE = "cases.jsonl"
UNLABELED = "unlabeled"  # group of cases without a task
RESERVED_GROUPS = ("all", "skipped")  # keys of metrics.json that are not groups
GEDIT_KEYS = {"key": "id", "input_image": "source", "task_type": "task"}  # GEdit-Bench name -> ours
# metric -> (table column, number format), in table order
METRICS = {
    "l1": ("L1 src", ".3f"),
    "l1_target": ("L1 tgt", ".3f"),
    "clip_i": ("CLIP-I src", ".3f"),
    "clip_i_target": ("CLIP-I tgt", ".3f"),
    "clip_t": ("CLIP-T", ".3f"),
    "sc": ("SC", ".2f"),
    "pq": ("PQ", ".2f"),
    "o": ("O", ".2f"),
}
JUDGE_SCORES = {"sc": "judge_sc", "pq": "judge_pq", "o": "judge_overall"}  # ours -> VlmJudge's


@dataclass(frozen=True)
class EditCase:
    """One edit to make and score.

    Args:
        id: unique id that is also a file name: the output is ``<id>.png``.
        source: source image path.
        instruction: the editing instruction.
        group: the table row: the task name, a free-form label, or "unlabeled".
        task: x2edit task name that routes the adapter, or None (the pipeline classifies).
        target: reference image path, or None.
    """

    id: str
    source: Path
    instruction: str
    group: str
    task: str | None = None
    target: Path | None = None


# -- reading ---------------------------------------------------------------------------------


def read_cases(folder: str | os.PathLike) -> list[EditCase]:
    """The cases of ``folder/cases.jsonl``; a malformed line is a ``ValueError`` naming the line."""
    folder = Path(folder)
    path = folder / CASES_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the folder needs a {CASES_FILE}, one edit case per line (see docs/eval.md)"
        )
    cases, seen = [], {}
    # Split on "\n" only: str.splitlines would also split at U+2028 and others, which JSON strings may hold.
    for n, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        where = f"{path} line {n}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        case = _parse_case(obj, folder, where)
        if case.id in seen:
            raise ValueError(f"{where}: id {case.id!r} is already used on line {seen[case.id]}")
        seen[case.id] = n
        cases.append(case)
    if not cases:
        raise ValueError(
            f"{path} has no cases: write one JSON object per line, e.g. "
            '{"id": "a", "source": "a.png", "instruction": "make it red"}'
        )
    return cases


def _parse_case(obj: dict, folder: Path, where: str) -> EditCase:
    from x2edit.tasks import TASK_NAMES

    gedit = "id" not in obj and "key" in obj
    shown = {v: k for k, v in GEDIT_KEYS.items()} if gedit else {}  # name keys as the file does
    if gedit:
        obj = {GEDIT_KEYS.get(k, k): v for k, v in obj.items()}

    def text(key: str, required: bool) -> str | None:
        value = obj.get(key)
        if value is None and not required:
            return None
        name = shown.get(key, key)
        if value is None:
            raise ValueError(
                f"{where}: missing {name!r}; a case needs id, source and instruction "
                "(or GEdit's key, input_image and instruction)"
            )
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}: {name!r} must be a non-empty string, got {value!r}")
        return value

    case_id, source, instruction = text("id", True), text("source", True), text("instruction", True)
    task, target = text("task", False), text("target", False)
    if case_id in (".", "..") or "/" in case_id or "\\" in case_id or case_id != case_id.strip():
        raise ValueError(
            f"{where}: id {case_id!r} must be usable as a file name (no slashes, no outer spaces)"
        )
    group = task or UNLABELED
    if group in RESERVED_GROUPS:
        raise ValueError(f"{where}: task {group!r} is reserved for the summary; use another label")
    return EditCase(
        id=case_id,
        source=folder / source,
        instruction=instruction,
        group=group,
        task=group if group in TASK_NAMES else None,
        target=folder / target if target is not None else None,
    )


def load_rgb(path: Path, what: str) -> tuple[np.ndarray | None, str | None]:
    """(HxWx3 uint8 image, None), or (None, "what: why") when the file is missing or unreadable."""
    from x2edit.images import load_image

    try:
        return np.asarray(load_image(path)), None
    except (OSError, ValueError) as e:
        return None, f"{what}: {e}"


# -- making outputs --------------------------------------------------------------------------


def _save_png(image, path: Path) -> None:
    with atomic_path(path) as tmp:  # an interrupted run leaves no half-written output
        image.save(tmp, format="PNG")


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def make_outputs(
    pipe,
    cases: list[EditCase],
    out_dir: Path,
    steps: int | None = None,
    seed: int = 0,
    guidance: float = 2.5,
    verbose: bool = False,
) -> dict[str, str]:
    """Edit every case with ``pipe`` and write ``out_dir/<id>.png``.

    Args:
        pipe: an ``X2EditPipeline`` (or any pipeline taking image, prompt, task and returning PIL images).
        steps, guidance: denoising steps and guidance scale.
        seed: case i (its position in cases.jsonl) uses seed + i, so a case's output does not depend
            on which other cases are evaluated with it.
        verbose: print one line per case.

    Returns:
        {id: reason} of the cases that could not be edited (unreadable source, edit refused).
    """
    import torch
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    failed = {}
    for i, case in enumerate(cases):
        t0 = time.perf_counter()
        source, why = load_rgb(case.source, "source")
        if source is None:
            failed[case.id] = why
            continue
        try:
            image = pipe(
                image=Image.fromarray(source),
                prompt=case.instruction,
                task=case.task,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=torch.Generator().manual_seed(seed + i),
            ).images[0]
        except ValueError as e:  # e.g. a source smaller than the model's pixel grid
            failed[case.id] = f"edit: {e}"
            continue
        _save_png(image, out_dir / f"{case.id}.png")
        if verbose:
            print(f"edited {i + 1}/{len(cases)} {case.id} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return failed


# -- scoring ---------------------------------------------------------------------------------


def _match_size(image: np.ndarray, like: np.ndarray) -> np.ndarray:
    if image.shape[:2] == like.shape[:2]:
        return image
    from PIL import Image

    h, w = like.shape[:2]
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC))


def l1(output: np.ndarray, reference: np.ndarray) -> float:
    """Mean |output - reference| over pixels and channels, in 0..1 (uint8 HxWx3 images; the output
    is resized, bicubic, to the reference's size first)."""
    out = _match_size(output, reference)
    return float(np.abs(out.astype(np.float64) - reference.astype(np.float64)).mean() / 255.0)


def clip_case(
    clip, instruction: str, source: np.ndarray, output: np.ndarray, target: np.ndarray | None = None
) -> dict[str, float | None]:
    """CLIP-I (output vs source, and vs target) and CLIP-T (output vs instruction).

    Args:
        clip: a set-up ``ClipScorer`` (or anything with its ``encode_images`` / ``encode_texts``).
    """
    from x2edit.data_pipeline.stages.scorers import clip_scores

    emb = clip.encode_images([source, output] + ([target] if target is not None else []))  # (2 or 3, D)
    text = clip.encode_texts([instruction])[0]  # (D,)
    s = clip_scores(emb[0], emb[1], instr=text)
    out = {"clip_i": s["clip_image_sim"], "clip_t": s["clip_text_target"]}
    if target is not None:
        out["clip_i_target"] = clip_scores(emb[2], emb[1])["clip_image_sim"]
    return out


def judge_case(
    judge, key: str, instruction: str, source: np.ndarray, output: np.ndarray
) -> tuple[dict[str, float | None], dict[str, str]]:
    """(SC, PQ, O scores, notes for the ones that are None) from a ``VlmJudge``: the same prompts,
    parsing and VIEScore aggregation as the data pipeline's judge, with the output as the target."""
    from x2edit.data_pipeline.sample import Sample

    s = Sample(key=key, source=source, target=output, instruction=instruction)
    judge.process([s])
    scores = {ours: s.scores[theirs] for ours, theirs in JUDGE_SCORES.items()}
    notes = {ours: s.notes[theirs] for ours, theirs in JUDGE_SCORES.items() if theirs in s.notes}
    return scores, notes


def score_cases(
    cases: list[EditCase],
    outputs_dir: Path,
    skipped: dict[str, str] | None = None,
    clip=None,
    judge=None,
    verbose: bool = False,
) -> tuple[list[dict], dict[str, str]]:
    """Score ``outputs_dir/<id>.png`` of every case.

    Args:
        skipped: {id: reason} of cases already known to be unusable (e.g. the edit failed).
        clip: a ``ClipScorer`` (set up) or None; judge: a ``VlmJudge`` or None.

    Returns:
        (one row per case, skipped rows included, {id: reason} of every skipped case).
    """
    skipped = dict(skipped or {})
    rows = []
    for i, case in enumerate(cases):
        row = {"id": case.id, "task": case.group, "instruction": case.instruction}
        images, why = {}, skipped.get(case.id)
        refs = (("source", case.source), ("output", outputs_dir / f"{case.id}.png"), ("target", case.target))
        for what, path in refs:
            if why is not None or path is None:
                continue
            images[what], why = load_rgb(path, what)
        if why is not None:
            skipped[case.id] = why
            rows.append({**row, "skipped": why})
            continue
        source, output, target = images["source"], images["output"], images.get("target")
        row["l1"] = l1(output, source)
        if target is not None:
            row["l1_target"] = l1(output, target)
        notes = {}
        if clip is not None:
            row.update(clip_case(clip, case.instruction, source, output, target))
        if judge is not None:
            scores, notes = judge_case(judge, case.id, case.instruction, source, output)
            row.update(scores)
        if notes:
            row["notes"] = notes
        rows.append(row)
        if verbose and (clip is not None or judge is not None):
            print(f"scored {i + 1}/{len(cases)} {case.id}", flush=True)
    return rows, skipped


# -- summary ---------------------------------------------------------------------------------


def _means(rows: list[dict], names: list[str]) -> dict:
    out, counts = {}, {}
    for m in names:
        values = [r[m] for r in rows if r.get(m) is not None]
        out[m] = float(np.mean(values)) if values else None
        if len(values) < len(rows):
            counts[f"n_{m}"] = len(values)
    return {**out, "n": len(rows), **counts}


def summarize(rows: list[dict]) -> dict:
    """Per group means of every metric with n (cases scored), then "all".

    Groups are x2edit tasks in taxonomy order, then free-form labels sorted. Where some cases have
    no value for a metric (an unparseable judge answer), the mean is over the others and
    ``n_<metric>`` says how many.
    """
    from x2edit.tasks import TASK_NAMES

    scored = [r for r in rows if "skipped" not in r]
    names = [m for m in METRICS if any(m in r for r in scored)]
    groups = defaultdict(list)
    for r in scored:
        groups[r["task"]].append(r)
    order = [t for t in TASK_NAMES if t in groups] + sorted(g for g in groups if g not in TASK_NAMES)
    table = {g: _means(groups[g], names) for g in order}
    table["all"] = _means(scored, names)
    return table


def format_table(table: dict, skipped: dict[str, str], n_cases: int, max_listed: int = 20) -> str:
    """Markdown table of a ``summarize`` result, with unscored and skipped cases in the footer."""
    names = [m for m in METRICS if m in table["all"]]
    lines = [
        "| task | " + " | ".join(METRICS[m][0] for m in names) + " | n |",
        "|---|" + "---:|" * (len(names) + 1),
    ]
    for group, m in table.items():
        cells = ["-" if m[k] is None else format(m[k], METRICS[k][1]) for k in names]
        lines.append(f"| {group} | " + " | ".join(cells) + f" | {m['n']} |")
    footer = []
    partial = [f"{METRICS[k][0]} {table['all'][f'n_{k}']}" for k in names if f"n_{k}" in table["all"]]
    if partial:  # cases without a target, or judge answers that could not be parsed
        footer.append(
            "cases scored, where fewer than n: "
            + ", ".join(partial)
            + " (no target, or an unscored judge answer: see the notes in rows.jsonl)"
        )
    if skipped:
        listed = "; ".join(f"{k} ({v})" for k, v in list(skipped.items())[:max_listed])
        more = f"; ... {len(skipped) - max_listed} more in metrics.json" if len(skipped) > max_listed else ""
        footer.append(f"skipped {len(skipped)} of {n_cases} cases: {listed}{more}")
    return "\n".join(lines + ([""] + footer if footer else []))


def write_results(out: Path, table: dict, rows: list[dict], skipped: dict[str, str], text: str) -> None:
    """metrics.json ({group: {metric: mean, ..., "n": k}, "skipped": {id: reason}}), rows.jsonl, table.md."""
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / "metrics.json", json.dumps({**table, "skipped": skipped}, indent=2))
    _write_text(out / "rows.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    _write_text(out / "table.md", text + "\n")


# -- the command -----------------------------------------------------------------------------


def load_clip(path: str, model: str = "ViT-B-32"):
    """A validated (not yet set up) ``ClipScorer`` for local open_clip weights."""
    from x2edit.data_pipeline.stages.base import build_params
    from x2edit.data_pipeline.stages.scorers import ClipScorer

    scorer = ClipScorer(
        build_params(ClipScorer, {"pretrained": path, "model": model}, "--clip"), name="--clip"
    )
    scorer.validate()
    return scorer


def load_judge(path: str):
    """A validated ``VlmJudge`` for a local VLM directory; the model loads on first use."""
    from x2edit.data_pipeline.stages.base import build_params
    from x2edit.data_pipeline.stages.scorers import VlmJudge

    judge = VlmJudge(build_params(VlmJudge, {"path": path}, "--judge"), name="--judge")
    judge.validate()
    return judge


def run(args) -> int:
    """Folder mode of ``x2edit eval`` (see the module docstring); validates everything before loading models."""
    import torch

    from x2edit.adapters import read_adapter_header
    from x2edit.registry import DEFAULT_BASE, load_pipeline

    folder = Path(args.folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--folder {folder} is not a directory")
    cases = read_cases(folder)
    outputs_dir = None
    if args.outputs is not None:
        outputs_dir = Path(args.outputs)
        if not outputs_dir.is_dir():
            raise FileNotFoundError(f"--outputs {outputs_dir} is not a directory")
        if args.base is not None or args.adapter is not None:
            raise ValueError("--base/--adapter make the outputs, --outputs reads them: pass one or the other")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.adapter is not None:
        if not Path(args.adapter).is_file():
            raise FileNotFoundError(f"adapter file not found: {args.adapter}")
        read_adapter_header(args.adapter)
    clip = load_clip(args.clip, args.clip_model) if args.clip else None
    judge = load_judge(args.judge) if args.judge else None

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    skipped = {}
    if outputs_dir is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        pipe = load_pipeline(args.base or DEFAULT_BASE, torch_dtype=dtype, device=device)
        pipe.set_progress_bar_config(disable=True)
        if args.adapter:
            pipe.load_adapter(args.adapter, adapter_name="evaluated", replace=True)
        outputs_dir = out / "outputs"
        skipped = make_outputs(pipe, cases, outputs_dir, args.steps, args.seed, args.guidance, verbose=True)
        del pipe  # the scorers' models load next
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if clip is not None:
        clip.setup()
    rows, skipped = score_cases(cases, outputs_dir, skipped, clip, judge, verbose=True)
    table = summarize(rows)
    text = format_table(table, skipped, len(cases))
    write_results(out, table, rows, skipped, text)
    print(text)
    print(f"\nwrote {out}/metrics.json, rows.jsonl, table.md in {time.perf_counter() - t0:.1f} s")
    return 0
