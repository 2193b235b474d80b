"""PyTorch: the probe pass of several steps in one replay.

On a small model the replayed probe pass (:mod:`~layerwatch.record.torch_trace`)
spends more in each op's fixed cost than in arithmetic: the seed model's six
convolutions of 4-16 channels take 40-60 µs each for a few microseconds of
multiply-adds. :class:`BatchedReplay` keeps a copy of the model's weights at
each recorded step (about 0.04 ms) and replays the traced graph once for up
to :data:`SLOTS` of them: each convolution becomes one grouped convolution
with the copies' kernels side by side, each pooling and pointwise op runs on
all the copies at once (seed model, back to back: 0.27 against 0.57 ms a
step, ``bench/torch_replay.py``).

What is replayed together must give the bits the single replay gives, which
is itself checked against Keras' own pass:

- only a graph made of the ops below is batched (no transposed convolutions,
  no dense layer before a recorded one), and only where :data:`_MIN_SLOTS`
  copies of the weights and outputs fit in :data:`MAX_BYTES`;
- a pointwise op outside :data:`_EXACT` must give the same bits on a strided
  tensor as on a contiguous one: PyTorch computes most of a contiguous tensor
  a vector at a time and the rest, like a strided one, an element at a time,
  sometimes by another formula (here: sigmoid, GELU, ELU, SiLU, softplus,
  Mish), so an element's bits could depend on where it sits;
- the first release compares the first and the last copy's outputs with the
  single replay of that copy (each copy's part of a grouped convolution runs
  the same code); if they differ, those steps get the single replays' numbers.

The second release is timed against the single replays the first one ran; if
it is not clearly faster (:data:`FASTER`), steps are replayed one by one from
then on. Either way, and wherever a rule is missing, the recording is the same.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

#: Copies of the weights held for one batched replay. 16 is the fastest here
#: (seed model, back to back: 8 copies 0.37, 16 0.29, 32 0.44 ms a step).
SLOTS = 16

#: A batched replay must take at most this share of the single replays' time.
FASTER = 0.8

#: At most this many bytes of held weights and of the batched replay's
#: outputs together; a model that cannot hold 8 copies is replayed step by step
#: (its replay is arithmetic, which batching does not save: MobileNetV2 at
#: 32x32, 4 copies, took 1.45 times as long a step).
MAX_BYTES = 64 << 20
_MIN_SLOTS = 8

#: Ops that act on each element (or each pair of broadcast elements) alone.
_POINTWISE = frozenset({
    "tanh", "relu", "sigmoid", "to", "gelu", "silu", "elu", "selu", "leaky_relu",
    "hardtanh", "relu6", "hardsigmoid", "hardswish", "softplus", "softsign", "mish", "exp",
    "log", "neg", "abs", "sqrt", "rsqrt", "reciprocal", "square", "pow", "clamp", "clamp_min",
    "clamp_max", "add", "sub", "rsub", "mul", "div", "maximum", "minimum", "where",
})
#: Pointwise ops whose result is the one exact answer (a comparison, a cast,
#: a sign, a product), wherever the element sits.
_EXACT = frozenset({"relu", "relu6", "to", "neg", "abs", "mul", "maximum", "minimum",
                    "clamp", "clamp_min", "clamp_max", "hardtanh", "where"})
#: Ops on (batch, channels, *spatial) tensors, each channel alone.
_POOLING = frozenset({
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
})


class Unbatchable(Exception):
    """The graph has an op that cannot be replayed for several copies at once."""


class BatchedReplay:
    """A traced probe pass replayed for several held copies of its state at once.

    Parameters
    ----------
    graph : torch.Graph
        The traced function's (inlined) graph: its inputs are the probes, then
        the model's state tensors.
    function : callable
        The traced function, ``function(*probes, *state)``: the single replay.
    probes, state : tuples of tensors
        The probes the graph was traced on, and the state tensors (parameters
        and buffers) whose values :meth:`hold` copies.
    outputs : list of numpy arrays
        One replay's outputs, for the size of a slot.

    Raises
    ------
    Unbatchable
        If an op has no rule or may depend on where an element sits, or the
        copies would not fit.
    """

    def __init__(self, graph: Any, function: Callable[..., Any], probes: tuple,
                 state: tuple, outputs: list[np.ndarray]):
        import torch

        per_slot = sum(t.numel() * t.element_size() for t in state) + \
            sum(a.nbytes for a in outputs)
        self.slots = min(SLOTS, MAX_BYTES // max(per_slot, 1))
        if self.slots < _MIN_SLOTS:
            raise Unbatchable(f"{per_slot / 2**20:.1f} MiB of weights and outputs a step: "
                              f"fewer than {_MIN_SLOTS} steps fit in {MAX_BYTES >> 20} MiB")
        self._program = _Program(graph, len(probes))
        self._function = function
        self._probes = probes
        self._state = list(state)
        # Every slot starts as a copy of the weights: slots a release finds
        # unused are computed too, and must not hold garbage (denormals are slow).
        with torch.no_grad():
            self._stacks = [t.detach().expand(self.slots, *t.shape).clone() for t in state]
        self._views = [[stack[k] for stack in self._stacks] for k in range(self.slots)]
        self.held = 0
        self._single: float | None = None  # seconds of one single replay, once checked
        #: Whether a release has been timed against the single replays.
        self.timed = False
        #: Why steps are no longer replayed together, or None.
        self.failed: str | None = None

    def hold(self) -> None:
        """Copy the state as it stands into the next free slot (there must be one)."""
        import torch

        with torch.no_grad():
            torch._foreach_copy_(self._views[self.held], self._state)
        self.held += 1

    def release(self) -> list[list[np.ndarray]]:
        """The probe pass on every held copy, in the order they were held (per
        copy, one array per output, possibly strided), and the slots freed."""
        import torch

        held, self.held = self.held, 0
        if not held:
            return []
        with torch.no_grad(), torch.jit.optimized_execution(False):
            start = time.perf_counter()
            try:
                outputs = self._program.run((*self._probes, *self._stacks), self.slots)
            except Exception as exc:  # a rule that does not hold, found as it runs
                outputs, self.failed = None, f"{type(exc).__name__}: {exc}"
            took = time.perf_counter() - start
            if outputs is not None and self._single is None:
                outputs = self._check(outputs, held)
            elif outputs is not None and not self.timed:
                self.timed = True
                if took > FASTER * self.slots * self._single:
                    self.failed = (f"no faster here: {took / self.slots * 1e3:.2f} ms a step "
                                   f"together, {self._single * 1e3:.2f} ms alone")
            if outputs is None:
                return [[t.numpy() for t in self._function(*self._probes, *self._views[k])]
                        for k in range(held)]
        # Views, not copies: the writer stacks each layer's snapshots into a
        # block anyway, on its own thread.
        arrays = [out.numpy() for out in outputs]
        return [[a[k] for a in arrays] for k in range(held)]

    def _check(self, outputs: list[Any], held: int) -> list[Any] | None:
        """``outputs`` if the first and the last held copy's parts are what the
        single replay gives on them, else None (and :attr:`failed` set)."""
        times = []
        for k in sorted({0, held - 1}):
            start = time.perf_counter()
            single = self._function(*self._probes, *self._views[k])
            times.append(time.perf_counter() - start)
            if not all(_same(out[k], t) for out, t in zip(outputs, single)):
                self.failed = "the batched replay differs from the single one"
                return None
        self._single = min(times)
        return outputs


class _Program:
    """A graph's op nodes with their rules, ready to run on the copies.

    Values computed from the state carry the copies along a new first axis
    (they are *batched*); the probes, constants and shapes do not. An op runs
    as it is when none of its inputs is batched, and by its rule otherwise.
    """

    def __init__(self, graph: Any, unbatched_inputs: int):
        import torch

        self._graph = graph
        self._unbatched = unbatched_inputs
        self._constants: dict[Any, Any] = {}
        self._steps: list[tuple[str, Any, list, Any, _Arguments | None]] = []
        for node in graph.nodes():
            kind = node.kind()
            inputs = list(node.inputs())
            outputs = list(node.outputs())
            if kind == "prim::Constant":
                value = outputs[0]
                self._constants[value] = None if value.type().kind() == "NoneType" \
                    else value.toIValue()
            elif kind == "prim::ListConstruct" and all(v in self._constants for v in inputs):
                self._constants[outputs[0]] = [self._constants[v] for v in inputs]
            elif len(outputs) != 1:
                raise Unbatchable(f"{kind} has {len(outputs)} outputs")
            elif kind in ("prim::ListConstruct", "prim::TupleConstruct"):
                self._steps.append((kind, outputs[0], inputs, None, None))
            elif kind == "prim::NumToTensor":  # shape arithmetic
                self._steps.append((kind, outputs[0], inputs, _number_tensor,
                                    _Arguments(None)))
            elif kind.startswith("aten::"):
                name = kind[len("aten::"):]
                arguments = _Arguments(torch._C.parse_schema(node.schema()))
                if name.endswith("_") and name[:-1] in _POINTWISE:
                    # In place on a temporary nothing reads again: its out-of-place twin.
                    if len(inputs[0].uses()) != 1:
                        raise Unbatchable(f"{kind} on a tensor read again")
                    name = name[:-1]
                op = getattr(torch.ops.aten, name)
                if name in _POINTWISE and name not in _EXACT:
                    self._check_position_free(name, op, arguments, inputs)
                self._steps.append((name, outputs[0], inputs, op, arguments))
            else:
                raise Unbatchable(kind)

    def run(self, inputs: tuple, slots: int) -> list[Any]:
        """The graph's outputs, each with the copies along its first axis."""
        values = dict(self._constants)
        batched: dict[Any, Any] = {}
        for i, (value, tensor) in enumerate(zip(self._graph.inputs(), inputs)):
            values[value] = tensor
            batched[value] = i >= self._unbatched
        for name, out, inputs_, op, arguments in self._steps:
            args = [values[v] for v in inputs_]
            flags = [batched.get(v, False) for v in inputs_]
            if name in ("prim::ListConstruct", "prim::TupleConstruct"):
                values[out], batched[out] = args, (flags if any(flags) else False)
            elif not any(flags):
                values[out], batched[out] = arguments.call(op, args), False
            else:
                values[out] = _batched(name, op, args, flags, arguments, inputs_, slots)
                batched[out] = name != "size"  # a copy's size is every copy's
        outputs = []
        for value in self._graph.outputs():
            items, flags = values[value], batched[value]
            if not isinstance(items, list):
                items, flags = [items], [flags]
            outputs += [t if f else t.expand(slots, *t.shape) for t, f in zip(items, flags)]
        return outputs

    def _check_position_free(self, name: str, op: Any, arguments: "_Arguments",
                             inputs: list) -> None:
        """Raise :class:`Unbatchable` unless op ``name`` gives the same bits on
        strided inputs (computed an element at a time) as on contiguous ones
        (mostly a vector at a time), on random numbers shaped as traced."""
        import torch

        generator = torch.Generator().manual_seed(0)
        dense, strided = [], []
        for value in inputs:
            if value in self._constants:
                dense.append(self._constants[value])
                strided.append(self._constants[value])
                continue
            kind = value.type()
            if not isinstance(kind, torch.TensorType) or kind.sizes() is None \
                    or kind.dtype() is None:
                raise Unbatchable(f"aten::{name} on an operand of unknown shape")
            sizes, dtype = kind.sizes(), kind.dtype()
            tensor = (torch.randn(sizes, generator=generator) * 4).to(dtype) \
                if dtype.is_floating_point else torch.zeros(sizes, dtype=dtype)
            spread = torch.empty(2 * tensor.numel(), dtype=dtype)
            spread[::2] = tensor.reshape(-1)
            dense.append(tensor)
            strided.append(spread.as_strided(tensor.shape, [2 * s for s in tensor.stride()]))
        if not _same(arguments.call(op, dense), arguments.call(op, strided)):
            raise Unbatchable(f"aten::{name} gives other bits for elements computed one "
                              "at a time")


