"""What recording costs during training: the whole fit() with LayerWatch ÷ without.

    python bench/overhead.py                       # whole fit (headline), then steady epochs
    python bench/overhead.py --pairs 9             # more alternating pairs
    python bench/overhead.py --quick               # tiny sizes, a smoke run (seconds)
    KERAS_BACKEND=jax python bench/overhead.py     # any Keras 3 backend

Headline: the whole ``fit()``, as a user experiences it. For each case a
fresh seed model (recipes/mnist_tanh.py, same seed) is built and fitted from
its first step to ``fit`` returning — tracing and compiling, epoch
boundaries, the writer's last block and closing the file included — once
without recording and once with, alternately (the order swaps every pair), so
slow spells of a shared machine fall on both. Each pair gives a ratio of wall
times and one of process CPU times (all threads); the median over the pairs
is reported with quartiles, beside the plain fit's own figures: its wall
time, and its step time over the epochs after the first, so a reader can
place the machine. Cases:

  seed      the seed recipe's training: 4,000 digits, batch 69, 5 epochs, 290
            steps, LayerWatch(budget=None) recording every step
  b64       batch 64, 3 epochs (189 steps), LayerWatch at default settings
  b1024     batch 1024, 3 epochs (12 steps), LayerWatch at default settings
  recipe    (--recipe) the seed recipe's LayerWatch exactly as it records
            (saliency, 200 analysis probes, whatever recipes/mnist_tanh.py asks)
  saliency  (--saliency) batch 64 as b64, LayerWatch(saliency=True)

``built`` (TensorFlow) is the plain fit with its optimizer's variables created
before the first step, as LayerWatch creates them
(``layerwatch.record.fused.build_optimizer``): Keras otherwise creates them
inside the first traced step, which makes that first call slower. LayerWatch
÷ built is therefore LayerWatch's own cost, without that saving; both ratios
are printed.

``naive`` (in the b64 case; --no-naive skips it) is a naive recorder:
keras.Model(inputs, conv outputs).predict(probes) after every step, the arrays
kept in a list — what layerwatch must beat on every backend.

Second figure: steady-state epochs, as before — per batch size, none,
layerwatch and naive taking turns on one model, each run's mean epoch after
its first, over ``--repeats`` runs (see ``steady`` below).

The script also counts how often the probe function's Python body runs (once
per trace on compiling backends: it must be 1 however many steps are recorded).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (sets TF_CPP_MIN_LOG_LEVEL before Keras loads)

TARGETS = {64: 1.10, 1024: 1.03}
#: Whole-fit targets (median ratio of wall times) per case and backend group.
FIT_TARGETS = {"seed": 1.10, "b64": 1.10, "b1024": 1.03, "saliency": 1.15}
FIT_TARGETS_OTHER = {"b64": 1.15}  # JAX and PyTorch
MIN_STEPS = 64   # per run, in the epochs after its first (its steady state)


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=5,
                   help="alternating pairs per whole-fit case (default 5)")
    p.add_argument("--cases", nargs="+", default=None,
                   choices=["seed", "b64", "b1024", "recipe", "saliency"],
                   help="whole-fit cases (default: seed b64 b1024, plus --recipe/--saliency)")
    p.add_argument("--recipe", action="store_true",
                   help="also the seed recipe's own LayerWatch settings (saliency, analysis)")
    p.add_argument("--saliency", action="store_true",
                   help="also batch 64 with LayerWatch(saliency=True)")
    p.add_argument("--no-steady", action="store_true",
                   help="skip the second figure (steady-state epochs)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 1024])
    p.add_argument("--repeats", type=int, default=7,
                   help="steady-state: timed runs per condition (default 7)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs per run (default: 1, then enough for >= 64 steps)")
    p.add_argument("--train-size", type=int, default=None,
                   help="training examples (default: all 4,000 bundled)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes for a smoke run: 128 examples, batch 32, 1 repeat")
    p.add_argument("--no-naive", action="store_true", help="skip the naive recorder")
    p.add_argument("--variants", action="store_true",
                   help="also time LayerWatch(compression=None), LayerWatch(every=4), on "
                        "TensorFlow LayerWatch with a separate probe pass instead of the "
                        "fused one, and LayerWatch with its snapshots dropped before the "
                        "writer (the probe pass and the callback alone)")
    args = p.parse_args(argv)
    if args.cases is None:
        args.cases = ["b64"] if args.quick else ["seed", "b64", "b1024"] \
            + ["recipe"] * args.recipe + ["saliency"] * args.saliency
    if args.quick:
        args.batch_sizes, args.repeats, args.train_size = [32], 1, 128
        args.epochs = args.epochs or 2
        args.pairs = 1
    if args.repeats < 1 or args.pairs < 1 or (args.epochs is not None and args.epochs < 1):
        p.error("--repeats, --pairs and --epochs must be >= 1")
    return args


def _epoch_timers(drain=None):
    """Two callbacks, for the front and the back of a callback list, timing a
    run's epochs: each epoch on its own and the whole run (first epoch begin to
    last epoch end). Returns (first, last); ``last`` holds the figures.

    ``drain`` runs at the end of the run's last epoch: inside the whole-run
    span, after that epoch's own time.
    """
    import keras

    class EpochStart(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            end.begin(epoch)

    class EpochEnd(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.epoch_seconds: list[float] = []
            self.epoch_cpu: list[float] = []
            self.seconds_per_epoch = float("nan")

        def on_train_begin(self, logs=None):
            self._t0 = None
            self.epoch_seconds, self.epoch_cpu = [], []

        def begin(self, epoch):
            self._e0, self._ec0 = time.perf_counter(), time.process_time()
            if self._t0 is None:
                self._t0, self._first = self._e0, epoch

        def on_epoch_end(self, epoch, logs=None):
            # The epoch's own time ends here: the writer's work for blocks
            # handed over before is inside it, as all through a long run.
            self.epoch_seconds.append(time.perf_counter() - self._e0)
            self.epoch_cpu.append(time.process_time() - self._ec0)
            if epoch == self.params["epochs"] - 1:
                if drain is not None:
                    drain()  # the last block's writing counts in the whole-run figure only
                epochs = epoch - self._first + 1
                self.seconds_per_epoch = (time.perf_counter() - self._t0) / epochs

        @property
        def steady_epoch(self) -> float:
            """Mean epoch after the run's first (the first when there is only one)."""
            return _steady(self.epoch_seconds)

        @property
        def steady_cpu(self) -> float:
            """The same for the process's CPU time."""
            return _steady(self.epoch_cpu)

    end = EpochEnd()
    return EpochStart(), end


