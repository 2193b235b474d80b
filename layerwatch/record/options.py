"""Checking what a user passes to ``LayerWatch``, before anything is built or trained.

Every check raises at construction with the argument's name, what was
expected and what was received, so a typo never costs a training run.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .probes import check_probe_set, probe_arrays, probe_count

MODES = ("new", "append", "overwrite")
CHANNEL_SELECTIONS = ("first", "variance")
COMPRESSIONS = ("gzip", "lzf", None)
DTYPES = ("auto", "float16", "float32")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_every(every: Any) -> tuple[int, bool]:
    """(every, auto) from ``every=N`` or ``every="auto"`` (which starts at 1)."""
    if isinstance(every, str) and every == "auto":
        return 1, True
    if not (_is_int(every) and every >= 1):
        raise ValueError(f"every must be an integer >= 1. Received: every={every!r}. "
                         "every='auto' picks it from the budget.")
    return int(every), False


def check_analysis_probes(analysis_probes: Any, probes: Any) -> Any:
    """Analysis probes structured like ``probes`` (per input), at least 2 of them."""
    if analysis_probes is None:
        return None
    checked = check_probe_set(analysis_probes, name="analysis_probes")
    ours, theirs = probe_arrays(probes), probe_arrays(checked)
    if probe_count(checked) < 2 or len(ours) != len(theirs) or any(
            a.shape[1:] != b.shape[1:] for a, b in zip(ours, theirs)):
        wanted = ", ".join(str(a.shape[1:]) for a in ours)
        got = ", ".join(str(a.shape) for a in theirs)
        raise ValueError(
            f"analysis_probes must hold at least 2 inputs shaped like the probes {wanted}. "
            f"Received: analysis_probes.shape={got}")
    return checked


def check_recording_options(*, analysis_every: Any, max_channels: Any, channel_selection: Any,
                            budget: Any, auto_every: bool, dtype: Any, compression: Any,
                            flush_seconds: Any, flush_snapshots: Any,
                            disk_budget: Any = None) -> None:
    """Raise ValueError naming the first argument that is out of range."""
    if not (_is_int(analysis_every) and analysis_every >= 1):
        raise ValueError("analysis_every must be an integer >= 1. Received: "
                         f"analysis_every={analysis_every!r}")
    if max_channels is not None and not (_is_int(max_channels) and max_channels >= 1):
        raise ValueError("max_channels must be an integer >= 1, or None for all channels. "
                         f"Received: max_channels={max_channels!r}")
    if channel_selection not in CHANNEL_SELECTIONS:
        raise ValueError(f"channel_selection must be one of {CHANNEL_SELECTIONS}. "
                         f"Received: channel_selection={channel_selection!r}")
    if budget is not None and (isinstance(budget, bool) or not isinstance(
            budget, (int, float)) or not 0 < budget < 1):
        raise ValueError("budget must be a share of step time between 0 and 1 (e.g. 0.2), "
                         f"or None. Received: budget={budget!r}")
    if disk_budget is not None and (isinstance(disk_budget, bool) or not isinstance(
            disk_budget, (int, float)) or not disk_budget > 0):
        raise ValueError("disk_budget must be a number of bytes > 0 (e.g. 2e9), or None. "
                         f"Received: disk_budget={disk_budget!r}")
    if auto_every and budget is None:
        raise ValueError("every='auto' needs a budget to aim for. Received: budget=None")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}. Received: dtype={dtype!r}")
    if compression not in COMPRESSIONS:
        raise ValueError("compression must be 'gzip', 'lzf' or None. "
                         f"Received: compression={compression!r}")
    if not flush_seconds > 0 or int(flush_snapshots) < 1:
        raise ValueError("flush_seconds must be > 0 and flush_snapshots >= 1. Received: "
                         f"flush_seconds={flush_seconds!r}, flush_snapshots={flush_snapshots!r}")


def check_path(path: Any, mode: str) -> str:
    """The recording's path as a string, once it is known to be writable in ``mode``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}. Received: mode={mode!r}")
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"path must be a file path. Received: path={path!r}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"path is a directory; give a file name such as "
                         f"'{os.path.join(path, 'run.h5')}'. Received: path={path!r}")
    if os.path.exists(path):
        if mode == "new":
            raise ValueError(
                f"{path} already exists. Pass mode='append' to continue that recording "
                "(resumed training) or mode='overwrite' to replace it.")
        if not os.access(path, os.W_OK):
            raise OSError(f"Cannot write {path}: permission denied.")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise OSError(f"Cannot write {path}: {parent} is not a writable directory. "
                      "Choose another path for the recording.")
    return path