def _batched(name: str, op: Any, args: list, flags: list, arguments: "_Arguments",
             values: list, slots: int) -> Any:
    """Op ``name`` on ``args``, some of them carrying the copies along axis 0
    (``values``: the graph's values of the args, for their traced layouts)."""
    if any(isinstance(f, list) for f in flags):
        if name != "cat":
            raise Unbatchable(f"aten::{name} on a list of tensors")
        tensors = [t if f else t.expand(slots, *t.shape) for t, f in zip(args[0], flags[0])]
        return op(tensors, args[1] % (tensors[0].dim() - 1) + 1)
    if any(flags[1:]) and name not in _POINTWISE and name != "_convolution":
        raise Unbatchable(f"aten::{name} with the copies in a later operand")
    if name in _POINTWISE:
        return arguments.call(op, _aligned(args, flags))
    if name == "size":
        return args[0].shape[args[1] % (args[0].dim() - 1) + 1]
    if name in ("reshape", "view"):
        return args[0].reshape(args[0].shape[0], *args[1])
    if name == "permute":
        rank = args[0].dim() - 1
        return args[0].permute([0] + [d % rank + 1 for d in args[1]])
    if name == "contiguous":
        return args[0]  # the layouts that matter are made where they do (_fold)
    if name in ("constant_pad_nd", "pad"):
        return arguments.call(op, args)
    if name in _POOLING:
        return _unfold(op(_fold(args[0], 1, values[0], slots), *args[1:]), slots, 1)
    if name == "_convolution":
        return _convolution(op, args, flags, values, slots)
    raise Unbatchable(f"aten::{name} on the weights' copies")


