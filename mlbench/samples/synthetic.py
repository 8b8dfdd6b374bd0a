"""Synthetic bright-field tumour-spheroid images with known instance labels.

Real spheroid images are dark, textured, roughly round bodies on a bright, uneven
background, with a bright halo (the refraction ring) just outside the body and, in
large spheroids, a lighter necrotic core. :func:`make_spheroids` draws exactly that,
deterministically from an ``rng``, so that models can be trained and every test has a
known answer.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from mlbench.errors import OptionsError

__all__ = ["make_spheroids"]


def _smooth_noise(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-std noise smoothed at scale ``sigma`` pixels."""
    noise = ndi.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    std = noise.std()
    return noise / std if std > 0 else noise


def _background(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Bright, uneven illumination: a tilted plane, vignetting and slow blotches."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    rows /= max(shape[0] - 1, 1)
    cols /= max(shape[1] - 1, 1)
    tilt = rng.uniform(-0.06, 0.06) * (rows - 0.5) + rng.uniform(-0.06, 0.06) * (cols - 0.5)
    vignette = -0.08 * ((rows - 0.5) ** 2 + (cols - 0.5) ** 2)
    blotches = 0.02 * _smooth_noise(shape, max(shape) / 12, rng)
    return rng.uniform(0.72, 0.84) + tilt + vignette + blotches


def _body_mask(shape, center, radius, rng) -> np.ndarray:
    """A roughly round body: an ellipse whose radius wobbles with a few harmonics.

    Computed inside the body's bounding box only, so cost scales with the body, not the image.
    """
    mask = np.zeros(shape, dtype=bool)
    reach = int(np.ceil(radius * 1.25)) + 1
    r0, r1 = max(int(center[0]) - reach, 0), min(int(center[0]) + reach + 1, shape[0])
    c0, c1 = max(int(center[1]) - reach, 0), min(int(center[1]) + reach + 1, shape[1])
    rows, cols = np.ogrid[r0:r1, c0:c1]
    d_row, d_col = rows - center[0], cols - center[1]
    angle = np.arctan2(d_row, d_col)
    theta = rng.uniform(0, np.pi)
    elong = rng.uniform(0.8, 1.0)
    along = d_col * np.cos(theta) + d_row * np.sin(theta)
    across = -d_col * np.sin(theta) + d_row * np.cos(theta)
    dist = np.sqrt(along**2 + (across / elong) ** 2)
    wobble = np.ones_like(angle)
    for k in (2, 3, 5):
        wobble = wobble + rng.uniform(0, 0.06) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
    mask[r0:r1, c0:c1] = dist <= radius * wobble
    return mask


def _place_centers(shape, radii, touching, rng) -> list[tuple[float, float]]:
    """Centres that mostly avoid each other; with ``touching`` some pairs share a border."""
    centers: list[tuple[float, float]] = []
    for i, radius in enumerate(radii):
        for _attempt in range(200):
            if touching and centers and i % 3 == 1:
                r0, c0 = centers[-1]
                angle = rng.uniform(0, 2 * np.pi)
                gap = radii[i - 1] + radius
                cand = (r0 + gap * np.sin(angle), c0 + gap * np.cos(angle))
            else:
                cand = (rng.uniform(radius, shape[0] - radius), rng.uniform(radius, shape[1] - radius))
            inside = radius * 0.6 <= cand[0] <= shape[0] - radius * 0.6 and radius * 0.6 <= cand[1] <= shape[1] - radius * 0.6
            clear = all(np.hypot(cand[0] - r, cand[1] - c) > 0.95 * (radius + radii[j]) for j, (r, c) in enumerate(centers))
            if inside and clear:
                centers.append(cand)
                break
    return centers


def make_spheroids(
    shape: tuple[int, int],
    n: int,
    rng: np.random.Generator,
    *,
    radius_range: tuple[float, float] | None = None,
    hole_fraction: float = 0.3,
    touching: bool = True,
    noise: float = 0.02,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw a synthetic bright-field image of tumour spheroids.

    Parameters
    ----------
    shape : (H, W)
        Image size in pixels.
    n : int
        Number of spheroids to place (fewer are placed when they do not fit).
    rng : numpy.random.Generator
        Source of all randomness; the same seed gives the same image.
    radius_range : (float, float), optional
        Smallest and largest radius in pixels; default 4% to 14% of the shorter side.
    hole_fraction : float
        Fraction of spheroids (radius >= 14 px) drawn with a necrotic core, which is a
        hole in the labels (background inside the body).
    touching : bool
        Place every third spheroid against the previous one.
    noise : float
        Standard deviation of the additive Gaussian noise.

    Returns
    -------
    image : (H, W) float32 in [0, 1]
        Bright background (about 0.75), dark bodies (about 0.3), bright halos.
    labels : (H, W) int32
        Instance labels, 0 for background, 1..k for the k spheroids placed.
    """
    if len(shape) != 2 or min(shape) < 16:
        raise OptionsError(f"shape must be (H, W) with both sides >= 16, got {shape!r}; pass e.g. (256, 256)")
    if n < 0:
        raise OptionsError(f"n must be >= 0, got {n}; pass the number of spheroids to draw")
    short = min(shape)
    lo, hi = radius_range or (0.04 * short, 0.14 * short)
    radii = sorted(rng.uniform(lo, hi, size=n), reverse=True)
    centers = _place_centers(shape, radii, touching, rng)
    labels = np.zeros(shape, dtype=np.int32)
    holes = np.zeros(shape, dtype=bool)
    for k, (center, radius) in enumerate(zip(centers, radii), start=1):
        body = _body_mask(shape, center, radius, rng) & (labels == 0)
        labels[body] = k
        if radius >= 14 and rng.uniform() < hole_fraction:
            core = _body_mask(shape, center, radius * rng.uniform(0.25, 0.4), rng) & body
            holes |= core
    labels[holes] = 0
    labels = _relabel(labels)
    return _render(labels, holes, rng, noise), labels


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Consecutive ids 1..k in order of first appearance (row-major)."""
    ids = [i for i in dict.fromkeys(labels.ravel().tolist()) if i != 0]
    lut = np.zeros(labels.max() + 1, dtype=np.int32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return lut[labels]


def _render(labels: np.ndarray, holes: np.ndarray, rng, noise: float) -> np.ndarray:
    """Paint background, textured dark bodies, bright halos and lighter necrotic cores."""
    shape = labels.shape
    fg = labels > 0
    inside = ndi.distance_transform_edt(fg | holes)
    outside = ndi.distance_transform_edt(~(fg | holes))
    image = _background(shape, rng)
    halo = 0.14 * np.exp(-outside / 3.0) * (outside > 0)
    image = image + halo
    texture = 0.05 * _smooth_noise(shape, 2.0, rng)
    body_level = rng.uniform(0.22, 0.38) + texture - 0.08 * np.exp(-inside / 4.0)
    image = np.where(fg, body_level, image)
    core_level = rng.uniform(0.5, 0.6) + 0.03 * _smooth_noise(shape, 3.0, rng)
    image = np.where(holes, core_level, image)
    image = ndi.gaussian_filter(image, 0.8)
    image = image + noise * rng.standard_normal(shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32)
