"""The reader against hostile files: every bad file is one clean RecordingError.

Each case is checked twice: the library raises RecordingError with a message
saying what is wrong, and ``layerwatch info`` prints one ``Error:`` line, exits
non-zero and writes nothing.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from _recordings import make_run
from layerwatch.cli import main
from layerwatch.store import (STATUS_COMPLETE, STATUS_RECORDING, STATUS_STOPPED,
                              RecordingError, open_run, read_run, repair_run)


def _edit(path, change):
    with h5py.File(path, "r+") as f:
        change(f)


def _replace(f, name, data, **kwargs):
    del f[name]
    f.create_dataset(name, data=data, **kwargs)


def _huge_attr(f):
    f.attrs["format"] = "layerwatch" + "x" * (2 << 20)


def _big_array_attr(f):
    f.attrs.create("format", np.zeros(200_000, dtype="f8"))


def _absurd_layer(f):
    del f["activations/conv1"]
    f.create_dataset("activations/conv1", shape=(1, 3, 1 << 20, 1 << 20, 1),
                     maxshape=(None, 3, 1 << 20, 1 << 20, 1), chunks=(1, 1, 64, 64, 1),
                     dtype="f2")


def _absurd_steps(f):
    for name in ("steps", "epochs", "wall_time"):
        del f[name]
        f.create_dataset(name, shape=(1 << 40,), maxshape=(None,), chunks=(1024,), dtype="i8")


def _soft_link(f):
    f.move("steps", "steps_real")
    f["steps"] = h5py.SoftLink("/steps_real")


def _external_link(f, target):
    del f["probes/x"]
    f["probes/x"] = h5py.ExternalLink(target, "/data")


def _external_storage(f, target):
    del f["probes/x"]
    f.create_dataset("probes/x", shape=(3, 8, 8, 1), dtype="u1",
                     external=[(target, 0, h5py.h5f.UNLIMITED)])


def _virtual(f, target):
    layout = h5py.VirtualLayout(shape=(3, 8, 8, 1), dtype="f4")
    layout[:] = h5py.VirtualSource(target, "data", shape=(3, 8, 8, 1))
    del f["probes/x"]
    f.create_virtual_dataset("probes/x", layout)


HOSTILE = {
    "format_version": (lambda f: f.attrs.__setitem__("format_version", 99),
                       "has format_version=99; this layerwatch reads versions 1, 2 and 3"),
    "format_string_version": (lambda f: f.attrs.__setitem__("format_version", np.bytes_(b"1")),
                              "has format_version='1'"),
    # variable-length strings are never read (HDF5 can loop forever on a damaged global heap)
    "format_variable_length": (lambda f: f.attrs.__setitem__("format", "layerwatch"),
                               "not a layerwatch recording"),
    "missing_steps": (lambda f: f.__delitem__("steps"), "is damaged: 'steps' is missing."),
    "missing_metrics": (lambda f: f.__delitem__("metrics/batch/values"),
                        "'metrics/batch/values' is missing."),
    "missing_activations": (lambda f: f.__delitem__("activations"),
                            "'activations' is missing."),
    "no_layers": (lambda f: [f["activations"].__delitem__(k) for k in list(f["activations"])],
                  "holds no recorded layer."),
    "steps_2d": (lambda f: _replace(f, "steps", np.zeros((2, 2), "i8")),
                 "'steps' has 2 dimensions."),
    "steps_strings": (lambda f: _replace(f, "steps", np.array([b"a", b"b"])),
                      "'steps' has dtype |S1."),
    "status_shape": (lambda f: _replace(f, "status", np.zeros(5, "i1")),
                     "'status' has shape (5,); expected (1,)."),
    "layer_is_group": (lambda f: (f["activations"].__delitem__("conv2"),
                                  f["activations"].create_group("conv2")),
                       "'activations/conv2' is not a dataset."),
    "layer_wrong_probes": (lambda f: _replace(f, "activations/conv1",
                                              np.zeros((2, 5, 6, 6, 4), "f2")),
                           "activations/conv1 has shape (2, 5, 6, 6, 4); expected (snapshots, 3"),
    "layer_ints": (lambda f: _replace(f, "activations/conv1", np.zeros((2, 3, 6, 6, 4), "i4")),
                   "'activations/conv1' has dtype int32."),
    "layer_low_rank": (lambda f: _replace(f, "activations/conv1", np.zeros((2, 3), "f4")),
                       "'activations/conv1' has 2 dimensions."),
    "probes_y_mismatch": (lambda f: _replace(f, "probes/y", np.arange(7)),
                          "probes/y does not match probes/x."),
    "probes_compound": (lambda f: _replace(f, "probes/x", np.zeros(3, "i4,f4")),
                        "'probes/x' has 1 dimensions."),
    "absurd_layer_shape": (_absurd_layer, "activations/conv1 has shape (1, 3, 1048576"),
    "absurd_steps": (_absurd_steps, "'steps' declares 1099511627776 snapshots."),
    "huge_format_attr": (_huge_attr, "not a layerwatch recording"),
    "array_format_attr": (_big_array_attr, "not a layerwatch recording"),
    "soft_link": (_soft_link, "'steps' is a link, not data."),
    "metric_names_ints": (lambda f: _replace(f, "metrics/epoch/names", np.arange(3)),
                          "'metrics/epoch/names' has dtype int64."),
}


@pytest.fixture
def valid(tmp_path):
    path = tmp_path / "run.h5"
    make_run(path)
    return path


def _assert_clean_cli_error(path, expected, tmp_path):
    before = sorted(os.listdir(tmp_path))
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    assert expected in result.output
    assert "Traceback" not in result.output
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_damaged_layerwatch_files_are_refused_with_the_reason(valid, tmp_path, case):
    change, expected = HOSTILE[case]
    _edit(valid, change)
    with pytest.raises(RecordingError) as info:
        open_run(valid)
    assert expected in str(info.value)
    with pytest.raises(RecordingError):
        read_run(valid)
    _assert_clean_cli_error(valid, expected, tmp_path)


@pytest.mark.parametrize("how", ["external_link", "external_storage", "virtual"])
def test_data_from_other_files_is_never_read(valid, tmp_path, how):
    # A crafted file must not make layerwatch read (and render) another file's bytes.
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"secret" * 100)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["data"] = np.ones((3, 8, 8, 1), "f4")
    target = {"external_link": str(other), "external_storage": str(secret),
              "virtual": str(other)}[how]
    _edit(valid, lambda f: globals()["_" + how](f, target))
    expected = {"external_link": "'probes/x' is a link, not data.",
                "external_storage": "'probes/x' keeps its data in external files.",
                "virtual": "'probes/x' is a virtual dataset"}[how]
    with pytest.raises(RecordingError, match=expected.replace("(", r"\(")):
        open_run(valid)
    _assert_clean_cli_error(valid, expected, tmp_path)


@pytest.mark.parametrize("content, expected", [
    (b"", "is not an HDF5 file (not a layerwatch recording)."),
    (b"loss,accuracy\n0.5,0.9\n", "is not an HDF5 file (not a layerwatch recording)."),
    (b"\x89HDF\r\n\x1a\n" + b"\0" * 40, "is damaged or unreadable"),
])
def test_files_that_are_not_hdf5_are_refused(tmp_path, content, expected):
    path = tmp_path / "run.h5"
    path.write_bytes(content)
    with pytest.raises(RecordingError, match="run.h5"):
        open_run(path)
    _assert_clean_cli_error(path, expected, tmp_path)


def test_missing_file_and_directory_are_refused(tmp_path):
    _assert_clean_cli_error(tmp_path / "nope.h5", "nope.h5 does not exist.", tmp_path)
    with pytest.raises(RecordingError, match="is a directory, not a recording"):
        open_run(tmp_path)


def test_another_programs_hdf5_is_refused(tmp_path):
    path = tmp_path / "weights.h5"
    with h5py.File(path, "w") as f:
        f["dense/kernel"] = np.ones((3, 3))
        f.attrs["keras_version"] = "3.0"
    _assert_clean_cli_error(path, "is an HDF5 file but not a layerwatch recording", tmp_path)


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.3, 0.5, 0.8, 0.95, 0.999])
def test_truncated_files_fail_cleanly_or_read(valid, tmp_path, fraction):
    data = valid.read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[: int(len(data) * fraction)])
    result = CliRunner().invoke(main, ["info", str(cut)])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert "Traceback" not in result.output


def test_huge_metadata_attributes_are_skipped_not_read(valid):
    _edit(valid, lambda f: (f.attrs.__setitem__("model_name", np.bytes_(b"m" * 500_000)),
                            f["activations/conv1"].attrs.__setitem__(
                                "layer_name", np.bytes_(b"n" * 500_000)),
                            f.attrs.__setitem__("big", np.bytes_(b"b" * (2 << 20))),
                            f.attrs.__setitem__("keras_version", "variable-length"),
                            f.attrs.create("junk", np.zeros(100_000))))
    with open_run(valid) as run:
        assert "junk" not in run.attrs  # 800 KB of numbers: not metadata
        assert "big" not in run.attrs  # 2 MB: over the size limit, never read
        assert "keras_version" not in run.attrs  # variable-length strings are never read
        assert run.attrs["model_name"] == "m" * 10_000  # strings are cut
        assert run.layer("conv1").layer_name == "n" * 1000
    result = CliRunner().invoke(main, ["info", str(valid)])
    assert result.exit_code == 0
    assert "  model " + "m" * 57 + "...," in result.output
    assert max(len(line) for line in result.output.splitlines()) < 2000


def test_control_characters_in_names_are_not_printed(valid):
    _edit(valid, lambda f: f["activations"].move("conv1", "conv\x1b[2J\n1"))
    result = CliRunner().invoke(main, ["info", str(valid)])
    assert result.exit_code == 0
    assert "\x1b" not in result.output and "conv?[2J?1  Conv2D" in result.output


def test_nonfinite_activations_are_stored_and_reported(tmp_path):
    path = tmp_path / "run.h5"
    make_run(path, snapshots=8, nan_at={"conv2": 5})
    with open_run(path) as run:
        assert run.first_nonfinite("conv1") is None
        assert run.first_nonfinite("conv2") == 5
        stored = run.activations("conv2")
    assert np.isnan(stored[5, 0, 0, 0, 0]) and np.isinf(stored[6, 0, 0, 0, 0])
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 0
    assert "non-finite values (NaN/inf; training diverged?): conv2 from step 10" in result.output


def test_unexpected_exception_becomes_one_error_line(valid, monkeypatch):
    from layerwatch.analysis import summary

    def boom(path):
        raise TypeError("weird\nsecond line")

    monkeypatch.setattr(summary, "describe_run", boom)
    result = CliRunner().invoke(main, ["info", str(valid)])
    assert result.exit_code == 1
    assert result.output == (
        "Error: unexpected TypeError: weird (if the file is intact, this is a layerwatch bug: "
        "rerun with LAYERWATCH_DEBUG=1 and report the traceback)\n")


def test_repair_of_a_closed_file_changes_nothing(valid):
    before = valid.read_bytes()
    assert repair_run(valid) is False
    assert valid.read_bytes() == before
    result = CliRunner().invoke(main, ["repair", str(valid)])
    assert result.exit_code == 0
    assert result.output == f"{valid} was closed properly; nothing to repair.\n"


def test_repair_refuses_a_file_still_being_written(tmp_path):
    path = tmp_path / "run.h5"
    writer = make_run(path, close=False)
    try:
        result = CliRunner().invoke(main, ["repair", str(path)])
        assert result.exit_code == 1
        assert f"is still being written by process {os.getpid()}" in result.output
        with open_run(path) as run:
            assert run.writer_state == "live" and run.num_snapshots == 6
        assert "status: recording (the writing process" in \
            CliRunner().invoke(main, ["info", str(path)]).output
    finally:
        writer.close()
    with open_run(path) as run:
        assert run.status == STATUS_COMPLETE and run.writer_state == "closed"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_a_new_recording_gets_a_new_files_usual_permissions(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        make_run(tmp_path / "run.h5")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "run.h5").st_mode) == mode
    assert os.listdir(tmp_path) == ["run.h5"]  # no temporary file left beside it


def test_repair_keeps_the_files_permissions(tmp_path):
    path = tmp_path / "run.h5"
    make_run(path)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    with h5py.File(path, "r+") as f:  # as a killed writer leaves it
        f["status"][0] = STATUS_RECORDING
        f.attrs["writer_pid"] = int(gone.stdout)
        f.attrs["writer_host"] = socket.gethostname()
    os.chmod(path, 0o640)
    assert repair_run(path) is True
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    with open_run(path) as run:
        assert run.status == STATUS_STOPPED and run.num_snapshots == 6
    assert os.listdir(tmp_path) == ["run.h5"]


def _writer(path, shapes, **kwargs):
    from layerwatch.store import LayerSpec, RunWriter

    specs = [LayerSpec(key=f"l{i}", shape=shape) for i, shape in enumerate(shapes)]
    return RunWriter.create(str(path), layers=specs, probes_x=np.zeros((2, 4, 4, 1), "f4"),
                            probes_y=None, metadata={}, texts={}, **kwargs)


def test_time_chunks_round_trip_through_early_flushes_and_append(tmp_path):
    """Chunks hold many snapshots; blocks that end mid-chunk, and a resumed file
    whose last chunk is partly filled, still read back exactly."""
    from layerwatch.store import LayerSpec, RunWriter

    rng = np.random.default_rng(0)
    shapes = [(64, 64, 4), (7, 7, 16), (300, 300, 4)]  # 16, 32 and 1 snapshot(s) per chunk
    path = tmp_path / "run.h5"
    writer = _writer(path, shapes, flush_snapshots=5)
    made = []
    for step in range(45):
        arrays = [rng.normal(size=(2,) + s).astype("f4") for s in shapes]
        made.append(arrays)
        writer.add_snapshot(step, 0, arrays)
        if step == 20:
            writer.flush(wait=True)
    writer.close()
    specs = [LayerSpec(key=f"l{i}", shape=s) for i, s in enumerate(shapes)]
    writer = RunWriter.append(str(path), layers=specs, probes_x=np.zeros((2, 4, 4, 1), "f4"),
                              probes_y=None, from_step=44)
    for step in range(45, 60):
        arrays = [rng.normal(size=(2,) + s).astype("f4") for s in shapes]
        made.append(arrays)
        writer.add_snapshot(step, 0, arrays)
    writer.close()
    with h5py.File(path, "r") as f:
        assert [f[f"activations/l{i}"].chunks[0] for i in range(3)] == [16, 32, 1]
        for i in range(3):
            want = np.stack([m[i] for m in made]).astype(np.float16)
            np.testing.assert_array_equal(f[f"activations/l{i}"][:], want)
    with open_run(path) as run:
        assert run.steps.tolist() == list(range(60))
        got = list(run.iter_activations("l0"))
        np.testing.assert_array_equal(got[37], made[37][0].astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("dtype", ["<f2", ">f2", "<f4", ">f4", "<f8"])
def test_shuffle_matches_hdf5s_byte_order(dtype):
    """The writer's byte shuffle is HDF5's: all first bytes in memory order, then
    all second bytes, ..., for every element size and byte order."""
    from layerwatch.store.codec import shuffle as _shuffle

    rows = np.random.default_rng(1).normal(size=(3, 5, 7)).astype(dtype)
    want = rows.view(np.uint8).reshape(-1, rows.itemsize).T.reshape(-1)
    got = _shuffle(rows)
    assert got.dtype == np.uint8 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("storage_dtype", ["float16", "float32"])
def test_chunks_compressed_by_the_writer_read_back_through_hdf5s_filters(tmp_path,
                                                                          storage_dtype):
    """Chunks shuffled and deflated by layerwatch decode through HDF5's own filters."""
    rng = np.random.default_rng(2)
    path = tmp_path / "run.h5"
    writer = _writer(path, [(6, 6, 3)], storage_dtype=storage_dtype)
    made = [np.tanh(rng.normal(size=(2, 6, 6, 3))).astype(storage_dtype) for _ in range(40)]
    for step, array in enumerate(made):
        writer.add_snapshot(step, 0, [array])
    writer.close()
    with h5py.File(path, "r") as f:
        ds = f["activations/l0"]
        assert ds.compression == "gzip" and ds.shuffle and ds.dtype == np.dtype(storage_dtype)
        np.testing.assert_array_equal(ds[:], np.stack(made))


