"""Rendering a Scene to pixels, exactly and fast.

A scene is drawn at ``supersample`` times the output resolution with hard (binary) edges, in
drawing order, then box-filtered down: antialiasing for free, and *local*: an output pixel depends
only on its own block of high-resolution pixels. Beside the colors, the renderer keeps an id map
(which object is on top at each high-resolution pixel, -1 for background), so the region an edit
changed is known exactly: an object's visible footprint is the set of output pixels whose block
shows it.

Style is applied after drawing (some styles read the high-resolution edges), tone last, per pixel.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from x2edit.data_pipeline.shapeworld import vocab
from x2edit.data_pipeline.shapeworld.scene import Background, Camera, Obj, Scene

_RGB = {name: np.array(rgb, dtype=np.uint8) for name, rgb in vocab.COLORS.items()}
_DARK = (30, 30, 30)
# World-unit periods of fills and background patterns (a stripe is half a period wide).
_MATERIAL_PERIOD = 0.07
_BG_PERIOD = 0.12


# Id of "no object" in the id map (object ids are small integers below it).
BACKGROUND_ID = 255


@dataclass
class Rendered:
    """image: (H, W, 3) uint8. ids: (H*S, W*S) uint8 top-object id per high-resolution pixel."""

    image: np.ndarray
    ids: np.ndarray
    supersample: int

    def footprint(self, obj_ids) -> np.ndarray:
        """(H, W) bool: output pixels whose block shows any of ``obj_ids``."""
        return _block_any(np.isin(self.ids, list(obj_ids)), self.supersample)

    def background_visible(self) -> np.ndarray:
        """(H, W) bool: output pixels whose block shows some background."""
        return _block_any(self.ids == BACKGROUND_ID, self.supersample)


def _block_any(hit: np.ndarray, s: int) -> np.ndarray:
    # A block's (rounded) mean of 0/255 values is positive iff any pixel is set.
    return np.asarray(Image.fromarray(hit.astype(np.uint8) * np.uint8(255)).reduce(s)) > 0


def _block_mean(img: np.ndarray | Image.Image, s: int) -> np.ndarray:
    """(H*s, W*s, 3) uint8 -> (H, W, 3) uint8 mean of each s x s block (Pillow's exact box reduce)."""
    im = img if isinstance(img, Image.Image) else Image.fromarray(img)
    return np.asarray(im.reduce(s) if s > 1 else im)


def secondary_color(color: str) -> np.ndarray:
    """The second color of a patterned fill: lighter for dark colors, darker for light ones."""
    rgb = np.array(vocab.COLORS[color], dtype=np.float32)
    if vocab.luminance(color) > 0.55:
        return (rgb * 0.55).astype(np.uint8)
    return (rgb + (255 - rgb) * 0.55).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Shape outlines in unit coordinates (radius 1, y down).


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _heart(n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    y = y - (y.max() + y.min()) / 2
    return np.stack([x, y], axis=1) / 17.0


_OUTLINES: dict[str, np.ndarray] = {
    "square": np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]]),
    "triangle": np.array([[0.0, -1.0], [0.866, 0.5], [-0.866, 0.5]]),
    "star": _star(),
    "hexagon": 0.95 * np.stack([np.cos(np.arange(6) * np.pi / 3), np.sin(np.arange(6) * np.pi / 3)], axis=1),
    "diamond": np.array([[0.0, -1.0], [0.62, 0.0], [0.0, 1.0], [-0.62, 0.0]]),
    "heart": _heart(),
    "cross": np.array([[-0.3, -0.9], [0.3, -0.9], [0.3, -0.3], [0.9, -0.3], [0.9, 0.3], [0.3, 0.3], [0.3, 0.9],
                       [-0.3, 0.9], [-0.3, 0.3], [-0.9, 0.3], [-0.9, -0.3], [-0.3, -0.3]]),
    "arrow": np.array([[-0.9, -0.22], [0.2, -0.22], [0.2, -0.6], [0.95, 0.0], [0.2, 0.6], [0.2, 0.22],
                       [-0.9, 0.22]]),
}


