"""The probe pass: the model's recorded tensors for the fixed probes, built once per model.

:class:`ProbePass` checks the probes against the model's inputs, builds the
extractor (:mod:`~layerwatch.record.extractor`), keeps the chosen channels
(:mod:`~layerwatch.record.channels`), casts to each layer's storage dtype
inside the compiled function, and runs it: ``snapshot()`` is one compiled,
inference-mode call, never ``model.predict()``.
"""

from __future__ import annotations

from typing import Any, Callable

import keras
import numpy as np

from .channels import channel_axis, choose_channels
from .gradcam import (build_gradient_model, check_gradcam, gradcam_axes, gradcam_taps,
                      gradient_function)
from .occlusion import Occlusion
from .extractor import (BOUNDED_RANGES, LayerSelector, Tap, arrange_probes, build_extractor,
                        build_gram_extractor, captures, cast_outputs, input_names, input_spec,
                        inputs_of, probe_function, select_channels, storage_dtypes)


class ProbePass:
    """Everything the callback runs on the probes of one model.

    Attributes
    ----------
    inputs : list of numpy arrays
        The probes, one array per model input, in the input's dtype.
    names : list of str
        The model's input names, in the same order.
    feed : array or list of arrays
        What the probe function takes: ``inputs[0]`` for a one-input model.
    analysis_feed : array, list of arrays, or None
        The analysis probes, likewise.
    taps : list of Tap
        What each output records.
    channels, totals : lists
        Per tap, the kept channel indices (None: all) and the layer's channel count.
    dtypes : list of str
        Per tap, the dtype it is stored as
        (:func:`~layerwatch.record.extractor.storage_dtypes`).
    recorder : keras.Model
        From the probe inputs to the recorded tensors, channels cut and cast:
        what the fused train step (:mod:`~layerwatch.record.fused`) runs.
    """

    def __init__(self, model: keras.Model, probes: Any, *, layers: LayerSelector,
                 dtype: str, max_channels: int | None, channel_selection: str,
                 analysis_probes: Any = None,
                 stored_channels: Callable[[list[Tap]], dict[int, Any] | None] | None = None,
                 saliency: bool = False, labels: np.ndarray | None = None,
                 gradcam: bool = False, occlusion: dict[str, Any] | None = None):
        self.model = model
        arrays = arrange_probes(model, probes)
        specs = input_spec(model, arrays)
        _check_fit(model, arrays, specs)
        self.inputs = [np.asarray(a, dtype=d) for a, (_, d) in zip(arrays, specs)]
        self.names = input_names(model, len(self.inputs))
        self.feed = _feed(self.inputs)
        extractor, self.taps, output = build_extractor(model, layers, specs)
        #: Every tap's full tensor, uncut and uncast (what feature ascent differentiates).
        self.extractor = extractor
        self._grams: Callable[[Any], Any] | None = None
        self.analysis_feed = None
        if analysis_probes is not None:
            extra = arrange_probes(model, analysis_probes)
            _check_fit(model, extra, specs, name="analysis_probes")
            self.analysis_feed = _feed([np.asarray(a, dtype=d) for a, (_, d) in zip(extra, specs)])
            self._grams = probe_function(model, build_gram_extractor(extractor))
        #: Per tap, the channel axis of its batched output.
        self.axes = axes = [channel_axis(tap.layer, len(out.shape))
                            for tap, out in zip(self.taps, extractor.outputs)]
        self.totals = [int(out.shape[axis]) for out, axis in zip(extractor.outputs, axes)]
        full = probe_function(model, extractor)
        self.channels = choose_channels(
            self.totals, axes, max_channels, channel_selection,
            stored=stored_channels(self.taps) if stored_channels is not None else None,
            outputs=lambda: _numpy(full(self.feed)))
        recorder = extractor
        if any(c is not None for c in self.channels):
            recorder = select_channels(recorder, self.channels, axes)
        # Converted where computed, not by NumPy in the writer.
        self.dtypes = storage_dtypes(self.taps, extractor.outputs, dtype)
        self.recorder = cast_outputs(recorder, self.dtypes,
                                     bounded=[tap.activation in BOUNDED_RANGES
                                              for tap in self.taps])
        self._predict = probe_function(model, self.recorder)
        #: With ``saliency=True`` or ``gradcam=True``: the gradient graph the fused
        #: train step runs (:func:`saliency_function`, or with Grad-CAM
        #: :func:`~layerwatch.record.gradcam.gradient_function`: saliency maps, then Grad-CAMs).
        self.saliency_graph: Callable[[Any], Any] | None = None
        self._gradients: Callable[[], list] | None = None
        self._all: Callable[[], tuple] | None = None  # TensorFlow: see compiled_call
        self._with_saliency = bool(saliency)
        #: With ``gradcam=True``: layer key -> spatial (h, w), in the order of the maps.
        self.gradcam_shapes: dict[str, tuple[int, int]] = {}
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        if saliency:
            check_saliency(model, self.inputs)
        if gradcam:
            chosen = gradcam_taps(self.taps, extractor.outputs)
            check_gradcam(model, self.taps, chosen, len(self.inputs))
            cam_axes = gradcam_axes(self.taps, chosen)
            for i, axis in zip(chosen, cam_axes):
                spatial = [int(d) for k, d in enumerate(extractor.outputs[i].shape)
                           if k not in (0, axis)]
                self.gradcam_shapes[self.taps[i].key] = (spatial[0], spatial[1])
            self.saliency_graph, self._gradients = gradient_function(
                model, build_gradient_model(model, self.taps, chosen, specs[0],
                                            extractor.outputs),
                self.inputs[0], self.labels, cam_axes, saliency=saliency)
        elif saliency:
            self.saliency_graph, call = saliency_function(model, self.inputs[0], self.labels)
            self._gradients = lambda: [call()]
        #: What the fused train step runs on the probes: the recorder's outputs,
        #: then the saliency maps and Grad-CAMs (:attr:`saliency_graph`); with
        #: saliency alone on TensorFlow one forward pass gives both
        #: (:func:`joint_saliency_graph`).
        self.fused_graph = _fused_graph(self.recorder, self.saliency_graph)
        if saliency and not gradcam and keras.backend.backend() == "tensorflow":
            self.fused_graph = joint_saliency_graph(
                keras.Model(inputs_of(self.recorder), list(self.recorder.outputs) + [output],
                            name=f"{model.name}_layerwatch_saliency"), self.labels)
        #: With ``occlusion_every=``: the occlusion maps (:mod:`~layerwatch.record.occlusion`).
        self.occlusion: Occlusion | None = None
        if occlusion is not None:
            if len(self.inputs) != 1:
                raise ValueError(f"occlusion_every= needs a model with one input; model "
                                 f"'{model.name}' has {len(self.inputs)}.")
            self.occlusion = Occlusion(model, self.inputs[0], self.labels, **occlusion)

    @property
    def saliency_shape(self) -> tuple[int, ...] | None:
        """The per-probe shape of a saliency map (the input's), or None without saliency."""
        return tuple(self.inputs[0].shape[1:]) if self._with_saliency else None

    @property
    def has_gradients(self) -> bool:
        """Whether a snapshot holds saliency or Grad-CAM maps after the activations."""
        return self._gradients is not None

    @property
    def count(self) -> int:
        """How many probes there are."""
        return len(self.inputs[0])

    @property
    def analysis_count(self) -> int:
        """How many analysis probes there are (0 without any)."""
        if self.analysis_feed is None:
            return 0
        return len(self.analysis_feed[0] if isinstance(self.analysis_feed, list)
                   else self.analysis_feed)

    @property
    def kept_channels(self) -> list[int]:
        """Per tap, how many channels are recorded."""
        return [len(c) if c is not None else t for c, t in zip(self.channels, self.totals)]

    def warm(self) -> bool:
        """Start compiling :meth:`snapshot`'s function in the background, where
        that is possible (JAX, and no subclassed model whose layers a capture
        rewires while they trace: the train step traces them too); True if it
        started."""
        warm = getattr(self._predict, "warm", None)
        if warm is None or captures(self.recorder):
            return False
        warm(self.feed)
        return True

    @property
    def like(self) -> list[np.ndarray]:
        """Zeros shaped and typed as :meth:`snapshot`'s arrays (no pass runs)."""
        return [np.zeros((self.count,) + tuple(int(d) for d in out.shape[1:]), dtype=str(out.dtype))
                for out in self.recorder.outputs]

    def snapshot(self) -> list[np.ndarray]:
        """The recorded tensors of the probes now, one array per tap."""
        return _numpy(self._predict(self.feed))

    def snapshot_on(self, values: Any) -> list:
        """JAX: :meth:`snapshot` on the model's ``values`` given ((trainable,
        non-trainable, …), as the train loop's state holds them) rather than
        the current ones; the arrays stay JAX's, not yet copied out. Runs the
        function :meth:`snapshot` runs, compiled once for both."""
        outputs = self._predict.at(values, self.feed)
        return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]

    @property
    def slots(self) -> int:
        """How many steps :meth:`hold` keeps for one :meth:`release` (0: it never holds)."""
        return getattr(self._predict, "slots", 0) if self._gradients is None else 0

    def hold(self) -> bool:
        """Keep the weights as they stand for a later :meth:`release`, instead of
        taking :meth:`snapshot_all` now: where the probe pass replays several
        steps at once (PyTorch, :mod:`~layerwatch.record.torch_batch`) and a
        snapshot has no saliency or Grad-CAM maps. False where it does not hold."""
        hold = getattr(self._predict, "hold", None)
        return hold is not None and self._gradients is None and hold()

    def release(self) -> list[list[np.ndarray]]:
        """:meth:`snapshot_all` of each step :meth:`hold` kept, in order."""
        return self._predict.release()

    def snapshot_all(self) -> list[np.ndarray]:
        """:meth:`snapshot`, then :meth:`gradients`: what a fused step hands back.

        On TensorFlow one call of :meth:`compiled_call` (with saliency, one
        forward pass gives both)."""
        if keras.backend.backend() != "tensorflow":
            return self.snapshot() + self.gradients()
        arrays = _numpy(self.compiled_call())
        cut = len(self.recorder.outputs)
        return arrays[:cut] + [np.asarray(a, dtype=np.float32) for a in arrays[cut:]]

    def compiled_call(self) -> tuple:
        """TensorFlow: :attr:`fused_graph` on the probes, as one ``tf.function``.

        The same function runs on its own (:meth:`snapshot_all`: step 0, the
        epochs' ends) and inside the fused train step, where it is a call of
        the function already traced: the probes' graph is traced once, not
        again at each of TensorFlow's traces of the train step (two for a new
        train function). On the seed model that takes 30–100 ms off the first
        train call, about 200 ms with saliency. A plain ``tf.function`` reads
        this worker's copy of mirrored variables (see
        :func:`~layerwatch.record.extractor.probe_function`)."""
        if self._all is None:
            import tensorflow as tf

            graph = self.fused_graph
            constant = tf.nest.map_structure(tf.constant, self.feed)
            self._all = tf.function(lambda: tuple(graph(constant)))
        return self._all()

    def gradients(self) -> list[np.ndarray]:
        """What the backward pass gives now, float32: the saliency maps
        (d output[label] / d input, with ``saliency=True``), then one Grad-CAM map
        per :attr:`gradcam_shapes` layer (``gradcam=True``); [] without either."""
        if self._gradients is None:
            return []
        return [np.asarray(keras.ops.convert_to_numpy(g), dtype=np.float32)
                for g in self._gradients()]

    def grams(self) -> list[np.ndarray] | None:
        """The analysis probes' Gram matrices now, one per tap (None without analysis probes)."""
        return None if self._grams is None else _numpy(self._grams(self.analysis_feed))