def test_chunks_written_partly_filled_leave_no_holes_in_the_file(tmp_path):
    """A slow run hands snapshots over a few at a time, so chunks are written
    partly filled and rewritten as they fill. In SWMR mode HDF5 never reuses a
    rewritten chunk's old space: the file must still be about the size of one
    written in whole chunks, and read back exactly."""
    rng = np.random.default_rng(2)
    shapes = [(14, 14, 8), (7, 7, 16)]
    made = [[np.tanh(rng.normal(size=(2,) + s)).astype("f4") for s in shapes]
            for _ in range(300)]
    sizes = {}
    for handover in (32, 3):
        path = tmp_path / f"every{handover}.h5"
        writer = _writer(path, shapes, flush_snapshots=32)
        for step, arrays in enumerate(made):
            writer.add_snapshot(step, 0, arrays)
            if (step + 1) % handover == 0:
                writer.flush(wait=True)
        writer.close()
        sizes[handover] = os.path.getsize(path)
        with h5py.File(path, "r") as f:  # plain h5py: HDF5's own deflate filter
            for i in range(len(shapes)):
                want = np.stack([m[i] for m in made]).astype(np.float16)
                np.testing.assert_array_equal(f[f"activations/l{i}"][:], want)
    # Rewritten at new sizes, each chunk's earlier versions stayed in the file
    # (6.1x in layerwatch 0.2.0). Room reserved for growth costs a little.
    assert sizes[3] < 1.3 * sizes[32], sizes


