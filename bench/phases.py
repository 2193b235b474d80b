"""Where a whole fit()'s time goes: each part of a fit, plain and with LayerWatch.

    python bench/phases.py                  # seed model, batch 64, 3 epochs, 6 fits each
    python bench/phases.py --saliency       # LayerWatch(..., saliency=True)
    python bench/phases.py --quick          # tiny sizes, a smoke run

Two timing callbacks sit first and last in the callback list, so what runs
between them at each hook is the callbacks' own time (LayerWatch's, in the
recorded fits). Fits alternate, plain and recorded, on a fresh seed model each
(tracing included). Printed per condition, medians over the fits, in ms:

  train_begin   the callbacks' on_train_begin (LayerWatch: probe pass, file)
  first_call    the first batch: batch begin to batch end (the train
                function's trace and first run: Keras' own, or the fused one)
  step          median batch after the first (one train call)
  batch_ends    all callbacks' on_train_batch_end, summed over the fit
  epoch_ends    all on_epoch_end, summed; train_end likewise
  total         fit() from call to return
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (sets TF_CPP_MIN_LOG_LEVEL before Keras loads)

PHASES = ("train_begin", "first_call", "step", "batch_ends", "epoch_ends", "train_end", "total")


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fits", type=int, default=6, help="fits per condition (default 6)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--saliency", action="store_true", help="LayerWatch(..., saliency=True)")
    p.add_argument("--options", default="{}",
                   help='other LayerWatch keyword arguments, as JSON (e.g. \'{"every": 4}\')')
    p.add_argument("--quick", action="store_true", help="tiny sizes: 2 fits, 128 examples")
    args = p.parse_args(argv)
    if args.quick:
        args.fits, args.epochs = 2, 2
    if args.fits < 1 or args.epochs < 1:
        p.error("--fits and --epochs must be >= 1")
    return args


def _timed_fit(model, x, y, batch, epochs, watch) -> dict[str, float]:
    """One fit with the two timing callbacks around ``watch`` (or nothing)."""
    import keras

    marks: list[tuple[str, str, float]] = []  # (front/back, hook, time)

    class Mark(keras.callbacks.Callback):
        def __init__(self, side):
            super().__init__()
            self.side = side

        def _mark(self, hook):
            marks.append((self.side, hook, time.perf_counter()))

        def on_train_begin(self, logs=None):
            self._mark("train_begin")

        def on_train_end(self, logs=None):
            self._mark("train_end")

        def on_epoch_end(self, epoch, logs=None):
            self._mark("epoch_end")

        def on_train_batch_begin(self, batch, logs=None):
            self._mark("batch_begin")

        def on_train_batch_end(self, batch, logs=None):
            self._mark("batch_end")

    callbacks = [Mark("front")] + ([watch] if watch is not None else []) + [Mark("back")]
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0, callbacks=callbacks)
    total = time.perf_counter() - start

    def at(side, hook):
        return [t for s, h, t in marks if s == side and h == hook]

    def inside(hook):  # what the callbacks between the two marks took, summed
        return sum(b - a for a, b in zip(at("front", hook), at("back", hook)))

    begins, ends = at("back", "batch_begin"), at("front", "batch_end")
    return {"train_begin": inside("train_begin"), "first_call": ends[0] - begins[0],
            "step": statistics.median(e - b for b, e in zip(begins[1:], ends[1:])),
            "batch_ends": inside("batch_end"), "epoch_ends": inside("epoch_end"),
            "train_end": inside("train_end"), "total": total}


def main(argv=None) -> int:
    args = _parse(argv)
    import keras

    from layerwatch import LayerWatch

    recipe = _common.seed_recipe()
    x, y, probes, labels = _common.seed_data(train_size=128 if args.quick else None)
    options = {"saliency": args.saliency, **json.loads(args.options)}
    tmp = tempfile.mkdtemp(prefix="layerwatch-bench-")
    print(f"# bench/phases.py — {_common.machine()}")
    print(f"# seed model, {len(x)} examples, batch {args.batch}, {args.epochs} epochs, "
          f"{args.fits} fits per condition, LayerWatch(path, probes, labels, **{options}); "
          f"{_common.load_average()}")
    runs: dict[str, list[dict[str, float]]] = {"plain": [], "layerwatch": []}
    for fit in range(args.fits):
        order = ["plain", "layerwatch"] if fit % 2 == 0 else ["layerwatch", "plain"]
        for condition in order:
            keras.backend.clear_session()
            model = recipe.build_model(seed=0)
            watch = None
            if condition == "layerwatch":
                path = os.path.join(tmp, f"run{fit}.h5")
                watch = LayerWatch(path, probes, labels, **options)
            runs[condition].append(_timed_fit(model, x, y, args.batch, args.epochs, watch))
    print(f"{'phase (ms, median)':20s}{'plain':>10s}{'layerwatch':>12s}{'difference':>12s}")
    for phase in PHASES:
        plain = 1e3 * statistics.median(r[phase] for r in runs["plain"])
        watched = 1e3 * statistics.median(r[phase] for r in runs["layerwatch"])
        print(f"phase {phase:14s}{plain:10.1f}{watched:12.1f}{watched - plain:+12.1f}")
    print(f"# {_common.load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
