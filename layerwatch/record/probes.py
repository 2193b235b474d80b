"""Choosing and checking probe images (no Keras needed)."""

from __future__ import annotations

from typing import Any

import numpy as np

_MAX_PROBES = 4096


def one_per_class(x: Any, y: Any, num_classes: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The first example of each class, in class order.

    Parameters
    ----------
    x : array-like, shape (n, ...)
        Examples.
    y : array-like, shape (n,) of integers, or (n, classes) one-hot
        Their labels.
    num_classes : int, optional
        How many classes there are (default: the largest label + 1, or the
        one-hot width).

    Returns
    -------
    probes : ndarray, shape (num_classes, ...)
    labels : ndarray of int64, shape (num_classes,) — ``0, 1, …``

    Raises
    ------
    ValueError
        ``x`` and ``y`` differ in length, labels are not integers or one-hot,
        or some class has no example (the message names it).

    Examples
    --------
    >>> probes, labels = one_per_class(x_test, y_test)    # doctest: +SKIP
    >>> labels
    array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    """
    x = np.asarray(x)
    labels = _as_class_ids(y, name="y")
    if x.ndim < 1 or len(x) != len(labels):
        raise ValueError(f"x and y must have the same length. Received: x.shape={x.shape}, "
                         f"{len(labels)} labels")
    if num_classes is None:
        y_arr = np.asarray(y)
        num_classes = y_arr.shape[1] if y_arr.ndim == 2 else int(labels.max()) + 1 \
            if len(labels) else 0
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1. Received: num_classes={num_classes}")
    first = np.full(num_classes, -1, dtype=np.int64)
    for cls in range(num_classes):
        hits = np.flatnonzero(labels == cls)
        if len(hits):
            first[cls] = hits[0]
    missing = np.flatnonzero(first < 0).tolist()
    if missing:
        raise ValueError(
            f"one_per_class found no example of class(es) {missing} among {len(labels)} "
            "labels. Pass data that holds every class, or num_classes= to pick fewer.")
    return x[first], np.arange(num_classes, dtype=np.int64)


def _as_class_ids(y: Any, *, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:
        if not np.issubdtype(y.dtype, np.number):
            raise ValueError(f"{name} must hold numbers. Received: {name}.dtype={y.dtype}")
        return np.argmax(y, axis=1).astype(np.int64)
    if y.ndim == 2:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"{name} must be integer labels (n,) or one-hot (n, classes). "
                         f"Received: {name}.shape={y.shape}")
    if y.dtype.kind == "f" and len(y) and not np.all(np.mod(y, 1) == 0):
        raise ValueError(f"{name} must be integer class labels. Received floats such as "
                         f"{float(y[np.mod(y, 1) != 0][0])!r}")
    if y.dtype.kind not in "iuf" and not (y.dtype.kind == "b"):
        raise ValueError(f"{name} must be integer class labels. Received: "
                         f"{name}.dtype={y.dtype}")
    if len(y) and y.min() < 0:
        raise ValueError(f"{name} must be class labels >= 0. Received: {y.min()}")
    return y.astype(np.int64)


def check_probes(probes: Any, *, name: str = "probes") -> np.ndarray:
    """Probes as a numeric array (probes, *input shape), or a clear error."""
    try:
        arr = np.asarray(probes)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be an array of inputs (probes, *input shape). "
                         f"Received an object numpy cannot stack: {exc}") from None
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric (float or integer images). Received: "
                         f"{name}.dtype={arr.dtype}")
    if arr.ndim < 2 or arr.shape[0] < 1:
        raise ValueError(
            f"{name} must be a batch shaped (probes, *input shape), e.g. (10, 28, 28, 1). "
            f"Received: {name}.shape={arr.shape}. For a single image use probes[None].")
    if arr.shape[0] > _MAX_PROBES:
        raise ValueError(f"{name} holds {arr.shape[0]} inputs; at most {_MAX_PROBES} are "
                         "recorded per step. Pick a few representative ones (one_per_class).")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contain NaN or infinite values. Received: "
                         f"{int(np.sum(~np.isfinite(arr)))} non-finite entries")
    return arr


def check_labels(labels: Any, count: int) -> np.ndarray | None:
    """Probe labels as class ids, or None; errors name the expected length."""
    if labels is None:
        return None
    ids = _as_class_ids(labels, name="probe_labels")
    if len(ids) != count:
        raise ValueError(f"probe_labels must have one label per probe ({count}). "
                         f"Received: {len(ids)} labels")
    return ids


def check_probe_set(probes: Any, *, name: str = "probes") -> Any:
    """Probes for a one-input model (an array), or for a multi-input model a
    tuple, list or dict of arrays — one per input, each with the same number
    of probes.

    A list of equally shaped arrays is stacked into one array (a list of
    images); :func:`layerwatch.record.extractor.arrange_probes` splits it
    again if the model turns out to take that many inputs.
    """
    if isinstance(probes, dict):
        if not probes:
            raise ValueError(f"{name} is an empty dict: give one array per model input.")
        checked: Any = {str(k): check_probes(v, name=f"{name}[{k!r}]") for k, v in probes.items()}
    elif isinstance(probes, tuple) or isinstance(probes, list) and len(probes) > 1 and all(
            isinstance(p, np.ndarray) and p.ndim >= 2 for p in probes) and len(
            {p.shape for p in probes}) > 1:
        checked = [check_probes(p, name=f"{name}[{i}]") for i, p in enumerate(probes)]
    else:
        return check_probes(probes, name=name)
    counts = {len(a) for a in probe_arrays(checked)}
    if len(counts) != 1:
        raise ValueError(f"{name} must hold the same number of probes for every input. "
                         f"Received: {sorted(counts)}")
    return checked


def probe_count(probes: Any) -> int:
    """How many probes a :func:`check_probe_set` result holds."""
    if isinstance(probes, dict):
        return len(next(iter(probes.values())))
    if isinstance(probes, list):
        return len(probes[0])
    return len(probes)


def probe_arrays(probes: Any) -> list[np.ndarray]:
    """The arrays of a :func:`check_probe_set` result, in order."""
    if isinstance(probes, dict):
        return list(probes.values())
    return list(probes) if isinstance(probes, list) else [probes]
