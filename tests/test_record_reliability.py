"""Crash safety, live reading and failures during training, for real.

Training runs in child processes (``_child.py``) that the tests SIGKILL at
known points: parked inside a write, idle mid-epoch, between epochs, and at
random moments. Every wait is bounded; children are killed on the way out.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from click.testing import CliRunner

from layerwatch.cli import main
from layerwatch.store import (STATUS_COMPLETE, STATUS_RECORDING, STATUS_STOPPED,
                              RecordingError, RunWriter, open_run, read_run)

CHILD = Path(__file__).with_name("_child.py")
WAIT = 240  # seconds: generous, for a loaded 2-core machine; never reached when all is well


class Child:
    """A training process whose stdout lines arrive on a queue."""

    def __init__(self, kind: str, path: Path, scenario: str, log_dir: Path):
        self.path = path
        self.lines: "queue.Queue[str | None]" = queue.Queue()
        self.seen: list[str] = []
        self._stderr = open(log_dir / f"{path.stem}.stderr", "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
        self.proc = subprocess.Popen([sys.executable, str(CHILD), kind, str(path), scenario],
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                                     env=env)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def wait_for(self, prefix: str) -> str:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"child exited ({self.proc.wait()}) before {prefix!r}; "
                                     f"see {self._stderr.name}")
            self.seen.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"child did not print {prefix!r} within {WAIT} s")

    def kill(self) -> list[str]:
        """SIGKILL, reap (so its pid is free), and return the lines it printed."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        self._reader.join(timeout=60)
        while not self.lines.empty():
            line = self.lines.get()
            if line is not None:
                self.seen.append(line)
        self._stderr.close()
        self.proc.stdout.close()
        return self.seen


def _poll(condition, what: str):
    """Read the file until ``condition(run)`` holds (the writer flushes on a timer)."""
    deadline = time.monotonic() + WAIT
    last = None
    while time.monotonic() < deadline:
        try:
            with open_run(condition.path) as run:
                if condition(run):
                    return
                last = run.num_snapshots
        except RecordingError as exc:  # not created yet
            last = str(exc)
        time.sleep(0.1)
    raise AssertionError(f"{what} never happened; last seen: {last}")


def _when(path, predicate):
    predicate.path = path
    return predicate


@pytest.fixture(scope="module")
def keras_children(tmp_path_factory):
    """The Keras children, started together so their (slow) imports overlap."""
    root = tmp_path_factory.mktemp("children")
    children = {name: Child("keras", root / f"{name}.h5", name, root)
                for name in ("idle_mid_epoch", "between_epochs", "in_write", "live")}
    yield children
    for child in children.values():
        child.kill()


def _assert_killed_file(path: Path, steps: np.ndarray, tmp_path: Path):
    """What a user gets from a file whose writer was SIGKILLed."""
    with open_run(path) as run:
        assert run.status == STATUS_RECORDING and run.writer_state == "gone"
        np.testing.assert_array_equal(run.steps, steps)
    data = read_run(path)
    for key, values in data["activations"].items():
        assert values.shape[0] == len(steps) and np.isfinite(values).all(), key
    info = CliRunner().invoke(main, ["info", str(path)])
    assert info.exit_code == 0, info.output
    assert "status: incomplete: the run ended without closing (the writing process" in info.output
    assert f"snapshots: {len(steps)}, steps {steps[0]}..{steps[-1]}" in info.output
    out = tmp_path / "render"
    rendered = CliRunner().invoke(main, ["render", str(path), "-o", str(out), "--quiet"])
    assert rendered.exit_code == 0, rendered.output
    assert {"conv1.gif", "conv2.gif", "conv1.png", "conv2.png"} <= set(os.listdir(out))
    # The documented plain-h5py routes: SWMR reading as is, or repair first.
    with pytest.raises(OSError, match="already open for write"):
        h5py.File(path, "r")
    with h5py.File(path, "r", swmr=True) as f:
        assert f["steps"].shape[0] >= len(steps)
        np.testing.assert_array_equal(f["steps"][: len(steps)], steps)
    repaired = CliRunner().invoke(main, ["repair", str(path)])
    assert repaired.exit_code == 0, repaired.output
    assert repaired.output == (f"Repaired {path}: {len(steps)} snapshot(s) kept, marked "
                               "stopped; plain h5py.File(path) opens it now.\n")
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["steps"][()], steps)
        assert f["activations/conv1"].shape[0] == len(steps)
        assert f["status"][0] == STATUS_STOPPED


