"""LayerWatch(features_every=N): activation-maximization images, stored, checked and rendered."""

import h5py
import numpy as np
import pytest

keras = pytest.importorskip("keras")

from layerwatch import LayerWatch, render  # noqa: E402
from layerwatch.store import AppendError, open_run  # noqa: E402


def _model(activation="tanh"):
    keras.utils.set_random_seed(0)
    x = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, activation=activation, name="conv1")(x)
    h = keras.layers.Conv2D(3, 3, name="conv2")(h)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.Activation("tanh", name="act")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    y = keras.layers.Dense(3, activation="softmax")(h)
    model = keras.Model(x, y)
    model.compile("adam", "sparse_categorical_crossentropy")
    # The recorded tensors: conv1's output, and act's for conv2 (conv2 -> bn -> act).
    taps = keras.Model(x, [model.get_layer("conv1").output, model.get_layer("act").output])
    return model, taps


def _data():
    rng = np.random.default_rng(0)
    return rng.uniform(size=(48, 8, 8, 1)).astype("f4"), np.arange(48) % 3


def _channel_means(taps, images):
    """Per layer, (images, channels): each channel's mean activation, inference mode."""
    outs = taps(images.astype("float32"), training=False)
    return [keras.ops.convert_to_numpy(o).mean(axis=(1, 2)) for o in outs]


def _assert_beats_probes(taps, f, row, probes, keys=("conv1", "conv2")):
    """Row ``row`` of the file's features, recomputed with ``taps``: each image
    excites its channel more than every probe does."""
    probe_means = _channel_means(taps, probes)
    for i, key in enumerate(keys):
        images = f[f"features/images/{key}"][row]
        channels = f[f"features/images/{key}"].attrs["channels"]
        stored = f[f"features/activation/{key}"][row]
        best = f[f"features/probe_best/{key}"][row]
        recomputed = _channel_means(taps, images)[i][np.arange(len(channels)), channels]
        np.testing.assert_allclose(recomputed, stored, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(best, probe_means[i][:, channels].max(axis=0),
                                   rtol=1e-4, atol=1e-5)
        assert (recomputed > probe_means[i][:, channels].max(axis=0)).all(), (key, row)


class _Weights(keras.callbacks.Callback):
    """The recorded tensors' weights after every step."""

    def __init__(self, taps):
        super().__init__()
        self.taps, self.seen = taps, {}

    def on_train_batch_end(self, batch, logs=None):
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        self.seen[step] = self.taps.get_weights()


def _at(taps, weights):
    clone = keras.models.clone_model(taps)
    clone.set_weights(weights)
    return clone


def test_features_beat_every_probe_at_the_step_they_were_made(tmp_path):
    model, taps = _model()
    x, y = _data()
    probes = x[:4]
    path = tmp_path / "run.h5"
    initial = _at(taps, taps.get_weights())
    weights = _Weights(taps)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0,
              callbacks=[LayerWatch(path, probes, y[:4], features_every=5, budget=None),
                         weights])
    with h5py.File(path, "r") as f:
        steps = f["features/steps"][:]
        assert steps.tolist() == [0, 5, 10, 12]
        _assert_beats_probes(_at(taps, weights.seen[5]), f, 1, probes)  # mid-training
        assert f["features/images/conv1"].shape == (len(steps), 4, 8, 8, 1)
        assert f["features/images/conv2"].shape == (len(steps), 3, 8, 8, 1)
        assert f["features/images/conv1"].dtype == np.float32
        assert f["features"].attrs["iterations"] > 0
        _assert_beats_probes(initial, f, 0, probes)
        _assert_beats_probes(taps, f, -1, probes)
        images = f["features/images/conv1"][-1]
        assert images.min() >= probes.min() and images.max() <= probes.max()
        assert not np.allclose(f["features/images/conv1"][0], images)  # training moved it


def test_schedule_follows_features_every_and_the_final_step(tmp_path):
    model, _ = _model()
    x, y = _data()
    path = tmp_path / "run.h5"
    # 6 steps per epoch, 2 epochs: snapshots every 2 steps, features every 5.
    model.fit(x, y, batch_size=8, epochs=2, verbose=0,
              callbacks=[LayerWatch(path, x[:2], every=2, features_every=5,
                                    features_channels=2, budget=None)])
    with h5py.File(path, "r") as f:
        assert f["steps"][:].tolist() == [0, 2, 4, 6, 8, 10, 12]
        assert f["features/steps"][:].tolist() == [0, 5, 10, 12]
        assert f["features/images/conv1"].shape[:2] == (4, 2)
        assert f["features/activation/conv1"].shape == (4, 2)
    with open_run(path) as run:
        assert run.has_features
        assert run.feature_steps.tolist() == [0, 5, 10, 12]
        assert run.feature_layers == ["conv1", "conv2"]
        assert run.features("conv1").shape == (4, 2, 8, 8, 1)
        assert run.features("conv2", -1).shape == (2, 8, 8, 1)
        assert run.feature_settings["every"] == 5


