"""How long feature images (``features_every=``) hold training up, against their own compute.

A features call runs at a batch end, in the training loop: the loop waits for
it. What it must not do is hold training up for longer than its own compute
(handing the images to the writer, or the writer's work on them, slowing the
steps after it). Measured in one fit of the seed model at batch 64 with
``LayerWatch(..., features_every=N)``:

  step      the median gap between consecutive batch begins, at steps with no
            features call near them
  compute   each features call's own time (the call, timed inside the fit)
  stall     the gap around that call's batch end less the median step; and the
            extra time of the 3 steps after it (the writer's compression runs
            then), summed

    python bench/features.py                 # features_every=50, 3 epochs
    python bench/features.py --every 20      # more often
    KERAS_BACKEND=jax python bench/features.py
    python bench/features.py --quick         # smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import _common

AFTER = 3  # steps after a features call whose extra time is counted


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=50, help="features_every (default 50)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1,024 examples, 2 epochs, features_every=10")
    args = parser.parse_args(argv)
    if args.every < 1 or args.epochs < 1:
        parser.error("--every and --epochs must be >= 1")
    if args.quick:
        args.every, args.epochs = 10, 2

    import keras

    from layerwatch import LayerWatch
    from layerwatch.record.features import FeatureAscent

    recipe = _common.seed_recipe()
    x, y, probes, labels = _common.seed_data(train_size=1024 if args.quick else None)
    calls: list[tuple[float, float]] = []  # (start, seconds) of each features call
    own_call = FeatureAscent.__call__

    def timed_call(self):
        start = time.perf_counter()
        try:
            return own_call(self)
        finally:
            calls.append((start, time.perf_counter() - start))

    class Begins(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times: list[float] = []

        def on_train_batch_begin(self, batch, logs=None):
            self.times.append(time.perf_counter())

    begins = Begins()
    path = os.path.join(tempfile.mkdtemp(prefix="layerwatch-features-"), "run.h5")
    model = recipe.build_model(seed=0)
    watch = LayerWatch(path, probes, labels, features_every=args.every,
                       features_channels=8)
    print(f"# bench/features.py — {_common.machine()}")
    print(f"# seed model, batch 64, {len(x)} examples, {args.epochs} epoch(s), "
          f"features_every={args.every}, 8 channels a layer, {_common.load_average()}")
    FeatureAscent.__call__ = timed_call
    try:
        model.fit(x, y, batch_size=64, epochs=args.epochs, verbose=0,
                  callbacks=[watch, begins])
    finally:
        FeatureAscent.__call__ = own_call
    times = begins.times
    gaps = [b - a for a, b in zip(times, times[1:])]  # gap i: batch i's begin to batch i+1's
    # The batch whose end ran each call: the last batch begun before the call
    # started (-1: before the first, in on_train_begin).
    at = [max((i for i, t in enumerate(times) if t <= start), default=-1)
          for start, _ in calls]
    near = {j for i in at for j in range(i - 1, i + AFTER + 1)}
    quiet = [g for i, g in enumerate(gaps) if i > 0 and i not in near]  # not the first call
    if not quiet:
        print("too few steps without a features call to time a step")
        return 1
    step = statistics.median(quiet)
    print(f"step: {1000 * step:.2f} ms (median of {len(quiet)} gaps between batch begins)")
    extras = []
    for (start, seconds), i in zip(calls, at):
        if i < 0 or i >= len(gaps):
            where = "at the train begin" if i < 0 else "after the last batch begin"
            print(f"features call {where}: compute {1000 * seconds:.0f} ms (no step gap to "
                  "compare)")
            continue
        stall = gaps[i] - step
        after = sum(g - step for g in gaps[i + 1:i + 1 + AFTER])
        extras.append(stall - seconds)
        print(f"features call at batch {i}: compute {1000 * seconds:.0f} ms, stall "
              f"{1000 * stall:.0f} ms (stall - compute {1000 * (stall - seconds):+.1f} ms), "
              f"next {AFTER} steps {1000 * after:+.1f} ms")
    if extras:
        print(f"stall - compute: median {1000 * statistics.median(extras):+.1f} ms over "
              f"{len(extras)} call(s) in the fit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
