"""The recording file: writing it during training and reading it back.

This is the only module that imports h5py. The layout it writes is the public
contract described in ``docs/FORMAT.md``; readers here validate everything they
take from a file, so a damaged or crafted file ends in :class:`RecordingError`
rather than a crash or an absurd allocation.
"""

from __future__ import annotations

import os
import queue
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator, Sequence

import h5py
import numpy as np

FORMAT_NAME = "layerwatch"
FORMAT_VERSION = 1

#: Values of the ``status`` dataset.
STATUS_RECORDING = 0
STATUS_COMPLETE = 1
STATUS_STOPPED = 2

_NAME_DTYPE = "S128"  # fixed-length: variable-length strings are not SWMR-safe
_MAX_LAYERS = 4096
_MAX_METRICS = 4096
_MAX_TEXT_BYTES = 64 * 1024 * 1024
_MAX_RANK = 6
_MAX_SNAPSHOT_ELEMENTS = 1 << 31


class RecordingError(Exception):
    """A file is missing, is not a layerwatch recording, or is damaged."""


@dataclass(frozen=True)
class LayerSpec:
    """What the writer needs to know about one recorded layer.

    ``key`` is the dataset name under ``/activations``; ``shape`` is the
    per-probe output shape; ``attrs`` are stored verbatim as dataset attributes.
    """

    key: str
    shape: tuple[int, ...]
    attrs: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- #
# Writing
# --------------------------------------------------------------------------- #


