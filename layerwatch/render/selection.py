"""Which snapshots become frames: every N-th, at most M, evenly spaced, first and last kept."""

from __future__ import annotations

import numpy as np


def evenly_spaced(indices: np.ndarray | int, count: int) -> np.ndarray:
    """At most ``count`` of ``indices`` (or of ``range(indices)``), evenly spaced,
    the first and the last kept.

    Examples
    --------
    >>> evenly_spaced(10, 3).tolist()
    [0, 4, 9]
    """
    indices = np.arange(indices) if np.isscalar(indices) else np.asarray(indices)
    if len(indices) <= count:
        return indices
    picks = np.unique(np.round(np.linspace(0, len(indices) - 1, count)).astype(int))
    return indices[picks]


def select_frames(n: int, *, every: int | None = None, max_frames: int | None = None
                  ) -> np.ndarray:
    """Snapshot indices to draw: every ``every``-th, at most ``max_frames``, first and last kept.

    Examples
    --------
    >>> select_frames(10, every=4).tolist()
    [0, 4, 8, 9]
    >>> select_frames(10, max_frames=3).tolist()
    [0, 4, 9]
    """
    indices = np.arange(n)
    if every is not None and every > 1:
        indices = np.union1d(indices[::every], [n - 1])
    if max_frames is not None:
        indices = evenly_spaced(indices, max_frames)
    return indices
