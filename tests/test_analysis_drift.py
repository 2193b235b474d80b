"""Linear CKA, drift over a recording, drift.png and the `layerwatch drift` command."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from layerwatch.cli import main
from layerwatch.analysis.drift import (DriftResult, center_gram, centered_gram, cka_from_grams, drift,
                              drift_of_run, linear_cka, plot_drift, settled_step)
from layerwatch.store import LayerSpec, RunWriter, open_run


def reference_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al.'s feature-space formula, written out plainly."""
    x = x.reshape(len(x), -1).astype(np.float64)
    y = y.reshape(len(y), -1).astype(np.float64)
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    return float(np.linalg.norm(y.T @ x, "fro") ** 2
                 / (np.linalg.norm(x.T @ x, "fro") * np.linalg.norm(y.T @ y, "fro")))


def random_orthogonal(d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


# --------------------------------------------------------------------------- #
# CKA itself
# --------------------------------------------------------------------------- #


def test_cka_of_x_with_itself_is_one():
    x = np.random.default_rng(0).normal(size=(30, 7, 7, 4))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_cka_is_invariant_to_isotropic_scaling_and_orthogonal_transforms():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 12))
    y = np.tanh(x @ rng.normal(size=(12, 9)))
    base = linear_cka(x, y)
    assert 0.05 < base < 0.99  # a non-trivial value, so invariance means something
    q = random_orthogonal(12, rng)
    assert linear_cka(3.7 * x, y) == pytest.approx(base, abs=1e-12)
    assert linear_cka(x @ q, y) == pytest.approx(base, abs=1e-12)
    assert linear_cka(0.01 * x @ q, 50 * y @ random_orthogonal(9, rng)) == \
        pytest.approx(base, abs=1e-12)


def test_cka_is_not_invariant_to_anisotropic_scaling():
    # The invariance test above must be able to fail: stretching one feature changes CKA.
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 6))
    y = x + 0.5 * rng.normal(size=(40, 6))
    stretched = x * np.array([10.0, 1, 1, 1, 1, 1])
    assert abs(linear_cka(stretched, y) - linear_cka(x, y)) > 0.05


@pytest.mark.parametrize("n, p, q", [(10, 3136, 200), (50, 8, 8), (200, 64, 1000), (3, 5, 2)])
def test_gram_form_matches_the_feature_space_reference(n, p, q):
    rng = np.random.default_rng(n + p + q)
    x = rng.normal(size=(n, p))
    y = x[:, : min(p, q)] @ rng.normal(size=(min(p, q), q)) + rng.normal(size=(n, q))
    assert linear_cka(x, y) == pytest.approx(reference_cka(x, y), rel=1e-9, abs=1e-12)


def test_cka_of_independent_representations_is_low():
    rng = np.random.default_rng(3)
    assert linear_cka(rng.normal(size=(500, 5)), rng.normal(size=(500, 5))) < 0.05


def test_constant_or_nonfinite_activations_give_nan_not_an_error():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(10, 4))
    assert np.isnan(linear_cka(np.full((10, 4), 0.1), x))   # constant across probes
    assert np.isnan(linear_cka(np.zeros((10, 4)), x))
    bad = x.copy()
    bad[3, 1] = np.nan
    assert np.isnan(linear_cka(bad, x))
    assert np.isnan(linear_cka(x[:1], x[:1]))                  # one probe
    assert centered_gram(np.full((10, 4), 0.1)) is None
    assert np.isnan(cka_from_grams(None, centered_gram(x)))


def test_cka_rejects_different_probe_counts():
    with pytest.raises(ValueError, match=r"same probes.*x.shape=\(10, 4\), y.shape=\(9, 4\)"):
        linear_cka(np.ones((10, 4)), np.ones((9, 4)))


# --------------------------------------------------------------------------- #
# Settled step
# --------------------------------------------------------------------------- #


