"""`layerwatch compare`: side-by-side GIFs aligned by step, overlaid curves, refusals."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from layerwatch.rendering import layout as frames
from layerwatch.cli import main
from layerwatch.rendering.compare import CompareError, compare, run_labels
from layerwatch.store import LayerSpec, RunWriter, open_run


def _train(path, activation: str, *, every: int = 1, seed: int = 0):
    import keras

    from layerwatch import LayerWatch

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(2, 3, padding="same", activation=activation, name="conv1"),
        keras.layers.Conv2D(3, 3, strides=2, padding="same", activation=activation, name="conv2"),
        keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")], name=activation)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 8, 8, 1)).astype("float32")
    y = np.arange(24) % 3
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, validation_data=(x[:6], y[:6]),
              callbacks=[LayerWatch(path, x[:4], y[:4], every=every)])
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """tanh recorded at every step, relu at every 2nd step (steps 0..6 and 0, 2, 4, 6)."""
    d = tmp_path_factory.mktemp("runs")
    return _train(d / "tanh.h5", "tanh"), _train(d / "relu.h5", "relu", every=2)


def test_compare_writes_side_by_side_gifs_aligned_on_shared_steps(runs, tmp_path):
    tanh, relu = runs
    with open_run(tanh) as a, open_run(relu) as b:
        assert a.steps.tolist() == list(range(7)) and b.steps.tolist() == [0, 2, 4, 6]
    notes: list[str] = []
    written = compare([tanh, relu], tmp_path / "cmp", notes=notes.append)
    names = sorted(p.name for p in written)
    assert names == ["conv1.gif", "conv1.png", "conv2.gif", "conv2.png", "curves.png"]
    assert any("aligned on the 4 steps all runs recorded (intersection" in n for n in notes)
    gif = iio.imread(tmp_path / "cmp" / "conv1.gif", index=None)
    assert gif.shape[0] == 4  # steps 0, 2, 4, 6
    with Image.open(tmp_path / "cmp" / "conv1.png") as still:
        assert still.size == (gif.shape[2], gif.shape[1])


def test_each_panel_is_exactly_that_runs_frame(runs, tmp_path):
    """Frame 0 and the still: each panel is that run's renderer frame, pixel for pixel."""
    tanh, relu = runs
    compare([tanh, relu], tmp_path / "cmp", layers=["conv2"], labels=["T", "R"])
    first = iio.imread(tmp_path / "cmp" / "conv2.gif", index=0)[..., :3]
    still = np.asarray(Image.open(tmp_path / "cmp" / "conv2.png").convert("RGB"))
    sample = "R  step 6"  # the longest caption: labels are equally long
    panels_first, panels_last = [], []
    for path, label in ((tanh, "T"), (relu, "R")):
        with open_run(path) as run:
            info = run.layer("conv2")
            layout = frames.build_layout(info.shape, info.channel_axis, run.probes_x(),
                                         caption_sample=sample)
            if info.value_range is not None:
                vmin, vmax = -1.0, 1.0
            else:
                from layerwatch.rendering import robust_max
                m = robust_max(run, info.key)
                vmin, vmax = -m, m
            for index, out in ((0, panels_first), (run.num_snapshots - 1, panels_last)):
                frame = layout.compose(run.activations(info.key, index), vmin, vmax,
                                       f"{label}  step {run.steps[index]}")
                out.append(layout.palette[frame])
    sep = np.full((first.shape[0], 4, 3), 255, np.uint8)  # white band between panels
    np.testing.assert_array_equal(first, np.hstack([panels_first[0], sep, panels_first[1]]))
    np.testing.assert_array_equal(still, np.hstack([panels_last[0], sep, panels_last[1]]))


def test_compare_curves_overlay_both_runs(runs, tmp_path):
    written = compare(list(runs), tmp_path / "c", layers="conv1")
    curves = tmp_path / "c" / "curves.png"
    assert curves in written
    with Image.open(curves) as image:
        assert image.size[0] > 800  # loss and accuracy panels side by side


def test_run_labels_disambiguate():
    assert run_labels(["x/a.h5", "y/b.h5"]) == ["a", "b"]
    assert run_labels(["x/run.h5", "y/run.h5"]) == ["x/run", "y/run"]
    assert run_labels(["run.h5", "run.h5"]) == ["1:run", "2:run"]


# --------------------------------------------------------------------------- #
# Refusals
# --------------------------------------------------------------------------- #


def _synthetic(path, layers: dict[str, tuple[int, ...]], *, probes: int = 3, steps=(0, 1)):
    specs = [LayerSpec(k, shape, {"layer_name": k, "activation": "tanh", "channel_axis":
                                  len(shape) - 1, "value_range": np.array([-1.0, 1.0])})
             for k, shape in layers.items()]
    writer = RunWriter.create(str(path), layers=specs,
                              probes_x=np.zeros((probes, 8, 8, 1), np.float32), probes_y=None,
                              metadata={}, texts={}, storage_dtype="float32")
    for s in steps:
        writer.add_snapshot(s, 0, [np.zeros((probes,) + shape, np.float32)
                                   for shape in layers.values()])
    writer.close()
    return path


