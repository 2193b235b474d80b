"""LayerWatch(gradcam=True, occlusion_every=N): Grad-CAM and occlusion maps, stored,
appended, rendered and measured (TensorFlow: the references use tf.GradientTape)."""

import h5py
import numpy as np
import pytest

keras = pytest.importorskip("keras")
if keras.backend.backend() != "tensorflow":
    pytest.skip("these references use tf.GradientTape", allow_module_level=True)
import tensorflow as tf  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from layerwatch import LayerWatch, render  # noqa: E402
from layerwatch.analysis.saliency import stroke_shares  # noqa: E402
from layerwatch.cli import main  # noqa: E402
from layerwatch.store import AppendError, open_run  # noqa: E402


def _model():
    keras.utils.set_random_seed(0)
    x = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, activation="tanh", name="conv1")(x)
    h = keras.layers.Conv2D(5, 3, name="conv2")(h)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.ReLU(name="relu2")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    y = keras.layers.Dense(3, activation="softmax")(h)
    model = keras.Model(x, y)
    model.compile("adam", "sparse_categorical_crossentropy")
    return model


def _data():
    rng = np.random.default_rng(0)
    x = np.zeros((48, 8, 8, 1), "f4")
    y = rng.integers(0, 3, 48)
    for i, label in enumerate(y):  # a bright stroke whose place says the class
        x[i, 1:7, 2 + 2 * label, 0] = 1.0
    x += rng.normal(scale=0.05, size=x.shape).astype("f4")
    return x, y


def _tape_gradcam(model, probes, labels, layer_names):
    """Grad-CAM by hand: the tensors of ``layer_names`` as extra outputs of a model."""
    tapped = keras.Model(model.inputs, [model.get_layer(n).output for n in layer_names]
                         + [model.output])
    x = tf.constant(probes)
    with tf.GradientTape() as tape:
        outs = tapped(x, training=False)
        acts, out = outs[:-1], outs[-1]
        picked = tf.reduce_sum(tf.gather(out, np.asarray(labels)[:, None], axis=1, batch_dims=1))
    grads = tape.gradient(picked, acts)
    cams = {}
    for name, a, g in zip(layer_names, acts, grads):
        weights = tf.reduce_mean(g, axis=(1, 2), keepdims=True)
        cams[name] = tf.nn.relu(tf.reduce_sum(weights * a, axis=-1)).numpy()
    return cams


def _fit(path, model=None, epochs=1, **kwargs):
    model = model or _model()
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=epochs, verbose=0,
              callbacks=[LayerWatch(path, x[:3], y[:3], budget=None, **kwargs)])
    return model


def test_gradcam_at_step_0_matches_a_gradient_tape(tmp_path):
    model = _model()
    x, y = _data()
    want = _tape_gradcam(model, x[:3], y[:3], ["conv1", "relu2"])
    path = tmp_path / "run.h5"
    _fit(path, model, saliency=True, gradcam=True)
    with h5py.File(path, "r") as f:
        steps = f["steps"][:]
        assert sorted(f["gradcam"]) == ["conv1", "conv2"]
        conv1, conv2 = f["gradcam/conv1"][:], f["gradcam/conv2"][:]
        assert conv1.dtype == np.float32
        assert len(f["saliency"]) == len(steps)
    assert conv1.shape == (len(steps), 3, 6, 6) and conv2.shape == (len(steps), 3, 4, 4)
    # conv2 is linear and feeds BatchNormalization -> ReLU: its recorded tensor is relu2's
    for got, name in ((conv1, "conv1"), (conv2, "relu2")):
        scale = np.abs(want[name]).max()
        assert scale > 0
        np.testing.assert_allclose(got[0], want[name], atol=1e-5 * scale)
    assert (conv1 >= 0).all() and not np.allclose(conv1[0], conv1[-1])


def test_gradcam_alone_and_without_labels_matches_the_tape(tmp_path):
    model = _model()
    x, _ = _data()
    top = np.argmax(model.predict(x[:3], verbose=0), axis=1)
    want = _tape_gradcam(model, x[:3], top, ["conv1"])["conv1"]
    path = tmp_path / "run.h5"
    model.fit(x, _data()[1], batch_size=8, epochs=1, verbose=0,
              callbacks=[LayerWatch(path, x[:3], gradcam=True, budget=None)])
    with h5py.File(path, "r") as f:
        assert "saliency" not in f
        got = f["gradcam/conv1"][0]
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.conv = keras.layers.Conv2D(3, 3, activation="tanh", name="conv")
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.dense = keras.layers.Dense(3, activation="softmax")

    def call(self, x):
        return self.dense(self.pool(self.conv(x)))


