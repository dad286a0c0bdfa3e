"""Concepts: scene-wide attributes a LoRA can carry (a tone, a style, a background colour, ...), with
exact renders of any combination of them.

A concept is ``family:value``, e.g. ``tone:sepia``, ``background:red``. Families are independent
fields of a ``Scene`` (tone, style, background colour, every object's colour, every object's fill)
or a colour tint laid over the rendered image last, so applying several concepts of different
families gives one exact target, whatever the order:

    from x2edit.data_pipeline.shapeworld.concepts import ConceptWorld
    cw = ConceptWorld(resolution=64)
    pair = cw.pair(["background:red", "tone:sepia"], seed=0, split="eval")   # ConceptPair
    cw.attribute_accuracy(pair, output)        # {concept: True/False}, by nearest exact render

Sources are flat, neutral scenes of 2-4 plain shapes on a solid background, drawn with the split's
colour policy (``ShapeWorld``'s train/eval streams never share a scene). ``phrases`` gives the words
for a concept: training templates with all synonyms but the last, and held-out templates with the
last synonym, for retrieval by unseen phrasing.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass

import numpy as np

from x2edit.data_pipeline.shapeworld import vocab
from x2edit.data_pipeline.shapeworld.render import Renderer
from x2edit.data_pipeline.shapeworld.scene import Background, ColorPolicy, Scene, sample_scene

_SALT = 0xC0C3  # keeps concept streams apart from ShapeWorld's edit streams
_MAX_ATTEMPTS = 200

# family -> the values a concept of it may take (the source scene's own value is never one of them
# for tone and style: sources are neutral and flat).
FAMILIES: dict[str, tuple[str, ...]] = {
    "tone": vocab.TONES[1:],
    "style": vocab.STYLES[1:],
    "background": tuple(vocab.COLORS),
    "objects": tuple(vocab.COLORS),
    "material": vocab.MATERIALS[1:],
    "tint": ("red", "orange", "yellow", "green", "blue", "purple", "pink", "cyan", "brown"),
}
TINT_STRENGTH = 0.35  # tint:c mixes the rendered image with colour c: (1 - 0.35) image + 0.35 c
# Which pixels a family changes: the whole image, where background shows, or the objects' footprints.
REGIONS = {"tone": "image", "style": "image", "background": "background", "objects": "objects",
           "material": "objects", "tint": "image"}
# Template phrasings. {p} is the concept's noun phrase ("a warm tone", "a red background").
TRAIN_TEMPLATES = ("{p}", "give the picture {p}", "apply {p}", "change it to {p}", "{p}, please")
HELDOUT_TEMPLATES = ("I would like the image with {p}", "could the scene get {p}?")


def _words(family: str, value: str) -> tuple[str, ...]:
    return {"tone": vocab.TONE_WORDS, "style": vocab.STYLE_WORDS, "background": vocab.COLOR_WORDS,
            "objects": vocab.COLOR_WORDS, "material": vocab.MATERIAL_WORDS, "tint": vocab.COLOR_WORDS}[family][value]


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _noun_phrase(family: str, word: str) -> str:
    if family == "background":
        return f"{_a(word)} background"
    if family in ("objects", "material"):
        return f"{word} shapes"
    if family == "tint":
        return f"{_a(word)} tint"
    return word  # tone and style words are noun phrases already


@dataclass(frozen=True)
class Concept:
    """One attribute value. ``name`` is ``family:value``."""

    family: str
    value: str

    @property
    def name(self) -> str:
        return f"{self.family}:{self.value}"

    @property
    def region(self) -> str:
        return REGIONS[self.family]

    @property
    def description(self) -> str:
        """The canonical noun phrase: "a warm tone", "pixel art", "a red background", "striped shapes"."""
        return _noun_phrase(self.family, _words(self.family, self.value)[0])

    def phrases(self, held_out: bool = False) -> list[str]:
        """Training phrasings (every synonym but the last in the training templates), or the held-out
        ones (the last synonym in the held-out templates): never seen by a model trained on the former."""
        words = _words(self.family, self.value)
        if held_out:
            return [t.format(p=_noun_phrase(self.family, words[-1])) for t in HELDOUT_TEMPLATES]
        return [t.format(p=_noun_phrase(self.family, w)) for w in words[:-1] for t in TRAIN_TEMPLATES]

    def apply(self, scene: Scene) -> Scene:
        """The scene with this concept (a tint leaves the scene as it is: it acts on the rendered image)."""
        if self.family == "tint":
            return scene
        if self.family == "tone":
            return dataclasses.replace(scene, tone=self.value)
        if self.family == "style":
            return dataclasses.replace(scene, style=self.value)
        if self.family == "background":
            return dataclasses.replace(scene, background=Background("solid", self.value, self.value))
        field = "color" if self.family == "objects" else "material"
        return dataclasses.replace(scene, objects=tuple(dataclasses.replace(o, **{field: self.value})
                                                        for o in scene.objects))


def get_concept(name: str | Concept) -> Concept:
    """A ``Concept`` from ``family:value``; one-line error naming the valid families or values."""
    if isinstance(name, Concept):
        return name
    family, _, value = str(name).partition(":")
    if family not in FAMILIES:
        raise ValueError(f"unknown concept family {family!r} in {name!r}: expected one of {list(FAMILIES)}")
    if value not in FAMILIES[family]:
        raise ValueError(f"unknown {family} value {value!r} in {name!r}: expected one of {list(FAMILIES[family])}")
    return Concept(family, value)


def all_concepts() -> list[Concept]:
    return [Concept(f, v) for f, values in FAMILIES.items() for v in values]


def instruction(concepts: list[Concept], rng: np.random.Generator, held_out: bool = False) -> str:
    """One instruction asking for every concept: a phrasing of each, joined by "and"."""
    parts = []
    for c in concepts:
        options = c.phrases(held_out) if len(concepts) == 1 else [
            _noun_phrase(c.family, w) for w in (_words(c.family, c.value)[-1:] if held_out
                                                else _words(c.family, c.value)[:-1])]
        parts.append(options[int(rng.integers(len(options)))])
    return parts[0] if len(parts) == 1 else "give the picture " + " and ".join(parts)


@dataclass
class ConceptPair:
    """A source scene and its exact target with ``concepts`` applied.

    Args:
        source, target: (H, W, 3) uint8.
        concepts: what was applied.
        scene: the source scene (for rendering alternatives: ``ConceptWorld.attribute_accuracy``).
        masks: concept name -> (H, W) bool region where that concept's family acts.
        split, seed: where it came from.
    """

    source: np.ndarray
    target: np.ndarray
    concepts: list[Concept]
    scene: Scene
    masks: dict[str, np.ndarray]
    split: str
    seed: int

    @property
    def mask(self) -> np.ndarray:
        """Union of the concepts' regions."""
        return np.logical_or.reduce(list(self.masks.values()))