def test_kill_while_idle_mid_epoch_loses_nothing_flushed(keras_children, tmp_path):
    # Parked after step 10 with fewer than flush_snapshots waiting: the writer
    # thread's timer must still put the snapshots taken on disk. On TensorFlow
    # and JAX the probes of step 10 run inside step 11's train call
    # (layerwatch/record/fused.py, jax_fused.py), which also reads the learning
    # rate logged with step 10: a kill while parked costs that one step's
    # snapshot and logs; steps 0..9 are on disk. PyTorch records step 10 at its
    # batch end.
    child = keras_children["idle_mid_epoch"]
    assert child.wait_for("READY") == "READY 10"
    taken = 11 if keras.backend.backend() == "torch" else 10
    _poll(_when(child.path, lambda run: run.num_snapshots == taken), "steps on disk")
    time.sleep(0.5)
    with open_run(child.path) as run:
        assert run.num_snapshots == taken  # and no more while parked
    child.kill()
    _assert_killed_file(child.path, np.arange(taken), tmp_path)
    metrics = read_run(child.path)["batch_metrics"]
    np.testing.assert_array_equal(metrics.steps, np.arange(1, taken))
    assert {"loss", "accuracy"} <= set(metrics.names)


def test_kill_between_epochs_then_resume_continues_the_steps(keras_children, tmp_path):
    child = keras_children["between_epochs"]
    child.wait_for("READY")
    _poll(_when(child.path, lambda run: run.num_snapshots == 9
                and len(run.metrics("epoch").steps) == 1), "epoch 1 on disk")
    child.kill()
    with open_run(child.path) as run:
        epoch = run.metrics("epoch")
        assert epoch.steps.tolist() == [8] and epoch.epochs.tolist() == [0]
    resumed = tmp_path / "resumed.h5"
    resumed.write_bytes(child.path.read_bytes())
    _assert_killed_file(child.path, np.arange(9), tmp_path)

    # Resume the killed run from its epoch-1 checkpoint: the file is repaired
    # automatically and the steps go on from 8.
    sys.path.insert(0, str(CHILD.parent))
    import _child

    from layerwatch import LayerWatch

    x, y = _child.tiny_data()
    model = _child.tiny_model()
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)  # optimizer at step 8, as if restored
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, epochs=3, initial_epoch=1, batch_size=8, verbose=0,
                  callbacks=[LayerWatch(resumed, x[:3], y[:3], mode="append")])
    ours = [m for m in _messages(caught) if "dropped" in m or "stopped recording" in m]
    assert not ours, ours  # nothing dropped, nothing failed
    with open_run(resumed) as run:
        np.testing.assert_array_equal(run.steps, np.arange(25))
        assert run.status == STATUS_COMPLETE
        assert run.metrics("epoch").epochs.tolist() == [0, 1, 2]
    with h5py.File(resumed, "r") as f:  # a plain open works after the resume
        assert f["activations/conv2"].shape == (25, 3, 4, 4, 4)


def test_kill_during_a_write_keeps_the_committed_snapshots(keras_children, tmp_path):
    child = keras_children["in_write"]
    committed = int(child.wait_for("READY").split()[1])
    assert committed >= 1
    child.kill()
    _assert_killed_file(child.path, np.arange(committed), tmp_path)