def _rows_on_disk(path):
    """(committed steps, the first layer's rows) as another process reads the
    file being written (SWMR)."""
    code = ("import sys, h5py; f = h5py.File(sys.argv[1], 'r', libver='latest', swmr=True); "
            "n = f['steps'].shape[0]; print(n, f['activations/l0'][:n].astype('f4').sum())")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                         text=True, check=True).stdout.split()
    return int(out[0]), float(out[1])


def test_a_writer_waiting_for_blocks_returns_with_each_block_on_disk(tmp_path):
    """With ``wait_for_blocks`` (the callback's choice on PyTorch) the
    snapshot that completes a block returns once the block is written and
    committed: another process reading the file finds it. Its columns are
    encoded side by side on the writer's encoder threads and read back exactly."""
    rng = np.random.default_rng(3)
    shapes = [(14, 14, 8), (7, 7, 16), (28, 28, 4), (3, 3, 2), (5, 5, 1)]
    path = tmp_path / "run.h5"
    writer = _writer(path, shapes, flush_snapshots=8)
    writer.wait_for_blocks = True
    made = []
    for step in range(16):
        made.append([np.tanh(rng.normal(size=(2,) + s)).astype("f4") for s in shapes])
        writer.add_snapshot(step, 0, made[-1])
        if step in (7, 15):
            want = np.stack([m[0] for m in made]).astype(np.float16).astype("f4").sum()
            assert _rows_on_disk(path) == (step + 1, pytest.approx(want, rel=1e-5))
    writer.close()
    with h5py.File(path, "r") as f:
        for i in range(len(shapes)):
            np.testing.assert_array_equal(f[f"activations/l{i}"][:], np.stack(
                [m[i] for m in made]).astype(np.float16))


