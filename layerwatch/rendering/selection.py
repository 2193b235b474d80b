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


def by_change(indices: np.ndarray, changes: np.ndarray, count: int) -> np.ndarray:
    """At most ``count`` of ``indices``, kept where the picture changes, the
    quiet stretches thinned first; the first and last always kept.

    ``changes[i]`` is how much the frame of ``indices[i]`` differs from the one
    before it (e.g. the cells whose colour changed). Frames are taken evenly
    spaced in accumulated change, so a stretch holding a tenth of the run's
    change gets a tenth of the frames, however many steps it spans; frames left
    over where single steps change a lot go to the largest changes not yet kept.

    Examples
    --------
    >>> by_change(np.arange(8), np.array([0, 9, 9, 9, 0, 0, 0, 1]), 5).tolist()
    [0, 1, 2, 3, 7]
    """
    indices = np.asarray(indices)
    if len(indices) <= count:
        return indices
    weight = np.maximum(np.asarray(changes, dtype=np.float64), 0.0)
    weight[0] = 0.0
    total = weight.sum()
    keep = {0, len(indices) - 1}
    if total > 0:
        cumulative = np.cumsum(weight)
        targets = np.linspace(0.0, total, count)[1:-1]
        keep.update(np.searchsorted(cumulative, targets, side="left").tolist())
    spare = count - len(keep)
    if spare > 0:
        order = np.argsort(-weight, kind="stable")
        keep.update(int(i) for i in order if i not in keep and weight[i] > 0)
        keep = set(sorted(keep, key=lambda i: (i not in {0, len(indices) - 1}, -weight[i]))[
            :count])
    if len(keep) < count:  # nothing changes: fall back to even spacing
        keep.update(evenly_spaced(len(indices), count).tolist())
        keep = set(sorted(keep)[:count])
    return indices[np.array(sorted(keep), dtype=np.int64)]

