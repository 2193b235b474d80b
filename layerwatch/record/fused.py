"""The probe pass inside TensorFlow's compiled train step.

On TensorFlow every compiled call pays a fixed executor cost (about 1 ms on a
2-core CPU), and a separate probe pass after the step also waits for the step
to finish before it starts. :class:`FusedProbePass` instead asks Keras for a
train function whose graph also runs the probes (inference mode) on the
weights the step starts from, and hands their activations back beside the
logs. Asked for at step ``s``'s batch end, the *next* call of the train
function is the one that runs them, and what it returns is the recording of
step ``s``.

It is one traced function for every step: the probes run under a ``tf.cond``
on a flag variable, so a step that records nothing skips them in the same
graph. Keras' own train function is never traced while it is installed
(tracing a second train function costs a second or more on a slow CPU, and
a first call at an epoch's start would land on the epoch-boundary stall of
``tf.data``).

When installed it builds the optimizer's variables, as Keras' first
train step would (see :func:`build_optimizer`): created inside the trace,
they cost TensorFlow a lifting of their initializers into the first call
(0.3–0.5 s on a 2-core CPU for the seed model, plain Keras included).

It also hands each epoch's spent ``tf.data`` iterator to
:mod:`~layerwatch.record.reaper`, whose thread destroys it: that can wait for
hundreds of milliseconds, which Keras' own loop would spend at the next
epoch's start.

Only used where that is exactly equivalent to a separate probe pass: the
TensorFlow backend, one replica, one step per execution (see
:func:`can_fuse`). Keras' private ``_make_function`` builds the fused function
the way Keras builds its own; if it is missing the callback falls back to the
separate pass.
"""

from __future__ import annotations

from typing import Any, Callable

import keras
import numpy as np

from . import reaper


def can_fuse(model: keras.Model, recorder: keras.Model | None = None, *,
             gradients: bool = False) -> bool:
    """Whether the probe pass can ride along with ``model``'s train steps.

    TensorFlow: one replica, one step per execution, Keras' ``_make_function``
    there. JAX (:mod:`~layerwatch.record.jax_fused`): a jitted train step, one
    step per execution, no distribution, a ``recorder`` whose variables are all
    the model's, and no saliency or Grad-CAM (``gradients``), which JAX
    computes in a separate call. Not when another recorder's fused step is in
    place already (two LayerWatch callbacks on one model: the second uses a
    separate pass).
    """
    train_function = getattr(model, "train_function", None)
    if train_function is None or isinstance(train_function, Fused) \
            or getattr(model, "steps_per_execution", 1) != 1:
        return False
    backend = keras.backend.backend()
    if backend == "jax":
        from .jax_fused import can_fuse_jax

        return not gradients and recorder is not None and can_fuse_jax(model, recorder)
    if backend != "tensorflow":
        return False
    strategy = getattr(model, "distribute_strategy", None)
    return (callable(getattr(model, "_make_function", None))
            and getattr(strategy, "num_replicas_in_sync", 1) == 1)


def fused_pass(model: keras.Model, recorder: keras.Model, probes: Any, like: list,
               graph: Callable[[], tuple] | None = None,
               separate: Callable[[Any], tuple[list, Any]] | None = None) -> "Fused":
    """This backend's fused train function (see :func:`can_fuse`), not yet installed.

    ``graph`` (TensorFlow): what the step runs on the probes, a function of no
    argument (:meth:`~layerwatch.record.probe_pass.ProbePass.compiled_call`);
    default ``recorder`` on ``probes``. ``separate`` (JAX): the separate
    probe pass on given values, ``(outputs, learning rate)``, for batches of
    another shape (see :class:`~layerwatch.record.jax_fused.JaxFusedProbePass`)."""
    if keras.backend.backend() == "jax":
        from .jax_fused import JaxFusedProbePass

        return JaxFusedProbePass(model, recorder, probes, like, separate=separate)
    return FusedProbePass(model, recorder, probes, like, graph=graph)


def build_optimizer(model: keras.Model) -> bool:
    """Create the optimizer's variables now, exactly as Keras' own TensorFlow
    ``train_step`` would at its first call; True if it did.

    Keras builds the optimizer inside the first traced train step when no
    distribution strategy is set ("for backwards compatibility"); TensorFlow
    then lifts the new variables' initializers out of that trace, which is
    slower than creating them beforehand. The variables are the same ones
    (same names, shapes and initial values; ``apply`` builds with these very
    calls), so training is the same. Only for an unbuilt Keras
    optimizer and a model that keeps Keras' own ``train_step`` (a custom one
    may apply the optimizer to other variables).
    """
    from keras.src.backend import name_scope
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    optimizer = getattr(model, "optimizer", None)
    if not isinstance(optimizer, keras.optimizers.Optimizer) or optimizer.built \
            or "train_step" in vars(model) \
            or type(model).train_step is not TensorFlowTrainer.train_step \
            or not model.trainable_weights:
        return False
    with name_scope(optimizer.name, caller=optimizer):  # as Optimizer.apply does
        optimizer.build(model.trainable_weights)
    optimizer.built = True
    return True