def test_a_writer_closed_at_interpreter_exit_writes_its_last_snapshots(tmp_path):
    """The callback closes recordings left open (``fit`` raised) in an ``atexit``
    hook, which runs after Python's thread pools stop taking work: the last
    block is still encoded and written."""
    path = tmp_path / "run.h5"
    code = (
        "import atexit, sys, numpy as np\n"
        "from layerwatch.store import LayerSpec, RunWriter\n"
        "w = RunWriter.create(sys.argv[1], layers=[LayerSpec(key='l0', shape=(7, 7, 16))],\n"
        "                     probes_x=np.zeros((2, 4, 4, 1), 'f4'), probes_y=None,\n"
        "                     metadata={}, texts={})\n"
        "for step in range(5):\n"
        "    w.add_snapshot(step, 0, [np.full((2, 7, 7, 16), step, 'f4')])\n"
        "atexit.register(w.close)\n")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and not done.stderr, done.stderr
    with h5py.File(path, "r") as f:
        assert f["steps"][:].tolist() == list(range(5))
        np.testing.assert_array_equal(f["activations/l0"][:, 0, 0, 0, 0], np.arange(5))


def test_an_encoding_failure_reaches_the_training_loop(tmp_path, monkeypatch):
    """A chunk that fails to encode (on an encoder thread) stops the writer, and the
    error is raised where snapshots are handed over, as a failed write is."""
    from layerwatch.store import codec

    def fail(data, level):
        raise MemoryError("no room to compress")

    monkeypatch.setattr(codec, "deflate", fail)
    writer = _writer(tmp_path / "run.h5", [(7, 7, 16), (3, 3, 2)], flush_snapshots=4)
    writer.wait_for_blocks = True
    with pytest.raises(MemoryError, match="no room to compress"):
        for step in range(4):
            writer.add_snapshot(step, 0, [np.zeros((2, 7, 7, 16), "f4"),
                                          np.zeros((2, 3, 3, 2), "f4")])
    with pytest.raises(MemoryError):
        writer.close()


