"""ShapeWorld: seeded, exact editing pairs for every task.

``ShapeWorld(resolution).sample(seed, task, split)`` is a pure function of its arguments (and
``SHAPEWORLD_VERSION``): the same call gives the same pixels on every machine with the same
numpy / Pillow.

Splits. The random stream of a pair is keyed by (version, split, task, seed, attempt), so a
training pair and an evaluation pair never share a scene, whatever seeds are used. On top of
that, training scenes never contain the (kind, color) pairs of ``vocab.HELDOUT_COMBOS`` and
training instructions never use the held-out templates; the evaluation split uses both often.
The fixed evaluation set is ``eval_pairs``: seeds 0..n-1 of the "eval" split for every task.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from x2edit.data_pipeline.shapeworld import vocab
from x2edit.data_pipeline.shapeworld.ops import OPS, SceneEdit, choose_op
from x2edit.data_pipeline.shapeworld.render import Renderer, degrade
from x2edit.data_pipeline.shapeworld.scene import ColorPolicy, background_colors, describe_scene
from x2edit.data_pipeline.shapeworld.templates import write_instruction
from x2edit.tasks import TASK_NAMES, get_task

SHAPEWORLD_VERSION = 1
SPLITS = ("train", "eval")
_SALT = 0x5A3E  # keeps Shape World streams apart from other uses of the same integers
_MAX_ATTEMPTS = 64


@dataclass
class EditPair:
    """One editing example.

    Args:
        source, target: (H, W, 3) uint8 images.
        mask: (H, W) bool, the pixels the edit may change. For local tasks the target equals the
            source outside it; for global tasks (style, tone, camera, low-level, subject-driven)
            it is all True.
        instruction: the editing instruction.
        task: task name (``x2edit.tasks``).
        provenance: JSON-able facts: generator, version, split, seed, op, region, template, ...
        edit: the scene-level edit (scenes and slots) behind the pair.
    """

    source: np.ndarray
    target: np.ndarray
    mask: np.ndarray
    instruction: str
    task: str
    provenance: dict
    edit: SceneEdit | None = field(default=None, repr=False)

    @property
    def local(self) -> bool:
        """True when the edit is confined to ``mask`` (target == source outside it)."""
        return self.provenance["region"] != "image"

    @property
    def captions(self) -> tuple[str, str]:
        """Canonical captions of the source and target scenes."""
        return describe_scene(self.edit.source), describe_scene(self.edit.target)


@dataclass
class PanelSet:
    """An IC-LoRA panel set: one scene with one object in n colours, panel after panel.

    Args:
        panels: n (H, W, 3) uint8 images; panels 0 and 1 are ``pair``'s source and target.
        captions: the n scenes' canonical captions.
        summary: what the set shows, e.g. "one scene, the star in 3 colors".
        pair: the colour change from panel 0 to panel 1 (with its instruction), so the set is also an edit pair.
        tag: the set's task tag (``x2edit.incontext``).
    """

    panels: list[np.ndarray]
    captions: list[str]
    summary: str
    pair: EditPair
    tag: str = "COLORS"

    @property
    def caption(self) -> str:
        """The set's joint caption: "[COLORS] summary [PANEL-1] caption ... [PANEL-n] caption"."""
        from x2edit.incontext import joint_caption

        return joint_caption(self.tag, self.summary, self.captions)


MAX_PANELS = 6


