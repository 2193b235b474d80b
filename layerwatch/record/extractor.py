"""Finding the layers to record and building one function that computes them.

The model's graph (including nested Functional/Sequential sub-models) is
re-traced on a fresh symbolic input, calling the model's own layers — so the
weights are shared, and the taps of nested layers live in one flat graph. The
result is a Keras model from the probe input to every recorded tensor; it runs
in inference mode through Keras' compiled predict step.
"""

from __future__ import annotations

from dataclasses import dataclass
import warnings
from typing import Any, Callable, Sequence, Union

import keras
import numpy as np

CONV_TYPES = tuple(
    cls for cls in (
        getattr(keras.layers, name, None) for name in (
            "Conv1D", "Conv2D", "Conv3D", "SeparableConv1D", "SeparableConv2D",
            "DepthwiseConv1D", "DepthwiseConv2D", "Conv1DTranspose", "Conv2DTranspose",
            "Conv3DTranspose")
    ) if cls is not None
)
NONLINEARITY_TYPES = tuple(
    cls for cls in (
        getattr(keras.layers, name, None) for name in (
            "Activation", "ReLU", "LeakyReLU", "ELU", "PReLU", "Softmax")
    ) if cls is not None
)
#: Layers allowed between a linear conv and its standalone nonlinearity.
_PASS_THROUGH_TYPES = (keras.layers.BatchNormalization,)

#: Natural output ranges of bounded activations (renderers use them as-is).
BOUNDED_RANGES = {
    "tanh": (-1.0, 1.0), "softsign": (-1.0, 1.0), "hard_tanh": (-1.0, 1.0),
    "sigmoid": (0.0, 1.0), "hard_sigmoid": (0.0, 1.0), "softmax": (0.0, 1.0),
    "relu6": (0.0, 6.0),
}

LayerSelector = Union[None, Sequence[str], Callable[[keras.layers.Layer], bool]]


@dataclass
class Tap:
    """One recorded tensor: a selected layer and where its output was taken."""

    key: str                       # unique name in the recording
    layer: keras.layers.Layer      # the selected (conv) layer
    recorded: keras.layers.Layer   # the layer whose output is recorded
    chain: list[str]               # names from the selected layer to the recorded one
    path: str                      # nested-model path, e.g. "encoder/conv1"
    input_index: int = 0           # the model input the recorded tensor is computed from
    call: int | None = None        # which layer call of the trace it is (graph models)

    @property
    def activation(self) -> str:
        return activation_name(self.recorded)


def activation_name(layer: keras.layers.Layer) -> str:
    """The name of the nonlinearity a layer applies ("linear" if none)."""
    if isinstance(layer, keras.layers.Activation) or hasattr(layer, "activation"):
        fn = getattr(layer, "activation", None)
        if fn is None:
            return "linear"
        name = getattr(fn, "__name__", None) or type(fn).__name__
        return str(name)
    return type(layer).__name__.lower()  # ReLU, LeakyReLU, ELU, PReLU, Softmax


def is_graph_model(model: keras.Model) -> bool:
    """Whether ``model`` is Sequential or Functional: a graph whose layers can be tapped.
    Other (subclassed) models are recorded by capturing layer outputs as they run."""
    return isinstance(model, keras.Sequential) or bool(
        hasattr(model, "_run_through_graph") and getattr(model, "_nodes_by_depth", None))


def _walk(model: keras.Model, prefix: str = ""):
    """(path, layer) for every layer, entering nested models (every tracked
    sublayer, at any depth, of a subclassed model)."""
    if not is_graph_model(model) and hasattr(model, "_flatten_layers"):
        for layer in model._flatten_layers(include_self=False, recursive=True):
            if not isinstance(layer, (keras.Model, keras.layers.InputLayer)):
                yield f"{prefix}{layer.name}", layer
        return
    for layer in model.layers:
        path = f"{prefix}{layer.name}"
        if isinstance(layer, keras.Model):
            yield from _walk(layer, path + "/")
        elif not isinstance(layer, keras.layers.InputLayer):
            yield path, layer


