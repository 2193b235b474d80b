"""Recording a big model: per-step overhead and bytes per snapshot, by setting.

    python bench/big_model.py                  # ResNet-style, 21 conv layers, batch 128
    python bench/big_model.py --quick          # tiny sizes, a smoke run
    KERAS_BACKEND=jax python bench/big_model.py

A ResNet-style model (3 stages of 64/128/256 channels, 3 residual blocks each:
21 conv layers) trains on synthetic 32×32×3 images at batch 128 under each
setting in turn, on one compiled model:

  none        no recording (the baseline)
  defaults    LayerWatch(every=1): every conv layer, every channel
  suggested   what the defaults' one-time budget warning proposes (its
              ``max_channels=`` and ``every=``), measured the same way

Each condition first runs untimed steps (tracing). Then conditions take turns
(A B C, A B C, ...) and a callback times every step from batch begin to batch
end of the *next* batch begin, so the recording inside ``on_train_batch_end`` is
inside the figure. The medians of per-step time are reported, with the ratio to
``none``, plus bytes on disk per snapshot and the raw float32 size of one.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from layerwatch import LayerWatch, open_run  # noqa: E402


def resnet(*, widths=(64, 128, 256), blocks=3, size=32, classes=10) -> keras.Model:
    """A CIFAR-style ResNet: a stem conv, then ``blocks`` residual blocks per stage."""
    x = keras.Input((size, size, 3))
    h = keras.layers.Conv2D(widths[0], 3, padding="same", use_bias=False, name="stem")(x)
    h = keras.layers.ReLU()(keras.layers.BatchNormalization()(h))
    for stage, width in enumerate(widths):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            name = f"s{stage}b{block}"
            shortcut = h
            h = keras.layers.Conv2D(width, 3, strides=stride, padding="same", use_bias=False,
                                    name=f"{name}_conv1")(h)
            h = keras.layers.ReLU()(keras.layers.BatchNormalization()(h))
            h = keras.layers.Conv2D(width, 3, padding="same", use_bias=False,
                                    name=f"{name}_conv2")(h)
            h = keras.layers.BatchNormalization()(h)
            if stride != 1 or shortcut.shape[-1] != width:
                shortcut = keras.layers.Conv2D(width, 1, strides=stride, use_bias=False,
                                               name=f"{name}_proj")(shortcut)
            h = keras.layers.ReLU()(keras.layers.Add()([h, shortcut]))
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(x, keras.layers.Dense(classes, activation="softmax")(h))
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "sparse_categorical_crossentropy")
    return model


class StepTimer(keras.callbacks.Callback):
    """Seconds from one batch begin to the next (the callbacks' work included)."""

    def __init__(self):
        super().__init__()
        self.times: list[float] = []
        self._start: float | None = None

    def on_train_batch_begin(self, batch, logs=None):
        now = time.perf_counter()
        if self._start is not None:
            self.times.append(now - self._start)
        self._start = now

    def on_train_end(self, logs=None):
        self._start = None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12, help="timed steps per run (default 12)")
    p.add_argument("--repeats", type=int, default=2, help="runs per condition (default 2)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--probes", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="tiny model and sizes (a smoke run)")
    args = p.parse_args()
    widths, size, steps = ((8, 16, 32), 16, 4) if args.quick else ((64, 128, 256), 32, args.steps)
    batch = 16 if args.quick else args.batch

    keras.utils.set_random_seed(0)
    model = resnet(widths=widths, size=size)
    rng = np.random.default_rng(0)
    n = batch * (steps + 1)
    x = rng.normal(size=(n, size, size, 3)).astype("float32")
    y = rng.integers(0, 10, size=n)
    probes = x[:args.probes]
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    print(f"backend {keras.backend.backend()}, keras {keras.__version__}; {len(convs)} conv "
          f"layers up to {max(c.filters for c in convs)} channels, input {size}x{size}x3, "
          f"batch {batch}, {args.probes} probes, {steps} timed steps x {args.repeats} runs")

    tmp = tempfile.mkdtemp(prefix="layerwatch-big-")
    suggestion: dict = {}

    def callbacks(name: str, run: int) -> list:
        path = os.path.join(tmp, f"{name}{run}.h5")
        if name == "defaults":
            return [LayerWatch(path, probes, mode="overwrite")]
        if name == "suggested":
            return [LayerWatch(path, probes, mode="overwrite", budget=None, **suggestion)]
        return []

    # Untimed: tracing, and the defaults' own budget check (its advice is "suggested").
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=batch, epochs=1, verbose=0,
                  callbacks=[LayerWatch(os.path.join(tmp, "probe.h5"), probes,
                                        mode="overwrite")])
    advice = [str(w.message) for w in caught if "budget" in str(w.message)]
    if advice:
        print("budget warning:", advice[0])
        match = re.search(r"max_channels=(\d+)(?: with every=(\d+))?", advice[0])
        if match:
            suggestion = {"max_channels": int(match.group(1)),
                          "every": int(match.group(2) or 1)}
        else:
            suggestion = {"every": int(re.search(r"every=(\d+)", advice[0]).group(1))}
    else:
        print("no budget warning at defaults")
        suggestion = {"max_channels": 16}
    print("suggested settings:", suggestion)

    names = ["none", "defaults", "suggested"]
    times: dict[str, list[float]] = {k: [] for k in names}
    for run in range(args.repeats):
        for name in names[run % 3:] + names[:run % 3]:
            timer = StepTimer()
            model.fit(x, y, batch_size=batch, epochs=1, verbose=0,
                      callbacks=[timer, *callbacks(name, run)])
            times[name].extend(timer.times[1:])  # the first includes on_train_begin

    base = statistics.median(times["none"])
    print(f"\n{'setting':<12}{'ms/step':>10}{'ratio':>8}{'bytes/snapshot':>16}"
          f"{'raw f32/snapshot':>18}  settings")
    for name in names:
        step = statistics.median(times[name])
        size_s, raw_s = "-", "-"
        if name != "none":
            with open_run(os.path.join(tmp, f"{name}0.h5")) as rec:
                stored, raw = rec.storage_bytes()
                k = max(rec.num_snapshots, 1)
                raw32 = sum(int(np.prod(layer.shape)) * args.probes * 4 for layer in rec.layers)
            size_s, raw_s = f"{stored // k:,}", f"{raw32:,}"
        setting = {"none": "", "defaults": "every=1, all channels",
                   "suggested": ", ".join(f"{k}={v}" for k, v in suggestion.items())}[name]
        print(f"{name:<12}{step * 1e3:>10.1f}{step / base:>8.2f}{size_s:>16}{raw_s:>18}  {setting}")


if __name__ == "__main__":
    main()
