"""The writer: appends snapshots and metrics to a recording from a background thread.

It lays out a new file (:meth:`RunWriter.create`), continues an old one
(:meth:`RunWriter.append`, checked by :mod:`layerwatch.store.append`), and
writes blocks of snapshots crash-safely in HDF5's SWMR mode. Chunks are
encoded by :mod:`layerwatch.store.codec`; every name comes from
:mod:`layerwatch.store.schema`.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from typing import Any, Sequence

import h5py
import numpy as np
from h5py._objects import phil as _HDF5_LOCK  # h5py's lock around the HDF5 library

from . import codec
from .append import Resumed, prepare_append
from .files import open_for_writing, temporary_beside
from .schema import (ACTIVATIONS, ANALYSIS, ANALYSIS_GRAMS, ANALYSIS_PROBES, ANALYSIS_STEPS,
                     ATTR_ANALYSIS_EVERY, ATTR_FLUSH_SECONDS, ATTR_FLUSH_SNAPSHOTS, ATTR_FORMAT,
                     ATTR_FORMAT_VERSION, ATTR_STORAGE_DTYPE, ATTR_WRITER_HOST, ATTR_WRITER_PID,
                     EPOCHS, FORMAT_NAME, FORMAT_VERSION, HEARTBEAT, INDEX_FILL, META,
                     METRIC_GROUPS, METRIC_NAMES, METRIC_VALUES, METRICS, NAME_DTYPE, PROBES_X,
                     PROBES_Y, STATUS, STATUS_COMPLETE, STATUS_RECORDING, STATUS_STOPPED, STEPS,
                     WALL_TIME, LayerSpec, RecordingError, fixed)


class RunWriter:
    """Appends snapshots and metrics to a recording, crash-safely.

    The file is written in HDF5's single-writer/multiple-reader (SWMR) mode, so
    readers can open it while training runs and a killed writer leaves a
    valid file. Snapshots are buffered and written by a background thread in
    blocks: a block is handed over when ``flush_snapshots`` snapshots are
    waiting, and the thread itself takes whatever is waiting once
    ``flush_seconds`` pass without a block (a slow step, a long validation), so
    a kill loses at most the snapshots of the last ``flush_seconds`` — at most
    ``flush_snapshots`` of them while the disk keeps up. Memory is bounded by
    the queue: the training loop waits rather than buffering without limit if
    the disk falls behind.

    Each block is committed in two flushes: activations, epochs, wall times and
    metric values first, then the index datasets (``steps``,
    ``metrics/*/step``), whose length readers trust. The index datasets' fill
    value is -1 and steps only increase, so a reader of a killed file also
    recognizes an index that grew on disk before its values were written.

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
        #: Per layer, the rows of its last, not yet full chunk (writer thread only).
        self._tails: dict[str, np.ndarray] = {}
        self._closing = False  # the last block: its partly filled chunks need no room to grow
        self._full: dict[str, int] = {}  # per layer, the largest full chunk written (bytes)
        self._encoders: dict[str, Any] = {}
        self._nodes: dict[str, h5py.Dataset] = {}
        self._rows = int(f[STEPS].shape[0])  # snapshots in the file and queued
        self._lock = threading.Lock()
        st = os.stat(f.filename)
        self._identity = (st.st_dev, st.st_ino)
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._closed = False
        #: In append mode, where the file stood (see :class:`layerwatch.store.append.Resumed`).
        self.resumed: Resumed | None = None
        #: In append mode, the step of the newest snapshot already in the file.
        self.resumed_from: int | None = None
        self._thread = threading.Thread(target=self._work, name="layerwatch-writer", daemon=True)
        self._thread.start()

    # -- construction ------------------------------------------------------ #

    @classmethod
    def create(cls, path: str, *, layers: Sequence[LayerSpec], probes_x: np.ndarray,
               probes_y: np.ndarray | None, metadata: dict[str, Any], texts: dict[str, str],
               storage_dtype: str = "float16", compression: str | None = "gzip",
               compression_opts: int | None = 4, shuffle: bool = True,
               flush_seconds: float = 2.0, flush_snapshots: int = 32,
               analysis_probes_x: np.ndarray | None = None,
               analysis_every: int = 0) -> "RunWriter":
        """Create a new recording at ``path`` (replacing any file there).

        With ``analysis_probes_x`` (n inputs), the file also gets the
        ``analysis`` group: per layer, the n×n Gram matrix of those inputs'
        activations at the snapshots that carry one (see :meth:`add_snapshot`).
        """
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        # Write into a temporary name, then move into place: a failure while
        # laying out the file never leaves a half-made recording at ``path``.
        tmp = temporary_beside(path)
        try:
            f = h5py.File(tmp, "w", libver="latest")
            f.attrs[ATTR_FORMAT] = fixed(FORMAT_NAME)
            f.attrs[ATTR_FORMAT_VERSION] = FORMAT_VERSION
            f.attrs[ATTR_STORAGE_DTYPE] = fixed(str(np.dtype(storage_dtype)))
            for key, value in metadata.items():
                f.attrs[key] = fixed(value)
            meta = f.create_group(META)
            for key, text in texts.items():
                meta.create_dataset(key, data=fixed(text))
            f.create_dataset(PROBES_X, data=probes_x)
            if probes_y is not None:
                f.create_dataset(PROBES_Y, data=np.asarray(probes_y, dtype=np.int64))
            n_probes = probes_x.shape[0]
            f.create_dataset(STEPS, (0,), maxshape=(None,), dtype=np.int64, chunks=(1024,),
                             fillvalue=INDEX_FILL)
            f.create_dataset(EPOCHS, (0,), maxshape=(None,), dtype=np.int32, chunks=(1024,))
            f.create_dataset(WALL_TIME, (0,), maxshape=(None,), dtype=np.float64, chunks=(1024,))
            acts = f.create_group(ACTIVATIONS)
            for spec in layers:
                shape = (n_probes,) + tuple(spec.shape)
                ds = acts.create_dataset(
                    spec.key, (0,) + shape, maxshape=(None,) + shape, dtype=storage_dtype,
                    chunks=(codec.time_chunk(shape, storage_dtype),) + shape,
                    compression=compression,
                    compression_opts=compression_opts if compression == "gzip" else None,
                    shuffle=shuffle if compression else False)
                for name, value in spec.attrs.items():
                    ds.attrs[name] = fixed(value)
            metrics = f.create_group(METRICS)
            for group, index_names in METRIC_GROUPS.items():
                g = metrics.create_group(group)
                for name in index_names:
                    g.create_dataset(name, (0,), maxshape=(None,), dtype=np.int64,
                                     chunks=(1024,), fillvalue=INDEX_FILL)
                g.create_dataset(METRIC_NAMES, (0,), maxshape=(None,), dtype=NAME_DTYPE,
                                 chunks=(64,))
                g.create_dataset(METRIC_VALUES, (0, 0), maxshape=(None, None), dtype=np.float64,
                                 chunks=(256, 16), fillvalue=np.nan)
            if analysis_probes_x is not None:
                _create_analysis(f, layers, analysis_probes_x, analysis_every)
            f.create_dataset(STATUS, data=np.array([STATUS_RECORDING], dtype=np.int8))
            f.create_dataset(HEARTBEAT, data=np.array([time.time()], dtype=np.float64))
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
               probes_y: np.ndarray | None, from_step: int, analysis_probes: int = 0,
               flush_seconds: float = 2.0, flush_snapshots: int = 32) -> "RunWriter":
        """Reopen an existing recording to continue it (resumed training).

        Raises :class:`layerwatch.store.append.AppendError` when the file's
        layers, probes or number of analysis probes differ from this run's.
        Snapshots after ``from_step`` (left by a run that died after its last
        checkpoint) are dropped with a warning, so steps stay increasing; the
        writer's :attr:`resumed` says where the file stands.
        """
        resumed = prepare_append(path, layers=layers, probes_x=probes_x, probes_y=probes_y,
                                 analysis_probes=analysis_probes, from_step=from_step)
        writer = cls._open_for_writing(path, [s.key for s in layers],
                                       storage_dtype=resumed.storage_dtype,
                                       flush_seconds=flush_seconds,
                                       flush_snapshots=flush_snapshots)
        writer.resumed = resumed
        writer.resumed_from = resumed.last_step
        return writer

    @classmethod
    def _open_for_writing(cls, path, keys, *, storage_dtype, flush_seconds, flush_snapshots):
        f = open_for_writing(path)
        # Attributes cannot change once SWMR mode starts: written here, they
        # tell readers which process writes the file and the crash bound.
        _set_writer_attrs(f, flush_seconds, flush_snapshots)
        f.swmr_mode = True
        return cls(f, keys, flush_seconds=flush_seconds, flush_snapshots=flush_snapshots,
                   storage_dtype=storage_dtype)

    # -- the training-loop side ------------------------------------------- #

    def add_snapshot(self, step: int, epoch: int, arrays: Sequence[np.ndarray] | None,
                     grams: Sequence[np.ndarray] | None = None) -> None:
        """Queue one snapshot: one array of shape (probes, *layer shape) per layer,
        and optionally one (n, n) analysis-probe Gram matrix per layer.
        ``arrays=None`` queues the Grams alone, for a step already recorded."""
        with self._lock:
            self._pending.append((int(step), int(epoch), time.time(),
                                  None if arrays is None else list(arrays),
                                  None if grams is None else list(grams)))
            if arrays is not None:
                self._rows += 1
            # Blocks end at multiples of flush_snapshots rows where they can, so
            # they fill whole chunks (see codec.time_chunk) after an early flush too.
            full = len(self._pending) >= self._flush_snapshots or (
                arrays is not None and self._rows % self._flush_snapshots == 0)
        if full:
            self.flush()
        else:
            self._raise_if_failed()

    def add_batch_logs(self, step: int, logs: dict[str, float]) -> None:
        """Queue the training logs reported at ``step``."""
        with self._lock:
            self._pending_batch.append((int(step), logs))
        self._raise_if_failed()

    def add_epoch_logs(self, epoch: int, step: int, logs: dict[str, float]) -> None:
        """Queue the end-of-epoch logs (validation metrics included).

        They are written with the next block, or within ``flush_seconds``: an
        epoch's end does not hand over a block of its own, which would write
        (and later rewrite) partly filled chunks at every epoch."""
        with self._lock:
            self._pending_epoch.append((int(epoch), int(step), logs))
        self._raise_if_failed()

    def flush(self, *, wait: bool = False) -> None:
        """Hand what is buffered to the writer thread (and wait for it if asked)."""
        self._raise_if_failed()
        job = self._take()
        if job is not None:
            self._queue.put(job)
        if wait:
            self._queue.join()
            self._raise_if_failed()

    def _take(self):
        with self._lock:
            if not (self._pending or self._pending_batch or self._pending_epoch):
                return None
            job = (self._pending, self._pending_batch, self._pending_epoch)
            self._pending, self._pending_batch, self._pending_epoch = [], [], []
            return job

    def close(self, *, status: int = STATUS_COMPLETE) -> None:
        """Write what is left, mark the run's status and close the file."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._error is None:
                self._queue.join()     # blocks handed over before are written as usual
                self._closing = True   # what is left ends the recording
                self.flush()
        finally:
            self._queue.put(None)
            self._thread.join()
            try:
                # A failed writer still tries to mark the run stopped, so
                # readers report it incomplete rather than still recording.
                self._f[STATUS][0] = status if self._error is None else STATUS_STOPPED
                self._f[HEARTBEAT][0] = time.time()
                self._f.flush()
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

    def _check_file(self) -> None:
        # Writing on into a file that was deleted or replaced would lose
        # everything silently; stop and say so instead.
        try:
            st = os.stat(self._f.filename)
            same = (st.st_dev, st.st_ino) == self._identity
        except OSError:
            same = False
        if not same:
            raise RecordingError(f"{self._f.filename} was removed or replaced while recording.")

    def _work(self) -> None:
        _lower_priority()
        while True:
            try:
                job = self._queue.get(timeout=self._flush_seconds)
            except queue.Empty:
                # Nothing handed over for flush_seconds: write what the training
                # loop holds (this is what bounds a crash's loss in time) or, if
                # nothing, just the heartbeat that tells readers we are alive.
                # Only the training thread hands blocks over, and it takes them
                # whole, so taking here cannot reorder snapshots.
                try:
                    if self._error is None:
                        self._write(*(self._take() or ([], [], [])))
                except BaseException as exc:
                    self._error = exc
                continue
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
        f, node = self._f, self._node
        self._check_file()
        commits: list[tuple[h5py.Dataset, list[int]]] = []
        with_grams = [s for s in snapshots if s[4] is not None]
        snapshots = [s for s in snapshots if s[3] is not None]
        if snapshots:
            n = len(snapshots)
            t0 = node(STEPS).shape[0]
            for i, key in enumerate(self._keys):
                block = np.stack([s[3][i] for s in snapshots]).astype(self._dtype, copy=False)
                ds = node(f"{ACTIVATIONS}/{key}")
                ds.resize(t0 + n, axis=0)
                self._write_rows(key, ds, t0, block)
            for name, column in ((EPOCHS, 1), (WALL_TIME, 2)):
                ds = node(name)
                ds.resize(t0 + n, axis=0)
                ds[t0:t0 + n] = [s[column] for s in snapshots]
            commits.append((node(STEPS), [s[0] for s in snapshots]))
        if with_grams:
            g0 = node(ANALYSIS_STEPS).shape[0]
            for i, key in enumerate(self._keys):
                ds = node(f"{ANALYSIS_GRAMS}/{key}")
                ds.resize(g0 + len(with_grams), axis=0)
                ds[g0:] = np.stack([s[4][i] for s in with_grams]).astype(np.float32)
            commits.append((node(ANALYSIS_STEPS), [s[0] for s in with_grams]))
        if batch_logs:
            commits.append(_append_logs(node, "batch", [(s,) for s, _ in batch_logs],
                                        [logs for _, logs in batch_logs]))
        if epoch_logs:
            commits.append(_append_logs(node, "epoch", [(e, s) for e, s, _ in epoch_logs],
                                        [logs for _, _, logs in epoch_logs]))
        if commits:
            f.flush()  # the data reaches the file before the index that counts it
        for ds, values in commits:
            start = ds.shape[0]
            ds.resize((start + len(values),))
            ds[start:] = values
        node(HEARTBEAT)[0] = time.time()
        f.flush()

    def _node(self, path: str) -> h5py.Dataset:
        """An open dataset of the file, kept open: opening one costs milliseconds."""
        ds = self._nodes.get(path)
        if ds is None:
            ds = self._nodes[path] = self._f[path]
        return ds

    def _write_rows(self, key: str, ds: h5py.Dataset, t0: int, block: np.ndarray) -> None:
        """Write ``block`` at rows ``t0``... of ``ds``, chunk by chunk.

        Chunks are compressed here (see :func:`~layerwatch.store.codec.chunk_encoder`)
        and written as they are. A last, partly filled chunk is written with
        zero rows after its own and room to grow
        (:func:`~layerwatch.store.codec.reserved_room`), and its rows are kept in
        memory: the next block rewrites that chunk whole, in place, without
        reading it back. (Blocks are handed over at multiples of
        ``flush_snapshots`` rows, so that happens only on the ``flush_seconds``
        timer and at the end: see :meth:`add_snapshot`.)
        """
        if block.shape[1:] != ds.shape[1:]:  # written below as raw chunks: check here
            raise ValueError(f"{ACTIVATIONS}/{key}: a snapshot of shape {block.shape[1:]} does "
                             f"not fit the recording's {ds.shape[1:]}")
        if key not in self._encoders:
            self._encoders[key] = codec.chunk_encoder(ds)
        encode = self._encoders[key]
        if encode is None:  # HDF5 applies the filters itself
            ds[t0:t0 + len(block)] = block
            return
        size = ds.chunks[0]
        c0 = t0 - t0 % size
        tail = self._tails.get(key)
        if tail is None or len(tail) != t0 - c0:  # first block, or a resumed file
            tail = ds[c0:t0]
        rows = np.concatenate([tail, block]) if len(tail) else block
        last = len(rows) - len(rows) % size  # where the last, partly filled chunk starts
        origin = (0,) * (rows.ndim - 1)
        for j in range(0, len(rows), size):
            chunk = rows[j:j + size]
            filled = len(chunk)
            if filled < size:  # rows past the dataset's end are never read
                chunk = np.concatenate([chunk, np.zeros((size - filled,) + chunk.shape[1:],
                                                        dtype=chunk.dtype)])
            data = encode(chunk)
            offset = (c0 + j,) + origin
            # h5py takes its global HDF5 lock around every call but this one
            # (h5py 3.14): without it, two writers' threads would be inside
            # HDF5 at once.
            with _HDF5_LOCK:
                # A chunk on disk already (partly filled) is rewritten in place
                # if it fits; a partly filled one gets room to grow in place.
                stored = ds.id.get_chunk_info_by_coord(offset).size if j == 0 and len(tail) \
                    else 0
                if filled == size:
                    self._full[key] = max(self._full.get(key, 0), len(data))
                if len(data) <= stored:
                    room = stored
                elif filled < size and not self._closing:
                    room = codec.reserved_room(len(data), self._full.get(key), chunk.nbytes)
                else:
                    room = 0
                ds.id.write_direct_chunk(offset, data + bytes(max(0, room - len(data))))
        self._tails[key] = rows[last:]



def _create_analysis(f: h5py.File, layers: Sequence[LayerSpec], probes_x: np.ndarray,
                     every: int) -> None:
    f.create_group(ANALYSIS).attrs[ATTR_ANALYSIS_EVERY] = int(every)
    f.create_dataset(ANALYSIS_PROBES, data=probes_x)
    f.create_dataset(ANALYSIS_STEPS, (0,), maxshape=(None,), dtype=np.int64, chunks=(1024,),
                     fillvalue=INDEX_FILL)
    grams = f.create_group(ANALYSIS_GRAMS)
    n = probes_x.shape[0]
    for spec in layers:
        grams.create_dataset(spec.key, (0, n, n), maxshape=(None, n, n), dtype=np.float32,
                             chunks=(1, n, n), compression="gzip", compression_opts=4,
                             shuffle=True)



def _lower_priority() -> None:
    """Let the writer thread use only CPU that training leaves idle.

    Compressing costs a millisecond or two per snapshot; at normal priority it
    would compete with the training step's own threads. Under Linux's
    SCHED_IDLE policy the thread runs only on a core nothing else wants (and
    the bounded queue makes the training loop wait if it ever falls behind).
    Elsewhere, or if that is refused, a nice value of 10. Per thread: Linux.
    """
    tid = threading.get_native_id()
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        return
    except (AttributeError, OSError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, tid, 10)
    except (AttributeError, OSError):
        pass


def _append_logs(node, group: str, index_rows, logs_rows) -> tuple[h5py.Dataset, list[int]]:
    """Write a block of rows of the metric table ``group`` except the last
    index column, which is returned (dataset, values) for the caller to commit
    after a flush. ``node(path)`` opens a dataset of the file."""
    index_names = METRIC_GROUPS[group]
    group = f"{METRICS}/{group}"
    names_ds = node(f"{group}/{METRIC_NAMES}")
    names = [n.decode("utf-8") for n in names_ds[:]]
    for logs in logs_rows:
        for name in logs:
            if name not in names:
                names.append(name)
    if len(names) > names_ds.shape[0]:
        start = names_ds.shape[0]
        names_ds.resize((len(names),))
        names_ds[start:] = [n.encode("utf-8")[:128] for n in names[start:]]
    values = node(f"{group}/{METRIC_VALUES}")
    n0 = values.shape[0]
    block = np.full((len(logs_rows), len(names)), np.nan)
    for r, logs in enumerate(logs_rows):
        for name, value in logs.items():
            block[r, names.index(name)] = value
    values.resize((n0 + len(logs_rows), len(names)))
    values[n0:] = block
    for j, name in enumerate(index_names[:-1]):
        ds = node(f"{group}/{name}")
        ds.resize((n0 + len(logs_rows),))
        ds[n0:] = [row[j] for row in index_rows]
    return node(f"{group}/{index_names[-1]}"), [row[-1] for row in index_rows]


def _set_writer_attrs(f: h5py.File, flush_seconds: float, flush_snapshots: int) -> None:
    # Written before SWMR mode starts (attributes cannot change after): lets a
    # reader tell a live writer from a killed one, and state the crash bound.
    f.attrs[ATTR_WRITER_PID] = os.getpid()
    f.attrs[ATTR_WRITER_HOST] = fixed(socket.gethostname())
    f.attrs[ATTR_FLUSH_SECONDS] = float(flush_seconds)
    f.attrs[ATTR_FLUSH_SNAPSHOTS] = int(flush_snapshots)
