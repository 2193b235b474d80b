"""The probe pass inside JAX's jitted train step.

On JAX, Keras' train function is a ``jax.jit`` of ``train_step(state, data)``
over the train loop's functional state. :class:`JaxFusedProbePass` jits a step
that also runs the recorder with ``stateless_call`` on the trainable and
non-trainable values the step starts from (inference mode), and reads the
learning rate from the optimizer's values at that state: one dispatch per
step instead of the train step, a separate probe call and a learning-rate read.
As on TensorFlow (:mod:`~layerwatch.record.fused`), the probes run under a
``lax.cond`` on an argument, so a step that records nothing skips them in the
same compiled function, compiled once; and the snapshot asked for at step
``s``'s batch end is computed by the next train call.

A batch of another shape than a fit's first (an epoch's last, partial batch)
would have ``jax.jit`` compile the whole fused step again, probes included.
Such a batch instead runs Keras' own train step, which a plain fit compiles
for it too, after the separate probe pass, which is compiled already (it
serves the epochs' ends and the cost meter). That call took 1.13–1.31 s
against 1.32–1.40 s on the seed model, 7.1–7.8 s against 8.2–8.6 s on
MobileNetV2, on the training thread. The fused step is compiled for each
fit's first batch shape (once, while later fits keep it).

Not used (:func:`can_fuse_jax`) under a ``keras.distribution`` (the state is
sharded), without ``jit_compile`` or with ``run_eagerly``, when the recorder
holds a variable the model does not, or with saliency / Grad-CAM, which JAX
computes in their own jitted call.
"""

from __future__ import annotations

from typing import Any, Callable

import keras

from .fused import Fused
from .jax_state import learning_rate_at, picked, variable_picks


def can_fuse_jax(model: keras.Model, recorder: keras.Model) -> bool:
    """Whether :class:`JaxFusedProbePass` can replace ``model``'s train function."""
    from keras import distribution

    return (getattr(model, "jit_compile", False) and not getattr(model, "run_eagerly", False)
            and distribution.distribution() is None
            and callable(getattr(model, "train_step", None))
            and variable_picks(model, recorder) is not None)


class JaxFusedProbePass(Fused):
    """JAX's fused train function for ``model``: ``(state, iterator) -> (logs, state)``,
    like the one Keras builds with one step per execution.

    :meth:`take` returns the probe activations (one per output of
    ``recorder``) and the learning rate. Built once and reused by later fits.
    """

    def __init__(self, model: keras.Model, recorder: keras.Model, probes: Any, like: list,
                 separate: Callable[[Any], tuple[list, Any]] | None = None):
        """``like``: one snapshot as the probe pass returns it, for the shapes and
        dtypes of the skipped branch (zeros: both branches of a ``lax.cond``
        have one shape). ``separate``: the separate probe pass on the model's
        (trainable, non-trainable, optimizer) values given, ``(outputs,
        learning rate)``, for batches of another shape than a fit's first;
        without it the fused step is compiled for each shape."""
        import jax
        import jax.numpy as jnp

        super().__init__(model, recorder)
        self._separate = separate
        self._flatten = jax.tree_util.tree_flatten
        #: The batches (structure, shapes and dtypes) the fused step is compiled for.
        self._batches: set = set()
        self._first = True  # the fit's first call: it compiles for its batch if need be
        picks = variable_picks(model, recorder)
        shapes = [(tuple(a.shape), a.dtype) for a in like]
        optimizer = getattr(model, "optimizer", None)
        train_step = model.train_step

        def probe(values, feed):
            trainable, non_trainable = picked(values, picks)
            outputs, _ = recorder.stateless_call(trainable, non_trainable, feed, training=False)
            return tuple(outputs) if isinstance(outputs, (list, tuple)) else (outputs,)

        def skip(values, feed):
            return tuple(jnp.zeros(shape, dtype) for shape, dtype in shapes)

        def rate_at(optimizer_values):
            if getattr(optimizer, "learning_rate", None) is None:
                return jnp.float32(float("nan"))
            return learning_rate_at(optimizer, optimizer_values)

        def step(state, data, wanted, feed):
            self.traces += 1  # Python runs here only while JAX traces
            # Read before the update, on the values the step starts from.
            outputs = jax.lax.cond(wanted, probe, skip, state, feed)
            rate = rate_at(state[2])
            logs, state = train_step(state, data)
            return logs, state, (outputs, rate)

        self._fused = jax.jit(step, donate_argnums=0)
        self._feed = jax.tree_util.tree_map(jnp.asarray, probes)
        self._flags = (jnp.asarray(False), jnp.asarray(True))

    def install(self) -> bool:
        self._first = True
        return super().install()

    def __call__(self, state, iterator):
        wanted, self.wanted = self.wanted, False
        data = next(iterator)
        leaves, structure = self._flatten(data)
        batch = (structure, tuple((getattr(a, "shape", None), getattr(a, "dtype", None))
                                  for a in leaves))
        first, self._first = self._first, False
        if batch not in self._batches:
            if not first and self._separate is not None:
                if wanted:  # on the values this step starts from, as the fused step reads them
                    self._outputs = self._separate(state[:3])
                return self._plain(state, iter((data,)))
            self._batches.add(batch)
        logs, state, outputs = self._fused(state, data, self._flags[wanted], self._feed)
        if wanted:
            self._outputs = outputs
        return logs, state
