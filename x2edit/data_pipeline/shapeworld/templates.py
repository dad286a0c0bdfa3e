"""Instruction templates: many phrasings per operation, synonyms for every attribute.

``TEMPLATES[op] = (train templates, eval-only templates)``. Training instructions use only the
first group; evaluation instructions use the held-out group half of the time, so evaluation
also measures phrasings never seen in training. Placeholders are filled by ``_fields`` with a
random synonym of each attribute (see ``vocab``).
"""

from __future__ import annotations

import string

import numpy as np

from x2edit.data_pipeline.shapeworld import vocab
from x2edit.data_pipeline.shapeworld.ops import OPS, SceneEdit

T = tuple[str, ...]
TEMPLATES: dict[str, tuple[T, T]] = {
    # -- subject_deletion
    "delete": ((
        "remove {obj}", "delete {obj}", "erase {obj}", "get rid of {obj}", "take away {obj}",
        "take {obj} out of the picture", "make {obj} disappear", "remove {obj} from the image",
        "wipe out {obj}", "clear {obj} away", "I don't want {obj} in the picture", "cut {obj} out of the scene",
        "drop {obj} from the scene",
    ), ("lose {obj}", "could you eliminate {obj}?", "the picture would be better without {obj}")),
    # -- subject_addition
    "add": ((
        "add {new} {pos}", "put {new} {pos}", "place {new} {pos}", "insert {new} {pos}", "draw {new} {pos}",
        "{pos}, add {new}", "include {new} {pos}", "there should be {new} {pos}", "paint {new} {pos}",
        "drop {new} {pos}", "stick {new} {pos}",
    ), ("I'd like {new} {pos}", "make room for {new} {pos}")),
    "add_relative": ((
        "add {new} {relation} {anchor}", "put {new} {relation} {anchor}", "place {new} {relation} {anchor}",
        "draw {new} {relation} {anchor}", "insert {new} {relation} {anchor}", "{relation} {anchor}, add {new}",
    ), ("I want {new} {relation} {anchor}", "set {new} down {relation} {anchor}")),
    # -- style_change
    "restyle": ((
        "make it look like {style}", "turn the image into {style}", "render this as {style}",
        "convert the picture to {style}", "redraw everything as {style}", "change the style to {style}",
        "give the image the look of {style}", "restyle the scene as {style}", "show this as {style}",
        "transform it into {style}", "recreate the picture as {style}",
    ), ("what would this look like as {style}?", "reimagine the image as {style}")),
    # -- background_change
    "rebackground": ((
        "change the background to {bg}", "replace the background with {bg}", "make the background {bg}",
        "swap the backdrop for {bg}", "use {bg} behind the shapes", "put the objects on {bg}",
        "set everything against {bg}", "switch the background to {bg}", "the background should be {bg}",
        "redo the background as {bg}", "give the scene {bg} as its backdrop",
    ), ("what if the backdrop were {bg}?", "I'd prefer {bg} in the background")),
    # -- color_change
    "recolor": ((
        "make {obj} {color}", "change the color of {obj} to {color}", "paint {obj} {color}", "turn {obj} {color}",
        "recolor {obj} {color}", "color {obj} {color}", "give {obj} a {color} color", "{obj} should be {color}",
        "switch {obj} to {color}", "change {obj} to {color}", "dye {obj} {color}", "repaint {obj} in {color}",
    ), ("I want {obj} in {color}", "could {obj} be {color} instead?")),
    # -- material_change
    "rematerial": ((
        "make {obj} {material}", "give {obj} {material_noun}", "change {obj} to have {material_noun}",
        "fill {obj} with {material_noun}", "switch the texture of {obj} to {material_noun}",
        "change the pattern of {obj} to {material_noun}", "{obj} should be {material}",
        "turn {obj} into a {material} one", "decorate {obj} with {material_noun}", "use {material_noun} on {obj}",
        "apply {material_noun} to {obj}",
    ), ("what would {obj} look like with {material_noun}?", "I'd like {obj} to have {material_noun}")),
    "make_plain": ((
        "remove the pattern from {obj}", "make {obj} plain", "make {obj} one solid color",
        "get rid of the texture on {obj}", "fill {obj} with a single flat color", "clear the pattern off {obj}",
        "give {obj} a plain fill", "make {obj} {material}",
    ), ("strip {obj} of its pattern",)),
    # -- action_change
    "rotate": ((
        "rotate {obj} {angle}{direction}", "turn {obj} {angle}{direction}", "spin {obj} {angle}{direction}",
        "rotate {obj} by {angle}{direction}", "twist {obj} {angle}{direction}",
        "{obj} should be rotated {angle}{direction}", "swivel {obj} {angle}{direction}",
        "turn {obj} around by {angle}{direction}",
    ), ("could you pivot {obj} {angle}{direction}?", "have {obj} rotate {angle}{direction}")),
    "flip": ((
        "flip {obj} {axis}", "mirror {obj} {axis}", "reflect {obj} {axis}", "flip {obj} over {axis}",
        "make {obj} flipped {axis}", "turn {obj} into its mirror image, {axis}",
    ), ("show {obj} mirrored {axis}",)),
    "point": ((
        "make {obj} point {dir}", "turn {obj} so it points {dir}", "have {obj} face {dir}", "point {obj} {dir}",
        "aim {obj} {dir}", "rotate {obj} to point {dir}",
    ), ("{obj} should be pointing {dir}",)),
    # -- subject_replacement
    "reshape": ((
        "turn {obj} into {kind_a}", "replace {obj} with {kind_a} of the same color", "change {obj} into {kind_a}",
        "make {obj} {kind_a} instead", "swap {obj} for {kind_a}", "transform {obj} into {kind_a}",
        "reshape {obj} into {kind_a}", "{obj} should become {kind_a}",
    ), ("morph {obj} into {kind_a}", "what if {obj} were {kind_a}?")),
    "replace": ((
        "replace {obj} with {new}", "swap {obj} for {new}", "exchange {obj} for {new}", "put {new} where {obj} is",
        "substitute {new} for {obj}", "change {obj} into {new}",
    ), ("trade {obj} for {new}",)),
    # -- portrait_retouch
    "expression": ((
        "make {obj} {expr}", "have {obj} {expr}", "get {obj} to {expr}", "let {obj} {expr}", "{obj} should {expr}",
        "edit {obj} so that it seems to {expr}",
    ), ("can {obj} {expr}?",)),
    "close_eyes": ((
        "close the eyes of {obj}", "make {obj} close its eyes", "have {obj} shut its eyes", "shut the eyes of {obj}",
    ), ("let {obj} close its eyes",)),
    "open_eyes": ((
        "open the eyes of {obj}", "make {obj} open its eyes", "have {obj} look with open eyes", "wake {obj} up",
    ), ("let {obj} open its eyes",)),
    "add_glasses": ((
        "put glasses on {obj}", "give {obj} a pair of glasses", "add spectacles to {obj}", "make {obj} wear glasses",
    ), ("let {obj} wear specs",)),
    "remove_glasses": ((
        "take the glasses off {obj}", "remove the glasses from {obj}", "make {obj} stop wearing glasses",
        "{obj} should not wear glasses",
    ), ("lose the spectacles on {obj}",)),
    "add_blush": ((
        "add rosy cheeks to {obj}", "give {obj} blushing cheeks", "make {obj} blush", "put some blush on {obj}",
    ), ("let {obj} turn red in the cheeks",)),
    "remove_blush": ((
        "remove the blush from {obj}", "get rid of the rosy cheeks on {obj}", "make {obj} stop blushing",
        "clean the blush off {obj}",
    ), ("tone down the cheeks of {obj}",)),
    # -- text_change
    "retext": ((
        "change the text on {obj} to {text}", "make {obj} say {text}", "replace {old_text} with {text} on {obj}",
        "rewrite {obj} so it reads {text}", "{obj} should read {text}", "change {old_text} to {text}",
        "edit {obj} to show {text}", "swap the writing on {obj} for {text}", "put {text} on {obj} instead of {old_text}",
        "relabel {obj} as {text}",
    ), ("I need {obj} to display {text}", "update {obj} to read {text}")),
    "write": ((
        "write {text} on {obj}", "add the text {text} to {obj}", "put {text} on {obj}", "label {obj} with {text}",
        "print {text} on {obj}",
    ), ("inscribe {text} on {obj}",)),
    "erase_text": ((
        "remove the text from {obj}", "erase {old_text} from {obj}", "make {obj} blank",
        "clear the writing off {obj}", "delete the letters on {obj}",
    ), ("wipe {obj} clean",)),
    # -- tone_transform
    "retone": ((
        "give the image {tone}", "apply {tone}", "change the lighting to {tone}", "switch to {tone}",
        "turn the scene into {tone}", "use {tone} for the whole image", "color grade the image with {tone}",
        "add {tone} to the picture", "adjust the colors to {tone}", "re-light the scene with {tone}",
        "change the mood to {tone}",
    ), ("how would it look with {tone}?", "I'd like the whole image in {tone}")),
    # -- camera_move
    "zoom_in": ((
        "zoom in {factor}", "zoom in on the center {factor}", "move the camera closer", "get a closer view",
        "magnify the image {factor}", "crop in {factor}", "push the camera in {factor}",
    ), ("bring the camera in {factor}",)),
    "zoom_out": ((
        "zoom out {factor}", "pull the camera back {factor}", "show a wider view", "move the camera farther away",
        "widen the shot {factor}", "back the camera off {factor}",
    ), ("give me a wider angle {factor}",)),
    "pan": ((
        "pan the camera {dir}", "move the view {dir}", "shift the camera {dir}", "move the camera {dir}",
        "slide the frame {dir}", "pan {dir}",
    ), ("nudge the viewpoint {dir}",)),
    "zoom_on": ((
        "zoom in on {obj}", "focus the camera on {obj}", "get a close-up of {obj}",
        "center the view on {obj} and zoom in", "move in close to {obj}",
    ), ("frame {obj} in a close-up",)),
    # -- implicit_change
    "swap_largest_colors": ((
        "swap the colors of the two largest objects", "exchange the colors of the two biggest shapes",
        "give the two largest shapes each other's colors", "the two biggest objects should trade colors",
        "switch the colors of the two largest items", "trade colors between the two largest shapes",
    ), ("let the two largest things swap colors",)),
    "recolor_all": ((
        "make every {color_from} object {color}", "paint everything that is {color_from} {color}",
        "turn all the {color_from} shapes {color}", "change all {color_from} things to {color}",
        "recolor each {color_from} item {color}",
    ), ("anything {color_from} should become {color}",)),
    "remove_kind": ((
        "remove all the {kinds}", "delete every {kind}", "get rid of all {kinds}", "erase each {kind}",
        "take away all of the {kinds}",
    ), ("clear the scene of {kinds}",)),
    "match_color": ((
        "make {obj} the same color as {obj2}", "paint {obj} to match {obj2}", "give {obj} the color of {obj2}",
        "color {obj} like {obj2}", "{obj} should match the color of {obj2}",
    ), ("copy the color of {obj2} onto {obj}",)),
    "odd_one_out": ((
        "remove the odd one out", "delete the shape that doesn't belong", "take away the object that is different",
        "get rid of the one shape that doesn't match the others", "erase the object that differs from the rest",
    ), ("which one doesn't fit? remove it",)),
    "grow_smallest": ((
        "make the smallest object as big as the largest one", "enlarge the smallest shape to the size of the biggest",
        "scale the tiniest object up to match the largest", "grow the smallest shape until it matches the biggest one",
        "make the smallest item as large as the largest",
    ), ("the smallest shape should be just as big as the biggest",)),
    # -- low_level
    "deblur": ((
        "deblur the image", "sharpen this blurry picture", "remove the blur", "make the image sharp",
        "fix the out-of-focus blur", "restore the sharp details",
    ), ("unblur this",)),
    "denoise": ((
        "remove the noise", "denoise the image", "clean up the grainy picture", "get rid of the static",
        "make the image clean and noise-free",
    ), ("reduce the grain",)),
    "upscale": ((
        "upscale the image", "increase the resolution", "restore the fine details of this low-resolution image",
        "make this blocky image high resolution", "super-resolve the picture",
    ), ("enhance the resolution",)),
    "edges_to_image": ((
        "turn this edge map into a picture", "color in this line drawing", "render the scene from these edges",
        "generate the image from the outlines", "fill this edge map with colors",
    ), ("make a full image out of these contours",)),
    "depth_to_image": ((
        "generate the image from this depth map", "render the scene described by the depth map",
        "turn this depth map into a colored scene", "create a picture matching this depth map",
        "paint the scene from its depth map",
    ), ("produce the colored scene for this depth map",)),
    # -- subject_driven
    "recontext": ((
        "put this {subject} {pos} on {bg}", "place this {subject} {pos}, on {bg}",
        "show this {subject} {pos} against {bg}", "move this {subject} onto {bg}, {pos}",
        "set this {subject} {pos} in front of {bg}", "draw this {subject} again {pos} on {bg}",
        "take this {subject} and put it {pos} on {bg}", "the same {subject}, but {pos} on {bg}",
        "put the {subject} on {bg}, {pos}", "show the {subject} in a new scene: {bg}, with it {pos}",
    ), ("imagine this {subject} {pos} on {bg}", "relocate this {subject} to {bg}, {pos}")),
}


