"""The Keras side: the ``LayerWatch`` callback.

Its hooks stay short and call named helpers, as Keras' own callbacks do: the
probe pass (:mod:`~layerwatch.record.probe_pass`), the step bookkeeping
(:mod:`~layerwatch.record.steps`), the snapshot a fused train call computes
(:mod:`~layerwatch.record.fused`), the steps whose snapshots wait for one
replay of several (:mod:`~layerwatch.record.held`), the time budget
(:mod:`~layerwatch.record.budget`), the chief rule
(:mod:`~layerwatch.record.chief`) and what the file is told about the model
(:mod:`~layerwatch.record.specs`). Writing is the store's
(:class:`~layerwatch.store.RunWriter`).
"""

from __future__ import annotations

import atexit
import os
import shutil
import time
import warnings
import weakref
from typing import Any

import keras
import numpy as np

from layerwatch.store import STATUS_COMPLETE, STATUS_STOPPED, RunWriter, open_run

from .budget import DISK_BUDGET, CostMeter, Verdict, over_budget, over_disk, snapshot_bytes
from .chief import env_is_chief, is_chief
from .extractor import LayerSelector, Tap
from .features import FeatureAscent, check_features, features_due
from .fused import DeferredSnapshot, Fused, can_fuse, fused_pass
from .held import HeldSteps
from .jax_state import JaxState
from .occlusion import DEFAULT_PATCH, check_occlusion_options
from .options import check_analysis_probes, check_every, check_path, check_recording_options
from .probe_pass import ProbePass
from .probes import check_labels, check_probe_set, probe_count
from .specs import layer_specs, model_texts, run_metadata
from .step_values import StepValues, mean_metrics
from .steps import StepCounter

_open_writers: "weakref.WeakSet[RunWriter]" = weakref.WeakSet()
_holding: "weakref.WeakSet[HeldSteps]" = weakref.WeakSet()  # of the recordings open


@atexit.register
def _close_open_writers() -> None:
    # A run that raised out of fit() never reaches on_train_end; close its file
    # at exit so what was buffered is written and the file is marked stopped.
    for held in list(_holding):  # first: they hand their snapshots to the writers
        try:
            held.close()
        except Exception:
            pass
    for writer in list(_open_writers):
        try:
            writer.close(status=STATUS_STOPPED)
        except Exception:
            pass


