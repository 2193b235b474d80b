"""Activation maximization ("features"): per channel, the input that excites it most.

``LayerWatch(..., features_every=N)`` computes, at step 0, every ``N`` steps and
at the final step, for the first ``features_channels`` recorded channels of
every recorded layer, an input that maximizes that channel's mean activation
(over positions, inference mode, on that step's weights). :class:`FeatureAscent`
is built once per model: all layers and channels are one batch (one image per
(layer, channel); each image's objective is its own channel's mean), run for a
fixed number of gradient-ascent iterations inside one compiled call —
``tf.while_loop`` in a ``tf.function`` on TensorFlow, ``jax.lax.fori_loop``
under ``jax.jit`` over ``stateless_call`` on JAX, a loop of autograd steps on
torch.

The ascent (:data:`ITERATIONS` steps, settings below, stored with the file):

- start: the probes' per-input-channel mean plus Gaussian noise of 0.1× the
  probes' standard deviation, from a fixed seed (:data:`SEED`): the same start
  at every step, so rows differ only because the weights did. An image whose
  channel gives that start no gradient at all (a ReLU channel off everywhere
  on it) starts from the probe that excites the channel most instead;
- normalized gradient steps: each image moves by :data:`STEP_SIZE` × the
  probes' value span along its gradient divided by the gradient's RMS, so the
  pace does not depend on the layer's scale or on how saturated it is;
- L2 decay: each step pulls the image :data:`DECAY` of the way back to the
  start's centre, so pixels the channel does not care about fade to grey
  instead of keeping noise;
- a 3-tap binomial blur (``[1, 2, 1] / 4`` per spatial axis) every
  :data:`BLUR_EVERY` steps, which removes the checkerboard high frequencies
  that ascent otherwise builds up;
- clipping to the probes' value range ``[min, max]``: the image stays an input
  the model could be given.

No jitter: on the small inputs layerwatch records (8×8 … 64×64) a shift of a
few pixels is a large part of the picture, and the blur already suppresses
what jitter fights; it also keeps the loop free of random ops, identical on
every backend.

The best image seen during the ascent is kept. If it does not excite its
channel more than the best probe does (a dead ReLU channel, flat gradients),
that probe is stored instead; the file keeps both values per image
(``features/activation``, ``features/probe_best``), so a reader can tell.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from layerwatch.store.features import FeatureRow, FeaturesSpec
from layerwatch.store.schema import (
    ATTR_FEATURES_EVERY,
    ATTR_FEATURES_ITERATIONS,
    ATTR_FEATURES_METHOD,
    ATTR_FEATURES_SEED,
    ATTR_FEATURES_STEP_SIZE,
)

from .extractor import is_graph_model

#: Gradient-ascent iterations per features call.
ITERATIONS = 32
#: Each step's length, as a share of the probes' value span (max - min), per pixel RMS.
STEP_SIZE = 0.1
#: Share of the distance to the start's centre removed each step (L2 decay).
DECAY = 0.01
#: A binomial blur every this many steps.
BLUR_EVERY = 4
#: Seed noise, as a share of the probes' standard deviation.
NOISE = 0.1
#: The seed of the start noise.
SEED = 0
#: One line for the file: how the images were made.
METHOD = (f"gradient ascent on the channel's mean activation, {ITERATIONS} steps from the "
          f"probes' per-channel mean + N(0, ({NOISE} x probes' std)^2) noise (seed {SEED}), "
          "or the best probe where the channel has no gradient on that; "
          f"steps of {STEP_SIZE} x the probes' value span along grad / RMS(grad); L2 decay "
          f"{DECAY} towards the start's centre per step; [1,2,1]/4 blur every {BLUR_EVERY} "
          "steps; clipped to the probes' [min, max]; the best image seen is kept, the best "
          "probe when ascent does not beat it")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_features(features_every: Any, features_channels: Any) -> tuple[int | None, int]:
    """(every, channels) from ``features_every=`` and ``features_channels=``.

    Raises
    ------
    ValueError
        ``features_every`` is not None or an integer >= 1, or
        ``features_channels`` is not an integer >= 1.
    """
    if features_every is not None and not (_is_int(features_every) and features_every >= 1):
        raise ValueError("features_every must be an integer >= 1 (compute feature images "
                         "every that many steps), or None for none. Received: "
                         f"features_every={features_every!r}")
    if not (_is_int(features_channels) and features_channels >= 1):
        raise ValueError("features_channels must be an integer >= 1 (images per layer). "
                         f"Received: features_channels={features_channels!r}")
    return (None if features_every is None else int(features_every)), int(features_channels)


def features_due(step: int, last: int | None, every: int, *, final: bool = False) -> bool:
    """Whether feature images are due at ``step``, the last ones made at ``last``:
    the first step recorded, the first step past each multiple of ``every``,
    and the final step of a fit."""
    if last is not None and step <= last:
        return False
    return final or last is None or step // every > last // every


def check_features_model(model: keras.Model, inputs: list[np.ndarray]) -> None:
    """Features need a one-input graph model with a floating-point input."""
    if len(inputs) != 1:
        raise ValueError(
            f"features_every= needs a model with one input; model '{model.name}' has "
            f"{len(inputs)}. Record without features_every=.")
    if not np.issubdtype(inputs[0].dtype, np.floating):
        raise ValueError(
            "features_every= needs a floating-point input (images are found by gradient "
            f"ascent on it); model '{model.name}' takes {inputs[0].dtype}.")
    if not is_graph_model(model):
        raise ValueError(
            f"features_every= needs a Sequential or Functional model; model '{model.name}' is "
            "subclassed, and its layers are recorded by capturing their outputs as it runs, "
            "which feature ascent does not support. Record without features_every=, or build "
            "the model with the functional API.")


class FeatureAscent:
    """The compiled feature-ascent function of one model, built once.

    Parameters
    ----------
    model
        The model being trained.
    probes
        Its :class:`~layerwatch.record.probe_pass.ProbePass`: the probes, the
        extractor (uncut, uncast), the taps and their kept channels.
    channels
        Images per layer: the first this many of each layer's recorded channels.
    every
        The schedule, stored with the file.
    """

    def __init__(self, model: keras.Model, probes: Any, *, channels: int, every: int):
        check_features_model(model, probes.inputs)
        self.model = model
        self.every = int(every)
        self.keys = [tap.key for tap in probes.taps]
        self._extractor = probes.extractor
        self._axes = list(probes.axes)
        self._probes = np.asarray(probes.inputs[0], dtype=np.float32)
        kept = [np.arange(t) if c is None else np.asarray(c)
                for c, t in zip(probes.channels, probes.totals)]
        chosen = [np.asarray(k[:channels], dtype=np.int64) for k in kept]
        starts = np.cumsum([0] + [len(c) for c in chosen])
        #: per tap, the model's channel indices that get an image, and the first batch row
        self.channels = chosen
        self._starts = [int(s) for s in starts[:-1]]
        batch = int(starts[-1])
        masks = []
        for c, start, total in zip(chosen, starts, probes.totals):
            mask = np.zeros((batch, total), dtype=np.float32)
            mask[start + np.arange(len(c)), c] = 1.0
            masks.append(mask)
        self._masks = masks
        self._settings = _start(self._probes, batch)
        self._run = _compile(self._extractor, self._axes, masks, self._settings)

    @property
    def spec(self) -> FeaturesSpec:
        """What the file's ``features`` group is laid out from."""
        return FeaturesSpec(
            input_shape=tuple(self._probes.shape[1:]),
            channels=dict(zip(self.keys, self.channels)),
            attrs={ATTR_FEATURES_EVERY: self.every, ATTR_FEATURES_ITERATIONS: ITERATIONS,
                   ATTR_FEATURES_STEP_SIZE: STEP_SIZE, ATTR_FEATURES_SEED: SEED,
                   ATTR_FEATURES_METHOD: METHOD})

    def __call__(self) -> dict[str, FeatureRow]:
        """The feature images at the current weights, one row per layer."""
        images, values, probe_means = self._run(self._probes)
        images = np.asarray(keras.ops.convert_to_numpy(images), dtype=np.float32)
        values = np.asarray(keras.ops.convert_to_numpy(values), dtype=np.float32)
        out = {}
        for i, key in enumerate(self.keys):
            channels, start = self.channels[i], self._starts[i]
            rows = slice(start, start + len(channels))
            means = np.asarray(keras.ops.convert_to_numpy(probe_means[i]),
                               dtype=np.float32)[:, channels]
            best, which = means.max(axis=0), means.argmax(axis=0)
            found, reached = images[rows].copy(), values[rows].copy()
            lost = ~(reached > best)  # NaN counts as lost too
            found[lost] = self._probes[which[lost]]
            reached[lost] = best[lost]
            out[key] = FeatureRow(images=found, activation=reached, probe_best=best)
        return out


