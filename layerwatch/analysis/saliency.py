"""How much of each probe's saliency (and Grad-CAM mass) falls on the digit's strokes.

A number for what the saliency and Grad-CAM pictures show: per probe, the
share of ``|saliency|`` (summed over input channels) on the probe's *strokes* —
its pixels above ``threshold`` of the way from its darkest to its brightest
value (default 0.5: above mid-range; the input averaged over channels) —
against the strokes' share of the image area. A map that ignores the image
puts about the area share on the strokes; one that follows the digit puts
more. Grad-CAM maps are taken as drawn: upsampled to the input's size by
nearest neighbour, then measured the same way (they are ≥ 0 already).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from layerwatch.store import Run, open_run

#: Default stroke threshold, as a fraction of each probe's own value range.
STROKE_THRESHOLD = 0.5


@dataclass(frozen=True)
class StrokeShares:
    """Stroke shares of one run at a few steps.

    Attributes
    ----------
    steps : (S,) int64
        The steps measured (first, evenly spaced between, last).
    area : (P,) float64
        Per probe, the strokes' share of the image area.
    saliency : (S, P) float64 or None
        Per step and probe, the share of ``|saliency|`` on the strokes (NaN where
        the map is all zero); None when the run holds no saliency maps.
    gradcam : dict of layer key -> (S, P) float64
        The same for each layer's Grad-CAM mass (empty without Grad-CAM).
    labels : (P,) int64 or None
        The probes' labels.
    threshold : float
    """

    steps: np.ndarray
    area: np.ndarray
    saliency: np.ndarray | None
    gradcam: dict[str, np.ndarray] = field(default_factory=dict)
    labels: np.ndarray | None = None
    threshold: float = STROKE_THRESHOLD

    def table(self) -> str:
        """One block per map: a row per probe (its label and stroke area, then the
        share on strokes at each step), and the mean over probes of share ÷ area."""
        head = "probe label  area  " + "  ".join(f"{'step ' + str(s):>10}" for s in self.steps)
        lines = [(f"share of each map on the strokes (probe pixels above {self.threshold:g} "
                  "of the probe's range) vs the strokes' share of the area:")]
        maps = [(f"Grad-CAM {key}", values) for key, values in self.gradcam.items()]
        if self.saliency is not None:
            maps.insert(0, ("saliency |d output / d input|", self.saliency))
        for title, values in maps:
            lines += ["", title, head]
            for p in range(len(self.area)):
                label = "-" if self.labels is None else str(int(self.labels[p]))
                cells = "  ".join(f"{_percent(v):>10}" for v in values[:, p])
                lines.append(f"{p:>5} {label:>5} {_percent(self.area[p]):>5}  {cells}")
            ratio = np.nanmean(values / self.area[None, :], axis=1)
            lines.append(f"{'share ÷ area, mean':>17}  "
                         + "  ".join(f"{r:>9.2f}x" for r in ratio))
        return "\n".join(lines)


def _percent(value: float) -> str:
    return "nan" if not np.isfinite(value) else f"{100 * value:.0f}%"


def stroke_mask(probes_x: np.ndarray, *, threshold: float = STROKE_THRESHOLD,
                channels_first: bool = False) -> np.ndarray:
    """``(P, h, w)`` bool: each probe's pixels above ``threshold`` of its own range
    (the image averaged over input channels)."""
    images = _images(np.asarray(probes_x, dtype=np.float64), channels_first)
    lo = images.min(axis=(1, 2), keepdims=True)
    hi = images.max(axis=(1, 2), keepdims=True)
    return images > lo + threshold * (hi - lo)


def _images(x: np.ndarray, channels_first: bool) -> np.ndarray:
    """Per-probe arrays of an image input, as (P, h, w) (mean over channels)."""
    if x.ndim == 3:
        return x
    if x.ndim == 4:
        return x.mean(axis=1 if channels_first else 3)
    raise ValueError(f"stroke shares need image probes, (P, h, w[, channels]). Received "
                     f"probes of shape {x.shape}.")


def _share(mass: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per probe, the share of non-negative ``mass`` (P, h, w) on ``mask``."""
    total = mass.sum(axis=(1, 2))
    on = (mass * mask).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, on / np.where(total > 0, total, 1), np.nan)


def _upsample(maps: np.ndarray, h: int, w: int) -> np.ndarray:
    """(P, gh, gw) -> (P, h, w) by nearest neighbour, as the pictures draw them."""
    gh, gw = maps.shape[1:]
    return maps[:, (np.arange(h) * gh) // h][:, :, (np.arange(w) * gw) // w]


def stroke_shares(path: str | os.PathLike | Run, *, points: int = 5,
                  threshold: float = STROKE_THRESHOLD) -> StrokeShares:
    """Measure, per probe, how much of its saliency and Grad-CAM mass falls on its strokes.

    Parameters
    ----------
    path
        A recording made with ``saliency=True`` and/or ``gradcam=True`` (or an open Run).
    points
        How many steps to measure: the first, the last and evenly spaced ones between.
    threshold
        A pixel is on a stroke when it is above ``threshold`` of the way from its
        probe's darkest to its brightest value.

    Returns
    -------
    StrokeShares

    Raises
    ------
    ValueError
        The run holds neither saliency nor Grad-CAM maps, or an option is out of range.
    """
    if not (isinstance(points, (int, np.integer)) and points >= 1):
        raise ValueError(f"points must be an integer >= 1. Received: points={points!r}")
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1). Received: threshold={threshold!r}")
    if isinstance(path, Run):
        return _measure(path, points, threshold)
    with open_run(path) as run:
        return _measure(run, points, threshold)


def _measure(run: Run, points: int, threshold: float) -> StrokeShares:
    if not (run.has_saliency or run.has_gradcam):
        raise ValueError(f"{run.path} holds neither saliency nor Grad-CAM maps: record with "
                         "LayerWatch(..., saliency=True) or gradcam=True.")
    n = run.num_snapshots
    if n == 0:
        raise ValueError(f"{run.path} holds no snapshot yet: nothing to measure.")
    channels_first = run.attrs.get("image_data_format") == "channels_first"
    mask = stroke_mask(run.probes_x(), threshold=threshold, channels_first=channels_first)
    h, w = mask.shape[1:]
    indices = np.unique(np.round(np.linspace(0, n - 1, points)).astype(int))
    saliency = None
    if run.has_saliency:
        saliency = np.stack([_share(_abs_images(s, channels_first), mask)
                             for s in run.iter_saliency(indices.tolist())])
    gradcam = {key: np.stack([_share(_upsample(np.maximum(c, 0), h, w), mask)
                              for c in run.iter_gradcam(key, indices.tolist())])
               for key in run.gradcam_layers}
    return StrokeShares(steps=run.steps[indices], area=mask.mean(axis=(1, 2)),
                        saliency=saliency, gradcam=gradcam, labels=run.probes_y(),
                        threshold=threshold)


def _abs_images(saliency: np.ndarray, channels_first: bool) -> np.ndarray:
    """|saliency| summed over input channels: (P, h, w)."""
    a = np.abs(saliency.astype(np.float64))
    if a.ndim == 4:
        return a.sum(axis=1 if channels_first else 3)
    return a