def _trace(model: keras.Model, inputs: Any, on_call: Callable) -> Any:
    """Call ``model``'s layers on symbolic ``inputs``, flattening nested models.

    ``on_call(layer, inputs, outputs)`` sees every layer call; what it returns,
    if not None, is used in place of the layer's output (the Grad-CAM model
    adds a zero input there: :mod:`~layerwatch.record.gradcam`). Functional
    models are replayed node by node through Keras' own graph runner
    (``Functional._run_through_graph``, a private API stable across Keras 3);
    Sequential models are a plain chain of their layers.
    """
    def call(layer):
        if isinstance(layer, keras.Model):
            return lambda x, *args, **kwargs: _trace(layer, x, on_call)

        def run(*args, **kwargs):
            out = layer(*args, **kwargs)
            replaced = on_call(layer, args, out)
            return out if replaced is None else replaced
        return run

    if isinstance(model, keras.Sequential):
        x = inputs
        for layer in model.layers:
            x = call(layer)(x)
        return x
    if is_graph_model(model):
        # Keras' runner returns a flat structure; the model's own output
        # structure is rebuilt by the caller through the outputs it keeps.
        outputs = model._run_through_graph(inputs, operation_fn=call)
        return outputs
    # A subclassed model nested in a graph: its own layers are captured as it runs.
    return _Capture.run(model, inputs, on_call)


def select_layers(model: keras.Model, layers: LayerSelector
                  ) -> list[tuple[str, keras.layers.Layer]]:
    """The (path, layer) pairs to record, in model order.

    Raises
    ------
    ValueError
        No layer matches, or a named layer does not exist (the message lists
        what does).
    """
    found = list(_walk(model))
    if layers is None:
        chosen = [(p, layer) for p, layer in found if isinstance(layer, CONV_TYPES)]
        if not chosen:
            seen = sorted({type(layer).__name__ for _, layer in found})
            raise ValueError(
                f"LayerWatch found no convolutional layer in model '{model.name}'. "
                f"Layer types seen: {', '.join(seen) or 'none'}. Pass layers=[names] or "
                "layers=<predicate> to choose layers to record.")
        return chosen
    if callable(layers):
        chosen = [(p, layer) for p, layer in found if layers(layer)]
        if not chosen:
            raise ValueError(
                f"The layers= predicate matched no layer of model '{model.name}'. Layers: "
                f"{', '.join(p for p, _ in found)}.")
        return chosen
    if isinstance(layers, str):
        layers = [layers]
    by_name: dict[str, tuple[str, keras.layers.Layer]] = {}
    for p, layer in found:
        by_name.setdefault(p, (p, layer))
        by_name.setdefault(layer.name, (p, layer))
    missing = [name for name in layers if name not in by_name]
    if missing:
        raise ValueError(
            f"layers= names {missing} are not in model '{model.name}'. Available layers: "
            f"{', '.join(p for p, _ in found)}.")
    return [by_name[name] for name in layers]


def model_inputs(model: keras.Model) -> list | None:
    """The model's symbolic inputs, flat and in order, or None (a subclassed model)."""
    try:
        inputs = getattr(model, "inputs", None)
    except (AttributeError, ValueError):
        inputs = None
    return list(inputs) if inputs else None