def check_saliency(model: keras.Model, inputs: list[np.ndarray]) -> None:
    """Saliency needs one floating-point input and one output: refuse others at fit start."""
    if len(inputs) != 1:
        raise ValueError(
            f"saliency=True needs a model with one input; model '{model.name}' has "
            f"{len(inputs)}. Record without saliency.")
    if not np.issubdtype(inputs[0].dtype, np.floating):
        raise ValueError(
            f"saliency=True needs a floating-point input (the gradient with respect to it); "
            f"model '{model.name}' takes {inputs[0].dtype}.")
    outputs = model.outputs if getattr(model, "outputs", None) else None
    if outputs is not None and len(outputs) != 1:
        raise ValueError(
            f"saliency=True needs a model with one output; model '{model.name}' has "
            f"{len(outputs)}.")


def _picked(out: Any, labels: Any) -> Any:
    """Sum over probes of each probe's output at its label (the top class without labels).

    ``out`` is the model's output as it is (after a softmax: the probability);
    one unit per probe is used as it is. Built from ``keras.ops``, so it
    traces under each backend's own autodiff."""
    ops = keras.ops
    out = ops.reshape(ops.cast(out, "float32"), (ops.shape(out)[0], -1))
    if labels is None:
        labels = ops.argmax(ops.stop_gradient(out), axis=-1)
    index = ops.reshape(ops.cast(labels, "int32"), (-1, 1))
    return ops.sum(ops.take_along_axis(out, index, axis=1))


