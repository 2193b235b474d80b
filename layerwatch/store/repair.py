"""Cutting a recording back: repairing a killed run, and dropping what a resumed run replaces.

A writer killed in SWMR mode leaves the file flagged as open for writing;
:func:`repair_run` copies what was committed into a fresh file. Both repair
and appending cut the file's tables back with :func:`truncate`.
"""

from __future__ import annotations

import os

import h5py
import numpy as np

from . import explanations
from .closing import Handles, abandoned_here, finish
from .files import h5_reason, temporary_beside
from .features import cut_features
from .reader import open_run
from .schema import (ACTIVATIONS, ANALYSIS, ANALYSIS_GRAMS, ANALYSIS_STEPS, FEATURES,
                     METRIC_NAMES, METRICS,
                     PER_SNAPSHOT, SALIENCY, STATUS, STATUS_RECORDING, STATUS_STOPPED, STEPS,
                     RecordingError)


def truncate(node: Handles, snapshots: int, *, metric_rows: dict[str, int],
             analysis_rows: int, occlusion_rows: int | None = None,
             features_rows: int | None = None) -> None:
    """Cut every per-snapshot dataset to ``snapshots`` rows, each metric table
    to ``metric_rows[group]`` rows, the analysis Grams to ``analysis_rows``,
    the occlusion maps to ``occlusion_rows`` (None: as they are) and the
    feature images (if ``features_rows`` is given) to ``features_rows``.
    ``node`` opens the file's datasets (and keeps them open until it is flushed)."""
    f = node.file

    def cut(path: str, rows: int) -> None:
        ds = node(path)
        ds.resize(min(rows, ds.shape[0]), axis=0)

    for name in PER_SNAPSHOT:
        node(name).resize(snapshots, axis=0)
    for key in f[ACTIVATIONS]:
        cut(f"{ACTIVATIONS}/{key}", snapshots)
    if SALIENCY in f:
        cut(SALIENCY, snapshots)
    explanations.cut(node, snapshots, occlusion_rows)
    if ANALYSIS in f:
        node(ANALYSIS_STEPS).resize(analysis_rows, axis=0)
        for key in f[ANALYSIS_GRAMS]:
            cut(f"{ANALYSIS_GRAMS}/{key}", analysis_rows)
    if features_rows is not None and FEATURES in f:
        cut_features(node, features_rows)
    for group, count in metric_rows.items():
        for name in f[METRICS][group]:
            if name != METRIC_NAMES:
                cut(f"{METRICS}/{group}/{name}", count)


def repair_run(path: str | os.PathLike) -> bool:
    """Rewrite a recording whose writer died, so any HDF5 reader opens it.

    A writer killed in SWMR mode leaves the file flagged as open for writing:
    ``h5py.File(path, "r", swmr=True)`` reads it, but a plain
    ``h5py.File(path)`` refuses it ("file is already open for write").
    This copies the snapshots that were committed into a fresh file beside it
    and moves that into place, with the status set to "stopped".

    Returns
    -------
    bool
        True if the file was rewritten, False if its writer closed it (complete
        or stopped: nothing to repair).

    Raises
    ------
    RecordingError
        The file is not a readable recording, or its writer is still running.
    """
    path = os.fspath(path)
    closed = False
    if not abandoned_here(path):  # an abandoned file is not closed, nor opened here plainly
        try:  # closed by its writer (complete or stopped): plain HDF5 opens it already
            with h5py.File(path, "r", locking=False) as f:
                closed = int(f[STATUS][0]) != STATUS_RECORDING
        except Exception:
            closed = False
    with open_run(path) as run:
        if closed:
            return False
        if run.writer_state == "live":
            raise RecordingError(
                f"{path} is still being written by process {run.attrs.get('writer_pid')}; "
                "repair it after that process has stopped.")
        n = run.num_snapshots
        rows = run.committed_metric_rows()
        last = int(run.steps[-1]) if n else -1
        analysis_rows = int(np.searchsorted(run.analysis_steps, last, side="right"))
        occlusion_rows = int(np.searchsorted(run.occlusion_steps, last, side="right"))
        features_rows = int(np.searchsorted(run.feature_steps, last, side="right"))
        tmp = temporary_beside(path, like=path)
        dst = None
        try:
            dst = h5py.File(tmp, "w", libver="latest")
            node = Handles(dst)
            run.copy_into(dst)
            truncate(node, n, metric_rows=rows, analysis_rows=analysis_rows,
                     occlusion_rows=occlusion_rows, features_rows=features_rows)
            if int(node(STATUS)[0]) == STATUS_RECORDING:
                node(STATUS)[0] = STATUS_STOPPED
            done, dst = dst, None
            error = finish(done, node)
            if error is not None:
                raise RecordingError(f"Cannot write {tmp}: {h5_reason(error)}") from error
        except BaseException:
            if dst is not None:  # closed, or abandoned if unwritable
                finish(dst, node)
            os.unlink(tmp)
            raise
    os.replace(tmp, path)
    return True


def steps_after(node: Handles, from_step: int) -> tuple[int, int | None]:
    """(snapshots at or before ``from_step``, the last of their steps or None)."""
    steps = node(STEPS)[:]
    keep = int(np.searchsorted(steps, from_step, side="right"))
    return keep, (int(steps[keep - 1]) if keep else None)