def _convolution(op: Any, args: list, flags: list, values: list, slots: int) -> Any:
    """One grouped convolution for all the copies (``aten::_convolution``'s arguments)."""
    x, weight, bias = args[:3]
    transposed, groups = args[6], args[8]
    if transposed or not flags[1] or any(flags[3:]):
        raise Unbatchable("a transposed convolution, or one with a fixed kernel")
    kernel = _fold(weight, 0, values[1], slots)
    if bias is not None:
        bias = bias.reshape(-1) if flags[2] else bias.repeat(slots)
    if flags[0]:
        x, groups = _fold(x, 1, values[0], slots), groups * slots
    elif groups != 1:
        x, groups = _fold(x.expand(slots, *x.shape), 1, values[0], slots), groups * slots
    return _unfold(op(x, kernel, bias, *args[3:8], groups, *args[9:]), slots, 1)


def _fold(x: Any, axis: int, value: Any, slots: int) -> Any:
    """``x`` (copies, *shape) as one tensor with the copies side by side along
    ``axis`` (copy-major), laid out in memory as the traced graph laid out
    ``value``: an op then sees each copy's part as it saw the single one."""
    strides = value.type().strides()
    if strides is None or len(strides) != x.dim() - 1:
        raise Unbatchable("a tensor without a traced layout")
    order = sorted(range(len(strides)), key=lambda d: (-strides[d], d))
    memory = []
    for d in order:
        memory += [0, d + 1] if d == axis else [d + 1]
    folded = x.permute(memory).contiguous()
    folded = folded.view([slots * x.shape[d + 1] if d == axis else x.shape[d + 1]
                          for d in order])
    return folded.permute([order.index(d) for d in range(len(order))])