def test_settled_is_the_first_step_from_which_cka_stays_above_threshold():
    steps = np.array([0, 5, 10, 15, 20, 25])
    assert settled_step(steps, np.array([0.3, 0.95, 0.85, 0.91, 0.97, 1.0])) == 15
    assert settled_step(steps, np.array([0.95, 0.95, 0.9, 0.91, 0.97, 1.0])) == 0
    assert settled_step(steps, np.array([0.1, 0.2, 0.3, 0.4, 0.5, 1.0])) == 25
    assert settled_step(steps, np.array([0.1, 0.2, 0.3, 0.4, 0.5, 1.0]), threshold=0.45) == 20


def test_settled_treats_nan_as_not_settled():
    steps = np.array([0, 1, 2, 3])
    assert settled_step(steps, np.array([0.99, np.nan, 0.99, 1.0])) == 2
    assert settled_step(steps, np.array([0.99, 0.99, 0.99, np.nan])) is None
    assert settled_step(steps[:0], np.array([])) is None


def test_relative_settling_measures_the_share_of_the_drift_done():
    from layerwatch.analysis.drift import _progress

    to_final = np.array([0.8, 0.9, 0.98, 0.97, 1.0])
    np.testing.assert_allclose(_progress(to_final), [0.0, 0.5, 0.9, 0.85, 1.0])
    steps = np.array([0, 10, 20, 30, 40])
    assert settled_step(steps, to_final) == 10               # CKA ≥ 0.9 from step 10 on
    assert settled_step(steps, _progress(to_final)) == 40    # 90 % of the way only at the end
    assert settled_step(steps, _progress(to_final), threshold=0.8) == 20


# --------------------------------------------------------------------------- #
# Drift over a recording
# --------------------------------------------------------------------------- #


def _spec(key, shape, activation="tanh"):
    attrs = {"layer_name": key, "layer_class": "Conv2D", "activation": activation,
             "tensor": key, "channel_axis": len(shape) - 1}
    if activation == "tanh":
        attrs["value_range"] = np.array([-1.0, 1.0])
    return LayerSpec(key, shape, attrs)


def write_run(path, snapshots: dict[str, list[np.ndarray]], steps, *, probes: int):
    """A recording whose activations are given exactly (float32 storage)."""
    keys = list(snapshots)
    specs = [_spec(k, snapshots[k][0].shape[1:]) for k in keys]
    writer = RunWriter.create(
        str(path), layers=specs, probes_x=np.zeros((probes, 8, 8, 1), np.float32),
        probes_y=None, metadata={"model_name": "synthetic"}, texts={"summary": "synthetic"},
        storage_dtype="float32")
    for i, step in enumerate(steps):
        writer.add_snapshot(step, 0, [snapshots[k][i] for k in keys])
        writer.add_batch_logs(step, {"loss": 1.0 / (i + 1)})
    writer.close()
    return path


def _drifting_layer(rng, steps, settle_at, probes=12):
    """Snapshots that move towards a final representation and stop at ``settle_at``."""
    start = rng.normal(size=(probes, 4, 4, 3))
    final = rng.normal(size=(probes, 4, 4, 3))
    out = []
    for s in steps:
        t = min(1.0, s / settle_at)
        out.append(((1 - t) * start + t * final).astype(np.float32))
    return out