def ops_of_task(task: str) -> tuple[str, ...]:
    """Operation names (template keys) a task's operations can produce."""
    names = {
        "rematerial": ("rematerial", "make_plain"), "zoom": ("zoom_in", "zoom_out"),
        "face": ("expression", "close_eyes", "open_eyes", "add_glasses", "remove_glasses", "add_blush",
                 "remove_blush"),
        "text": ("retext", "write", "erase_text"),
    }
    out: list[str] = []
    for fn, _ in OPS[task]:
        name = fn.__name__.removeprefix("op_")
        out.extend(names.get(name, (name,)))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Phrases.


def _w(rng: np.random.Generator, words) -> str:
    return str(words[int(rng.integers(len(words)))])


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def ref_phrase(ref: dict, rng: np.random.Generator) -> str:
    """ "the red striped circle in the top left", with synonyms and varied word order."""
    kind = _w(rng, vocab.KIND_WORDS[ref["kind"]])
    adjs = []
    if "size" in ref:
        adjs.append(_w(rng, vocab.SIZE_WORDS[ref["size"]]))
    color = _w(rng, vocab.COLOR_WORDS[ref["color"]]) if "color" in ref else None
    material = _w(rng, vocab.MATERIAL_WORDS[ref["material"]]) if "material" in ref else None
    if color and material and rng.random() < 0.25:
        adjs += [material, color]
    else:
        adjs += [a for a in (color, material) if a]
    if color and not material and "size" not in ref and rng.random() < 0.2:
        phrase = f"the {kind} that is {color}"
    else:
        phrase = " ".join(["the", *adjs, kind])
    if "position" in ref:
        phrase += " " + _w(rng, vocab.REGION_PHRASES[ref["position"]])
    return phrase


