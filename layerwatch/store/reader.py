"""The reader: a recording opened for reading, validated before anything is trusted.

:class:`Run` works on a complete file, on one still being written (SWMR) and
on one whose writer was killed. Everything taken from a file is checked
first, so a damaged or crafted file ends in :class:`RecordingError` rather
than a crash or an absurd allocation. Names come from
:mod:`layerwatch.store.schema`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import h5py
import numpy as np

from layerwatch.text import printable

from .closing import abandoned_here
from .compat import version_1_batch_metrics
from .explanations import ExplanationReads, gradcam_rows, refresh as refresh_explanations
from .features import FeaturesReading
from .files import h5_reason, open_for_reading
from .schema import (ACTIVATIONS, ANALYSIS, ANALYSIS_GRAMS, ANALYSIS_PROBES, ANALYSIS_STEPS,
                     ATTR_FLUSH_SECONDS, ATTR_FORMAT_VERSION, ATTR_INPUT_INDEX, ATTR_STORAGE_DTYPE,
                     ATTR_WRITER_HOST, ATTR_WRITER_PID, EPOCHS, HEARTBEAT, META, METRICS,
                     METRIC_GROUPS, METRIC_NAMES, METRIC_VALUES, PER_SNAPSHOT, PROBES_X, PROBES_Y, SALIENCY,
                     PROBE_INPUTS, STATUS, STATUS_COMPLETE, STATUS_RECORDING, STEPS, STORAGE_DTYPES,
                     WALL_TIME, RecordingError)
from .validate import MAX_ATTRS, MAX_RANK, MAX_SNAPSHOT_ELEMENTS, Checker, LayerInfo, attr

_MAX_TEXT_BYTES = 64 * 1024 * 1024
_SCAN_ELEMENTS = 1 << 22  # elements read per block when scanning a layer


@dataclass(frozen=True)
class Metrics:
    """Scalar logs: ``values[:, j]`` is the metric ``names[j]`` at ``index``."""

    names: list[str]
    steps: np.ndarray
    values: np.ndarray
    epochs: np.ndarray | None = None

    def get(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of one metric, rows without a value dropped."""
        column = self.values[:, self.names.index(name)]
        keep = ~np.isnan(column)
        return self.steps[keep], column[keep]