@functools.lru_cache(maxsize=64)
def _font(size_px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(size_px, 4))


class Renderer:
    """Draws scenes at ``resolution`` x ``resolution``.

    Args:
        resolution: output side in pixels.
        supersample: high-resolution factor for antialiasing (4 is plenty at 64 px).
    """

    def __init__(self, resolution: int = 64, supersample: int = 4):
        if resolution < 16:
            raise ValueError(f"resolution must be at least 16 pixels, got {resolution}")
        if supersample < 1:
            raise ValueError(f"supersample must be >= 1, got {supersample}")
        self.resolution = resolution
        self.supersample = supersample
        self.hi = resolution * supersample
        centers = (np.arange(self.hi, dtype=np.float32) + 0.5) / self.hi  # pixel centers in [0, 1]
        self._centers = centers
        self._bg_cache: tuple[tuple, Image.Image] | None = None

    # -- coordinates ------------------------------------------------------------------------

    def _world_axes(self, cam: Camera) -> tuple[np.ndarray, np.ndarray]:
        """World x of each high-resolution column and world y of each row."""
        off = (self._centers - 0.5) / cam.zoom
        return cam.cx + off, cam.cy + off

    def _to_px(self, cam: Camera, x: float, y: float) -> tuple[float, float]:
        return ((x - cam.cx) * cam.zoom + 0.5) * self.hi, ((y - cam.cy) * cam.zoom + 0.5) * self.hi

    # -- drawing ----------------------------------------------------------------------------

    def _background(self, bg: Background, cam: Camera) -> Image.Image:
        key = (bg, cam)
        if self._bg_cache is not None and self._bg_cache[0] == key:
            return self._bg_cache[1].copy()
        wx, wy = self._world_axes(cam)
        c1, c2 = _RGB[bg.color], _RGB[bg.color2]
        hi = self.hi
        if bg.kind == "solid":
            out = np.broadcast_to(c1, (1, 1, 3))
        elif bg.kind == "gradient":
            t = np.clip(wy if bg.direction == "vertical" else wx, 0.0, 1.0)
            line = (c1[None, :] * (1 - t[:, None]) + c2[None, :] * t[:, None]).round().astype(np.uint8)
            out = line[:, None, :] if bg.direction == "vertical" else line[None, :, :]
        else:
            gx, gy = wx[None, :] / _BG_PERIOD, wy[:, None] / _BG_PERIOD
            if bg.kind == "stripes":
                sel = (np.floor(gy * 2) % 2 == 0) if bg.direction == "vertical" else (np.floor(gx * 2) % 2 == 0)
            elif bg.kind == "checker":
                sel = (np.floor(gx) + np.floor(gy)) % 2 == 0
            elif bg.kind == "dots":
                sel = ((gx - np.floor(gx) - 0.5) ** 2 + (gy - np.floor(gy) - 0.5) ** 2) >= 0.22 ** 2
            else:
                raise ValueError(f"unknown background kind {bg.kind!r}")
            out = np.where(sel[..., None], c1, c2).astype(np.uint8)
        # Constant rows or columns are stretched by Pillow (exact with NEAREST).
        image = Image.fromarray(np.ascontiguousarray(out))
        if image.size != (hi, hi):
            image = image.resize((hi, hi), Image.NEAREST)
        self._bg_cache = (key, image)
        return image.copy()

    def _silhouette(self, o: Obj, cx: float, cy: float, r: float, box: tuple[int, int, int, int]) -> Image.Image:
        """Binary ("L", 0/255) mask of the object's shape within ``box`` (x0, y0, x1, y1), high-resolution."""
        x0, y0, x1, y1 = box
        img = Image.new("L", (x1 - x0, y1 - y0), 0)
        draw = ImageDraw.Draw(img)
        lx, ly = cx - x0, cy - y0
        if o.kind in ("circle", "face"):
            draw.ellipse([lx - r, ly - r, lx + r, ly + r], fill=255)
        elif o.kind == "sign":
            draw.rounded_rectangle([lx - r, ly - 0.72 * r, lx + r, ly + 0.72 * r], radius=0.2 * r, fill=255)
        else:
            pts = _OUTLINES[o.kind].copy()
            if o.mirror:
                pts[:, 0] = -pts[:, 0]
            a = math.radians(o.rotation)
            c, s = math.cos(a), math.sin(a)
            # Counter-clockwise on screen with y down: (u, v) -> (u c + v s, -u s + v c).
            xs = lx + r * (pts[:, 0] * c + pts[:, 1] * s)
            ys = ly + r * (-pts[:, 0] * s + pts[:, 1] * c)
            draw.polygon(list(zip(xs.tolist(), ys.tolist())), fill=255)
        return img

    def _fill(self, o: Obj, cx: float, cy: float, r: float, box: tuple[int, int, int, int]):
        """The object's fill in ``box``: an RGB tuple, or an image for patterns (in the object's frame)."""
        x0, y0, x1, y1 = box
        base = _RGB[o.color]
        if o.kind not in vocab.SHAPES or o.material == "solid":
            return vocab.COLORS[o.color]
        # Object-frame coordinates in world units (scale: r pixels = o.size world units).
        scale = o.size / r
        dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx)[None, :] * scale
        dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy)[:, None] * scale
        a = math.radians(o.rotation)
        c, s = math.cos(a), math.sin(a)
        u = dx * c - dy * s
        v = dx * s + dy * c
        if o.mirror:
            u = -u
        p = _MATERIAL_PERIOD
        if o.material == "striped":
            sel = np.floor((u + v) / p * 2) % 2 == 0
        elif o.material == "checkered":
            sel = (np.floor(u / (0.85 * p)) + np.floor(v / (0.85 * p))) % 2 == 0
        elif o.material == "dotted":
            gu, gv = u / p, v / p
            sel = ((gu - np.floor(gu) - 0.5) ** 2 + (gv - np.floor(gv) - 0.5) ** 2) >= 0.3 ** 2
        else:
            raise ValueError(f"unknown material {o.material!r}")
        return Image.fromarray(np.where(sel[..., None], base, secondary_color(o.color)))

    def _features(self, o: Obj, img: Image.Image, cx: float, cy: float, r: float,
                  box: tuple[int, int, int, int]) -> None:
        """Draw a face's features or a sign's letters onto ``img``, the crop of ``box``."""
        x0, y0, _, _ = box
        draw = ImageDraw.Draw(img)
        lx, ly = cx - x0, cy - y0

        def pt(u: float, v: float) -> tuple[float, float]:
            return lx + u * r, ly + v * r

        def disc(u: float, v: float, rx: float, ry: float, fill) -> None:
            draw.ellipse([*pt(u - rx, v - ry), *pt(u + rx, v + ry)], fill=fill)

        if o.kind == "sign":
            if o.text:
                color = _DARK if vocab.luminance(o.color) > 0.5 else (250, 250, 250)
                size = int(r * (1.25 if len(o.text) == 1 else 0.95))
                draw.text((lx, ly), o.text, fill=color, font=_font(size), anchor="mm")
            return
        lw = max(1, int(round(0.11 * r)))
        if o.blush:
            for u in (-0.58, 0.58):
                disc(u, 0.2, 0.17, 0.1, (215, 55, 95))
        for u in (-0.36, 0.36):
            if o.eyes == "open":
                disc(u, -0.22, 0.13, 0.15, _DARK)
            else:
                draw.line([pt(u - 0.16, -0.2), pt(u + 0.16, -0.2)], fill=_DARK, width=lw)
        if o.glasses:
            for u in (-0.36, 0.36):
                draw.ellipse([*pt(u - 0.27, -0.49), *pt(u + 0.27, 0.05)], outline=_DARK, width=lw)
            draw.line([pt(-0.09, -0.24), pt(0.09, -0.24)], fill=_DARK, width=lw)
        if o.expression == "smile":
            draw.arc([*pt(-0.48, -0.38), *pt(0.48, 0.55)], start=25, end=155, fill=_DARK, width=lw)
        elif o.expression == "frown":
            draw.arc([*pt(-0.45, 0.38), *pt(0.45, 1.1)], start=205, end=335, fill=_DARK, width=lw)
        elif o.expression == "neutral":
            draw.line([pt(-0.3, 0.42), pt(0.3, 0.42)], fill=_DARK, width=lw)
        elif o.expression == "surprised":
            disc(0.0, 0.42, 0.16, 0.21, _DARK)

    def _draw_objects(self, canvas: Image.Image, ids: Image.Image, scene: Scene, gray_by_layer: bool = False) -> None:
        """Paint the objects in order onto ``canvas`` (RGB) and their ids onto ``ids`` (L)."""
        cam = scene.camera
        n = len(scene.objects)
        for layer, o in enumerate(scene.objects):
            cx, cy = self._to_px(cam, o.x, o.y)
            r = o.size * cam.zoom * self.hi
            pad = r * (1.45 if o.kind in vocab.SHAPES else 1.05) + 2
            box = (max(0, int(cx - pad)), max(0, int(cy - pad)), min(self.hi, int(cx + pad) + 1),
                   min(self.hi, int(cy + pad) + 1))
            if box[0] >= box[2] or box[1] >= box[3]:
                continue  # outside the view
            mask = self._silhouette(o, cx, cy, r, box)
            if gray_by_layer:
                # Depth map: nearer (later-drawn) objects are brighter.
                level = int(90 + 165 * (layer + 1) / n)
                canvas.paste((level, level, level), box, mask)
            else:
                canvas.paste(self._fill(o, cx, cy, r, box), box, mask)
                if o.kind in ("face", "sign"):
                    patch = canvas.crop(box)
                    self._features(o, patch, cx, cy, r, box)
                    canvas.paste(patch, box, mask)  # features stay inside the silhouette
            ids.paste(o.id, box, mask)

    # -- public -----------------------------------------------------------------------------

    def render(self, scene: Scene, mode: str = "image") -> Rendered:
        """Render ``scene``.

        Args:
            scene: what to draw.
            mode: "image" (the scene as seen), "edge_map" (white edges on black) or "depth_map"
                (objects in gray levels by drawing order, background black): the conditions of
                the low-level task.
        """
        hi = self.hi
        ids = Image.new("L", (hi, hi), BACKGROUND_ID)
        if mode == "depth_map":
            canvas = Image.new("RGB", (hi, hi), (0, 0, 0))
            self._draw_objects(canvas, ids, scene, gray_by_layer=True)
            return Rendered(_block_mean(canvas, self.supersample), np.asarray(ids), self.supersample)
        canvas = self._background(scene.background, scene.camera)
        self._draw_objects(canvas, ids, scene)
        if mode == "edge_map":
            edges = self._edges(np.asarray(canvas))
            img = _block_mean(np.repeat(edges[..., None], 3, axis=2).astype(np.uint8) * 255, self.supersample)
            return Rendered(img, np.asarray(ids), self.supersample)
        if mode != "image":
            raise ValueError(f"unknown render mode {mode!r}")
        img = apply_tone(self._style(canvas, scene.style), scene.tone)
        return Rendered(img, np.asarray(ids), self.supersample)

    def _edges(self, canvas: np.ndarray) -> np.ndarray:
        """(hi, hi) bool color edges, thickened to about one output pixel."""
        c = canvas.astype(np.int16)
        e = np.zeros(canvas.shape[:2], dtype=bool)
        e[:, 1:] |= np.abs(c[:, 1:] - c[:, :-1]).max(axis=2) > 40
        e[1:, :] |= np.abs(c[1:] - c[:-1]).max(axis=2) > 40
        k = max(1, self.supersample // 2)
        out = e.copy()
        for d in range(1, k + 1):
            out[d:] |= e[:-d]
            out[:-d] |= e[d:]
        e = out.copy()
        for d in range(1, k + 1):
            out[:, d:] |= e[:, :-d]
            out[:, :-d] |= e[:, d:]
        return out

    def _style(self, image: Image.Image, style: str) -> np.ndarray:
        """Apply a rendering style to the high-resolution canvas; returns the (H, W, 3) uint8 image."""
        s = self.supersample
        if style == "flat":
            return _block_mean(image, s)
        canvas = np.asarray(image)
        if style == "pixel_art":
            low = _block_mean(canvas, s)
            b = max(2, self.resolution // 16)
            n = self.resolution // b
            blocks = low[: n * b, : n * b].reshape(n, b, n, b, 3).mean(axis=(1, 3))
            blocks = np.round(blocks / 85.0) * 85.0  # 4 levels per channel
            out = low.copy()
            out[: n * b, : n * b] = np.repeat(np.repeat(blocks, b, axis=0), b, axis=1).astype(np.uint8)
            return out
        if style == "posterized":
            return (np.round(_block_mean(canvas, s) / 127.5) * 127.5).astype(np.uint8)
        edges = self._edges(canvas)[..., None]
        if style == "sketch":
            paper = np.array([245, 240, 228], dtype=np.uint8)
            return _block_mean(np.where(edges, np.uint8(55), paper).astype(np.uint8), s)
        if style == "cartoon":
            return _block_mean(np.where(edges, np.uint8(15), canvas).astype(np.uint8), s)
        if style == "neon":
            # Edges keep the brighter of the colors meeting there, pushed to full brightness.
            bright = canvas.astype(np.float32)
            peak = np.maximum(bright.max(axis=2, keepdims=True), 1.0)
            glow = np.clip(bright * (255.0 / peak), 0, 255).astype(np.uint8)
            return _block_mean(np.where(edges, glow, np.uint8(8)).astype(np.uint8), s)
        raise ValueError(f"unknown style {style!r}")


def apply_tone(img: np.ndarray, tone: str) -> np.ndarray:
    """Per-pixel global tone on an (H, W, 3) uint8 image."""
    if tone == "neutral":
        return img
    x = img.astype(np.float32)
    if tone == "warm":
        x = x * np.array([1.08, 1.0, 0.8]) + np.array([14, 4, 0])
    elif tone == "cool":
        x = x * np.array([0.8, 0.97, 1.08]) + np.array([0, 4, 16])
    elif tone == "night":
        x = x * 0.36 + np.array([2, 6, 32])
    elif tone == "sepia":
        m = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]])
        x = x @ m.T
    elif tone == "grayscale":
        x = np.repeat((x @ np.array([0.299, 0.587, 0.114]))[..., None], 3, axis=2)
    elif tone == "bright":
        x = (x - 128.0) * 1.25 + 160.0
    elif tone == "faded":
        x = x * 0.55 + 100.0
    elif tone == "sunset":
        x = x * np.array([1.1, 0.82, 0.6]) + np.array([30, 12, 10])
    else:
        raise ValueError(f"unknown tone {tone!r}")
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Degradations for the low-level task (applied to a rendered image).


def degrade(img: np.ndarray, how: str, rng: np.random.Generator) -> np.ndarray:
    """Blur / noise / downscale an (H, W, 3) uint8 image, the inputs of restoration edits."""
    h = img.shape[0]
    if how == "blur":
        return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius=1.5 * h / 64)))
    if how == "noise":
        noisy = img.astype(np.float32) + rng.normal(0.0, 30.0, size=img.shape)
        return np.clip(noisy.round(), 0, 255).astype(np.uint8)
    if how == "lowres":
        small = Image.fromarray(img).resize((h // 4, h // 4), Image.BOX)
        return np.asarray(small.resize((h, h), Image.BILINEAR))
    raise ValueError(f"unknown degradation {how!r}")
