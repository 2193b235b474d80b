"""PyTorch: rewrites of the traced probe pass's graph that keep its numbers.

:class:`~layerwatch.record.torch_trace.TracedProbes` replays a TorchScript
trace of Keras' forward pass. Keras' PyTorch ops do work there that a replay
can leave out without changing a value:

- :func:`drop_copies` removes the copies of each convolution's and pooling's
  input into NCHW (0.75 → 0.58 ms a pass on the seed model);
- :func:`fuse_conv_biases` hands each convolution its bias instead of adding
  it to the convolution's output afterwards (0.58 → 0.48 ms), where the
  convolution is small and its kernel is shown, at that convolution's shapes
  and layouts, to give the same bits both ways.

Both work on the inlined graph in place, before its first run; the caller
checks the rewritten graph against Keras' pass before using it.
"""

from __future__ import annotations

import math
from typing import Any

#: The largest convolution (multiply-adds over all the probes) that
#: :func:`fuse_conv_biases` gives its bias. On small tensors the separate
#: addition's fixed cost is a good part of the convolution's (seed model:
#: 0.58 → 0.48 ms a pass for six of them); on large ones it is lost in the
#: convolution's time, while the check of a new kernel configuration costs
#: milliseconds (ResNet50's 53 convolutions at 32x32: 0.4-0.5 s, for no gain).
FUSE_MAX_MULTIPLY_ADDS = 4_000_000

#: What :func:`_constant` returns for a value the graph computes.
_UNKNOWN = object()

#: ``torch.contiguous_format`` as a TorchScript graph holds it (c10's
#: ``MemoryFormat::Contiguous``; channels-last is 2).
_CONTIGUOUS_FORMAT = 0


def drop_copies(graph: Any) -> None:
    """Remove ``graph``'s copies into the default (NCHW) layout, in place.

    Keras' PyTorch backend copies every convolution's and pooling's NHWC input
    into a contiguous NCHW tensor (``contiguous()``), and then, for a
    convolution, into channels-last, which is the layout the NHWC tensor had
    in the first place. Without the first copy the second finds its input in
    channels-last already and makes none, so the convolution gets the tensor
    it gets in Keras' pass, in the same layout; a pooling reads channels-last.
    Copies into channels-last stay (the kernels' are still made). The graph is
    inlined first, so the nodes are all in one list.
    """
    import torch

    torch._C._jit_pass_inline(graph)
    for node in list(graph.nodes()):
        if node.kind() == "aten::contiguous" and \
                node.inputsAt(1).toIValue() == _CONTIGUOUS_FORMAT:
            node.output().replaceAllUsesWith(node.inputsAt(0))
            node.destroy()
    torch._C._jit_pass_dce(graph)


def fuse_conv_biases(graph: Any) -> int:
    """Give each convolution followed by its bias addition the bias itself, in
    place; returns how many were fused.

    Keras adds a convolution's bias as an op of its own
    (``ops.add(outputs, reshape(bias))``): on the seed model's small tensors
    that broadcast addition takes a third to a half of the convolution's
    time. The pattern is
    ``add(permute?(convolution(x, kernel, None, ...)), reshape(bias), 1)``
    with the bias one-dimensional over the convolution's output channels, in
    one dtype throughout, and nothing else reading the convolution's output.
    Such a convolution gets the bias only if it is small
    (:data:`FUSE_MAX_MULTIPLY_ADDS`) and :func:`_same_bits` shows that its
    kernel, run at its traced shapes and settings on random numbers, gives bit
    for bit what the convolution and the separate addition give
    (oneDNN adds the bias to the finished sum; a kernel that started its sum
    from the bias would round differently).
    """
    import torch

    torch._C._jit_pass_inline(graph)
    _drop_no_op_casts(graph)
    fused = 0
    for node in list(graph.nodes()):
        match = _bias_addition(node)
        if match is None:
            continue
        conv, permute, bias = match
        if _multiply_adds(conv) > FUSE_MAX_MULTIPLY_ADDS or \
                not _same_bits(conv, permute, node.inputsAt(1).node()):
            continue
        if not bias.node().isBefore(conv):  # a cast of the bias, traced after it
            conv.moveAfter(bias.node())
            if permute is not None:
                permute.moveAfter(conv)
        conv.replaceInput(2, bias)
        node.output().replaceAllUsesWith(node.inputsAt(0))
        node.destroy()
        fused += 1
    torch._C._jit_pass_dce(graph)
    return fused


def _drop_no_op_casts(graph: Any) -> None:
    """Remove ``aten::to`` nodes that return their input itself: same dtype,
    device and traced shape, no copy asked for, no memory format (Keras
    converts every operand it is handed; these sit between a convolution and
    its bias addition). A cast whose input has no traced shape stays: its
    output's shape is the one the graph knows."""
    import torch

    for node in list(graph.nodes()):
        if node.kind() != "aten::to":
            continue
        source, result = node.inputsAt(0), node.output()
        if not (_is_tensor(source) and _is_tensor(result)):
            continue
        try:
            copy = node.namedInput("copy").toIValue()
            layout = node.namedInput("memory_format").toIValue()
        except RuntimeError:  # another overload of ``to``
            continue
        if copy is False and layout is None and _sizes(source) is not None and \
                _sizes(source) == _sizes(result) and _dtype(source) == _dtype(result) and \
                source.type().device() == result.type().device():
            result.replaceAllUsesWith(source)
            node.destroy()
    torch._C._jit_pass_dce(graph)


