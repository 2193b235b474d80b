"""Health signals: saturated units and dead channels, health.png and the info lines."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from layerwatch.analysis.health import (dead_channels, health, health_lines, plot_health,
                               saturation_kind)
from layerwatch.store import LayerInfo, LayerSpec, RunWriter, open_run


def _info(activation: str, value_range=None) -> LayerInfo:
    return LayerInfo(key="c", shape=(2, 2, 3), layer_name="c", layer_class="Conv2D",
                     activation=activation, tensor="c", value_range=value_range, channel_axis=2)


@pytest.mark.parametrize("activation, value_range, kind", [
    ("tanh", (-1.0, 1.0), "tanh-like"),
    ("softsign", (-1.0, 1.0), "tanh-like"),
    ("relu", None, "relu-like"),
    ("relu6", (0.0, 6.0), "relu-like"),
    ("sigmoid", (0.0, 1.0), "relu-like"),
    ("linear", None, "unbounded"),
    ("leakyrelu", None, "unbounded"),
    ("gelu", None, "unbounded"),
])
def test_saturation_kind(activation, value_range, kind):
    assert saturation_kind(_info(activation, value_range)).name == kind


def test_dead_channels_are_constant_across_probes_at_every_position():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 3, 3, 4)).astype(np.float32)
    a[..., 1] = 0.0                                   # dead ReLU
    a[..., 2] = np.arange(9, dtype=np.float32).reshape(3, 3)  # varies in space only
    a[..., 3] = 1.0                                   # saturated tanh
    assert dead_channels(a, 2).tolist() == [False, True, True, True]
    a[2, 0, 0, 3] = 0.5                               # one probe differs: alive
    assert dead_channels(a, 2).tolist() == [False, True, True, False]
    a[0, 0, 0, 1] = np.nan                            # diverged: not "dead"
    assert not dead_channels(a, 2)[1]
    assert dead_channels(a[:1], 2) is None            # one probe: undefined


def test_dead_channels_respects_channels_first():
    a = np.random.default_rng(1).normal(size=(4, 3, 5, 5)).astype(np.float32)
    a[:, 1] = 0.25
    assert dead_channels(a, 0).tolist() == [False, True, False]


def _spec(key, activation, value_range=None, shape=(2, 2, 3)):
    attrs = {"layer_name": key, "layer_class": "Conv2D", "activation": activation,
             "tensor": key, "channel_axis": 2}
    if value_range is not None:
        attrs["value_range"] = np.array(value_range)
    return LayerSpec(key, shape, attrs)


def _synthetic(path, *, probes: int = 4):
    """tanh layer saturating over time; relu layer whose channel 0 dies; a linear layer."""
    rng = np.random.default_rng(2)
    specs = [_spec("t", "tanh", (-1.0, 1.0)), _spec("r", "relu"), _spec("l", "linear")]
    writer = RunWriter.create(str(path), layers=specs,
                              probes_x=np.zeros((probes, 8, 8, 1), np.float32), probes_y=None,
                              metadata={"model_name": "synthetic"}, texts={},
                              storage_dtype="float32")
    for i in range(4):
        t = np.tanh(rng.normal(size=(probes, 2, 2, 3)) * 0.5).astype(np.float32)
        t[..., :i] = 1.0  # i channels saturated at +1 (and constant: dead too)
        r = np.abs(rng.normal(size=(probes, 2, 2, 3))).astype(np.float32)
        if i >= 2:
            r[..., 0] = 0.0
        r[0, 0, 0, 2] = 0.0  # one zero unit in an alive channel
        lin = rng.normal(size=(probes, 2, 2, 3)).astype(np.float32)
        writer.add_snapshot(i * 10, 0, [t, r, lin])
    writer.close()
    return path


def test_health_over_a_recording(tmp_path):
    result = health(_synthetic(tmp_path / "run.h5"))
    assert result.steps.tolist() == [0, 10, 20, 30]
    by_key = {layer.key: layer for layer in result.layers}
    t, r, lin = by_key["t"], by_key["r"], by_key["l"]
    assert t.kind == "tanh-like" and r.kind == "relu-like" and lin.kind == "unbounded"
    units = 4 * 2 * 2 * 3
    # tanh(0.5·N(0,1)) never exceeds 0.99 in these few draws; saturated channels do.
    np.testing.assert_allclose(t.saturated, [0, 1 / 3, 2 / 3, 1.0], atol=2 / units)
    assert t.dead.tolist() == [0, 1, 2, 3]
    assert t.final_dead == [0, 1, 2] and t.final_saturated == [0, 1, 2]
    np.testing.assert_allclose(r.saturated, [1 / units, 1 / units, 17 / units, 17 / units])
    assert r.dead.tolist() == [0, 0, 1, 1] and r.final_dead == [0]
    assert np.isnan(lin.saturated).all() and lin.dead.tolist() == [0, 0, 0, 0]
    findings = result.findings()  # in the file's layer order
    assert findings[0].startswith("r: 1 of 3 channels dead (constant across probes): 0")
    assert findings[1].startswith("t: 3 of 3 channels dead (constant across probes): 0, 1, 2")
    assert len(findings) == 2


def test_health_lines_for_info(tmp_path):
    with open_run(_synthetic(tmp_path / "run.h5")) as run:
        lines = health_lines(run)
    assert lines[0] == "  health (final step 30):"
    assert lines[1].startswith("    r: 1 of 3 channels dead (constant across probes): 0;")
    assert lines[2].startswith("    t: 3 of 3 channels dead")
    assert "100.0% of all units saturated" in lines[2]


def test_health_lines_when_all_is_well(tmp_path):
    rng = np.random.default_rng(3)
    writer = RunWriter.create(str(tmp_path / "ok.h5"), layers=[_spec("t", "tanh", (-1.0, 1.0))],
                              probes_x=np.zeros((3, 8, 8, 1), np.float32), probes_y=None,
                              metadata={}, texts={}, storage_dtype="float32")
    writer.add_snapshot(0, 0, [np.tanh(rng.normal(size=(3, 2, 2, 3))).astype(np.float32) * 0.9])
    writer.close()
    with open_run(tmp_path / "ok.h5") as run:
        assert health_lines(run) == [
            "  health (final step 0): no layer ends with dead or saturated channels"]


def test_health_png(tmp_path):
    out = plot_health(health(_synthetic(tmp_path / "run.h5")), tmp_path / "h" / "health.png")
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] >= 800


def test_dead_relu_channel_in_a_real_recording(tmp_path):
    """A conv layer whose kernel is zero and bias negative is dead under ReLU."""
    import keras

    from layerwatch import LayerWatch

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(3, 3, padding="same", activation="relu", name="conv1"),
        keras.layers.Flatten(), keras.layers.Dense(2, activation="softmax")])
    kernel, bias = model.get_layer("conv1").get_weights()
    kernel[..., 1] = 0.0
    bias[1] = -1.0
    model.get_layer("conv1").set_weights([kernel, bias])
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8, 8, 1)).astype("float32")
    y = np.arange(16) % 2
    path = tmp_path / "relu.h5"
    model.fit(x, y, batch_size=8, epochs=1, verbose=0,
              callbacks=[LayerWatch(path, x[:4], layers=["conv1"])])
    result = health(path)
    layer = result.layers[0]
    assert layer.kind == "relu-like"
    assert layer.final_dead == [1]
    assert (layer.dead == 1).all()
    assert (layer.saturated >= 1 / 3).all()  # the dead channel's units are all exactly 0