def arrange_probes(model: keras.Model, probes: Any) -> list[np.ndarray]:
    """Probes as one array per model input, in the model's input order.

    ``probes`` is an array (a one-input model), a list or tuple of arrays
    (one per input, in order), or a dict keyed by input name.
    """
    inputs = model_inputs(model)
    if isinstance(probes, dict):
        if inputs is None:
            raise ValueError(
                f"probes given by input name need a model with named inputs; '{model.name}' "
                "is subclassed and has none. Pass a list of arrays in the order its call "
                "takes them.")
        names = [_input_name(t) for t in inputs]
        missing = [n for n in names if n not in probes]
        extra = [k for k in probes if k not in names]
        if missing or extra:
            raise ValueError(
                f"probes do not name the inputs of model '{model.name}'. Expected keys "
                f"{names}; received: {sorted(probes)}.")
        return [probes[n] for n in names]
    arrays = list(probes) if isinstance(probes, (list, tuple)) else [probes]
    if inputs is not None and len(inputs) > 1 and len(arrays) == 1 \
            and np.ndim(arrays[0]) >= 3 and len(arrays[0]) == len(inputs):
        arrays = list(arrays[0])  # a list of equally shaped arrays, stacked on the way in
    if inputs is not None and len(arrays) != len(inputs):
        raise ValueError(
            f"probes do not fit model '{model.name}': it takes {len(inputs)} input(s) "
            f"{[_input_name(t) for t in inputs]}, received {len(arrays)} probe array(s). "
            "Pass one array per input, as a list in input order or a dict by input name.")
    return arrays


def input_names(model: keras.Model, count: int) -> list[str]:
    """Names of the model's inputs (``input_0``, … for a subclassed model)."""
    inputs = model_inputs(model)
    if inputs is None or len(inputs) != count:
        return [f"input_{i}" for i in range(count)]
    return [_input_name(t) for t in inputs]


def _input_name(tensor) -> str:
    """An input's name, usable as an HDF5 dataset name (no "/")."""
    return str(getattr(tensor, "name", "") or "input").split(":")[0].replace("/", "_")


def input_spec(model: keras.Model, probes: Sequence[np.ndarray]
               ) -> list[tuple[tuple[Any, ...], str]]:
    """Per input, (per-example shape with None for free dims, dtype): the model's
    own inputs, or for a subclassed model the probes' shapes as float32."""
    inputs = model_inputs(model)
    if inputs is None:
        if not getattr(model, "built", False):
            raise ValueError(
                f"LayerWatch needs a built model; model '{model.name}' has not been built. "
                "Call it on a batch (or model.build(input_shape)) before fit.")
        return [(tuple(p.shape[1:]), "float32" if p.dtype.kind == "f" else str(p.dtype))
                for p in probes]
    return [(tuple(x.shape[1:]), str(x.dtype)) for x in inputs]