def test_gradcam_of_a_subclassed_model_matches_a_gradient_tape(tmp_path):
    keras.utils.set_random_seed(0)
    x, y = _data()
    sub = Subclassed()
    sub(x[:1])
    sub.compile("adam", "sparse_categorical_crossentropy")
    probes = tf.constant(x[:3])
    with tf.GradientTape() as tape:
        a = sub.conv(probes)
        tape.watch(a)
        out = sub.dense(sub.pool(a))
        picked = tf.reduce_sum(tf.gather(out, y[:3, None], axis=1, batch_dims=1))
    g = tape.gradient(picked, a)
    want = tf.nn.relu(tf.reduce_sum(tf.reduce_mean(g, axis=(1, 2), keepdims=True) * a, -1))
    path = tmp_path / "run.h5"
    sub.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[LayerWatch(
        path, x[:3], y[:3], gradcam=True, saliency=True, budget=None)])
    with h5py.File(path, "r") as f:
        got = f["gradcam/conv"][:]
        assert len(got) == len(f["steps"]) == len(f["saliency"]) == 7
    np.testing.assert_allclose(got[0], want.numpy(), atol=1e-5 * np.abs(want).max())
    assert not np.allclose(got[0], got[-1])


def test_max_channels_does_not_change_gradcam(tmp_path):
    _fit(tmp_path / "all.h5", gradcam=True)
    _fit(tmp_path / "cut.h5", gradcam=True, max_channels=1)
    with h5py.File(tmp_path / "all.h5", "r") as a, h5py.File(tmp_path / "cut.h5", "r") as b:
        assert b["activations/conv1"].shape[-1] == 1
        np.testing.assert_allclose(a["gradcam/conv1"][:], b["gradcam/conv1"][:], rtol=1e-5,
                                   atol=1e-7)


def test_occlusion_matches_predict_on_patched_probes_and_its_schedule(tmp_path):
    model = _model()
    x, y = _data()
    probes, labels = x[:3], y[:3]
    path = tmp_path / "run.h5"

    def by_hand():
        fill = probes.mean(dtype=np.float64)
        base = model.predict(probes, verbose=0)[np.arange(3), labels]
        drops = np.zeros((3, 3, 3))
        for i, y0 in enumerate(range(0, 5, 2)):
            for j, x0 in enumerate(range(0, 5, 2)):
                patched = probes.copy()
                patched[:, y0:y0 + 4, x0:x0 + 4] = fill
                drops[:, i, j] = base - model.predict(patched, verbose=0)[np.arange(3), labels]
        return drops

    first = by_hand()
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[LayerWatch(
        path, probes, labels, budget=None, occlusion_every=5, occlusion_patch=4,
        occlusion_stride=2)])
    last = by_hand()
    with h5py.File(path, "r") as f:
        steps, values = f["occlusion/steps"][:], f["occlusion/values"][:]
        attrs = dict(f["occlusion"].attrs)
        assert f["steps"][-1] == 12
    assert steps.tolist() == [0, 5, 10, 12]  # step 0, each multiple of 5, the final step
    assert values.shape == (4, 3, 3, 3) and values.dtype == np.float32
    assert (attrs["patch"], attrs["stride"], attrs["every"]) == (4, 2, 5)
    assert attrs["fill"] == pytest.approx(probes.mean(dtype=np.float64))
    np.testing.assert_allclose(values[0], first, atol=1e-5)
    np.testing.assert_allclose(values[-1], last, atol=1e-5)
    assert np.abs(values[-1]).max() > 1e-3
    with open_run(path) as run:
        assert run.has_occlusion and not run.has_gradcam
        assert run.occlusion_steps.tolist() == [0, 5, 10, 12]
        np.testing.assert_array_equal(run.occlusion(-1), values[-1])
        assert run.occlusion_settings["stride"] == 2
        with pytest.raises(KeyError, match="gradcam=True"):
            run.gradcam("conv1", 0)


