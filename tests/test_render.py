import subprocess
import sys

import h5py
import imageio.v3 as iio
import matplotlib
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from layerwatch.rendering import colormap
from layerwatch.cli import main
from layerwatch.rendering import render, safe_stem, select_frames
from layerwatch.store import LayerSpec, RecordingError, RunWriter

TANH = {"layer_class": "Conv2D", "activation": "tanh", "value_range": [-1.0, 1.0],
        "channel_axis": 2}


def make_run(path, *, n=4, layers=None, values=None, probes=2, size=8, metrics=False):
    """A tiny recording: ``layers`` is [(key, shape, attrs)], ``values(i, key, shape)``."""
    layers = layers or [("conv", (4, 4, 2), dict(TANH, layer_name="conv"))]
    values = values or (lambda i, key, shape: np.full((probes, *shape), 0.1 * i, np.float32))
    x = np.linspace(0, 1, probes * size * size, dtype=np.float32).reshape(probes, size, size, 1)
    writer = RunWriter.create(str(path), layers=[LayerSpec(k, s, attrs=a) for k, s, a in layers],
                              probes_x=x, probes_y=np.arange(probes), metadata={}, texts={},
                              storage_dtype="float32")
    for i in range(n):
        epoch = i * 2 // n
        writer.add_snapshot(i, epoch, [values(i, k, s) for k, s, _ in layers])
        if metrics and i:
            writer.add_batch_logs(i, {"loss": 1.0 / i, "accuracy": 0.1 * i})
    if metrics:
        writer.add_epoch_logs(0, n // 2, {"val_loss": 0.7, "val_accuracy": 0.5})
        writer.add_epoch_logs(1, n - 1, {"val_loss": 0.5, "val_accuracy": 0.6})
    writer.close()
    return path


def gif_frames(path):
    return iio.imread(path, index=None)[..., :3]


def rdbu(v, vmin=-1.0, vmax=1.0):
    return np.array(matplotlib.colormaps["RdBu"]((v - vmin) / (vmax - vmin))[:3]) * 255


def cell_pixels(frames, v_index_color):
    """How many pixels per frame have exactly this colour."""
    return (frames == np.asarray(v_index_color, dtype=np.uint8)).all(axis=-1).sum(axis=(1, 2))


# --------------------------------------------------------------------------- #
# What the user gets
# --------------------------------------------------------------------------- #


def test_writes_gif_still_and_curves(tmp_path):
    run = make_run(tmp_path / "run.h5", n=5, metrics=True)
    written = render(run, tmp_path / "out")
    assert [p.name for p in written] == ["conv.gif", "conv.png", "curves.png"]
    frames = gif_frames(tmp_path / "out" / "conv.gif")
    assert frames.shape[0] == 5
    still = np.asarray(Image.open(tmp_path / "out" / "conv.png").convert("RGB"))
    assert still.shape == frames.shape[1:]
    # rows: input + 2 channels of 8 px, 1-px gaps; columns: 2 probes
    assert still.shape[0] > 1 + 3 * 9 and still.shape[1] >= 1 + 2 * 9
    assert np.array_equal(still, frames[-1])
    curves = Image.open(tmp_path / "out" / "curves.png")
    assert curves.format == "PNG" and curves.size[0] >= 800


def test_default_out_dir_is_outputs_run_stem(tmp_path, monkeypatch):
    run = make_run(tmp_path / "my run.h5")
    monkeypatch.chdir(tmp_path)
    written = render(run)
    assert all(p.parent.as_posix() == "outputs/my run" for p in written)
    assert (tmp_path / "outputs" / "my run" / "conv.gif").exists()


def test_constant_layer_has_its_colour_in_every_frame(tmp_path):
    v = 0.5
    run = make_run(tmp_path / "run.h5", n=6,
                   values=lambda i, k, s: np.full((2, *s), v, np.float32))
    render(run, tmp_path / "out")
    frames = gif_frames(tmp_path / "out" / "conv.gif")
    expected = colormap.color_of(v)
    assert np.abs(np.array(expected) - rdbu(v)).max() <= 3  # palette quantization
    # 2 probes x 2 channels x 8x8 pixels, in every frame
    assert cell_pixels(frames, expected).tolist() == [2 * 2 * 64] * 6


def test_value_ranges_map_ends_to_red_and_blue(tmp_path):
    layers = [("relu", (4, 4, 1), {"layer_name": "relu", "activation": "relu"})]

    def values(i, k, s):
        a = np.zeros((2, *s), np.float32)
        a[0] = 3.0   # the robust max of the run
        a[1] = 0.0
        return a

    run = make_run(tmp_path / "run.h5", layers=layers, values=values)
    notes = []
    render(run, tmp_path / "auto", notes=notes.append)
    frames = gif_frames(tmp_path / "auto" / "relu.gif")
    assert cell_pixels(frames, colormap.color_of(1.0)).tolist() == [64] * 4
    assert "relu: colour range ±3 (99.9th percentile of |activation|" in notes[0]
    render(run, tmp_path / "fixed", value_range=6.0)
    frames = gif_frames(tmp_path / "fixed" / "relu.gif")
    assert cell_pixels(frames, colormap.color_of(0.5)).tolist() == [64] * 4


def test_nan_and_inf_get_the_nan_colour(tmp_path):
    def values(i, k, s):
        a = np.full((2, *s), 0.2, np.float32)
        if i >= 2:
            a[0, :2] = np.nan
            a[1, :2] = np.inf
        return a

    run = make_run(tmp_path / "run.h5", values=values)
    render(run, tmp_path / "out")
    frames = gif_frames(tmp_path / "out" / "conv.gif")
    nan = colormap.build_palette()[colormap.NAN]
    # 2 probes x 2 channels x top half of the cell (2 of 4 rows -> 4x8 px)
    assert cell_pixels(frames, nan).tolist() == [0, 0, 128, 128]


def test_every_and_max_frames_keep_first_and_last(tmp_path):
    run = make_run(tmp_path / "run.h5", n=10,
                   values=lambda i, k, s: np.full((2, *s), -0.9 + 0.2 * i, np.float32))
    render(run, tmp_path / "a", every=4)
    assert gif_frames(tmp_path / "a" / "conv.gif").shape[0] == 4  # 0, 4, 8, 9
    render(run, tmp_path / "b", max_frames=3)
    frames = gif_frames(tmp_path / "b" / "conv.gif")
    assert frames.shape[0] == 3
    assert cell_pixels(frames[:1], colormap.color_of(-0.9))[0] == 2 * 2 * 64
    assert cell_pixels(frames[-1:], colormap.color_of(0.9))[0] == 2 * 2 * 64


def test_select_frames():
    assert select_frames(10, every=3).tolist() == [0, 3, 6, 9]
    assert select_frames(10, every=4, max_frames=2).tolist() == [0, 9]
    assert select_frames(1).tolist() == [0]


def test_layers_subset_by_name(tmp_path):
    layers = [("a", (4, 4, 1), dict(TANH, layer_name="first")),
              ("b", (2, 2, 1), dict(TANH, layer_name="second"))]
    run = make_run(tmp_path / "run.h5", layers=layers)
    written = render(run, tmp_path / "out", layers=["second"])
    assert [p.name for p in written] == ["second.gif", "second.png"]


def test_layer_names_never_escape_the_output_directory(tmp_path):
    evil = ["../../escaped", "/abs/escaped", "..", "curves", "a\\b:c*?"]
    layers = [(f"k{i}", (2, 2, 1), dict(TANH, layer_name=name)) for i, name in enumerate(evil)]
    run = make_run(tmp_path / "run.h5", layers=layers, metrics=True)
    out = tmp_path / "deep" / "out"
    written = render(run, out)
    assert all(p.resolve().parent == out.resolve() for p in written)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["escaped.gif", "escaped.png", "abs_escaped.gif", "abs_escaped.png",
                            "layer.gif", "layer.png", "curves_2.gif", "curves_2.png",
                            "a_b_c.gif", "a_b_c.png", "curves.png"])
    assert not list(tmp_path.glob("**/escaped*.gif"))[1:]  # only the one inside out/
    assert safe_stem("../../etc/passwd") == "etc_passwd"