# --------------------------------------------------------------------------- #
# The ascent, in keras.ops (shared by the backends) and per backend
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class _Settings:
    start: np.ndarray    # (batch, *input) the seed images
    centre: np.ndarray   # (1, *input) the per-channel mean the decay pulls towards
    low: float
    high: float
    step: float          # STEP_SIZE × value span
    spatial: tuple[int, ...]  # spatial axes of a batch of inputs


def _start(probes: np.ndarray, batch: int) -> _Settings:
    """The fixed start of the ascent and its constants, from the probes."""
    rank = probes.ndim
    first = keras.config.image_data_format() == "channels_first"
    if rank <= 2:  # (P, features): no channel or spatial axes
        channel, spatial = None, ()
    elif first:
        channel, spatial = 1, tuple(range(2, rank))
    else:
        channel, spatial = rank - 1, tuple(range(1, rank - 1))
    over = tuple(a for a in range(rank) if a != channel)
    centre = probes.mean(axis=over, keepdims=True).astype(np.float32)
    std = float(probes.std()) or 1.0
    low, high = float(probes.min()), float(probes.max())
    span = high - low if high > low else 1.0
    noise = np.random.default_rng(SEED).normal(size=(batch,) + probes.shape[1:])
    start = np.clip(centre + NOISE * std * noise, low, high).astype(np.float32)
    return _Settings(start=start, centre=centre, low=low, high=high, step=STEP_SIZE * span,
                     spatial=spatial)