def test_refuses_runs_whose_layers_differ(tmp_path):
    a = _synthetic(tmp_path / "a.h5", {"conv1": (4, 4, 2), "conv2": (2, 2, 2)})
    b = _synthetic(tmp_path / "b.h5", {"conv1": (4, 4, 2), "conv9": (2, 2, 2)})
    with pytest.raises(CompareError) as info:
        compare([a, b], tmp_path / "out")
    assert str(info.value) == (
        "The runs' layers do not line up (a: conv1, conv2; b: conv1, conv9). Choose layers "
        "all runs recorded with layers=/--layers: conv1.")
    assert not (tmp_path / "out").exists()
    compare([a, b], tmp_path / "out", layers=["conv1"])  # the suggested fix works


def test_refuses_layers_of_different_shapes(tmp_path):
    a = _synthetic(tmp_path / "a.h5", {"conv1": (4, 4, 2)})
    b = _synthetic(tmp_path / "b.h5", {"conv1": (4, 4, 3)})
    with pytest.raises(CompareError, match=r"conv1 has shape \(4, 4, 2\) in a but \(4, 4, 3\) "
                                           r"in b"):
        compare([a, b], tmp_path / "out")


def test_refuses_runs_whose_probes_differ(tmp_path):
    a = _synthetic(tmp_path / "a.h5", {"conv1": (4, 4, 2)}, probes=3)
    b = _synthetic(tmp_path / "b.h5", {"conv1": (4, 4, 2)}, probes=5)
    with pytest.raises(CompareError) as info:
        compare([a, b], tmp_path / "out")
    assert str(info.value).startswith(
        "The runs' probes do not line up: a has 3 probes of shape (8, 8, 1), b has 5 of shape "
        "(8, 8, 1).")


def test_refuses_runs_without_a_shared_step(tmp_path):
    a = _synthetic(tmp_path / "a.h5", {"conv1": (4, 4, 2)}, steps=(0, 1))
    b = _synthetic(tmp_path / "b.h5", {"conv1": (4, 4, 2)}, steps=(5, 6))
    with pytest.raises(CompareError, match=r"share no recorded step \(a: 2 snapshots at steps "
                                           r"0\.\.1, b: 2 snapshots at steps 5\.\.6\)"):
        compare([a, b], tmp_path / "out")


def test_refuses_a_single_run_and_bad_labels(tmp_path):
    a = _synthetic(tmp_path / "a.h5", {"conv1": (4, 4, 2)})
    with pytest.raises(CompareError, match="at least two runs. Received: 1 run"):
        compare([a], tmp_path / "out")
    with pytest.raises(ValueError, match="one label per run: 2 runs. Received: 1 labels"):
        compare([a, a], tmp_path / "out", labels=["x"])


def test_cli_compare(runs, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(main, ["compare", *map(str, runs), "-o", str(tmp_path / "o"),
                              "--layers", "conv1", "--labels", "tanh,relu"])
    assert ok.exit_code == 0, ok.output
    assert "conv1.gif" in ok.output and "curves.png" in ok.output
    a = _synthetic(tmp_path / "a.h5", {"conv1": (4, 4, 2)})
    b = _synthetic(tmp_path / "b.h5", {"conv2": (4, 4, 2)})
    refused = runner.invoke(main, ["compare", str(a), str(b), "-o", str(tmp_path / "x")])
    assert refused.exit_code == 1
    assert refused.output.startswith("Error: The runs' layers do not line up")
    assert "Traceback" not in refused.output
    one = runner.invoke(main, ["compare", str(a)])
    assert one.exit_code == 2 and "compare needs at least two runs" in one.output
    labels = runner.invoke(main, ["compare", str(a), str(a), "--labels", "only-one"])
    assert labels.exit_code == 2 and "one non-empty label per run" in labels.output


# --------------------------------------------------------------------------- #
# Notebook display (the same single-run machinery, in memory)
# --------------------------------------------------------------------------- #


def test_layer_gif_bytes_equal_the_rendered_gif(runs, tmp_path):
    from layerwatch.notebook import layer_gif_bytes
    from layerwatch.rendering import render

    tanh, _ = runs
    render(tanh, tmp_path / "r", layers=["conv1"])
    data = layer_gif_bytes(tanh, "conv1", scale=1, max_frames=None)
    assert data == (tmp_path / "r" / "conv1.gif").read_bytes()


def test_show_returns_an_ipython_image_and_writes_nothing(runs, tmp_path, monkeypatch):
    import sys
    import types

    from layerwatch.notebook import show

    class Image:
        def __init__(self, data=None, format=None):
            self.data, self.format = data, format

    display = types.ModuleType("IPython.display")
    display.Image = Image
    monkeypatch.setitem(sys.modules, "IPython", types.ModuleType("IPython"))
    monkeypatch.setitem(sys.modules, "IPython.display", display)
    monkeypatch.chdir(tmp_path)
    shown = show(runs[0], "conv2", max_frames=3)
    assert isinstance(shown, Image) and shown.format == "gif"
    assert shown.data[:6] == b"GIF89a"
    assert iio.imread(shown.data, index=None, extension=".gif").shape[0] == 3
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=r"no layer 'conv7'. Recorded layers: conv1, conv2"):
        show(runs[0], "conv7")


def test_show_without_ipython_names_the_install(runs, monkeypatch):
    import sys

    from layerwatch.notebook import show

    monkeypatch.setitem(sys.modules, "IPython", None)
    monkeypatch.setitem(sys.modules, "IPython.display", None)
    with pytest.raises(ImportError, match=r"pip install 'layerwatch\[notebook\]'"):
        show(runs[0], "conv1")