def _fused_graph(recorder: keras.Model, gradients: Callable[[Any], Any] | None
                 ) -> Callable[[Any], tuple]:
    """The recorder's outputs, then ``gradients``' (if given), built in the caller's graph."""
    def graph(constant):
        outputs = recorder(constant, training=False)
        outputs = tuple(outputs) if isinstance(outputs, (list, tuple)) else (outputs,)
        if gradients is not None:
            # The probes' gradients (a tape of their own, on the same weights).
            extra = gradients(constant)
            outputs += tuple(extra) if isinstance(extra, (list, tuple)) else (extra,)
        return outputs
    return graph


def joint_saliency_graph(joint: keras.Model, labels: np.ndarray | None
                         ) -> Callable[[Any], tuple]:
    """TensorFlow: the recorded tensors and the saliency maps from one forward pass.

    ``joint`` gives the recorder's outputs and then the model's output (the
    extractor's graph, :func:`~layerwatch.record.extractor.build_extractor`):
    the tape that watches the probes sees the activations computed on the way.
    """
    import tensorflow as tf

    y = None if labels is None else tf.constant(np.asarray(labels, dtype=np.int32))

    def graph(constant):
        constant = tf.convert_to_tensor(constant)
        with tf.GradientTape() as tape:
            tape.watch(constant)
            outputs = joint(constant, training=False)
            picked = _picked(outputs[-1], y)
        return tuple(outputs[:-1]) + (tf.cast(tape.gradient(picked, constant), tf.float32),)
    return graph


