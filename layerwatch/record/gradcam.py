"""Grad-CAM of the recorded layers, from one backward pass that also gives saliency.

Grad-CAM of a layer with output ``A`` (probes, h, w, channels) for the probe's
picked output ``y`` (the output at its label, the top class without labels:
:func:`~layerwatch.record.probe_pass._picked`) is
``relu(sum_c mean_hw(dy/dA)[c] * A[..., c])``, over *all* the layer's channels.

The gradients with respect to the layers' outputs come from a *gradient model*:
the model's graph re-traced (:func:`~layerwatch.record.extractor._trace`) with
one zero-valued extra input added to each Grad-CAM layer's recorded tensor, so
``d y / d zero = d y / d A`` on every backend — a gradient with respect to an
input, which ``tf.GradientTape``, ``jax.grad`` and torch autograd all take
alike. The same call gives ``d y / d input`` (saliency) when that is on.

In a subclassed model the zero is added where its layers' outputs are captured
(:class:`_ZeroCapture`, like :class:`~layerwatch.record.extractor._Capture`).

Only layers whose recorded tensor has two spatial axes (``Conv2D``,
``SeparableConv2D``, ``DepthwiseConv2D``, ``Conv2DTranspose``, …) get Grad-CAM: a
map over the image is what it is for. 1-D and 3-D convolutions are skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np

from .channels import channel_axis
from .extractor import Tap, _trace, is_graph_model


def gradcam_taps(taps: Sequence[Tap], outputs: Sequence[Any]) -> list[int]:
    """Indices of the taps that get Grad-CAM: those whose output has 2 spatial axes."""
    return [i for i, out in enumerate(outputs) if len(out.shape) == 4]


def check_gradcam(model: keras.Model, taps: Sequence[Tap], chosen: Sequence[int],
                  n_inputs: int) -> None:
    """Refuse, at fit start, a model Grad-CAM cannot be computed for."""
    if n_inputs != 1:
        raise ValueError(f"gradcam=True needs a model with one input; model '{model.name}' "
                         f"has {n_inputs}. Record without gradcam=True.")
    outputs = model.outputs if getattr(model, "outputs", None) else None
    if outputs is not None and len(outputs) != 1:
        raise ValueError(f"gradcam=True needs a model with one output; model '{model.name}' "
                         f"has {len(outputs)}. Record without gradcam=True.")
    if not chosen:
        raise ValueError(
            f"gradcam=True found no recorded layer of model '{model.name}' with a 2-D "
            f"spatial output (recorded: {', '.join(t.key for t in taps)}). Grad-CAM maps "
            "images: record a Conv2D-like layer with layers=, or record without it.")


def build_gradient_model(model: keras.Model, taps: Sequence[Tap], chosen: Sequence[int],
                         spec: tuple[tuple[Any, ...], str], outputs: Sequence[Any]
                         ) -> keras.Model:
    """``[x, zero_1, …] -> [A_1 + zero_1, …, model output]`` for the chosen taps.

    Raises ValueError when a chosen layer's output cannot be given its zero input
    (it sits inside a subclassed model nested in the graph).
    """
    x = keras.Input(shape=spec[0], dtype=spec[1])
    if not is_graph_model(model):
        zeros = [keras.Input(shape=tuple(outputs[i].shape[1:]), dtype=outputs[i].dtype,
                             name=f"layerwatch_zero_{i}") for i in chosen]
        found = _ZeroCapture(model, [taps[i].recorded for i in chosen])([x] + zeros)
        return keras.Model([x] + zeros, found[1:] + found[:1],
                           name=f"{model.name}_layerwatch_gradients")
    wanted = {taps[i].call: i for i in chosen}
    zeros: dict[int, Any] = {}
    tapped: dict[int, Any] = {}
    count = [0]

    def on_call(layer, args, out):
        index, count[0] = count[0], count[0] + 1
        i = wanted.get(index)
        if i is None or isinstance(out, (list, tuple)):
            return None
        zero = keras.Input(shape=tuple(out.shape[1:]), dtype=out.dtype,
                           name=f"layerwatch_zero_{i}")
        zeros[i] = zero
        tapped[i] = keras.ops.add(out, zero)
        return tapped[i]

    output = keras.tree.flatten(_trace(model, x, on_call))[0]
    missing = [taps[i].key for i in chosen if i not in tapped]
    if missing:
        raise ValueError(
            f"gradcam=True cannot differentiate the output of {', '.join(missing)} in model "
            f"'{model.name}' (inside a subclassed sub-model). Record those layers without "
            "Grad-CAM (layers=), or record without gradcam=True.")
    return keras.Model([x] + [zeros[i] for i in chosen],
                       [tapped[i] for i in chosen] + [output],
                       name=f"{model.name}_layerwatch_gradients")


class _ZeroCapture(keras.layers.Layer):
    """Runs a subclassed model with ``zeros[i]`` added to the first output of
    ``layers[i]``; hands back ``[model output, those outputs…]``.

    Each layer's ``call`` is wrapped only while this layer's ``call`` runs (as
    :class:`~layerwatch.record.extractor._Capture` does), so training never
    runs through it.
    """

    def __init__(self, model: keras.Model, layers: Sequence[keras.layers.Layer], **kwargs):
        super().__init__(name=f"{model.name}_gradcam_capture", **kwargs)
        self.inner = model
        self._watched = list(layers)

    def call(self, inputs):
        x, zeros = inputs[0], inputs[1:]
        found: dict[int, Any] = {}
        for layer, zero in zip(self._watched, zeros):
            def call(*args, _layer=layer, _original=layer.call, _zero=zero, **kwargs):
                out = _original(*args, **kwargs)
                if id(_layer) in found:
                    return out
                found[id(_layer)] = out = keras.ops.add(out, _zero)
                return out
            layer.call = call
        try:
            output = self.inner(x, training=False)
        finally:
            for layer in self._watched:
                layer.__dict__.pop("call", None)  # the class's own call again
        return [output] + [found[id(layer)] for layer in self._watched]


def _cam(activation: Any, gradient: Any, axis: int) -> Any:
    """relu(sum over channels of (spatial mean of the gradient) × activation), float32."""
    ops = keras.ops
    a = ops.cast(activation, "float32")
    g = ops.cast(gradient, "float32")
    spatial = tuple(d for d in (1, 2, 3) if d != axis)
    weights = ops.mean(g, axis=spatial, keepdims=True)
    return ops.relu(ops.sum(weights * a, axis=axis))


def gradient_function(model: keras.Model, gradient_model: keras.Model, x: np.ndarray,
                      labels: np.ndarray | None, axes: Sequence[int], *, saliency: bool
                      ) -> tuple[Callable[[Any], Any] | None, Callable[[], list]]:
    """Grad-CAM maps (and, with ``saliency``, the saliency maps first) of the probes ``x``.

    ``axes`` are the chosen taps' channel axes (batch axis included). Returns
    ``(graph, call)`` as :func:`~layerwatch.record.probe_pass.saliency_function`
    does: ``call()`` computes ``[saliency?, cam_1, …]`` at the current weights
    (``tf.function`` + ``GradientTape``; ``jax.jit`` over ``stateless_call``;
    torch autograd); ``graph(constant)`` (TensorFlow only) builds the same ops
    inside another graph, the fused train step.
    """
    from .probe_pass import _picked

    backend = keras.backend.backend()
    labels_ = None if labels is None else np.asarray(labels, dtype=np.int32)
    shapes = [tuple(int(d) for d in t.shape[1:]) for t in gradient_model.inputs[1:]]
    dtypes = [str(t.dtype) for t in gradient_model.inputs[1:]]
    n = len(x)

    def finish(outs, grads):
        """[saliency?, cams…] from the model's outputs and the gradients (inputs order)."""
        cams = [_cam(a, g, axis) for a, g, axis in zip(outs[:-1], grads[1:], axes)]
        return ([keras.ops.cast(grads[0], "float32")] if saliency else []) + cams

    if backend == "tensorflow":
        import tensorflow as tf

        y = None if labels_ is None else tf.constant(labels_)

        def graph(constant):
            constant = tf.convert_to_tensor(constant)
            zeros = [tf.zeros((n,) + s, dtype=d) for s, d in zip(shapes, dtypes)]
            with tf.GradientTape() as tape:
                if saliency:  # the input gradient too (a float input: check_saliency)
                    tape.watch(constant)
                tape.watch(zeros)
                outs = gradient_model([constant] + zeros, training=False)
                picked = _picked(outs[-1], y)
            zero = tf.UnconnectedGradients.ZERO  # a layer off the output's path: all 0
            grads = tape.gradient(picked, [constant] + zeros, unconnected_gradients=zero) \
                if saliency else [None] + tape.gradient(picked, zeros, unconnected_gradients=zero)
            return tuple(finish(outs, grads))

        compiled = tf.function(graph, reduce_retracing=True)
        feed = tf.constant(x)
        return graph, lambda: list(compiled(feed))
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        y = None if labels_ is None else jnp.asarray(labels_)

        def picked(x, zeros, trainable, non_trainable):
            outs, _ = gradient_model.stateless_call(trainable, non_trainable, [x] + zeros,
                                                    training=False)
            return _picked(outs[-1], y), outs

        # d / d input only with saliency (an integer input has no gradient)
        grad = jax.grad(picked, argnums=(0, 1) if saliency else 1, has_aux=True)

        @jax.jit
        def run(x, zeros, trainable, non_trainable):
            grads, outs = grad(x, zeros, trainable, non_trainable)
            grads = [grads[0]] + list(grads[1]) if saliency else [None] + list(grads)
            return finish(outs, grads)

        from .jax_state import JaxState

        feed = jnp.asarray(x)
        zeros = [jnp.zeros((n,) + s, dtype=d) for s, d in zip(shapes, dtypes)]
        state = JaxState(model)
        # The train loop's values, unsynced (see jax_state); a gradient model
        # with variables of its own is synced first.
        current = state.values_for(gradient_model) or (lambda: (
            model.jax_state_sync(),
            ([v.value for v in gradient_model.trainable_variables],
             [v.value for v in gradient_model.non_trainable_variables]))[1])

        def call():
            return run(feed, zeros, *current())
        return None, call
    if backend == "torch":
        import torch

        def call():
            device = next((v.value.device for v in model.variables), "cpu")
            inputs = [torch.tensor(x, device=device, requires_grad=saliency)] + [
                torch.zeros((n,) + s, dtype=getattr(torch, d), device=device,
                            requires_grad=True) for s, d in zip(shapes, dtypes)]
            y = None if labels_ is None else torch.tensor(labels_, device=device)
            with torch.enable_grad():
                outs = gradient_model(inputs, training=False)
                wrt = inputs if saliency else inputs[1:]
                grads = [torch.zeros_like(t) if g is None else g for t, g in zip(wrt, (
                    torch.autograd.grad(_picked(outs[-1], y), wrt, allow_unused=True)))]
            if not saliency:
                grads = [None] + grads
            with torch.no_grad():
                return [t.detach().float().cpu().numpy() for t in finish(outs, grads)]
        return None, call
    raise ValueError(f"gradcam=True is not supported on the {backend!r} backend.")


def gradcam_axes(taps: Sequence[Tap], chosen: Sequence[int]) -> list[int]:
    """The chosen taps' channel axes in their batched rank-4 outputs."""
    return [channel_axis(taps[i].layer, 4) for i in chosen]
