"""The Keras side: the ``LayerWatch`` callback."""

from __future__ import annotations

import atexit
import json
import os
import warnings
import weakref
from typing import Any, Sequence

import keras
import numpy as np

from . import __version__
from .extractor import BOUNDED_RANGES, LayerSelector, Tap, build_extractor, input_spec
from .probes import check_labels, check_probes
from .store import STATUS_COMPLETE, STATUS_STOPPED, LayerSpec, RunWriter, utc_now

_MODES = ("new", "append", "overwrite")
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
    every : int, default 1
        Record after every ``every``-th optimizer step (step 0 and the final
        step are always recorded).
    mode : {"new", "append", "overwrite"}, default "new"
        ``"new"`` refuses to touch an existing file; ``"append"`` continues it
        (resumed training: same layers and probes); ``"overwrite"`` replaces it.
    dtype : {"float16", "float32"}, default "float16"
        Storage precision of the activations.
    flush_seconds : float, default 2.0
        Longest time between writes to disk; a crash loses at most this much
        (and at most ``flush_snapshots`` snapshots).
    flush_snapshots : int, default 32
    compression : {"gzip", "lzf", None}, default "gzip"

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
                 layers: LayerSelector = None, every: int = 1, mode: str = "new",
                 dtype: str = "float16", flush_seconds: float = 2.0,
                 flush_snapshots: int = 32, compression: str | None = "gzip"):
        super().__init__()
        self.path = _check_path(path, mode)
        self.probes = check_probes(probes)
        self.probe_labels = check_labels(probe_labels, len(self.probes))
        if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
            raise ValueError(f"every must be an integer >= 1. Received: every={every!r}")
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
        step = self._step()
        first = self._snapshot()
        mode = "append" if self._owns_file else self.mode
        if mode == "append" and os.path.exists(self.path):
            self._writer = RunWriter.append(
                self.path, layers=self._specs(first), probes_x=self._x,
                probes_y=self.probe_labels, from_step=step,
                flush_seconds=self.flush_seconds, flush_snapshots=self.flush_snapshots)
            self._last_step = self._writer.resumed_from
        else:
            self._writer = RunWriter.create(
                self.path, layers=self._specs(first), probes_x=self._x,
                probes_y=self.probe_labels, metadata=self._metadata(model),
                texts=_model_texts(model), storage_dtype=self.dtype,
                compression=self.compression, flush_seconds=self.flush_seconds,
                flush_snapshots=self.flush_snapshots)
            self._last_step = None
        self._owns_file = True
        self._failed = False
        _open_writers.add(self._writer)
        if self._last_step != step:
            self._record(step, first)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = int(epoch)

    def on_train_batch_end(self, batch, logs=None):
        if self._writer is None or self._failed:
            return
        try:
            step = self._step()
            if logs:
                self._writer.add_batch_logs(step, self._scalars(logs, with_lr=True))
            if self._last_step is None or step // self.every > self._last_step // self.every:
                self._record(step, self._snapshot())
        except Exception as exc:
            self._stop_recording(exc)

    def on_epoch_end(self, epoch, logs=None):
        if self._writer is None or self._failed:
            return
        try:
            self._writer.add_epoch_logs(epoch, self._step(), self._scalars(logs or {}))
        except Exception as exc:
            self._stop_recording(exc)

    def on_train_end(self, logs=None):
        if self._writer is None:
            return
        if not self._failed:
            try:
                step = self._step()
                if step != self._last_step:
                    self._record(step, self._snapshot())
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
        self._extractor_for = id(model)

    def _snapshot(self) -> list[np.ndarray]:
        # predict_on_batch runs Keras' compiled predict step (built once,
        # inference mode), without predict()'s per-call data pipeline.
        outputs = self._extractor.predict_on_batch(self._x)
        if not isinstance(outputs, (list, tuple)):
            outputs = [outputs]
        return [keras.ops.convert_to_numpy(o) for o in outputs]

    def _record(self, step: int, arrays: list[np.ndarray]) -> None:
        self._writer.add_snapshot(step, self._epoch, arrays)
        self._last_step = step

    def _step(self) -> int:
        return int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

    def _scalars(self, logs: dict, *, with_lr: bool = False) -> dict[str, float]:
        out = {}
        for name, value in logs.items():
            try:
                out[str(name)] = float(np.asarray(keras.ops.convert_to_numpy(value)))
            except (TypeError, ValueError):
                continue  # non-scalar logs are not curves
        if with_lr and "learning_rate" not in out:
            lr = getattr(self.model.optimizer, "learning_rate", None)
            if lr is not None:
                try:
                    out["learning_rate"] = float(keras.ops.convert_to_numpy(lr))
                except (TypeError, ValueError):
                    pass
        return out

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
            specs.append(LayerSpec(key=tap.key, shape=tuple(array.shape[1:]), attrs=attrs))
        return specs

    def _metadata(self, model: keras.Model) -> dict[str, Any]:
        return {
            "layerwatch_version": __version__, "keras_version": keras.__version__,
            "backend": keras.backend.backend(), "model_name": model.name,
            "created": utc_now(), "image_data_format": keras.config.image_data_format(),
            "every": self.every, "num_probes": len(self._x),
        }

    def _stop_recording(self, exc: BaseException) -> None:
        self._failed = True
        warnings.warn(
            f"layerwatch stopped recording to {self.path} at step {self._last_step}: "
            f"{type(exc).__name__}: {exc}. Training goes on; the file keeps what was "
            "written before.", RuntimeWarning, stacklevel=2)
        self._close(status=STATUS_STOPPED)

    def _close(self, *, status: int) -> None:
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

