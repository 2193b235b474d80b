"""LayerWatch(saliency=True): the input gradient of the probes, stored and rendered (TensorFlow)."""

import h5py
import numpy as np
import pytest

keras = pytest.importorskip("keras")
if keras.backend.backend() != "tensorflow":
    pytest.skip("these references use tf.GradientTape", allow_module_level=True)
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from layerwatch import LayerWatch, render  # noqa: E402
from layerwatch.record.fused import FusedProbePass  # noqa: E402
from layerwatch.store import AppendError, open_run  # noqa: E402


def _model():
    keras.utils.set_random_seed(0)
    x = keras.Input((8, 8, 2))
    h = keras.layers.Conv2D(4, 3, activation="tanh", name="conv1")(x)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    y = keras.layers.Dense(3, activation="softmax")(h)
    model = keras.Model(x, y)
    model.compile("adam", "sparse_categorical_crossentropy")
    return model


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(64, 8, 8, 2)).astype("f4"), rng.integers(0, 3, 64)


def _tape(model, probes, labels=None):
    x = tf.constant(probes)
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = model(x, training=False)
        if labels is None:
            labels = np.argmax(out.numpy(), axis=1)
        picked = tf.reduce_sum(tf.gather(out, np.asarray(labels)[:, None], axis=1, batch_dims=1))
    return tape.gradient(picked, x).numpy()


@pytest.mark.parametrize("labelled", [True, False])
def test_saliency_matches_a_gradient_tape_at_first_and_last_step(tmp_path, labelled):
    model = _model()
    x, y = _data()
    probes, labels = x[:3], (y[:3] if labelled else None)
    first = _tape(model, probes, labels)
    path = tmp_path / "run.h5"
    model.fit(x, y, batch_size=16, epochs=2, verbose=0,
              callbacks=[LayerWatch(path, probes, labels, saliency=True, budget=None)])
    last = _tape(model, probes, labels)
    with h5py.File(path, "r") as f:
        saliency, steps = f["saliency"][:], f["steps"][:]
        assert f["saliency"].dtype == np.float32
        assert f["activations/conv1"].shape[0] == len(steps)
    assert saliency.shape == (len(steps), 3, 8, 8, 2)
    np.testing.assert_array_equal(steps, np.arange(9))
    scale = np.abs(last).max()
    np.testing.assert_allclose(saliency[0], first, atol=1e-5 * scale)
    np.testing.assert_allclose(saliency[-1], last, atol=1e-5 * scale)
    assert not np.allclose(saliency[0], saliency[-1])
    with open_run(path) as run:
        assert run.has_saliency
        np.testing.assert_array_equal(run.saliency(-1), saliency[-1])
        assert len(list(run.iter_saliency())) == len(steps)


class _TapeEveryStep(keras.callbacks.Callback):
    """The reference: a GradientTape at every batch end, on that step's weights."""

    def __init__(self, probes, labels):
        super().__init__()
        self.probes, self.labels, self.maps = probes, labels, {}

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        self.maps[step] = _tape(self.model, self.probes, self.labels)


def test_saliency_inside_the_train_step_matches_a_gradient_tape_at_every_step(tmp_path):
    # Steps between the first and the last are computed inside the fused train
    # step, from the forward pass that also gives the activations.
    model = _model()
    x, y = _data()
    probes, labels = x[:3], y[:3]
    reference = _TapeEveryStep(probes, labels)
    watch = LayerWatch(tmp_path / "run.h5", probes, labels, saliency=True, budget=None)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[reference, watch])
    assert isinstance(watch._fusion, FusedProbePass), "the fused train step was not used"
    with h5py.File(tmp_path / "run.h5", "r") as f:
        saliency, steps = f["saliency"][:], f["steps"][:]
    scale = max(np.abs(m).max() for m in reference.maps.values())
    for row, step in zip(saliency[1:], steps[1:]):
        np.testing.assert_allclose(row, reference.maps[int(step)], atol=1e-5 * scale,
                                   err_msg=f"step {step}")


def test_render_writes_saliency_gif_with_a_frame_per_snapshot(tmp_path):
    model = _model()
    x, y = _data()
    path = tmp_path / "run.h5"
    model.fit(x, y, batch_size=16, epochs=1, verbose=0,
              callbacks=[LayerWatch(path, x[:2], y[:2], saliency=True, budget=None)])
    written = render(path, tmp_path / "out")
    names = [p.name for p in written]
    assert "saliency.gif" in names and "saliency.png" in names
    with open_run(path) as run:
        n = run.num_snapshots
    with Image.open(tmp_path / "out" / "saliency.gif") as gif:
        assert gif.n_frames == n == 5


def test_no_saliency_dataset_without_the_option(tmp_path):
    model = _model()
    x, y = _data()
    path = tmp_path / "run.h5"
    model.fit(x, y, batch_size=32, epochs=1, verbose=0,
              callbacks=[LayerWatch(path, x[:2], budget=None)])
    with h5py.File(path, "r") as f:
        assert "saliency" not in f
    assert "saliency.gif" not in [p.name for p in render(path, tmp_path / "out")]


def test_append_refuses_a_different_saliency_choice_and_truncates_saliency(tmp_path):
    model = _model()
    x, y = _data()
    path = tmp_path / "run.h5"
    model.fit(x, y, batch_size=16, epochs=1, verbose=0,
              callbacks=[LayerWatch(path, x[:2], saliency=True, budget=None)])
    with pytest.raises(AppendError, match="saliency"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0,
                  callbacks=[LayerWatch(path, x[:2], mode="append", budget=None)])
    # Resuming from step 2 drops the later snapshots, saliency rows included.
    model.optimizer.iterations.assign(2)
    with pytest.warns(UserWarning, match="dropped"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0,
                  callbacks=[LayerWatch(path, x[:2], mode="append", saliency=True,
                                        budget=None)])
    with h5py.File(path, "r") as f:
        steps = f["steps"][:]
        assert f["saliency"].shape[0] == len(steps) == f["activations/conv1"].shape[0]
    np.testing.assert_array_equal(steps, np.arange(7))
    np.testing.assert_allclose(_last_saliency(path), _tape(model, x[:2]), atol=1e-5)


def _last_saliency(path):
    with open_run(path) as run:
        return run.saliency(-1)


def test_multi_input_model_is_refused_at_fit_start(tmp_path):
    a, b = keras.Input((8, 8, 1)), keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(2, 3, name="conv")(keras.layers.Concatenate()([a, b]))
    model = keras.Model([a, b], keras.layers.Dense(2)(keras.layers.Flatten()(h)))
    model.compile("sgd", "mse")
    x = np.zeros((4, 8, 8, 1), "f4")
    with pytest.raises(ValueError, match="one input"):
        model.fit([x, x], np.zeros((4, 2)), verbose=0,
                  callbacks=[LayerWatch(tmp_path / "r.h5", [x[:1], x[:1]], saliency=True)])