def _unfold(y: Any, slots: int, axis: int) -> Any:
    """The inverse of :func:`_fold`: the copies back along a first axis (a view)."""
    return y.unflatten(axis, (slots, y.shape[axis] // slots)).movedim(axis, 0)


def _aligned(args: list, flags: list) -> list:
    """Pointwise operands broadcast as in the single replay: each batched one
    gets size-1 axes after its copies' axis up to the widest operand's rank."""
    import torch

    rank = max(a.dim() - 1 if f else a.dim()
               for a, f in zip(args, flags) if isinstance(a, torch.Tensor))
    return [a.reshape(a.shape[0], *[1] * (rank - a.dim() + 1), *a.shape[1:])
            if f and a.dim() - 1 < rank else a for a, f in zip(args, flags)]


class _Arguments:
    """How a node's inputs are passed to its op: TorchScript lists them all in
    order, a Python call needs the keyword-only ones by name, and memory
    formats (integers in the graph) as ``torch.memory_format``."""

    def __init__(self, schema: Any):
        import torch

        self._plain = True
        if schema is None:
            return
        formats = {0: torch.contiguous_format, 1: torch.preserve_format,
                   2: torch.channels_last, 3: torch.channels_last_3d}
        self._keywords = [a.name if a.kwarg_only else None for a in schema.arguments]
        self._formats = [formats if "MemoryFormat" in str(a.type) else None
                         for a in schema.arguments]
        self._plain = not any(self._keywords) and not any(self._formats)

    def call(self, op: Any, args: list) -> Any:
        if self._plain:
            return op(*args)
        args = [f[a] if f is not None and isinstance(a, int) else a
                for a, f in zip(args, self._formats)]
        return op(*[a for a, k in zip(args, self._keywords) if k is None],
                  **{k: a for a, k in zip(args, self._keywords) if k is not None})


def _number_tensor(number: Any) -> Any:
    """``prim::NumToTensor``: a Python number as a 0-d tensor."""
    import torch

    return torch.scalar_tensor(number, dtype=torch.long if isinstance(number, int)
                               else torch.double)


def _same(a: Any, b: Any) -> bool:
    """Same shape, dtype and values, NaN where the other has NaN."""
    import torch

    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a, b) or bool(((a == b) | (a.isnan() & b.isnan())).all())