def build_extractor(model: keras.Model, layers: LayerSelector,
                    specs: Sequence[tuple[tuple[Any, ...], str]]
                    ) -> tuple[keras.Model, list[Tap], Any]:
    """A model from the probe inputs to each recorded tensor, what it taps, and
    the model's (first) output in the same symbolic graph: a model from the
    extractor's inputs to its outputs and that one computes both in one forward
    pass (what saliency differentiates: :mod:`~layerwatch.record.probe_pass`).

    ``specs`` are the inputs' (shape, dtype) (:func:`input_spec`). For a conv
    layer with a linear activation whose output feeds only a standalone
    nonlinearity (directly or through BatchNormalization), the nonlinearity's
    output is recorded instead; ``Tap.chain`` says so. Layers of a subclassed
    model are captured as its ``call`` runs (their own outputs). A selected
    layer that never runs on the probes is left out, with one warning naming it.
    """
    selected = select_layers(model, layers)
    xs = [keras.Input(shape=shape, dtype=dtype) for shape, dtype in specs]
    feed = xs[0] if len(xs) == 1 else xs

    calls: list[tuple[keras.layers.Layer, list[int], Any]] = []
    origin: dict[int, frozenset] = {id(x): frozenset([i]) for i, x in enumerate(xs)}

    def on_call(layer, args, out):
        ids = [id(t) for t in keras.tree.flatten(args)]
        came_from = frozenset().union(*(origin.get(i, frozenset()) for i in ids))
        for tensor in keras.tree.flatten(out):
            origin[id(tensor)] = came_from
        calls.append((layer, ids, out))

    if is_graph_model(model):
        final = _trace(model, feed, on_call)
    else:
        final = _Capture.run(model, feed, on_call, wanted={id(layer) for _, layer in selected})
    while isinstance(final, (list, tuple)):  # several outputs: the first
        final = final[0]

    consumers: dict[int, list[int]] = {}
    for index, (_, ids, _) in enumerate(calls):
        for i in ids:
            consumers.setdefault(i, []).append(index)
    first_call = {}
    for index, (layer, _, _) in enumerate(calls):
        first_call.setdefault(id(layer), index)

    taps, outputs, used_keys, skipped = [], [], set(), []
    for path, layer in selected:
        if id(layer) not in first_call:
            skipped.append(path)
            continue
        index = first_call[id(layer)]
        chain = [layer.name]
        if activation_name(layer) == "linear" and isinstance(layer, CONV_TYPES):
            index, chain = _follow_nonlinearity(calls, consumers, index, chain)
        recorded, _, out = calls[index]
        if isinstance(out, (list, tuple)):  # a layer with several outputs: its first
            out = out[0]
        key = _unique_key(path.replace("/", "."), used_keys)
        came_from = origin.get(id(out)) or frozenset([0])
        taps.append(Tap(key=key, layer=layer, recorded=recorded, chain=chain, path=path,
                        input_index=min(came_from),
                        call=index if is_graph_model(model) else None))
        outputs.append(out)
    if skipped:
        warnings.warn(
            f"layerwatch: {', '.join(skipped)} never ran on the probes (not on the path from "
            f"the model's inputs through its call), so there is no output to record; "
            f"recording the other {len(taps)} layer(s).", RuntimeWarning, stacklevel=3)
    if not taps:
        raise ValueError(
            f"None of the layers chosen in model '{model.name}' runs on the probes, so there "
            "is nothing to record. Choose layers with layers=.")
    extractor = keras.Model(feed, outputs, name=f"{model.name}_layerwatch")
    return extractor, taps, final


class _Capture(keras.layers.Layer):
    """Runs a subclassed model and hands back its output and its layers' outputs.

    While this layer's ``call`` runs, each watched layer of the model has its
    ``call`` wrapped to keep what it computed (its first call); the wrapping is
    undone before ``call`` returns, so training never runs through it. Called
    on ``keras.Input``s it gives the extractor its outputs; the compiled probe
    function (and TensorFlow's fused train step) then traces it once.
    """

    def __init__(self, model: keras.Model, layers: Sequence[keras.layers.Layer], **kwargs):
        super().__init__(name=f"{model.name}_capture", **kwargs)
        self.inner = model
        self._watched = list(layers)

    def call(self, inputs):
        found: dict[int, Any] = {}
        output = _Capture.calling(self.inner, inputs, self._watched,
                                  lambda layer, out: found.setdefault(id(layer), out))
        return [output] + [found[id(layer)] for layer in self._watched]

    @staticmethod
    def calling(model, inputs, layers, seen):
        """``model(inputs)`` in inference mode, telling ``seen(layer, output)``
        of every call of the given layers."""
        originals = []
        for layer in layers:
            original = layer.call

            def call(*args, _layer=layer, _original=original, **kwargs):
                out = _original(*args, **kwargs)
                seen(_layer, out)
                return out

            layer.call = call
            originals.append(layer)
        try:
            return model(inputs, training=False)
        finally:
            for layer in originals:
                layer.__dict__.pop("call", None)  # the class's own call again

    @classmethod
    def run(cls, model, inputs, on_call, wanted=None):
        """Call the subclassed ``model`` on symbolic ``inputs`` through a
        :class:`_Capture`, telling ``on_call(layer, args, output)`` of each
        layer that ran (``wanted``: ids of the layers to watch; default all);
        returns the model's output."""
        layers = [layer for layer in model._flatten_layers(include_self=False, recursive=True)
                  if not isinstance(layer, (keras.Model, keras.layers.InputLayer))
                  and (wanted is None or id(layer) in wanted)]
        ran: list[keras.layers.Layer] = []
        cls.calling(model, inputs, layers,
                    lambda layer, out: ran.append(layer) if layer not in ran else None)
        outs = cls(model, ran)(inputs)
        for layer, out in zip(ran, outs[1:]):
            on_call(layer, tuple(keras.tree.flatten(inputs)), out)
        return outs[0]


