"""PyTorch: the traced probe pass as traced and as LayerWatch replays it.

On PyTorch, LayerWatch replays a ``torch.jit`` trace of Keras' forward pass
on the probes at every recorded step (``layerwatch/record/torch_trace.py``),
leaner than traced when that gives Keras' own numbers
(``layerwatch/record/torch_graph.py``): without the copies Keras' ops make of
each convolution's and pooling's input into NCHW (``contiguous()``), and with
each convolution adding its own bias. This times three graphs on the same
probes — as traced (``full``), without the copies only (``nocopy``), and the
lean one LayerWatch replays — in rounds that rotate their order, beside Keras'
own pass (``predict_on_batch``) and, where LayerWatch would batch it, the lean
graph replayed for 16 held steps at once (``together``, per step;
``layerwatch/record/torch_batch.py``), for the seed model and ``keras.applications``
models (untrained, 32x32 RGB, 10 random probes), each recorded the way
LayerWatch records it by default (every conv layer, cast for storage). Every
bias gets random values first (an untrained model's are zeros, which would
make any way of adding them look exact).

    KERAS_BACKEND=torch python bench/torch_replay.py                 # ~1 min
    KERAS_BACKEND=torch python bench/torch_replay.py --models seed ResNet50
    KERAS_BACKEND=torch python bench/torch_replay.py --quick         # smoke run

The replays run back to back here. Inside a fit each one follows a train step,
and took 30-40 % longer in a scratch loop that did the same (on one thread
too, so not the thread pool waking up); ``bench/phases.py`` times them there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if os.environ.setdefault("KERAS_BACKEND", "torch") != "torch":
    sys.exit("bench/torch_replay.py measures PyTorch's probe pass: run it with "
             "KERAS_BACKEND=torch (or unset).")

import _common  # noqa: E402

APPLICATIONS = ("MobileNetV2", "ResNet50", "DenseNet121")


def _probe_pass(name: str):
    """(LayerWatch's recorder model, its probe feed) for model ``name``."""
    import keras
    import numpy as np

    from layerwatch.record.probe_pass import ProbePass

    keras.utils.set_random_seed(0)
    if name == "seed":
        _, _, probes, _ = _common.seed_data(train_size=64)
        model = _common.seed_recipe().build_model()
    else:
        model = getattr(keras.applications, name)(weights=None, input_shape=(32, 32, 3),
                                                  classes=10)
        probes = np.random.default_rng(0).normal(size=(10, 32, 32, 3)).astype("float32")
    rng = np.random.default_rng(1)
    for variable in model.weights:
        if variable.path.endswith("bias"):
            variable.assign(rng.normal(scale=0.1, size=variable.shape).astype(variable.dtype))
    probes_pass = ProbePass(model, probes, layers=None, dtype="auto", max_channels=None,
                            channel_selection="first")
    return probes_pass.recorder, probes_pass.feed


def _time(call, repeats: int) -> float:
    """Median ms of ``call`` over ``repeats`` calls (fewer for a slow call: about
    0.2 s' worth, at least 5), after two unmeasured ones."""
    call()
    start = time.perf_counter()
    call()
    repeats = max(5, min(repeats, int(0.2 / max(time.perf_counter() - start, 1e-6))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(name: str, *, rounds: int, repeats: int) -> None:
    import keras
    import numpy as np

    from layerwatch.record import probe_pass, torch_graph, torch_trace

    recorder, feed = _probe_pass(name)
    inputs = list(feed) if isinstance(feed, (list, tuple)) else [feed]
    tensors = tuple(keras.ops.convert_to_tensor(a) for a in inputs)
    full = torch_trace._trace(recorder, tensors)
    nocopy = torch_trace._trace(recorder, tensors)
    torch_graph.drop_copies(nocopy.graph)
    lean = torch_trace._trace(recorder, tensors)
    torch_graph.drop_copies(lean.graph)
    fused = torch_graph.fuse_conv_biases(lean.graph)
    copies = sum(n.kind() == "aten::contiguous" for n in full.graph.nodes())
    left = sum(n.kind() == "aten::contiguous" for n in lean.graph.nodes())
    convolutions = sum(n.kind() == "aten::_convolution" for n in lean.graph.nodes())
    want = probe_pass._numpy(recorder.predict_on_batch(feed))
    same = all(np.array_equal(g, w) for g, w in zip(torch_trace._replay(lean, tensors), want))
    graphs = {"full": full, "nocopy": nocopy, "lean": lean}
    calls = {kind: (lambda graph=graph: torch_trace._replay(graph, tensors))
             for kind, graph in graphs.items()}
    calls["keras"] = lambda: recorder.predict_on_batch(feed)
    together, slots = _together(lean, tensors)
    if slots:
        calls["together"] = together
    times: dict[str, list[float]] = {kind: [] for kind in calls}
    order = list(calls)
    ratios: dict[str, list[float]] = {"lean/full": [], "lean/nocopy": []}
    if slots:
        ratios["together/lean"] = []
    for turn in range(rounds):
        for kind in order[turn % len(order):] + order[:turn % len(order)]:
            if kind == "together":  # a call replays `slots` steps: its time per step
                times[kind].append(_time(calls[kind], max(1, repeats // slots)) / slots)
            else:
                times[kind].append(_time(calls[kind], repeats))
        for pair in ratios:
            top, bottom = pair.split("/")
            ratios[pair].append(times[top][-1] / times[bottom][-1])
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"{name}: {len(recorder.outputs)} recorded layers, {copies - left} of {copies} "
          f"contiguous() calls left out, {fused} of {convolutions} convolutions add their own "
          f"bias; lean graph same as Keras' pass: {'yes' if same else 'no'}")
    print(f"  replay as traced {median['full']:.3f} ms, without copies "
          f"{median['nocopy']:.3f} ms, lean {median['lean']:.3f} ms, Keras' own pass "
          f"{median['keras']:.3f} ms (medians of {rounds} rounds)")
    if slots:
        print(f"  {slots} steps replayed together: {median['together']:.3f} ms a step "
              f"(the first release checked: same as the single replays)")
    else:
        print(f"  steps replayed one by one: {together}")
    for pair, values in ratios.items():
        print(f"ratio {name} {pair} = {_common.fmt_ratio(values)}", flush=True)


def _together(lean, tensors):
    """(a call that holds and replays `slots` steps at once, slots), or (why not, 0).

    The weights do not move between the held copies here; the first release,
    made here, is checked against the single replay as in a fit."""
    from layerwatch.record import torch_batch, torch_trace

    try:
        batch = torch_batch.BatchedReplay(lean.graph, lean.function, tensors, lean.state,
                                          torch_trace._replay(lean, tensors))
    except torch_batch.Unbatchable as exc:
        return str(exc), 0

    def cycle():
        for _ in range(batch.slots):
            batch.hold()
        return batch.release()

    cycle()
    if batch.failed is not None:
        return batch.failed, 0
    batch.timed = True  # timed here, not by its own second release
    return cycle, batch.slots


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["seed", *APPLICATIONS],
                        help="'seed' and keras.applications names (default: seed "
                             + " ".join(APPLICATIONS) + ")")
    parser.add_argument("--rounds", type=int, default=8,
                        help="rounds, each in a rotated order (default 8)")
    parser.add_argument("--repeats", type=int, default=100, help="replays per round and graph")
    parser.add_argument("--quick", action="store_true", help="smoke run: seed model, 2 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.rounds, args.repeats = ["seed"], 2, 5
    print(f"# bench/torch_replay.py — {_common.machine()}")
    for name in args.models:
        measure(name, rounds=args.rounds, repeats=args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