def new_phrase(spec: dict, rng: np.random.Generator) -> str:
    """ "a small green striped star" for a described new object."""
    words = []
    if "size" in spec:
        words.append(_w(rng, vocab.SIZE_WORDS[spec["size"]]))
    words.append(_w(rng, vocab.COLOR_WORDS[spec["color"]]))
    if spec.get("material", "solid") != "solid":
        words.append(_w(rng, vocab.MATERIAL_WORDS[spec["material"]]))
    words.append(_w(rng, vocab.KIND_WORDS[spec["kind"]]))
    return _article(" ".join(words))


def bg_phrase(bg: dict, rng: np.random.Generator) -> str:
    c = _w(rng, vocab.COLOR_WORDS[bg["color"]])
    c2 = _w(rng, vocab.COLOR_WORDS[bg["color2"]])
    kind = bg["kind"]
    if kind == "solid":
        return _w(rng, (f"plain {c}", f"a solid {c} color", c, _article(f"flat {c} backdrop"), _article(f"{c} background")))
    if kind == "gradient":
        if bg["direction"] == "vertical":
            return _w(rng, (f"a gradient from {c} at the top to {c2} at the bottom",
                            f"{c} fading into {c2} from top to bottom", f"a top-to-bottom {c} to {c2} gradient"))
        return _w(rng, (f"a gradient from {c} on the left to {c2} on the right",
                        f"{c} fading into {c2} from left to right", f"a left-to-right {c} to {c2} gradient"))
    if kind == "stripes":
        return _w(rng, (f"{c} and {c2} stripes", _article(f"{c} and {c2} striped pattern"), f"bands of {c} and {c2}"))
    if kind == "checker":
        return _w(rng, (_article(f"{c} and {c2} checkerboard"), f"{c} and {c2} checks",
                        _article(f"{c} and {c2} checkered pattern")))
    return _w(rng, (f"{c2} polka dots on {c}", _article(f"{c} background with {c2} dots"), f"{c} with {c2} spots"))


