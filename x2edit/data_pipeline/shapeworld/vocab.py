"""Shape World's vocabulary: every name a scene can hold, its RGB value, and the words for it.

Scenes store canonical names (``"red"``, ``"circle"``, ``"striped"``); instruction templates pick
one of the synonyms listed here, so a model sees many phrasings of the same attribute.
"""

from __future__ import annotations

# name -> RGB. Saturated and far apart so that each color is recognizable at 64 px.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "orange": (245, 130, 20),
    "yellow": (245, 215, 30),
    "green": (40, 165, 60),
    "blue": (40, 90, 220),
    "purple": (135, 55, 195),
    "pink": (245, 125, 185),
    "cyan": (30, 200, 220),
    "brown": (125, 75, 35),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
}

COLOR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "scarlet", "crimson"),
    "orange": ("orange", "tangerine", "amber"),
    "yellow": ("yellow", "lemon-yellow", "golden"),
    "green": ("green", "emerald", "grass-green"),
    "blue": ("blue", "cobalt", "royal blue"),
    "purple": ("purple", "violet", "plum"),
    "pink": ("pink", "rose", "bubblegum-pink"),
    "cyan": ("cyan", "turquoise", "aqua"),
    "brown": ("brown", "chocolate", "coffee-colored"),
    "white": ("white", "snow-white", "ivory"),
    "black": ("black", "jet-black", "ebony"),
    "gray": ("gray", "grey", "ash-gray"),
}

# Plain geometric shapes; "sign" (a plate with letters) and "face" are special kinds.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "diamond", "heart", "cross", "arrow")
SPECIAL_KINDS: tuple[str, ...] = ("sign", "face")
KINDS: tuple[str, ...] = SHAPES + SPECIAL_KINDS

KIND_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "round shape", "dot"),
    "square": ("square", "block", "square tile", "box"),
    "triangle": ("triangle", "triangular shape", "three-sided shape"),
    "star": ("star", "five-pointed star", "star shape"),
    "hexagon": ("hexagon", "six-sided shape", "hex"),
    "diamond": ("diamond", "rhombus", "lozenge"),
    "heart": ("heart", "heart shape", "love heart"),
    "cross": ("cross", "plus sign", "plus shape"),
    "arrow": ("arrow", "pointer", "arrow shape"),
    "sign": ("sign", "label", "placard", "name tag"),
    "face": ("face", "smiley", "smiley face", "emoji face"),
}
KIND_PLURALS: dict[str, tuple[str, ...]] = {
    "circle": ("circles", "discs", "round shapes"),
    "square": ("squares", "blocks", "square tiles"),
    "triangle": ("triangles", "triangular shapes"),
    "star": ("stars", "star shapes"),
    "hexagon": ("hexagons", "six-sided shapes"),
    "diamond": ("diamonds", "rhombuses", "lozenges"),
    "heart": ("hearts", "heart shapes"),
    "cross": ("crosses", "plus signs"),
    "arrow": ("arrows", "pointers"),
    "sign": ("signs", "labels"),
    "face": ("faces", "smileys"),
}
# Generic nouns for "an object" (used when the description does not name the kind).
THING_WORDS: tuple[str, ...] = ("object", "shape", "item", "thing")

MATERIALS: tuple[str, ...] = ("solid", "striped", "dotted", "checkered")
MATERIAL_WORDS: dict[str, tuple[str, ...]] = {
    "solid": ("solid", "plain", "solid-colored", "uniformly colored"),
    "striped": ("striped", "stripy", "banded", "pinstriped"),
    "dotted": ("dotted", "polka-dot", "spotted", "speckled"),
    "checkered": ("checkered", "checked", "chequered", "checkerboard"),
}
# Noun phrases for a fill ("give it ...").
MATERIAL_NOUNS: dict[str, tuple[str, ...]] = {
    "solid": ("a plain fill", "a solid color", "a flat single-color fill", "no pattern"),
    "striped": ("stripes", "a striped pattern", "diagonal stripes", "a banded texture"),
    "dotted": ("polka dots", "a dotted pattern", "spots", "a speckled texture"),
    "checkered": ("a checkerboard pattern", "checks", "a checkered texture", "a chequered pattern"),
}