def test_max_bytes_subsamples_frames_and_says_so(tmp_path):
    rng = np.random.default_rng(0)
    layers = [("noisy", (8, 8, 4), dict(TANH, layer_name="noisy"))]
    run = make_run(tmp_path / "run.h5", n=40, layers=layers,
                   values=lambda i, k, s: rng.uniform(-1, 1, (2, *s)).astype(np.float32))
    full = render(run, tmp_path / "full")[0].stat().st_size
    budget = full // 3
    notes = []
    written = render(run, tmp_path / "out", max_bytes=budget, notes=notes.append)
    gif = tmp_path / "out" / "noisy.gif"
    assert gif in written and gif.stat().st_size <= budget
    kept = gif_frames(gif).shape[0]
    assert 2 <= kept < 40
    assert f"noisy.gif: kept {kept} of 40 frames" in " ".join(notes)


def test_max_bytes_reduces_scale_after_frames(tmp_path):
    rng = np.random.default_rng(1)
    layers = [("noisy", (8, 8, 2), dict(TANH, layer_name="noisy"))]
    run = make_run(tmp_path / "run.h5", n=12, layers=layers,
                   values=lambda i, k, s: rng.uniform(-1, 1, (2, *s)).astype(np.float32))
    at_scale_1 = render(run, tmp_path / "one", scale=1)[0].stat().st_size
    notes = []
    render(run, tmp_path / "out", scale=4, max_bytes=at_scale_1, notes=notes.append)
    gif = tmp_path / "out" / "noisy.gif"
    assert gif.stat().st_size <= at_scale_1
    assert "(asked 4)" in " ".join(notes)
    still = Image.open(tmp_path / "out" / "noisy.png")
    assert still.size[0] > Image.open(gif).size[0]  # the still keeps the asked scale