def test_occlusion_without_labels_follows_the_top_class(tmp_path):
    model = _model()
    x, y = _data()
    probes = x[:3]
    out = model.predict(probes, verbose=0)
    top = out.argmax(axis=1)
    patched = probes.copy()
    patched[:, 0:8, 0:8] = probes.mean(dtype=np.float64)  # one patch: the whole image
    want = out[np.arange(3), top] - model.predict(patched, verbose=0)[np.arange(3), top]
    path = tmp_path / "run.h5"
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[LayerWatch(
        path, probes, budget=None, occlusion_every=100, occlusion_patch=8)])
    with h5py.File(path, "r") as f:
        assert f["occlusion/steps"][:].tolist() == [0, 6]
        np.testing.assert_allclose(f["occlusion/values"][0, :, 0, 0], want, atol=1e-5)


def test_occlusion_follows_every_and_the_default_stride(tmp_path):
    path = tmp_path / "run.h5"
    _fit(path, every=4, occlusion_every=5, occlusion_patch=3)
    with h5py.File(path, "r") as f:
        assert f["steps"][:].tolist() == [0, 4, 6]
        assert f["occlusion/steps"][:].tolist() == [0, 6]  # only recorded steps; the last
        assert f["occlusion"].attrs["stride"] == 3
        assert f["occlusion/values"].shape == (2, 3, 2, 2)  # (8 - 3) // 3 + 1 positions


def test_append_continues_gradcam_and_occlusion_and_refuses_a_mismatch(tmp_path):
    path = tmp_path / "run.h5"
    options = dict(gradcam=True, occlusion_every=4, occlusion_patch=4)
    model = _fit(path, **options)
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=2, initial_epoch=1, verbose=0,
              callbacks=[LayerWatch(path, x[:3], y[:3], mode="append", budget=None, **options)])
    with h5py.File(path, "r") as f:
        assert f["steps"][:].tolist() == list(range(13))
        assert len(f["gradcam/conv1"]) == 13
        assert f["occlusion/steps"][:].tolist() == [0, 4, 6, 8, 12]
    for changed, message in ((dict(gradcam=False), "recorded with Grad-CAM, this run does not"),
                             (dict(occlusion_every=None), "with occlusion, this run does not"),
                             (dict(occlusion_patch=2), "occlusion_patch=4")):
        with pytest.raises(AppendError, match=message):
            model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[LayerWatch(
                path, x[:3], y[:3], mode="append", budget=None, **{**options, **changed})])
    plain = tmp_path / "plain.h5"
    _fit(plain, model)
    with pytest.raises(AppendError, match="recorded without Grad-CAM"):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[LayerWatch(
            plain, x[:3], y[:3], mode="append", budget=None, gradcam=True)])


@pytest.mark.parametrize("kwargs, message", [
    (dict(occlusion_every=0), "occlusion_every must be an integer >= 1"),
    (dict(occlusion_every=2.5), "occlusion_every must be an integer >= 1"),
    (dict(occlusion_every=2, occlusion_patch=0), "occlusion_patch must be an integer >= 1"),
    (dict(occlusion_every=2, occlusion_stride=-1), "occlusion_stride must be an integer >= 1"),
])
def test_bad_occlusion_arguments_raise_at_construction(tmp_path, kwargs, message):
    x, _ = _data()
    with pytest.raises(ValueError, match=message):
        LayerWatch(tmp_path / "run.h5", x[:3], **kwargs)


def test_unfit_models_are_refused_at_fit_start(tmp_path):
    x, y = _data()
    model = _model()
    with pytest.raises(ValueError, match="does not fit the probes' 8×8 images"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[LayerWatch(
            tmp_path / "a.h5", x[:3], occlusion_every=2, occlusion_patch=9)])

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 1))
    h = keras.layers.GlobalAveragePooling1D()(keras.layers.Conv1D(2, 3)(inputs))
    one_d = keras.Model(inputs, keras.layers.Dense(3)(h))
    one_d.compile("adam", "mse")
    with pytest.raises(ValueError, match="no recorded layer .* with a 2-D spatial output"):
        one_d.fit(x[:, :, 0], np.zeros((48, 3)), epochs=1, verbose=0,
                  callbacks=[LayerWatch(tmp_path / "c.h5", x[:3, :, 0], gradcam=True)])