# 3x3 grid of regions, named by (row, column).
REGIONS: tuple[str, ...] = (
    "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right",
)
REGION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left", "in the upper left", "in the top-left corner", "at the upper-left corner"),
    "top": ("at the top", "near the top", "in the top middle", "along the top edge"),
    "top right": ("in the top right", "in the upper right", "in the top-right corner", "at the upper-right corner"),
    "left": ("on the left", "on the left side", "at the left", "in the middle of the left side"),
    "center": ("in the center", "in the middle", "in the centre", "at the center of the picture"),
    "right": ("on the right", "on the right side", "at the right", "in the middle of the right side"),
    "bottom left": ("in the bottom left", "in the lower left", "in the bottom-left corner", "at the lower-left corner"),
    "bottom": ("at the bottom", "near the bottom", "in the bottom middle", "along the bottom edge"),
    "bottom right": ("in the bottom right", "in the lower right", "in the bottom-right corner",
                     "at the lower-right corner"),
}
# Region centers in world coordinates (x to the right, y down).
REGION_CENTERS: dict[str, tuple[float, float]] = {
    name: (0.2 + 0.3 * (i % 3), 0.2 + 0.3 * (i // 3)) for i, name in enumerate(REGIONS)
}

SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "large": ("large", "big", "huge"),
    "largest": ("largest", "biggest"),
    "smallest": ("smallest", "tiniest"),
}

RELATIONS: dict[str, tuple[str, ...]] = {
    "left": ("to the left of", "left of", "just left of"),
    "right": ("to the right of", "right of", "just right of"),
    "above": ("above", "over", "just above"),
    "below": ("below", "under", "just below"),
}

BACKGROUND_KINDS: tuple[str, ...] = ("solid", "gradient", "stripes", "checker", "dots")

STYLES: tuple[str, ...] = ("flat", "pixel_art", "sketch", "neon", "cartoon", "posterized")
STYLE_WORDS: dict[str, tuple[str, ...]] = {
    "flat": ("a clean flat illustration", "a plain flat rendering", "simple flat colors"),
    "pixel_art": ("pixel art", "8-bit pixel art", "a blocky retro video game look", "chunky pixels"),
    "sketch": ("a pencil sketch", "a line drawing", "a black-and-white sketch", "an outline drawing on paper"),
    "neon": ("neon lights", "glowing neon outlines", "a neon sign look", "bright neon lines on black"),
    "cartoon": ("a cartoon", "a comic-book drawing with thick outlines", "a cel-shaded cartoon",
                "an inked comic style"),
    "posterized": ("a posterized print", "a screen print with few colors", "a poster with flat color bands",
                   "a reduced-palette poster"),
}

TONES: tuple[str, ...] = ("neutral", "warm", "cool", "night", "sepia", "grayscale", "bright", "faded", "sunset")
TONE_WORDS: dict[str, tuple[str, ...]] = {
    "neutral": ("natural colors", "neutral lighting", "its original colors", "normal daylight"),
    "warm": ("a warm tone", "warm lighting", "a warmer look", "a golden, warm cast"),
    "cool": ("a cool tone", "cold bluish lighting", "a cooler look", "an icy blue cast"),
    "night": ("night time", "a dark night look", "nighttime lighting", "a moonlit night"),
    "sepia": ("sepia", "an old sepia photograph look", "a vintage brown tint", "antique sepia tones"),
    "grayscale": ("black and white", "grayscale", "monochrome", "no color at all"),
    "bright": ("bright, high-key lighting", "a brighter exposure", "more brightness and contrast",
               "vivid, punchy lighting"),
    "faded": ("a faded, washed-out look", "low contrast", "a hazy, muted look", "washed-out colors"),
    "sunset": ("sunset light", "an orange evening glow", "golden-hour lighting", "a dusky sunset look"),
}

FACE_EXPRESSIONS: tuple[str, ...] = ("smile", "neutral", "frown", "surprised")
EXPRESSION_WORDS: dict[str, tuple[str, ...]] = {
    "smile": ("smile", "look happy", "grin", "look cheerful"),
    "neutral": ("look neutral", "have a straight face", "look expressionless", "keep a blank expression"),
    "frown": ("frown", "look sad", "look unhappy", "pull a sad face"),
    "surprised": ("look surprised", "open its mouth in surprise", "look astonished", "gasp"),
}
# Face colors (a face is drawn in one of these).
FACE_COLORS: tuple[str, ...] = ("yellow", "orange", "pink", "brown", "white")

# Letters that stay legible at 64 px, and the two-letter words a sign may hold.
GLYPHS: tuple[str, ...] = tuple("ABCDEFHKLMNOPRSTUXYZ")
WORDS2: tuple[str, ...] = ("HI", "OK", "GO", "NO", "UP", "ON", "OX", "AB")

# (kind, color) combinations that never appear in the training split; the evaluation split
# favors them, so evaluation measures composition of known attributes in unseen pairings.
HELDOUT_COMBOS: frozenset[tuple[str, str]] = frozenset({
    ("circle", "purple"), ("square", "orange"), ("triangle", "cyan"), ("star", "green"),
    ("hexagon", "red"), ("diamond", "yellow"), ("heart", "blue"), ("cross", "pink"),
    ("arrow", "brown"), ("sign", "gray"), ("face", "white"),
})


def luminance(color: str) -> float:
    """Relative luminance in [0, 1] of a named color (Rec. 709 weights)."""
    r, g, b = COLORS[color]
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255.0