def test_live_reading_while_training_writes(keras_children, tmp_path):
    child = keras_children["live"]
    child.wait_for("WAITING")
    out = tmp_path / "watched"
    watcher = None
    Path(str(child.path) + ".go").touch()
    counts = []
    try:
        _poll(_when(child.path, lambda run: run.num_snapshots > 0), "the first snapshot")
        watcher = subprocess.Popen(
            [sys.executable, "-c", "from layerwatch.cli import main; main()", "watch",
             str(child.path),
             "-o", str(out), "--interval", "0.2", "--max-frames", "50"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        while child.proc.poll() is None:
            data = read_run(child.path)
            n = len(data["steps"])
            np.testing.assert_array_equal(data["steps"], np.arange(n))
            assert all(a.shape[0] == n for a in data["activations"].values())
            info = CliRunner().invoke(main, ["info", str(child.path)])
            assert info.exit_code == 0, info.output
            # Live, or (when training just ended) complete; never "ended without closing".
            assert ("status: recording (the writing process" in info.output
                    or "status: complete" in info.output), info.output
            counts.append(n)
            time.sleep(0.1)
        assert child.proc.wait(timeout=WAIT) == 0
        watched, _ = watcher.communicate(timeout=WAIT)
    finally:
        if watcher is not None and watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    assert counts == sorted(counts) and len(set(counts)) >= 3, counts
    with h5py.File(child.path, "r") as f:  # complete: plain h5py opens it
        np.testing.assert_array_equal(f["steps"][()], np.arange(25))
        assert f["status"][0] == STATUS_COMPLETE
    assert watcher.returncode == 0, watched
    renders = [line for line in watched.splitlines() if line.startswith("rendered ")]
    assert renders and renders[-1].startswith("rendered 25 snapshot(s), up to step 24"), watched
    assert watched.rstrip().endswith("the run is over: its file was closed."), watched
    import imageio.v3 as iio

    assert len(iio.imread(out / "conv1.gif", index=None)) == 25


@pytest.mark.parametrize("dataset", ["/activations/conv2", "/epochs", "/steps",
                                     "/metrics/batch/step"])
def test_kill_inside_each_part_of_a_write(tmp_path, dataset):
    # The child parks when the writer thread resizes ``dataset`` in its 4th
    # block and reports the length of ``steps`` at that moment.
    child = Child("writer", tmp_path / "run.h5", "hang:" + dataset, tmp_path)
    try:
        reported = int(child.wait_for("READY").split()[1])
    finally:
        child.kill()
    n = _assert_consistent(child.path)
    if dataset == "/metrics/batch/step":
        # Parked after this block's steps were written, before its final
        # flush: the block (at most flush_snapshots=2) may or may not be on disk.
        assert reported - 2 <= n <= reported
    else:
        # Parked before this block's steps were touched: exactly the blocks
        # committed before it are there.
        assert n == reported


def _assert_consistent(path: Path, expected: int | None = None) -> int:
    """Snapshot i is step i and holds the value i: no torn or shifted data."""
    with open_run(path) as run:
        n = run.num_snapshots
        if expected is not None:
            assert n == expected
        np.testing.assert_array_equal(run.steps, np.arange(n))
        for layer in run.layers:
            values = run.activations(layer.key)
            np.testing.assert_array_equal(values, np.broadcast_to(
                (np.arange(n) % 1000).reshape((n,) + (1,) * (values.ndim - 1)), values.shape))
        metrics = run.metrics("batch")
        assert np.all(np.diff(metrics.steps) == 1)
        # No rows at all when no block was committed before the kill: the writer
        # thread runs at SCHED_IDLE, and on a loaded machine it may not have run.
        if len(metrics.steps):
            np.testing.assert_array_equal(metrics.get("loss")[1], metrics.steps)
    return n


def test_random_kills_lose_at_most_the_stated_bound(tmp_path):
    """SIGKILL at random moments of a busy writer (flush_snapshots=2)."""
    rng = random.Random(6)
    kills = int(os.environ.get("LAYERWATCH_KILLS", "8"))
    children = [Child("writer", tmp_path / f"run{i}.h5", "plain", tmp_path)
                for i in range(kills)]
    losses = []
    try:
        for child in children:
            flush = int(child.wait_for("FLUSH_SNAPSHOTS").split()[1])
            child.wait_for("ADDED 3")
            time.sleep(rng.uniform(0, 0.5))
            lines = child.kill()
            added = [int(line.split()[1]) for line in lines if line.startswith("ADDED")]
            n = _assert_consistent(child.path)
            lost = added[-1] + 1 - n
            # Held back at a kill: the block being filled (< flush), the one
            # queued (flush) and the one being written (flush).
            assert 0 <= lost <= 3 * flush - 1, (added[-1], n)
            losses.append(lost)
    finally:
        for child in children:
            child.kill()
    print(f"snapshots lost per kill (flush_snapshots=2): {losses}")


def _messages(caught) -> list[str]:
    """Warnings about the recording itself (not the recording-cost advice)."""
    return [str(w.message) for w in caught if "recording costs" not in str(w.message)]


def _tiny_fit(path, callbacks_before=(), callbacks_after=(), **watch_kwargs):
    import keras

    sys.path.insert(0, str(CHILD.parent))
    import _child

    from layerwatch import LayerWatch

    x, y = _child.tiny_data()
    watch = LayerWatch(path, x[:3], y[:3], **watch_kwargs)
    history = _child.tiny_model().fit(
        x, y, epochs=2, batch_size=8, verbose=0,
        callbacks=[*callbacks_before, watch, *callbacks_after])
    return history, keras


def test_write_failure_stops_recording_not_training(tmp_path, monkeypatch):
    path = tmp_path / "run.h5"
    calls = {"n": 0}
    original = RunWriter._write

    def failing_write(self, *args):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(28, "No space left on device")
        return original(self, *args)

    monkeypatch.setattr(RunWriter, "_write", failing_write)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history, _ = _tiny_fit(path, flush_snapshots=2)
    assert len(history.history["loss"]) == 2  # training finished
    ours = [m for m in _messages(caught) if "No space left" in m or "writ" in m]
    assert len(ours) == 1, ours
    assert "layerwatch stopped recording to" in ours[0]
    assert "No space left on device" in ours[0]
    assert "Training goes on; the file keeps what was written before." in ours[0]
    with open_run(path) as run:
        assert run.status == STATUS_STOPPED
        np.testing.assert_array_equal(run.steps, np.arange(run.num_snapshots))
        assert 1 <= run.num_snapshots <= 4
    info = CliRunner().invoke(main, ["info", str(path)])
    assert "status: incomplete: recording stopped early" in info.output


def test_recording_file_removed_during_training(tmp_path):
    import keras

    path = tmp_path / "run.h5"

    class Remove(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 3 and self.model.optimizer.iterations.numpy() == 4:
                os.remove(path)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history, _ = _tiny_fit(path, callbacks_after=[Remove()], flush_seconds=0.1,
                               flush_snapshots=1)
    assert len(history.history["loss"]) == 2
    ours = [m for m in _messages(caught) if "stopped recording" in m or "writ" in m]
    assert len(ours) == 1 and "was removed or replaced while recording" in ours[0], ours
    assert not path.exists()  # not silently recreated


def _diverging_model():
    """conv1 → conv2 → head, where no recorded value depends on how a CPU's
    kernels treat NaN (max/min, ReLU, tanh, pooling and their gradients do
    differ: x86 maxps returns its second operand for NaN, other paths give
    NaN). conv1 is frozen, so no optimizer update can carry conv2's NaN back
    into it; both convs are linear, so a non-finite weight reaches the
    recorded tensor through multiply-adds alone (NaN·x = NaN, x + inf = inf
    on every IEEE-754 CPU)."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(4, 3, name="conv1", trainable=False),
        keras.layers.Conv2D(4, 3, name="conv2"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3, activation="softmax", name="head"),
    ])
    model.compile("sgd", "sparse_categorical_crossentropy")
    return model


def _first_nonfinite_in_file(path, key) -> int | None:
    """Recomputed from the stored values with plain h5py (not layerwatch's reader)."""
    with h5py.File(path, "r") as f:
        values = f["activations"][key][()]
    finite = np.isfinite(values).reshape(len(values), -1).all(axis=1)
    return None if finite.all() else int(np.argmin(finite))


def test_divergence_is_recorded_reported_and_rendered(tmp_path):
    """NaN and inf put into the weights at known steps are stored as they are,
    reported at those steps and drawn in the NaN colour, on any CPU. (Its
    earlier ReLU/tanh model passed or failed by CPU; ONEDNN_MAX_CPU_ISA=SSE41
    or TF_ENABLE_ONEDNN_OPTS=0 run other kernels, to check such a test here.)"""
    import imageio.v3 as iio

    from layerwatch import LayerWatch
    from layerwatch.rendering import colormap

    sys.path.insert(0, str(CHILD.parent))
    import _child

    path = tmp_path / "run.h5"
    # conv2's kernel turns NaN after step 5 (and stays NaN: NaN - lr·g is NaN);
    # conv1's bias turns +inf after step 11 (frozen: nothing updates it).
    onset = {"conv2": 5, "conv1": 11}

    class Diverge(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            if step == onset["conv2"]:
                conv = self.model.get_layer("conv2")
                conv.kernel.assign(np.full(conv.kernel.shape, np.nan, "float32"))
            if step == onset["conv1"]:
                conv = self.model.get_layer("conv1")
                conv.bias.assign(np.full(conv.bias.shape, np.inf, "float32"))

    x, y = _child.tiny_data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _diverging_model().fit(x, y, epochs=2, batch_size=8, verbose=0,
                               callbacks=[Diverge(), LayerWatch(path, x[:3], y[:3])])

    # Stored as computed, every snapshot of its step: finite before the onset,
    # NaN (conv2) or +inf (conv1) everywhere from it on.
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["steps"][()], np.arange(17))
        conv1, conv2 = f["activations/conv1"][()], f["activations/conv2"][()]
    assert np.isfinite(conv2[:5]).all() and np.isnan(conv2[5:]).all()
    assert np.isfinite(conv1[:11]).all() and np.isposinf(conv1[11:]).all()
    # Reported at the step it happened, by the reader and by `layerwatch info`.
    assert {key: _first_nonfinite_in_file(path, key) for key in onset} == onset
    with open_run(path) as run:
        assert {key: run.first_nonfinite(key) for key in onset} == onset
    info = CliRunner().invoke(main, ["info", str(path)])
    assert info.exit_code == 0, info.output
    assert "non-finite values (NaN/inf; training diverged?): conv1 from step 11, conv2 from " \
        "step 5\n" in info.output, info.output
    # Rendered: the NaN colour fills every cell (3 probes x 4 channels x 8x8 px)
    # of every frame from the onset on, and appears nowhere before it.
    out = tmp_path / "out"
    rendered = CliRunner().invoke(main, ["render", str(path), "-o", str(out), "--quiet"])
    assert rendered.exit_code == 0, rendered.output
    nan_rgb = np.array(colormap.NAN_RGB, np.uint8)
    for key, step in onset.items():
        frames = iio.imread(out / f"{key}.gif", index=None)[..., :3]
        assert len(frames) == 17, key
        hits = (frames == nan_rgb).all(axis=-1).sum(axis=(1, 2)).tolist()
        assert hits == [0] * step + [3 * 4 * 64] * (17 - step), (key, hits)
        still = iio.imread(out / f"{key}.png")[..., :3]
        assert (still == nan_rgb).all(axis=-1).sum() == 3 * 4 * 64, key


def test_watch_refuses_a_missing_file_and_stops_on_a_killed_run(tmp_path):
    result = CliRunner().invoke(main, ["watch", str(tmp_path / "nope.h5")])
    assert result.exit_code == 1
    assert result.output == f"Error: {tmp_path / 'nope.h5'} does not exist.\n"
    child = Child("writer", tmp_path / "run.h5", "plain", tmp_path)
    try:
        child.wait_for("ADDED 20")
    finally:
        child.kill()
    result = CliRunner().invoke(main, ["watch", str(child.path), "-o", str(tmp_path / "out"),
                                       "--interval", "0.1"])
    assert result.exit_code == 0, result.output
    assert result.output.endswith(
        "the run ended without closing its file (writer killed or crashed).\n")
    assert (tmp_path / "out" / "conv1.gif").exists()
