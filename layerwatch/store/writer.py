"""The writer: appends snapshots and metrics to a recording from a background thread.

It lays out a new file (:meth:`RunWriter.create`), continues an old one
(:meth:`RunWriter.append`, checked by :mod:`layerwatch.store.append`), and
writes blocks of snapshots crash-safely in HDF5's SWMR mode. Chunks are
encoded by :mod:`layerwatch.store.codec`; every name comes from
:mod:`layerwatch.store.schema`.
"""

from __future__ import annotations

import collections
import functools
import os
import queue
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Sequence

import h5py
import numpy as np
from h5py._objects import phil as _HDF5_LOCK  # h5py's lock around the HDF5 library

from . import codec, explanations
from .append import Resumed, prepare_append
from .closing import Handles, abandon, finish
from .features import (FeatureRow, FeaturesSpec, check_feature_rows, create_features,
                       feature_keys, write_feature_rows)
from .files import open_for_writing, temporary_beside
from .schema import (ACTIVATIONS, ANALYSIS, ANALYSIS_GRAMS, ANALYSIS_PROBES, ANALYSIS_STEPS,
                     ATTR_ANALYSIS_EVERY, ATTR_FLUSH_SECONDS, ATTR_FLUSH_SNAPSHOTS, ATTR_FORMAT,
                     ATTR_FORMAT_VERSION, ATTR_INPUT_INDEX, ATTR_STORAGE_DTYPE, ATTR_WRITER_HOST,
                     ATTR_WRITER_PID, EPOCHS, FORMAT_NAME, FORMAT_VERSION, HEARTBEAT, INDEX_FILL,
                     META, METRICS, METRIC_GROUPS, METRIC_NAMES, METRIC_VALUES, NAME_DTYPE,
                     OCCLUSION_STEPS, OCCLUSION_VALUES, GRADCAM,
                     PROBES_X, PROBES_Y, PROBE_INPUTS, SALIENCY, STATUS, STATUS_COMPLETE, STATUS_RECORDING,
                     STATUS_STOPPED, STEPS, STORAGE_DTYPES, WALL_TIME, LayerSpec, RecordingError,
                     fixed)


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
    the disk falls behind. A block's layers are compressed side by side on a
    few encoder threads. With :attr:`wait_for_blocks` the training loop waits
    at each block until it is written (the callback's choice on PyTorch, where
    writing beside training cost as much: see ``layerwatch.record.callback``).

    Each block is committed in two flushes: activations, epochs, wall times and
    metric values first, then the index datasets (``steps``,
    ``metrics/*/step``), whose length readers trust. The index datasets' fill
    value is -1 and steps only increase, so a reader of a killed file also
    recognizes an index that grew on disk before its values were written.

    Use :meth:`create` or :meth:`append`; both leave the file in SWMR mode.

    A write that HDF5 fails (a full disk, a file-size limit, an I/O error)
    stops the writer: the error is raised to the training loop, and the file
    is never written or closed again (:func:`layerwatch.store.closing.abandon`),
    so it keeps what was committed before, as a killed writer leaves it.
    """

    def __init__(self, f: h5py.File, layer_keys: Sequence[str], *, flush_seconds: float,
                 flush_snapshots: int):
        self._f = f
        self._keys = list(layer_keys)
        self._flush_seconds = float(flush_seconds)
        self._flush_snapshots = int(flush_snapshots)
        self._node = Handles(f)  # the datasets written, each opened once
        #: Per layer, the dtype its dataset stores (chosen when the file was made).
        self._dtypes = {key: self._node(f"{ACTIVATIONS}/{key}").dtype for key in self._keys}
        #: Whether the file records saliency maps (its rows are written with the activations).
        self.saliency = SALIENCY in f
        #: Layer keys with Grad-CAM rows (written with the activations), in the order
        #: :meth:`add_snapshot` takes them; whether the file records occlusion maps.
        self.gradcam = explanations.gradcam_keys(f)
        self.occlusion = explanations.occlusion_settings(f) is not None
        self._pending_occlusion: list[tuple[int, np.ndarray]] = []
        #: The layer keys with feature images, or None (no features group).
        self._feature_keys = feature_keys(f)
        self._pending_features: list[tuple[int, dict[str, FeatureRow]]] = []
        #: (step, epoch, wall time, arrays, grams, saliency, gradcam) per queued snapshot
        self._pending: list[tuple] = []
        self._pending_batch: list[tuple[int, dict[str, float]]] = []
        self._pending_epoch: list[tuple[int, int, dict[str, float]]] = []
        #: Per layer, the rows of its last, not yet full chunk (writer thread only).
        self._tails: dict[str, np.ndarray] = {}
        self._closing = False  # the last block: its partly filled chunks need no room to grow
        self._full: dict[str, int] = {}  # per layer, the largest full chunk written (bytes)
        self._encoders: dict[str, Any] = {}
        self._rows = int(self._node(STEPS).shape[0])  # snapshots in the file and queued
        self._lock = threading.Lock()
        st = os.stat(f.filename)
        self._identity = (st.st_dev, st.st_ino)
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        #: HDF5 failed a write: it holds data for the file it cannot write, and
        #: the file was abandoned (set by the writer thread before ``_error``).
        self._broken = False
        self._closed = False
        #: In append mode, where the file stood (see :class:`layerwatch.store.append.Resumed`).
        self.resumed: Resumed | None = None
        #: In append mode, the step of the newest snapshot already in the file.
        self.resumed_from: int | None = None
        #: Wait at each block handed over until the writer thread has written
        #: it (see :meth:`add_snapshot`). Off by default: the thread then
        #: writes beside training, on CPU that training leaves idle.
        self.wait_for_blocks = False
        # Chunks are encoded on these threads, a block's columns side by side.
        self._encoding = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1),
                                            thread_name_prefix="layerwatch-encode",
                                            initializer=_lower_priority)
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
               analysis_every: int = 0,
               probe_inputs: dict[str, np.ndarray] | None = None,
               saliency_shape: Sequence[int] | None = None,
               gradcam_shapes: dict[str, tuple[int, int]] | None = None,
               occlusion: dict[str, Any] | None = None,
               features: FeaturesSpec | None = None) -> "RunWriter":
        """Create a new recording at ``path`` (replacing any file there).

        ``storage_dtype`` is the root attribute of that name: ``"float16"``
        or ``"float32"`` for every layer, or ``"auto"`` when each
        :class:`LayerSpec` names its own ``dtype`` (a layer without one is
        stored as float32). With ``analysis_probes_x`` (n inputs), the file
        also gets the ``analysis`` group: per layer, the n×n Gram matrix of
        those inputs' activations at the snapshots that carry one (see
        :meth:`add_snapshot`). ``probe_inputs`` (a multi-input model: input name
        → its probes, in input order) are stored under ``probes/inputs``;
        ``probes_x`` is the first of them. With ``saliency_shape`` (the
        per-probe input shape) the file also gets the float32 dataset
        ``saliency``, one row per snapshot (see :meth:`add_snapshot`). With
        ``gradcam_shapes`` (layer key → its spatial ``(h, w)``) it gets the float32
        datasets ``gradcam/<key>``, one row per snapshot too; with ``occlusion``
        (``every``, ``patch``, ``stride``, ``fill``, ``grid``) the ``occlusion`` group,
        grown by :meth:`add_occlusion`.
        With ``features`` the file gets the ``features`` group (see :meth:`add_features`).
        """
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {STORAGE_DTYPES}. "
                             f"Received: storage_dtype={storage_dtype!r}")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        # Write into a temporary name, then move into place: a failure while
        # laying out the file never leaves a half-made recording at ``path``.
        tmp = temporary_beside(path)
        f = None
        try:
            f = h5py.File(tmp, "w", libver="latest")
            # Every group and dataset made stays open until the file is flushed:
            # a handle dropped earlier would write its data as it closes, where
            # a failure cannot be handled (see layerwatch.store.closing).
            made = Handles(f)
            h = made.hold
            f.attrs[ATTR_FORMAT] = fixed(FORMAT_NAME)
            f.attrs[ATTR_FORMAT_VERSION] = FORMAT_VERSION
            f.attrs[ATTR_STORAGE_DTYPE] = fixed(storage_dtype)
            for key, value in metadata.items():
                f.attrs[key] = fixed(value)
            meta = h(f.create_group(META))
            for key, text in texts.items():
                h(meta.create_dataset(key, data=fixed(text)))
            h(f.create_dataset(PROBES_X, data=probes_x))
            if probes_y is not None:
                h(f.create_dataset(PROBES_Y, data=np.asarray(probes_y, dtype=np.int64)))
            for index, (name, array) in enumerate((probe_inputs or {}).items()):
                ds = h(f.create_dataset(f"{PROBE_INPUTS}/{name}", data=array))
                ds.attrs[ATTR_INPUT_INDEX] = index
            n_probes = probes_x.shape[0]
            h(f.create_dataset(STEPS, (0,), maxshape=(None,), dtype=np.int64, chunks=(1024,),
                               fillvalue=INDEX_FILL))
            h(f.create_dataset(EPOCHS, (0,), maxshape=(None,), dtype=np.int32, chunks=(1024,)))
            h(f.create_dataset(WALL_TIME, (0,), maxshape=(None,), dtype=np.float64,
                               chunks=(1024,)))
            acts = h(f.create_group(ACTIVATIONS))
            for spec in layers:
                shape = (n_probes,) + tuple(spec.shape)
                dtype = np.dtype(spec.dtype or (
                    "float32" if storage_dtype == "auto" else storage_dtype))
                ds = h(acts.create_dataset(
                    spec.key, (0,) + shape, maxshape=(None,) + shape, dtype=dtype,
                    chunks=(codec.time_chunk(shape, dtype),) + shape,
                    compression=compression,
                    compression_opts=compression_opts if compression == "gzip" else None,
                    shuffle=shuffle if compression else False))
                for name, value in spec.attrs.items():
                    ds.attrs[name] = fixed(value)
            if saliency_shape is not None:
                shape = (n_probes,) + tuple(int(d) for d in saliency_shape)
                h(f.create_dataset(
                    SALIENCY, (0,) + shape, maxshape=(None,) + shape, dtype=np.float32,
                    chunks=(codec.time_chunk(shape, np.float32),) + shape,
                    compression=compression,
                    compression_opts=compression_opts if compression == "gzip" else None,
                    shuffle=shuffle if compression else False))
            if gradcam_shapes:
                explanations.create_gradcam(
                    f, h, n_probes, gradcam_shapes, compression=compression,
                    compression_opts=compression_opts, shuffle=shuffle)
            if occlusion is not None:
                explanations.create_occlusion(f, h, n_probes, **occlusion)
            metrics = h(f.create_group(METRICS))
            for group, index_names in METRIC_GROUPS.items():
                g = h(metrics.create_group(group))
                for name in index_names:
                    h(g.create_dataset(name, (0,), maxshape=(None,), dtype=np.int64,
                                       chunks=(1024,), fillvalue=INDEX_FILL))
                h(g.create_dataset(METRIC_NAMES, (0,), maxshape=(None,), dtype=NAME_DTYPE,
                                   chunks=(64,)))
                h(g.create_dataset(METRIC_VALUES, (0, 0), maxshape=(None, None),
                                   dtype=np.float64, chunks=(256, 16), fillvalue=np.nan))
            if analysis_probes_x is not None:
                _create_analysis(f, h, layers, analysis_probes_x, analysis_every)
            if features is not None:
                create_features(f, h, features, compression=compression,
                                compression_opts=compression_opts)
            h(f.create_dataset(STATUS, data=np.array([STATUS_RECORDING], dtype=np.int8)))
            h(f.create_dataset(HEARTBEAT, data=np.array([time.time()], dtype=np.float64)))
            done, f = f, None
            error = finish(done, made)
            if error is not None:
                raise error
            os.replace(tmp, path)
        except BaseException:
            if f is not None:  # failed while laying out: closed, or abandoned if unwritable
                finish(f, made)
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return cls._open_for_writing(path, [s.key for s in layers], flush_seconds=flush_seconds,
                                     flush_snapshots=flush_snapshots)

    @classmethod
    def append(cls, path: str, *, layers: Sequence[LayerSpec], probes_x: np.ndarray,
               probes_y: np.ndarray | None, from_step: int, analysis_probes: int = 0,
               flush_seconds: float = 2.0, flush_snapshots: int = 32,
               saliency: bool = False, gradcam: Sequence[str] | None = None,
               occlusion: dict[str, Any] | None = None,
               features: FeaturesSpec | None = None) -> "RunWriter":
        """Reopen an existing recording to continue it (resumed training).

        Raises :class:`layerwatch.store.append.AppendError` when the file's
        layers, probes or number of analysis probes differ from this run's, or
        it holds saliency maps and this run records none (``saliency``), or
        the other way round — and likewise for Grad-CAM (``gradcam``: its layer
        keys) and occlusion (``occlusion``: its ``patch`` and ``stride``), or its feature images differ from ``features``.
        Snapshots after ``from_step`` (left by a run that died after its last
        checkpoint) are dropped with a warning, so steps stay increasing; the
        writer's :attr:`resumed` says where the file stands.
        """
        resumed = prepare_append(path, layers=layers, probes_x=probes_x, probes_y=probes_y,
                                 analysis_probes=analysis_probes, from_step=from_step,
                                 saliency=saliency, gradcam=gradcam, occlusion=occlusion,
                                 features=features)
        writer = cls._open_for_writing(path, [s.key for s in layers],
                                       flush_seconds=flush_seconds,
                                       flush_snapshots=flush_snapshots)
        writer.resumed = resumed
        writer.resumed_from = resumed.last_step
        return writer

    @classmethod
    def _open_for_writing(cls, path, keys, *, flush_seconds, flush_snapshots):
        f = open_for_writing(path)
        try:
            # Attributes cannot change once SWMR mode starts: written here, they
            # tell readers which process writes the file and the crash bound.
            _set_writer_attrs(f, flush_seconds, flush_snapshots)
            f.swmr_mode = True
        except BaseException:
            abandon(f)
            raise
        return cls(f, keys, flush_seconds=flush_seconds, flush_snapshots=flush_snapshots)

    # -- the training-loop side ------------------------------------------- #

    def add_snapshot(self, step: int, epoch: int, arrays: Sequence[np.ndarray] | None,
                     grams: Sequence[np.ndarray] | None = None, *,
                     saliency: np.ndarray | None = None,
                     gradcam: dict[str, np.ndarray] | None = None,
                     wall_time: float | None = None) -> None:
        """Queue one snapshot: one array of shape (probes, *layer shape) per layer,
        and optionally one (n, n) analysis-probe Gram matrix per layer.
        ``arrays=None`` queues the Grams alone, for a step already recorded.
        A file with saliency needs ``saliency`` (probes, *input shape) with
        every ``arrays``; a file without refuses it. Likewise ``gradcam``, layer
        key → (probes, h, w) for each of :attr:`gradcam`. ``wall_time`` is the
        Unix time of the step (default: now)."""
        with self._lock:
            self._pending.append((int(step), int(epoch),
                                  time.time() if wall_time is None else float(wall_time),
                                  None if arrays is None else list(arrays),
                                  None if grams is None else list(grams),
                                  None if saliency is None else np.asarray(saliency),
                                  None if gradcam is None else dict(gradcam)))
            if arrays is not None:
                self._rows += 1
            # Blocks end at multiples of flush_snapshots rows where they can, so
            # they fill whole chunks (see codec.time_chunk) after an early flush too.
            full = len(self._pending) >= self._flush_snapshots or (
                arrays is not None and self._rows % self._flush_snapshots == 0)
        if full:
            self.flush(wait=self.wait_for_blocks)
        else:
            self._raise_if_failed()

    def add_occlusion(self, step: int, values: np.ndarray) -> None:
        """Queue the occlusion maps ``(probes, gh, gw)`` of ``step``: written with the
        next block, committed by ``occlusion/steps``."""
        if not self.occlusion:
            raise ValueError("occlusion maps for a recording made without them")
        with self._lock:
            self._pending_occlusion.append((int(step), np.asarray(values, dtype=np.float32)))

    def add_features(self, step: int, rows: dict[str, FeatureRow]) -> None:
        """Queue the feature images of every layer at ``step``; they are written
        with the next block of snapshots (or within ``flush_seconds``)."""
        with self._lock:
            self._pending_features.append((int(step), dict(rows)))
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
            if not (self._pending or self._pending_batch or self._pending_epoch
                    or self._pending_occlusion or self._pending_features):
                return None
            job = (self._pending, self._pending_batch, self._pending_epoch,
                   self._pending_occlusion, self._pending_features)
            self._pending, self._pending_batch, self._pending_epoch = [], [], []
            self._pending_occlusion, self._pending_features = [], []
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
            # An HDF5 write failed: the writer thread abandoned the file, and
            # nothing more is written to it (the status stays "recording":
            # readers see a writer that is gone, as after a kill).
            if not self._broken:
                try:
                    # A writer stopped by an error of its own (the file was
                    # removed, a snapshot refused) still marks the run stopped,
                    # so readers report it incomplete rather than still recording.
                    self._node(STATUS)[0] = status if self._error is None else STATUS_STOPPED
                    self._node(HEARTBEAT)[0] = time.time()
                except Exception as exc:
                    abandon(self._f)
                    error = exc
                else:
                    error = finish(self._f, self._node)
                if error is not None and self._error is None:
                    self._error = error
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
        except (FileNotFoundError, NotADirectoryError):  # not an EIO: that is no removal
            same = False
        if not same:
            raise RecordingError(f"{self._f.filename} was removed or replaced while recording.")

    def _work(self) -> None:
        _lower_priority()
        try:
            self._serve()
        finally:
            self._encoding.shutdown()

    def _serve(self) -> None:
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
                    self._fail(exc)
                continue
            try:
                if job is None:
                    return
                if self._error is None:
                    self._write(*job)
            except BaseException as exc:  # reported to the training loop
                self._fail(exc)
            finally:
                self._queue.task_done()

    def _fail(self, exc: BaseException) -> None:
        """Stop writing after ``exc`` (writer thread). If HDF5 itself failed,
        the file is abandoned here, before anything else can touch it."""
        if self._broken:
            abandon(self._f)
        self._error = exc

    def _write(self, snapshots, batch_logs, epoch_logs, occlusion=(), features=()) -> None:
        # Refusals come before anything is written: they leave HDF5 able to
        # write and close the file as usual.
        self._check_file()
        with_grams = [s for s in snapshots if s[4] is not None]
        snapshots = [s for s in snapshots if s[3] is not None]
        self._check_shapes(snapshots, with_grams)
        self._check_explanations(snapshots, occlusion)
        check_feature_rows(self._node, self._feature_keys, features)
        try:
            self._write_checked(snapshots, with_grams, batch_logs, epoch_logs, occlusion,
                                features)
        except BaseException:
            # HDF5 may hold data for the file that it could not write: it
            # fails again on any close (see layerwatch.store.closing).
            self._broken = True
            raise

    def _check_shapes(self, snapshots, with_grams) -> None:
        """Refuse arrays that do not fit the file (activations are written as
        raw chunks, which HDF5 does not check)."""
        for column, group, items in ((3, ACTIVATIONS, snapshots),
                                     (4, ANALYSIS_GRAMS, with_grams)):
            for i, key in enumerate(self._keys if items else ()):
                want = self._node(f"{group}/{key}").shape[1:]
                for s in items:
                    if np.shape(s[column][i]) != want:
                        raise ValueError(f"{group}/{key}: a snapshot of shape "
                                         f"{np.shape(s[column][i])} does not fit the "
                                         f"recording's {want}")
        for s in snapshots:
            if (s[5] is not None) != self.saliency:
                raise ValueError("a snapshot without saliency maps for a recording that has "
                                 "them" if self.saliency else
                                 "saliency maps for a recording made without them")
            if s[5] is not None and np.shape(s[5]) != self._node(SALIENCY).shape[1:]:
                raise ValueError(f"{SALIENCY}: a snapshot of shape {np.shape(s[5])} does not "
                                 f"fit the recording's {self._node(SALIENCY).shape[1:]}")

    def _check_explanations(self, snapshots, occlusion) -> None:
        """Refuse Grad-CAM rows and occlusion maps that do not fit the file."""
        for s in snapshots:
            cams = s[6] or {}
            if sorted(cams) != self.gradcam:
                raise ValueError(f"{GRADCAM}: a snapshot with maps of {sorted(cams)} for a "
                                 f"recording of {self.gradcam}")
            for key, cam in cams.items():
                want = self._node(f"{GRADCAM}/{key}").shape[1:]
                if np.shape(cam) != want:
                    raise ValueError(f"{GRADCAM}/{key}: a snapshot of shape {np.shape(cam)} "
                                     f"does not fit the recording's {want}")
        if occlusion:
            want = self._node(OCCLUSION_VALUES).shape[1:]
            for _, values in occlusion:
                if np.shape(values) != want:
                    raise ValueError(f"{OCCLUSION_VALUES}: maps of shape {np.shape(values)} "
                                     f"do not fit the recording's {want}")

    def _write_checked(self, snapshots, with_grams, batch_logs, epoch_logs,
                       occlusion=(), features=()) -> None:
        f, node = self._f, self._node
        commits: list[tuple[h5py.Dataset, list[int]]] = []
        if snapshots:
            n = len(snapshots)
            t0 = node(STEPS).shape[0]
            # (tail key, dataset, a function making its block of rows); "/"
            # never occurs in a layer key: no clash in the chunk tails.
            columns = [(key, node(f"{ACTIVATIONS}/{key}"),
                        lambda i=i, key=key: _rows([s[3][i] for s in snapshots],
                                                   self._dtypes[key]))
                       for i, key in enumerate(self._keys)]
            if self.saliency:
                columns.append(("/" + SALIENCY, node(SALIENCY),
                                lambda: _rows([s[5] for s in snapshots], np.float32)))
            columns += [(f"/{GRADCAM}/{key}", node(f"{GRADCAM}/{key}"),
                         lambda key=key: _rows([s[6][key] for s in snapshots], np.float32))
                        for key in self.gradcam]
            for _, ds, _ in columns:
                ds.resize(t0 + n, axis=0)
            self._write_rows(t0, columns)
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
        if occlusion:
            ds = node(OCCLUSION_VALUES)
            o0 = ds.shape[0]
            ds.resize(o0 + len(occlusion), axis=0)
            ds[o0:] = np.stack([values for _, values in occlusion])
            commits.append((node(OCCLUSION_STEPS), [step for step, _ in occlusion]))
        if features:
            commits.append(write_feature_rows(node, self._feature_keys, features))
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

    def _write_rows(self, t0: int, columns: list[tuple[str, h5py.Dataset, Any]]) -> None:
        """Write each column's block of rows at rows ``t0``... of its dataset,
        chunk by chunk. ``columns``: (tail key, dataset, a function making the block).

        Chunks are compressed here (see :func:`~layerwatch.store.codec.chunk_encoder`),
        the columns' blocks side by side on the encoder threads, and written as
        they are, in order, by this thread. A last, partly filled chunk is
        written with zero rows after its own and room to grow
        (:func:`~layerwatch.store.codec.reserved_room`), and its rows are kept in
        memory: the next block rewrites that chunk whole, in place, without
        reading it back. (Blocks are handed over at multiples of
        ``flush_snapshots`` rows, so that happens only on the ``flush_seconds``
        timer and at the end: see :meth:`add_snapshot`.)
        """
        plans = []
        for key, ds, make in columns:
            if key not in self._encoders:
                self._encoders[key] = codec.chunk_encoder(ds)
            encode = self._encoders[key]
            if encode is None:  # HDF5 applies the filters itself
                block = make()
                ds[t0:t0 + len(block)] = block
                continue
            size = ds.chunks[0]
            c0 = t0 - t0 % size
            tail = self._tails.get(key)
            if tail is None or len(tail) != t0 - c0:  # first block, or a resumed file
                tail = ds[c0:t0]
            plans.append((key, ds, size, c0, tail,
                          functools.partial(_encode_chunks, make, encode, size, tail)))
        encoded = _in_order(self._encoding, [plan[-1] for plan in plans])
        for (key, ds, size, c0, tail, _), (rows, chunks) in zip(plans, encoded):
            origin = (0,) * (rows.ndim - 1)
            for j, filled, data in chunks:
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
                        raw = size * rows[:1].nbytes
                        room = codec.reserved_room(len(data), self._full.get(key), raw)
                    else:
                        room = 0
                    ds.id.write_direct_chunk(offset, data + bytes(max(0, room - len(data))))
            self._tails[key] = rows[len(rows) - len(rows) % size:]


def _rows(arrays: Sequence[np.ndarray], dtype: Any) -> np.ndarray:
    """One block of rows, ``arrays`` stacked, in ``dtype`` (cast as they are
    copied, as ``astype`` casts)."""
    return np.stack(arrays, dtype=dtype, casting="unsafe")


def _encode_chunks(make: Any, encode: Any, size: int, tail: np.ndarray
                   ) -> tuple[np.ndarray, list[tuple[int, int, bytes]]]:
    """A column's rows (its ``tail``, then the block ``make()`` gives) and its
    chunks of ``size`` rows encoded: (first row in the rows, rows filled, bytes)
    per chunk (encoder threads)."""
    block = make()
    rows = np.concatenate([tail, block]) if len(tail) else block
    chunks = []
    for j in range(0, len(rows), size):
        chunk = rows[j:j + size]
        filled = len(chunk)
        if filled < size:  # rows past the dataset's end are never read
            chunk = np.concatenate([chunk, np.zeros((size - filled,) + chunk.shape[1:],
                                                    dtype=chunk.dtype)])
        chunks.append((j, filled, encode(chunk)))
    return rows, chunks


def _in_order(pool: ThreadPoolExecutor, jobs: list, ahead: int = 4):
    """Each job's result, run on ``pool``, yielded in order; at most ``ahead``
    results held or under way at once (memory stays bounded on wide models)."""
    running: collections.deque = collections.deque()
    for job in jobs:
        if len(running) >= ahead:
            yield running.popleft().result()
        running.append(_submit(pool, job))
    while running:
        yield running.popleft().result()


def _submit(pool: ThreadPoolExecutor, job: Any) -> Future:
    """``pool.submit(job)``, or ``job()`` run here once the interpreter
    is exiting: :mod:`concurrent.futures` takes no more work then, and the hook
    that closes recordings left open (after ``fit`` raised) runs after that."""
    try:
        return pool.submit(job)
    except RuntimeError:
        done: Future = Future()
        try:
            done.set_result(job())
        except BaseException as exc:
            done.set_exception(exc)
        return done


def _create_analysis(f: h5py.File, hold: Any, layers: Sequence[LayerSpec],
                     probes_x: np.ndarray, every: int) -> None:
    """Lay out the ``analysis`` group; ``hold`` keeps each object made open."""
    hold(f.create_group(ANALYSIS)).attrs[ATTR_ANALYSIS_EVERY] = int(every)
    hold(f.create_dataset(ANALYSIS_PROBES, data=probes_x))
    hold(f.create_dataset(ANALYSIS_STEPS, (0,), maxshape=(None,), dtype=np.int64,
                          chunks=(1024,), fillvalue=INDEX_FILL))
    grams = hold(f.create_group(ANALYSIS_GRAMS))
    n = probes_x.shape[0]
    for spec in layers:
        hold(grams.create_dataset(spec.key, (0, n, n), maxshape=(None, n, n), dtype=np.float32,
                                  chunks=(1, n, n), compression="gzip", compression_opts=4,
                                  shuffle=True))


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