def _as_list(outputs: Any) -> list:
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def _channel_means(outputs: Any, axes: list[int]) -> list:
    """Per tap, ``(batch, channels)``: the mean over positions of every channel."""
    ops = keras.ops
    means = []
    for out, axis in zip(_as_list(outputs), axes):
        out = ops.cast(out, "float32")
        reduce = [a for a in range(1, len(out.shape)) if a != axis]
        means.append(ops.mean(out, axis=reduce) if reduce else out)
    return means


def _objective(outputs: Any, axes: list[int], masks: list) -> Any:
    """``(batch,)``: each image's own channel's mean activation."""
    ops = keras.ops
    total = 0.0
    for means, mask in zip(_channel_means(outputs, axes), masks):
        total = total + ops.sum(means * mask, axis=1)
    return total


def _blur(x: Any, spatial: tuple[int, ...]) -> Any:
    """``[1, 2, 1] / 4`` along each spatial axis, edges repeated."""
    ops = keras.ops
    for axis in spatial:
        n = x.shape[axis]
        if n < 3:
            continue
        padded = ops.concatenate([_part(x, axis, 0, 1), x, _part(x, axis, n - 1, n)], axis=axis)
        x = (_part(padded, axis, 0, n) + 2.0 * _part(padded, axis, 1, n + 1)
             + _part(padded, axis, 2, n + 2)) * 0.25
    return x


def _part(x: Any, axis: int, start: int, stop: int) -> Any:
    """``x[..., start:stop, ...]`` along ``axis``."""
    return x[(slice(None),) * axis + (slice(start, stop),)]


def _ascend(x: Any, grad: Any, blur_now: Any, s: _Settings, centre: Any) -> Any:
    """One ascent step: normalized gradient, L2 decay, blur if due, clip."""
    ops = keras.ops
    reduce = tuple(range(1, len(x.shape)))
    rms = ops.sqrt(ops.mean(ops.square(grad), axis=reduce, keepdims=True))
    x = x + s.step * grad / (rms + 1e-12)
    x = centre + (x - centre) * (1.0 - DECAY)
    if isinstance(blur_now, bool):
        x = _blur(x, s.spatial) if blur_now else x
    else:
        x = ops.where(blur_now, _blur(x, s.spatial), x)
    return ops.clip(x, s.low, s.high)


def _probe_starts(probes: Any, means: list, masks: list) -> Any:
    """``(batch, *input)``: per image, the probe that excites its channel most
    (``means``: per tap, the probes' channel means, ``(probes, channels)``)."""
    ops = keras.ops
    scores = 0.0
    for m, mask in zip(means, masks):
        scores = scores + ops.matmul(mask, ops.transpose(m))  # (batch, probes)
    return ops.take(probes, ops.argmax(scores, axis=1), axis=0)


def _restart_silent(x: Any, grad: Any, probe_starts: Any) -> Any:
    """Images whose channel gives the seed start no gradient at all (a ReLU
    channel off everywhere on it) start from their best probe instead."""
    ops = keras.ops
    reduce = tuple(range(1, len(x.shape)))
    silent = ops.max(ops.abs(grad), axis=reduce) == 0
    return ops.where(ops.reshape(silent, (-1,) + (1,) * (len(x.shape) - 1)), probe_starts, x)


def _keep_best(x: Any, value: Any, best_x: Any, best: Any) -> tuple[Any, Any]:
    ops = keras.ops
    better = value > best
    shape = (-1,) + (1,) * (len(x.shape) - 1)
    return ops.where(ops.reshape(better, shape), x, best_x), ops.where(better, value, best)


