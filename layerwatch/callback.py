"""The Keras side: the ``LayerWatch`` callback."""

from __future__ import annotations

import atexit
import json
import math
import os
import time
import warnings
import weakref
from typing import Any, Sequence

import keras
import numpy as np

from . import __version__
from .extractor import (BOUNDED_RANGES, LayerSelector, Tap, build_extractor,
                        build_gram_extractor, cast_outputs, input_spec, probe_function,
                        select_channels)
from .fused import FusedProbePass, can_fuse
from .probes import check_labels, check_probes
from .store import STATUS_COMPLETE, STATUS_STOPPED, LayerSpec, RunWriter, open_run, utc_now

_MODES = ("new", "append", "overwrite")
_CHANNEL_SELECTIONS = ("first", "variance")
_open_writers: "weakref.WeakSet[RunWriter]" = weakref.WeakSet()


@atexit.register
def _close_open_writers() -> None:
    # A run that raised out of fit() never reaches on_train_end; close its file
    # at exit so what was buffered is written and the file is marked stopped.
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
        first steps; above it, one warning names the ``every=`` (and
        ``max_channels=``) that would fit. ``None`` turns the check off.
    mode : {"new", "append", "overwrite"}, default "new"
        ``"new"`` refuses to touch an existing file; ``"append"`` continues it
        (resumed training: same layers and probes); ``"overwrite"`` replaces it.
    dtype : {"float16", "float32"}, default "float16"
        Storage precision of the activations.
    flush_seconds : float, default 2.0
        Longest time a snapshot waits before it is handed to the disk writer: a
        crash loses at most the snapshots of the last ``flush_seconds`` (plus the
        time the disk needs), never more than ``3 * flush_snapshots - 1``; on
        TensorFlow also the newest step's, which the next step computes.
    flush_snapshots : int, default 32
        Snapshots buffered before a write is started.
    analysis_probes : array-like, optional
        Extra inputs, not rendered, whose n×n activation Gram matrices are kept
        every ``analysis_every`` steps for ``layerwatch drift`` (linear CKA on
        more probes is less noisy). Shaped like ``probes``; at least 2.
    analysis_every : int, default 10
    compression : {"gzip", "lzf", None}, default "gzip"
        HDF5 filter of the activations. ``"gzip"`` is byte shuffle + deflate,
        compressed by layerwatch itself with ISA-L (a standard stream any HDF5
        reader inflates).

    Notes
    -----
    The probe pass is one compiled, inference-mode function built once. On
    TensorFlow (one replica, one step per execution) it runs *inside* the
    train step's graph instead (``layerwatch.fused``): the snapshot of step
    ``k`` is computed by the train call of step ``k + 1``, on the weights that
    step starts from, and written when that call returns (or at the epoch's
    end). The model's own train function is handed back when ``fit`` ends.

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
                 dtype: str = "float16", flush_seconds: float = 2.0,
                 flush_snapshots: int = 32, compression: str | None = "gzip",
                 max_channels: int | None = None, channel_selection: str = "first",
                 budget: float | None = 0.2, analysis_probes: Any = None,
                 analysis_every: int = 10):
        super().__init__()
        # A worker that will not write must not refuse the chief's file.
        self.path = _check_path(path, mode if _env_is_chief() else "overwrite")
        self.probes = check_probes(probes)
        self.probe_labels = check_labels(probe_labels, len(self.probes))
        self.analysis_probes = None
        if analysis_probes is not None:
            self.analysis_probes = check_probes(analysis_probes, name="analysis_probes")
            if len(self.analysis_probes) < 2 or self.analysis_probes.shape[1:] != \
                    self.probes.shape[1:]:
                raise ValueError(
                    "analysis_probes must hold at least 2 inputs shaped like the probes "
                    f"{self.probes.shape[1:]}. Received: analysis_probes.shape="
                    f"{self.analysis_probes.shape}")
        if isinstance(analysis_every, bool) or not isinstance(
                analysis_every, (int, np.integer)) or analysis_every < 1:
            raise ValueError("analysis_every must be an integer >= 1. Received: "
                             f"analysis_every={analysis_every!r}")
        self.analysis_every = int(analysis_every)
        self.auto_every = isinstance(every, str) and every == "auto"
        if self.auto_every:
            every = 1
        if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
            raise ValueError(f"every must be an integer >= 1. Received: every={every!r}. "
                             "every='auto' picks it from the budget.")
        if max_channels is not None and (isinstance(max_channels, bool) or not isinstance(
                max_channels, (int, np.integer)) or max_channels < 1):
            raise ValueError("max_channels must be an integer >= 1, or None for all channels. "
                             f"Received: max_channels={max_channels!r}")
        if channel_selection not in _CHANNEL_SELECTIONS:
            raise ValueError(f"channel_selection must be one of {_CHANNEL_SELECTIONS}. "
                             f"Received: channel_selection={channel_selection!r}")
        if budget is not None and (isinstance(budget, bool) or not isinstance(
                budget, (int, float)) or not 0 < budget < 1):
            raise ValueError("budget must be a share of step time between 0 and 1 (e.g. 0.2), "
                             f"or None. Received: budget={budget!r}")
        if self.auto_every and budget is None:
            raise ValueError("every='auto' needs a budget to aim for. Received: budget=None")
        if np.dtype(dtype) not in (np.float16, np.float32):
            raise ValueError(f"dtype must be 'float16' or 'float32'. Received: dtype={dtype!r}")
        if compression not in ("gzip", "lzf", None):
            raise ValueError("compression must be 'gzip', 'lzf' or None. "
                             f"Received: compression={compression!r}")
        if not flush_seconds > 0 or int(flush_snapshots) < 1:
            raise ValueError("flush_seconds must be > 0 and flush_snapshots >= 1. Received: "
                             f"flush_seconds={flush_seconds!r}, flush_snapshots={flush_snapshots!r}")
        self.layers = layers
        self.every = int(every)
        self.mode = mode
        self.dtype = str(np.dtype(dtype))
        self.compression = compression
        self.flush_seconds = float(flush_seconds)
        self.flush_snapshots = int(flush_snapshots)
        self.max_channels = None if max_channels is None else int(max_channels)
        self.channel_selection = channel_selection
        self.budget = None if budget is None else float(budget)
        self._predict: Any = None
        self._recorder: keras.Model | None = None
        self._fusion: FusedProbePass | None = None  # built once, reused by later fits
        self._fused: FusedProbePass | None = None   # installed for this fit
        #: (step, epoch, Grams, batch logs) of a snapshot the next fused train call takes.
        self._deferred: tuple[int, int, list[np.ndarray] | None, dict] | None = None
        self._channels: list[np.ndarray | None] = []
        self._totals: list[int] = []
        self._meter: _CostMeter | None = None
        self._budget_checked = False
        self._epoch_start: int | None = None   # optimizer step when the epoch began
        self._derived_last: int | None = None  # last step derived from a batch index
        self._read_steps = False
        self._steps_per_epoch: int | None = None
        self._grams: Any = None
        self._xa: np.ndarray | None = None
        self._last_analysis: int | None = None
        self._writer: RunWriter | None = None
        self._extractor: keras.Model | None = None
        self._extractor_for: int | None = None
        self._taps: list[Tap] = []
        self._x: np.ndarray | None = None
        self._last_step: int | None = None
        self._epoch = 0
        self._owns_file = False  # this callback created the file: later fits append
        self._failed = False

    # -- Keras hooks -------------------------------------------------------- #

    def on_train_begin(self, logs=None):
        self._close(status=STATUS_STOPPED)  # a previous fit() that raised
        model = self.model
        self._prepare(model)
        if not _is_chief(model):
            return  # another worker writes the recording; this one records nothing
        step = self._step()
        self._epoch_start = None
        # With gradient accumulation a batch is not a step, and a last partial
        # execution of an epoch of unknown length cannot be sized: read the optimizer.
        self._steps_per_epoch = (self.params or {}).get("steps")
        self._read_steps = bool(getattr(model.optimizer, "gradient_accumulation_steps", None)) \
            or (getattr(model, "steps_per_execution", 1) > 1 and not self._steps_per_epoch)
        first = self._snapshot()
        mode = "append" if self._owns_file else self.mode
        if mode == "append" and os.path.exists(self.path):
            last_analysis = self._analysis_resume_point(step)
            self._writer = RunWriter.append(
                self.path, layers=self._specs(first), probes_x=self._x,
                probes_y=self.probe_labels, from_step=step,
                flush_seconds=self.flush_seconds, flush_snapshots=self.flush_snapshots)
            self._last_step = self._writer.resumed_from
            self._last_analysis = last_analysis
        else:
            self._writer = RunWriter.create(
                self.path, layers=self._specs(first), probes_x=self._x,
                probes_y=self.probe_labels, metadata=self._metadata(model),
                texts=_model_texts(model), storage_dtype=self.dtype,
                compression=self.compression, flush_seconds=self.flush_seconds,
                flush_snapshots=self.flush_snapshots, analysis_probes_x=self._xa,
                analysis_every=self.analysis_every)
            self._last_step = self._last_analysis = None
        self._owns_file = True
        self._failed = False
        _open_writers.add(self._writer)
        if self._last_step != step:
            self._record(step, first, self._analysis_grams(step))
        # Measured once per callback: a resumed or repeated fit() warns no more.
        self._meter = _CostMeter() if self.budget is not None and not self._budget_checked \
            else None
        if not self._read_steps and can_fuse(model):
            fusion = self._fusion
            if fusion is None or fusion.recorder is not self._recorder or not fusion.install():
                fusion = self._fusion = FusedProbePass(model, self._recorder, self._x)
                fusion.install()
            self._fused = fusion

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = int(epoch)
        self._derived_last = None
        if self._writer is not None and not self._failed:
            self._epoch_start = self._step()

    def on_train_batch_end(self, batch, logs=None):
        if self._writer is None or self._failed:
            return
        try:
            start = time.perf_counter()
            fused_call = self._deferred is not None
            if fused_call:
                self._take_deferred()
            step = self._batch_step(batch)
            recorded = self._last_step is None or \
                step // self.every > self._last_step // self.every
            direct = recorded and (self._fused is None or (
                self._meter is not None and self._meter.wants_plain_step()))
            scalars = self._scalars(logs, with_lr=direct) if logs else {}
            written = None
            if direct:
                arrays = self._snapshot()
                written = time.perf_counter()
                self._record(step, arrays, self._analysis_grams(step))
            elif recorded:
                # The next train call runs the probes on the weights of this
                # step, and reads the learning rate: these logs wait for it.
                self._deferred = (step, self._epoch, self._analysis_grams(step), scalars)
                self._last_step = step
                self._fused.wanted = True
                scalars = None
            if scalars:
                self._writer.add_batch_logs(step, scalars)
            if self._meter is not None:
                end = time.perf_counter()
                self._meter.add(step, start, end, (end - written) if direct else None,
                                fused_call=fused_call)
                if self._meter.done:
                    self._check_budget(self._meter)
                    self._meter, self._budget_checked = None, True
        except Exception as exc:
            self._stop_recording(exc)

    def on_epoch_end(self, epoch, logs=None):
        if self._writer is None or self._failed:
            return
        try:
            # Snapshots are on disk at every epoch end: no deferred one waits
            # for the next epoch (and for whatever runs between epochs).
            self._take_deferred(now=True)
            step = self._step()
            if self._epoch_start is not None and self._derived_last is not None \
                    and self._derived_last != step and not self._read_steps:
                # The batch index did not add up to the optimizer's count (an
                # unusual trainer): from now on, read the count at every step.
                self._read_steps = True
                warnings.warn(
                    f"layerwatch: step numbers derived from batch indices ({self._derived_last}) "
                    f"differ from optimizer.iterations ({step}) in epoch {epoch}; reading the "
                    "optimizer at every step from now on.", RuntimeWarning, stacklevel=2)
            self._writer.add_epoch_logs(epoch, step, self._scalars(logs or {}))
        except Exception as exc:
            self._stop_recording(exc)

    def on_train_end(self, logs=None):
        if self._writer is None:
            return
        if not self._failed:
            try:
                self._take_deferred(now=True)
                step = self._step()
                if step != self._last_step:
                    self._record(step, self._snapshot(), self._analysis_grams(step, final=True))
                elif self._grams is not None and self._last_analysis != step:
                    # Grams for the final step
                    self._record(step, None, self._analysis_grams(step, final=True))
            except Exception as exc:
                self._stop_recording(exc)
        self._close(status=STATUS_STOPPED if self._failed else STATUS_COMPLETE)

    # -- internals ---------------------------------------------------------- #

    def _prepare(self, model: keras.Model) -> None:
        """Validate the probes against the model and build the probe function once."""
        if self._extractor_for == id(model):
            return
        shape, dtype = input_spec(model)
        received = self.probes.shape[1:]
        if len(shape) != len(received) or any(
                want is not None and want != got for want, got in zip(shape, received)):
            expected = ("probes",) + tuple("any" if s is None else s for s in shape)
            hint = "Pass a batch of inputs shaped like one training batch."
            if len(self.probes.shape) == len(shape) and all(
                    want is None or want == got for want, got in zip(shape, self.probes.shape)):
                hint = "That looks like one input without the batch axis: use probes[None]."
            raise ValueError(
                f"probes do not fit model '{model.name}'. Expected shape {expected}; "
                f"received: probes.shape={self.probes.shape}. {hint}")
        self._x = np.asarray(self.probes, dtype=dtype)
        self._extractor, self._taps = build_extractor(model, self.layers)
        self._predict = probe_function(model, self._extractor)
        if self.analysis_probes is not None:
            self._xa = np.asarray(self.analysis_probes, dtype=dtype)
            self._grams = probe_function(model, build_gram_extractor(self._extractor))
        axes = self._choose_channels(model)
        recorder = self._extractor
        if any(c is not None for c in self._channels):
            recorder = select_channels(recorder, self._channels, axes)
        # Stored as float16: converted where computed, not by NumPy in the writer.
        self._recorder = cast_outputs(recorder, self.dtype)
        self._predict = probe_function(model, self._recorder)
        self._extractor_for = id(model)

    def _choose_channels(self, model: keras.Model) -> list[int]:
        """Which channels to keep per layer (``max_channels``); returns the channel axes."""
        axes = [_channel_axis(tap.layer, len(out.shape)) for tap, out in
                zip(self._taps, self._extractor.outputs)]
        self._totals = [int(out.shape[axis]) for out, axis in zip(self._extractor.outputs, axes)]
        k = self.max_channels
        if k is None or all(total <= k for total in self._totals):
            self._channels = [None] * len(self._taps)
            return axes
        stored = self._stored_channels()
        if self.channel_selection == "variance" and stored is None:
            full = self._outputs(self._predict(self._x))
        channels: list[np.ndarray | None] = []
        for i, (tap, total, axis) in enumerate(zip(self._taps, self._totals, axes)):
            if total <= k:
                channels.append(None)
            elif stored is not None and stored.get(tap.key) is not None:
                channels.append(np.asarray(stored[tap.key], dtype=np.int64))
            elif self.channel_selection == "variance":
                channels.append(_most_varying(full[i], axis, k))
            else:
                channels.append(np.arange(k))
        self._channels = channels
        return axes

    def _stored_channels(self) -> dict[str, Any] | None:
        """Channels kept by the recording being resumed (variance is not re-chosen)."""
        if self.channel_selection != "variance" or not os.path.exists(self.path) or \
                (self.mode != "append" and not self._owns_file):
            return None
        with open_run(self.path) as run:
            return {layer.key: getattr(layer, "channels", None) for layer in run.layers}

    def _snapshot(self) -> list[np.ndarray]:
        # Reading Callback.model syncs JAX's functional training state back into
        # the variables the probe function reads (a no-op on other backends).
        self.model  # noqa: B018
        # Keras' compiled predict step (built once, inference mode), without
        # predict()'s per-call data pipeline; see extractor.probe_function.
        return self._outputs(self._predict(self._x))

    @staticmethod
    def _outputs(outputs: Any) -> list[np.ndarray]:
        if not isinstance(outputs, (list, tuple)):
            outputs = [outputs]
        return [keras.ops.convert_to_numpy(o) for o in outputs]

    def _analysis_grams(self, step: int, *, final: bool = False) -> list[np.ndarray] | None:
        """The analysis probes' Gram matrices now, if ``step`` is an analysis step."""
        if self._grams is None or not (
                final or self._last_analysis is None
                or step // self.analysis_every > self._last_analysis // self.analysis_every):
            return None
        self._last_analysis = step
        return self._outputs(self._grams(self._xa))

    def _record(self, step: int, arrays: list[np.ndarray] | None,
                grams: list[np.ndarray] | None, *, epoch: int | None = None) -> None:
        self._writer.add_snapshot(step, self._epoch if epoch is None else epoch, arrays, grams)
        self._last_step = step

    def _take_deferred(self, *, now: bool = False) -> None:
        """Record the snapshot deferred to this train call (``now``: with a
        separate probe pass, the weights being those of its step still)."""
        if self._deferred is None:
            return
        (step, epoch, grams, scalars), self._deferred = self._deferred, None
        taken = self._fused.take() if self._fused is not None else None
        if taken is None and now:
            if self._fused is not None:
                self._fused.wanted = False
            taken = self._snapshot(), self._learning_rate()
        if taken is None:
            # No fused call ran: something replaced the model's train function.
            warnings.warn(
                f"layerwatch: the snapshot of step {step} was lost (the model's train "
                "function was replaced during fit); recording goes on with a separate "
                "probe pass.", RuntimeWarning, stacklevel=3)
            self._release_fused()
        else:
            arrays, rate = taken
            if rate is not None and scalars and "learning_rate" not in scalars:
                scalars["learning_rate"] = rate
            self._record(step, arrays, grams, epoch=epoch)
        if scalars:
            self._writer.add_batch_logs(step, scalars)

    def _release_fused(self) -> None:
        fused, self._fused = self._fused, None
        if fused is not None:
            fused.restore()

    def _analysis_resume_point(self, step: int) -> int | None:
        """The last analysis step kept when appending at ``step``; appending must
        not change whether (and on how many inputs) analysis Grams are kept."""
        with open_run(self.path) as run:
            stored, done = run.analysis_probe_count, run.analysis_steps
        wanted = 0 if self._xa is None else len(self._xa)
        if stored != wanted:
            raise ValueError(
                f"Cannot append to {self.path}: it was recorded with {stored} analysis probes, "
                f"this run has {wanted}. Pass the same analysis_probes, or record a new file.")
        done = done[done <= step]
        return int(done[-1]) if len(done) else None

    def _step(self) -> int:
        """The optimizer's step count (a variable read; on JAX, a state sync)."""
        return int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

    def _batch_step(self, batch: int) -> int:
        """The optimizer's step count after ``batch`` of this epoch.

        Reading ``optimizer.iterations`` costs most of a millisecond per step
        here, so it is read once per epoch and the step derived from Keras'
        batch index (the last batch of an execution when steps_per_execution
        > 1). With gradient accumulation, or if the derived count ever
        disagreed at an epoch end, the optimizer is read every step.
        """
        if self._read_steps or self._epoch_start is None:
            return self._step()
        done = int(batch) + 1
        if self._steps_per_epoch:  # Keras reports a partial last execution as a full one
            done = min(done, int(self._steps_per_epoch))
        self._derived_last = self._epoch_start + done
        return self._derived_last

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
        """The optimizer's current learning rate (a variable read)."""
        lr = getattr(self.model.optimizer, "learning_rate", None)
        if lr is None:
            return None
        try:
            return float(keras.ops.convert_to_numpy(lr))
        except (TypeError, ValueError):
            return None

    def _specs(self, arrays: Sequence[np.ndarray]) -> list[LayerSpec]:
        specs = []
        for tap, array in zip(self._taps, arrays):
            activation = tap.activation
            data_format = getattr(tap.layer, "data_format", None) \
                or keras.config.image_data_format()
            attrs: dict[str, Any] = {
                "layer_name": tap.layer.name, "layer_path": tap.path,
                "layer_class": type(tap.layer).__name__, "activation": activation,
                "tensor": " -> ".join(tap.chain), "recorded_layer": tap.recorded.name,
                "recorded_class": type(tap.recorded).__name__, "data_format": data_format,
                "channel_axis": 0 if data_format == "channels_first" else array.ndim - 2,
            }
            if activation in BOUNDED_RANGES:
                attrs["value_range"] = np.array(BOUNDED_RANGES[activation], dtype=np.float64)
            if self._channels and self._channels[len(specs)] is not None:
                attrs["channels"] = np.asarray(self._channels[len(specs)], dtype=np.int64)
                attrs["channels_total"] = self._totals[len(specs)]
            specs.append(LayerSpec(key=tap.key, shape=tuple(array.shape[1:]), attrs=attrs))
        return specs

    def _metadata(self, model: keras.Model) -> dict[str, Any]:
        return {
            "layerwatch_version": __version__, "keras_version": keras.__version__,
            "backend": keras.backend.backend(), "model_name": model.name,
            "created": utc_now(), "image_data_format": keras.config.image_data_format(),
            "every": self.every, "num_probes": len(self._x),
        }

    def _check_budget(self, meter: "_CostMeter") -> None:
        """Warn once (or, with every="auto", adapt) when recording costs too much."""
        step_time, cost, write = meter.step_time(), meter.record_cost(), meter.write_cost()
        if step_time is None or cost is None or step_time <= 0:
            return
        share = cost / (self.every * step_time)
        if share <= self.budget:
            return
        every = max(self.every + 1, math.ceil(cost / (self.budget * step_time)))
        if self.auto_every:
            self.every = every
            return
        fits = f"every={every}"
        widest = max(len(c) if c is not None else t for c, t in zip(self._channels, self._totals))
        for k in (64, 32, 16, 8):
            if k >= widest:
                continue
            kept = sum(min(len(c) if c is not None else t, k) / (len(c) if c is not None else t)
                       for c, t in zip(self._channels, self._totals)) / len(self._totals)
            # Forward pass stays; storing shrinks with the channels kept.
            cost_k = cost - write * (1 - kept)
            every_k = max(1, math.ceil(cost_k / (self.budget * step_time)))
            fits += f", or max_channels={k}" + (f" with every={every_k}" if every_k > 1 else "")
            break
        warnings.warn(
            f"layerwatch: recording costs {share:.0%} of training time ({cost * 1e3:.1f} ms per "
            f"recorded step, {step_time * 1e3:.1f} ms per training step, measured over steps "
            f"{meter.first_step}-{meter.last_step}), above budget={self.budget}. {fits} would "
            "bring it under budget (layers= narrows it further; every='auto' picks every; "
            "budget=None silences this).", RuntimeWarning, stacklevel=2)

    def _stop_recording(self, exc: BaseException) -> None:
        self._failed = True
        warnings.warn(
            f"layerwatch stopped recording to {self.path} at step {self._last_step}: "
            f"{type(exc).__name__}: {exc}. Training goes on; the file keeps what was "
            "written before.", RuntimeWarning, stacklevel=2)
        self._close(status=STATUS_STOPPED)

    def _close(self, *, status: int) -> None:
        self._release_fused()
        self._deferred = None
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


def _channel_axis(layer: keras.layers.Layer, ndim: int) -> int:
    """The channel axis of a batched output of ``layer``."""
    data_format = getattr(layer, "data_format", None) or keras.config.image_data_format()
    return 1 if data_format == "channels_first" else ndim - 1


def _most_varying(array: np.ndarray, axis: int, k: int) -> np.ndarray:
    """The k channels whose values differ most between probes, in channel order."""
    spread = np.var(array.astype(np.float64), axis=0)  # over probes, per position
    channel = axis - 1
    spread = np.moveaxis(spread, channel, 0).reshape(spread.shape[channel], -1).mean(axis=1)
    return np.sort(np.argsort(-spread, kind="stable")[:k])


class _CostMeter:
    """Times recording against training over the first batches of a fit.

    A snapshot taken by a separate probe pass costs the callback's own time;
    one fused into the train step (see :mod:`layerwatch.fused`) costs what
    that train call takes beyond a plain one, plus the callback's time to
    hand it over. With fused snapshots at every step, the meter asks for
    every other one to be taken separately, so plain train calls get timed.
    """

    warmup = 2     # batch ends skipped: tracing and compilation
    batches = 8    # batch ends measured after that

    def __init__(self) -> None:
        self._seen = 0
        self._last_end: float | None = None
        self._last_step: int | None = None
        self._train: list[float] = []       # seconds per plain optimizer step
        self._fused: list[float] = []       # seconds per fused optimizer step
        self._handover: list[float] = []    # callback seconds after a fused step
        self._record: list[float] = []      # callback seconds per separate snapshot
        self._write: list[float] = []       # of which handing it to the writer
        self.first_step: int | None = None
        self.last_step: int | None = None

    def add(self, step: int, start: float, end: float, write: float | None, *,
            fused_call: bool = False) -> None:
        self._seen += 1
        if self._seen > self.warmup and self._last_end is not None and step > self._last_step:
            seconds = (start - self._last_end) / (step - self._last_step)
            if fused_call:
                self._fused.append(seconds)
                self._handover.append(end - start)
            else:
                self._train.append(seconds)
            if write is not None:
                self._record.append(end - start)
                self._write.append(write)
            self.first_step = step if self.first_step is None else self.first_step
            self.last_step = step
        self._last_end, self._last_step = end, step

    def wants_plain_step(self) -> bool:
        """Whether the next snapshot should be taken separately (a plain step follows)."""
        return len(self._train) < len(self._fused)

    @property
    def done(self) -> bool:
        return len(self._train) + len(self._fused) >= self.batches

    def step_time(self) -> float | None:
        return float(np.median(self._train)) if self._train else None

    def record_cost(self) -> float | None:
        if self._fused and self._train:
            return max(0.0, float(np.median(self._fused) - np.median(self._train))) \
                + float(np.median(self._handover))
        return float(np.median(self._record)) if self._record else None

    def write_cost(self) -> float:
        return float(np.median(self._write)) if self._write else 0.0


def _is_chief(model: keras.Model) -> bool:
    """Whether this process writes the recording (backend-specific).

    Multi-worker training runs the callback in every worker; one writes.
    TensorFlow: the strategy's chief (``should_checkpoint``, as checkpoints
    do). JAX: process 0. PyTorch: rank 0 of an initialized process group.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        strategy = getattr(model, "distribute_strategy", None)
        return bool(getattr(getattr(strategy, "extended", None), "should_checkpoint", True))
    if backend == "jax":
        import jax

        return jax.process_index() == 0
    if backend == "torch":
        import torch.distributed as dist

        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    return True


def _env_is_chief() -> bool:
    """Before fit: whether TF_CONFIG (TensorFlow's multi-worker setup) names this the chief."""
    try:
        config = json.loads(os.environ.get("TF_CONFIG") or "{}")
        task = config.get("task") or {}
        kind, index = task.get("type"), int(task.get("index", 0))
        has_chief = bool((config.get("cluster") or {}).get("chief"))
    except (ValueError, TypeError, AttributeError):
        return True
    if kind in (None, "chief"):
        return True
    return kind == "worker" and index == 0 and not has_chief


def _check_path(path: Any, mode: str) -> str:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}. Received: mode={mode!r}")
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


def _model_texts(model: keras.Model) -> dict[str, str]:
    texts = {}
    try:
        texts["model_config"] = json.dumps(model.get_config(), default=str)
    except Exception as exc:  # custom layers without get_config
        texts["model_config"] = json.dumps({"error": f"{type(exc).__name__}: {exc}"})
    lines: list[str] = []
    try:
        model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line),
                      line_length=100)
    except Exception:
        pass
    texts["summary"] = "\n".join(lines)
    return texts