def captures(extractor: keras.Model) -> bool:
    """Whether ``extractor`` runs a subclassed model through a :class:`_Capture`
    (whose call rewires that model's layers while it runs)."""
    return any(isinstance(layer, _Capture)
               for layer in extractor._flatten_layers(include_self=False, recursive=True))


def _follow_nonlinearity(calls, consumers, index, chain):
    """Walk conv → [BatchNormalization] → nonlinearity when the path is unbranched."""
    walk, names = index, list(chain)
    while True:
        out = calls[walk][2]
        users = consumers.get(id(out), [])
        if len(users) != 1:
            return index, chain
        nxt = users[0]
        layer = calls[nxt][0]
        names.append(layer.name)
        if isinstance(layer, NONLINEARITY_TYPES):
            return nxt, names
        if not isinstance(layer, _PASS_THROUGH_TYPES):
            return index, chain
        walk = nxt


def _unique_key(key: str, used: set[str]) -> str:
    key = key or "layer"
    candidate, n = key, 1
    while candidate in used:
        n += 1
        candidate = f"{key}_{n}"
    used.add(candidate)
    return candidate


def inputs_of(extractor: keras.Model):
    """The extractor's input, or its list of inputs (a multi-input model)."""
    inputs = extractor.inputs
    return inputs[0] if len(inputs) == 1 else list(inputs)


def build_gram_extractor(extractor: keras.Model) -> keras.Model:
    """A model from the input to each tapped tensor's probe Gram matrix.

    For n inputs, tap ``i`` gives the (n, n) matrix ``A Aᵀ`` of its activations
    flattened per input: all that linear CKA needs, whatever the layer's width,
    computed where the activations are (no wide tensor leaves the device).
    """
    grams = []
    for out in extractor.outputs:
        flat = keras.ops.reshape(keras.ops.cast(out, "float32"), (-1, _features(out)))
        grams.append(keras.ops.matmul(flat, keras.ops.transpose(flat)))
    return keras.Model(inputs_of(extractor), grams, name=f"{extractor.name}_gram")


def _features(tensor) -> int:
    size = 1
    for dim in tensor.shape[1:]:
        size *= int(dim)
    return size


def select_channels(extractor: keras.Model, channels: Sequence[Sequence[int] | None],
                    channel_axes: Sequence[int]) -> keras.Model:
    """The extractor with output ``i`` cut to ``channels[i]`` (None keeps all).

    ``channel_axes[i]`` is the channel axis of output ``i``, batch axis
    included. The cut is part of the compiled probe function, so only the
    kept channels leave the device.
    """
    outputs = []
    for out, keep, axis in zip(extractor.outputs, channels, channel_axes):
        if keep is not None:
            out = keras.ops.take(out, keras.ops.convert_to_tensor(list(keep), "int32"), axis=axis)
        outputs.append(out)
    return keras.Model(inputs_of(extractor), outputs, name=f"{extractor.name}_channels")


#: The largest finite float16.
FLOAT16_MAX = 65504.0


