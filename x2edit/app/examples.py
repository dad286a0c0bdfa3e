"""Shape World example scenes, so that the first click works with nothing uploaded.

Examples are (task, seed) pairs of Shape World's held-out split, written as PNGs with their own
instruction; the tasks are those x2edit-tiny edits most visibly (README: camera, background, tone,
deletion), plus a colour and a style change.
"""

from __future__ import annotations

from pathlib import Path

# (task, seed) in the "eval" split; the instruction is the pair's own.
EXAMPLES: tuple[tuple[str, int], ...] = (
    ("background_change", 1),
    ("tone_transform", 2),
    ("camera_move", 0),
    ("subject_deletion", 2),
    ("color_change", 2),
    ("style_change", 0),
)


def render_examples(folder: str | Path, resolution: int = 64) -> list[list[str]]:
    """Write the example sources to ``folder``; returns [(image path, instruction)]."""
    from PIL import Image

    from x2edit.data_pipeline.shapeworld import ShapeWorld

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    world = ShapeWorld(resolution=resolution)
    out = []
    for task, seed in EXAMPLES:
        pair = world.sample(seed, task, split="eval")
        path = folder / f"{task}_{seed}.png"
        Image.fromarray(pair.source).save(path)
        out.append([str(path), pair.instruction])
    return out