def test_drift_of_a_recording_matches_cka_of_its_snapshots(tmp_path):
    rng = np.random.default_rng(5)
    steps = list(range(0, 40, 2))
    layers = {"conv1": _drifting_layer(rng, steps, 10), "conv2": _drifting_layer(rng, steps, 30)}
    path = write_run(tmp_path / "run.h5", layers, steps, probes=12)
    result = drift(path)
    assert isinstance(result, DriftResult)
    assert result.layers == ["conv1", "conv2"]
    assert result.steps.tolist() == steps
    assert result.probe_count == 12 and result.probe_source == "main"
    for row, key in enumerate(result.layers):
        snaps = layers[key]
        expected = [reference_cka(s, snaps[-1]) for s in snaps]
        np.testing.assert_allclose(result.to_final[row], expected, rtol=1e-6, atol=1e-9)
        assert np.isnan(result.consecutive[row, 0])
        np.testing.assert_allclose(result.consecutive[row, 1:],
                                   [reference_cka(a, b) for a, b in zip(snaps, snaps[1:])],
                                   rtol=1e-6, atol=1e-9)
    # Identical from their settling step on: CKA to final is exactly 1 there.
    assert result.settled["conv1"] <= 10 and result.settled["conv2"] <= 30
    assert result.settled["conv1"] < result.settled["conv2"]
    assert result.final_change["conv1"] == pytest.approx(0.0, abs=1e-9)
    assert result.settled_relative["conv1"] <= result.settled["conv2"]


def test_drift_handles_a_layer_that_goes_constant(tmp_path):
    rng = np.random.default_rng(6)
    steps = [0, 1, 2, 3]
    live = [rng.normal(size=(5, 2, 2, 2)).astype(np.float32) for _ in steps]
    dying = live[:2] + [np.zeros((5, 2, 2, 2), np.float32)] * 2  # dead at the end
    path = write_run(tmp_path / "run.h5", {"alive": live, "dead": dying}, steps, probes=5)
    result = drift(path)
    row = result.layers.index("dead")
    assert np.isnan(result.to_final[row]).all()
    assert result.settled["dead"] is None
    assert "n/a" in result.table().splitlines()[2]
    assert result.settled["alive"] == 3


def test_drift_of_a_single_snapshot(tmp_path):
    x = np.random.default_rng(7).normal(size=(4, 3, 3, 2)).astype(np.float32)
    result = drift(write_run(tmp_path / "run.h5", {"conv": [x]}, [0], probes=4))
    # The final Gram is computed apart from the snapshot's (two reads, two matrix
    # products): a BLAS that rounds by memory alignment (MKL) may leave 1 - 1e-16.
    assert result.to_final.shape == (1, 1) and result.to_final[0, 0] == pytest.approx(1.0,
                                                                                   abs=1e-12)
    assert result.settled["conv"] == 0 and np.isnan(result.final_change["conv"])


def test_drift_rejects_unknown_layers_and_bad_thresholds(tmp_path):
    x = np.random.default_rng(8).normal(size=(4, 3, 3, 2)).astype(np.float32)
    path = write_run(tmp_path / "run.h5", {"conv": [x, x]}, [0, 1], probes=4)
    with pytest.raises(ValueError,
                       match=r"The recording has no layer 'conv9'. Recorded layers: conv\."):
        drift(path, layers=["conv9"])
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]. Received: threshold=2"):
        drift(path, threshold=2)
    with pytest.raises(ValueError, match="holds no analysis probes.*analysis_probes="):
        drift(path, probes="analysis")
    with pytest.raises(ValueError, match=r"probes must be 'auto', 'main' or 'analysis'. "
                                         r"Received: probes='all'"):
        drift(path, probes="all")


def test_watch_rejects_a_non_positive_interval(tmp_path):
    from layerwatch.rendering.watch import watch

    x = np.random.default_rng(8).normal(size=(4, 3, 3, 2)).astype(np.float32)
    path = write_run(tmp_path / "run.h5", {"conv": [x, x]}, [0, 1], probes=4)
    with pytest.raises(ValueError, match=r"interval must be > 0 seconds. Received: interval=0"):
        watch(path, tmp_path / "out", interval=0)


def test_drift_needs_two_probes(tmp_path):
    x = np.ones((1, 3, 3, 2), np.float32)
    path = write_run(tmp_path / "run.h5", {"conv": [x, x]}, [0, 1], probes=1)
    with pytest.raises(ValueError, match="CKA needs at least 2 probes; .* has 1 main probe"):
        drift(path)