_ANGLES = {45: ("45 degrees", "an eighth of a turn"), 90: ("90 degrees", "a quarter turn", "ninety degrees"),
           180: ("180 degrees", "half a turn", "a half turn")}
_DIRECTIONS = {"clockwise": (" clockwise", " to the right"),
               "counterclockwise": (" counterclockwise", " anticlockwise", " to the left"), "": ("",)}
_AXES = {"horizontal": ("horizontally", "left to right", "along the vertical axis"),
         "vertical": ("vertically", "upside down", "top to bottom")}
_POINT_DIRS = {"up": ("up", "upward", "toward the top"), "down": ("down", "downward", "toward the bottom"),
               "left": ("left", "to the left", "leftward"), "right": ("right", "to the right", "rightward")}
_FACTORS = {1.5: ("1.5x", "a bit", "by half again"), 2.0: ("2x", "twice", "by a factor of two")}


def _text_phrase(text: str, rng: np.random.Generator) -> str:
    return _w(rng, (f'"{text}"', text, f"'{text}'"))


def _fields(edit: SceneEdit, rng: np.random.Generator, needed: list[str]) -> dict[str, str]:
    s = edit.slots
    f: dict[str, str] = {}
    for key in needed:
        if key in ("obj", "obj2", "anchor"):
            f[key] = ref_phrase(s[key], rng)
        elif key in ("color", "color_from"):
            f[key] = _w(rng, vocab.COLOR_WORDS[s[key]])
        elif key == "material":
            f[key] = _w(rng, vocab.MATERIAL_WORDS[s["material"]])
        elif key == "material_noun":
            f[key] = _w(rng, vocab.MATERIAL_NOUNS[s["material"]])
        elif key == "kind_a":
            f[key] = _article(_w(rng, vocab.KIND_WORDS[s["kind"]]))
        elif key == "kind":
            f[key] = _w(rng, vocab.KIND_WORDS[s["kind"]])
        elif key == "kinds":
            f[key] = _w(rng, vocab.KIND_PLURALS[s["kind"]])
        elif key == "new":
            f[key] = new_phrase(s["new"], rng)
        elif key == "pos":
            f[key] = _w(rng, vocab.REGION_PHRASES[s["pos"]])
        elif key == "relation":
            f[key] = _w(rng, vocab.RELATIONS[s["relation"]])
        elif key == "angle":
            f[key] = _w(rng, _ANGLES[s["angle"]])
        elif key == "direction":
            f[key] = _w(rng, _DIRECTIONS[s["direction"]])
        elif key == "axis":
            f[key] = _w(rng, _AXES[s["axis"]])
        elif key == "dir":
            f[key] = _w(rng, _POINT_DIRS[s["direction"]])
        elif key == "style":
            f[key] = _w(rng, vocab.STYLE_WORDS[s["style"]])
        elif key == "tone":
            f[key] = _w(rng, vocab.TONE_WORDS[s["tone"]])
        elif key == "bg":
            f[key] = bg_phrase(s["bg"], rng)
        elif key == "expr":
            f[key] = _w(rng, vocab.EXPRESSION_WORDS[s["expression"]])
        elif key in ("text", "old_text"):
            f[key] = _text_phrase(s[key], rng)
        elif key == "factor":
            f[key] = _w(rng, _FACTORS[s["factor"]])
        elif key == "subject":
            f[key] = _subject_phrase(s["subject"], rng)
        else:
            raise KeyError(f"template placeholder {{{key}}} has no filler")
    return f


