"""Pixel metrics on uint8 images, optionally restricted to a region.

PSNR of identical regions is infinite; it is reported as ``PSNR_CAP`` (100 dB) so that scores stay
finite numbers in JSON and parquet. SSIM uses a 7x7 uniform window (the common
default) on luma, averaged over the pixels of the region.
"""

from __future__ import annotations

import numpy as np

PSNR_CAP = 100.0


def psnr(a: np.ndarray, b: np.ndarray, region: np.ndarray | None = None) -> float | None:
    """PSNR in dB between uint8 images over ``region`` (H, W) bool; None if the region is empty."""
    d = a.astype(np.float64) - b.astype(np.float64)
    sq = (d * d).mean(axis=-1) if d.ndim == 3 else d * d
    if region is not None:
        if not region.any():
            return None
        sq = sq[region]
    mse = float(sq.mean())
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10.0 * np.log10(255.0**2 / mse))


def _box(x: np.ndarray, k: int) -> np.ndarray:
    """k x k mean filter with edge padding (integral image); x is (H, W, C) float64."""
    p = k // 2
    xp = np.pad(x, ((p + 1, p), (p + 1, p), (0, 0)), mode="edge")
    c = xp.cumsum(0).cumsum(1)
    s = c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]
    return s / (k * k)


_LUMA = np.array([0.299, 0.587, 0.114])


def ssim_map(a: np.ndarray, b: np.ndarray, win: int = 7) -> np.ndarray:
    """(H, W) SSIM of two uint8 images, on luma (Rec. 601) for color images."""
    x = a.astype(np.float64)
    y = b.astype(np.float64)
    if x.ndim == 3:
        x, y = x @ _LUMA, y @ _LUMA
    x, y = x[..., None], y[..., None]
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = _box(x, win), _box(y, win)
    vx = _box(x * x, win) - mx * mx
    vy = _box(y * y, win) - my * my
    cxy = _box(x * y, win) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(axis=-1)


def ssim(a: np.ndarray, b: np.ndarray, region: np.ndarray | None = None) -> float | None:
    """Mean SSIM over ``region``; None if the region is empty."""
    m = ssim_map(a, b)
    if region is not None:
        if not region.any():
            return None
        m = m[region]
    return float(m.mean())


def changed(a: np.ndarray, b: np.ndarray, tolerance: int = 10) -> np.ndarray:
    """(H, W) bool: pixels whose largest channel difference exceeds ``tolerance``."""
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=-1) > tolerance


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Grow a (H, W) bool mask by ``radius`` pixels (square neighbourhood)."""
    out = mask.copy()
    for _ in range(radius):
        m = out.copy()
        m[1:] |= out[:-1]
        m[:-1] |= out[1:]
        m[:, 1:] |= m[:, :-1].copy()
        m[:, :-1] |= m[:, 1:].copy()
        out = m
    return out
