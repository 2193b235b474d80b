"""Training processes for the crash and live-reading tests (run as scripts).

``python _child.py keras PATH SCENARIO`` trains a tiny model with LayerWatch;
``python _child.py writer PATH SCENARIO`` drives RunWriter directly (no Keras:
starts in a fraction of a second). Progress goes to stdout, one line per
event, flushed, so the test can act at a known point:

- ``STEP s``: optimizer step s finished (keras) / ``ADDED s``: snapshot s queued (writer)
- ``READY ...``: the process is parked at the scenario's point and can be killed.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import h5py  # noqa: E402
import numpy as np  # noqa: E402


def say(*words):
    # One write(2) per line: the writer thread and the training loop both
    # report, and print() may interleave their pieces.
    os.write(1, (" ".join(str(w) for w in words) + "\n").encode())


def park(*words):
    say("READY", *words)
    time.sleep(600)


def hang_in_resize(dataset, after_calls=0):
    """Park inside the writer thread when it resizes ``dataset`` (mid-write)."""
    original = h5py.Dataset.resize
    seen = {"n": 0, "armed": after_calls == 0}

    def resize(self, size, axis=None):
        if self.name == dataset:
            seen["n"] += 1
            if seen["armed"] or seen["n"] > after_calls:
                # How many snapshots were committed when the kill comes.
                park(self.file["steps"].shape[0])
        return original(self, size, axis)

    h5py.Dataset.resize = resize


def tiny_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 1)).astype("float32")
    return x, np.arange(64) % 3


def tiny_model():
    import keras

    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(4, 3, activation="relu", name="conv1"),
        keras.layers.Conv2D(4, 3, activation="tanh", name="conv2"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3, activation="softmax", name="head"),
    ])
    model.compile("sgd", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def run_keras(path, scenario):
    import keras

    from layerwatch import LayerWatch

    x, y = tiny_data()
    model = tiny_model()

    class Script(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            say("STEP", step)
            if scenario == "idle_mid_epoch" and step == 10:
                park(step)
            if scenario == "in_write" and step == 10:
                # The writer's second block from here on: one block is committed
                # by then however far the writer thread lags behind training.
                hang_in_resize("/steps", after_calls=1)
            if scenario == "live":
                time.sleep(0.2)

        def on_epoch_begin(self, epoch, logs=None):
            if scenario == "between_epochs" and epoch == 1:
                park(epoch)

    if scenario == "live":
        go = path + ".go"
        say("WAITING")
        while not os.path.exists(go):
            time.sleep(0.05)
    # budget=None: no time-budget meter, whose separate snapshots in steps 3-18
    # would decide which steps' probes run in the next train call.
    watch = LayerWatch(path, x[:3], y[:3], flush_seconds=0.5, flush_snapshots=4, budget=None)
    model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[watch, Script()])
    say("DONE")


def run_writer(path, scenario):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from layerwatch.store import LayerSpec, RunWriter

    flush = 2
    layers = [LayerSpec("conv1", (6, 6, 4)), LayerSpec("conv2", (4, 4, 2))]
    writer = RunWriter.create(path, layers=layers, probes_x=np.zeros((3, 8, 8, 1), "f4"),
                              probes_y=None, metadata={}, texts={}, flush_seconds=0.2,
                              flush_snapshots=flush)
    if scenario.startswith("hang:"):
        hang_in_resize(scenario[5:], after_calls=3)
    say("FLUSH_SNAPSHOTS", flush)
    for step in range(1_000_000):
        # Snapshot s holds the value s everywhere: a reader can check that
        # each snapshot it sees is whole and belongs to its step.
        writer.add_snapshot(step, 0, [np.full((3,) + spec.shape, step % 1000, "f4")
                                      for spec in layers])
        writer.add_batch_logs(step, {"loss": float(step)})
        say("ADDED", step)
        time.sleep(0.002)


if __name__ == "__main__":
    kind, path, scenario = sys.argv[1:4]
    (run_keras if kind == "keras" else run_writer)(path, scenario)
