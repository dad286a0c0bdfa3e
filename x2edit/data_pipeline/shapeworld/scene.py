"""The scene model: a background, objects in drawing order, a camera, a style and a tone.

Coordinates are world units: the default camera shows the square [0, 1] x [0, 1], x to the right,
y down. An object's ``size`` is the radius of the circle it is inscribed in. Scenes are frozen
dataclasses; edit operations build new scenes with ``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from x2edit.data_pipeline.shapeworld import vocab

# Object sizes (radius, world units). "small"/"large" in instructions refer to these classes.
SIZE_RANGE = (0.08, 0.17)
SMALL_RANGE = (0.08, 0.105)
LARGE_RANGE = (0.14, 0.17)
# Region boundaries (thirds) and the margin inside which a position is too close to call.
_REGION_EDGES = (0.35, 0.65)
_REGION_MARGIN = 0.04


@dataclass(frozen=True)
class Obj:
    """One object. Kind-specific fields are ignored by the other kinds.

    Args:
        id: stable id within a scene (edits refer to objects by id).
        kind: a shape from ``vocab.SHAPES``, or "sign" / "face".
        color: a name from ``vocab.COLORS``.
        x, y: center in world units.
        size: radius in world units.
        rotation: degrees, counter-clockwise as seen on screen.
        material: fill pattern, one of ``vocab.MATERIALS`` (shapes only).
        mirror: mirror the shape about its own vertical axis before rotating.
        text: a sign's letters ("" for a blank sign).
        expression, eyes, glasses, blush: a face's features.
    """

    id: int
    kind: str
    color: str
    x: float
    y: float
    size: float
    rotation: float = 0.0
    material: str = "solid"
    mirror: bool = False
    text: str = ""
    expression: str = "smile"
    eyes: str = "open"
    glasses: bool = False
    blush: bool = False


@dataclass(frozen=True)
class Background:
    """kind: solid | gradient (color -> color2, top to bottom or left to right) | stripes | checker | dots."""

    kind: str = "solid"
    color: str = "white"
    color2: str = "white"
    direction: str = "vertical"


@dataclass(frozen=True)
class Camera:
    """The view: world point at the image center, and magnification (2.0 shows half the width)."""

    cx: float = 0.5
    cy: float = 0.5
    zoom: float = 1.0


@dataclass(frozen=True)
class Scene:
    background: Background
    objects: tuple[Obj, ...] = ()
    camera: Camera = field(default_factory=Camera)
    style: str = "flat"
    tone: str = "neutral"

    def get(self, obj_id: int) -> Obj:
        for o in self.objects:
            if o.id == obj_id:
                return o
        raise KeyError(f"no object with id {obj_id}")

    def replace_obj(self, obj_id: int, **changes) -> Scene:
        objs = tuple(dataclasses.replace(o, **changes) if o.id == obj_id else o for o in self.objects)
        return dataclasses.replace(self, objects=objs)

    def without(self, *obj_ids: int) -> Scene:
        return dataclasses.replace(self, objects=tuple(o for o in self.objects if o.id not in obj_ids))

    def with_obj(self, obj: Obj) -> Scene:
        return dataclasses.replace(self, objects=self.objects + (obj,))

    def next_id(self) -> int:
        return max((o.id for o in self.objects), default=-1) + 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Splits: which (kind, color) pairs a split may draw.


class ColorPolicy:
    """Chooses object colors for a split.

    Training never draws a held-out (kind, color) pair; evaluation draws one whenever the kind
    has a held-out color, with probability ``heldout_rate``.
    """

    def __init__(self, split: str, heldout_rate: float = 0.5):
        if split not in ("train", "eval"):
            raise ValueError(f"unknown split {split!r}: expected 'train' or 'eval'")
        self.split = split
        self.heldout_rate = heldout_rate

    def allowed(self, kind: str, color: str) -> bool:
        return self.split == "eval" or (kind, color) not in vocab.HELDOUT_COMBOS

    def choose(self, rng: np.random.Generator, kind: str, exclude: tuple[str, ...] = ()) -> str | None:
        palette = vocab.FACE_COLORS if kind == "face" else tuple(vocab.COLORS)
        options = [c for c in palette if c not in exclude and self.allowed(kind, c)]
        if not options:
            return None
        if self.split == "eval":
            held = [c for c in options if (kind, c) in vocab.HELDOUT_COMBOS]
            if held and rng.random() < self.heldout_rate:
                return str(rng.choice(held))
        return str(rng.choice(options))


# ---------------------------------------------------------------------------------------------
# Random scenes.


def sample_background(rng: np.random.Generator, exclude: tuple[str, ...] = ()) -> Background:
    colors = [c for c in vocab.COLORS if c not in exclude]
    c1, c2 = (str(c) for c in rng.choice(colors, size=2, replace=False))
    kind = str(rng.choice(vocab.BACKGROUND_KINDS, p=[0.5, 0.2, 0.1, 0.1, 0.1]))
    if kind == "solid":
        c2 = c1
    return Background(kind=kind, color=c1, color2=c2, direction=str(rng.choice(["vertical", "horizontal"])))


def background_colors(bg: Background) -> tuple[str, ...]:
    return (bg.color,) if bg.kind == "solid" else (bg.color, bg.color2)


def make_object(rng: np.random.Generator, policy: ColorPolicy, obj_id: int, kind: str, x: float, y: float,
                size: float, exclude_colors: tuple[str, ...] = ()) -> Obj | None:
    """An object of ``kind`` with a color allowed in the split and random kind-specific features."""
    color = policy.choose(rng, kind, exclude_colors)
    if color is None:
        return None
    if kind in vocab.SHAPES:
        material = str(rng.choice(vocab.MATERIALS, p=[0.55, 0.15, 0.15, 0.15]))
        rotation = float(rng.choice([0.0, 0.0, 0.0, 45.0, 90.0, 180.0, 270.0])) if kind != "circle" else 0.0
        return Obj(obj_id, kind, color, x, y, size, rotation=rotation, material=material)
    if kind == "sign":
        text = str(rng.choice(vocab.GLYPHS)) if rng.random() < 0.6 else str(rng.choice(vocab.WORDS2))
        return Obj(obj_id, kind, color, x, y, size, text=text)
    return Obj(obj_id, kind, color, x, y, size, expression=str(rng.choice(vocab.FACE_EXPRESSIONS)),
               eyes="open" if rng.random() < 0.8 else "closed", glasses=bool(rng.random() < 0.3),
               blush=bool(rng.random() < 0.3))


def free_spot(rng: np.random.Generator, objects: tuple[Obj, ...] | list[Obj], size: float,
              gap: float = 0.9, tries: int = 60) -> tuple[float, float] | None:
    """A random center where a ``size`` object overlaps no existing object (beyond ``gap``)."""
    lo, hi = size + 0.02, 1.0 - size - 0.02
    for _ in range(tries):
        x, y = rng.uniform(lo, hi, size=2)
        if all(np.hypot(x - o.x, y - o.y) >= gap * (size + o.size) for o in objects):
            return float(x), float(y)
    return None


def sample_scene(rng: np.random.Generator, policy: ColorPolicy, n_objects: tuple[int, int] = (2, 4),
                 kinds: tuple[str, ...] = vocab.SHAPES, size_range: tuple[float, float] = SIZE_RANGE,
                 background: Background | None = None, tone_rate: float = 0.2) -> Scene:
    """A random scene with ``n_objects`` (inclusive range) non-overlapping objects of ``kinds``."""
    bg = background or sample_background(rng)
    n = int(rng.integers(n_objects[0], n_objects[1] + 1))
    objects: list[Obj] = []
    for i in range(n):
        size = float(rng.uniform(*size_range))
        spot = free_spot(rng, objects, size)
        if spot is None:
            break
        obj = make_object(rng, policy, i, str(rng.choice(kinds)), spot[0], spot[1], size, background_colors(bg))
        if obj is not None:
            objects.append(obj)
    tone = "neutral" if rng.random() >= tone_rate else str(rng.choice(vocab.TONES[1:]))
    return Scene(background=bg, objects=tuple(objects), tone=tone)


# ---------------------------------------------------------------------------------------------
# Describing scenes and objects.


def region_of(x: float, y: float, margin: float = _REGION_MARGIN) -> str | None:
    """The 3x3 region holding (x, y), or None when within ``margin`` of a region boundary."""
    def band(v: float) -> int | None:
        lo, hi = _REGION_EDGES
        if min(abs(v - lo), abs(v - hi)) < margin:
            return None
        return 0 if v < lo else (2 if v > hi else 1)

    col, row = band(x), band(y)
    if col is None or row is None:
        return None
    return vocab.REGIONS[row * 3 + col]


_REF_CANDIDATES: tuple[tuple[str, ...], ...] = (
    ("kind",), ("color", "kind"), ("material", "kind"), ("position", "kind"), ("size", "kind"),
    ("color", "material", "kind"), ("color", "position", "kind"), ("material", "position", "kind"),
    ("color", "size", "kind"),
)


def _matches(o: Obj, t: Obj, attrs: tuple[str, ...]) -> bool:
    for a in attrs:
        if a == "kind" and o.kind != t.kind:
            return False
        if a == "color" and o.color != t.color:
            return False
        if a == "material" and o.material != t.material:
            return False
    return True


def refer(scene: Scene, obj_id: int, rng: np.random.Generator, extra_rate: float = 0.3) -> dict | None:
    """A referring expression for one object, as attributes that single it out in ``scene``.

    Returns a dict with "kind" and some of "color", "material", "position" (a region name) and
    "size" ("largest"/"smallest" among the objects matching the other attributes), or None when no
    candidate is unique. Shorter descriptions are preferred; sometimes a redundant attribute is
    added, as people do.
    """
    t = scene.get(obj_id)
    cands = list(_REF_CANDIDATES)
    order = rng.permutation(len(cands))
    cands = sorted((cands[i] for i in order), key=len)  # random among equal lengths
    for attrs in cands:
        base = tuple(a for a in attrs if a not in ("position", "size"))
        others = [o for o in scene.objects if o.id != t.id and _matches(o, t, base)]
        ref: dict = {"kind": t.kind}
        if "position" in attrs:
            region = region_of(t.x, t.y)
            if region is None or any(region_of(o.x, o.y, 0.0) == region for o in others):
                continue
            ref["position"] = region
        elif "size" in attrs:
            if not others:
                continue
            if all(t.size >= 1.25 * o.size for o in others):
                ref["size"] = "largest"
            elif all(o.size >= 1.25 * t.size for o in others):
                ref["size"] = "smallest"
            else:
                continue
        elif others:
            continue
        for a in base:
            if a != "kind":
                ref[a] = getattr(t, a)
        # Redundant but natural extra attribute, e.g. "the red circle" when "the circle" suffices.
        if rng.random() < extra_rate:
            extra = [a for a in ("color", "material") if a not in ref and (a != "material" or t.kind in vocab.SHAPES)]
            if extra:
                a = str(rng.choice(extra))
                ref[a] = getattr(t, a)
        return ref
    return None


def describe_object(o: Obj) -> str:
    """Canonical (synonym-free) noun phrase, e.g. "a red striped star"."""
    words = [o.color]
    if o.kind in vocab.SHAPES and o.material != "solid":
        words.append(o.material)
    words.append(o.kind)
    phrase = " ".join(words)
    if o.kind == "sign" and o.text:
        phrase += f" reading {o.text}"
    if o.kind == "face":
        phrase += {"smile": " smiling", "frown": " frowning", "surprised": " looking surprised", "neutral": ""}[
            o.expression]
        if o.glasses:
            phrase += " with glasses"
    article = "an" if phrase[0] in "aeiou" else "a"
    return f"{article} {phrase}"


def describe_background(bg: Background) -> str:
    if bg.kind == "solid":
        return f"a {bg.color} background"
    if bg.kind == "gradient":
        return f"a {bg.color} to {bg.color2} gradient background"
    noun = {"stripes": "striped", "checker": "checkered", "dots": "polka-dot"}[bg.kind]
    return f"a {bg.color} and {bg.color2} {noun} background"


def describe_scene(scene: Scene) -> str:
    """A canonical caption, e.g. "a red circle and a blue square on a white background"."""
    objs = [describe_object(o) for o in scene.objects]
    if not objs:
        text = "an empty scene"
    elif len(objs) == 1:
        text = objs[0]
    else:
        text = ", ".join(objs[:-1]) + " and " + objs[-1]
    text += " on " + describe_background(scene.background)
    if scene.style != "flat":
        text += ", " + vocab.STYLE_WORDS[scene.style][0]
    if scene.tone != "neutral":
        text += ", " + vocab.TONE_WORDS[scene.tone][0]
    return text