class _WithAnalysis:
    """A Run that also holds analysis probes: the reader gives their uncentred
    Gram matrices A Aᵀ (what LayerWatch(analysis_probes=...) stores)."""

    def __init__(self, run, analysis: dict[str, list[np.ndarray]], steps):
        self._run, self._analysis = run, analysis
        self.has_analysis = True
        self.analysis_steps = np.asarray(steps)
        self.analysis_probe_count = len(next(iter(analysis.values()))[0])
        self.analysis_layers = list(analysis)

    def __getattr__(self, name):
        return getattr(self._run, name)

    def iter_analysis_grams(self, key, indices=None):
        snaps = self._analysis[self._run.layer(key).key]
        for i in (range(len(snaps)) if indices is None else indices):
            flat = snaps[i].reshape(len(snaps[i]), -1).astype(np.float64)
            yield flat @ flat.T


def test_centring_a_stored_gram_equals_centring_the_features():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(7, 30)) + 5.0
    np.testing.assert_allclose(center_gram(x @ x.T), centered_gram(x), atol=1e-9)
    assert center_gram(np.ones((4, 4))) is None  # identical inputs: no variation


def test_drift_prefers_analysis_probes_when_the_run_has_them(tmp_path):
    rng = np.random.default_rng(9)
    main_snaps = [rng.normal(size=(4, 2, 2, 2)).astype(np.float32) for _ in range(6)]
    path = write_run(tmp_path / "run.h5", {"conv": main_snaps}, list(range(6)), probes=4)
    analysis = {"conv": _drifting_layer(rng, [0, 3, 5], 3, probes=50)}
    with open_run(path) as run:
        wrapped = _WithAnalysis(run, analysis, [0, 3, 5])
        result = drift_of_run(wrapped)
        assert result.probe_source == "analysis" and result.probe_count == 50
        assert result.steps.tolist() == [0, 3, 5]
        assert result.settled["conv"] <= 3
        assert "50 analysis probes" in result.probes_note()
        assert "noisy" not in result.probes_note()
        main_only = drift_of_run(wrapped, probes="main")
        assert main_only.probe_source == "main" and main_only.probe_count == 4
        assert "4 rendered probes (few: values are noisy" in main_only.probes_note()


def test_drift_png_is_written(tmp_path):
    rng = np.random.default_rng(10)
    steps = list(range(12))
    path = write_run(tmp_path / "run.h5", {"a": _drifting_layer(rng, steps, 6),
                                           "b": _drifting_layer(rng, steps, 11)},
                     steps, probes=12)
    out = plot_drift(drift(path), tmp_path / "out" / "drift.png")
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] >= 800 and image.size[1] >= 700


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #


def test_cli_drift_prints_table_and_probe_count_and_writes_png(tmp_path):
    rng = np.random.default_rng(11)
    steps = list(range(0, 20, 2))
    path = write_run(tmp_path / "run.h5", {"conv1": _drifting_layer(rng, steps, 8)}, steps,
                     probes=12)
    result = CliRunner().invoke(main, ["drift", str(path), "-o", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert "CKA rests on 12 rendered probes" in result.output
    assert "settled" in result.output and "conv1" in result.output
    assert (tmp_path / "d" / "drift.png").stat().st_size > 10_000


def test_cli_drift_errors(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(main, ["drift", str(tmp_path / "nope.h5")])
    assert missing.exit_code == 1
    assert missing.output.startswith("Error: ") and "does not exist" in missing.output
    x = np.random.default_rng(12).normal(size=(4, 3, 3, 2)).astype(np.float32)
    path = write_run(tmp_path / "run.h5", {"conv": [x, x]}, [0, 1], probes=4)
    unknown = runner.invoke(main, ["drift", str(path), "--layers", "conv9"])
    assert unknown.exit_code == 1
    assert unknown.output == "Error: The recording has no layer 'conv9'. Recorded layers: conv.\n"
    bad = runner.invoke(main, ["drift", str(path), "--threshold", "1.5"])
    assert bad.exit_code == 2 and "threshold" in bad.output