def test_impossible_budget_writes_the_still_only(tmp_path):
    run = make_run(tmp_path / "run.h5")
    notes = []
    written = render(run, tmp_path / "out", max_bytes=200, notes=notes.append)
    assert [p.name for p in written] == ["conv.png"]
    assert not (tmp_path / "out" / "conv.gif").exists()
    assert not list((tmp_path / "out").glob(".*tmp"))
    assert notes == ["conv.gif not written: even its first and last frames at scale 1 exceed "
                     "--max-bytes 200 B; see conv.png for the final step.",
                     "curves.png not written: the recording holds no metrics."]
    with pytest.warns(UserWarning, match="conv.gif not written"):
        render(run, tmp_path / "warned", max_bytes=200)


def test_channels_beyond_max_channels_are_noted(tmp_path):
    layers = [("wide", (2, 2, 5), dict(TANH, layer_name="wide"))]
    run = make_run(tmp_path / "run.h5", layers=layers)
    notes = []
    render(run, tmp_path / "out", max_channels=2, notes=notes.append)
    assert notes[0] == "wide.gif: showing 2 of 5 channels (raise --max-channels to see more)."


def test_no_metrics_no_curves(tmp_path):
    run = make_run(tmp_path / "run.h5")
    notes = []
    written = render(run, tmp_path / "out", notes=notes.append)
    assert "curves.png" not in [p.name for p in written]
    assert notes == ["curves.png not written: the recording holds no metrics."]


def test_progress_reports_every_frame(tmp_path):
    run = make_run(tmp_path / "run.h5", n=5)
    calls = []
    render(run, tmp_path / "out", progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 5) for i in range(1, 6)]