def test_max_channels_takes_the_first_recorded_channels(tmp_path):
    model, taps = _model()
    x, y = _data()
    path = tmp_path / "run.h5"
    model.fit(x, y, batch_size=8, epochs=1, verbose=0,
              callbacks=[LayerWatch(path, x[:4], max_channels=3, channel_selection="variance",
                                    features_every=100, features_channels=2, budget=None)])
    with h5py.File(path, "r") as f:
        kept = f["activations/conv1"].attrs["channels"]
        assert len(kept) == 3
        np.testing.assert_array_equal(f["features/images/conv1"].attrs["channels"], kept[:2])
        assert f["features/steps"][:].tolist() == [0, 6]
        _assert_beats_probes(taps, f, -1, x[:4])


def test_append_continues_features_and_refuses_a_different_choice(tmp_path):
    model, taps = _model()
    x, y = _data()
    path = tmp_path / "run.h5"
    model.fit(x, y, batch_size=8, epochs=1, verbose=0,
              callbacks=[LayerWatch(path, x[:2], features_every=4, budget=None)])
    with pytest.raises(AppendError, match="features_every="):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0,
                  callbacks=[LayerWatch(path, x[:2], mode="append", budget=None)])
    with pytest.raises(AppendError, match="features_channels="):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0,
                  callbacks=[LayerWatch(path, x[:2], mode="append", features_every=4,
                                        features_channels=2, budget=None)])
    model.fit(x, y, batch_size=8, epochs=2, initial_epoch=1, verbose=0,
              callbacks=[LayerWatch(path, x[:2], mode="append", features_every=4,
                                    budget=None)])
    with h5py.File(path, "r") as f:
        assert f["steps"][:].tolist() == list(range(13))
        assert f["features/steps"][:].tolist() == [0, 4, 6, 8, 12]
        assert f["features/images/conv1"].shape[0] == 5
        _assert_beats_probes(taps, f, -1, x[:2])
    # Resuming from step 5 drops the feature rows after it, with the snapshots.
    model.optimizer.iterations.assign(5)
    with pytest.warns(UserWarning, match="dropped"):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0,
                  callbacks=[LayerWatch(path, x[:2], mode="append", features_every=4,
                                        budget=None)])
    with h5py.File(path, "r") as f:
        assert f["steps"][:].tolist() == list(range(12))
        assert f["features/steps"][:].tolist() == [0, 4, 8, 11]
        assert f["features/probe_best/conv2"].shape[0] == 4


def test_a_file_without_features_says_so(tmp_path):
    model, _ = _model()
    x, y = _data()
    path = tmp_path / "run.h5"
    model.fit(x, y, batch_size=16, epochs=1, verbose=0,
              callbacks=[LayerWatch(path, x[:2], budget=None)])
    with h5py.File(path, "r") as f:
        assert "features" not in f
    with open_run(path) as run:
        assert not run.has_features
        assert run.feature_steps.tolist() == []
        with pytest.raises(KeyError, match="features_every="):
            run.features("conv1")
    assert not any(p.name.startswith("features_") for p in render(path, tmp_path / "out"))
    with pytest.raises(AppendError, match="recorded without feature images"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0,
                  callbacks=[LayerWatch(path, x[:2], mode="append", features_every=2,
                                        budget=None)])


