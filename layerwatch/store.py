"""The recording file: writing it during training and reading it back.

This is the only module that imports h5py. The layout it writes is the public
contract described in ``docs/FORMAT.md``; readers here validate everything they
take from a file, so a damaged or crafted file ends in :class:`RecordingError`
rather than a crash or an absurd allocation.
"""

from __future__ import annotations

import contextlib
import os
import queue
import secrets
import socket
import stat
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator, Sequence

import h5py
import numpy as np
from h5py._objects import phil as _HDF5_LOCK  # h5py's lock around the HDF5 library

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

#: Activations are chunked along time: one chunk holds up to this many
#: snapshots of a layer (a power of two), and at most ``_CHUNK_BYTES``
#: uncompressed, HDF5's default per-dataset chunk cache, so a plain h5py
#: reader going snapshot by snapshot decompresses each chunk once.
_MAX_CHUNK_SNAPSHOTS = 32
_CHUNK_BYTES = 1 << 20


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
        self._rows = int(f["steps"].shape[0])  # snapshots in the file and queued
        self._lock = threading.Lock()
        st = os.stat(f.filename)
        self._identity = (st.st_dev, st.st_ino)
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._closed = False
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
        tmp = _temporary_beside(path)
        try:
            f = h5py.File(tmp, "w", libver="latest")
            f.attrs["format"] = _fixed(FORMAT_NAME)
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["storage_dtype"] = _fixed(str(np.dtype(storage_dtype)))
            for key, value in metadata.items():
                f.attrs[key] = _fixed(value)
            _set_writer_attrs(f, flush_seconds, flush_snapshots)
            meta = f.create_group("meta")
            for key, text in texts.items():
                meta.create_dataset(key, data=_fixed(text))
            probes = f.create_group("probes")
            probes.create_dataset("x", data=probes_x)
            if probes_y is not None:
                probes.create_dataset("y", data=np.asarray(probes_y, dtype=np.int64))
            n_probes = probes_x.shape[0]
            f.create_dataset("steps", (0,), maxshape=(None,), dtype=np.int64, chunks=(1024,),
                             fillvalue=-1)
            f.create_dataset("epochs", (0,), maxshape=(None,), dtype=np.int32, chunks=(1024,))
            f.create_dataset("wall_time", (0,), maxshape=(None,), dtype=np.float64, chunks=(1024,))
            acts = f.create_group("activations")
            for spec in layers:
                shape = (n_probes,) + tuple(spec.shape)
                ds = acts.create_dataset(
                    spec.key, (0,) + shape, maxshape=(None,) + shape, dtype=storage_dtype,
                    chunks=(_time_chunk(shape, storage_dtype),) + shape, compression=compression,
                    compression_opts=compression_opts if compression == "gzip" else None,
                    shuffle=shuffle if compression else False)
                for name, value in spec.attrs.items():
                    ds.attrs[name] = _fixed(value)
            metrics = f.create_group("metrics")
            for group, index_names in (("batch", ("step",)), ("epoch", ("epoch", "step"))):
                g = metrics.create_group(group)
                for name in index_names:
                    g.create_dataset(name, (0,), maxshape=(None,), dtype=np.int64,
                                     chunks=(1024,), fillvalue=-1)
                g.create_dataset("names", (0,), maxshape=(None,), dtype=_NAME_DTYPE, chunks=(64,))
                g.create_dataset("values", (0, 0), maxshape=(None, None), dtype=np.float64,
                                 chunks=(256, 16), fillvalue=np.nan)
            if analysis_probes_x is not None:
                _create_analysis(f, layers, analysis_probes_x, analysis_every)
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
            needs_repair = not run.closed_cleanly
        if needs_repair:
            repair_run(path)
        f = _open_h5(path, "r+")
        try:
            steps = f["steps"][:]
            keep = int(np.searchsorted(steps, from_step, side="right"))
            last_step = int(steps[keep - 1]) if keep else None
            if keep < len(steps):
                warnings.warn(
                    f"The recording {path} holds {len(steps) - keep} snapshot(s) after step "
                    f"{from_step}, where training resumes; they are dropped so steps stay "
                    "in order.", stacklevel=3)
                _truncate(f, keep, from_step)
            f["status"][0] = STATUS_RECORDING
            _set_writer_attrs(f, flush_seconds, flush_snapshots)
        finally:
            f.close()
        writer = cls._open_for_writing(path, [s.key for s in layers], storage_dtype=stored_dtype,
                                       flush_seconds=flush_seconds,
                                       flush_snapshots=flush_snapshots)
        writer.resumed_from = last_step
        return writer

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
            # they fill whole chunks (see _time_chunk) after an early flush too.
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

    def last_step(self) -> int | None:
        """The step of the newest snapshot queued and not yet handed to the writer."""
        with self._lock:
            return self._pending[-1][0] if self._pending else None

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
                self._f["status"][0] = status if self._error is None else STATUS_STOPPED
                self._f["heartbeat"][0] = time.time()
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
            t0 = node("steps").shape[0]
            for i, key in enumerate(self._keys):
                block = np.stack([s[3][i] for s in snapshots]).astype(self._dtype, copy=False)
                ds = node(f"activations/{key}")
                ds.resize(t0 + n, axis=0)
                self._write_rows(key, ds, t0, block)
            for name, column in (("epochs", 1), ("wall_time", 2)):
                ds = node(name)
                ds.resize(t0 + n, axis=0)
                ds[t0:t0 + n] = [s[column] for s in snapshots]
            commits.append((node("steps"), [s[0] for s in snapshots]))
        if with_grams:
            g0 = node("analysis/steps").shape[0]
            for i, key in enumerate(self._keys):
                ds = node(f"analysis/gram/{key}")
                ds.resize(g0 + len(with_grams), axis=0)
                ds[g0:] = np.stack([s[4][i] for s in with_grams]).astype(np.float32)
            commits.append((node("analysis/steps"), [s[0] for s in with_grams]))
        if batch_logs:
            commits.append(_append_logs(node, "metrics/batch", [(s,) for s, _ in batch_logs],
                                        [logs for _, logs in batch_logs], ("step",)))
        if epoch_logs:
            commits.append(_append_logs(node, "metrics/epoch", [(e, s) for e, s, _ in epoch_logs],
                                        [logs for _, _, logs in epoch_logs], ("epoch", "step")))
        if commits:
            f.flush()  # the data reaches the file before the index that counts it
        for ds, values in commits:
            start = ds.shape[0]
            ds.resize((start + len(values),))
            ds[start:] = values
        node("heartbeat")[0] = time.time()
        f.flush()

    def _node(self, path: str) -> h5py.Dataset:
        """An open dataset of the file, kept open: opening one costs milliseconds."""
        ds = self._nodes.get(path)
        if ds is None:
            ds = self._nodes[path] = self._f[path]
        return ds

    def _write_rows(self, key: str, ds: h5py.Dataset, t0: int, block: np.ndarray) -> None:
        """Write ``block`` at rows ``t0``... of ``ds``, chunk by chunk.

        Chunks are compressed here (see :func:`_chunk_encoder`) and written as
        they are. A last, partly filled chunk is written with zero rows after
        its own and room to grow (:func:`_room`), and its rows are kept in
        memory: the next block rewrites that chunk whole, in place, without
        reading it back. (Blocks are handed over at multiples of
        ``flush_snapshots`` rows, so that happens only on the ``flush_seconds``
        timer and at the end: see :meth:`add_snapshot`.)
        """
        if block.shape[1:] != ds.shape[1:]:  # written below as raw chunks: check here
            raise ValueError(f"activations/{key}: a snapshot of shape {block.shape[1:]} does "
                             f"not fit the recording's {ds.shape[1:]}")
        if key not in self._encoders:
            self._encoders[key] = _chunk_encoder(ds)
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
                    room = _room(len(data), self._full.get(key), chunk.nbytes)
                else:
                    room = 0
                ds.id.write_direct_chunk(offset, data + bytes(max(0, room - len(data))))
        self._tails[key] = rows[last:]


