"""What a batch-end callback costs by being there: a fit with no callback, with
one whose ``on_train_batch_end`` does nothing, and with the same callback
marked ``async_safe``.

Keras 3 (JAX and PyTorch backends) runs the batch-end hooks in a thread pool
when every callback given to ``fit`` leaves ``on_train_batch_end`` alone or
says ``async_safe = True``; otherwise it converts each step's logs to Python
floats in the training loop, which waits for the step to finish before the
next one is dispatched. On JAX, whose dispatch is asynchronous, that wait
costs the overlap of one step's Python work with the previous step's compute.
LayerWatch and the naive predict-per-step recorder both have a batch-end hook
that is not ``async_safe``, so both pay this; it is what any recorder pays
unless its step-end work leaves the training thread.

    KERAS_BACKEND=jax python bench/callback_sync.py              # 8 rounds (~6 min)
    KERAS_BACKEND=jax python bench/callback_sync.py --quick      # smoke run

Seed model, batch 64, 3 epochs; each round runs the three conditions once, in
rotating order, on a fresh model with the same seed. Prints each condition's
whole-fit time and its ratio to the round's plain fit (median, quartiles), and
the step time (median gap between batch begins in the no-op fits, whose loop
waits for each step; without that wait the loop only dispatches steps). On
TensorFlow Keras never dispatches callbacks asynchronously, so the three
conditions should tie there.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import _common

CONDITIONS = ("none", "noop", "noop-async-safe")


def _callbacks(condition: str, begins: list[float]) -> list:
    import keras

    class Noop(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            pass

    class TimedNoop(Noop):
        def on_train_batch_begin(self, batch, logs=None):  # the loop waited for the last step
            begins.append(time.perf_counter())

    class AsyncSafeNoop(Noop):
        async_safe = True

    return {"none": [], "noop": [TimedNoop()], "noop-async-safe": [AsyncSafeNoop()]}[condition]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="rounds (default 8)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 round, 512 examples")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.quick:
        args.rounds = 1

    import keras

    recipe = _common.seed_recipe()
    x, y, _, _ = _common.seed_data(train_size=512 if args.quick else None)
    seconds = {c: [] for c in CONDITIONS}
    steps: list[float] = []
    print(f"# bench/callback_sync.py — {_common.machine()}")
    print(f"# seed model, batch 64, 3 epochs, {args.rounds} rounds, {_common.load_average()}")
    for round_ in range(args.rounds + 1):  # round 0: untimed warm-up
        order = CONDITIONS[round_ % 3:] + CONDITIONS[:round_ % 3]
        for condition in order:
            keras.backend.clear_session()
            model = recipe.build_model(seed=0)
            begins: list[float] = []
            with _common.Stopwatch() as sw:
                model.fit(x, y, batch_size=64, epochs=3, verbose=0,
                          callbacks=_callbacks(condition, begins))
            if round_:
                seconds[condition].append(sw.seconds)
                gaps = [b - a for a, b in zip(begins[1:], begins[2:])]  # after the first call
                if gaps:
                    steps.append(statistics.median(gaps))
            del model
    plain = seconds["none"]
    if steps:
        print(f"step: {1000 * statistics.median(steps):.2f} ms (median gap between batch "
              "begins in the no-op fits)")
    for condition in CONDITIONS:
        ratios = [s / p for s, p in zip(seconds[condition], plain)]
        print(f"{condition:16s} fit {statistics.median(seconds[condition]):.3f} s; "
              f"÷ none {_common.fmt_ratio(ratios)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