def test_a_snapshot_of_the_wrong_shape_is_refused_not_written(tmp_path):
    writer = _writer(tmp_path / "run.h5", [(7, 7, 16)])
    writer.add_snapshot(0, 0, [np.zeros((3, 7, 7, 16), "f4")])  # 3 probes, the file has 2
    with pytest.raises(ValueError, match=r"activations/l0: a snapshot of shape \(3, 7, 7, 16\) "
                                         r"does not fit the recording's \(2, 7, 7, 16\)"):
        writer.close()


def test_two_writers_in_one_process_do_not_corrupt_each_other(tmp_path):
    rng = np.random.default_rng(1)
    shapes = [(16, 16, 8)] * 4
    writers = [_writer(tmp_path / f"{name}.h5", shapes, flush_snapshots=1) for name in "ab"]
    made = []
    for step in range(200):
        arrays = [rng.normal(size=(2,) + s).astype("f4") for s in shapes]
        made.append(arrays)
        for writer in writers:
            writer.add_snapshot(step, 0, arrays)
    for writer in writers:
        writer.close()
    for name in "ab":
        with h5py.File(tmp_path / f"{name}.h5", "r") as f:
            for i in range(len(shapes)):
                np.testing.assert_array_equal(f[f"activations/l{i}"][:], np.stack(
                    [m[i] for m in made]).astype(np.float16))


