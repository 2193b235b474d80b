"""PyTorch: the traced probe pass with and without its layout copies.

On PyTorch, LayerWatch replays a ``torch.jit`` trace of Keras' forward pass
on the probes at every recorded step (``layerwatch/record/torch_trace.py``),
without the copies Keras' ops make of each convolution's and pooling's input
into NCHW (``contiguous()``) when that gives Keras' own numbers. This times the two graphs
on the same probes, in rounds that alternate their order, beside Keras' own pass
(``predict_on_batch``), for the seed model and ``keras.applications`` models
(untrained, 32x32 RGB, 10 random probes), each recorded the way LayerWatch
records it by default (every conv layer, cast for storage).

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

    from layerwatch.record import probe_pass, torch_trace

    recorder, feed = _probe_pass(name)
    inputs = list(feed) if isinstance(feed, (list, tuple)) else [feed]
    tensors = tuple(keras.ops.convert_to_tensor(a) for a in inputs)
    full = torch_trace._trace(recorder, tensors)
    lean = torch_trace._trace(recorder, tensors)
    torch_trace._drop_copies(lean.graph)
    copies = sum(n.kind() == "aten::contiguous" for n in full.inlined_graph.nodes())
    left = sum(n.kind() == "aten::contiguous" for n in lean.graph.nodes())
    want = probe_pass._numpy(recorder.predict_on_batch(feed))
    same = all(np.array_equal(g, w) for g, w in zip(torch_trace._replay(lean, tensors), want))
    times: dict[str, list[float]] = {"full": [], "lean": [], "keras": []}
    ratios = []
    calls = {"full": lambda: torch_trace._replay(full, tensors),
             "lean": lambda: torch_trace._replay(lean, tensors),
             "keras": lambda: recorder.predict_on_batch(feed)}
    for turn in range(rounds):
        for kind in ("full", "lean", "keras") if turn % 2 == 0 else ("lean", "full", "keras"):
            times[kind].append(_time(calls[kind], repeats))
        ratios.append(times["lean"][-1] / times["full"][-1])
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"{name}: {len(recorder.outputs)} recorded layers, {copies - left} of {copies} "
          f"contiguous() calls left out; lean graph same as Keras' pass: "
          f"{'yes' if same else 'no'}")
    print(f"  replay with copies {median['full']:.3f} ms, without {median['lean']:.3f} ms, "
          f"Keras' own pass {median['keras']:.3f} ms (medians of {rounds} rounds)")
    print(f"ratio {name} lean/full = {_common.fmt_ratio(ratios)}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["seed", *APPLICATIONS],
                        help="'seed' and keras.applications names (default: seed "
                             + " ".join(APPLICATIONS) + ")")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds (default 7)")
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