def cast_outputs(extractor: keras.Model, dtype: str | Sequence[str],
                 bounded: Sequence[bool] | None = None) -> keras.Model:
    """The extractor with output ``i`` cast to ``dtype[i]`` (or every output to
    ``dtype``) inside the compiled function, or the extractor itself if its
    outputs already have those dtypes.

    A cast to float16 from a wider float saturates finite values at ±65504
    (float16's largest), so a finite activation is never stored as ±inf; inf
    and NaN stay what they are. Outputs marked ``bounded`` (a tanh, sigmoid, …:
    :data:`BOUNDED_RANGES`, far inside float16's range) are cast as they are:
    three fewer ops per layer in every probe pass.
    """
    dtypes = [dtype] * len(extractor.outputs) if isinstance(dtype, str) else list(dtype)
    if all(str(out.dtype) == str(d) for out, d in zip(extractor.outputs, dtypes)):
        return extractor
    bounded = [False] * len(dtypes) if bounded is None else list(bounded)
    outputs = [keras.ops.cast(out, d) if safe else _cast(out, d)
               for out, d, safe in zip(extractor.outputs, dtypes, bounded)]
    name = dtypes[0] if len(set(dtypes)) == 1 else "mixed"
    return keras.Model(inputs_of(extractor), outputs, name=f"{extractor.name}_{name}")


def _cast(tensor, dtype: str):
    if str(tensor.dtype) == str(dtype):
        return tensor
    if str(dtype) == "float16" and str(tensor.dtype) in ("float32", "float64", "bfloat16"):
        ops = keras.ops
        tensor = ops.where(ops.isfinite(tensor), ops.clip(tensor, -FLOAT16_MAX, FLOAT16_MAX),
                           tensor)
    return keras.ops.cast(tensor, dtype)


def storage_dtypes(taps: Sequence[Tap], outputs: Sequence[Any], dtype: str) -> list[str]:
    """Per tap, how its tensor is stored under ``dtype`` ("auto", "float16", "float32").

    ``"auto"`` stores float16 only where that loses no range: the recorded
    tensor is bounded (:data:`BOUNDED_RANGES`: tanh, sigmoid, softsign, ReLU6,
    …) or is float16 already (mixed precision); everything else — ReLU,
    linear, BatchNorm outputs, which an untrained network can push past
    float16's 65504 — is stored as float32.
    """
    if dtype != "auto":
        return [dtype] * len(taps)
    return ["float16" if tap.activation in BOUNDED_RANGES or str(out.dtype) == "float16"
            else "float32" for tap, out in zip(taps, outputs)]


def probe_function(model: keras.Model, extractor: keras.Model) -> Callable[[Any], Any]:
    """One compiled, inference-mode function from the probes to ``extractor``'s outputs.

    Keras' predict step, built once and reused at every call — except under a
    multi-replica TensorFlow distribution strategy (see
    :func:`_tf_local_function`), and on JAX, where it is a jitted
    ``stateless_call`` on the train loop's current state
    (:class:`~layerwatch.record.jax_state.JaxState`), and on PyTorch, where
    it replays a trace of the call (:class:`~layerwatch.record.torch_trace.TracedProbes`).
    """
    if keras.backend.backend() == "tensorflow":
        strategy = getattr(model, "distribute_strategy", None)
        if getattr(strategy, "num_replicas_in_sync", 1) > 1:
            return _tf_local_function(extractor)
    if keras.backend.backend() == "jax":
        # On the train loop's own state: no sync of every variable per call.
        from .jax_state import JaxState

        return JaxState(model).function(extractor)
    if keras.backend.backend() == "torch":
        from .torch_trace import TracedProbes

        return TracedProbes(extractor)
    return extractor.predict_on_batch


def _tf_local_function(extractor: keras.Model) -> Callable[[Any], Any]:
    # TensorFlow only. Under MirroredStrategy / MultiWorkerMirroredStrategy,
    # Keras' predict step runs the probes on every replica and concatenates the
    # results (across workers a collective that every worker must join): the
    # probes come back once per replica, and a chief recording alone would wait
    # for the others forever. A plain tf.function reads this worker's copy of
    # the mirrored variables and runs here only.
    import tensorflow as tf

    return tf.function(lambda x: extractor(x, training=False), reduce_retracing=True)
