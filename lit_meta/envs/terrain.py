"""Height-field terrains for ``HalfCheetahSlopes``: piecewise-linear slope profiles along x.

A terrain is a list of ``n_segments`` slopes (rise over run), each over ``segment_length`` metres,
starting at ``slope_start`` (flat at height 0 before it) and flat at its final height after the last
segment. The task vector of a terrain is its slope list, so equal terrains have equal vectors.

* train: ``random`` -- i.i.d. slopes U(-max_slope, max_slope) per segment; a segment that would take
  the height outside ``[-max_height, max_height]`` has its slope flipped (the stored slopes are the
  flipped ones, so the task reproduces the terrain).
* test (held out, named as in Nagabandi et al. 2019): ``basin`` (down then up), ``hill`` (up then
  down), ``gentle`` (a long gentle climb), ``steep`` (a climb steeper than any training slope, a
  plateau, then a steep descent). Their shapes scale with ``n_segments``.
"""

from __future__ import annotations

import numpy as np

TEST_TERRAINS = ("basin", "hill", "gentle", "steep")


def named_slopes(name: str, n_segments: int) -> list[float]:
    """The slope list of a named (test) terrain."""
    q = max(1, n_segments // 4)
    f = max(1, n_segments // 5)
    if name == "basin":
        slopes = [-0.2] * q + [0.2] * q
    elif name == "hill":
        slopes = [0.2] * q + [-0.2] * q
    elif name == "gentle":
        slopes = [0.08] * max(1, n_segments // 2)
    elif name == "steep":
        slopes = [0.35] * f + [0.0] * f + [-0.35] * f
    else:
        raise ValueError(f"terrain={name!r} is not a named terrain: use one of {TEST_TERRAINS}")
    slopes = slopes[:n_segments]
    return [float(s) for s in slopes + [0.0] * (n_segments - len(slopes))]


def random_slopes(rng: np.random.Generator, n_segments: int, max_slope: float, segment_length: float,
                  max_height: float) -> list[float]:
    """i.i.d. U(-max_slope, max_slope) slopes, flipped where the height would leave +-max_height."""
    slopes, h = [], 0.0
    for s in rng.uniform(-max_slope, max_slope, size=n_segments):
        s = float(s)
        if abs(h + s * segment_length) > max_height:
            s = -s
        h += s * segment_length
        slopes.append(s)
    return slopes


def breakpoints(slopes, slope_start: float, segment_length: float) -> tuple[np.ndarray, np.ndarray]:
    """x and height at the segment ends (the first point is ``(slope_start, 0)``)."""
    xs = slope_start + segment_length * np.arange(len(slopes) + 1)
    hs = np.concatenate([[0.0], np.cumsum(np.asarray(slopes, dtype=np.float64) * segment_length)])
    return xs, hs


def height_at(x, slopes, slope_start: float, segment_length: float) -> np.ndarray:
    """Terrain height at positions ``x`` (flat before the first and after the last segment)."""
    xs, hs = breakpoints(slopes, slope_start, segment_length)
    return np.interp(x, xs, hs)


def hfield_rows(slopes, *, x_min: float, x_max: float, ncol: int, nrow: int, slope_start: float,
                segment_length: float, max_height: float) -> np.ndarray:
    """MuJoCo ``hfield_data`` (row-major ``[nrow * ncol]``, values in [0, 1]) for a field spanning
    ``[x_min, x_max]`` whose elevation range is ``[-max_height, max_height]``."""
    x = np.linspace(x_min, x_max, ncol)
    h = height_at(x, slopes, slope_start, segment_length)
    data = (h + max_height) / (2.0 * max_height)
    if data.min() < 0.0 or data.max() > 1.0:
        raise ValueError(f"terrain height {h.min():.2f}..{h.max():.2f} m leaves the height field's range "
                         f"[-{max_height}, {max_height}] m: increase max_height or use smaller slopes")
    return np.tile(data, nrow).astype(np.float32)
