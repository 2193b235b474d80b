"""Recording the models users train: keras.applications, mixed precision, every conv type,
every kind of input pipeline — and never an inf the model did not compute.

The model zoo is marked ``slow`` (about two minutes); the README's test command and CI run it.
"""

import h5py
import imageio.v3 as iio
import keras
import numpy as np
import pytest
from click.testing import CliRunner

from layerwatch import LayerWatch
from layerwatch.cli import main
from layerwatch.record.extractor import CONV_TYPES


def _fit(model, x, y, path, **watch):
    model.fit(x, y, batch_size=len(x) // 2, epochs=1, verbose=0,
              callbacks=[LayerWatch(path, x[:2], budget=None, **watch)])


def _conv_layers(model):
    found = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, CONV_TYPES):
            found.append(layer)
    return found


# --------------------------------------------------------------------------- #
# Storage precision: no inf where the model computed a finite value
# --------------------------------------------------------------------------- #


def _loud_model():
    """A linear conv whose outputs reach 1e6 (past float16's 65504), then a tanh conv."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 1))
    big = keras.layers.Conv2D(2, 3, name="big", kernel_initializer=keras.initializers.Constant(
        1e5))(inp)
    small = keras.layers.Conv2D(2, 3, activation="tanh", name="small")(big)
    out = keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(small))
    model = keras.Model(inp, out)
    model.compile(keras.optimizers.SGD(0.0), "sparse_categorical_crossentropy")
    return model


def test_auto_storage_keeps_unbounded_layers_finite_and_exact(tmp_path):
    x = np.ones((4, 6, 6, 1), "float32")
    model = _loud_model()
    path = tmp_path / "run.h5"
    _fit(model, x, np.zeros(4, int), path)
    want = keras.ops.convert_to_numpy(model.get_layer("big")(x[:2]))
    assert np.abs(want).max() > 65504  # the case float16 cannot hold
    with h5py.File(path, "r") as f:
        assert f.attrs["storage_dtype"].decode() == "auto"
        big, small = f["activations/big"], f["activations/small"]
        assert big.dtype == np.float32 and small.dtype == np.float16
        np.testing.assert_array_equal(big[-1], want)
        assert np.isfinite(big[:]).all() and np.isfinite(small[:]).all()


def test_forced_float16_saturates_instead_of_storing_inf(tmp_path):
    x = np.ones((4, 6, 6, 1), "float32")
    model = _loud_model()
    path = tmp_path / "run.h5"
    _fit(model, x, np.zeros(4, int), path, dtype="float16")
    want = keras.ops.convert_to_numpy(model.get_layer("big")(x[:2]))
    with h5py.File(path, "r") as f:
        big = f["activations/big"]
        assert big.dtype == np.float16 and f.attrs["storage_dtype"].decode() == "float16"
        stored = big[-1].astype(np.float32)
    assert np.isfinite(stored).all()
    np.testing.assert_array_equal(stored, np.clip(want, -65504, 65504).astype(np.float16))


# --------------------------------------------------------------------------- #
# Every conv layer type, recorded and rendered
# --------------------------------------------------------------------------- #

CONV_CASES = {
    "Conv1D": ((16, 2), lambda: keras.layers.Conv1D(3, 3, activation="tanh", name="conv")),
    "Conv3D": ((6, 6, 6, 1), lambda: keras.layers.Conv3D(2, 3, activation="relu", name="conv")),
    "DepthwiseConv2D": ((8, 8, 2), lambda: keras.layers.DepthwiseConv2D(
        3, activation="tanh", name="conv")),
    "SeparableConv2D": ((8, 8, 2), lambda: keras.layers.SeparableConv2D(
        3, 3, activation="relu", name="conv")),
    "Conv2DTranspose": ((5, 5, 2), lambda: keras.layers.Conv2DTranspose(
        2, 3, strides=2, activation="sigmoid", name="conv")),
}


@pytest.mark.parametrize("kind", sorted(CONV_CASES))
def test_every_conv_type_is_recorded_and_rendered(tmp_path, kind):
    shape, make = CONV_CASES[kind]
    keras.utils.set_random_seed(0)
    inp = keras.Input(shape)
    conv = make()
    h = conv(inp)
    out = keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(h))
    model = keras.Model(inp, out)
    model.compile("adam", "sparse_categorical_crossentropy")
    x = np.random.default_rng(0).normal(size=(8,) + shape).astype("float32")
    path = tmp_path / "run.h5"
    _fit(model, x, np.arange(8) % 2, path)
    want = keras.ops.convert_to_numpy(conv(x[:2]))
    with h5py.File(path, "r") as f:
        ds = f["activations/conv"]
        assert ds.shape == (3, 2) + want.shape[1:]
        assert ds.attrs["layer_class"].decode() == kind
        np.testing.assert_allclose(ds[-1], want, rtol=2e-3, atol=2e-3)
    result = CliRunner().invoke(main, ["render", str(path), "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    assert len(iio.imread(tmp_path / "out" / "conv.gif", index=None)) == 3


# --------------------------------------------------------------------------- #
# Input pipelines
# --------------------------------------------------------------------------- #


def _small_model():
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(3, 3, activation="relu", name="conv")(inp)
    out = keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inp, out)
    model.compile("adam", "sparse_categorical_crossentropy")
    return model


class _Batches(keras.utils.PyDataset):
    def __init__(self, x, y, size):
        super().__init__()
        self.x, self.y, self.size = x, y, size

    def __len__(self):
        return len(self.x) // self.size

    def __getitem__(self, i):
        part = slice(i * self.size, (i + 1) * self.size)
        return self.x[part], self.y[part]


def test_pydataset_input_records_every_step(tmp_path, tiny_data):
    x, y = tiny_data
    model = _small_model()
    path = tmp_path / "run.h5"
    model.fit(_Batches(x, y, 12), epochs=2, verbose=0,
              callbacks=[LayerWatch(path, x[:2], budget=None)])
    with h5py.File(path, "r") as f:
        assert f["steps"][:].tolist() == list(range(9))  # 4 batches × 2 epochs + step 0
        assert f["epochs"][:].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1]


def test_an_infinite_tf_data_pipeline_with_steps_per_epoch(tmp_path, tiny_data):
    tf = pytest.importorskip("tensorflow")
    x, y = tiny_data
    model = _small_model()
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()
    path = tmp_path / "run.h5"
    model.fit(data, epochs=3, steps_per_epoch=5, verbose=0,
              callbacks=[LayerWatch(path, x[:2], budget=None)])
    with h5py.File(path, "r") as f:
        assert f["steps"][:].tolist() == list(range(16))
        np.testing.assert_allclose(
            f["activations/conv"][-1],
            keras.ops.convert_to_numpy(model.get_layer("conv")(x[:2])), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- #
# Mixed precision, compiled with XLA
# --------------------------------------------------------------------------- #


@pytest.fixture
def mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_mixed_precision_with_jit_compile(tmp_path, tiny_data, mixed_float16):
    x, y = tiny_data
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(3, 3, activation="relu", name="conv")(inp)
    h = keras.layers.GlobalAveragePooling2D()(h)
    out = keras.layers.Dense(3, activation="softmax", dtype="float32")(h)
    model = keras.Model(inp, out)
    model.compile("adam", "sparse_categorical_crossentropy", jit_compile=True)
    path = tmp_path / "run.h5"
    model.fit(x, y, batch_size=16, epochs=2, verbose=0,
              callbacks=[LayerWatch(path, x[:2], budget=None)])
    want = keras.ops.convert_to_numpy(model.get_layer("conv")(x[:2]))
    assert want.dtype == np.float16
    with h5py.File(path, "r") as f:
        ds = f["activations/conv"]
        assert f["steps"][:].tolist() == list(range(7))
        assert ds.dtype == np.float16  # the model's own float16: stored as computed
        np.testing.assert_allclose(ds[-1].astype(np.float32), want.astype(np.float32),
                                   rtol=1e-2, atol=1e-2)


# --------------------------------------------------------------------------- #
# keras.applications
# --------------------------------------------------------------------------- #

ZOO = ["MobileNetV2", "EfficientNetB0", "ResNet50", "DenseNet121", "ConvNeXtTiny"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_keras_applications_models_are_recorded_whole(tmp_path, name):
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None, input_shape=(32, 32, 3),
                                               classes=10)
    model.compile("sgd", "sparse_categorical_crossentropy")
    x = np.random.default_rng(0).uniform(0, 255, size=(8, 32, 32, 3)).astype("float32")
    path = tmp_path / "run.h5"
    model.fit(x, np.arange(8) % 10, batch_size=4, epochs=1, verbose=0,
              callbacks=[LayerWatch(path, x[:2], max_channels=2, budget=None)])
    convs = _conv_layers(model)
    with h5py.File(path, "r") as f:
        keys = list(f["activations"])
        assert len(keys) == len(convs)
        assert f["steps"][:].tolist() == [0, 1, 2]
        taps = {f["activations"][k].attrs["layer_name"].decode(): f["activations"][k]
                for k in keys}
        assert sorted(taps) == sorted(layer.name for layer in convs)
        # What the model computes at the end, for every recorded tensor of its own
        # graph (ConvNeXt nests a few in sub-models): the file is finite exactly
        # where the model is.
        top = {name: ds for name, ds in taps.items()
               if "/" not in ds.attrs["layer_path"].decode()}
        recorded = [model.get_layer(ds.attrs["recorded_layer"].decode()) for ds in top.values()]
        probe = keras.Model(model.input, [layer.output for layer in recorded])
        computed = {name: _kept(ds, keras.ops.convert_to_numpy(t)) for (name, ds), t in zip(
            top.items(), probe(x[:2], training=False))}
        for name, ds in top.items():
            np.testing.assert_array_equal(np.isfinite(ds[-1]), np.isfinite(computed[name]))
        deep = [layer.name for layer in convs if layer.name in top][-1]
        ds, want = top[deep], computed[deep]
        scale = max(float(np.abs(want).max()), 1e-6)
        tolerance = 2e-3 if ds.dtype == np.float16 else 1e-4
        np.testing.assert_allclose(ds[-1].astype(np.float32), want, rtol=tolerance,
                                   atol=tolerance * scale)


def _kept(ds, value):
    """``value`` cut to the channels the dataset kept (``max_channels``)."""
    if "channels" not in ds.attrs:
        return value
    return np.take(value, ds.attrs["channels"], axis=int(ds.attrs["channel_axis"]) + 1)