def test_render_writes_gradcam_and_occlusion_gifs(tmp_path):
    import imageio.v3 as iio

    path = tmp_path / "run.h5"
    _fit(path, gradcam=True, saliency=True, occlusion_every=2, occlusion_patch=4)
    written = {p.name for p in render(path, tmp_path / "out")}
    for name in ("gradcam_conv1", "gradcam_conv2", "occlusion"):
        assert {name + ".gif", name + ".png"} <= written
    with open_run(path) as run:
        n, o = run.num_snapshots, len(run.occlusion_steps)
    assert (n, o) == (7, 4)  # occlusion at 0, 2, 4 and 6, the final step
    assert len(iio.imread(tmp_path / "out" / "gradcam_conv1.gif", index=None)) == n
    assert len(iio.imread(tmp_path / "out" / "occlusion.gif", index=None)) == o
    capped = {p.name for p in render(path, tmp_path / "capped", max_frames=3)}
    assert "gradcam_conv2.gif" in capped
    assert len(iio.imread(tmp_path / "capped" / "gradcam_conv2.gif", index=None)) == 3
    assert len(iio.imread(tmp_path / "capped" / "occlusion.gif", index=None)) == 3
    still = iio.imread(tmp_path / "out" / "gradcam_conv1.png")
    assert still.shape[:2] == iio.imread(tmp_path / "out" / "gradcam_conv1.gif",
                                         index=0).shape[:2]


def test_stroke_shares_on_a_recording(tmp_path):
    path = tmp_path / "run.h5"
    _fit(path, epochs=3, saliency=True, gradcam=True)
    x, _ = _data()
    table = stroke_shares(path, points=3)
    assert table.steps.tolist() == [0, 9, 18]
    mask = x[:3, :, :, 0] > 0.5
    np.testing.assert_allclose(table.area, mask.mean(axis=(1, 2)))
    with h5py.File(path, "r") as f:
        saliency = np.abs(f["saliency"][-1, :, :, :, 0])
        cam = f["gradcam/conv1"][-1]
    share = (saliency * mask).sum(axis=(1, 2)) / saliency.sum(axis=(1, 2))
    np.testing.assert_allclose(table.saliency[-1], share, rtol=1e-5)
    # the 6×6 Grad-CAM is drawn over the 8×8 probe by nearest neighbour
    up = cam[:, (np.arange(8) * 6) // 8][:, :, (np.arange(8) * 6) // 8]
    np.testing.assert_allclose(table.gradcam["conv1"][-1],
                               (up * mask).sum(axis=(1, 2)) / up.sum(axis=(1, 2)), rtol=1e-5)
    assert table.saliency.shape == (3, 3) and set(table.gradcam) == {"conv1", "conv2"}

    result = CliRunner().invoke(main, ["saliency", str(path), "--points", "3"])
    assert result.exit_code == 0, result.output
    assert "stroke" in result.output and "conv1" in result.output
    bare = tmp_path / "bare.h5"
    _fit(bare)
    result = CliRunner().invoke(main, ["saliency", str(bare)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("Error:")
    assert "saliency=True" in result.output


def test_readers_count_committed_rows_and_repair_cuts_them(tmp_path):
    from layerwatch.store import repair_run

    path = tmp_path / "run.h5"
    _fit(path, gradcam=True, occlusion_every=3, occlusion_patch=4)
    with h5py.File(path, "a") as f:
        assert f["occlusion/steps"][:].tolist() == [0, 3, 6]
        # as a killed writer leaves it: one Grad-CAM dataset a row short, occlusion
        # values written without their index, an index grown before its values
        f["gradcam/conv2"].resize(6, axis=0)
        f["occlusion/values"].resize(5, axis=0)
        f["occlusion/steps"].resize(4, axis=0)
        f["status"][0] = 0
        f.attrs["writer_pid"] = 2**22 - 1  # no such process
    with open_run(path) as run:
        assert run.num_snapshots == 6 and len(run.gradcam("conv1")) == 6
        assert run.occlusion_steps.tolist() == [0, 3, 6]  # the -1 fill is not a step
        with pytest.raises(KeyError, match="no Grad-CAM maps of layer 'bn'"):
            run.gradcam("bn")
    assert repair_run(path)
    with h5py.File(path, "r") as f:  # cut to the 6 committed snapshots, steps 0..5
        assert len(f["gradcam/conv1"]) == len(f["gradcam/conv2"]) == 6
        assert f["occlusion/steps"][:].tolist() == [0, 3]
        assert len(f["occlusion/values"]) == 2