def test_importing_the_renderer_does_not_import_keras():
    code = ("import sys, layerwatch.rendering, layerwatch.cli; "
            "print(sorted(m for m in ('keras', 'tensorflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- #
# Rejected inputs
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("kwargs, message", [
    ({"every": 0}, "every must be an integer >= 1. Received: every=0"),
    ({"max_frames": 1}, "max_frames must be an integer >= 2 (the first and last frames are "
                        "always kept). Received: max_frames=1"),
    ({"fps": 0}, "fps must be a number in (0, 50]. Received: fps=0"),
    ({"scale": 1.5}, "scale must be an integer from 1 to 16. Received: scale=1.5"),
    ({"max_channels": 0}, "max_channels must be an integer >= 1, or None for all. "
                          "Received: max_channels=0"),
    ({"max_bytes": -5}, "max_bytes must be a positive integer. Received: max_bytes=-5"),
    ({"value_range": (1, -1)}, "value_range must be finite with low < high (or m > 0). "
                               "Received: value_range=(1, -1)"),
    ({"value_range": "wide"}, "value_range must be a number m (for -m..m) or a pair (low, high). "
                              "Received: value_range='wide'"),
    ({"layers": ["nope"]}, "The recording has no layer 'nope'. Recorded layers: conv."),
    ({"layers": []}, "layers is empty: name at least one layer, or pass None for all."),
])
def test_bad_options_messages(tmp_path, kwargs, message):
    run = make_run(tmp_path / "run.h5")
    with pytest.raises(ValueError) as info:
        render(run, tmp_path / "out", **kwargs)
    assert str(info.value) == message


def test_missing_foreign_and_empty_recordings(tmp_path):
    with pytest.raises(RecordingError, match="does not exist"):
        render(tmp_path / "missing.h5", tmp_path / "out")
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(RecordingError, match="not a layerwatch recording"):
        render(tmp_path / "foreign.h5", tmp_path / "out")
    empty = make_run(tmp_path / "empty.h5", n=0, metrics=False)
    with pytest.raises(RecordingError, match=r"holds no snapshot yet: nothing to render.$"):
        render(empty, tmp_path / "out")


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #


def test_cli_render_prints_paths_and_sizes(tmp_path):
    run = make_run(tmp_path / "run.h5", metrics=True)
    result = CliRunner().invoke(main, ["render", str(run), "-o", str(tmp_path / "out"),
                                       "--max-bytes", "2MB", "--layers", "conv", "--fps", "5"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split("  (")[0] for line in lines] == [
        str(tmp_path / "out" / name) for name in ("conv.gif", "conv.png", "curves.png")]
    assert all(line.endswith(("kB)", " B)")) for line in lines)


def test_cli_quiet_prints_nothing(tmp_path):
    run = make_run(tmp_path / "run.h5")
    result = CliRunner().invoke(main, ["render", str(run), "-o", str(tmp_path / "out"), "-q",
                                       "--max-bytes", "200"])
    assert result.exit_code == 0 and result.output == ""
    assert (tmp_path / "out" / "conv.png").exists()


def test_cli_notes_go_to_stderr(tmp_path):
    run = make_run(tmp_path / "run.h5")
    result = CliRunner().invoke(main, ["render", str(run), "-o", str(tmp_path / "out"),
                                       "--max-bytes", "200"])
    assert result.exit_code == 0
    assert result.stderr.startswith("note: conv.gif not written")


def test_cli_library_errors_exit_1(tmp_path):
    run = make_run(tmp_path / "run.h5")
    runner = CliRunner()
    result = runner.invoke(main, ["render", str(tmp_path / "missing.h5")])
    assert result.exit_code == 1
    assert result.output == f"Error: {tmp_path / 'missing.h5'} does not exist.\n"
    result = runner.invoke(main, ["render", str(run), "-o", str(tmp_path / "o"),
                                  "--layers", "conv,nope"])
    assert result.exit_code == 1
    assert result.output == "Error: The recording has no layer 'nope'. Recorded layers: conv.\n"


@pytest.mark.parametrize("args, message", [
    (["--max-bytes", "2XB"], "Invalid value for '--max-bytes': '2XB' is not a size; use bytes "
                             "or a unit, e.g. 2000000, 2MB, 500kB."),
    (["--max-bytes", "0"], "Invalid value for '--max-bytes': '0' is not a positive size."),
    (["--range", "0"], "Invalid value for '--range': '0' is not a colour range; use M (for "
                       "-M..M, M > 0) or LOW,HIGH with LOW < HIGH, e.g. --range 1 or "
                       "--range=-0.5,2."),
    (["--scale", "0"], "Invalid value for '--scale': 0 is not in the range 1<=x<=16."),
    (["--every", "0"], "Invalid value for '--every': 0 is not in the range x>=1."),
    (["--max-frames", "1"], "Invalid value for '--max-frames': 1 is not in the range x>=2."),
    (["--fps", "0"], "Invalid value for '--fps': 0.0 is not in the range 0<x<=50."),
])
def test_cli_bad_flags_exit_2(tmp_path, args, message):
    run = make_run(tmp_path / "run.h5")
    result = CliRunner().invoke(main, ["render", str(run), *args])
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == f"Error: {message}"


def test_cli_range_and_sizes_accepted(tmp_path):
    run = make_run(tmp_path / "run.h5")
    result = CliRunner().invoke(main, ["render", str(run), "-o", str(tmp_path / "out"),
                                       "--range=-0.5,2", "--max-bytes", "1.5MiB", "-q"])
    assert result.exit_code == 0, result.output


# --------------------------------------------------------------------------- #
# Curves
# --------------------------------------------------------------------------- #


def test_curves_survive_divergence_and_show_a_changing_learning_rate(tmp_path):
    from layerwatch.rendering.curves import _panels
    from layerwatch.store import open_run

    path = tmp_path / "run.h5"
    writer = RunWriter.create(str(path), layers=[LayerSpec("c", (2, 2, 1), attrs=TANH)],
                              probes_x=np.zeros((1, 2, 2, 1), np.float32), probes_y=None,
                              metadata={}, texts={})
    for i in range(1, 9):
        writer.add_snapshot(i, 0, [np.zeros((1, 2, 2, 1), np.float32)])
        writer.add_batch_logs(i, {"loss": np.nan if i > 5 else 1.0 / i,
                                  "learning_rate": 0.1 / i, "top_k": 0.5})
    writer.add_epoch_logs(0, 8, {"val_loss": np.inf})
    writer.close()
    written = render(path, tmp_path / "out")
    assert written[-1].name == "curves.png"
    with open_run(path) as run:
        assert _panels(run.metrics("batch"), run.metrics("epoch")) == [
            "loss", "top_k", "learning_rate"]


def test_smoothing_does_not_lag():
    from layerwatch.rendering.curves import smooth

    ramp = np.linspace(0, 1, 200)
    # a one-sided moving average of span 10 would trail the ramp by ~0.045
    assert np.abs(smooth(ramp) - ramp)[20:-20].max() < 0.005


def test_max_bytes_keeps_the_frames_where_the_picture_moves(tmp_path):
    """A layer that moves for 20 steps and then only jitters: a tight budget drops
    the jittering frames first, and raises the hysteresis before that."""
    rng = np.random.default_rng(0)
    start, end = rng.uniform(-1, 1, (2, 2, 8, 8, 4))

    def values(i, key, shape):
        t = min(i, 20) / 20
        jitter = 0.08 * rng.standard_normal((2, *shape)) if i > 20 else 0
        return np.clip((1 - t) * start + t * end + jitter, -1, 1).astype(np.float32)

    layers = [("conv", (8, 8, 4), dict(TANH, layer_name="conv"))]
    run = make_run(tmp_path / "run.h5", n=100, layers=layers, values=values)
    everything = render(run, tmp_path / "full")[0].stat().st_size
    notes: list[str] = []
    render(run, tmp_path / "out", max_bytes=int(everything * 0.45), notes=notes.append)
    assert any("hysteresis raised" in note for note in notes), notes
    kept = [line for line in notes if "kept" in line]
    assert kept, notes
    frames = iio.imread(tmp_path / "out" / "conv.gif", index=None)
    assert (tmp_path / "out" / "conv.gif").stat().st_size <= everything * 0.45
    # Read back which steps were kept from the captions' durations: the moving
    # stretch (21 of 100 snapshots) keeps most of its frames.
    from layerwatch.rendering.panel import LayerPanel
    from layerwatch.rendering.selection import by_change
    from layerwatch.store import open_run

    with open_run(run) as opened:
        progress = LayerPanel(opened, opened.layer("conv"), max_channels=None).progress(
            np.arange(100))
    chosen = by_change(np.arange(100), progress, len(frames))
    assert np.isin(np.arange(21), chosen).sum() >= 18
    assert np.isin(np.arange(21, 100), chosen).mean() < 0.5