def _room(length: int, full: int | None, raw: int) -> int:
    """Bytes to reserve for a partly filled chunk now ``length`` bytes long, so
    it can fill: 10 % over ``full``, the largest full chunk of its layer so
    far, or before there is one, twice its size now (``raw``, the chunk's
    uncompressed size, bounds deflate's output).

    In SWMR mode HDF5 never frees a rewritten chunk's old space (a reader may
    still point at it): a chunk rewritten at another size leaves a hole in the
    file for good, one rewritten at the same size stays in place. So a partly
    filled chunk is written with room to grow, and its later writes are padded
    to the same size (:meth:`RunWriter._write_rows`). A layer's first chunk
    doubles its room when it outgrows it, so the holes it leaves add up to
    less than its own size. The padding follows the end of the zlib stream,
    where inflating stops: HDF5's deflate filter ignores it.
    """
    return min(int(full * 1.1) if full else 2 * length, raw + raw // 1000 + 64)


def _time_chunk(shape: Sequence[int], dtype: Any) -> int:
    """Snapshots per chunk for a layer: a power of two, at most 32 and 1 MiB."""
    per_snapshot = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    fits = max(1, min(_MAX_CHUNK_SNAPSHOTS, _CHUNK_BYTES // max(per_snapshot, 1)))
    return 1 << (fits.bit_length() - 1)


def _chunk_encoder(ds: h5py.Dataset):
    """A function from a full chunk's rows to its bytes on disk, or None.

    For the default filters (byte shuffle, then deflate) the chunk is encoded
    here with ISA-L's deflate (the ``isal`` package; several times faster than
    zlib on this kind of data, same stream format) and written directly, so any
    HDF5 reader inflates it as usual. Without ``isal`` the standard library's
    zlib does the same, more slowly. Other filter choices return None: HDF5
    applies them itself.
    """
    plist = ds.id.get_create_plist()
    filters = {plist.get_filter(i)[0] for i in range(plist.get_nfilters())}
    deflate, shuffle = h5py.h5z.FILTER_DEFLATE, h5py.h5z.FILTER_SHUFFLE
    if deflate not in filters or not filters <= {deflate, shuffle}:
        return None
    shuffle = shuffle in filters
    level = 4 if ds.compression_opts is None else int(ds.compression_opts)

    def encode(rows: np.ndarray) -> bytes:
        rows = np.ascontiguousarray(rows)
        return _deflate(_shuffle(rows) if shuffle else rows, level)

    return encode


def _shuffle(rows: np.ndarray) -> np.ndarray:
    """HDF5's shuffle filter: all elements' first bytes (in memory order), then all
    second bytes, and so on, as one contiguous uint8 array.

    For 2- and 4-byte elements on a little-endian machine, memory byte k of
    every element is taken as ``(word >> 8k)`` truncated to uint8, the words
    read in the machine's order whatever the array's dtype says: contiguous
    vector operations, about five times faster than a strided byte transpose.
    """
    size = rows.itemsize
    if size not in (2, 4) or sys.byteorder != "little":
        return np.ascontiguousarray(rows.view(np.uint8).reshape(-1, size).T).reshape(-1)
    words = rows.reshape(-1).view(np.uint16 if size == 2 else np.uint32)
    n = words.size
    out = np.empty(size * n, dtype=np.uint8)
    np.copyto(out[:n], words, casting="unsafe")  # byte 0: the low byte
    for k in range(1, size):
        np.copyto(out[k * n:(k + 1) * n], words >> (8 * k), casting="unsafe")
    return out


try:
    from isal import isal_zlib as _isal
except ImportError:  # pragma: no cover - isal has wheels for the usual platforms
    _isal = None


def _deflate(data: Any, level: int) -> bytes:
    """A zlib-format deflate stream of ``data``, any contiguous buffer (what HDF5's
    deflate filter reads).

    Both libraries release the GIL while compressing, so the training loop's
    Python keeps running beside the writer thread.
    """
    if _isal is not None:
        return _isal.compress(data, _isal_level(level))
    import zlib

    return zlib.compress(data, level)


def _isal_level(level: int) -> int:
    """ISA-L's level (0–3) for a zlib level (0–9): 1–3 → 1, 4–6 → 2, 7–9 → 3.

    Measured on the seed recording (``bench/storage.py``), ISA-L's level 2
    compresses nearly as well as its level 3 in under half the time.
    """
    return 0 if level <= 0 else min(3, (level + 2) // 3)


def _fixed(value: Any) -> Any:
    """Strings are stored as fixed-length UTF-8 bytes, never variable-length.

    Reading a variable-length string goes through HDF5's global heap, which a
    damaged file can send into an endless loop; fixed-length strings are
    plain bytes of a size known before reading, so readers can refuse the
    other kind outright.
    """
    return np.bytes_(value.encode("utf-8")) if isinstance(value, str) else value


def _create_analysis(f: h5py.File, layers: Sequence[LayerSpec], probes_x: np.ndarray,
                     every: int) -> None:
    group = f.create_group("analysis")
    group.attrs["every"] = int(every)
    group.create_dataset("probes_x", data=probes_x)
    group.create_dataset("steps", (0,), maxshape=(None,), dtype=np.int64, chunks=(1024,),
                         fillvalue=-1)
    grams = group.create_group("gram")
    n = probes_x.shape[0]
    for spec in layers:
        grams.create_dataset(spec.key, (0, n, n), maxshape=(None, n, n), dtype=np.float32,
                             chunks=(1, n, n), compression="gzip", compression_opts=4,
                             shuffle=True)


def _truncate_analysis(f: h5py.File, rows: int) -> None:
    f["analysis/steps"].resize(rows, axis=0)
    for ds in f["analysis/gram"].values():
        ds.resize(min(rows, ds.shape[0]), axis=0)


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


def _append_logs(node, group: str, index_rows, logs_rows, index_names
                 ) -> tuple[h5py.Dataset, list[int]]:
    """Write a block of log rows except the last index column, which is returned
    (dataset, values) for the caller to commit after a flush. ``node(path)``
    opens a dataset of the file."""
    names_ds = node(f"{group}/names")
    names = [n.decode("utf-8") for n in names_ds[:]]
    for logs in logs_rows:
        for name in logs:
            if name not in names:
                names.append(name)
    if len(names) > names_ds.shape[0]:
        start = names_ds.shape[0]
        names_ds.resize((len(names),))
        names_ds[start:] = [n.encode("utf-8")[:128] for n in names[start:]]
    values = node(f"{group}/values")
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
    f.attrs["writer_pid"] = os.getpid()
    f.attrs["writer_host"] = _fixed(socket.gethostname())
    f.attrs["flush_seconds"] = float(flush_seconds)
    f.attrs["flush_snapshots"] = int(flush_snapshots)


def _truncate(f: h5py.File, keep: int, from_step: int) -> None:
    for name in ("steps", "epochs", "wall_time"):
        f[name].resize(keep, axis=0)
    for ds in f["activations"].values():
        ds.resize(min(keep, ds.shape[0]), axis=0)
    if "analysis" in f:
        rows = int(np.searchsorted(f["analysis/steps"][:], from_step, side="right"))
        _truncate_analysis(f, rows)
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
            "Record into a new file, or pass mode='overwrite' to replace it.")
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
            closed = int(f["status"][0]) != STATUS_RECORDING
    except Exception:
        closed = False
    with open_run(path) as run:
        if closed:
            return False
        if run.writer_state == "live":
            raise RecordingError(
                f"{path} is still being written by process {run.attrs.get('writer_pid')}; "
                "repair it after that process has stopped.")
        src = run._f
        n = run.num_snapshots
        rows = {group: run._metric_rows(group) for group in ("batch", "epoch")}
        tmp = _temporary_beside(path, like=path)
        try:
            with run._reading(), h5py.File(tmp, "w", libver="latest") as dst:
                for key in src.attrs:
                    dst.attrs[key] = src.attrs[key]
                for name in src:
                    src.copy(src[name], dst, name=name)
                _truncate_to(dst, n, rows)
                if int(dst["status"][0]) == STATUS_RECORDING:
                    dst["status"][0] = STATUS_STOPPED
        except BaseException:
            os.unlink(tmp)
            raise
    os.replace(tmp, path)
    return True


def _temporary_beside(path: str, *, like: str | None = None) -> str:
    """A new empty file in ``path``'s directory, named to be moved onto ``path``.

    It has the permissions of ``like`` (the file it will replace) or else a new
    file's usual ones, 0666 less the umask, as ``open()`` would give: not
    ``mkstemp``'s 0600, which would keep a recording from the rest of its group.
    """
    directory = os.path.dirname(os.path.abspath(path))
    for _ in range(100):
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        if like is not None:
            try:
                os.chmod(tmp, stat.S_IMODE(os.stat(like).st_mode))
            except OSError:
                os.unlink(tmp)
                raise
        return tmp
    raise FileExistsError(f"no free temporary name beside {path}")


def _truncate_to(f: h5py.File, n: int, rows: dict[str, int]) -> None:
    """Cut every per-snapshot dataset to ``n`` and the metric tables to ``rows``."""
    for name in ("steps", "epochs", "wall_time"):
        f[name].resize(n, axis=0)
    for ds in f["activations"].values():
        ds.resize(n, axis=0)
    if "analysis" in f:
        steps = f["analysis/steps"]
        complete = min([steps.shape[0]] + [ds.shape[0] for ds in f["analysis/gram"].values()])
        last = int(f["steps"][n - 1]) if n else -1
        _truncate_analysis(f, int(np.searchsorted(steps[:complete], last, side="right")))
    for group, count in rows.items():
        for ds in f["metrics"][group].values():
            if ds.name.rsplit("/", 1)[-1] != "names":
                ds.resize(count, axis=0)


# --------------------------------------------------------------------------- #
# Reading
# --------------------------------------------------------------------------- #

# Limits on what a file may declare. A damaged or crafted file can claim any
# shape; these keep every read bounded (about 1 GB at most) whatever it says.
_MAX_SNAPSHOTS = 1 << 24
_MAX_SNAPSHOT_ELEMENTS = 1 << 27  # one snapshot of one layer: probes × H × W × C
_MAX_PROBE_ELEMENTS = 1 << 26
_MAX_METRIC_ELEMENTS = 1 << 26
_MAX_ATTRS = 256
_MAX_ATTR_BYTES = 1 << 20
_MAX_ATTR_ELEMENTS = 4096
_MAX_STRING = 10_000
_SCAN_ELEMENTS = 1 << 22  # elements read per block when scanning a layer
# Filters built into HDF5/h5py. Any other filter id would make HDF5 look for a
# plugin library to load: a file must never choose code to run.
_SAFE_FILTERS = frozenset({1, 2, 3, 4, 5, 6, 32000})


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

    Works on a file still being written (it reads the snapshots committed so
    far; call :meth:`refresh` to see newer ones) and on one whose writer died.
    Activations are read lazily, one snapshot at a time if wanted, so long runs
    need not fit in memory. Everything taken from the file is checked first: a
    damaged or crafted file raises :class:`RecordingError`, never an absurd
    allocation.
    """

    def __init__(self, path: str):
        self.path = str(path)
        self._f = _open_for_reading(self.path)
        try:
            with self._reading():
                self._validate()
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
            raise RecordingError(f"{self.path} is damaged: {_h5_reason(exc)}") from exc

    # -- validation --------------------------------------------------------- #

    def _damaged(self, what: str) -> RecordingError:
        return RecordingError(f"{self.path} is damaged: {what}")

    def _validate(self) -> None:
        f = self._f
        fmt = _attr(f, "format", strict=True)
        if fmt != FORMAT_NAME:
            raise RecordingError(
                f"{self.path} is an HDF5 file but not a layerwatch recording "
                "(no root attribute format='layerwatch').")
        version = _attr(f, "format_version", strict=True)
        if isinstance(version, bool) or not isinstance(version, int) \
                or version != FORMAT_VERSION:
            raise RecordingError(
                f"{self.path} has format_version={_printable(repr(version))[:40]}; this "
                f"layerwatch reads version {FORMAT_VERSION}. Upgrade layerwatch to read "
                "newer files.")
        for name in ("steps", "epochs", "wall_time"):
            ds = self._dataset(name, ndim=(1,), kinds="iuf")
            if ds.shape[0] > _MAX_SNAPSHOTS:
                raise self._damaged(f"'{name}' declares {ds.shape[0]} snapshots.")
        status = self._dataset("status", ndim=(1,), kinds="iu")
        if status.shape != (1,):
            raise self._damaged(f"'status' has shape {status.shape}; expected (1,).")
        if "heartbeat" in f:
            self._dataset("heartbeat", ndim=(1,), kinds="f")
        px = self._dataset("probes/x", ndim=range(2, _MAX_RANK + 2), kinds="fiub")
        if px.size > _MAX_PROBE_ELEMENTS or px.shape[0] < 1:
            raise self._damaged(f"probes/x has shape {px.shape}.")
        if "probes/y" in f:
            py = self._dataset("probes/y", ndim=(1,), kinds="iu")
            if py.shape != (px.shape[0],):
                raise self._damaged("probes/y does not match probes/x.")
        group = self._group("activations")
        if len(group) > _MAX_LAYERS:
            raise self._damaged(f"'activations' holds {len(group)} entries.")
        layers = []
        for key in group:
            ds = self._dataset(f"activations/{key}", ndim=range(3, _MAX_RANK + 3), kinds="f")
            shape = ds.shape
            per_snapshot = int(np.prod(shape[1:], dtype=np.float64))
            if shape[1] != px.shape[0] or per_snapshot > _MAX_SNAPSHOT_ELEMENTS \
                    or per_snapshot == 0 or shape[0] > _MAX_SNAPSHOTS:
                raise self._damaged(
                    f"activations/{_printable(key)} has shape {shape}; expected (snapshots, "
                    f"{px.shape[0]} probes, ...) with at most {_MAX_SNAPSHOT_ELEMENTS} "
                    "values per snapshot.")
            layers.append(_layer_info(key, ds))
        if not layers:
            raise RecordingError(f"{self.path} holds no recorded layer.")
        self.layers: list[LayerInfo] = layers
        for group_name, index_names in (("batch", ("step",)), ("epoch", ("epoch", "step"))):
            self._group(f"metrics/{group_name}")
            names = self._dataset(f"metrics/{group_name}/names", ndim=(1,), kinds="S")
            values = self._dataset(f"metrics/{group_name}/values", ndim=(2,), kinds="f")
            if names.shape[0] > _MAX_METRICS or names.dtype.itemsize > 1024:
                raise self._damaged(f"metrics/{group_name}/names is too large.")
            for name in index_names:
                ds = self._dataset(f"metrics/{group_name}/{name}", ndim=(1,), kinds="iu")
                if ds.shape[0] > _MAX_SNAPSHOTS * 4:
                    raise self._damaged(f"metrics/{group_name}/{name} is too long.")
            rows = min(values.shape[0], f[f"metrics/{group_name}/step"].shape[0])
            if rows * min(values.shape[1], names.shape[0]) > _MAX_METRIC_ELEMENTS:
                raise self._damaged(f"metrics/{group_name}/values has shape {values.shape}.")

    def _group(self, name: str) -> h5py.Group:
        obj = self._resolve(name)
        if not isinstance(obj, h5py.Group):
            raise self._damaged(f"'{name}' is not a group.")
        return obj

    def _dataset(self, name: str, *, ndim, kinds: str) -> h5py.Dataset:
        ds = self._resolve(name)
        label = _printable(name)
        if not isinstance(ds, h5py.Dataset):
            raise self._damaged(f"'{label}' is not a dataset.")
        if ds.ndim not in ndim:
            raise self._damaged(f"'{label}' has {ds.ndim} dimensions.")
        if ds.dtype.kind not in kinds or ds.dtype.itemsize > 8 and ds.dtype.kind != "S":
            raise self._damaged(f"'{label}' has dtype {ds.dtype}.")
        if ds.is_virtual:
            raise self._damaged(f"'{label}' is a virtual dataset (data in other files).")
        plist = ds.id.get_create_plist()
        if plist.get_external_count():
            raise self._damaged(f"'{label}' keeps its data in external files.")
        for i in range(plist.get_nfilters()):
            code = plist.get_filter(i)[0]
            if code not in _SAFE_FILTERS:
                raise self._damaged(
                    f"'{label}' uses HDF5 filter {code}, which layerwatch does not load "
                    "(only built-in filters are trusted).")
        if ds.chunks is not None \
                and int(np.prod(ds.chunks, dtype=np.float64)) > _MAX_SNAPSHOT_ELEMENTS:
            raise self._damaged(f"'{label}' has chunks {ds.chunks}.")
        return ds

    def _resolve(self, name: str):
        """Follow ``name`` through hard links only: soft and external links
        (which could point into other files) are not part of the format."""
        obj = self._f
        for part in name.split("/"):
            if not isinstance(obj, h5py.Group) or part not in obj:
                raise self._damaged(f"'{_printable(name)}' is missing.")
            link = obj.get(part, getlink=True)
            if not isinstance(link, h5py.HardLink):
                raise self._damaged(f"'{_printable(name)}' is a link, not data.")
            obj = obj[part]
        return obj

    def _count(self) -> None:
        """How many snapshots are committed: the shortest per-snapshot dataset,
        cut where ``steps`` stops increasing (an index that grew on disk
        before its values were written reads as the fill value -1)."""
        f = self._f
        n = min(f[name].shape[0] for name in ("steps", "epochs", "wall_time"))
        for layer in self.layers:
            n = min(n, f["activations"][layer.key].shape[0])
        steps = np.asarray(f["steps"][:n], dtype=np.int64)
        bad = np.flatnonzero((steps < 0) | (np.diff(steps, prepend=-1) <= 0))
        if len(bad):
            n = int(bad[0])
        self._n = int(n)
        self._steps = steps[:n]

    def _metric_rows(self, group: str) -> int:
        g = self._f["metrics"][group]
        step = g["step"]
        n = min(g["values"].shape[0], step.shape[0])
        if "epoch" in g:
            n = min(n, g["epoch"].shape[0])
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
                if i >= _MAX_ATTRS:
                    break
                value = _attr(self._f, key)
                if value is not None:
                    out[_printable(key)[:200]] = value
        return out

    @property
    def storage_dtype(self) -> str:
        value = _attr(self._f, "storage_dtype")
        return value if value in ("float16", "float32", "float64") else "float16"

    def text(self, name: str) -> str | None:
        """A JSON/text document from ``/meta`` (``model_config``, ``summary``)."""
        with self._reading():
            group = self._f.get("meta")
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
            return np.asarray(self._f["epochs"][: self._n], dtype=np.int64)

    @property
    def wall_time(self) -> np.ndarray:
        with self._reading():
            return np.asarray(self._f["wall_time"][: self._n], dtype=np.float64)

    @property
    def status(self) -> int:
        """``STATUS_RECORDING`` (0), ``STATUS_COMPLETE`` (1) or ``STATUS_STOPPED`` (2)."""
        with self._reading():
            return int(self._f["status"][0])

    @property
    def closed_cleanly(self) -> bool:
        return self.status == STATUS_COMPLETE

    @property
    def heartbeat(self) -> float | None:
        """Wall time of the writer's last flush (it flushes at least every
        ``flush_seconds`` while alive)."""
        with self._reading():
            ds = self._f.get("heartbeat")
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
        attrs = {key: _attr(self._f, key)
                 for key in ("writer_pid", "writer_host", "flush_seconds")}
        interval = attrs["flush_seconds"]
        interval = float(interval) if isinstance(interval, (int, float)) \
            and 0 < interval < 1e6 else 2.0
        beat = self.heartbeat
        silent = beat is not None and time.time() - beat > 10 * interval + 30
        pid, host = attrs["writer_pid"], attrs["writer_host"]
        if isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid < 1 << 22 \
                and host == socket.gethostname():
            if not _process_exists(pid):
                return "gone"
            return "stalled" if silent else "live"
        return "gone" if silent else "unknown"

    def probes_x(self) -> np.ndarray:
        with self._reading():
            return self._f["probes/x"][()]

    def probes_y(self) -> np.ndarray | None:
        with self._reading():
            return self._f["probes/y"][()] if "probes/y" in self._f else None

    def layer(self, key: str) -> LayerInfo:
        for layer in self.layers:
            if key in (layer.key, layer.layer_name):
                return layer
        raise KeyError(key)

    def activations(self, key: str, index: Any = slice(None)) -> np.ndarray:
        """Activations of one layer, indexed along snapshots (as float32)."""
        layer = self.layer(key)
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
            ds = self._f["activations"][layer.key]
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
            ds = self._f["activations"][layer.key]
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

    # -- analysis probes (optional) ----------------------------------------- #

    @property
    def has_analysis(self) -> bool:
        """Whether the run recorded analysis-probe Gram matrices."""
        return self._analysis() is not None

    def _analysis(self) -> tuple[h5py.Group, int, int] | None:
        """(group, committed rows, probe count) of a well-formed analysis group."""
        if "analysis" not in self._f:
            return None
        group = self._group("analysis")
        steps = self._dataset("analysis/steps", ndim=(1,), kinds="iu")
        probes = self._dataset("analysis/probes_x", ndim=range(2, _MAX_RANK + 2), kinds="biuf")
        n = int(probes.shape[0])
        grams = self._group("analysis/gram")
        rows = steps.shape[0]
        for key in grams:
            ds = self._dataset(f"analysis/gram/{key}", ndim=(3,), kinds="f")
            if ds.shape[1:] != (n, n) or n * n > _MAX_SNAPSHOT_ELEMENTS:
                raise self._damaged(f"analysis/gram/{_printable(key)} has shape {ds.shape}.")
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
            return np.asarray(group["steps"][:rows], dtype=np.int64)

    @property
    def analysis_probe_count(self) -> int:
        found = self._analysis()
        return 0 if found is None else found[2]

    @property
    def analysis_layers(self) -> list[str]:
        """Layer keys that have analysis Gram matrices."""
        found = self._analysis()
        return [] if found is None else [k for k in found[0]["gram"] if k in
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
        if layer.key not in group["gram"]:
            raise KeyError(key)
        with self._reading():
            ds = group["gram"][layer.key]
        return self._iter_rows(ds, rows, indices, "analysis", np.float64)

    def first_nonfinite(self, key: str) -> int | None:
        """Index of the first snapshot of a layer holding NaN or ±inf, if any.

        Streams the layer in blocks, so memory stays bounded on long runs.
        """
        layer = self.layer(key)
        per_snapshot = max(1, int(np.prod((self._f["probes/x"].shape[0],) + layer.shape)))
        block = max(1, _SCAN_ELEMENTS // per_snapshot)
        with self._reading():
            ds = self._f["activations"][layer.key]
            for start in range(0, self._n, block):
                values = ds[start:min(start + block, self._n)]
                finite = np.isfinite(values).reshape(len(values), -1).all(axis=1)
                if not finite.all():
                    return start + int(np.argmin(finite))
        return None

    def metrics(self, group: str = "batch") -> Metrics:
        """Scalar logs: ``"batch"`` (every logged step) or ``"epoch"`` (epoch ends)."""
        if group not in ("batch", "epoch"):
            raise ValueError(f"group must be 'batch' or 'epoch'. Received: group={group!r}")
        n = self._metric_rows(group)
        with self._reading():
            g = self._f["metrics"][group]
            names = [_printable(v.decode("utf-8", "replace")) for v in g["names"][:]]
            values = g["values"]
            vals = values[:n, : len(names)] if len(names) else np.zeros((n, 0))
            if vals.shape[1] < len(names):  # a reader raced the writer growing columns
                names = names[: vals.shape[1]]
            return Metrics(names=names, steps=np.asarray(g["step"][:n], dtype=np.int64),
                           values=np.asarray(vals, dtype=np.float64),
                           epochs=np.asarray(g["epoch"][:n], dtype=np.int64)
                           if "epoch" in g else None)

    def refresh(self) -> None:
        """See what a live writer has committed since the file was opened."""
        with self._reading():
            for name in ("steps", "epochs", "wall_time", "status", "heartbeat"):
                if name in self._f:
                    self._f[name].refresh()
            for layer in self.layers:
                self._f["activations"][layer.key].refresh()
            for group in ("batch", "epoch"):
                for ds in self._f["metrics"][group].values():
                    ds.refresh()
            self._validate()
            self._count()

    def storage_bytes(self) -> tuple[int, int]:
        """(bytes on disk, bytes as raw float32) of all activations."""
        stored = raw = 0
        n = self.num_snapshots
        with self._reading():
            for layer in self.layers:
                ds = self._f["activations"][layer.key]
                stored += ds.id.get_storage_size()
                raw += n * int(np.prod(ds.shape[1:])) * 4
        return stored, raw


def _attr(obj: h5py.HLObject, name: str, *, strict: bool = False) -> Any:
    """One attribute as a plain value (str, int, float, bool or a small numeric
    array), or None when it is absent, too large or not a plain value. The
    size is checked before anything is read. With ``strict``, an attribute
    HDF5 cannot read (a damaged file) raises instead of reading as absent."""
    try:
        if name not in obj.attrs:
            return None
        aid = h5py.h5a.open(obj.id, name.encode("utf-8"))
        shape = aid.shape
        if shape is None or int(np.prod(shape, dtype=np.float64)) > _MAX_ATTR_ELEMENTS \
                or aid.get_storage_size() > _MAX_ATTR_BYTES:
            return None
        kind = aid.dtype.kind
        if kind not in "biufS":  # variable-length strings are never read: see _fixed
            return None
        value = obj.attrs[name]
    except Exception:  # unreadable on a damaged file
        if strict:
            raise
        return None
    if isinstance(value, bytes):
        return _printable(value.decode("utf-8", "replace"))[:_MAX_STRING]
    if isinstance(value, str):
        return _printable(value)[:_MAX_STRING]
    if isinstance(value, np.generic):
        value = value.item()
        return _printable(value.decode("utf-8", "replace")) if isinstance(value, bytes) \
            else value
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return value
    return None


def _printable(text: str) -> str:
    """Text from a file, safe to print: control characters become '?'."""
    return "".join(c if c.isprintable() else "?" for c in str(text))


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


def _layer_info(key: str, ds: h5py.Dataset) -> LayerInfo:
    def text(name: str, default: str) -> str:
        value = _attr(ds, name)
        return value[:1000] if isinstance(value, str) else default

    value_range = None
    raw_range = _attr(ds, "value_range")
    if isinstance(raw_range, np.ndarray):
        arr = np.asarray(raw_range, dtype=np.float64).ravel()
        if arr.shape == (2,) and np.all(np.isfinite(arr)) and arr[0] < arr[1]:
            value_range = (float(arr[0]), float(arr[1]))
    per_probe = tuple(int(s) for s in ds.shape[2:])
    channel_axis = _attr(ds, "channel_axis")
    if not isinstance(channel_axis, int) or isinstance(channel_axis, bool) \
            or not -len(per_probe) <= channel_axis < len(per_probe):
        channel_axis = len(per_probe) - 1
    return LayerInfo(key=key, shape=per_probe, layer_name=text("layer_name", key),
                     layer_class=text("layer_class", ""), activation=text("activation", ""),
                     tensor=text("tensor", key), value_range=value_range,
                     channel_axis=channel_axis % len(per_probe))


def _open_for_reading(path: str) -> h5py.File:
    if not os.path.exists(path):
        raise RecordingError(f"{path} does not exist.")
    if os.path.isdir(path):
        raise RecordingError(f"{path} is a directory, not a recording.")
    if not os.path.isfile(path):
        raise RecordingError(f"{path} is not a regular file (not a layerwatch recording).")
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except Exception as exc:
        raise RecordingError(f"Cannot read {path}: {_h5_reason(exc)}") from exc
    if not is_hdf5:
        raise RecordingError(f"{path} is not an HDF5 file (not a layerwatch recording).")
    # A closed file opens plainly. A file a writer holds (live) or held when it
    # was killed is flagged open-for-write and needs SWMR reading.
    try:
        return h5py.File(path, "r", locking=False)
    except Exception as exc:
        first = exc
    if "truncated file" in str(first):
        # Shorter than its own superblock says. SWMR reading would open it
        # anyway (a live file may grow) and show whatever the cut left.
        raise RecordingError(f"{path} is damaged or unreadable: {_h5_reason(first)}") from first
    try:
        return _open_swmr(path)
    except Exception:
        pass
    try:
        # This process itself is writing the file (a notebook reading a run
        # its own fit() is recording): HDF5 shares the open file, and the
        # open only succeeds with the writer's (default) locking settings.
        return _open_swmr(path, disable_locking=False)
    except Exception:
        pass
    raise RecordingError(f"{path} is damaged or unreadable: {_h5_reason(first)}")


def _open_swmr(path: str, *, disable_locking: bool = True) -> h5py.File:
    """Open for SWMR reading with bounded retries; ``disable_locking=False``
    keeps HDF5's default file locking (what h5py and the writer use)."""
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    if disable_locking:
        fapl.set_file_locking(False, True)
    _limit_read_attempts(fapl)
    fid = h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDONLY | h5py.h5f.ACC_SWMR_READ,
                        fapl=fapl)
    return h5py.File(fid)


_SET_READ_ATTEMPTS: Any = None


def _limit_read_attempts(fapl: h5py.h5p.PropFAID) -> None:
    """Bound HDF5's retries of metadata that fails its checksum.

    A SWMR reader retries such reads (a live writer may be mid-write) 100
    times, doubling a sleep from 1 ns each time: on a damaged file that is a
    hang of centuries. 16 tries sleep about a millisecond in all. h5py does
    not expose H5Pset_metadata_read_attempts, so it is called through ctypes
    in the HDF5 library h5py itself loaded; where that fails, HDF5's default
    stays.
    """
    global _SET_READ_ATTEMPTS
    if _SET_READ_ATTEMPTS is None:
        _SET_READ_ATTEMPTS = False
        try:
            import ctypes

            with open("/proc/self/maps") as maps:
                libs = {line.split()[-1] for line in maps
                        if "libhdf5" in line and "_hl" not in line and "/" in line}
            for lib in sorted(libs):
                fn = getattr(ctypes.CDLL(lib), "H5Pset_metadata_read_attempts", None)
                if fn is not None:
                    fn.argtypes, fn.restype = [ctypes.c_int64, ctypes.c_uint], ctypes.c_int
                    _SET_READ_ATTEMPTS = fn
                    break
        except Exception:
            pass
    if _SET_READ_ATTEMPTS:
        _SET_READ_ATTEMPTS(fapl.id, 16)


def _h5_reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return _printable(text.splitlines()[0])[:300]


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


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")

