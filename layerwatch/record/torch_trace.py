"""PyTorch: the probe pass as one traced graph instead of Keras' eager forward.

On PyTorch, Keras runs a model eagerly, layer by layer, and its per-layer
Python work (call context, autocast scope, input checks) costs more than the
probes' own arithmetic: on the seed model 2.8 ms a pass through
``predict_on_batch`` against 0.8 ms for the same ops replayed from a graph
(2-core CPU). :class:`TracedProbes` records the ops of one inference call on
the probes with ``torch.jit.trace`` and replays them at every step.

The traced function takes the model's parameters and buffers as inputs and
is handed the same tensor objects at every call (Keras assigns a torch
variable in place, ``Parameter.copy_``), so each replay reads the weights as
they stand. It is built on the first call and checked against Keras' own
forward pass there; any failure or difference, and any input other than the
probes it was traced on, falls back to ``predict_on_batch``.

The replay leaves out work Keras' PyTorch ops do that changes no value
(:mod:`~layerwatch.record.torch_graph`): the copies of each convolution's and
pooling's input into NCHW, and each convolution's separate bias addition where
its kernel adds the bias the same way (0.75 against 0.48 ms a pass on the seed
model, ``bench/torch_replay.py``). The lean graph passes the same check
against Keras' pass; if it fails, the trace as recorded is checked and used
instead. No other TorchScript pass is run: its profiling and fusion passes
cost 35 ms at the first replays and nothing less per step after.

On a small model several steps are replayed at once (:meth:`TracedProbes.hold`
keeps each step's weights, :meth:`TracedProbes.release` replays them together:
:mod:`~layerwatch.record.torch_batch`), with the same numbers.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import keras
import numpy as np

from . import torch_batch, torch_graph
from .probe_pass import _numpy


class TracedProbes:
    """``extractor``'s inference call on the probes, replayed from a trace."""

    def __init__(self, extractor: keras.Model):
        self._extractor = extractor
        self._fallback: Callable[[Any], Any] = extractor.predict_on_batch
        self._traced: Any = None
        self._input: Any = None   # the probes the trace was made on (identity)
        self._tensors: Any = None
        self.failed: str | None = None  # why the trace is not used, once tried
        self._single = False  # Keras' pass returns one array, not a list of them
        #: Whether the replayed graph is the lean one (:mod:`.torch_graph`).
        self.lean = False
        #: How many convolutions of the lean graph add their own bias.
        self.fused_biases = 0
        self._batch: torch_batch.BatchedReplay | None = None
        #: Why steps are not replayed together (:meth:`hold`), once tried.
        self.unbatched: str | None = None

    def __call__(self, x: Any):
        if self._traced is None and self.failed is None:
            self._trace(x)
        if self._traced is None or x is not self._input:
            return self._fallback(x)
        arrays = _replay(self._traced, self._tensors)
        return arrays[0] if self._single else arrays

    @property
    def slots(self) -> int:
        """How many steps :meth:`hold` can keep for one :meth:`release` (0: none)."""
        batch = self._batch
        return batch.slots if batch is not None and batch.failed is None else 0

    def hold(self) -> bool:
        """Keep a copy of the weights as they stand, for the next :meth:`release`
        to replay with the others (:mod:`.torch_batch`); False where steps are
        not replayed together (:attr:`unbatched` says why) or the slots are
        full: then call this on the probes as usual."""
        if self._batch is None and self.unbatched is None:
            self._batch_up()
        batch = self._batch
        if batch is None or batch.failed is not None or batch.held >= batch.slots:
            return False
        batch.hold()
        return True

    def release(self) -> list[list[np.ndarray]]:
        """The probe pass on each copy :meth:`hold` kept, in order: one list of
        arrays per copy, one per output; the copies are freed."""
        batch = self._batch
        if batch is None:
            return []
        snapshots = batch.release()
        if batch.failed is not None:
            self.unbatched = batch.failed
        return snapshots

    def _batch_up(self) -> None:
        if self._traced is None:
            self.unbatched = self.failed or "not traced"
            return
        traced = self._traced
        try:
            self._batch = torch_batch.BatchedReplay(
                traced.graph, traced.function, self._tensors, traced.state,
                _replay(traced, self._tensors))
        except torch_batch.Unbatchable as exc:
            self.unbatched = str(exc)
        except Exception as exc:  # a saving, never a reason to stop recording
            self.unbatched = f"{type(exc).__name__}: {exc}"

    def _trace(self, x: Any) -> None:
        """Trace the call on ``x``: the lean graph if that gives Keras' numbers,
        else the trace as recorded; neither (:attr:`failed` says why): Keras' pass."""
        extractor = self._extractor
        inputs = list(x) if isinstance(x, (list, tuple)) else [x]
        tensors = tuple(keras.ops.convert_to_tensor(a) for a in inputs)
        want = keras_out = None
        for lean in (True, False):
            try:
                traced = _trace(extractor, tensors)
            except Exception as exc:  # anything TorchScript cannot follow
                self.failed = f"{type(exc).__name__}: {exc}"
                return
            try:
                fused = 0
                if lean:
                    torch_graph.drop_copies(traced.graph)
                    fused = torch_graph.fuse_conv_biases(traced.graph)
                got = _replay(traced, tensors)
                if want is None:
                    keras_out = self._fallback(x)
                    want = _numpy(keras_out)
            except Exception as exc:
                self.failed = f"{type(exc).__name__}: {exc}"
                continue
            if len(got) == len(want) and all(
                    g.shape == w.shape and g.dtype == w.dtype and np.array_equal(g, w)
                    for g, w in zip(got, want)):
                self._traced, self._input, self._tensors = traced, x, tensors
                self._single = not isinstance(keras_out, (list, tuple))
                self.failed, self.lean, self.fused_biases = None, lean, fused
                return
            self.failed = "the traced graph differs from Keras' forward pass"