def _bias_addition(node: Any):
    """``(convolution, permute or None, bias)`` if ``node`` adds a convolution's
    bias to its output as Keras does, else None."""
    if node.kind() != "aten::add" or _constant(node.inputsAt(2)) != 1:
        return None
    out, shaped = node.inputsAt(0), node.inputsAt(1)
    permute = out.node() if out.node().kind() == "aten::permute" else None
    conv_out = permute.inputsAt(0) if permute is not None else out
    conv = conv_out.node()
    if conv.kind() != "aten::_convolution" or _constant(conv.inputsAt(2)) is not None \
            or len(conv_out.uses()) != 1 or len(out.uses()) != 1:
        return None
    if shaped.node().kind() != "aten::reshape":
        return None
    bias = shaped.node().inputsAt(0)
    sizes = [_sizes(v) for v in (conv_out, bias, shaped)]
    dtypes = {_dtype(v) for v in (conv_out, bias, shaped, node.output())}
    if None in sizes or len(dtypes) != 1 or None in dtypes:
        return None
    conv_sizes, bias_sizes, shaped_sizes = sizes
    if len(conv_sizes) < 3 or bias_sizes != [conv_sizes[1]]:
        return None
    axis = 1
    if permute is not None:
        order = _ints(permute.inputsAt(1))
        if order is None or sorted(order) != list(range(len(conv_sizes))):
            return None
        axis = order.index(1)
    broadcast = [1] * len(conv_sizes)
    broadcast[axis] = conv_sizes[1]
    if shaped_sizes != broadcast:
        return None
    return conv, permute, bias


def _multiply_adds(conv: Any) -> float:
    """About how many multiply-adds ``conv`` does (its outputs times the kernel
    values each one reads); infinity where the traced shapes are unknown."""
    out, kernel = _sizes(conv.output()), _sizes(conv.inputsAt(1))
    if out is None or kernel is None or len(out) < 2 or out[1] == 0:
        return float("inf")
    return math.prod(out) * math.prod(kernel) / out[1]


def _same_bits(conv: Any, permute: Any, reshape: Any) -> bool:
    """Whether ``conv`` with a bias gives what it gives without one plus the
    bias added as the graph adds it, on random numbers at its traced shapes,
    dtypes and settings (a private generator: the user's random state is left
    alone).

    The input is tried in its traced layout and in both dense ones (channels
    first and last): with copies left out, the replay may hand the
    convolution a layout other than the one it was traced with, and the
    kernel a library picks can depend on it.
    """
    import torch

    args = [_constant(v) for v in list(conv.inputs())[3:]]
    order = None if permute is None else _ints(permute.inputsAt(1))
    shape = _ints(reshape.inputsAt(1))
    if any(a is _UNKNOWN for a in args) or shape is None or \
            (permute is not None and order is None):
        return False
    generator = torch.Generator().manual_seed(0)

    def like(value, scale=1.0, strides=None):
        t = value.type()
        out = torch.empty_strided(t.sizes(), strides or t.strides(), dtype=torch.float32)
        out.normal_(generator=generator)
        return (out * scale).to(t.dtype())

    try:
        sizes = _sizes(conv.inputsAt(0))
        rank = len(sizes)
        layouts = {tuple(conv.inputsAt(0).type().strides()),
                   _dense_strides(sizes, list(range(rank))),
                   _dense_strides(sizes, [0, *range(2, rank), 1])}
        kernel, bias = like(conv.inputsAt(1), 0.3), like(reshape.inputsAt(0))
        with torch.no_grad():
            for strides in layouts:
                x = like(conv.inputsAt(0), strides=list(strides))
                apart = torch.ops.aten._convolution(x, kernel, None, *args)
                fused = torch.ops.aten._convolution(x, kernel, bias, *args)
                if order is not None:
                    apart, fused = apart.permute(order), fused.permute(order)
                if not torch.equal(apart + bias.reshape(shape), fused):
                    return False
        return True
    except Exception:  # settings the op refuses outside the graph: leave it as traced
        return False


def _dense_strides(sizes: list[int], order: list[int]) -> tuple[int, ...]:
    """The strides of a dense tensor of ``sizes`` whose dimensions lie in memory
    in ``order``, outermost first."""
    strides, step = [0] * len(sizes), 1
    for dim in reversed(order):
        strides[dim] = step
        step *= max(sizes[dim], 1)
    return tuple(strides)


def _constant(value: Any) -> Any:
    """A graph value's constant (None included), or :data:`_UNKNOWN`."""
    node = value.node()
    if node.kind() == "prim::Constant":
        return value.toIValue()
    if node.kind() == "prim::ListConstruct":
        items = _ints(value)
        return _UNKNOWN if items is None else items
    return _UNKNOWN


def _ints(value: Any) -> list[int] | None:
    """A graph value's constant int list (a constant or a list built from constants)."""
    node = value.node()
    if node.kind() == "prim::Constant":
        got = value.toIValue()
        return list(got) if isinstance(got, (list, tuple)) else None
    if node.kind() == "prim::ListConstruct":
        items = [v.toIValue() if v.node().kind() == "prim::Constant" else None
                 for v in node.inputs()]
        return None if any(not isinstance(i, int) or isinstance(i, bool) for i in items) \
            else items
    return None


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value.type(), torch._C.TensorType)


def _sizes(value: Any) -> list[int] | None:
    if not _is_tensor(value):
        return None
    sizes = value.type().sizes()
    return None if sizes is None or None in sizes else list(sizes)


def _dtype(value: Any) -> Any:
    return value.type().scalarType() if _is_tensor(value) else None
