"""JAX: run the probes on the train loop's own state, without syncing it back.

During a JAX ``fit`` Keras keeps the weights in a functional state that it
passes from one jitted train step to the next. The model's variables get it
back only at an epoch's end, or whenever a callback reads ``Callback.model``
(``jax_state_sync``: every variable, the optimizer's too, assigned — and
gathered and purged again before the next step). A probe pass that reads
``self.model`` at every recorded step pays that round trip every step, and
Keras' ``predict_on_batch`` adds its own per-call work on top.

:class:`JaxState` instead hands a sub-model of the model (the recorder, the
Gram extractor) the values the train loop holds right now, and runs it with
``stateless_call`` inside one ``jax.jit`` compiled once. Which values are
current follows Keras' own rule: the variables while ``_jax_state_synced``
(between epochs, or after another callback synced), the loop's state
otherwise. Nothing is written back; the train loop is left as it was.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import keras


class JaxState:
    """The JAX train loop's current values for ``model``, and functions over them."""

    def __init__(self, model: keras.Model):
        self.model = model
        self._rate: Callable[[list], Any] | None = None  # compiled at first use

    def values(self) -> tuple[list, list, list]:
        """(trainable, non-trainable, optimizer) values as the train loop has them now."""
        model = self.model
        state = getattr(model, "_jax_state", None)
        if not state or getattr(model, "_jax_state_synced", True) or \
                state.get("trainable_variables") is None:
            optimizer = getattr(model, "optimizer", None)
            return ([v.value for v in model.trainable_variables],
                    [v.value for v in model.non_trainable_variables],
                    [v.value for v in optimizer.variables] if optimizer is not None else [])
        return (list(state["trainable_variables"]),
                list(state.get("non_trainable_variables") or []),
                list(state.get("optimizer_variables") or []))

    def values_for(self, sub: keras.Model) -> Callable[[], tuple[list, list]] | None:
        """A function giving ``sub``'s (trainable, non-trainable) values now, in
        ``sub``'s own variable order; None if ``sub`` holds a variable the model
        does not."""
        picks = variable_picks(self.model, sub)
        if picks is None:
            return None

        def current():
            return picked(self.values(), picks)
        return current

    def function(self, sub: keras.Model) -> Callable[[Any], Any]:
        """``sub``'s inference-mode outputs for an input, on the current values
        (a :class:`_Compiled`; its :meth:`~_Compiled.at` takes given values).

        If ``sub`` holds a variable the model does not, only a state sync
        gives it the right values: then the state is synced first and Keras'
        predict step runs."""
        import jax

        model = self.model
        picks = variable_picks(model, sub)
        if picks is None:
            def synced(x):
                model.jax_state_sync()
                return sub.predict_on_batch(x)
            return synced

        def run(trainable, non_trainable, x):
            outputs, _ = sub.stateless_call(trainable, non_trainable, x, training=False)
            return outputs

        return _Compiled(jax.jit(run), self, picks, sub)

    def learning_rate(self, values: Any = None) -> float | None:
        """The optimizer's learning rate at the current state (a schedule evaluated
        at the current step), or at the model's ``values`` given (as
        :meth:`values` returns them); None without one."""
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None or getattr(optimizer, "learning_rate", None) is None:
            return None
        if self._rate is None:
            import jax

            self._rate = jax.jit(lambda values: learning_rate_at(optimizer, values))
        return float(self._rate((self.values() if values is None else values)[2]))


class _Compiled:
    """``sub``'s jitted inference call on the current values; :meth:`warm`
    compiles it ahead, in a thread of its own."""

    def __init__(self, jitted: Callable, state: JaxState, picks: Picks, sub: keras.Model):
        self._jitted = jitted
        self._state = state
        self._picks = picks
        self._sub = sub
        self._feed: list = [None, None]  # the last input and its device copy (the probes)
        self._warming: threading.Thread | None = None

    def __call__(self, x):
        return self.at(self._state.values(), x)

    def at(self, values: Any, x: Any):
        """``sub``'s outputs for ``x`` on the model's ``values`` = (trainable,
        non-trainable, …), as :meth:`JaxState.values` gives them or as the
        train loop's state holds them."""
        import jax

        if self._warming is not None:
            self._warming.join()  # a compile under way: waiting is no slower than compiling
            self._warming = None
        if self._feed[0] is not x:
            self._feed[:] = [x, jax.tree_util.tree_map(jax.numpy.asarray, x)]
        return self._jitted(*picked(values, self._picks), self._feed[1])

    def warm(self, x: Any) -> None:
        """Start compiling the call for inputs like ``x`` in a daemon thread.

        Compiling from shapes alone (``lower(...).compile()``, JAX's
        ahead-of-time path, which fills the cache the jitted call then hits)
        touches no buffer of the train loop, and XLA compiles without holding
        the GIL: it runs beside the first train step's own compile, on the
        other core. A failure here only means the first call compiles."""
        import jax

        def spec(values):
            return [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in values]

        sub = self._sub
        args = (spec(sub.trainable_variables), spec(sub.non_trainable_variables),
                jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), x))

        def compile_ahead():
            try:
                self._jitted.lower(*args).compile()
            except Exception:
                pass

        self._warming = threading.Thread(target=compile_ahead, name="layerwatch-compile",
                                         daemon=True)
        self._warming.start()


Picks = tuple[list[tuple[int, int]], list[tuple[int, int]]]


def variable_picks(model: keras.Model, sub: keras.Model) -> Picks | None:
    """Where ``sub``'s trainable and non-trainable variables sit in ``model``'s
    (which list: 0 trainable, 1 non-trainable; the index in it); None if
    ``sub`` holds a variable the model does not."""
    where = {id(v): (0, i) for i, v in enumerate(model.trainable_variables)}
    where.update({id(v): (1, i) for i, v in enumerate(model.non_trainable_variables)})
    try:
        return ([where[id(v)] for v in sub.trainable_variables],
                [where[id(v)] for v in sub.non_trainable_variables])
    except KeyError:
        return None


def picked(values: Any, picks: Picks) -> tuple[list, list]:
    """``sub``'s (trainable, non-trainable) values out of the model's
    ``values`` = (trainable, non-trainable, …), by :func:`variable_picks`."""
    return ([values[k][i] for k, i in picks[0]], [values[k][i] for k, i in picks[1]])


def learning_rate_at(optimizer: Any, values: list) -> Any:
    """The optimizer's learning rate (float32) with its variables at ``values``
    (a schedule evaluated at that state's step); traceable under ``jax.jit``."""
    mapping = list(zip(optimizer.variables, values))
    with keras.StatelessScope(state_mapping=mapping):
        return keras.ops.cast(optimizer.learning_rate, "float32")