class LayerWatch(keras.callbacks.Callback):
    """Record every conv layer's activations for fixed probes at every step.

    Parameters
    ----------
    path : str or os.PathLike
        The HDF5 file to write (see ``docs/FORMAT.md``).
    probes : array-like, shape (probes, *input shape)
        Fixed inputs run through the model at every recorded step, as the model
        takes them (same preprocessing as the training data).
    probe_labels : array-like, optional
        Their labels, integers or one-hot; stored with the probes.
    layers : list of str, or callable, optional
        Which layers to record: names (or nested paths ``"encoder/conv1"``), or
        a predicate ``layer -> bool``. Default: every convolutional layer,
        nested sub-models included.
    every : int or "auto", default 1
        Record after every ``every``-th optimizer step (step 0 and the final
        step are always recorded). ``"auto"`` starts at 1 and, once the first
        steps are measured, records as often as ``budget`` allows.
    max_channels : int, optional
        Record at most this many channels per layer (default: all). Bounds
        memory, disk and time on wide models; the file's ``channels``
        attribute says which were kept.
    channel_selection : {"first", "variance"}, default "first"
        Which ``max_channels`` channels: the first K, or the K whose
        activations vary most across the probes at the first recorded step
        (mean over positions of the variance over probes), kept in model order.
    budget : float or None, default 0.2
        Share of a training step that recording may cost. Measured over the
        16 steps after the first two (a shorter fit is not measured); above
        it, one warning names the ``every=`` (and ``max_channels=``) that
        would fit. ``None`` turns the check off.
    disk_budget : float or None, default 2e9
        Bytes the recording may plan to write. At ``fit``'s start, when the
        planned run (epochs × steps per epoch ÷ ``every`` snapshots, at the
        first snapshot's compressed size) would write more than this, or more
        than the file's disk has free, one warning gives the estimate and the
        ``every=`` / ``max_channels=`` / ``layers=`` that would fit;
        ``every="auto"`` records that much less often instead. ``None`` lifts
        the budget; the free-space check stays.
    mode : {"new", "append", "overwrite"}, default "new"
        ``"new"`` refuses to touch an existing file; ``"append"`` continues it
        (resumed training: same layers and probes); ``"overwrite"`` replaces it.
    dtype : {"auto", "float16", "float32"}, default "auto"
        Storage precision of the activations. ``"auto"``: float16 where the
        recorded tensor is bounded (tanh, sigmoid, softsign, ReLU6, …) or
        already float16 (mixed precision), float32 elsewhere (ReLU, linear,
        BatchNorm outputs), so no finite activation is stored as inf.
        ``"float16"`` everywhere saturates finite values beyond ±65504 at
        ±65504 (and rounds those below 6e-8 to 0); ``"float32"`` is exact.
    flush_seconds : float, default 2.0
        Longest time a snapshot waits before it is handed to the disk writer: a
        crash loses at most the snapshots of the last ``flush_seconds`` (plus the
        time the disk needs), never more than ``3 * flush_snapshots - 1``; on
        TensorFlow also the newest step's, which the next step computes.
    flush_snapshots : int, default 32
        Snapshots buffered before a write is started. On PyTorch training
        waits for that write, which costs less there than writing beside its
        steps; elsewhere the writer works beside training.
    analysis_probes : array-like, optional
        Extra inputs, not rendered, whose n×n activation Gram matrices are kept
        every ``analysis_every`` steps for ``layerwatch drift`` (linear CKA on
        more probes is less noisy). Shaped like ``probes``; at least 2.
    analysis_every : int, default 10
    compression : {"gzip", "lzf", None}, default "gzip"
        HDF5 filter of the activations. ``"gzip"`` is byte shuffle + deflate,
        compressed by layerwatch itself with ISA-L (a standard stream any HDF5
        reader inflates).
    saliency : bool, default False
        Also record, at every recorded step, each probe's saliency map: the
        gradient of the model's output at the probe's label (the top class
        without ``probe_labels``) with respect to the input, signed, in
        inference mode, on that step's weights — the output as it is (after a
        softmax, the probability). Stored as float32 in the dataset
        ``saliency``, ``(snapshots, probes, *input shape)``. One-input,
        one-output models with a floating-point input only (else a ValueError
        at ``fit``'s start).
    gradcam : bool, default False
        Also record, at every recorded step, the Grad-CAM map of every recorded
        layer with a 2-D spatial output, per probe: ``relu(sum_c w_c A_c)``
        over all the layer's channels (``max_channels`` does not cut it), ``w_c``
        the spatial mean of the gradient of the same output saliency uses with
        respect to the recorded tensor ``A``. Shares saliency's backward pass.
        Stored as float32 in ``gradcam/<key>``, ``(snapshots, probes, h, w)``.
        1-D and 3-D convolutions get none. Models with one input and one output
        only (else a ValueError at ``fit``'s start).
    occlusion_every : int or None, default None
        Also record occlusion sensitivity at step 0, at the first recorded step
        at or after every multiple of this, and at the final step: per probe and
        patch position, how much the labelled output drops when that square
        patch is set to grey (the mean of all probe pixels). Stored in
        ``occlusion/values``, ``(O, probes, gh, gw)``, at ``occlusion/steps``.
        All patched copies run in one compiled inference call.
    occlusion_patch : int, default 7
        Patch side in input pixels.
    occlusion_stride : int or None, default None
        Step between patch positions in pixels; None: the patch size
        (patches tile the image without overlap).
    features_every : int, optional
        Also record, at the first recorded step, every ``features_every``
        steps and at the final step of each fit, for the first
        ``features_channels`` recorded channels of every layer, the input that
        most excites each channel's mean activation (gradient ascent from a
        fixed seed, regularized: see ``layerwatch.record.features`` and
        ``docs/FORMAT.md``, "Features"), with the mean activation it reaches
        and the best probe's. An image that does not beat every probe is
        replaced by the best probe. Default None: off. One-input Sequential or
        Functional models with a floating-point input only (else a ValueError
        at ``fit``'s start). One features call runs 32 forward and backward
        passes over a batch of (layers × ``features_channels``) inputs, in the
        training loop at a batch end: on the seed model on a 2-core CPU
        0.15–0.3 s a call (the first, which compiles, 0.25–1.4 s), some 20
        train steps at batch 64 (``bench/features.py``). Choose
        ``features_every`` in the hundreds of steps there, and bound the batch
        on wide models with ``layers=`` or ``features_channels=``. Not counted
        in ``budget``.
    features_channels : int, default 8
        Feature images per layer (the first recorded channels).

    Notes
    -----
    The probe pass is one compiled, inference-mode function built once. On
    TensorFlow (one replica, one step per execution) it runs *inside* the
    train step's graph instead (``layerwatch.record.fused``): the snapshot of
    step ``k`` is computed by the train call of step ``k + 1``, on the weights
    that step starts from, and written when that call returns (or at the
    epoch's end). The model's own train function is handed back when ``fit``
    ends. Before its first call it creates the optimizer's variables, which
    Keras would create inside that call's trace (the same variables, made the
    same way; only for Keras' own ``train_step``): tracing is then faster.

    Raises
    ------
    ValueError
        Bad probes, labels, ``every``, ``mode`` or ``dtype``; ``path`` exists
        and ``mode="new"``; the model has no layer to record (at ``fit``).
    OSError
        ``path`` cannot be written.

    Examples
    --------
    >>> probes, labels = one_per_class(x_test, y_test)          # doctest: +SKIP
    >>> model.fit(x, y, epochs=5, batch_size=1024,               # doctest: +SKIP
    ...           callbacks=[LayerWatch("runs/mnist.h5", probes, labels)])
    """

    def __init__(self, path: str | os.PathLike, probes: Any, probe_labels: Any = None, *,
                 layers: LayerSelector = None, every: int | str = 1, mode: str = "new",
                 dtype: str = "auto", flush_seconds: float = 2.0,
                 flush_snapshots: int = 32, compression: str | None = "gzip",
                 max_channels: int | None = None, channel_selection: str = "first",
                 budget: float | None = 0.2, analysis_probes: Any = None,
                 analysis_every: int = 10, disk_budget: float | None = DISK_BUDGET,
                 saliency: bool = False, gradcam: bool = False,
                 occlusion_every: int | None = None, occlusion_patch: int = DEFAULT_PATCH,
                 occlusion_stride: int | None = None, features_every: int | None = None,
                 features_channels: int = 8):
        super().__init__()
        # A worker that will not write must not refuse the chief's file.
        self.path = check_path(path, mode if env_is_chief() else "overwrite")
        self.probes = check_probe_set(probes)
        self.probe_labels = check_labels(probe_labels, probe_count(self.probes))
        self.analysis_probes = check_analysis_probes(analysis_probes, self.probes)
        self.every, self.auto_every = check_every(every)
        check_recording_options(
            analysis_every=analysis_every, max_channels=max_channels,
            channel_selection=channel_selection, budget=budget, auto_every=self.auto_every,
            dtype=dtype, compression=compression, flush_seconds=flush_seconds,
            flush_snapshots=flush_snapshots, disk_budget=disk_budget)
        self.layers = layers
        self.mode = mode
        self.analysis_every = int(analysis_every)
        self.dtype = dtype
        self.compression = compression
        self.flush_seconds = float(flush_seconds)
        self.flush_snapshots = int(flush_snapshots)
        self.max_channels = None if max_channels is None else int(max_channels)
        self.channel_selection = channel_selection
        self.budget = None if budget is None else float(budget)
        self.disk_budget = None if disk_budget is None else float(disk_budget)
        self.saliency = bool(saliency)
        check_occlusion_options(occlusion_every, occlusion_patch, occlusion_stride)
        self.gradcam = bool(gradcam)
        self.occlusion_every = None if occlusion_every is None else int(occlusion_every)
        self.occlusion_patch = int(occlusion_patch)
        self.occlusion_stride = int(occlusion_stride or occlusion_patch)
        self._last_occlusion: int | None = None
        self.features_every, self.features_channels = check_features(features_every,
                                                                     features_channels)
        self._features: FeatureAscent | None = None  # built with the probe pass
        self._last_features: int | None = None
        self._probes: ProbePass | None = None      # built once per model
        self._jax_state: JaxState | None = None     # on JAX, for the learning rate
        self._fusion: Fused | None = None  # built once, reused by later fits
        self._deferred: DeferredSnapshot | None = None  # this fit's fused snapshots
        self._steps: StepCounter | None = None
        self._step_values: StepValues | None = None
        self._meter: CostMeter | None = None
        self._budget_checked = False
        self._disk_checked = False
        self._writer: RunWriter | None = None
        self._last_step: int | None = None
        self._held: HeldSteps | None = None  # steps waiting for one replay of several
        self._last_analysis: int | None = None
        self._epoch = 0
        self._owns_file = False  # this callback created the file: later fits append
        self._failed = False

    # -- Keras hooks -------------------------------------------------------- #

    def on_train_begin(self, logs=None):
        self._close(status=STATUS_STOPPED)  # a previous fit() that raised
        model = self.model
        self._prepare(model)
        if not is_chief(model):
            return  # another worker writes the recording; this one records nothing
        steps_per_epoch = (self.params or {}).get("steps")
        # With gradient accumulation a batch is not a step, and a last partial
        # execution of an epoch of unknown length cannot be sized: read the optimizer.
        read_every_step = bool(getattr(model.optimizer, "gradient_accumulation_steps", None)) \
            or (getattr(model, "steps_per_execution", 1) > 1 and not steps_per_epoch)
        self._steps = StepCounter(self._read_step, steps_per_epoch=steps_per_epoch,
                                  read_every_step=read_every_step)
        # Under a distribution strategy a metric's variables are synchronized on
        # read, a collective every worker must join: the chief alone may not.
        distributed = getattr(getattr(model, "distribute_strategy", None),
                              "num_replicas_in_sync", 1) > 1
        self._step_values = StepValues(lambda: mean_metrics(model),
                                       steps_per_epoch=steps_per_epoch,
                                       read=None if distributed else self._read_count)
        step = self._read_step()
        fuse = not read_every_step and can_fuse(model, self._probes.recorder,
                                                gradients=self._probes.has_gradients)
        # Where the separate probe pass can compile in the background (JAX),
        # the first fused train call takes the first snapshot, beside it.
        ahead = fuse and self._probes.warm()
        first = self._probes.like if ahead else self._snapshot()
        self._open_writer(model, self._split(first)[0], step)
        _open_writers.add(self._writer)
        self._held = HeldSteps(self._probes, self._record, wait=self.flush_seconds / 2)
        _holding.add(self._held)
        if fuse:
            self._deferred = DeferredSnapshot(self._fused_pass(model, first))
        if not ahead:  # else the first fused call's snapshot is checked
            self._check_disk(self._split(first)[0])
        if self._last_step != step:
            if ahead:
                self._deferred.defer(step, self._epoch, self._analysis_grams(step), {})
                self._last_step = step
            else:
                self._record(step, first, self._analysis_grams(step))
            self._occlude(step)
        self._make_features(step)
        # Measured once per callback: a resumed or repeated fit() warns no more.
        self._meter = CostMeter() if self.budget is not None and not self._budget_checked \
            else None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = int(epoch)
        if self._recording:
            self._steps.epoch_begins()
            self._step_values.epoch_begins()

    def on_train_batch_end(self, batch, logs=None):
        if not self._recording:
            return
        try:
            start = time.perf_counter()
            fused_call = self._deferred is not None and self._deferred.pending
            if fused_call:
                self._take_deferred()
            handed = time.perf_counter()
            step = self._steps.at_batch_end(batch)
            recorded = self._last_step is None or \
                step // self.every > self._last_step // self.every
            direct = recorded and (self._deferred is None or (
                self._meter is not None and self._meter.wants_plain_step(fused_call)))
            scalars = self._step_values.convert(self._scalars(logs, with_lr=direct), batch) \
                if logs else {}
            written = None
            releases = self._held.releases
            held = direct and self._held.hold(step, self._epoch,
                                              lambda: self._analysis_grams(step))
            if held:
                self._last_step, direct = step, False
            elif direct:
                arrays = self._snapshot()
                written = time.perf_counter()
                self._record(step, arrays, self._analysis_grams(step))
            elif recorded:
                # The next train call runs the probes on the weights of this
                # step, and reads the learning rate: these logs wait for it.
                self._deferred.defer(step, self._epoch, self._analysis_grams(step), scalars)
                self._last_step = step
                scalars = None
            if recorded:
                self._occlude(step)
            if scalars:
                self._writer.add_batch_logs(step, scalars)
            if self._meter is not None:
                end = time.perf_counter()
                # A separate snapshot taken now is not part of handing over the fused one.
                self._meter.add(step, start, end,
                                (end - written) if direct else 0.0 if held else None,
                                fused_call=fused_call, handover=handed - start, held=held,
                                released=self._held.releases > releases)
                if self._meter.done:
                    self._check_budget(self._meter)
                    self._meter, self._budget_checked = None, True
            self._make_features(step)  # its own cost, outside the recording budget
        except Exception as exc:
            self._stop_recording(exc)

    def on_test_begin(self, logs=None):
        # fit() validates through the same callbacks: steps held for one replay
        # of several (PyTorch) reach the writer before validation, however long.
        if self._recording:
            try:
                self._held.release()
            except Exception as exc:
                self._stop_recording(exc)

    def on_epoch_end(self, epoch, logs=None):
        if not self._recording:
            return
        try:
            # Snapshots are on disk at every epoch end: no deferred one waits
            # for the next epoch (and for whatever runs between epochs). Held
            # steps need nothing from the next one: their weights are copied.
            self._take_deferred(now=True)
            step = self._steps.at_epoch_end(epoch)
            self._writer.add_epoch_logs(epoch, step, self._scalars(logs or {}))
        except Exception as exc:
            self._stop_recording(exc)

    def on_train_end(self, logs=None):
        if self._writer is None:
            return
        if not self._failed:
            try:
                self._take_deferred(now=True)
                self._held.close()
                step = self._read_step()
                if step != self._last_step:
                    self._record(step, self._snapshot(), self._analysis_grams(step, final=True))
                elif self._probes.analysis_count and self._last_analysis != step:
                    # Grams for the final step
                    self._record(step, None, self._analysis_grams(step, final=True))
                self._occlude(step, final=True)
                self._make_features(step, final=True)
            except Exception as exc:
                self._stop_recording(exc)
        self._close(status=STATUS_STOPPED if self._failed else STATUS_COMPLETE)

    # -- internals ---------------------------------------------------------- #

    @property
    def _recording(self) -> bool:
        return self._writer is not None and not self._failed

    def _prepare(self, model: keras.Model) -> None:
        """Validate the probes against the model and build the probe pass once."""
        if self._probes is not None and self._probes.model is model:
            return
        self._probes = ProbePass(
            model, self.probes, layers=self.layers, dtype=self.dtype,
            max_channels=self.max_channels, channel_selection=self.channel_selection,
            analysis_probes=self.analysis_probes, stored_channels=self._stored_channels,
            saliency=self.saliency, labels=self.probe_labels, gradcam=self.gradcam,
            occlusion=None if self.occlusion_every is None else {
                "patch": self.occlusion_patch, "stride": self.occlusion_stride})
        self._jax_state = JaxState(model) if keras.backend.backend() == "jax" else None
        self._features = None if self.features_every is None else FeatureAscent(
            model, self._probes, channels=self.features_channels, every=self.features_every)

    def _stored_channels(self, taps: list[Tap]) -> dict[int, Any] | None:
        """Channels kept by the recording being resumed (variance is not re-chosen)."""
        if self.channel_selection != "variance" or not os.path.exists(self.path) or \
                (self.mode != "append" and not self._owns_file):
            return None
        with open_run(self.path) as run:
            kept = {layer.key: layer.channels for layer in run.layers}
        return {i: kept.get(tap.key) for i, tap in enumerate(taps)}

    def _open_writer(self, model: keras.Model, first: list[np.ndarray], step: int) -> None:
        """Create the recording, or continue it (``mode="append"``, or a later fit)."""
        probes = self._probes
        specs = layer_specs(probes.taps, first, probes.channels, probes.totals, probes.dtypes,
                            probes.names)
        options = dict(flush_seconds=self.flush_seconds, flush_snapshots=self.flush_snapshots)
        mode = "append" if self._owns_file else self.mode
        if mode == "append" and os.path.exists(self.path):
            self._writer = RunWriter.append(
                self.path, layers=specs, probes_x=probes.inputs[0], probes_y=self.probe_labels,
                from_step=step, analysis_probes=probes.analysis_count,
                saliency=probes.saliency_shape is not None,
                gradcam=list(probes.gradcam_shapes), occlusion=self._occlusion_settings(),
                features=self._features and self._features.spec, **options)
            self._last_step = self._writer.resumed.last_step
            self._last_features = self._writer.resumed.last_features
            self._last_analysis = self._writer.resumed.last_analysis
            self._last_occlusion = self._writer.resumed.last_occlusion
        else:
            self._writer = RunWriter.create(
                self.path, layers=specs, probes_x=probes.inputs[0], probes_y=self.probe_labels,
                probe_inputs=dict(zip(probes.names, probes.inputs)) if len(probes.inputs) > 1
                else None,
                metadata=run_metadata(model, every=self.every, num_probes=probes.count),
                texts=model_texts(model), storage_dtype=self.dtype,
                compression=self.compression,
                analysis_probes_x=_first(probes.analysis_feed),
                analysis_every=self.analysis_every, saliency_shape=probes.saliency_shape,
                gradcam_shapes=probes.gradcam_shapes or None,
                occlusion=self._occlusion_settings(),
                features=self._features and self._features.spec, **options)
            self._last_step = self._last_analysis = self._last_occlusion = None
            self._last_features = None
        self._writer.wait_for_blocks = _wait_for_blocks()
        self._owns_file = True
        self._failed = False

    def _occlusion_settings(self) -> dict[str, Any] | None:
        """What the file is told about the occlusion maps (None without them)."""
        occlusion = self._probes.occlusion
        if occlusion is None:
            return None
        return {"every": self.occlusion_every, "patch": occlusion.patch,
                "stride": occlusion.stride, "fill": occlusion.fill, "grid": occlusion.grid}

    def _occlude(self, step: int, *, final: bool = False) -> None:
        """Hand the writer the occlusion maps now, if ``step`` is an occlusion step:
        step 0 (the first), the first recorded step at or after each multiple of
        ``occlusion_every``, and the final step. Run at the batch end, on the
        weights of ``step`` (also when its snapshot is deferred to the next call)."""
        if self._probes.occlusion is None or self._last_occlusion == step or not (
                final or self._last_occlusion is None
                or step // self.occlusion_every > self._last_occlusion // self.occlusion_every):
            return
        self._writer.add_occlusion(step, self._probes.occlusion())
        self._last_occlusion = step

    def _fused_pass(self, model: keras.Model, like: list[np.ndarray]) -> Fused:
        """The fused train function, installed: built once, rebuilt if the model changed.

        ``like`` is a snapshot (:meth:`_snapshot`), for the shapes it hands back."""
        fusion = self._fusion
        if fusion is None or fusion.recorder is not self._probes.recorder \
                or not fusion.install():
            fusion = self._fusion = fused_pass(model, self._probes.recorder,
                                               self._probes.feed, like,
                                               graph=self._probes.compiled_call,
                                               separate=self._snapshot_on)
            fusion.install()
        return fusion

    def _snapshot(self) -> list[np.ndarray]:
        """One array per tap, then (with ``saliency=True``) the saliency maps:
        the form a fused call's snapshot has too (see :meth:`_split`)."""
        # One compiled, inference-mode call (built once; on TensorFlow the
        # function the fused step calls too, on JAX on the train loop's state
        # as it is, unsynced): see ProbePass.snapshot_all.
        return self._probes.snapshot_all()

    def _snapshot_on(self, values: Any) -> tuple[list, float | None]:
        """JAX: the probe activations and the learning rate on the model's
        (trainable, non-trainable, optimizer) ``values`` given."""
        return self._probes.snapshot_on(values), self._jax_state.learning_rate(values)

    def _make_features(self, step: int, *, final: bool = False) -> None:
        """Queue the feature images of ``step`` when they are due (``features_every=``)."""
        if self._features is None or not features_due(
                step, self._last_features, self.features_every, final=final):
            return
        self.model  # noqa: B018  (on JAX: the training state into the variables)
        self._writer.add_features(step, self._features())
        self._last_features = step

    def _split(self, arrays: list[np.ndarray] | None
               ) -> tuple[list[np.ndarray] | None, np.ndarray | None]:
        """(the taps' arrays, the saliency maps or None) of a snapshot (its
        Grad-CAM maps, last, are :meth:`_gradcam`'s)."""
        if arrays is not None and self._probes.gradcam_shapes:
            arrays = arrays[:-len(self._probes.gradcam_shapes)]
        if arrays is None or self._probes.saliency_shape is None:
            return arrays, None
        return arrays[:-1], np.asarray(arrays[-1], dtype=np.float32)

    def _analysis_grams(self, step: int, *, final: bool = False) -> list[np.ndarray] | None:
        """The analysis probes' Gram matrices now, if ``step`` is an analysis step."""
        if not self._probes.analysis_count or not (
                final or self._last_analysis is None
                or step // self.analysis_every > self._last_analysis // self.analysis_every):
            return None
        self._last_analysis = step
        return self._probes.grams()

    def _record(self, step: int, arrays: list[np.ndarray] | None,
                grams: list[np.ndarray] | None, *, epoch: int | None = None,
                wall_time: float | None = None) -> None:
        if self._held is not None:
            self._held.release()  # the file's rows stay in step order
        cams = self._gradcam(arrays)
        arrays, saliency = self._split(arrays)
        self._writer.add_snapshot(step, self._epoch if epoch is None else epoch, arrays, grams,
                                  saliency=saliency, gradcam=cams, wall_time=wall_time)
        self._last_step = step

    def _gradcam(self, arrays: list[np.ndarray] | None) -> dict[str, np.ndarray] | None:
        """Layer key -> Grad-CAM maps of a snapshot (its last arrays), or None."""
        keys = list(self._probes.gradcam_shapes)
        if arrays is None or not keys:
            return None
        return {key: np.asarray(a, dtype=np.float32)
                for key, a in zip(keys, arrays[-len(keys):])}

    def _take_deferred(self, *, now: bool = False) -> None:
        """Record the snapshot deferred to this train call (``now``: with a
        separate probe pass, the weights being those of its step still)."""
        if self._deferred is None or not self._deferred.pending:
            return
        separate = (lambda: (self._snapshot(), self._learning_rate())) if now else None
        step, epoch, arrays, rate, grams, scalars = self._deferred.take(separate)
        if arrays is None:
            # No fused call ran: something replaced the model's train function.
            warnings.warn(
                f"layerwatch: the snapshot of step {step} was lost (the model's train "
                "function was replaced during fit); recording goes on with a separate "
                "probe pass.", RuntimeWarning, stacklevel=3)
            self._release_fused()
        else:
            if rate is not None and scalars and "learning_rate" not in scalars:
                scalars["learning_rate"] = rate
            self._record(step, arrays, grams, epoch=epoch)
            self._check_disk(self._split(arrays)[0])  # the first snapshot may be this one
        if scalars:
            self._writer.add_batch_logs(step, scalars)

    def _release_fused(self) -> None:
        deferred, self._deferred = self._deferred, None
        if deferred is not None:
            deferred.fused.restore()

    def _read_count(self, metric: Any) -> float:
        """A mean metric's sample count (a variable read; on JAX, a state sync first)."""
        self.model  # noqa: B018
        return float(keras.ops.convert_to_numpy(metric.count))

    def _read_step(self) -> int:
        """The optimizer's step count (a variable read; on JAX, a state sync)."""
        return int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

    def _scalars(self, logs: dict, *, with_lr: bool = False) -> dict[str, float]:
        out = {}
        for name, value in logs.items():
            if isinstance(value, (int, float)):  # Keras hands callbacks Python floats
                out[str(name)] = float(value)
                continue
            try:
                out[str(name)] = float(np.asarray(keras.ops.convert_to_numpy(value)))
            except (TypeError, ValueError):
                continue  # non-scalar logs are not curves
        if with_lr and "learning_rate" not in out:
            rate = self._learning_rate()
            if rate is not None:
                out["learning_rate"] = rate
        return out

    def _learning_rate(self) -> float | None:
        """The optimizer's current learning rate (a variable read; on JAX, from
        the train loop's state, which reading ``self.model`` would sync)."""
        if keras.backend.backend() == "jax":
            return self._jax_state.learning_rate()
        lr = getattr(self.model.optimizer, "learning_rate", None)
        if lr is None:
            return None
        try:
            return float(keras.ops.convert_to_numpy(lr))
        except (TypeError, ValueError):
            return None

    def _check_budget(self, meter: CostMeter) -> None:
        """Warn once (or, with every="auto", adapt) when recording costs too much."""
        self._follow(over_budget(meter, every=self.every, budget=self.budget,
                                 channels=self._probes.kept_channels))

    def _follow(self, verdict: Verdict | None) -> None:
        """With every="auto" record as often as ``verdict`` allows; else warn with it."""
        if verdict is None:
            return
        if self.auto_every:
            self.every = verdict.every
        else:
            warnings.warn(verdict.message, RuntimeWarning, stacklevel=4)

    def _check_disk(self, first: list[np.ndarray]) -> None:
        """Warn once (or, with every="auto", record less often) when the planned
        run would write more than ``disk_budget`` or than the disk has free.
        Checked once per callback, like the time budget: later calls return."""
        if self._disk_checked:
            return
        self._disk_checked = True
        params = self.params or {}
        epochs, steps = params.get("epochs"), params.get("steps")
        if not epochs or not steps:
            return  # a run of unknown length: nothing to plan
        try:
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(self.path))).free
        except OSError:
            free = None
        planned = int(epochs) * int(steps)
        n = self._probes.analysis_count  # analysis Grams: n×n float32 per layer, as written
        extra = n * n * 4 * len(first) * (planned // self.analysis_every + 2) if n else 0
        extra += self._explanation_bytes(planned)
        self._follow(over_disk(
            per_layer=snapshot_bytes(first, self.compression),
            names=[tap.key for tap in self._probes.taps], channels=self._probes.kept_channels,
            snapshots=planned // self.every + 2, every=self.every,
            budget=self.disk_budget, free=free, extra=extra))

    def _explanation_bytes(self, planned: int) -> int:
        """Bytes the explanations will add over ``planned`` steps, float32,
        uncompressed (an upper bound): saliency and Grad-CAM maps at every
        snapshot, occlusion maps (probes × grid) every ``occlusion_every``
        steps, feature images with their two values per image every
        ``features_every``; each also at the first and final step."""
        probes = self._probes
        per_snapshot = 0
        if probes.saliency_shape is not None:
            per_snapshot += int(np.prod(probes.saliency_shape))
        per_snapshot += sum(h * w for h, w in probes.gradcam_shapes.values())
        total = probes.count * per_snapshot * 4 * (planned // self.every + 2)
        occlusion = probes.occlusion
        if occlusion is not None:
            rows = planned // self.occlusion_every + 2
            total += probes.count * int(np.prod(occlusion.grid)) * 4 * rows
        if self._features is not None:
            spec = self._features.spec
            images = sum(len(c) for c in spec.channels.values())
            per_image = int(np.prod(spec.input_shape)) + 2  # the image, its activation, best probe
            total += images * per_image * 4 * (planned // self.features_every + 2)
        return total

    def _stop_recording(self, exc: BaseException) -> None:
        self._failed = True
        warnings.warn(
            f"layerwatch stopped recording to {self.path} at step {self._last_step}: "
            f"{type(exc).__name__}: {exc}. Training goes on; the file keeps what was "
            "written before.", RuntimeWarning, stacklevel=2)
        self._close(status=STATUS_STOPPED)

    def _close(self, *, status: int) -> None:
        self._release_fused()
        held, self._held = self._held, None
        if held is not None:
            _holding.discard(held)
            count = len(held)
            try:
                held.close()
            except Exception as exc:
                warnings.warn(f"layerwatch could not record the last {count} steps' "
                              f"snapshots in {self.path}: {type(exc).__name__}: {exc}",
                              RuntimeWarning, stacklevel=2)
        writer, self._writer = self._writer, None
        if writer is None:
            return
        _open_writers.discard(writer)
        try:
            writer.close(status=status)
        except Exception as exc:
            if not self._failed:
                self._failed = True
                warnings.warn(f"layerwatch could not finish writing {self.path}: "
                              f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)


def _first(feed: Any) -> np.ndarray | None:
    """The first input's array of a probe feed (an array, a list of them, or None)."""
    return feed[0] if isinstance(feed, list) else feed


def _wait_for_blocks() -> bool:
    """Whether training should wait while the writer compresses and writes each
    block (:attr:`RunWriter.wait_for_blocks`): on PyTorch.

    On PyTorch the writer's compression found no idle CPU beside training: it
    cost the seed model's fit about its whole CPU time, and at idle priority
    mostly ran while a batch end handing over a block waited for the one
    before. Waiting for each block, written by the encoder threads side by
    side, made the fit about 1–2 % faster (bench/README.md, 0.4.8). On
    TensorFlow and JAX waiting made no measurable difference: their writers
    work beside training.
    """
    return keras.backend.backend() == "torch"