def _split_index(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    return SPLITS.index(split)


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


class ShapeWorld:
    """Procedural scenes and exact edits.

    Args:
        resolution: image side in pixels (default 64, what x2edit-tiny trains on).
        supersample: antialiasing factor; default 4 up to 128 px, 2 above.
    """

    def __init__(self, resolution: int = 64, supersample: int | None = None):
        if supersample is None:
            supersample = 4 if resolution <= 128 else 2
        self.resolution = resolution
        self.renderer = Renderer(resolution, supersample)
        self.min_changed = max(6, int(0.004 * resolution * resolution))

    def task_for_seed(self, seed: int, split: str = "train") -> str:
        """The task a seed gets when ``sample`` is called without one (uniform over tasks)."""
        rng = np.random.default_rng([_SALT, SHAPEWORLD_VERSION, _split_index(split), 1000, _check_seed(seed)])
        return TASK_NAMES[int(rng.integers(len(TASK_NAMES)))]

    def generate(self, seed: int, task: str | None = None, split: str = "train") -> EditPair:
        """Source, target and mask for (seed, task, split), without an instruction yet."""
        seed = _check_seed(seed)
        task = get_task(task).name if task is not None else self.task_for_seed(seed, split)
        s = _split_index(split)
        policy = ColorPolicy(split)
        tid = get_task(task).id
        for attempt in range(_MAX_ATTEMPTS):
            rng = np.random.default_rng([_SALT, SHAPEWORLD_VERSION, s, tid, seed, attempt])
            edit = choose_op(rng, task)(rng, policy)
            if edit is None:
                continue
            pair = self._render_pair(edit, rng)
            if pair is None:
                continue
            source, target, mask = pair
            provenance = {
                "generator": "shapeworld", "version": SHAPEWORLD_VERSION, "split": split, "seed": seed,
                "task": task, "op": edit.op, "region": edit.region, "attempt": attempt,
                "resolution": self.resolution, "heldout_combo": _has_heldout(edit),
            }
            return EditPair(source, target, mask, "", task, provenance, edit)
        raise RuntimeError(f"Shape World found no valid {task} edit for seed {seed} in {_MAX_ATTEMPTS} attempts")

    def _render_pair(self, edit: SceneEdit, rng: np.random.Generator):
        r = self.renderer
        tgt = r.render(edit.target)
        src = r.render(edit.source, mode=edit.source_mode)
        source = src.image
        if edit.degrade is not None:
            source = degrade(tgt.image, edit.degrade, rng)
        target = tgt.image
        changed = np.any(source != target, axis=-1)
        if int(changed.sum()) < self.min_changed:
            return None  # the edit is (nearly) invisible at this resolution: draw another
        if edit.region == "objects":
            mask = src.footprint(edit.touched) | tgt.footprint(edit.touched)
        elif edit.region == "background":
            mask = src.background_visible()
        else:
            mask = np.ones(changed.shape, dtype=bool)
        if np.any(changed & ~mask):
            raise AssertionError(f"Shape World op {edit.op} changed pixels outside its region")  # a bug, not data
        return source, target, mask

    def write_instruction(self, pair: EditPair) -> tuple[str, dict]:
        """The template instruction for a generated pair; see ``instruction_for``."""
        return instruction_for(pair)

    def sample(self, seed: int, task: str | None = None, split: str = "train") -> EditPair:
        """A complete pair: images, mask, instruction.

        Args:
            seed: non-negative integer.
            task: a task name or id; None picks one from the seed (uniform over tasks).
            split: "train" or "eval".
        """
        pair = self.generate(seed, task, split)
        text, extra = self.write_instruction(pair)
        pair.instruction = text
        pair.provenance.update(extra)
        return pair

    def panel_set(self, seed: int, n_panels: int = 3, split: str = "train") -> PanelSet:
        """A set of ``n_panels`` (3..``MAX_PANELS``) scenes: a colour-change pair (seed, split) whose recoloured
        object takes one more colour per further panel, each allowed in the split and unlike the object's earlier
        colours and the background's. A pure function of its arguments, like ``sample``."""
        if isinstance(n_panels, bool) or not isinstance(n_panels, int) or not 3 <= n_panels <= MAX_PANELS:
            raise ValueError(f"a Shape World panel set has 3 to {MAX_PANELS} panels, got {n_panels!r}")
        seed = _check_seed(seed)
        policy = ColorPolicy(split)
        for attempt in range(_MAX_ATTEMPTS):  # pair seeds seed, seed + 1e9, ...: another scene when colours run out
            pair = self.sample(seed + attempt * 1_000_000_007, "color_change", split)
            edit = pair.edit
            (obj_id,) = edit.touched
            obj = edit.target.get(obj_id)
            rng = np.random.default_rng([_SALT, SHAPEWORLD_VERSION, _split_index(split), seed, attempt, 104729])
            used = [edit.source.get(obj_id).color, obj.color]
            scenes = [edit.source, edit.target]
            while len(scenes) < n_panels:
                color = policy.choose(rng, obj.kind, tuple(used) + background_colors(edit.target.background))
                if color is None:
                    break
                used.append(color)
                scenes.append(edit.target.replace_obj(obj_id, color=color))
            if len(scenes) < n_panels:
                continue
            panels = [pair.source, pair.target] + [self.render(sc) for sc in scenes[2:]]
            if any(np.array_equal(a, b) for i, a in enumerate(panels) for b in panels[i + 1:]):
                continue  # a colour that renders the same at this resolution: draw another scene
            return PanelSet(panels, [describe_scene(sc) for sc in scenes],
                            f"one scene, the {obj.kind} in {n_panels} colors", pair)
        raise RuntimeError(f"Shape World found no {n_panels}-colour set for seed {seed} in {_MAX_ATTEMPTS} attempts")

    def eval_pairs(self, n_per_task: int = 20, tasks=None) -> Iterator[EditPair]:
        """The fixed held-out evaluation set: seeds 0..n_per_task-1 of the "eval" split, per task."""
        names = TASK_NAMES if tasks is None else tuple(get_task(t).name for t in tasks)
        for task in names:
            for seed in range(n_per_task):
                yield self.sample(seed, task, split="eval")

    def render(self, scene) -> np.ndarray:
        """(H, W, 3) uint8 image of a scene."""
        return self.renderer.render(scene).image


def instruction_for(pair: EditPair) -> tuple[str, dict]:
    """The template instruction of a generated pair (a function of its seed, task and split).

    Returns (text, provenance additions: the template id and whether it is held out).
    """
    p = pair.provenance
    rng = np.random.default_rng([_SALT, SHAPEWORLD_VERSION, _split_index(p["split"]), get_task(pair.task).id,
                                 p["seed"], 7919])
    text, idx, held = write_instruction(pair.edit, rng, p["split"])
    return text, {"template": f"{pair.edit.op}/{'eval' if held else 'train'}/{idx}", "heldout_template": held}


def _has_heldout(edit: SceneEdit) -> bool:
    return any((o.kind, o.color) in vocab.HELDOUT_COMBOS for sc in (edit.source, edit.target) for o in sc.objects)


def task_ops(task: str) -> tuple[str, ...]:
    """Names of the operations that implement a task."""
    return tuple(fn.__name__.removeprefix("op_") for fn, _ in OPS[get_task(task).name])
