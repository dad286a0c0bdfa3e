"""The exact scene operation behind every editing task.

Each operation draws a source scene suited to it, applies one edit, and returns a ``SceneEdit``:
both scenes, which part of the image the edit may touch (``region``), which objects it touched,
and ``slots``: the facts an instruction must state (JSON-able, read by ``templates``). An
operation returns None when the random scene does not allow the edit (no unique description,
no free space, ...); the caller then retries with a fresh random stream.

``OPS`` maps every task name of ``x2edit.tasks`` to its operations and their weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from x2edit.data_pipeline.shapeworld import vocab
from x2edit.data_pipeline.shapeworld.scene import (
    LARGE_RANGE,
    SMALL_RANGE,
    Background,
    Camera,
    ColorPolicy,
    Obj,
    Scene,
    background_colors,
    free_spot,
    make_object,
    refer,
    sample_background,
    sample_scene,
)
from x2edit.tasks import TASK_NAMES


@dataclass
class SceneEdit:
    """One edit, before rendering.

    Args:
        task: task name (``x2edit.tasks``).
        op: operation name (templates are keyed by it).
        source, target: the scenes before and after.
        region: what may change: "objects" (the ``touched`` objects' footprints), "background"
            (where background shows) or "image" (anything).
        touched: ids of the objects the edit changed, added or removed.
        slots: what the instruction states, JSON-able.
        source_mode: how the source image is rendered ("image", "edge_map", "depth_map").
        degrade: a degradation applied to the rendered source ("blur", "noise", "lowres") or None.
    """

    task: str
    op: str
    source: Scene
    target: Scene
    region: str
    touched: tuple[int, ...] = ()
    slots: dict = field(default_factory=dict)
    source_mode: str = "image"
    degrade: str | None = None


Op = Callable[[np.random.Generator, ColorPolicy], "SceneEdit | None"]

_MIXED = vocab.SHAPES + ("sign", "face")


def _kinds(rng: np.random.Generator) -> tuple[str, ...]:
    """Mostly plain shapes; sometimes signs and faces join."""
    return _MIXED if rng.random() < 0.2 else vocab.SHAPES


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _new_object_spec(rng: np.random.Generator, policy: ColorPolicy, exclude: tuple[str, ...],
                     kinds: tuple[str, ...] = vocab.SHAPES) -> dict | None:
    """A described new object: kind, color, material and an optional size class."""
    kind = str(_pick(rng, kinds))
    color = policy.choose(rng, kind, exclude)
    if color is None:
        return None
    spec = {"kind": kind, "color": color, "material": "solid"}
    if kind in vocab.SHAPES and rng.random() < 0.35:
        spec["material"] = str(_pick(rng, vocab.MATERIALS[1:]))
    u = rng.random()
    if u < 0.3:
        spec["size"] = "small"
    elif u < 0.6:
        spec["size"] = "large"
    return spec


def _size_for(rng: np.random.Generator, spec: dict) -> float:
    rng_range = {"small": SMALL_RANGE, "large": LARGE_RANGE}.get(spec.get("size"), (0.105, 0.14))
    return float(rng.uniform(*rng_range))


def _obj_from_spec(spec: dict, obj_id: int, x: float, y: float, size: float) -> Obj:
    return Obj(obj_id, spec["kind"], spec["color"], x, y, size, material=spec["material"])


def _force(scene: Scene, rng: np.random.Generator, policy: ColorPolicy, obj_id: int, **changes) -> Scene | None:
    """Change an object's attributes, re-choosing its color if the split forbids the new pairing."""
    o = dataclasses.replace(scene.get(obj_id), **changes)
    if not policy.allowed(o.kind, o.color) or (o.kind == "face" and o.color not in vocab.FACE_COLORS):
        color = policy.choose(rng, o.kind, background_colors(scene.background))
        if color is None:
            return None
        o = dataclasses.replace(o, color=color)
    return dataclasses.replace(scene, objects=tuple(o if x.id == obj_id else x for x in scene.objects))


def _target_and_ref(rng: np.random.Generator, scene: Scene, candidates=None) -> tuple[Obj, dict] | None:
    objs = [o for o in scene.objects if candidates is None or candidates(o)]
    if not objs:
        return None
    t = objs[int(rng.integers(len(objs)))]
    ref = refer(scene, t.id, rng)
    return (t, ref) if ref is not None else None


# ---------------------------------------------------------------------------------------------
# subject_deletion, subject_addition, subject_replacement


def op_delete(rng, policy):
    scene = sample_scene(rng, policy, (2, 5), kinds=_kinds(rng))
    got = _target_and_ref(rng, scene)
    if got is None:
        return None
    t, ref = got
    return SceneEdit("subject_deletion", "delete", scene, scene.without(t.id), "objects", (t.id,), {"obj": ref})


def op_add(rng, policy):
    scene = sample_scene(rng, policy, (1, 4), kinds=_kinds(rng))
    spec = _new_object_spec(rng, policy, background_colors(scene.background))
    if spec is None:
        return None
    size = _size_for(rng, spec)
    regions = list(vocab.REGIONS)
    rng.shuffle(regions)
    for region in regions:
        cx, cy = vocab.REGION_CENTERS[region]
        x, y = cx + rng.uniform(-0.04, 0.04), cy + rng.uniform(-0.04, 0.04)
        if all(np.hypot(x - o.x, y - o.y) >= 0.95 * (size + o.size) for o in scene.objects):
            new = _obj_from_spec(spec, scene.next_id(), float(x), float(y), size)
            return SceneEdit("subject_addition", "add", scene, scene.with_obj(new), "objects", (new.id,),
                             {"new": spec, "pos": region})
    return None


_REL_DIRS = {"left": (-1, 0), "right": (1, 0), "above": (0, -1), "below": (0, 1)}


def op_add_relative(rng, policy):
    scene = sample_scene(rng, policy, (1, 3), kinds=_kinds(rng))
    got = _target_and_ref(rng, scene)
    spec = _new_object_spec(rng, policy, background_colors(scene.background))
    if got is None or spec is None:
        return None
    anchor, ref = got
    size = _size_for(rng, spec)
    relation = str(_pick(rng, list(_REL_DIRS)))
    dx, dy = _REL_DIRS[relation]
    dist = anchor.size + size + 0.03
    x, y = anchor.x + dx * dist, anchor.y + dy * dist
    if not (size + 0.01 <= x <= 1 - size - 0.01 and size + 0.01 <= y <= 1 - size - 0.01):
        return None
    if any(np.hypot(x - o.x, y - o.y) < 0.95 * (size + o.size) for o in scene.objects if o.id != anchor.id):
        return None
    new = _obj_from_spec(spec, scene.next_id(), float(x), float(y), size)
    return SceneEdit("subject_addition", "add_relative", scene, scene.with_obj(new), "objects", (new.id,),
                     {"new": spec, "relation": relation, "anchor": ref})


def op_reshape(rng, policy):
    scene = sample_scene(rng, policy, (2, 4), kinds=_kinds(rng))
    got = _target_and_ref(rng, scene)
    if got is None:
        return None
    t, ref = got
    kinds = [k for k in vocab.SHAPES if k != t.kind and policy.allowed(k, t.color)]
    kind = str(_pick(rng, kinds))
    material = t.material if t.kind in vocab.SHAPES else "solid"
    target = scene.replace_obj(t.id, kind=kind, material=material, rotation=0.0, mirror=False)
    return SceneEdit("subject_replacement", "reshape", scene, target, "objects", (t.id,), {"obj": ref, "kind": kind})


def op_replace(rng, policy):
    scene = sample_scene(rng, policy, (2, 4), kinds=_kinds(rng))
    got = _target_and_ref(rng, scene)
    if got is None:
        return None
    t, ref = got
    spec = _new_object_spec(rng, policy, background_colors(scene.background) + (t.color,))
    if spec is None or spec["kind"] == t.kind:
        return None
    spec.pop("size", None)  # the replacement takes the replaced object's size
    target = scene.replace_obj(t.id, kind=spec["kind"], color=spec["color"], material=spec["material"],
                               rotation=0.0, mirror=False)
    return SceneEdit("subject_replacement", "replace", scene, target, "objects", (t.id,), {"obj": ref, "new": spec})


# ---------------------------------------------------------------------------------------------
# color_change, material_change, action_change


def op_recolor(rng, policy):
    scene = sample_scene(rng, policy, (2, 4), kinds=_kinds(rng))
    got = _target_and_ref(rng, scene)
    if got is None:
        return None
    t, ref = got
    color = policy.choose(rng, t.kind, background_colors(scene.background) + (t.color,))
    if color is None:
        return None
    return SceneEdit("color_change", "recolor", scene, scene.replace_obj(t.id, color=color), "objects", (t.id,),
                     {"obj": ref, "color": color})


def op_rematerial(rng, policy):
    scene = sample_scene(rng, policy, (2, 4), size_range=(0.1, 0.17))
    got = _target_and_ref(rng, scene)
    if got is None:
        return None
    t, ref = got
    material = str(_pick(rng, [m for m in vocab.MATERIALS if m != t.material]))
    op = "make_plain" if material == "solid" else "rematerial"
    return SceneEdit("material_change", op, scene, scene.replace_obj(t.id, material=material), "objects", (t.id,),
                     {"obj": ref, "material": material})


def op_rotate(rng, policy):
    scene = sample_scene(rng, policy, (2, 4), size_range=(0.1, 0.17))
    got = _target_and_ref(rng, scene, lambda o: o.kind != "circle")
    if got is None:
        return None
    t, ref = got
    angle = int(_pick(rng, [45, 90, 180]))
    direction = "" if angle == 180 else str(_pick(rng, ["clockwise", "counterclockwise"]))
    delta = -angle if direction == "clockwise" else angle
    target = scene.replace_obj(t.id, rotation=(t.rotation + delta) % 360.0)
    return SceneEdit("action_change", "rotate", scene, target, "objects", (t.id,),
                     {"obj": ref, "angle": angle, "direction": direction})


def op_flip(rng, policy):
    scene = sample_scene(rng, policy, (2, 4), size_range=(0.1, 0.17))
    got = _target_and_ref(rng, scene, lambda o: o.kind in ("triangle", "heart", "arrow", "star", "diamond"))
    if got is None:
        return None
    t, ref = got
    axis = str(_pick(rng, ["horizontal", "vertical"]))
    # Mirroring on screen: horizontal = R(-a) M, vertical = R(180 - a) M, for a shape drawn R(a) M^m.
    rotation = (-t.rotation if axis == "horizontal" else 180.0 - t.rotation) % 360.0
    target = scene.replace_obj(t.id, rotation=rotation, mirror=not t.mirror)
    return SceneEdit("action_change", "flip", scene, target, "objects", (t.id,), {"obj": ref, "axis": axis})


_POINT_ANGLES = {"right": 0.0, "up": 90.0, "left": 180.0, "down": 270.0}


def op_point(rng, policy):
    scene = sample_scene(rng, policy, (1, 3), size_range=(0.11, 0.17))
    if not scene.objects:
        return None
    scene = _force(scene, rng, policy, scene.objects[0].id, kind="arrow", material="solid")
    if scene is None:
        return None
    t = scene.objects[0]
    ref = refer(scene, t.id, rng)
    if ref is None:
        return None
    facing = (t.rotation + (180.0 if t.mirror else 0.0)) % 360.0
    direction = str(_pick(rng, [d for d, a in _POINT_ANGLES.items() if abs(a - facing) > 1]))
    rotation = (_POINT_ANGLES[direction] - (180.0 if t.mirror else 0.0)) % 360.0
    return SceneEdit("action_change", "point", scene, scene.replace_obj(t.id, rotation=rotation), "objects",
                     (t.id,), {"obj": ref, "direction": direction})


# ---------------------------------------------------------------------------------------------
# style_change, background_change, tone_transform, camera_move


def op_restyle(rng, policy):
    scene = sample_scene(rng, policy, (2, 4), kinds=_kinds(rng), tone_rate=0.0)
    old = "flat" if rng.random() < 0.75 else str(_pick(rng, vocab.STYLES[1:]))
    new = str(_pick(rng, [s for s in vocab.STYLES if s != old]))
    return SceneEdit("style_change", "restyle", dataclasses.replace(scene, style=old),
                     dataclasses.replace(scene, style=new), "image", (), {"style": new, "old_style": old})


def op_rebackground(rng, policy):
    scene = sample_scene(rng, policy, (1, 4), kinds=_kinds(rng))
    used = tuple(o.color for o in scene.objects)
    bg = sample_background(rng, exclude=used)
    if bg == scene.background:
        return None
    return SceneEdit("background_change", "rebackground", scene, dataclasses.replace(scene, background=bg),
                     "background", (), {"bg": dataclasses.asdict(bg)})


def op_retone(rng, policy):
    scene = sample_scene(rng, policy, (2, 4), kinds=_kinds(rng), tone_rate=0.0)
    old = "neutral" if rng.random() < 0.75 else str(_pick(rng, vocab.TONES[1:]))
    new = str(_pick(rng, [t for t in vocab.TONES if t != old]))
    return SceneEdit("tone_transform", "retone", dataclasses.replace(scene, tone=old),
                     dataclasses.replace(scene, tone=new), "image", (), {"tone": new, "old_tone": old})


def op_zoom(rng, policy):
    scene = sample_scene(rng, policy, (2, 4), kinds=_kinds(rng))
    factor = float(_pick(rng, [1.5, 2.0]))
    zoom_in = bool(rng.random() < 0.5)
    cam = Camera(zoom=factor if zoom_in else 1.0 / factor)
    return SceneEdit("camera_move", "zoom_in" if zoom_in else "zoom_out", scene,
                     dataclasses.replace(scene, camera=cam), "image", (), {"factor": factor})


_PAN = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def op_pan(rng, policy):
    scene = sample_scene(rng, policy, (2, 4), kinds=_kinds(rng))
    direction = str(_pick(rng, list(_PAN)))
    dx, dy = _PAN[direction]
    d = 0.25
    cam = Camera(cx=0.5 + dx * d, cy=0.5 + dy * d)
    return SceneEdit("camera_move", "pan", scene, dataclasses.replace(scene, camera=cam), "image", (),
                     {"direction": direction})


def op_zoom_on(rng, policy):
    scene = sample_scene(rng, policy, (2, 4), kinds=_kinds(rng))
    got = _target_and_ref(rng, scene)
    if got is None:
        return None
    t, ref = got
    cam = Camera(cx=t.x, cy=t.y, zoom=2.0)
    return SceneEdit("camera_move", "zoom_on", scene, dataclasses.replace(scene, camera=cam), "image", (),
                     {"obj": ref, "factor": 2.0})


# ---------------------------------------------------------------------------------------------
# portrait_retouch, text_change: one large face or sign, a few small shapes around it.


def _feature_scene(rng, policy, kind: str) -> tuple[Scene, Obj] | None:
    bg = sample_background(rng)
    size = float(rng.uniform(0.24, 0.32))
    x, y = (float(v) for v in rng.uniform(0.38, 0.62, size=2))
    main = make_object(rng, policy, 0, kind, x, y, size, background_colors(bg))
    if main is None:
        return None
    objects = [main]
    for i in range(int(rng.integers(0, 3))):
        s = float(rng.uniform(0.07, 0.1))
        spot = free_spot(rng, objects, s, gap=1.0)
        if spot is not None:
            extra = make_object(rng, policy, i + 1, str(_pick(rng, vocab.SHAPES)), *spot, s, background_colors(bg))
            if extra is not None:
                objects.append(extra)
    return Scene(background=bg, objects=tuple(objects)), main


def op_face(rng, policy):
    got = _feature_scene(rng, policy, "face")
    if got is None:
        return None
    scene, face = got
    ref = refer(scene, face.id, rng)
    if ref is None:
        return None
    which = str(_pick(rng, ["expression", "expression", "eyes", "glasses", "blush"]))
    if which == "expression":
        value = str(_pick(rng, [e for e in vocab.FACE_EXPRESSIONS if e != face.expression]))
        return SceneEdit("portrait_retouch", "expression", scene, scene.replace_obj(face.id, expression=value),
                         "objects", (face.id,), {"obj": ref, "expression": value})
    if which == "eyes":
        value = "closed" if face.eyes == "open" else "open"
        op = "close_eyes" if value == "closed" else "open_eyes"
        return SceneEdit("portrait_retouch", op, scene, scene.replace_obj(face.id, eyes=value), "objects",
                         (face.id,), {"obj": ref})
    on = not getattr(face, which)
    op = ("add_" if on else "remove_") + which
    return SceneEdit("portrait_retouch", op, scene, scene.replace_obj(face.id, **{which: on}), "objects",
                     (face.id,), {"obj": ref})


def _text(rng) -> str:
    return str(_pick(rng, vocab.GLYPHS)) if rng.random() < 0.6 else str(_pick(rng, vocab.WORDS2))


def op_text(rng, policy):
    got = _feature_scene(rng, policy, "sign")
    if got is None:
        return None
    scene, sign = got
    u = rng.random()
    if u < 0.2:
        scene = scene.replace_obj(sign.id, text="")
        new, op = _text(rng), "write"
    elif u < 0.35:
        new, op = "", "erase_text"
    else:
        new, op = _text(rng), "retext"
    old = scene.get(sign.id).text
    if new == old:
        return None
    ref = refer(scene, sign.id, rng)
    if ref is None:
        return None
    return SceneEdit("text_change", op, scene, scene.replace_obj(sign.id, text=new), "objects", (sign.id,),
                     {"obj": ref, "text": new, "old_text": old})


# ---------------------------------------------------------------------------------------------
# implicit_change: the edit follows from reasoning over the scene.


def op_swap_largest_colors(rng, policy):
    scene = sample_scene(rng, policy, (3, 4))
    objs = sorted(scene.objects, key=lambda o: -o.size)
    if len(objs) < 3:
        return None
    a, b = objs[0], objs[1]
    # Make "the two largest" unambiguous: everything else clearly smaller.
    for o in objs[2:]:
        scene = scene.replace_obj(o.id, size=min(o.size, b.size / 1.25))
    if a.color == b.color or not (policy.allowed(a.kind, b.color) and policy.allowed(b.kind, a.color)):
        return None
    target = scene.replace_obj(a.id, color=b.color).replace_obj(b.id, color=a.color)
    return SceneEdit("implicit_change", "swap_largest_colors", scene, target, "objects", (a.id, b.id), {})


def op_recolor_all(rng, policy):
    scene = sample_scene(rng, policy, (3, 5))
    if len(scene.objects) < 3:
        return None
    src = scene.objects[0].color
    for o in scene.objects[1:2]:  # make at least two objects share the color
        scene = scene.replace_obj(o.id, color=src)
    same = [o for o in scene.objects if o.color == src]
    if len(same) == len(scene.objects) or not all(policy.allowed(o.kind, o.color) for o in same):
        return None
    new = policy.choose(rng, same[0].kind, background_colors(scene.background) + (src,))
    if new is None or not all(policy.allowed(o.kind, new) for o in same):
        return None
    target = scene
    for o in same:
        target = target.replace_obj(o.id, color=new)
    return SceneEdit("implicit_change", "recolor_all", scene, target, "objects", tuple(o.id for o in same),
                     {"color_from": src, "color": new})


def op_remove_kind(rng, policy):
    scene = sample_scene(rng, policy, (3, 5))
    if len(scene.objects) < 3:
        return None
    kind = scene.objects[0].kind
    scene = _force(scene, rng, policy, scene.objects[1].id, kind=kind)
    if scene is None:
        return None
    gone = [o.id for o in scene.objects if o.kind == kind]
    if len(gone) == len(scene.objects):
        return None
    return SceneEdit("implicit_change", "remove_kind", scene, scene.without(*gone), "objects", tuple(gone),
                     {"kind": kind})


def op_match_color(rng, policy):
    scene = sample_scene(rng, policy, (2, 4))
    if len(scene.objects) < 2:
        return None
    a, b = (scene.objects[i] for i in rng.permutation(len(scene.objects))[:2])
    if a.color == b.color or not policy.allowed(a.kind, b.color):
        return None
    ra, rb = refer(scene, a.id, rng, extra_rate=0.0), refer(scene, b.id, rng, extra_rate=0.0)
    if ra is None or rb is None:
        return None
    return SceneEdit("implicit_change", "match_color", scene, scene.replace_obj(a.id, color=b.color), "objects",
                     (a.id,), {"obj": ra, "obj2": rb})


def op_odd_one_out(rng, policy):
    scene = sample_scene(rng, policy, (3, 4))
    if len(scene.objects) < 3:
        return None
    kind, color = scene.objects[0].kind, scene.objects[0].color
    for o in scene.objects[1:]:
        scene = scene.replace_obj(o.id, kind=kind, color=color, material=scene.objects[0].material)
    odd = scene.objects[int(rng.integers(len(scene.objects)))]
    other = str(_pick(rng, [k for k in vocab.SHAPES if k != kind and policy.allowed(k, color)]))
    scene = scene.replace_obj(odd.id, kind=other)
    return SceneEdit("implicit_change", "odd_one_out", scene, scene.without(odd.id), "objects", (odd.id,), {})


def op_grow_smallest(rng, policy):
    scene = sample_scene(rng, policy, (3, 4), size_range=(0.09, 0.15))
    objs = sorted(scene.objects, key=lambda o: o.size)
    if len(objs) < 3:
        return None
    small, big = objs[0], objs[-1]
    # Make "the smallest" unambiguous: clearly smaller than the next one.
    scene = scene.replace_obj(small.id, size=min(small.size, objs[1].size / 1.35))
    if not (big.size <= small.x <= 1 - big.size and big.size <= small.y <= 1 - big.size):
        return None
    return SceneEdit("implicit_change", "grow_smallest", scene, scene.replace_obj(small.id, size=big.size),
                     "objects", (small.id,), {})


# ---------------------------------------------------------------------------------------------
# low_level: restore or synthesize the scene from a degraded or abstract rendering of it.


def _low_level(op: str, source_mode: str = "image", degrade: str | None = None) -> Op:
    def run(rng, policy):
        scene = sample_scene(rng, policy, (2, 4), kinds=_kinds(rng), tone_rate=0.0)
        return SceneEdit("low_level", op, scene, scene, "image", (), {}, source_mode=source_mode, degrade=degrade)

    run.__name__ = f"op_{op}"
    return run


# ---------------------------------------------------------------------------------------------
# subject_driven: the subject alone, then the same subject in a described new scene.


def op_recontext(rng, policy):
    kind = str(_pick(rng, _MIXED if rng.random() < 0.15 else vocab.SHAPES))
    plain = Background("solid", "white", "white") if rng.random() < 0.5 else Background("solid", "gray", "gray")
    subject = make_object(rng, policy, 0, kind, 0.5, 0.5, 0.3, background_colors(plain))
    if subject is None:
        return None
    subject = dataclasses.replace(subject, rotation=0.0, mirror=False)
    source = Scene(background=plain, objects=(subject,))
    bg = sample_background(rng, exclude=(subject.color,))
    pos = str(_pick(rng, vocab.REGIONS))
    cx, cy = vocab.REGION_CENTERS[pos]
    size = float(rng.uniform(0.12, 0.16))
    placed = dataclasses.replace(subject, x=cx + float(rng.uniform(-0.03, 0.03)),
                                 y=cy + float(rng.uniform(-0.03, 0.03)), size=size)
    objects = [placed]
    slots: dict = {"subject": {"kind": kind, "color": subject.color, "material": subject.material},
                   "bg": dataclasses.asdict(bg), "pos": pos}
    if rng.random() < 0.5:
        spec = _new_object_spec(rng, policy, background_colors(bg) + (subject.color,))
        free = [r for r in vocab.REGIONS if r != pos and np.hypot(
            vocab.REGION_CENTERS[r][0] - cx, vocab.REGION_CENTERS[r][1] - cy) > 0.35]
        if spec is not None:
            cpos = str(_pick(rng, free))
            ccx, ccy = vocab.REGION_CENTERS[cpos]
            objects.append(_obj_from_spec(spec, 1, ccx, ccy, min(_size_for(rng, spec), 0.13)))
            slots["companion"] = spec
            slots["companion_pos"] = cpos
    target = Scene(background=bg, objects=tuple(objects))
    return SceneEdit("subject_driven", "recontext", source, target, "image", (), slots)


# task -> ((operation, weight), ...)
OPS: dict[str, tuple[tuple[Op, float], ...]] = {
    "subject_deletion": ((op_delete, 1.0),),
    "subject_addition": ((op_add, 0.6), (op_add_relative, 0.4)),
    "style_change": ((op_restyle, 1.0),),
    "background_change": ((op_rebackground, 1.0),),
    "color_change": ((op_recolor, 1.0),),
    "material_change": ((op_rematerial, 1.0),),
    "action_change": ((op_rotate, 0.45), (op_flip, 0.3), (op_point, 0.25)),
    "subject_replacement": ((op_reshape, 0.5), (op_replace, 0.5)),
    "portrait_retouch": ((op_face, 1.0),),
    "text_change": ((op_text, 1.0),),
    "tone_transform": ((op_retone, 1.0),),
    "camera_move": ((op_zoom, 0.5), (op_pan, 0.3), (op_zoom_on, 0.2)),
    "implicit_change": ((op_swap_largest_colors, 1.0), (op_recolor_all, 1.0), (op_remove_kind, 1.0),
                        (op_match_color, 1.0), (op_odd_one_out, 1.0), (op_grow_smallest, 1.0)),
    "low_level": ((_low_level("deblur", degrade="blur"), 1.0), (_low_level("denoise", degrade="noise"), 1.0),
                  (_low_level("upscale", degrade="lowres"), 1.0), (_low_level("edges_to_image", "edge_map"), 1.0),
                  (_low_level("depth_to_image", "depth_map"), 1.0)),
    "subject_driven": ((op_recontext, 1.0),),
}

assert set(OPS) == set(TASK_NAMES), "every task of x2edit.tasks needs a Shape World operation"


def choose_op(rng: np.random.Generator, task: str) -> Op:
    ops = OPS[task]
    w = np.array([w for _, w in ops])
    return ops[int(rng.choice(len(ops), p=w / w.sum()))][0]