class RunWriter:
    """Appends snapshots and metrics to a recording, crash-safely.

    The file is written in HDF5's single-writer/multiple-reader (SWMR) mode, so
    readers can open it while training runs and a killed writer leaves a
    valid file. Snapshots are buffered and written by a background thread in
    blocks; the file is flushed at least every ``flush_seconds`` (and whenever
    ``flush_snapshots`` snapshots are waiting), which bounds what a crash loses.
    Memory is bounded by the queue: the training loop waits rather than
    buffering without limit if the disk falls behind.

    Use :meth:`create` or :meth:`append`; both leave the file in SWMR mode.
    """

    def __init__(self, f: h5py.File, layer_keys: Sequence[str], *, flush_seconds: float,
                 flush_snapshots: int, storage_dtype: np.dtype):
        self._f = f
        self._keys = list(layer_keys)
        self._flush_seconds = float(flush_seconds)
        self._flush_snapshots = int(flush_snapshots)
        self._dtype = np.dtype(storage_dtype)
        self._pending: list[tuple[int, int, float, list[np.ndarray]]] = []
        self._pending_batch: list[tuple[int, dict[str, float]]] = []
        self._pending_epoch: list[tuple[int, int, dict[str, float]]] = []
        self._last_flush = time.monotonic()
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="layerwatch-writer", daemon=True)
        self._thread.start()

    # -- construction ------------------------------------------------------ #

    @classmethod
    def create(cls, path: str, *, layers: Sequence[LayerSpec], probes_x: np.ndarray,
               probes_y: np.ndarray | None, metadata: dict[str, Any], texts: dict[str, str],
               storage_dtype: str = "float16", compression: str | None = "gzip",
               compression_opts: int | None = 4, shuffle: bool = True,
               flush_seconds: float = 2.0, flush_snapshots: int = 32) -> "RunWriter":
        """Create a new recording at ``path`` (replacing any file there)."""
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        # Write into a temporary name, then move into place: a failure while
        # laying out the file never leaves a half-made recording at ``path``.
        fd, tmp = tempfile.mkstemp(suffix=".h5.tmp", dir=directory)
        os.close(fd)
        try:
            f = h5py.File(tmp, "w", libver="latest")
            f.attrs["format"] = FORMAT_NAME
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["storage_dtype"] = str(np.dtype(storage_dtype))
            for key, value in metadata.items():
                f.attrs[key] = value
            meta = f.create_group("meta")
            for key, text in texts.items():
                meta.create_dataset(key, data=text, dtype=h5py.string_dtype())
            probes = f.create_group("probes")
            probes.create_dataset("x", data=probes_x)
            if probes_y is not None:
                probes.create_dataset("y", data=np.asarray(probes_y, dtype=np.int64))
            n_probes = probes_x.shape[0]
            f.create_dataset("steps", (0,), maxshape=(None,), dtype=np.int64, chunks=(1024,))
            f.create_dataset("epochs", (0,), maxshape=(None,), dtype=np.int32, chunks=(1024,))
            f.create_dataset("wall_time", (0,), maxshape=(None,), dtype=np.float64, chunks=(1024,))
            acts = f.create_group("activations")
            for spec in layers:
                shape = (n_probes,) + tuple(spec.shape)
                ds = acts.create_dataset(
                    spec.key, (0,) + shape, maxshape=(None,) + shape, dtype=storage_dtype,
                    chunks=(1,) + shape, compression=compression,
                    compression_opts=compression_opts if compression == "gzip" else None,
                    shuffle=shuffle if compression else False)
                for name, value in spec.attrs.items():
                    ds.attrs[name] = value
            metrics = f.create_group("metrics")
            for group, index_names in (("batch", ("step",)), ("epoch", ("epoch", "step"))):
                g = metrics.create_group(group)
                for name in index_names:
                    g.create_dataset(name, (0,), maxshape=(None,), dtype=np.int64, chunks=(1024,))
                g.create_dataset("names", (0,), maxshape=(None,), dtype=_NAME_DTYPE, chunks=(64,))
                g.create_dataset("values", (0, 0), maxshape=(None, None), dtype=np.float64,
                                 chunks=(256, 16), fillvalue=np.nan)
            f.create_dataset("status", data=np.array([STATUS_RECORDING], dtype=np.int8))
            f.create_dataset("heartbeat", data=np.array([time.time()], dtype=np.float64))
            f.close()
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return cls._open_for_writing(path, [s.key for s in layers], storage_dtype=storage_dtype,
                                     flush_seconds=flush_seconds, flush_snapshots=flush_snapshots)

    @classmethod
    def append(cls, path: str, *, layers: Sequence[LayerSpec], probes_x: np.ndarray,
               probes_y: np.ndarray | None, from_step: int,
               flush_seconds: float = 2.0, flush_snapshots: int = 32) -> "RunWriter":
        """Reopen an existing recording to continue it (resumed training).

        Raises :class:`RecordingError` when the file's layers or probes differ
        from this run's. Snapshots after ``from_step`` (left by a run that died
        after its last checkpoint) are dropped with a warning, so steps stay
        increasing.
        """
        with open_run(path) as run:
            _check_compatible(run, layers, probes_x, probes_y)
            stored_dtype = run.storage_dtype
            if not run.closed_cleanly:
                repair_run(path)
        f = _open_h5(path, "r+")
        try:
            steps = f["steps"][:]
            keep = int(np.searchsorted(steps, from_step, side="right"))
            if keep < len(steps):
                warnings.warn(
                    f"The recording {path} holds {len(steps) - keep} snapshot(s) after step "
                    f"{from_step}, where training resumes; they are dropped so steps stay "
                    "in order.", stacklevel=3)
                _truncate(f, keep, from_step)
            f["status"][0] = STATUS_RECORDING
        finally:
            f.close()
        return cls._open_for_writing(path, [s.key for s in layers], storage_dtype=stored_dtype,
                                     flush_seconds=flush_seconds, flush_snapshots=flush_snapshots)

    @classmethod
    def _open_for_writing(cls, path, keys, *, storage_dtype, flush_seconds, flush_snapshots):
        f = _open_h5(path, "r+")
        f.swmr_mode = True
        return cls(f, keys, flush_seconds=flush_seconds, flush_snapshots=flush_snapshots,
                   storage_dtype=storage_dtype)

    # -- the training-loop side ------------------------------------------- #

    @property
    def error(self) -> BaseException | None:
        """The exception that stopped the writer thread, if any."""
        return self._error

    def add_snapshot(self, step: int, epoch: int, arrays: Sequence[np.ndarray]) -> None:
        """Queue one snapshot: one array of shape (probes, *layer shape) per layer."""
        self._pending.append((int(step), int(epoch), time.time(), list(arrays)))
        self._maybe_flush()

    def add_batch_logs(self, step: int, logs: dict[str, float]) -> None:
        """Queue the training logs reported at ``step``."""
        self._pending_batch.append((int(step), logs))
        self._maybe_flush()

    def add_epoch_logs(self, epoch: int, step: int, logs: dict[str, float]) -> None:
        """Queue the end-of-epoch logs (validation metrics included)."""
        self._pending_epoch.append((int(epoch), int(step), logs))
        self.flush()

    def last_step(self) -> int | None:
        """The step of the newest snapshot queued or written, if any."""
        if self._pending:
            return self._pending[-1][0]
        return None

    def _maybe_flush(self) -> None:
        if (len(self._pending) >= self._flush_snapshots
                or time.monotonic() - self._last_flush >= self._flush_seconds):
            self.flush()

    def flush(self, *, wait: bool = False) -> None:
        """Hand what is buffered to the writer thread (and wait for it if asked)."""
        self._raise_if_failed()
        if self._pending or self._pending_batch or self._pending_epoch:
            job = (self._pending, self._pending_batch, self._pending_epoch)
            self._pending, self._pending_batch, self._pending_epoch = [], [], []
            self._queue.put(job)
        self._last_flush = time.monotonic()
        if wait:
            self._queue.join()
            self._raise_if_failed()

    def close(self, *, status: int = STATUS_COMPLETE) -> None:
        """Write what is left, mark the run's status and close the file."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._error is None:
                self.flush()
        finally:
            self._queue.put(None)
            self._thread.join()
            try:
                if self._error is None:
                    self._f["status"][0] = status
                    self._f["heartbeat"][0] = time.time()
                elif status == STATUS_COMPLETE:
                    self._f["status"][0] = STATUS_STOPPED
            except Exception:  # the file may be the thing that failed
                pass
            try:
                self._f.close()
            except Exception:
                pass
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    # -- the writer thread -------------------------------------------------- #

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self._error is None:
                    self._write(*job)
            except BaseException as exc:  # reported to the training loop
                self._error = exc
            finally:
                self._queue.task_done()

    def _write(self, snapshots, batch_logs, epoch_logs) -> None:
        f = self._f
        if snapshots:
            n = len(snapshots)
            t0 = f["steps"].shape[0]
            for i, key in enumerate(self._keys):
                block = np.stack([s[3][i] for s in snapshots]).astype(self._dtype, copy=False)
                ds = f["activations"][key]
                ds.resize(t0 + n, axis=0)
                ds[t0:t0 + n] = block
            # The index datasets grow last: a reader never sees a step whose
            # activations are not written yet.
            for name, column in (("epochs", 1), ("wall_time", 2), ("steps", 0)):
                ds = f[name]
                ds.resize(t0 + n, axis=0)
                ds[t0:t0 + n] = [s[column] for s in snapshots]
        if batch_logs:
            _append_logs(f["metrics/batch"], [(s,) for s, _ in batch_logs],
                         [logs for _, logs in batch_logs], ("step",))
        if epoch_logs:
            _append_logs(f["metrics/epoch"], [(e, s) for e, s, _ in epoch_logs],
                         [logs for _, _, logs in epoch_logs], ("epoch", "step"))
        f["heartbeat"][0] = time.time()
        f.flush()


def _append_logs(group: h5py.Group, index_rows, logs_rows, index_names) -> None:
    names_ds = group["names"]
    names = [n.decode("utf-8") for n in names_ds[:]]
    for logs in logs_rows:
        for name in logs:
            if name not in names:
                names.append(name)
    if len(names) > names_ds.shape[0]:
        start = names_ds.shape[0]
        names_ds.resize((len(names),))
        names_ds[start:] = [n.encode("utf-8")[:128] for n in names[start:]]
    values = group["values"]
    n0 = values.shape[0]
    block = np.full((len(logs_rows), len(names)), np.nan)
    for r, logs in enumerate(logs_rows):
        for name, value in logs.items():
            block[r, names.index(name)] = value
    values.resize((n0 + len(logs_rows), len(names)))
    values[n0:] = block
    for j, name in enumerate(index_names):
        ds = group[name]
        ds.resize((n0 + len(logs_rows),))
        ds[n0:] = [row[j] for row in index_rows]


def _truncate(f: h5py.File, keep: int, from_step: int) -> None:
    for name in ("steps", "epochs", "wall_time"):
        f[name].resize(keep, axis=0)
    for ds in f["activations"].values():
        ds.resize(min(keep, ds.shape[0]), axis=0)
    for group in ("batch", "epoch"):
        g = f["metrics"][group]
        rows = int(np.searchsorted(g["step"][:], from_step, side="right"))
        for name in ("step", "epoch", "values"):
            if name in g:
                g[name].resize(rows, axis=0)


def _check_compatible(run: "Run", layers: Sequence[LayerSpec], probes_x, probes_y) -> None:
    stored = {layer.key: layer.shape for layer in run.layers}
    wanted = {spec.key: tuple(spec.shape) for spec in layers}
    if stored != wanted:
        raise RecordingError(
            f"Cannot append to {run.path}: its layers differ from this model's. "
            f"Recorded: {_describe_layers(stored)}. This run: {_describe_layers(wanted)}. "
            "Record into a new file, or pass mode='w' to replace it.")
    px = run.probes_x()
    if px.shape != probes_x.shape or not np.array_equal(px, probes_x.astype(px.dtype)):
        raise RecordingError(
            f"Cannot append to {run.path}: its probe images differ from this run's "
            f"(recorded shape {px.shape}, received {probes_x.shape}). Pass the same probes, "
            "or record into a new file.")
    py = run.probes_y()
    if probes_y is not None and py is not None and not np.array_equal(py, probes_y):
        raise RecordingError(
            f"Cannot append to {run.path}: its probe labels differ from this run's "
            f"(recorded {py.tolist()}, received {np.asarray(probes_y).tolist()}).")


def _describe_layers(layers: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{k} {v}" for k, v in layers.items()) or "none"


def _open_h5(path: str, mode: str) -> h5py.File:
    try:
        return h5py.File(path, mode, libver="latest")
    except OSError as exc:
        raise RecordingError(f"Cannot open {path} for writing: {_h5_reason(exc)}") from exc


def repair_run(path: str) -> None:
    """Rewrite a recording whose writer died, so any HDF5 reader opens it.

    A writer killed in SWMR mode leaves the file flagged as open for writing;
    plain ``h5py.File(path)`` then refuses it (``h5clear -s`` also clears the
    flag). This copies everything into a fresh file beside it and moves it into
    place. The status is set to "stopped".
    """
    with open_run(path) as run:
        src = run._f
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(suffix=".h5.tmp", dir=directory)
        os.close(fd)
        try:
            with h5py.File(tmp, "w", libver="latest") as dst:
                for key, value in src.attrs.items():
                    dst.attrs[key] = value
                for name in src:
                    src.copy(src[name], dst, name=name)
                n = run.num_snapshots
                _truncate_to(dst, n)
                if int(dst["status"][0]) == STATUS_RECORDING:
                    dst["status"][0] = STATUS_STOPPED
        except BaseException:
            os.unlink(tmp)
            raise
    os.replace(tmp, path)


def _truncate_to(f: h5py.File, n: int) -> None:
    """Make every per-snapshot dataset exactly ``n`` long (after a crash)."""
    for name in ("steps", "epochs", "wall_time"):
        f[name].resize(n, axis=0)
    for ds in f["activations"].values():
        ds.resize(n, axis=0)


# --------------------------------------------------------------------------- #
# Reading
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class LayerInfo:
    """One recorded layer, as the file describes it."""

    key: str
    shape: tuple[int, ...]           #: per-probe output shape
    layer_name: str
    layer_class: str
    activation: str
    tensor: str                      #: which tensor was recorded, e.g. "conv1 -> relu1"
    value_range: tuple[float, float] | None  #: natural range of the activation, if bounded
    channel_axis: int                #: axis of ``shape`` that holds channels


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


class Run:
    """A recording opened for reading. Use :func:`open_run` or :func:`read_run`.

    Works on a file still being written (it reads the snapshots flushed so
    far) and on one whose writer died. Activations are read lazily, one
    snapshot at a time if wanted, so long runs need not fit in memory.
    """

    def __init__(self, path: str):
        self.path = str(path)
        self._f = _open_for_reading(self.path)
        try:
            self._validate()
        except RecordingError:
            self._f.close()
            raise
        except Exception as exc:  # anything h5py raises on a damaged file
            self._f.close()
            raise RecordingError(f"{self.path} is damaged: {_h5_reason(exc)}") from exc

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    # -- validation --------------------------------------------------------- #

    def _validate(self) -> None:
        f = self._f
        if f.attrs.get("format") not in (FORMAT_NAME, FORMAT_NAME.encode()):
            raise RecordingError(
                f"{self.path} is an HDF5 file but not a layerwatch recording "
                "(no root attribute format='layerwatch').")
        version = f.attrs.get("format_version")
        if not isinstance(version, (int, np.integer)) or int(version) != FORMAT_VERSION:
            raise RecordingError(
                f"{self.path} has format_version={version!r}; this layerwatch reads "
                f"version {FORMAT_VERSION}. Upgrade layerwatch to read newer files.")
        for name in ("steps", "epochs", "wall_time", "activations", "probes/x", "status",
                     "metrics/batch/step", "metrics/batch/names", "metrics/batch/values",
                     "metrics/epoch/epoch", "metrics/epoch/step", "metrics/epoch/names",
                     "metrics/epoch/values"):
            if name not in f:
                raise RecordingError(f"{self.path} is damaged: '{name}' is missing.")
        for name in ("steps", "epochs", "wall_time"):
            if f[name].ndim != 1:
                raise RecordingError(f"{self.path} is damaged: '{name}' is not 1-D.")
        px = f["probes/x"]
        if px.ndim < 2 or px.ndim > _MAX_RANK + 1 or px.size > _MAX_SNAPSHOT_ELEMENTS // 8:
            raise RecordingError(f"{self.path} is damaged: probes/x has shape {px.shape}.")
        if "probes/y" in f and f["probes/y"].shape != (px.shape[0],):
            raise RecordingError(f"{self.path} is damaged: probes/y does not match probes/x.")
        group = f["activations"]
        if not isinstance(group, h5py.Group) or len(group) > _MAX_LAYERS:
            raise RecordingError(f"{self.path} is damaged: bad 'activations' group.")
        layers = []
        for key in group:
            ds = group[key]
            if not isinstance(ds, h5py.Dataset):
                raise RecordingError(f"{self.path} is damaged: activations/{key} is a group.")
            shape = ds.shape
            if (len(shape) < 3 or len(shape) > _MAX_RANK + 2 or shape[1] != px.shape[0]
                    or int(np.prod(shape[1:], dtype=np.float64)) > _MAX_SNAPSHOT_ELEMENTS
                    or ds.dtype.kind != "f"):
                raise RecordingError(
                    f"{self.path} is damaged: activations/{key} has shape {shape} and dtype "
                    f"{ds.dtype}; expected (snapshots, {px.shape[0]} probes, ...) floats.")
            layers.append(_layer_info(key, ds))
        if not layers:
            raise RecordingError(f"{self.path} holds no recorded layer.")
        self.layers: list[LayerInfo] = layers
        for group_name in ("batch", "epoch"):
            g = f["metrics"][group_name]
            if g["names"].ndim != 1 or g["names"].shape[0] > _MAX_METRICS \
                    or g["values"].ndim != 2 or g["names"].dtype.kind != "S":
                raise RecordingError(f"{self.path} is damaged: bad metrics/{group_name}.")

    # -- what is in it ------------------------------------------------------ #

    @property
    def attrs(self) -> dict[str, Any]:
        """The root attributes (run metadata), as plain Python values."""
        out = {}
        for key, value in self._f.attrs.items():
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            elif isinstance(value, np.generic):
                value = value.item()
            out[key] = value
        return out

    @property
    def storage_dtype(self) -> str:
        return str(self._f.attrs.get("storage_dtype", "float16"))

    def text(self, name: str) -> str | None:
        """A JSON/text document from ``/meta`` (``model_config``, ``summary``)."""
        ds = self._f.get(f"meta/{name}")
        if not isinstance(ds, h5py.Dataset) or ds.shape != () or ds.dtype.kind not in "OS":
            return None
        if ds.id.get_storage_size() > _MAX_TEXT_BYTES:
            return None
        value = ds[()]
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

    @property
    def num_snapshots(self) -> int:
        """Snapshots fully written: the length of ``steps`` capped by every layer's."""
        n = min(self._f[name].shape[0] for name in ("steps", "epochs", "wall_time"))
        for layer in self.layers:
            n = min(n, self._f["activations"][layer.key].shape[0])
        return int(n)

    @property
    def steps(self) -> np.ndarray:
        return self._f["steps"][: self.num_snapshots].astype(np.int64)

    @property
    def epochs(self) -> np.ndarray:
        return self._f["epochs"][: self.num_snapshots].astype(np.int64)

    @property
    def wall_time(self) -> np.ndarray:
        return self._f["wall_time"][: self.num_snapshots].astype(np.float64)

    @property
    def status(self) -> int:
        return int(self._f["status"][0])

    @property
    def closed_cleanly(self) -> bool:
        return self.status == STATUS_COMPLETE

    @property
    def heartbeat(self) -> float | None:
        ds = self._f.get("heartbeat")
        return float(ds[0]) if isinstance(ds, h5py.Dataset) and ds.shape == (1,) else None

    def probes_x(self) -> np.ndarray:
        return self._f["probes/x"][()]

    def probes_y(self) -> np.ndarray | None:
        return self._f["probes/y"][()] if "probes/y" in self._f else None

    def layer(self, key: str) -> LayerInfo:
        for layer in self.layers:
            if key in (layer.key, layer.layer_name):
                return layer
        raise KeyError(key)

    def activations(self, key: str, index: Any = slice(None)) -> np.ndarray:
        """Activations of one layer, indexed along snapshots (as float32)."""
        ds = self._f["activations"][self.layer(key).key]
        n = self.num_snapshots
        if isinstance(index, slice):
            index = range(*index.indices(n))
            if index.step == 1:
                return ds[index.start:index.stop].astype(np.float32)
        if isinstance(index, (int, np.integer)):
            i = int(index) + (n if index < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(index)
            return ds[i].astype(np.float32)
        return np.stack([ds[int(i)] for i in index]).astype(np.float32)

    def iter_activations(self, key: str, indices: Sequence[int] | None = None
                         ) -> Iterator[np.ndarray]:
        """Yield one snapshot (probes, *shape) at a time, reading from disk."""
        ds = self._f["activations"][self.layer(key).key]
        for i in (range(self.num_snapshots) if indices is None else indices):
            yield ds[int(i)].astype(np.float32)

    def metrics(self, group: str = "batch") -> Metrics:
        """Scalar logs: ``"batch"`` (every logged step) or ``"epoch"`` (epoch ends)."""
        g = self._f["metrics"][group]
        names = [n.decode("utf-8", "replace") for n in g["names"][:]]
        values = g["values"]
        n = min(values.shape[0], g["step"].shape[0])
        vals = values[:n, : len(names)] if len(names) else np.zeros((n, 0))
        if vals.shape[1] < len(names):  # a reader raced the writer growing columns
            names = names[: vals.shape[1]]
        return Metrics(names=names, steps=g["step"][:n].astype(np.int64),
                       values=np.asarray(vals, dtype=np.float64),
                       epochs=g["epoch"][:n].astype(np.int64) if "epoch" in g else None)

    def refresh(self) -> None:
        """See what a live writer has flushed since the file was opened."""
        for name in ("steps", "epochs", "wall_time", "status", "heartbeat"):
            if name in self._f:
                self._f[name].refresh()
        for ds in self._f["activations"].values():
            ds.refresh()
        for group in ("batch", "epoch"):
            for ds in self._f["metrics"][group].values():
                ds.refresh()

    def storage_bytes(self) -> tuple[int, int]:
        """(bytes on disk, bytes as raw float32) of all activations."""
        stored = raw = 0
        n = self.num_snapshots
        for layer in self.layers:
            ds = self._f["activations"][layer.key]
            stored += ds.id.get_storage_size()
            raw += n * int(np.prod(ds.shape[1:])) * 4
        return stored, raw


def _layer_info(key: str, ds: h5py.Dataset) -> LayerInfo:
    attrs = ds.attrs

    def text(name: str, default: str = "") -> str:
        value = attrs.get(name, default)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        return str(value)[:1000]

    value_range = None
    raw_range = attrs.get("value_range")
    if raw_range is not None:
        arr = np.asarray(raw_range, dtype=np.float64).ravel()
        if arr.shape == (2,) and np.all(np.isfinite(arr)) and arr[0] < arr[1]:
            value_range = (float(arr[0]), float(arr[1]))
    per_probe = tuple(int(s) for s in ds.shape[2:])
    channel_axis = attrs.get("channel_axis", len(per_probe) - 1)
    try:
        channel_axis = int(channel_axis)
    except (TypeError, ValueError):
        channel_axis = len(per_probe) - 1
    if not -len(per_probe) <= channel_axis < len(per_probe):
        channel_axis = len(per_probe) - 1
    return LayerInfo(key=key, shape=per_probe, layer_name=text("layer_name", key),
                     layer_class=text("layer_class"), activation=text("activation"),
                     tensor=text("tensor", key), value_range=value_range,
                     channel_axis=channel_axis % len(per_probe))


def _open_for_reading(path: str) -> h5py.File:
    if not os.path.exists(path):
        raise RecordingError(f"{path} does not exist.")
    if os.path.isdir(path):
        raise RecordingError(f"{path} is a directory, not a recording.")
    try:
        if not h5py.is_hdf5(path):
            raise RecordingError(f"{path} is not an HDF5 file (not a layerwatch recording).")
    except OSError as exc:
        raise RecordingError(f"Cannot read {path}: {_h5_reason(exc)}") from exc
    errors = []
    # SWMR reading works while a writer is live and after a writer died; files
    # written by other tools may not support it, so fall back to a plain open.
    for kwargs in ({"swmr": True}, {}):
        try:
            return h5py.File(path, "r", locking=False, **kwargs)
        except OSError as exc:
            errors.append(exc)
    raise RecordingError(f"{path} is damaged or unreadable: {_h5_reason(errors[-1])}")


def _h5_reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


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
    ``epoch_metrics`` (:class:`Metrics`) and ``attrs``.

    Examples
    --------
    >>> run = read_run("runs/mnist.h5")              # doctest: +SKIP
    >>> run["activations"]["conv1"].shape            # doctest: +SKIP
    (291, 10, 28, 28, 4)
    """
    with open_run(path) as run:
        try:
            return {
                "steps": run.steps, "epochs": run.epochs, "attrs": run.attrs,
                "probes_x": run.probes_x(), "probes_y": run.probes_y(),
                "layers": {layer.key: layer for layer in run.layers},
                "activations": {layer.key: run.activations(layer.key) for layer in run.layers},
                "batch_metrics": run.metrics("batch"), "epoch_metrics": run.metrics("epoch"),
            }
        except (OSError, ValueError, KeyError) as exc:
            raise RecordingError(f"{path} is damaged: {_h5_reason(exc)}") from exc


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")