def saliency_function(model: keras.Model, x: np.ndarray, labels: np.ndarray | None
                      ) -> tuple[Callable[[Any], Any] | None, Callable[[], Any]]:
    """The saliency maps of the probes ``x``: d model(x)[label] / dx, inference mode.

    Returns ``(graph, call)``: ``call()`` computes them at the current weights —
    a ``tf.function`` with a ``GradientTape`` on TensorFlow, ``jax.jit(jax.grad)``
    over ``model.stateless_call`` on JAX (the current variable values passed in),
    ``torch.autograd.grad`` on torch (eager). ``graph(constant)`` (TensorFlow
    only, else None) builds the same ops inside another TensorFlow graph: the
    fused train step (:mod:`~layerwatch.record.fused`).
    """
    backend = keras.backend.backend()
    labels_ = None if labels is None else np.asarray(labels, dtype=np.int32)
    if backend == "tensorflow":
        import tensorflow as tf

        y = None if labels_ is None else tf.constant(labels_)

        def graph(constant):
            constant = tf.convert_to_tensor(constant)
            with tf.GradientTape() as tape:
                tape.watch(constant)
                out = model(constant, training=False)
                if isinstance(out, (list, tuple)):
                    out = out[0]
                picked = _picked(out, y)
            return tf.cast(tape.gradient(picked, constant), tf.float32)

        compiled = tf.function(graph, reduce_retracing=True)
        feed = tf.constant(x)
        return graph, lambda: compiled(feed)
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        y = None if labels_ is None else jnp.asarray(labels_)

        def picked(inputs, trainable, non_trainable):
            out, _ = model.stateless_call(trainable, non_trainable, inputs, training=False)
            if isinstance(out, (list, tuple)):
                out = out[0]
            return _picked(out, y)

        from .jax_state import JaxState

        grad = jax.jit(jax.grad(picked))
        feed, state = jnp.asarray(x), JaxState(model)

        def call():
            trainable, non_trainable, _ = state.values()  # the train loop's, unsynced
            return grad(feed, trainable, non_trainable)
        return None, call
    if backend == "torch":
        import torch

        def call():
            device = next((v.value.device for v in model.variables), "cpu")
            inputs = torch.tensor(x, device=device, requires_grad=True)
            y = None if labels_ is None else torch.tensor(labels_, device=device)
            with torch.enable_grad():
                out = model(inputs, training=False)
                if isinstance(out, (list, tuple)):
                    out = out[0]
                picked = _picked(out, y)
                (grad,) = torch.autograd.grad(picked, inputs)
            return grad.detach().float().cpu().numpy()
        return None, call
    raise ValueError(f"saliency=True is not supported on the {backend!r} backend.")


def _feed(arrays: list[np.ndarray]) -> Any:
    return arrays[0] if len(arrays) == 1 else arrays


def _numpy(outputs: Any) -> list[np.ndarray]:
    if not isinstance(outputs, (list, tuple)):
        outputs = [outputs]
    return [o if isinstance(o, np.ndarray) else keras.ops.convert_to_numpy(o) for o in outputs]


def _check_fit(model: keras.Model, arrays: list[np.ndarray], specs: list, *,
               name: str = "probes") -> None:
    counts = {len(a) for a in arrays}
    if len(counts) != 1:
        raise ValueError(f"{name} must hold the same number of probes for every input of "
                         f"model '{model.name}'. Received: {[len(a) for a in arrays]}")
    for i, (array, (shape, _)) in enumerate(zip(arrays, specs)):
        label = name if len(arrays) == 1 else f"{name}[{i}]"
        received = array.shape[1:]
        if len(shape) == len(received) and all(
                want is None or want == got for want, got in zip(shape, received)):
            continue
        expected = ("probes",) + tuple("any" if s is None else s for s in shape)
        hint = "Pass a batch of inputs shaped like one training batch."
        if len(array.shape) == len(shape) and all(
                want is None or want == got for want, got in zip(shape, array.shape)):
            hint = f"That looks like one input without the batch axis: use {label}[None]."
        raise ValueError(
            f"{label} do not fit model '{model.name}'. Expected shape {expected}; "
            f"received: {label}.shape={array.shape}. {hint}")