def test_a_version_2_file_written_by_layerwatch_0_3_0_reads_as_before(tmp_path):
    """tests/data/format_v2.h5 was written by 0.3.0 (saliency on; no Grad-CAM,
    occlusion or features, which version 3 added)."""
    path = Path(__file__).parent / "data" / "format_v2.h5"
    with h5py.File(path, "r") as f:
        assert f.attrs["format_version"] == 2
        plain = {key: f["activations"][key][()] for key in f["activations"]}
        saliency = f["saliency"][()]
    with open_run(path) as run:
        assert run.format_version == 2 and run.status == STATUS_COMPLETE
        assert run.steps.tolist() == list(range(7))
        for layer in run.layers:
            np.testing.assert_array_equal(run.activations(layer.key),
                                          plain[layer.key].astype(np.float32))
        np.testing.assert_array_equal(run.saliency(), saliency)
        assert not run.has_gradcam and not run.has_occlusion and not run.has_features
        assert run.occlusion_steps.tolist() == [] and run.feature_steps.tolist() == []
    from layerwatch import render

    written = render(path, tmp_path / "out")
    assert {p.name for p in map(Path, written)} >= {"c1.gif", "c2.gif", "saliency.gif"}


def test_a_version_1_file_written_by_layerwatch_0_2_3_reads_as_before():
    """tests/data/format_v1.h5 was written by 0.2.3 (float16 everywhere, one input)."""
    path = Path(__file__).parent / "data" / "format_v1.h5"
    with h5py.File(path, "r") as f:
        assert f.attrs["format_version"] == 1
        plain = {key: f["activations"][key][()] for key in f["activations"]}
    with open_run(path) as run:
        assert run.attrs["format_version"] == 1 and run.storage_dtype == "float16"
        assert run.status == STATUS_COMPLETE
        assert run.steps.tolist() == [0, 1, 2, 3, 4] and run.epochs.tolist() == [0, 0, 0, 1, 1]
        assert [layer.dtype for layer in run.layers] == ["float16", "float16"]
        assert run.probe_inputs() == {} and run.probes_y().tolist() == [0, 1, 2]
        for layer in run.layers:
            assert layer.probe_input is None
            np.testing.assert_array_equal(run.activations(layer.key),
                                          plain[layer.key].astype(np.float32))
        assert run.layer("conv1").value_range == (-1.0, 1.0)
        batch = run.metrics("batch")
        # Version 1 stored Keras' running means under the metrics' names: read today
        # they are the _running_mean columns, and each step's own value is derived.
        assert batch.names == ["loss_running_mean", "loss", "accuracy_running_mean", "accuracy"]
        steps, running = batch.get("loss_running_mean")
        assert steps.tolist() == [1, 2, 3, 4]
        np.testing.assert_allclose(running, [2.0, 1.0, 2 / 3, 0.5])
        # Epoch 1 ended at step 2: k·m_k − (k−1)·m_(k−1) within each epoch.
        np.testing.assert_allclose(batch.get("loss")[1], [2.0, 0.0, 2 / 3, 1 / 3])
        assert run.metrics("epoch").get("val_loss")[1].tolist() == [1.5]
