"""Cutting a recording back: repairing a killed run, and dropping what a resumed run replaces.

A writer killed in SWMR mode leaves the file flagged as open for writing;
:func:`repair_run` copies what was committed into a fresh file. Both repair
and appending cut the file's tables back with :func:`truncate`.
"""

from __future__ import annotations

import os

import h5py
import numpy as np

from .files import temporary_beside
from .reader import open_run
from .schema import (ACTIVATIONS, ANALYSIS, ANALYSIS_GRAMS, ANALYSIS_STEPS, METRIC_NAMES, METRICS,
                     PER_SNAPSHOT, STATUS, STATUS_RECORDING, STATUS_STOPPED, STEPS, RecordingError)


def truncate(f: h5py.File, snapshots: int, *, metric_rows: dict[str, int],
             analysis_rows: int) -> None:
    """Cut every per-snapshot dataset to ``snapshots`` rows, each metric table
    to ``metric_rows[group]`` rows and the analysis Grams to ``analysis_rows``."""
    for name in PER_SNAPSHOT:
        f[name].resize(snapshots, axis=0)
    for ds in f[ACTIVATIONS].values():
        ds.resize(min(snapshots, ds.shape[0]), axis=0)
    if ANALYSIS in f:
        f[ANALYSIS_STEPS].resize(analysis_rows, axis=0)
        for ds in f[ANALYSIS_GRAMS].values():
            ds.resize(min(analysis_rows, ds.shape[0]), axis=0)
    for group, count in metric_rows.items():
        for ds in f[METRICS][group].values():
            if ds.name.rsplit("/", 1)[-1] != METRIC_NAMES:
                ds.resize(min(count, ds.shape[0]), axis=0)


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
        tmp = temporary_beside(path, like=path)
        try:
            run.copy_to(tmp)
            with h5py.File(tmp, "r+", libver="latest") as dst:
                truncate(dst, n, metric_rows=rows, analysis_rows=analysis_rows)
                if int(dst[STATUS][0]) == STATUS_RECORDING:
                    dst[STATUS][0] = STATUS_STOPPED
        except BaseException:
            os.unlink(tmp)
            raise
    os.replace(tmp, path)
    return True


def steps_after(f: h5py.File, from_step: int) -> tuple[int, int | None]:
    """(snapshots at or before ``from_step``, the last of their steps or None)."""
    steps = f[STEPS][:]
    keep = int(np.searchsorted(steps, from_step, side="right"))
    return keep, (int(steps[keep - 1]) if keep else None)