@pytest.mark.parametrize("kwargs, message", [
    (dict(features_every=0), "features_every must be an integer >= 1"),
    (dict(features_every=2.5), "features_every must be an integer >= 1"),
    (dict(features_every=True), "features_every must be an integer >= 1"),
    (dict(features_every=2, features_channels=0), "features_channels must be an integer >= 1"),
    (dict(features_every=2, features_channels=None), "features_channels must be an integer"),
])
def test_bad_arguments_are_refused_at_construction(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LayerWatch(tmp_path / "r.h5", np.zeros((1, 8, 8, 1), "f4"), **kwargs)


def test_multi_input_and_subclassed_models_are_refused_at_fit_start(tmp_path):
    a, b = keras.Input((8, 8, 1)), keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(2, 3, name="conv")(keras.layers.Concatenate()([a, b]))
    model = keras.Model([a, b], keras.layers.Dense(2)(keras.layers.Flatten()(h)))
    model.compile("sgd", "mse")
    x = np.zeros((4, 8, 8, 1), "f4")
    with pytest.raises(ValueError, match="features_every= needs a model with one input"):
        model.fit([x, x], np.zeros((4, 2)), verbose=0,
                  callbacks=[LayerWatch(tmp_path / "r.h5", [x[:1], x[:1]], features_every=2)])

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = keras.layers.Conv2D(2, 3)
            self.out = keras.layers.Dense(2)

        def call(self, inputs):
            return self.out(keras.layers.Flatten()(self.conv(inputs)))

    net = Net()
    net(x)
    net.compile("sgd", "mse")
    with pytest.raises(ValueError, match="subclassed"):
        net.fit(x, np.zeros((4, 2)), verbose=0,
                callbacks=[LayerWatch(tmp_path / "s.h5", x[:1], features_every=2)])


def test_render_writes_a_features_gif_per_layer_with_a_frame_per_row(tmp_path):
    import imageio.v3 as iio

    model, _ = _model()
    x, y = _data()
    path = tmp_path / "run.h5"
    model.fit(x, y, batch_size=8, epochs=2, verbose=0,
              callbacks=[LayerWatch(path, x[:2], features_every=4, budget=None)])
    written = {p.name for p in render(path, tmp_path / "out")}
    for stem in ("conv1", "conv2"):
        assert {f"features_{stem}.gif", f"features_{stem}.png"} <= written
    frames = iio.imread(tmp_path / "out" / "features_conv1.gif", index=None)
    assert len(frames) == 4  # steps 0, 4, 8 and 12 (the final step)
    still = iio.imread(tmp_path / "out" / "features_conv1.png")
    assert still.shape[:2] == frames[-1].shape[:2]


def test_uncommitted_feature_rows_are_not_read_and_repair_drops_them(tmp_path):
    from layerwatch.store import repair_run

    model, _ = _model()
    x, y = _data()
    path = tmp_path / "run.h5"
    model.fit(x, y, batch_size=8, epochs=1, verbose=0,
              callbacks=[LayerWatch(path, x[:2], features_every=4, budget=None)])
    # As a writer killed between its two flushes leaves it: one more row of
    # data, and features/steps grown but not yet written (its fill value, -1).
    with h5py.File(path, "r+") as f:
        for name in ("images", "activation", "probe_best"):
            for key in ("conv1", "conv2"):
                ds = f[f"features/{name}/{key}"]
                ds.resize(ds.shape[0] + 1, axis=0)
        f["features/steps"].resize(4, axis=0)
        f["status"][0] = 0
        f.attrs["writer_pid"] = 4_000_000  # no such process: the writer is gone
    with open_run(path) as run:
        assert run.feature_steps.tolist() == [0, 4, 6]
        assert run.features("conv1").shape[0] == 3
        assert run.feature_activation("conv2").shape == (3, 3)
    assert repair_run(path)
    with h5py.File(path, "r") as f:
        assert f["features/steps"][:].tolist() == [0, 4, 6]
        assert {f[f"features/{name}/{key}"].shape[0] for name in ("images", "activation",
                "probe_best") for key in ("conv1", "conv2")} == {3}


def test_a_channel_silent_on_the_seed_starts_from_its_best_probe_a_dead_one_keeps_it(tmp_path):
    import imageio.v3 as iio

    model, _ = _model(activation="relu")
    conv1 = model.get_layer("conv1")
    kernel = np.random.default_rng(0).normal(size=(3, 3, 1, 4)).astype("f4") * 0.3
    kernel[..., 0] = np.abs(kernel[..., 0])  # on for some of every positive input
    bias = np.full(4, 0.1, "f4")
    kernel[..., 1], bias[1] = 0.0, -1.0  # channel 1: relu(-1) everywhere, no gradient
    # channel 3: off on the near-uniform seed start, on where a probe's pixel
    # exceeds its left neighbour by 0.2: ascent must start from that probe.
    kernel[..., 3], bias[3] = 0.0, -0.2
    kernel[1, 1, 0, 3], kernel[1, 0, 0, 3] = 1.0, -1.0
    conv1.set_weights([kernel, bias])
    x, y = _data()
    probes = x[:3]
    path = tmp_path / "run.h5"
    model.fit(x[:8], y[:8], batch_size=8, epochs=1, verbose=0,
              callbacks=[LayerWatch(path, probes, features_every=10, budget=None)])
    with h5py.File(path, "r") as f:
        images = f["features/images/conv1"][0]
        activation, best = f["features/activation/conv1"][0], f["features/probe_best/conv1"][0]
    assert activation[1] == best[1] == 0.0
    np.testing.assert_array_equal(images[1], probes[0])  # the (first) best probe
    assert (activation[[0, 2, 3]] > best[[0, 2, 3]]).all()
    render(path, tmp_path / "out", layers=["conv1"])
    assert len(iio.imread(tmp_path / "out" / "features_conv1.gif", index=None)) == 2
