"""Finding the layers to record and building one function that computes them.

The model's graph (including nested Functional/Sequential sub-models) is
re-traced on a fresh symbolic input, calling the model's own layers — so the
weights are shared, and the taps of nested layers live in one flat graph. The
result is a Keras model from the probe input to every recorded tensor; it runs
in inference mode through Keras' compiled predict step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

import keras

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


def _walk(model: keras.Model, prefix: str = ""):
    """(path, layer) for every layer, entering nested models."""
    for layer in model.layers:
        path = f"{prefix}{layer.name}"
        if isinstance(layer, keras.Model):
            yield from _walk(layer, path + "/")
        elif not isinstance(layer, keras.layers.InputLayer):
            yield path, layer


def _trace(model: keras.Model, inputs: Any, on_call: Callable) -> Any:
    """Call ``model``'s layers on symbolic ``inputs``, flattening nested models.

    ``on_call(layer, inputs, outputs)`` sees every layer call. Functional
    models are replayed node by node through Keras' own graph runner
    (``Functional._run_through_graph``, a private API stable across Keras 3);
    Sequential models are a plain chain of their layers.
    """
    def call(layer):
        if isinstance(layer, keras.Model):
            return lambda x, *args, **kwargs: _trace(layer, x, on_call)

        def run(*args, **kwargs):
            out = layer(*args, **kwargs)
            on_call(layer, args, out)
            return out
        return run

    if isinstance(model, keras.Sequential):
        x = inputs
        for layer in model.layers:
            x = call(layer)(x)
        return x
    if hasattr(model, "_run_through_graph") and getattr(model, "_nodes_by_depth", None):
        # Keras' runner returns a flat structure; the model's own output
        # structure is rebuilt by the caller through the outputs it keeps.
        outputs = model._run_through_graph(inputs, operation_fn=call)
        return outputs
    raise ValueError(
        f"LayerWatch cannot see inside the subclassed model '{model.name}' "
        f"({type(model).__name__}): its layers have no graph to tap. Build it as a "
        "Functional or Sequential model (subclassed layers inside those are fine).")


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


def _single_input(model: keras.Model):
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise ValueError(
            f"LayerWatch needs a built model with a known input shape; model '{model.name}' "
            "has no inputs yet. Start it with keras.Input(shape=...) or build it before fit.")
    if len(inputs) != 1:
        raise ValueError(
            f"LayerWatch records models with one input; model '{model.name}' has "
            f"{len(inputs)}. Received: inputs={[tuple(i.shape) for i in inputs]}.")
    return inputs[0]


def input_spec(model: keras.Model) -> tuple[tuple[Any, ...], str]:
    """(per-example input shape with None for free dims, dtype) of a one-input model."""
    x = _single_input(model)
    return tuple(x.shape[1:]), str(x.dtype)


def build_extractor(model: keras.Model, layers: LayerSelector
                    ) -> tuple[keras.Model, list[Tap]]:
    """A model from the probe input to each recorded tensor, and what it taps.

    For a conv layer with a linear activation whose output feeds only a
    standalone nonlinearity (directly or through BatchNormalization), the
    nonlinearity's output is recorded instead; ``Tap.chain`` says so.
    """
    selected = select_layers(model, layers)
    model_input = _single_input(model)
    x = keras.Input(shape=model_input.shape[1:], dtype=model_input.dtype)

    calls: list[tuple[keras.layers.Layer, list[int], Any]] = []

    def on_call(layer, args, out):
        ids = [id(t) for t in keras.tree.flatten(args)]
        calls.append((layer, ids, out))

    _trace(model, x, on_call)

    consumers: dict[int, list[int]] = {}
    for index, (_, ids, _) in enumerate(calls):
        for i in ids:
            consumers.setdefault(i, []).append(index)
    first_call = {}
    for index, (layer, _, _) in enumerate(calls):
        first_call.setdefault(id(layer), index)

    taps, outputs, used_keys = [], [], set()
    for path, layer in selected:
        if id(layer) not in first_call:
            raise ValueError(
                f"Layer '{path}' is not called on the model's input path, so it has no "
                "output to record. Choose another layer with layers=.")
        index = first_call[id(layer)]
        chain = [layer.name]
        if activation_name(layer) == "linear" and isinstance(layer, CONV_TYPES):
            index, chain = _follow_nonlinearity(calls, consumers, index, chain)
        recorded, _, out = calls[index]
        key = _unique_key(path.replace("/", "."), used_keys)
        taps.append(Tap(key=key, layer=layer, recorded=recorded, chain=chain, path=path))
        outputs.append(out)
    extractor = keras.Model(x, outputs, name=f"{model.name}_layerwatch")
    return extractor, taps


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
    return keras.Model(extractor.inputs[0], grams, name=f"{extractor.name}_gram")


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
    return keras.Model(extractor.inputs[0], outputs, name=f"{extractor.name}_channels")


def cast_outputs(extractor: keras.Model, dtype: str) -> keras.Model:
    """The extractor with every output cast to ``dtype`` (inside the compiled
    function), or the extractor itself if its outputs already are."""
    if all(str(out.dtype) == str(dtype) for out in extractor.outputs):
        return extractor
    outputs = [keras.ops.cast(out, dtype) for out in extractor.outputs]
    return keras.Model(extractor.inputs[0], outputs, name=f"{extractor.name}_{dtype}")


def probe_function(model: keras.Model, extractor: keras.Model) -> Callable[[Any], Any]:
    """One compiled, inference-mode function from the probes to ``extractor``'s outputs.

    Keras' predict step, built once and reused at every call — except under a
    multi-replica TensorFlow distribution strategy (see
    :func:`_tf_local_function`).
    """
    if keras.backend.backend() == "tensorflow":
        strategy = getattr(model, "distribute_strategy", None)
        if getattr(strategy, "num_replicas_in_sync", 1) > 1:
            return _tf_local_function(extractor)
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
