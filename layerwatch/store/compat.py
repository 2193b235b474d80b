"""Reading files of earlier format versions as the current one.

Version 1 stored Keras' epoch-so-far running means in ``metrics/batch`` under the
metrics' own names. Read today, those columns are named ``<name>_running_mean``,
and ``<name>`` holds each step's own value, recovered as ``k m_k - (k-1) m_(k-1)``
within each epoch: exact with equal batches (a smaller last batch of an epoch
comes out approximate; version 2 files are exact there too).
"""

from __future__ import annotations

import numpy as np

from .schema import RUNNING_MEAN

#: Batch-log columns that were never running means.
_NOT_MEANS = ("learning_rate", "lr")


def version_1_batch_metrics(names: list[str], steps: np.ndarray, values: np.ndarray,
                            epoch_ends: np.ndarray) -> tuple[list[str], np.ndarray]:
    """(names, values) of a version 1 ``metrics/batch`` table, read as version 2."""
    epoch_of_row = np.searchsorted(np.asarray(epoch_ends), steps, side="left")
    out_names, columns = [], []
    for j, name in enumerate(names):
        column = values[:, j]
        if name in _NOT_MEANS:
            out_names.append(name)
            columns.append(column)
            continue
        out_names += [name + RUNNING_MEAN, name]
        columns += [column, _per_step(column, epoch_of_row)]
    table = np.stack(columns, axis=1) if columns else np.zeros((len(steps), 0))
    return out_names, table


def _per_step(running: np.ndarray, epoch_of_row: np.ndarray) -> np.ndarray:
    """Each row's own value from running means that restart with every epoch."""
    out = np.full_like(running, np.nan)
    for epoch in np.unique(epoch_of_row):
        rows = np.flatnonzero((epoch_of_row == epoch) & np.isfinite(running))
        k = np.arange(1, len(rows) + 1, dtype=np.float64)
        m = running[rows]
        previous = np.concatenate([[0.0], m[:-1]])
        out[rows] = k * m - (k - 1) * previous
    return out
