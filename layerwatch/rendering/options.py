"""Checking the rendering options every picture-writing entry point shares."""

from __future__ import annotations

import math

import numpy as np

MAX_SCALE = 16
MAX_FPS = 50.0  # GIF delays are whole hundredths of a second; viewers slow faster ones


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_options(*, every=None, max_frames=None, fps=10.0, scale=1, max_channels=None,
                  max_bytes=None) -> None:
    """Raise ValueError naming the first option out of range."""
    if every is not None and not (_is_int(every) and every >= 1):
        raise ValueError(f"every must be an integer >= 1. Received: every={every!r}")
    if max_frames is not None and not (_is_int(max_frames) and max_frames >= 2):
        raise ValueError("max_frames must be an integer >= 2 (the first and last frames are "
                         f"always kept). Received: max_frames={max_frames!r}")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= MAX_FPS:
        raise ValueError(f"fps must be a number in (0, {MAX_FPS:g}]. Received: fps={fps!r}")
    if not (_is_int(scale) and 1 <= scale <= MAX_SCALE):
        raise ValueError(f"scale must be an integer from 1 to {MAX_SCALE}. "
                         f"Received: scale={scale!r}")
    if max_channels is not None and not (_is_int(max_channels) and max_channels >= 1):
        raise ValueError("max_channels must be an integer >= 1, or None for all. "
                         f"Received: max_channels={max_channels!r}")
    if max_bytes is not None and not (_is_int(max_bytes) and max_bytes >= 1):
        raise ValueError(f"max_bytes must be a positive integer. Received: max_bytes={max_bytes!r}")


def check_range(value_range) -> tuple[float, float] | None:
    """``(low, high)`` from ``m`` (for -m..m) or a pair; None stays None."""
    if value_range is None:
        return None
    if isinstance(value_range, (int, float, np.number)) and not isinstance(value_range, bool):
        low, high = -abs(float(value_range)), abs(float(value_range))
    else:
        try:
            low, high = (float(v) for v in value_range)
        except (TypeError, ValueError):
            raise ValueError("value_range must be a number m (for -m..m) or a pair (low, high). "
                             f"Received: value_range={value_range!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError("value_range must be finite with low < high (or m > 0). "
                         f"Received: value_range={value_range!r}")
    return low, high