def _compile(extractor: keras.Model, axes: list[int], masks: list[np.ndarray],
             s: _Settings) -> Callable[[np.ndarray], tuple[Any, Any, list]]:
    """``run(probes) -> (images, their values, per tap the probes' channel means)``,
    at the current weights: one compiled call per backend."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return _compile_tf(extractor, axes, masks, s)
    if backend == "jax":
        return _compile_jax(extractor, axes, masks, s)
    if backend == "torch":
        return _compile_torch(extractor, axes, masks, s)
    raise ValueError(f"features_every= is not supported on the {backend!r} backend.")


def _compile_tf(extractor, axes, masks, s):
    import tensorflow as tf

    masks_t = [tf.constant(m) for m in masks]
    start, centre = tf.constant(s.start), tf.constant(s.centre)

    def value_and_grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = _objective(extractor(x, training=False), axes, masks_t)
            total = tf.reduce_sum(value)
        return value, tape.gradient(total, x)

    @tf.function(reduce_retracing=True)
    def run(probes):
        def body(t, x, best_x, best):
            value, grad = value_and_grad(x)
            best_x, best = _keep_best(x, value, best_x, best)
            x = _ascend(x, grad, (t + 1) % BLUR_EVERY == 0, s, centre)
            return t + 1, x, best_x, best

        means = _channel_means(extractor(probes, training=False), axes)
        _, grad = value_and_grad(start)
        first = _restart_silent(start, grad, _probe_starts(probes, means, masks_t))
        lowest = tf.fill((s.start.shape[0],), float("-inf"))
        _, x, best_x, best = tf.while_loop(lambda t, *_: t < ITERATIONS, body,
                                           (tf.constant(0), first, first, lowest))
        value = _objective(extractor(x, training=False), axes, masks_t)
        best_x, best = _keep_best(x, value, best_x, best)
        return best_x, best, means

    return lambda probes: run(tf.constant(probes))


def _compile_jax(extractor, axes, masks, s):
    import jax
    import jax.numpy as jnp

    masks_j = [jnp.asarray(m) for m in masks]
    start, centre = jnp.asarray(s.start), jnp.asarray(s.centre)

    def run(probes, trainable, non_trainable):
        def call(x):
            out, _ = extractor.stateless_call(trainable, non_trainable, x, training=False)
            return out

        def total(x):
            value = _objective(call(x), axes, masks_j)
            return jnp.sum(value), value

        value_and_grad = jax.value_and_grad(total, has_aux=True)

        def body(t, carry):
            x, best_x, best = carry
            (_, value), grad = value_and_grad(x)
            best_x, best = _keep_best(x, value, best_x, best)
            return _ascend(x, grad, (t + 1) % BLUR_EVERY == 0, s, centre), best_x, best

        means = _channel_means(call(probes), axes)
        _, grad = value_and_grad(start)
        first = _restart_silent(start, grad, _probe_starts(probes, means, masks_j))
        lowest = jnp.full((s.start.shape[0],), -jnp.inf, dtype=jnp.float32)
        x, best_x, best = jax.lax.fori_loop(0, ITERATIONS, body, (first, first, lowest))
        best_x, best = _keep_best(x, _objective(call(x), axes, masks_j), best_x, best)
        return best_x, best, means

    compiled = jax.jit(run)

    def call(probes):
        return compiled(jnp.asarray(probes), [v.value for v in extractor.trainable_variables],
                        [v.value for v in extractor.non_trainable_variables])
    return call


def _compile_torch(extractor, axes, masks, s):
    import torch

    def run(probes):
        device = next((v.value.device for v in extractor.variables), "cpu")
        masks_t = [torch.tensor(m, device=device) for m in masks]
        centre = torch.tensor(s.centre, device=device)
        probes = torch.tensor(probes, device=device)

        def value_and_grad(x):
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                value = _objective(extractor(x, training=False), axes, masks_t)
                (grad,) = torch.autograd.grad(value.sum(), x)
            return value.detach(), grad

        with torch.no_grad():
            means = _channel_means(extractor(probes, training=False), axes)
        start = torch.tensor(s.start, device=device)
        _, grad = value_and_grad(start)
        with torch.no_grad():
            x = _restart_silent(start, grad, _probe_starts(probes, means, masks_t))
        best_x = x.clone()
        best = torch.full((x.shape[0],), float("-inf"), device=device)
        for t in range(ITERATIONS):
            value, grad = value_and_grad(x)
            with torch.no_grad():
                best_x, best = _keep_best(x, value, best_x, best)
                x = _ascend(x, grad, (t + 1) % BLUR_EVERY == 0, s, centre)
        with torch.no_grad():
            best_x, best = _keep_best(x, _objective(extractor(x, training=False), axes,
                                                    masks_t), best_x, best)
        return best_x.cpu(), best.cpu(), [m.cpu() for m in means]

    return run