def _subject_phrase(spec: dict, rng: np.random.Generator) -> str:
    kind = _w(rng, vocab.KIND_WORDS[spec["kind"]])
    u = rng.random()
    if u < 0.25:
        return _w(rng, vocab.THING_WORDS)
    if u < 0.5:
        return kind
    words = [_w(rng, vocab.COLOR_WORDS[spec["color"]])]
    if spec.get("material", "solid") != "solid" and rng.random() < 0.6:
        words.append(_w(rng, vocab.MATERIAL_WORDS[spec["material"]]))
    return " ".join([*words, kind])


def _placeholders(template: str) -> list[str]:
    """Placeholder names in order of appearance (a list, not a set: the order of random draws must
    not depend on string hashing, which varies between processes)."""
    return list(dict.fromkeys(name for _, name, _, _ in string.Formatter().parse(template) if name))


# First words of templates that are not commands ("please" cannot go before them).
_NOT_IMPERATIVE = {"i", "i'd", "what", "how", "could", "can", "there", "which", "anything", "the"}


def _imperative(template: str) -> bool:
    first = template.split()[0]
    return not first.startswith("{") and first.lower() not in _NOT_IMPERATIVE


def write_instruction(edit: SceneEdit, rng: np.random.Generator, split: str = "train",
                      heldout_rate: float = 0.5) -> tuple[str, int, bool]:
    """One instruction for ``edit``.

    Args:
        edit: the scene edit (its ``op`` and ``slots`` decide the templates and fillers).
        rng: random stream (the caller derives it from the pair's seed, for determinism).
        split: "train" uses training templates only; "eval" uses held-out templates with
            probability ``heldout_rate``.

    Returns:
        (instruction, template index within its group, whether the template is held out).
    """
    train, held = TEMPLATES[edit.op]
    use_held = split == "eval" and rng.random() < heldout_rate
    group = held if use_held else train
    idx = int(rng.integers(len(group)))
    template = group[idx]
    text = template.format(**_fields(edit, rng, _placeholders(template)))
    if "companion" in edit.slots:
        comp = new_phrase(edit.slots["companion"], rng)
        cpos = _w(rng, vocab.REGION_PHRASES[edit.slots["companion_pos"]])
        text = text.rstrip("?") + _w(rng, (f", with {comp} {cpos}", f", and add {comp} {cpos}",
                                           f"; include {comp} {cpos}"))
    text = " ".join(text.split())
    # Surface variety: politeness, capitalization, final punctuation.
    if rng.random() < 0.12 and _imperative(template):
        text = "please " + text
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    if not text.endswith("?") and rng.random() < 0.35:
        text += "."
    return text, idx, use_held
