"""Shape World benchmark: exact-target metrics per task, and the image grid that shows them.

For one edit with source S, target T, output O and edited-region mask M:
    edit_gain_db = PSNR(O, T) - PSNR(S, T)    (> 0: the output is closer to the target than doing nothing)
    err_in / err_out = mean |O - T| inside / outside M (0..1); err_out is how much the edit leaked.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch
from PIL import Image, ImageDraw

from x2edit.data_pipeline.metrics import psnr
from x2edit.tasks import TASK_NAMES


def edit_metrics(output: np.ndarray, source: np.ndarray, target: np.ndarray, mask: np.ndarray) -> dict:
    """Metrics of one edit (uint8 HxWx3 images, bool HxW mask)."""
    diff = np.abs(output.astype(np.float64) - target.astype(np.float64)).mean(-1) / 255.0  # (H, W)
    inside, outside = diff[mask], diff[~mask]
    return {
        "edit_gain_db": psnr(output, target) - psnr(source, target),
        "psnr": psnr(output, target),
        "err_in": float(inside.mean()) if inside.size else None,
        "err_out": float(outside.mean()) if outside.size else None,  # global edits: no outside
    }


def summarize(rows: list[dict]) -> dict:
    """Per-task means of ``edit_metrics`` rows (each with a "task" key), plus "mean" over tasks."""
    by_task = defaultdict(list)
    for r in rows:
        by_task[r["task"]].append(r)
    def mean(values):  # None where a metric does not apply (err_out of a global edit)
        values = [v for v in values if v is not None and not math.isnan(v)]
        return float(np.mean(values)) if values else None

    keys = ("edit_gain_db", "psnr", "err_in", "err_out")
    table = {}
    for task in [t for t in TASK_NAMES if t in by_task]:
        rs = by_task[task]
        table[task] = {k: mean([r[k] for r in rs]) for k in keys}
        table[task]["n"] = len(rs)
    if table:
        table["mean"] = {k: mean([v[k] for v in table.values()]) for k in keys}
        table["mean"]["n"] = len(rows)
    return table


@torch.no_grad()
def run_edits(pipe, pairs, steps: int | None = None, seed: int = 0, batch_size: int = 16, tasks: list[str] | None = None,
              guidance_scale: float = 1.0) -> list[np.ndarray]:
    """Edit each Shape World pair with ``pipe`` (its ``edit``: Kontext or diptych); returns uint8 outputs in order.

    Args:
        steps: denoising steps; None: the pipeline's own default.
        tasks: task per pair for the router; None lets the pipeline classify each instruction.
    """
    outputs = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        h, w = chunk[0].source.shape[:2]
        images = pipe.edit([Image.fromarray(p.source) for p in chunk], [p.instruction for p in chunk],
                      task=None if tasks is None else tasks[i:i + batch_size], height=h, width=w,
                      num_inference_steps=steps, guidance_scale=guidance_scale, output_type="np",
                      generator=[torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]).images
        outputs.extend((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
    return outputs


def run_set_edits(pipe, pairs, steps: int | None = None, seed: int = 0, tasks: list[str] | None = None,
                  **call_kwargs) -> list[np.ndarray]:
    """Edit each captioned Shape World pair as a 2-panel IC-LoRA set: the right panel of [source | ?] made under
    "[EDIT] instruction [LEFT] source caption [RIGHT] target caption" (``x2edit.incontext.inpaint_set``: by
    Fill on a Fill base, SDEdit-style on a text-to-image one); uint8 outputs in order, seeds ``seed + i``.

    Args:
        steps: denoising steps; None: the pipeline's own (a one-step Fill base takes exactly one).
        tasks: task per pair for the router; None lets the pipeline classify each instruction.
    """
    from x2edit.incontext import edit_as_set, joint_caption

    outputs = []
    for i, p in enumerate(pairs):
        caption = joint_caption("EDIT", p.instruction, list(p.captions))
        h, w = p.source.shape[:2]
        made = edit_as_set(pipe, Image.fromarray(p.source), caption, max_area=h * w, num_inference_steps=steps,
                           task=None if tasks is None else tasks[i], generator=torch.Generator().manual_seed(seed + i),
                           **call_kwargs)
        outputs.append(np.asarray(made))
    return outputs


def evaluate_pairs(pipe, pairs, **kwargs) -> tuple[dict, list[dict], list[np.ndarray]]:
    """(per-task summary, per-pair rows, outputs) of ``pipe`` on Shape World pairs."""
    outputs = run_edits(pipe, pairs, **kwargs)
    rows = [{"task": p.task, "instruction": p.instruction, **edit_metrics(o, p.source, p.target, p.mask)}
            for p, o in zip(pairs, outputs)]
    return summarize(rows), rows, outputs


def edit_grid(pairs, outputs, scale: int = 2, text_width: int = 220) -> Image.Image:
    """Rows of source | instruction | output | target (images upscaled ``scale`` x, nearest)."""
    h, w = pairs[0].source.shape[:2]
    H, W = h * scale, w * scale
    pad = 4
    grid = Image.new("RGB", (3 * (W + pad) + text_width + pad, len(pairs) * (H + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (p, o) in enumerate(zip(pairs, outputs)):
        y = pad + r * (H + pad)
        cells = [p.source, None, o, p.target]
        x = pad
        for c in cells:
            if c is None:
                words, lines, line = f"[{p.task}] {p.instruction}".split(), [], ""
                for word in words:  # wrap to the text column
                    if len(line) + len(word) + 1 > text_width // 6:
                        lines.append(line)
                        line = word
                    else:
                        line = f"{line} {word}".strip()
                lines.append(line)
                draw.multiline_text((x, y + 2), "\n".join(lines[: H // 11]), fill=(0, 0, 0), spacing=1)
                x += text_width
                continue
            grid.paste(Image.fromarray(c).resize((W, H), Image.NEAREST), (x, y))
            x += W + pad
    return grid


def format_table(table: dict) -> str:
    """Markdown table of a ``summarize`` result."""
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    lines = ["| task | edit gain (dB) | PSNR | err in | err out | n |", "|---|---:|---:|---:|---:|---:|"]
    for task, m in table.items():
        lines.append(f"| {task} | {f(m['edit_gain_db'], '+.2f')} | {f(m['psnr'], '.2f')} | {f(m['err_in'], '.3f')} | "
                     f"{f(m['err_out'], '.3f')} | {m['n']} |")
    return "\n".join(lines)