def _steady(values: list[float]) -> float:
    timed = values[1:] or values
    return sum(timed) / len(timed)


def _naive_recorder(probes):
    import keras

    class NaiveRecorder(keras.callbacks.Callback):
        """What one writes without layerwatch: predict() after every step."""

        def __init__(self):
            super().__init__()
            self.snapshots: list = []
            self._tap = None

        def on_train_begin(self, logs=None):
            if self._tap is None:
                self._tap = keras.Model(self.model.inputs, _common.conv_outputs(self.model))
            self.snapshots = []  # kept for one run, as a naive script would

        def on_train_batch_end(self, batch, logs=None):
            self.model  # on JAX, reading Callback.model syncs the trained weights back
            self.snapshots.append(self._tap.predict(probes, verbose=0))

    return NaiveRecorder()


def _optimizer_builder():
    """A plain fit's callback that builds the optimizer before the first step,
    the way LayerWatch's fused step does (the ``built`` condition)."""
    import keras

    from layerwatch.record.fused import build_optimizer

    class BuildOptimizer(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            build_optimizer(self.model)

    return BuildOptimizer()


class _TraceCounter:
    """Counts runs of the probe model's Python ``call`` (= traces when compiled)."""

    def __init__(self):
        self.calls = 0
        self.functions = 0

    def install(self):
        import layerwatch.record.probe_pass as probe_pass

        original = probe_pass.cast_outputs  # builds the model the probe pass runs

        def counting_cast_outputs(extractor, dtype, **kwargs):
            recorder = original(extractor, dtype, **kwargs)
            self.functions += 1
            inner = recorder.call

            def call(*args, **kwargs):
                self.calls += 1
                return inner(*args, **kwargs)

            recorder.call = call
            return recorder

        probe_pass.cast_outputs = counting_cast_outputs


def _separate_pass(path, probes, labels):
    """LayerWatch with its probe pass as a separate compiled call after each step
    (what JAX, PyTorch and multi-replica TensorFlow use), for comparison."""
    import layerwatch.record.callback as cb
    from layerwatch import LayerWatch

    class SeparatePassLayerWatch(LayerWatch):
        def on_train_begin(self, logs=None):
            fuse, cb.can_fuse = cb.can_fuse, lambda *args, **kwargs: False
            try:
                super().on_train_begin(logs)
            finally:
                cb.can_fuse = fuse

    return SeparatePassLayerWatch(path, probes, labels, every=1, budget=None)


def _unwritten(path, probes, labels):
    """LayerWatch whose snapshots are computed and handed over but dropped before
    the writer (batch logs still written): the probe pass and the callback alone."""
    from layerwatch import LayerWatch

    class UnwrittenLayerWatch(LayerWatch):
        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            writer = self._writer
            if writer is not None:
                writer.add_snapshot = lambda *args, **kwargs: None

    return UnwrittenLayerWatch(path, probes, labels, every=1, budget=None)


class _PlainSteps:
    """Times the epochs after a run's first: the plain step time a reader places
    the machine by (tracing and the first epoch's warm-up left out)."""

    def __init__(self):
        import keras

        outer = self

        class Timer(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                outer.seconds, outer.steps, outer._t0 = 0.0, 0, None

            def on_epoch_begin(self, epoch, logs=None):
                outer._t0 = time.perf_counter() if epoch > 0 else None

            def on_train_batch_end(self, batch, logs=None):
                if outer._t0 is not None:
                    outer.steps += 1

            def on_epoch_end(self, epoch, logs=None):
                if outer._t0 is not None:
                    outer.seconds += time.perf_counter() - outer._t0

        self.callback = Timer()
        self.seconds, self.steps, self._t0 = 0.0, 0, None

    @property
    def step_ms(self) -> float:
        return 1e3 * self.seconds / self.steps if self.steps else float("nan")


def _cases(args, recipe, x_test, probes, labels):
    """name -> (batch, epochs, the LayerWatch for a path, a description)."""
    from layerwatch import LayerWatch

    seed_batch, seed_epochs = recipe.DEFAULTS["bundled"]
    small = args.quick  # smoke run: tiny sizes
    cases = {
        "seed": (32 if small else seed_batch, 2 if small else seed_epochs,
                 lambda path: LayerWatch(path, probes, labels, budget=None),
                 "the seed recipe's training, LayerWatch(budget=None) every step"),
        "b64": (32 if small else 64, 2 if small else 3,
                lambda path: LayerWatch(path, probes, labels),
                "LayerWatch(path, probes, labels) at default settings"),
        "b1024": (64 if small else 1024, 2 if small else 3,
                  lambda path: LayerWatch(path, probes, labels),
                  "LayerWatch(path, probes, labels) at default settings"),
        "recipe": (32 if small else seed_batch, 2 if small else seed_epochs,
                   lambda path: recipe.recorder(path, probes, labels, x_test),
                   "recipes/mnist_tanh.py's own LayerWatch (recipe.recorder)"),
        "saliency": (32 if small else 64, 2 if small else 3,
                     lambda path: LayerWatch(path, probes, labels, saliency=True),
                     "LayerWatch(..., saliency=True)"),
    }
    return {name: cases[name] for name in args.cases}


def whole_fit(args) -> None:
    """The headline: whole fit() with LayerWatch ÷ without, in alternating pairs."""
    import keras

    recipe = _common.seed_recipe()
    x, y, probes, labels = _common.seed_data(train_size=args.train_size)
    x_test = recipe.load_data("bundled")[2]
    backend = keras.backend.backend()
    targets = FIT_TARGETS if backend == "tensorflow" else FIT_TARGETS_OTHER
    tmp = tempfile.mkdtemp(prefix="layerwatch-bench-")
    print(f"# bench/overhead.py — {_common.machine()}")
    print(f"# whole fit(): {len(x)} training examples, {len(probes)} probes, "
          f"{args.pairs} alternating pair(s) per case, {_common.load_average()}")
    for case, (batch, epochs, make, what) in _cases(args, recipe, x_test, probes,
                                                     labels).items():
        steps = epochs * -(-len(x) // batch)
        conditions = ["none", "layerwatch"]
        if backend == "tensorflow":
            conditions.append("built")
        if case == "b64" and not args.no_naive:
            conditions.append("naive")
        wall = {c: [] for c in conditions}
        cpu = {c: [] for c in conditions}
        plain_step = []
        for pair in range(args.pairs + 1):  # pair 0: untimed warm-up of each condition
            order = conditions[pair % len(conditions):] + conditions[:pair % len(conditions)]
            for condition in order:
                keras.backend.clear_session()
                model = recipe.build_model(seed=0)
                timer = _PlainSteps()
                callbacks = [timer.callback]
                if condition == "layerwatch":
                    path = os.path.join(tmp, f"{case}.h5")
                    if os.path.exists(path):
                        os.remove(path)  # each run records a new file
                    callbacks.append(make(path))
                elif condition == "naive":
                    callbacks.append(_naive_recorder(probes))
                elif condition == "built":
                    callbacks.append(_optimizer_builder())
                t0, c0 = time.perf_counter(), time.process_time()
                model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0,
                          callbacks=callbacks)
                t1, c1 = time.perf_counter(), time.process_time()
                if pair:
                    wall[condition].append(t1 - t0)
                    cpu[condition].append(c1 - c0)
                    if condition == "none":
                        plain_step.append(timer.step_ms)
                del model, callbacks
        print(f"\n## whole fit, case {case}: batch {batch}, {epochs} epochs, {steps} steps; "
              f"{what}")
        med, lo, hi = _common.median_spread(wall["none"])
        print(f"plain fit {case}: {med:.2f} s wall (min {lo:.2f}, max {hi:.2f}); plain step "
              f"{statistics.median(plain_step):.2f} ms (epochs after the first, median of runs)")
        for condition in conditions[1:]:
            ratios = [a / b for a, b in zip(wall[condition], wall["none"])]
            cpus = [a / b for a, b in zip(cpu[condition], cpu["none"])]
            verdict = ""
            target = targets.get(case) if condition == "layerwatch" else None
            if target is not None:
                met = statistics.median(ratios) <= target
                verdict = f"   target <= {target:.2f}: {'met' if met else 'MISSED'}"
            print(f"fit-ratio {case} {condition}/none = {_common.fmt_ratio(ratios)}{verdict}")
            print(f"fit-cpu-ratio {case} {condition}/none = {_common.fmt_ratio(cpus)}")
        if "built" in conditions:
            own = [a / b for a, b in zip(wall["layerwatch"], wall["built"])]
            own_cpu = [a / b for a, b in zip(cpu["layerwatch"], cpu["built"])]
            print(f"fit-ratio {case} layerwatch/built = {_common.fmt_ratio(own)}   "
                  "(LayerWatch's own cost: both build the optimizer before the first step)")
            print(f"fit-cpu-ratio {case} layerwatch/built = {_common.fmt_ratio(own_cpu)}")
    print(f"\n# whole fit done, {_common.load_average()}")


def steady(args) -> int:
    import keras

    from layerwatch import LayerWatch

    recipe = _common.seed_recipe()
    x, y, probes, labels = _common.seed_data(train_size=args.train_size)
    counter = _TraceCounter()
    counter.install()
    print(f"\n# steady-state epochs — {_common.machine()}")
    print(f"# seed model {recipe.__name__}, {len(x)} training examples, {len(probes)} probes, "
          f"{args.repeats} repeat(s), {_common.load_average()}")
    tmp = tempfile.mkdtemp(prefix="layerwatch-bench-")
    exit_code = 0
    for batch in args.batch_sizes:
        # One model per batch size, shared by all conditions: one compiled
        # train step, and every condition pays for the same arithmetic.
        model = recipe.build_model(seed=0)
        conditions = {}  # name -> {"callbacks": [...], "timer": EpochEnd}

        def add(name, callbacks):
            # A LayerWatch run waits at its end until its writer has written everything.
            watches = [cb for cb in callbacks if isinstance(cb, LayerWatch)]
            drain = (lambda: [w._writer.flush(wait=True) for w in watches if w._writer]) \
                if watches else None
            first, timer = _epoch_timers(drain)
            conditions[name] = {"callbacks": [first] + callbacks + [timer], "timer": timer}

        add("none", [])
        watch = LayerWatch(os.path.join(tmp, f"b{batch}.h5"), probes, labels, every=1)
        add("layerwatch", [watch])
        if args.variants:
            for label, kwargs in (("lw-nozip", {"compression": None}), ("lw-every4", {"every": 4})):
                variant = LayerWatch(os.path.join(tmp, f"b{batch}-{label}.h5"), probes, labels,
                                     **{"every": 1, "budget": None, **kwargs})
                add(label, [variant])
            if keras.backend.backend() == "tensorflow":
                separate = _separate_pass(os.path.join(tmp, f"b{batch}-separate.h5"), probes,
                                          labels)
                add("lw-separate", [separate])
            unwritten = _unwritten(os.path.join(tmp, f"b{batch}-unwritten.h5"), probes, labels)
            add("lw-unwritten", [unwritten])
        if not args.no_naive:
            add("naive", [_naive_recorder(probes)])

        names = list(conditions)
        for name in names:  # the untimed epoch: tracing, compiling, file creation
            c = conditions[name]
            model.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=c["callbacks"])
        traces_after_warmup = counter.calls
        epochs = args.epochs or 1 + -(-MIN_STEPS // -(-len(x) // batch))
        epoch_times = {name: [] for name in names}   # per run: steady-state epoch
        run_times = {name: [] for name in names}     # per run: whole run / epochs
        cpu_times = {name: [] for name in names}
        for r in range(args.repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                c = conditions[name]
                model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0,
                          callbacks=c["callbacks"])
                epoch_times[name].append(c["timer"].steady_epoch)
                run_times[name].append(c["timer"].seconds_per_epoch)
                cpu_times[name].append(c["timer"].steady_cpu)
        steps = -(-len(x) // batch)
        print(f"\n## batch {batch} ({steps} steps per epoch, {epochs} epoch(s) per timed run)")
        for name in names:
            med, lo, hi = _common.median_spread(epoch_times[name])
            print(f"epoch seconds {name:11s} median {med:7.3f}  (runs' min {lo:.3f}, max {hi:.3f})"
                  f"   per step {1e3 * med / steps:7.2f} ms")

        def paired(times, name):  # a run ÷ the baseline run of the same repeat
            return [t / b for t, b in zip(times[name], times["none"])]

        for name in names[1:]:
            ratios = paired(epoch_times, name)
            target = TARGETS.get(batch) if name == "layerwatch" else None
            verdict = ""
            if target is not None:
                ok = statistics.median(ratios) <= target
                verdict = f"   target <= {target:.2f}: {'met' if ok else 'MISSED'}"
            print(f"ratio batch={batch} {name}/none = {_common.fmt_ratio(ratios)}{verdict}")
        for name in names[1:]:
            print(f"whole-run ratio batch={batch} {name}/none = "
                  f"{_common.fmt_ratio(paired(run_times, name))}"
                  "   (run time incl. the writer's last block / epochs)")
        for name in names[1:]:
            print(f"cpu-ratio batch={batch} {name}/none = "
                  f"{_common.fmt_ratio(paired(cpu_times, name))}"
                  "   (process CPU time, all threads, same epochs: steadier on a shared machine)")
        print(f"probe function traces: {traces_after_warmup} during warm-up, "
              f"{counter.calls - traces_after_warmup} during the {args.repeats} timed run(s), "
              f"for {counter.functions} probe function(s) built "
              f"[backend {keras.backend.backend()}; on TensorFlow one trace, whose function "
              "runs alone (step 0, epoch ends) and inside the fused train step; an eager "
              "backend runs it every step]")
        counter.calls = counter.functions = 0
        for c in conditions.values():
            for cb in c["callbacks"]:
                if hasattr(cb, "snapshots"):
                    cb.snapshots = []
        conditions.clear()
        del model
        keras.backend.clear_session()
    print(f"\n# done, {_common.load_average()}")
    return exit_code


def main(argv=None) -> int:
    args = _parse(argv)
    start = time.perf_counter()
    whole_fit(args)
    code = 0 if args.no_steady else steady(args)
    print(f"# bench/overhead.py took {time.perf_counter() - start:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