class Fused:
    """What the fused train functions of every backend share: put in place by
    :meth:`install` (each fit), taken out by :meth:`restore`; set
    :attr:`wanted` and the next train call runs the probes, whose outputs
    :meth:`take` then returns. Subclasses build ``_fused`` and ``__call__``."""

    def __init__(self, model: keras.Model, recorder: keras.Model):
        self._model = model
        self.recorder = recorder
        self._plain = model.train_function
        #: How often the fused step was traced (1 unless batch shapes change).
        self.traces = 0
        self._outputs: tuple | None = None
        self.wanted = False
        #: TensorFlow: the data iterator of the last call (see :mod:`.reaper`).
        self._iterator: Any = None

    def install(self) -> bool:
        """Wrap the model's train function. False if it is no longer the one
        this was built beside (the model was compiled again): build anew then."""
        if self._model.train_function is not self._plain:
            return False
        self._model.train_function = self
        return True

    def take(self) -> tuple[list, float | None] | None:
        """(probe activations, learning rate or None) of the last fused call,
        NumPy arrays; None if no fused call ran since."""
        taken, self._outputs = self._outputs, None
        if taken is None:
            return None
        outputs, rate = taken
        # TensorFlow's and JAX's arrays convert themselves (np.array copies, as
        # keras.ops.convert_to_numpy does, without its per-call checks).
        rate = float("nan") if rate is None else float(np.array(rate))
        return [np.array(o) for o in outputs], (None if rate != rate else rate)

    def restore(self) -> None:
        """Give the model back its own train function."""
        if self._model.train_function is self:
            self._model.train_function = self._plain
        self.wanted, self._outputs = False, None
        iterator, self._iterator = self._iterator, None
        if iterator is not None:  # fit drops its own reference as it returns
            reaper.release(iterator, after=reaper.AFTER_FIT)


class FusedProbePass(Fused):
    """TensorFlow's fused train function for ``model``.

    :meth:`take` returns what ``graph`` gives (by default one array per
    output of ``recorder``; with saliency or Grad-CAM, their maps after them)
    and the learning rate. Built once and reused by later fits, so it is
    traced once.
    """

    def __init__(self, model: keras.Model, recorder: keras.Model, probes: Any,
                 like: list, graph: Callable[[], tuple] | None = None):
        """``like``: one snapshot as the probe pass returns it (arrays, then the
        saliency maps), for the shapes and dtypes of the skipped branch;
        ``graph()``: what runs on the probes (default: ``recorder`` on ``probes``)."""
        import tensorflow as tf

        super().__init__(model, recorder)
        constant = tf.nest.map_structure(tf.constant, probes)  # an array, or one per input
        # Under XLA both branches of a cond have one static shape: the skipped
        # branch returns zeros of the full shape. Otherwise empty tensors (no
        # memset per unrecorded step).
        xla = bool(getattr(model, "jit_compile", False))
        empty = [(tuple(a.shape) if xla else (0,) * len(a.shape), a.dtype) for a in like]
        self._flag = tf.Variable(False, trainable=False, name="layerwatch_wanted")
        self._flag_value = False

        def probe():
            if graph is not None:
                return tuple(graph())
            outputs = recorder(constant, training=False)
            return tuple(outputs) if isinstance(outputs, (list, tuple)) else (outputs,)

        def skip():
            return tuple(tf.zeros(shape, dtype) for shape, dtype in empty)

        def step(data):
            self.traces += 1  # Python runs here only while TensorFlow traces
            # Before the train step in program order: TensorFlow's automatic
            # control dependencies make these reads see the weights the step
            # starts from, and the update wait for them.
            outputs = tf.cond(self._flag, probe, skip)
            # The learning rate at the same step, read here rather than by a
            # separate (and, per step, costly) variable read.
            rate = getattr(model.optimizer, "learning_rate", None)
            rate = tf.constant(float("nan")) if rate is None else tf.cast(rate, tf.float32)
            return model.train_step(data), (outputs, rate)

        self._fused = model._make_function(step)

    def install(self) -> bool:
        """As :meth:`Fused.install`; also builds the optimizer (see
        :func:`build_optimizer`) before the fit's first train call."""
        installed = super().install()
        if installed:
            build_optimizer(self._model)
        return installed

    def __call__(self, iterator):
        if iterator is not self._iterator:
            # Keras has moved on to a new epoch's iterator: the old one is
            # destroyed on the reaper's thread, not in the training loop.
            if self._iterator is not None:
                reaper.release(self._iterator)
            self._iterator = iterator
        wanted, self.wanted = self.wanted, False
        if wanted != self._flag_value:  # a variable write only when it changes
            self._flag.assign(wanted)
            self._flag_value = wanted
        logs, outputs = self._fused(iterator)
        if wanted:
            self._outputs = outputs
        return logs


class DeferredSnapshot:
    """The snapshot of step ``k``, which the fused train call of step ``k + 1`` computes.

    :meth:`defer` holds the step's bookkeeping (its epoch, analysis Grams and
    batch logs) and asks the fused pass for the next call; :meth:`take`
    hands it back with the activations that call computed.
    """

    def __init__(self, fused: Fused):
        self.fused = fused
        self._held: tuple[int, int, list | None, dict] | None = None

    @property
    def pending(self) -> bool:
        return self._held is not None

    def defer(self, step: int, epoch: int, grams: list | None, logs: dict) -> None:
        self._held = (step, epoch, grams, logs)
        self.fused.wanted = True

    def take(self, separate: Callable[[], tuple[list, float | None]] | None = None
             ) -> tuple[int, int, list | None, float | None, list | None, dict]:
        """``(step, epoch, arrays, learning rate, grams, logs)`` of the held snapshot.

        ``arrays`` is None when no fused call ran since :meth:`defer` (the
        model's train function was replaced) and no ``separate`` probe pass
        was given to take the snapshot now, on the weights of its step still.
        """
        (step, epoch, grams, logs), self._held = self._held, None
        taken = self.fused.take()
        if taken is None and separate is not None:
            self.fused.wanted = False
            taken = separate()
        arrays, rate = taken if taken is not None else (None, None)
        return step, epoch, arrays, rate, grams, logs

    def drop(self) -> None:
        self._held = None
