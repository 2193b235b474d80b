"""Wide, deep models: max_channels, channel_selection, every and layers= bound the cost."""

import h5py
import keras
import numpy as np
import pytest

from layerwatch import LayerWatch

# One float16 step (2**-10 relative) and then some: two recorders of one model
# run different graphs (the first is fused into the train step, the second is a
# separate pass, here with the channel selection in it), and oneDNN's kernels
# for them can round differently on another CPU; the float16 stored can then
# be one step apart.
TOL = 2e-3


def _resnet(widths=(16, 32, 256), blocks=3, size=8):
    """ResNet-style: stem + 3 stages x 3 blocks x 2 convs + 2 projections = 21 convs."""
    keras.utils.set_random_seed(0)
    x = keras.Input((size, size, 3))
    h = keras.layers.Conv2D(widths[0], 3, padding="same", activation="relu", name="stem")(x)
    for stage, width in enumerate(widths):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            shortcut = h
            h = keras.layers.Conv2D(width, 3, strides=stride, padding="same", activation="relu",
                                    name=f"s{stage}b{block}_conv1")(h)
            h = keras.layers.Conv2D(width, 3, padding="same", name=f"s{stage}b{block}_conv2")(h)
            if stride != 1 or shortcut.shape[-1] != width:
                shortcut = keras.layers.Conv2D(width, 1, strides=stride,
                                               name=f"s{stage}b{block}_proj")(shortcut)
            h = keras.layers.ReLU()(keras.layers.Add()([h, shortcut]))
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(x, keras.layers.Dense(10, activation="softmax")(h))
    model.compile("adam", "sparse_categorical_crossentropy")
    return model


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    return rng.normal(size=(32, 8, 8, 3)).astype("float32"), rng.integers(0, 10, size=32)


def test_max_channels_every_and_layers_bound_a_wide_resnet(tmp_path, images):
    x, y = images
    model = _resnet()
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) >= 20 and max(c.filters for c in convs) == 256
    full, cut = tmp_path / "full.h5", tmp_path / "cut.h5"
    model.fit(x, y, batch_size=8, epochs=1, verbose=0,
              callbacks=[LayerWatch(full, x[:4], budget=None),
                         LayerWatch(cut, x[:4], max_channels=8, every=2, budget=None,
                                    layers=lambda layer: isinstance(layer, keras.layers.Conv2D)
                                    and "proj" not in layer.name)])
    with h5py.File(full, "r") as f, h5py.File(cut, "r") as g:
        assert len(f["activations"]) == len(convs)
        assert len(g["activations"]) == len(convs) - 2
        assert g["steps"][:].tolist() == [0, 2, 4]
        for key, ds in g["activations"].items():
            wide = f["activations"][key]
            assert ds.shape[-1] == min(8, wide.shape[-1])
            if wide.shape[-1] > 8:
                assert ds.attrs["channels"].tolist() == list(range(8))
                assert ds.attrs["channels_total"] == wide.shape[-1]
            # Same values as the full recording's first channels, at the same steps
            # (up to rounding: see TOL).
            np.testing.assert_allclose(ds[:], wide[::2][..., :8], rtol=TOL, atol=TOL)
        raw_full = sum(ds.size for ds in f["activations"].values()) / len(f["steps"])
        raw_cut = sum(ds.size for ds in g["activations"].values()) / len(g["steps"])
    assert raw_cut < raw_full / 3  # the 16-channel stage halves; 32 and 256 shrink more


def test_variance_selection_picks_the_channels_that_differ_between_probes(tmp_path, images):
    x, y = images
    model = _resnet(widths=(8, 8, 32), blocks=1)
    conv = model.get_layer("s2b0_conv1")
    probes = x[:5]
    before = keras.ops.convert_to_numpy(
        keras.Model(model.inputs[0], conv.output)(probes, training=False))
    path = tmp_path / "run.h5"
    model.fit(x, y, batch_size=8, epochs=1, verbose=0,
              callbacks=[LayerWatch(path, probes, max_channels=4, channel_selection="variance",
                                    budget=None)])
    spread = before.var(axis=0).mean(axis=(0, 1))
    want = sorted(np.argsort(-spread, kind="stable")[:4].tolist())
    with h5py.File(path, "r") as f:
        ds = f["activations/s2b0_conv1"]
        assert ds.attrs["channels"].tolist() == want
        assert want != [0, 1, 2, 3]  # otherwise this test could not tell it from "first"
        np.testing.assert_allclose(ds[0], before[..., want], atol=TOL)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_channels": 0}, "max_channels must be an integer >= 1, or None for all channels. "
                          "Received: max_channels=0"),
    ({"max_channels": 2.5}, "Received: max_channels=2.5"),
    ({"channel_selection": "random"}, "channel_selection must be one of ('first', 'variance'). "
                                      "Received: channel_selection='random'"),
    ({"budget": 2}, "budget must be a share of step time between 0 and 1 (e.g. 0.2), or None. "
                    "Received: budget=2"),
    ({"every": "often"}, "every must be an integer >= 1. Received: every='often'. "
                         "every='auto' picks it from the budget."),
    ({"every": "auto", "budget": None}, "every='auto' needs a budget to aim for. "
                                        "Received: budget=None"),
])
def test_bad_cost_settings_are_refused_with_the_fix(tmp_path, kwargs, message):
    with pytest.raises(ValueError) as info:
        LayerWatch(tmp_path / "run.h5", np.zeros((2, 8, 8, 3), "float32"), **kwargs)
    assert message in str(info.value)