class ConceptWorld:
    """Exact concept edits on Shape World scenes (see the module docstring).

    Args:
        resolution: image side in pixels.
    """

    def __init__(self, resolution: int = 64):
        self.resolution = resolution
        self.renderer = Renderer(resolution, 4 if resolution <= 128 else 2)
        self.min_changed = max(6, int(0.004 * resolution * resolution))

    def compose(self, scene: Scene, concepts: list[Concept]) -> Scene:
        for c in concepts:
            scene = c.apply(scene)
        return scene

    def render_with(self, scene: Scene, concepts: list[Concept]) -> np.ndarray:
        """(H, W, 3) uint8 image of ``scene`` with ``concepts`` applied (tints last, on the pixels)."""
        image = self.render(self.compose(scene, concepts))
        for c in concepts:
            if c.family == "tint":
                rgb = np.asarray(vocab.COLORS[c.value], dtype=np.float32)
                image = np.round((1 - TINT_STRENGTH) * image + TINT_STRENGTH * rgb).astype(np.uint8)
        return image

    @staticmethod
    def _valid(source: Scene, target: Scene, concepts: list[Concept]) -> bool:
        if not target.objects:
            return False
        colors = {o.color for o in target.objects}
        if target.background.color in colors:  # an object would vanish into the background
            return False
        for c in concepts:
            if c.family == "background" and source.background.color == c.value:
                return False
            if c.family == "objects" and all(o.color == c.value for o in source.objects):
                return False
            if c.family == "material" and all(o.material == c.value for o in source.objects):
                return False
        return True

    def pair(self, concepts: list[str | Concept], seed: int, split: str = "train") -> ConceptPair:
        """The (source, target) pair of ``concepts`` for ``seed`` in ``split`` (a pure function of them).

        Args:
            concepts: names or ``Concept``s, at most one per family.
            seed: non-negative integer.
            split: "train" or "eval" (disjoint random streams and ShapeWorld's colour policy).
        """
        concepts = [get_concept(c) for c in concepts]
        families = [c.family for c in concepts]
        if len(set(families)) != len(families):
            raise ValueError(f"at most one concept per family can be applied together, got {[c.name for c in concepts]}")
        policy = ColorPolicy(split)
        key = zlib.crc32("+".join(sorted(c.name for c in concepts)).encode())
        for attempt in range(_MAX_ATTEMPTS):
            rng = np.random.default_rng([_SALT, ("train", "eval").index(split), key, int(seed), attempt])
            bg = str(rng.choice(list(vocab.COLORS)))
            scene = sample_scene(rng, policy, (2, 4), kinds=vocab.SHAPES, background=Background("solid", bg, bg),
                                 tone_rate=0.0)
            target_scene = self.compose(scene, concepts)
            if not self._valid(scene, target_scene, concepts):
                continue
            src, tgt = self.renderer.render(scene), self.render_with(scene, concepts)
            masks = {}
            for c in concepts:
                one = self.render_with(scene, [c])
                if int(np.any(one != src.image, axis=-1).sum()) < self.min_changed:
                    break  # this concept would be (nearly) invisible on this scene: draw another
                masks[c.name] = self._region(c, scene, src)
            else:
                return ConceptPair(src.image, tgt, concepts, scene, masks, split, int(seed))
        raise RuntimeError(f"no valid scene for {[c.name for c in concepts]} with seed {seed} in {_MAX_ATTEMPTS} attempts")

    @staticmethod
    def _region(concept: Concept, scene: Scene, rendered) -> np.ndarray:
        if concept.region == "background":
            return rendered.background_visible()
        if concept.region == "objects":
            return rendered.footprint([o.id for o in scene.objects])
        return np.ones(rendered.image.shape[:2], dtype=bool)

    def render(self, scene: Scene) -> np.ndarray:
        return self.renderer.render(scene).image

    def attribute_accuracy(self, pair: ConceptPair, output: np.ndarray, sweeps: int = 2,
                           cache: dict | None = None) -> dict[str, bool]:
        """Whether ``output`` shows each asked concept, by the nearest exact render.

        Every asked family is read jointly: starting from the asked values, each family in turn takes
        the value (among all of its values and the source's own, "unchanged") whose exact render, with
        the other families at their current readings, is nearest to ``output`` inside the family's
        region (mean absolute error); ``sweeps`` rounds. A family is correct if its reading is the
        asked value. Reading the others jointly matters: a wrong background shifts the whole-image
        distance that decides the tone.

        Args:
            pair: the pair that was edited.
            output: (H, W, 3) uint8 edited image.
            cache: renders by their values, shared by calls on the same pair (e.g. several methods).
        """
        out = output.astype(np.float32)
        cache = {} if cache is None else cache
        reading: dict[str, str | None] = {c.family: c.value for c in pair.concepts}

        def image(values: dict) -> np.ndarray:
            key = tuple(sorted(values.items(), key=lambda kv: kv[0]))
            if key not in cache:
                cache[key] = self.render_with(pair.scene, [Concept(f, v) for f, v in key if v is not None])
            return cache[key]

        for _ in range(sweeps):
            for c in pair.concepts:
                m = pair.masks[c.name]
                dist = {v: float(np.abs(out[m] - image({**reading, c.family: v})[m].astype(np.float32)).mean())
                        for v in (*FAMILIES[c.family], None)}
                reading[c.family] = min(dist, key=dist.get)
        return {c.name: reading[c.family] == c.value for c in pair.concepts}