class Run(ExplanationReads, FeaturesReading):
    """A recording opened for reading. Use :func:`open_run` or :func:`read_run`.

    Works on a file still being written (it reads the snapshots committed so
    far; call :meth:`refresh` to see newer ones) and on one whose writer died.
    Activations are read lazily, one snapshot at a time if wanted, so long runs
    need not fit in memory. Everything taken from the file is checked first: a
    damaged or crafted file raises :class:`RecordingError`, never an absurd
    allocation.
    """

    def __init__(self, path: str):
        self.path = str(path)
        self._f = open_for_reading(self.path)
        try:
            with self._reading():
                self._check = Checker(self._f, self.path)
                self.layers: list[LayerInfo] = self._check.validate()
                self._count()
        except BaseException:
            self._f.close()
            raise

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._f.close()
        except Exception:  # closing a damaged file must not hide the real error
            pass

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """Turn what h5py/numpy raise on a damaged file into RecordingError."""
        try:
            yield
        except RecordingError:
            raise
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError,
                IndexError, OverflowError, MemoryError, UnicodeError) as exc:
            raise RecordingError(f"{self.path} is damaged: {h5_reason(exc)}") from exc

    def _count(self) -> None:
        """How many snapshots are committed: the shortest per-snapshot dataset,
        cut where ``steps`` stops increasing (an index that grew on disk
        before its values were written reads as the fill value -1)."""
        f = self._f
        n = min(f[name].shape[0] for name in PER_SNAPSHOT)
        for layer in self.layers:
            n = min(n, f[ACTIVATIONS][layer.key].shape[0])
        if SALIENCY in f:
            n = min(n, f[SALIENCY].shape[0])
        cams = gradcam_rows(f)  # Grad-CAM rows bound it like saliency's
        if cams is not None:
            n = min(n, cams)
        steps = np.asarray(f[STEPS][:n], dtype=np.int64)
        bad = np.flatnonzero((steps < 0) | (np.diff(steps, prepend=-1) <= 0))
        if len(bad):
            n = int(bad[0])
        self._n = int(n)
        self._steps = steps[:n]

    def _metric_rows(self, group: str) -> int:
        g = self._f[METRICS][group]
        index = METRIC_GROUPS[group]
        step = g[index[-1]]
        n = min([g[METRIC_VALUES].shape[0]] + [g[name].shape[0] for name in index])
        with self._reading():
            steps = np.asarray(step[:n], dtype=np.int64)
        bad = np.flatnonzero(steps < 0)
        return int(bad[0]) if len(bad) else int(n)

    # -- what is in it ------------------------------------------------------ #

    @property
    def attrs(self) -> dict[str, Any]:
        """The root attributes (run metadata), as plain Python values.

        Attributes too large or of types that are not plain values are left out.
        """
        out: dict[str, Any] = {}
        with self._reading():
            for i, key in enumerate(self._f.attrs):
                if i >= MAX_ATTRS:
                    break
                value = attr(self._f, key)
                if value is not None:
                    out[printable(key)[:200]] = value
        return out

    @property
    def storage_dtype(self) -> str:
        """``"float16"`` or ``"float32"`` (every layer), or ``"auto"`` (see each
        :attr:`LayerInfo.dtype`)."""
        value = attr(self._f, ATTR_STORAGE_DTYPE)
        return value if value in STORAGE_DTYPES + ("float64",) else "float16"

    def text(self, name: str) -> str | None:
        """A JSON/text document from ``/meta`` (``model_config``, ``summary``)."""
        with self._reading():
            group = self._f.get(META)
            if not isinstance(group, h5py.Group) or name not in group \
                    or not isinstance(group.get(name, getlink=True), h5py.HardLink):
                return None
            ds = group[name]
            if not isinstance(ds, h5py.Dataset) or ds.shape != () \
                    or ds.dtype.kind != "S" or ds.is_virtual \
                    or ds.id.get_create_plist().get_external_count():
                return None
            if ds.id.get_storage_size() > _MAX_TEXT_BYTES:
                return None
            value = ds[()]
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

    @property
    def num_snapshots(self) -> int:
        """Snapshots fully written (committed) when the file was opened or refreshed."""
        return self._n

    @property
    def steps(self) -> np.ndarray:
        return self._steps.copy()

    @property
    def epochs(self) -> np.ndarray:
        with self._reading():
            return np.asarray(self._f[EPOCHS][: self._n], dtype=np.int64)

    @property
    def wall_time(self) -> np.ndarray:
        with self._reading():
            return np.asarray(self._f[WALL_TIME][: self._n], dtype=np.float64)

    @property
    def status(self) -> int:
        """``STATUS_RECORDING`` (0), ``STATUS_COMPLETE`` (1) or ``STATUS_STOPPED`` (2)."""
        with self._reading():
            return int(self._f[STATUS][0])

    @property
    def closed_cleanly(self) -> bool:
        return self.status == STATUS_COMPLETE

    @property
    def heartbeat(self) -> float | None:
        """Wall time of the writer's last flush (it flushes at least every
        ``flush_seconds`` while alive)."""
        with self._reading():
            ds = self._f.get(HEARTBEAT)
            if isinstance(ds, h5py.Dataset) and ds.shape == (1,) and ds.dtype.kind == "f":
                return float(ds[0])
        return None

    @property
    def writer_state(self) -> str:
        """Whether a writer is still at work on this file.

        ``"closed"``: the status is complete or stopped. ``"live"``: the
        writing process is running (same host) and has written recently.
        ``"gone"``: the status says recording but the writing process is gone
        (killed or crashed). ``"stalled"``: the process runs but has not
        written for much longer than its flush interval (recording stopped
        after an error it could not mark in the file). ``"unknown"``: written
        on another host, and it wrote recently.
        """
        if self.status != STATUS_RECORDING:
            return "closed"
        attrs = {key: attr(self._f, key)
                 for key in (ATTR_WRITER_PID, ATTR_WRITER_HOST, ATTR_FLUSH_SECONDS)}
        interval = attrs[ATTR_FLUSH_SECONDS]
        interval = float(interval) if isinstance(interval, (int, float)) \
            and 0 < interval < 1e6 else 2.0
        beat = self.heartbeat
        silent = beat is not None and time.time() - beat > 10 * interval + 30
        pid, host = attrs[ATTR_WRITER_PID], attrs[ATTR_WRITER_HOST]
        if isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid < 1 << 22 \
                and host == socket.gethostname():
            if not _process_exists(pid):
                return "gone"
            if pid == os.getpid() and abandoned_here(self.path):
                return "stalled"  # this process stopped writing it after a write failed
            return "stalled" if silent else "live"
        return "gone" if silent else "unknown"

    def probes_x(self) -> np.ndarray:
        with self._reading():
            return self._f[PROBES_X][()]

    def probe_inputs(self) -> dict[str, np.ndarray]:
        """A multi-input model's probes, input name → array, in input order
        (empty for a one-input model: :meth:`probes_x` is its only input)."""
        with self._reading():
            if PROBE_INPUTS not in self._f:
                return {}
            group = self._f[PROBE_INPUTS]
            names = sorted(group, key=lambda n: (attr(group[n], ATTR_INPUT_INDEX) or 0, n))
            return {printable(n): group[n][()] for n in names}

    def probes_for(self, layer: LayerInfo) -> np.ndarray:
        """The probes the layer's activations come from: its own input's on a
        multi-input model, :meth:`probes_x` otherwise."""
        if layer.probe_input is not None:
            found = self.probe_inputs().get(layer.probe_input)
            if found is not None:
                return found
        return self.probes_x()

    def probes_y(self) -> np.ndarray | None:
        with self._reading():
            return self._f[PROBES_Y][()] if PROBES_Y in self._f else None

    def layer(self, key: str) -> LayerInfo:
        """One recorded layer by its key or its Keras name; KeyError if none."""
        for layer in self.layers:
            if key in (layer.key, layer.layer_name):
                return layer
        raise KeyError(key)

    def select_layers(self, names: Sequence[str] | str | None = None) -> list[LayerInfo]:
        """The layers a user named (keys or Keras names), in their order, each once;
        every recorded layer for ``None``.

        Raises
        ------
        ValueError
            No name was given, or one names no recorded layer.
        """
        if names is None:
            return list(self.layers)
        wanted = [names] if isinstance(names, str) else list(names)
        if not wanted:
            raise ValueError("layers is empty: name at least one layer, or pass None for all.")
        chosen: list[LayerInfo] = []
        for name in wanted:
            try:
                layer = self.layer(name)
            except KeyError:
                known = ", ".join(item.layer_name or item.key for item in self.layers)
                raise ValueError(f"The recording has no layer {name!r}. Recorded layers: "
                                 f"{known}.") from None
            if layer not in chosen:
                chosen.append(layer)
        return chosen

    def activations(self, key: str, index: Any = slice(None)) -> np.ndarray:
        """Activations of one layer, indexed along snapshots (as float32)."""
        layer = self.layer(key)
        with self._reading():
            return self._rows(self._f[ACTIVATIONS][layer.key], index)

    def _rows(self, ds: h5py.Dataset, index: Any) -> np.ndarray:
        """Rows of a per-snapshot dataset, indexed along committed snapshots, as float32."""
        n = self.num_snapshots
        if isinstance(index, (int, np.integer)):
            i = int(index) + (n if index < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(index)
            index = i
        elif isinstance(index, slice):
            index = range(*index.indices(n))
        else:
            index = [int(i) for i in index]
            if any(not 0 <= i < n for i in index):
                raise IndexError(f"snapshot index out of range 0..{n - 1}")
        with self._reading():
            if isinstance(index, int):
                return ds[index].astype(np.float32)
            if isinstance(index, range) and index.step == 1:
                return ds[index.start:index.stop].astype(np.float32)
            if not len(index):
                return np.zeros((0,) + ds.shape[1:], dtype=np.float32)
            return np.stack([ds[i] for i in index]).astype(np.float32)

    def iter_activations(self, key: str, indices: Sequence[int] | None = None
                         ) -> Iterator[np.ndarray]:
        """Yield one snapshot (probes, *shape) at a time, reading from disk."""
        layer = self.layer(key)
        n = self.num_snapshots
        with self._reading():
            ds = self._f[ACTIVATIONS][layer.key]
        return self._iter_rows(ds, n, indices, "snapshot", np.float32)

    def _iter_rows(self, ds: h5py.Dataset, n: int, indices: Sequence[int] | None,
                   what: str, dtype: Any) -> Iterator[np.ndarray]:
        # One open dataset for the whole pass: its chunk cache holds the chunk
        # (several rows) that the next read needs.
        for i in (range(n) if indices is None else indices):
            if not 0 <= int(i) < n:
                raise IndexError(f"{what} index {i} out of range 0..{n - 1}")
            with self._reading():
                row = ds[int(i)].astype(dtype)
            yield row

    # -- saliency maps (optional) -------------------------------------------- #

    @property
    def has_saliency(self) -> bool:
        """Whether the run recorded saliency maps (``LayerWatch(..., saliency=True)``)."""
        return SALIENCY in self._f

    def _saliency_dataset(self) -> h5py.Dataset:
        if not self.has_saliency:
            raise KeyError(f"{self.path} holds no saliency maps (recorded without "
                           "saliency=True).")
        with self._reading():
            return self._f[SALIENCY]

    def saliency(self, index: Any = slice(None)) -> np.ndarray:
        """Saliency maps, indexed along snapshots, as float32: ``(probes, *input shape)``
        per snapshot (d model output at the label / d input)."""
        ds = self._saliency_dataset()
        with self._reading():
            return self._rows(ds, index)

    def iter_saliency(self, indices: Sequence[int] | None = None) -> Iterator[np.ndarray]:
        """Yield the saliency maps of one snapshot at a time, reading from disk."""
        return self._iter_rows(self._saliency_dataset(), self.num_snapshots, indices,
                               "snapshot", np.float32)

    # -- analysis probes (optional) ----------------------------------------- #

    @property
    def has_analysis(self) -> bool:
        """Whether the run recorded analysis-probe Gram matrices."""
        return self._analysis() is not None

    def _analysis(self) -> tuple[h5py.Group, int, int] | None:
        """(group, committed rows, probe count) of a well-formed analysis group."""
        if ANALYSIS not in self._f:
            return None
        group = self._check.group(ANALYSIS)
        steps = self._check.dataset(ANALYSIS_STEPS, ndim=(1,), kinds="iu")
        probes = self._check.dataset(ANALYSIS_PROBES, ndim=range(2, MAX_RANK + 2), kinds="biuf")
        n = int(probes.shape[0])
        grams = self._check.group(ANALYSIS_GRAMS)
        rows = steps.shape[0]
        for key in grams:
            ds = self._check.dataset(f"{ANALYSIS_GRAMS}/{key}", ndim=(3,), kinds="f")
            if ds.shape[1:] != (n, n) or n * n > MAX_SNAPSHOT_ELEMENTS:
                raise self._check.damaged(
                    f"{ANALYSIS_GRAMS}/{printable(key)} has shape {ds.shape}.")
            rows = min(rows, ds.shape[0])
        with self._reading():
            values = np.asarray(steps[:rows], dtype=np.int64)
        bad = np.flatnonzero((values < 0) | (np.diff(values, prepend=-1) <= 0))
        return group, int(bad[0]) if len(bad) else int(rows), n

    @property
    def analysis_steps(self) -> np.ndarray:
        """Steps of the snapshots that carry analysis-probe Gram matrices."""
        found = self._analysis()
        if found is None:
            return np.zeros(0, dtype=np.int64)
        group, rows, _ = found
        with self._reading():
            return np.asarray(self._f[ANALYSIS_STEPS][:rows], dtype=np.int64)

    @property
    def analysis_probe_count(self) -> int:
        found = self._analysis()
        return 0 if found is None else found[2]

    @property
    def analysis_layers(self) -> list[str]:
        """Layer keys that have analysis Gram matrices."""
        found = self._analysis()
        return [] if found is None else [k for k in self._f[ANALYSIS_GRAMS] if k in
                                          {layer.key for layer in self.layers}]

    def iter_analysis_grams(self, key: str, indices: Sequence[int] | None = None
                            ) -> Iterator[np.ndarray]:
        """Yield one (n, n) uncentred Gram matrix ``A Aᵀ`` of the analysis
        probes' activations (A: n × features) at a time, as float64."""
        found = self._analysis()
        if found is None:
            raise RecordingError(f"{self.path} holds no analysis probes.")
        group, rows, _ = found
        layer = self.layer(key)
        if layer.key not in self._f[ANALYSIS_GRAMS]:
            raise KeyError(key)
        with self._reading():
            ds = self._f[ANALYSIS_GRAMS][layer.key]
        return self._iter_rows(ds, rows, indices, "analysis", np.float64)

    def first_nonfinite(self, key: str) -> int | None:
        """Index of the first snapshot of a layer holding NaN or ±inf, if any.

        Streams the layer in blocks, so memory stays bounded on long runs.
        """
        layer = self.layer(key)
        per_snapshot = max(1, int(np.prod((self._f[PROBES_X].shape[0],) + layer.shape)))
        block = max(1, _SCAN_ELEMENTS // per_snapshot)
        with self._reading():
            ds = self._f[ACTIVATIONS][layer.key]
            for start in range(0, self._n, block):
                values = ds[start:min(start + block, self._n)]
                finite = np.isfinite(values).reshape(len(values), -1).all(axis=1)
                if not finite.all():
                    return start + int(np.argmin(finite))
        return None

    def metrics(self, group: str = "batch") -> Metrics:
        """Scalar logs: ``"batch"`` (every logged step) or ``"epoch"`` (epoch ends).

        Batch columns: ``<name>`` each step's own value of the loss and mean
        metrics, ``<name>_running_mean`` Keras' epoch-so-far mean of it,
        ``<name>_running`` the epoch-so-far value of a metric that is not a
        mean, and ``learning_rate`` (see docs/FORMAT.md). Version 1 files read
        the same way (:mod:`layerwatch.store.compat`).
        """
        if group not in METRIC_GROUPS:
            raise ValueError(f"group must be 'batch' or 'epoch'. Received: group={group!r}")
        n = self._metric_rows(group)
        with self._reading():
            g = self._f[METRICS][group]
            names = [printable(v.decode("utf-8", "replace")) for v in g[METRIC_NAMES][:]]
            values = g[METRIC_VALUES]
            vals = values[:n, : len(names)] if len(names) else np.zeros((n, 0))
            if vals.shape[1] < len(names):  # a reader raced the writer growing columns
                names = names[: vals.shape[1]]
            index = METRIC_GROUPS[group]
            steps = np.asarray(g[index[-1]][:n], dtype=np.int64)
            vals = np.asarray(vals, dtype=np.float64)
            epochs = np.asarray(g[index[0]][:n], dtype=np.int64) if len(index) > 1 else None
        if group == "batch" and self.format_version == 1:
            names, vals = version_1_batch_metrics(names, steps, vals,
                                                  self.metrics("epoch").steps)
        return Metrics(names=names, steps=steps, values=vals, epochs=epochs)

    @property
    def format_version(self) -> int:
        """The file's ``format_version`` (checked readable when it was opened)."""
        return int(attr(self._f, ATTR_FORMAT_VERSION))

    def refresh(self) -> None:
        """See what a live writer has committed since the file was opened."""
        with self._reading():
            for name in PER_SNAPSHOT + (STATUS, HEARTBEAT):
                if name in self._f:
                    self._f[name].refresh()
            for layer in self.layers:
                self._f[ACTIVATIONS][layer.key].refresh()
            if SALIENCY in self._f:
                self._f[SALIENCY].refresh()
            refresh_explanations(self._f)
            self._refresh_features()
            for group in METRIC_GROUPS:
                for ds in self._f[METRICS][group].values():
                    ds.refresh()
            self.layers = self._check.validate()
            self._count()

    def committed_metric_rows(self) -> dict[str, int]:
        """Rows of each metric table whose commit index has been written."""
        return {group: self._metric_rows(group) for group in METRIC_GROUPS}

    def copy_into(self, dst: h5py.File) -> None:
        """Copy the whole file, as it is on disk, into the empty HDF5 file ``dst``."""
        with self._reading():
            for key in self._f.attrs:
                dst.attrs[key] = self._f.attrs[key]
            for name in self._f:
                self._f.copy(self._f[name], dst, name=name)

    def storage_bytes(self) -> tuple[int, int]:
        """(bytes on disk, bytes as raw float32) of all activations."""
        stored = raw = 0
        n = self.num_snapshots
        with self._reading():
            for layer in self.layers:
                ds = self._f[ACTIVATIONS][layer.key]
                stored += ds.id.get_storage_size()
                raw += n * int(np.prod(ds.shape[1:])) * 4
        return stored, raw


def _process_exists(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def open_run(path: str | os.PathLike) -> Run:
    """Open a recording for reading (a context manager).

    Raises
    ------
    RecordingError
        When the file is missing, not a layerwatch recording, or damaged.
    """
    return Run(os.fspath(path))


def read_run(path: str | os.PathLike) -> dict[str, Any]:
    """Read a whole recording into memory as plain numpy arrays.

    Convenient for small runs and notebooks; use :func:`open_run` to stream
    long ones. Returns a dict with ``steps``, ``epochs``, ``probes_x``,
    ``probes_y``, ``activations`` (layer key → array (T, probes, ...)),
    ``layers`` (layer key → :class:`LayerInfo`), ``batch_metrics`` and
    ``epoch_metrics`` (:class:`Metrics`), ``attrs`` and ``status``.

    Works on a file still being written (the snapshots committed so far) and
    on one whose writer was killed.

    Raises
    ------
    RecordingError
        When the file is missing, not a layerwatch recording, or damaged.

    Examples
    --------
    >>> run = read_run("runs/mnist.h5")              # doctest: +SKIP
    >>> run["activations"]["conv1"].shape            # doctest: +SKIP
    (291, 10, 28, 28, 4)
    """
    with open_run(path) as run:
        return {
            "steps": run.steps, "epochs": run.epochs, "attrs": run.attrs,
            "status": run.status,
            "probes_x": run.probes_x(), "probes_y": run.probes_y(),
            "layers": {layer.key: layer for layer in run.layers},
            "activations": {layer.key: run.activations(layer.key) for layer in run.layers},
            "batch_metrics": run.metrics("batch"), "epoch_metrics": run.metrics("epoch"),
        }

