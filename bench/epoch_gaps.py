"""The pauses at epoch boundaries: each epoch's start to its first batch, and the
last epoch's end to fit() returning, in plain fits and with LayerWatch.

Keras' TensorFlow fit loop holds each epoch's tf.data iterator until the next
epoch's first batch (the last one until fit returns); destroying it can wait,
with the CPU idle, for its threads. LayerWatch's fused train function hands
spent iterators to a thread of its own (layerwatch/record/reaper.py);
``--no-reaper`` times LayerWatch without that, the way 0.4.0 ran.

    python bench/epoch_gaps.py                 # plain and LayerWatch, 8 fits each (~1 min)
    python bench/epoch_gaps.py --no-reaper     # also LayerWatch without the reaper

Prints, per condition, every gap above 100 ms and the median and maximum gap.
The seed model at batch 64, 3 epochs, alternating conditions, same seed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import _common


def _gaps_callback():
    import keras

    class Gaps(keras.callbacks.Callback):
        """Epoch start -> first batch; last epoch end -> (fit return, filled in later)."""

        def on_train_begin(self, logs=None):
            self.gaps, self.begun = [], None

        def on_epoch_begin(self, epoch, logs=None):
            self.begun = time.perf_counter()

        def on_train_batch_begin(self, batch, logs=None):
            if self.begun is not None:
                self.gaps.append(time.perf_counter() - self.begun)
                self.begun = None

        def on_epoch_end(self, epoch, logs=None):
            self.ended = time.perf_counter()

    return Gaps()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fits", type=int, default=8, help="fits per condition (default 8)")
    parser.add_argument("--no-reaper", action="store_true",
                        help="also LayerWatch with spent iterators destroyed in the loop")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 fit per condition, 512 examples, all conditions")
    args = parser.parse_args(argv)
    if args.quick:
        args.fits, args.no_reaper = 1, True

    import keras

    from layerwatch import LayerWatch
    from layerwatch.record import reaper

    recipe = _common.seed_recipe()
    x, y, probes, labels = _common.seed_data(train_size=512 if args.quick else None)
    tmp = tempfile.mkdtemp(prefix="layerwatch-gaps-")
    conditions = ["none", "layerwatch"] + (["no-reaper"] if args.no_reaper else [])
    gaps = {c: [] for c in conditions}
    release = reaper.release
    print(f"# bench/epoch_gaps.py — {_common.machine()}")
    print(f"# seed model, batch 64, 3 epochs, {args.fits} fits per condition, "
          f"{_common.load_average()}")
    for fit in range(args.fits + 1):  # fit 0: untimed warm-up
        for condition in conditions[fit % len(conditions):] + conditions[:fit % len(conditions)]:
            keras.backend.clear_session()
            model = recipe.build_model(seed=0)
            timer = _gaps_callback()
            callbacks = [timer]
            if condition != "none":
                path = os.path.join(tmp, "run.h5")
                if os.path.exists(path):
                    os.remove(path)
                callbacks.append(LayerWatch(path, probes, labels))
            reaper.release = (lambda obj, after=0.0: None) if condition == "no-reaper" \
                else release
            try:
                model.fit(x, y, batch_size=64, epochs=3, verbose=0, callbacks=callbacks)
                returned = time.perf_counter()
            finally:
                reaper.release = release
            if fit:
                gaps[condition].extend(timer.gaps[1:] + [returned - timer.ended])
            del model, callbacks
    for condition in conditions:
        values = [1000 * g for g in gaps[condition]]
        long = [round(v) for v in values if v > 100]
        print(f"{condition}: {len(values)} gaps (2 epoch starts + fit return per fit), "
              f"median {statistics.median(values):.0f} ms, max {max(values):.0f} ms; "
              f"above 100 ms: {long or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