class _Trace:
    """A traced function of the probes and the model's state, called on the probes.

    The model's parameters and buffers are the function's trailing inputs and
    are passed as the same tensor objects at every call: Keras assigns a torch
    variable in place (``Parameter.copy_``), so each call reads the weights as
    they stand.
    """

    def __init__(self, function: Any, state: tuple):
        #: The traced function, ``function(*inputs, *state)``.
        self.function = function
        #: The model's parameters and buffers, as the function takes them.
        self.state = state

    @property
    def graph(self) -> Any:
        """The function's TorchScript graph (flat: the trace records no module calls)."""
        return self.function.graph

    def __call__(self, *inputs: Any) -> Any:
        return self.function(*inputs, *self.state)


def _trace(extractor: keras.Model, tensors: tuple) -> _Trace:
    """``torch.jit.trace`` of ``extractor``'s inference call on ``tensors``.

    A function is traced, not a module: a module's trace records each
    submodule's call as a scope of its own and then lifts the scopes into
    methods, about a fifth of the trace's time (seed model: 59 → 45 ms a
    trace). The model's state tensors are the function's own inputs, so the
    trace holds none of them as a constant.
    """
    import torch

    state = tuple({id(t): t for t in (*extractor.parameters(), *extractor.buffers())}.values())
    count = len(tensors)

    def forward(*args):
        inputs = list(args[:count])
        outputs = extractor(inputs if count > 1 else inputs[0], training=False)
        return tuple(outputs) if isinstance(outputs, (list, tuple)) else (outputs,)

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's notes on Python values
        return _Trace(torch.jit.trace(forward, (*tensors, *state), check_trace=False), state)


def _replay(traced: Any, tensors: tuple) -> list[np.ndarray]:
    import torch

    with torch.no_grad(), torch.jit.optimized_execution(False):
        return _arrays(traced(*tensors))


def _arrays(outputs: Any) -> list[np.ndarray]:
    # NumPy arrays of the replay's own new tensors (nothing else writes them),
    # C-ordered: without its copies the graph may return a strided view.
    return [np.ascontiguousarray(t.cpu().numpy()) for t in outputs]
