"""The probe pass: the model's recorded tensors for the fixed probes, built once per model.

:class:`ProbePass` checks the probes against the model, builds the extractor
(:mod:`~layerwatch.record.extractor`), keeps the chosen channels
(:mod:`~layerwatch.record.channels`), casts to the storage dtype inside the
compiled function, and runs it: ``snapshot()`` is one compiled, inference-mode
call, never ``model.predict()``.
"""

from __future__ import annotations

from typing import Any, Callable

import keras
import numpy as np

from .channels import channel_axis, choose_channels
from .extractor import (LayerSelector, Tap, build_extractor, build_gram_extractor, cast_outputs,
                        input_spec, probe_function, select_channels)


class ProbePass:
    """Everything the callback runs on the probes of one model.

    Attributes
    ----------
    x, xa : numpy arrays
        The probes (and analysis probes, or None) in the model's input dtype.
    taps : list of Tap
        What each output records.
    channels, totals : lists
        Per tap, the kept channel indices (None: all) and the layer's channel count.
    recorder : keras.Model
        From the probe input to the recorded tensors, channels cut and cast:
        what the fused train step (:mod:`~layerwatch.record.fused`) runs.
    """

    def __init__(self, model: keras.Model, probes: np.ndarray, *, layers: LayerSelector,
                 dtype: str, max_channels: int | None, channel_selection: str,
                 analysis_probes: np.ndarray | None = None,
                 stored_channels: Callable[[list[Tap]], dict[int, Any] | None] | None = None):
        self.model = model
        shape, input_dtype = input_spec(model)
        _check_fit(model, probes, shape)
        self.x = np.asarray(probes, dtype=input_dtype)
        extractor, self.taps = build_extractor(model, layers)
        self._grams: Callable[[Any], Any] | None = None
        self.xa = None
        if analysis_probes is not None:
            self.xa = np.asarray(analysis_probes, dtype=input_dtype)
            self._grams = probe_function(model, build_gram_extractor(extractor))
        axes = [channel_axis(tap.layer, len(out.shape))
                for tap, out in zip(self.taps, extractor.outputs)]
        self.totals = [int(out.shape[axis]) for out, axis in zip(extractor.outputs, axes)]
        full = probe_function(model, extractor)
        self.channels = choose_channels(
            self.totals, axes, max_channels, channel_selection,
            stored=stored_channels(self.taps) if stored_channels is not None else None,
            outputs=lambda: _numpy(full(self.x)))
        recorder = extractor
        if any(c is not None for c in self.channels):
            recorder = select_channels(recorder, self.channels, axes)
        # Stored as float16: converted where computed, not by NumPy in the writer.
        self.recorder = cast_outputs(recorder, dtype)
        self._predict = probe_function(model, self.recorder)

    @property
    def kept_channels(self) -> list[int]:
        """Per tap, how many channels are recorded."""
        return [len(c) if c is not None else t for c, t in zip(self.channels, self.totals)]

    def snapshot(self) -> list[np.ndarray]:
        """The recorded tensors of the probes now, one array per tap."""
        return _numpy(self._predict(self.x))

    def grams(self) -> list[np.ndarray] | None:
        """The analysis probes' Gram matrices now, one per tap (None without analysis probes)."""
        return None if self._grams is None else _numpy(self._grams(self.xa))


def _numpy(outputs: Any) -> list[np.ndarray]:
    if not isinstance(outputs, (list, tuple)):
        outputs = [outputs]
    return [keras.ops.convert_to_numpy(o) for o in outputs]


def _check_fit(model: keras.Model, probes: np.ndarray, shape: tuple) -> None:
    received = probes.shape[1:]
    if len(shape) == len(received) and all(
            want is None or want == got for want, got in zip(shape, received)):
        return
    expected = ("probes",) + tuple("any" if s is None else s for s in shape)
    hint = "Pass a batch of inputs shaped like one training batch."
    if len(probes.shape) == len(shape) and all(
            want is None or want == got for want, got in zip(shape, probes.shape)):
        hint = "That looks like one input without the batch axis: use probes[None]."
    raise ValueError(
        f"probes do not fit model '{model.name}'. Expected shape {expected}; "
        f"received: probes.shape={probes.shape}. {hint}")
