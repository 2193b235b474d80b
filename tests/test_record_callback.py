"""The recorder: what LayerWatch writes, read back with plain h5py."""

import json
import os
import warnings

import h5py
import keras
import numpy as np
import pytest
from click.testing import CliRunner

from layerwatch import LayerWatch, one_per_class, open_run
from layerwatch.cli import main
from layerwatch.record.budget import CostMeter

TOL = 2e-3  # float16 storage of values in [-1, 1]


def tanh_relu_model(*, bn: bool = False, spe: int = 1):
    """conv(tanh) → conv(linear) [→ BN] → ReLU layer → dense: two recorded layers."""
    keras.utils.set_random_seed(1)
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(2, 3, padding="same", activation="tanh", name="c1")(inp)
    h = keras.layers.MaxPooling2D(name="pool")(h)
    h = keras.layers.Conv2D(3, 3, padding="same", name="c2")(h)
    if bn:
        h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.ReLU(name="act")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    out = keras.layers.Dense(3, activation="softmax", name="out")(h)
    model = keras.Model(inp, out, name="tiny")
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"], steps_per_execution=spe)
    return model


def conv_outputs(model, names, x):
    """The model's own outputs of the named layers (recomputed, inference mode)."""
    probe = keras.Model(model.inputs[0], [model.get_layer(n).output for n in names])
    outputs = probe(x, training=False)
    return [keras.ops.convert_to_numpy(a)
            for a in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]


def test_records_every_step_and_values_match_model(tmp_path, tiny_data):
    x, y = tiny_data
    model = tanh_relu_model(bn=True)
    probes, labels = one_per_class(x, y)
    before = conv_outputs(model, ["c1", "act"], probes)
    path = tmp_path / "run.h5"
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, validation_data=(x, y),
              callbacks=[LayerWatch(path, probes, labels)])
    after = conv_outputs(model, ["c1", "act"], probes)

    with h5py.File(path, "r", swmr=True) as f:
        assert f.attrs["format"].decode() == "layerwatch"
        assert f.attrs["format_version"] == 3
        assert f.attrs["storage_dtype"].decode() == "auto"
        assert f.attrs["backend"].decode() == keras.backend.backend()
        assert f.attrs["keras_version"].decode() == keras.__version__
        assert f.attrs["model_name"].decode() == "tiny"
        np.testing.assert_array_equal(f["steps"][:], np.arange(7))  # 3 steps × 2 epochs + 0
        np.testing.assert_array_equal(f["epochs"][:], [0, 0, 0, 0, 1, 1, 1])
        assert sorted(f["activations"]) == ["c1", "c2"]
        c1, c2 = f["activations/c1"], f["activations/c2"]
        assert c1.shape == (7, 3, 8, 8, 2) and c2.shape == (7, 3, 4, 4, 3)
        assert c1.dtype == np.float16 and c1.chunks == (32, 3, 8, 8, 2)  # 32 snapshots per chunk
        assert c2.dtype == np.float32  # ReLU is unbounded: float32, never a float16 overflow
        assert c1.compression == "gzip"
        np.testing.assert_allclose(c1[0], before[0], atol=TOL)
        np.testing.assert_allclose(c1[-1], after[0], atol=TOL)
        np.testing.assert_allclose(c2[0], before[1], atol=TOL, rtol=TOL)
        np.testing.assert_allclose(c2[-1], after[1], atol=TOL, rtol=TOL)
        # conv → BatchNorm → ReLU: the post-activation tensor is what is recorded
        assert c2.attrs["tensor"].decode() == "c2 -> bn -> act"
        assert c2.attrs["activation"].decode() == "relu"
        assert c2.attrs["recorded_class"].decode() == "ReLU"
        assert "value_range" not in c2.attrs
        assert c1.attrs["tensor"].decode() == "c1" and c1.attrs["activation"].decode() == "tanh"
        np.testing.assert_array_equal(c1.attrs["value_range"], [-1.0, 1.0])
        assert c1.attrs["layer_class"].decode() == "Conv2D"
        assert c1.attrs["channel_axis"] == 2
        np.testing.assert_array_equal(f["probes/x"][:], probes)
        np.testing.assert_array_equal(f["probes/y"][:], [0, 1, 2])
        names = [n.decode() for n in f["metrics/batch/names"][:]]
        assert {"loss", "accuracy", "learning_rate"} <= set(names)
        np.testing.assert_array_equal(f["metrics/batch/step"][:], np.arange(1, 7))
        assert f["metrics/batch/values"].shape == (6, len(names))
        epoch_names = [n.decode() for n in f["metrics/epoch/names"][:]]
        assert {"loss", "val_loss", "val_accuracy"} <= set(epoch_names)
        np.testing.assert_array_equal(f["metrics/epoch/epoch"][:], [0, 1])
        np.testing.assert_array_equal(f["metrics/epoch/step"][:], [3, 6])
        assert f["status"][0] == 1
        config = json.loads(f["meta/model_config"][()])
        assert config["name"] == "tiny"
        assert "c1" in f["meta/summary"][()].decode()


def test_every_records_multiples_and_the_final_step(tmp_path, tiny_data):
    x, y = tiny_data
    path = tmp_path / "run.h5"
    tanh_relu_model().fit(x, y, epochs=2, batch_size=16, verbose=0,
                          callbacks=[LayerWatch(path, x[:2], every=4)])
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["steps"][:], [0, 4, 6])
        assert "probes/y" not in f


@pytest.mark.skipif(keras.backend.backend() == "torch",
                    reason="Keras' PyTorch trainer takes steps_per_execution=1 only")
def test_steps_per_execution_gives_true_step_numbers(tmp_path, tiny_data):
    x, y = tiny_data
    path = tmp_path / "run.h5"
    tanh_relu_model(spe=4).fit(x, y, epochs=1, batch_size=4, verbose=0,
                               callbacks=[LayerWatch(path, x[:2])])
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["steps"][:], [0, 4, 8, 12])
        np.testing.assert_array_equal(f["metrics/batch/step"][:], [4, 8, 12])


def test_resume_appends_with_continuous_steps(tmp_path, tiny_data):
    x, y = tiny_data
    path = tmp_path / "run.h5"
    model = tanh_relu_model()
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[LayerWatch(path, x[:2])])
    model.fit(x, y, epochs=3, initial_epoch=1, batch_size=16, verbose=0,
              callbacks=[LayerWatch(path, x[:2], mode="append")])
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["steps"][:], np.arange(10))
        np.testing.assert_array_equal(f["epochs"][:], [0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
        np.testing.assert_array_equal(f["metrics/epoch/epoch"][:], [0, 1, 2])
        assert f["activations/c1"].shape[0] == 10
        assert f["status"][0] == 1


def test_same_callback_in_a_second_fit_continues_its_file(tmp_path, tiny_data):
    x, y = tiny_data
    path = tmp_path / "run.h5"
    model, cb = tanh_relu_model(), LayerWatch(path, x[:2])
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[cb])
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[cb])
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["steps"][:], np.arange(7))


def test_overwrite_replaces_and_new_refuses(tmp_path, tiny_data):
    x, y = tiny_data
    path = tmp_path / "run.h5"
    path.write_bytes(b"precious")
    with pytest.raises(ValueError, match="already exists. Pass mode='append'.*mode='overwrite'"):
        LayerWatch(path, x[:2])
    assert path.read_bytes() == b"precious"
    tanh_relu_model().fit(x, y, epochs=1, batch_size=48, verbose=0,
                          callbacks=[LayerWatch(path, x[:2], mode="overwrite")])
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["steps"][:], [0, 1])


def test_append_refuses_other_probes_and_other_layers(tmp_path, tiny_data):
    x, y = tiny_data
    path = tmp_path / "run.h5"
    model = tanh_relu_model()
    model.fit(x, y, epochs=1, batch_size=48, verbose=0, callbacks=[LayerWatch(path, x[:2])])
    with pytest.raises(Exception, match="probe images differ"):
        model.fit(x, y, epochs=1, batch_size=48, verbose=0,
                  callbacks=[LayerWatch(path, x[2:4], mode="append")])
    with pytest.raises(Exception, match="layers differ.*Recorded: c1 .*This run: c1 "):
        model.fit(x, y, epochs=1, batch_size=48, verbose=0,
                  callbacks=[LayerWatch(path, x[:2], layers=["c1"], mode="append")])
    with h5py.File(path, "r") as f:  # the recording is untouched
        np.testing.assert_array_equal(f["steps"][:], [0, 1])


def test_nested_submodel_convs_are_found(tmp_path, tiny_data):
    x, y = tiny_data
    keras.utils.set_random_seed(2)
    inner_in = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(2, 3, padding="same", activation="tanh", name="inner_conv")(inner_in)
    encoder = keras.Model(inner_in, h, name="encoder")
    block = keras.Sequential([keras.layers.Conv2D(2, 3, name="seq_conv"),
                              keras.layers.Activation("sigmoid", name="seq_act")], name="block")
    inp = keras.Input((8, 8, 1))
    h = block(encoder(inp))
    h = keras.layers.Conv2D(1, 1, activation="tanh", name="outer_conv")(h)
    out = keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(h))
    model = keras.Model(inp, out)
    model.compile("adam", "sparse_categorical_crossentropy")
    probes = x[:2]
    path = tmp_path / "run.h5"
    model.fit(x, y, epochs=1, batch_size=48, verbose=0, callbacks=[LayerWatch(path, probes)])
    with h5py.File(path, "r") as f:
        assert sorted(f["activations"]) == ["block.seq_conv", "encoder.inner_conv",
                                             "outer_conv"]
        seq = f["activations/block.seq_conv"]
        assert seq.attrs["tensor"].decode() == "seq_conv -> seq_act"
        assert seq.attrs["layer_path"].decode() == "block/seq_conv"
        np.testing.assert_array_equal(seq.attrs["value_range"], [0.0, 1.0])
        inner = f["activations/encoder.inner_conv"][-1]
    recomputed = keras.ops.convert_to_numpy(encoder(probes, training=False))
    np.testing.assert_allclose(inner, recomputed, atol=TOL)


def test_layers_by_name_and_predicate(tmp_path, tiny_data):
    x, y = tiny_data
    path = tmp_path / "a.h5"
    tanh_relu_model().fit(x, y, epochs=1, batch_size=48, verbose=0,
                          callbacks=[LayerWatch(path, x[:2], layers=["c2"])])
    with h5py.File(path, "r") as f:
        assert list(f["activations"]) == ["c2"]
    path = tmp_path / "b.h5"
    tanh_relu_model().fit(
        x, y, epochs=1, batch_size=48, verbose=0,
        callbacks=[LayerWatch(path, x[:2], layers=lambda layer: layer.name == "pool")])
    with h5py.File(path, "r") as f:
        assert list(f["activations"]) == ["pool"]
        assert f["activations/pool"].shape == (2, 2, 4, 4, 2)


def test_float32_storage_on_request(tmp_path, tiny_data):
    x, y = tiny_data
    path = tmp_path / "run.h5"
    model = tanh_relu_model()
    model.fit(x, y, epochs=1, batch_size=48, verbose=0,
              callbacks=[LayerWatch(path, x[:2], dtype="float32")])
    with h5py.File(path, "r") as f:
        assert f["activations/c1"].dtype == np.float32
        # Recorded in the train graph (conv, bias and tanh fused by oneDNN), recomputed
        # eagerly (separate kernels): a few float32 ulps apart, more on some CPUs.
        # 1e-5 still fails float16 storage (errors up to 5e-4 here).
        np.testing.assert_allclose(f["activations/c1"][-1],
                                   conv_outputs(model, ["c1"], x[:2])[0], atol=1e-5)


# ----------------------------------------------------------------------------- #
# Bad input: clear messages, before any training compute
# ----------------------------------------------------------------------------- #


class _CountBatches(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.batches = 0

    def on_train_batch_begin(self, batch, logs=None):
        self.batches += 1


def test_single_image_without_batch_axis_is_explained(tmp_path, tiny_data):
    x, y = tiny_data
    with pytest.raises(ValueError, match=r"received: probes.shape=\(8, 8, 1\).*looks like one "
                                         r"input without the batch axis: use probes\[None\]"):
        tanh_relu_model().fit(x, y, epochs=1, verbose=0,
                              callbacks=[LayerWatch(tmp_path / "r.h5", x[0])])


def test_wrong_probe_shape_fails_before_training(tmp_path, tiny_data):
    x, y = tiny_data
    counter = _CountBatches()
    with pytest.raises(ValueError, match=r"Expected shape \('probes', 8, 8, 1\); received: "
                                         r"probes.shape=\(2, 9, 9, 1\)"):
        tanh_relu_model().fit(x, y, epochs=1, verbose=0,
                              callbacks=[LayerWatch(tmp_path / "r.h5", np.zeros((2, 9, 9, 1))),
                                         counter])
    assert counter.batches == 0
    assert not (tmp_path / "r.h5").exists()


@pytest.mark.parametrize("probes, message", [
    (np.zeros(8), r"\(probes, \*input shape\).*Received: probes.shape=\(8,\)"),
    (np.array([["a", "b"]]), "probes must be numeric.*dtype=<U1"),
    (np.zeros((0, 8, 8, 1)), r"Received: probes.shape=\(0, 8, 8, 1\)"),
    (np.full((1, 8, 8, 1), np.nan), "NaN or infinite"),
])
def test_bad_probes_are_named(tmp_path, probes, message):
    with pytest.raises(ValueError, match=message):
        LayerWatch(tmp_path / "r.h5", probes)


@pytest.mark.parametrize("kwargs, message", [
    ({"every": 0}, r"every must be an integer >= 1. Received: every=0"),
    ({"every": 1.5}, r"every must be an integer >= 1. Received: every=1.5"),
    ({"mode": "replace"}, r"mode must be one of .* Received: mode='replace'"),
    ({"dtype": "int8"}, r"dtype must be one of \('auto', 'float16', 'float32'\). "
                        r"Received: dtype='int8'"),
    ({"compression": "zstd"}, r"compression must be 'gzip', 'lzf' or None"),
    ({"probe_labels": [0, 1, 2]}, r"one label per probe \(2\). Received: 3 labels"),
])
def test_bad_arguments_are_named(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LayerWatch(tmp_path / "r.h5", np.zeros((2, 8, 8, 1)), **kwargs)


def test_unwritable_path_fails_at_construction(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="is not a writable directory"):
        LayerWatch(blocker / "run.h5", np.zeros((2, 8, 8, 1)))
    with pytest.raises(ValueError, match="path is a directory"):
        LayerWatch(tmp_path, np.zeros((2, 8, 8, 1)))


def test_no_conv_layer_lists_the_types_seen(tmp_path, tiny_data):
    x, y = tiny_data
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(name="flat"),
                              keras.layers.Dense(3, name="dense")])
    model.compile("adam", "sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="found no convolutional layer.*Layer types seen: "
                                         "Dense, Flatten"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[LayerWatch(tmp_path / "r.h5", x[:2])])
    assert not (tmp_path / "r.h5").exists()


def test_missing_layer_name_lists_available(tmp_path, tiny_data):
    x, y = tiny_data
    with pytest.raises(ValueError, match=r"names \['conv9'\] are not in model 'tiny'. "
                                         "Available layers: c1, pool, c2, act, flatten, out."):
        tanh_relu_model().fit(x, y, epochs=1, verbose=0,
                              callbacks=[LayerWatch(tmp_path / "r.h5", x[:2], layers=["conv9"])])


# ----------------------------------------------------------------------------- #
# one_per_class
# ----------------------------------------------------------------------------- #


def test_one_per_class_integer_and_one_hot():
    x = np.arange(6)[:, None] * 1.0
    y = np.array([2, 0, 2, 1, 0, 1])
    probes, labels = one_per_class(x, y)
    np.testing.assert_array_equal(probes[:, 0], [1, 3, 0])
    np.testing.assert_array_equal(labels, [0, 1, 2])
    probes_oh, labels_oh = one_per_class(x, np.eye(3)[y])
    np.testing.assert_array_equal(probes_oh, probes)
    np.testing.assert_array_equal(labels_oh, labels)


def test_one_per_class_names_missing_class():
    with pytest.raises(ValueError, match=r"no example of class\(es\) \[1, 3\]"):
        one_per_class(np.zeros((3, 2)), [0, 2, 2], num_classes=4)
    with pytest.raises(ValueError, match="same length"):
        one_per_class(np.zeros((3, 2)), [0, 1])
    with pytest.raises(ValueError, match="integer class labels. Received floats such as 0.5"):
        one_per_class(np.zeros((2, 2)), [0.5, 1.0])


# ----------------------------------------------------------------------------- #
# layerwatch info
# ----------------------------------------------------------------------------- #


def test_info_summarizes_a_recording(tmp_path, tiny_data):
    x, y = tiny_data
    path = tmp_path / "run.h5"
    tanh_relu_model().fit(x, y, epochs=1, batch_size=16, verbose=0,
                          callbacks=[LayerWatch(path, x[:2])])
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "snapshots: 4, steps 0..3, epochs 1..1" in out
    assert "status: complete" in out
    assert "c2" in out and "recorded: c2 -> act" in out
    assert "loss=" in out and "accuracy=" in out
    assert "of raw float32" in out


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"", "is not an HDF5 file"),
    (b"hello world" * 100, "is not an HDF5 file"),
])
def test_info_bad_files_give_one_line(tmp_path, content, message):
    path = tmp_path / "bad.h5"
    if content is not None:
        path.write_bytes(content)
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and message in result.output
    assert result.output.count("\n") == 1


def test_info_foreign_hdf5(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["data"] = np.zeros(3)
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 1
    assert "not a layerwatch recording" in result.output


def test_memory_flat_buffers_are_bounded(tmp_path, tiny_data):
    """The writer never holds more than flush_snapshots snapshots in the training loop."""
    x, y = tiny_data
    path = tmp_path / "run.h5"
    seen = []

    class Spy(keras.callbacks.Callback):
        def __init__(self, watch):
            super().__init__()
            self.watch = watch

        def on_train_batch_end(self, batch, logs=None):
            writer = self.watch._writer
            if writer is not None:
                seen.append(len(writer._pending))

    watch = LayerWatch(path, x[:2], flush_snapshots=3, flush_seconds=60, budget=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tanh_relu_model().fit(x, y, epochs=2, batch_size=4, verbose=0,
                              callbacks=[watch, Spy(watch)])
    assert not [w for w in caught if "layerwatch" in str(w.message)]  # no warning in a normal run
    assert max(seen) <= 3
    with h5py.File(path, "r") as f:
        assert f["steps"].shape == (25,)
    assert os.path.getsize(path) > 0


# ----------------------------------------------------------------------------- #
# Analysis probes: Gram matrices for drift, at a lower rate
# ----------------------------------------------------------------------------- #


def test_analysis_probes_store_exact_grams_at_their_rate(tmp_path, tiny_data):
    x, y = tiny_data
    path = tmp_path / "run.h5"
    model = tanh_relu_model()
    extra = x[10:30]
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[
        LayerWatch(path, x[:2], analysis_probes=extra, analysis_every=4, budget=None)])
    after = conv_outputs(model, ["c1", "act"], extra)
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["steps"][:], np.arange(13))
        np.testing.assert_array_equal(f["analysis/steps"][:], [0, 4, 8, 12])
        assert f["analysis"].attrs["every"] == 4
        np.testing.assert_array_equal(f["analysis/probes_x"][:], extra)
        for key, act in zip(("c1", "c2"), after):
            gram = f[f"analysis/gram/{key}"]
            assert gram.shape == (4, 20, 20) and gram.dtype == np.float32
            flat = act.reshape(20, -1).astype(np.float64)
            np.testing.assert_allclose(gram[-1], flat @ flat.T, rtol=1e-4, atol=1e-4)


def test_analysis_probes_cover_the_final_step_and_resume(tmp_path, tiny_data):
    x, y = tiny_data
    path = tmp_path / "run.h5"
    model = tanh_relu_model()
    watch = dict(analysis_probes=x[10:20], analysis_every=5, budget=None)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0,
              callbacks=[LayerWatch(path, x[:2], **watch)])
    model.fit(x, y, epochs=2, initial_epoch=1, batch_size=8, verbose=0,
              callbacks=[LayerWatch(path, x[:2], mode="append", **watch)])
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["analysis/steps"][:], [0, 5, 6, 10, 12])
    with pytest.raises(ValueError, match="recorded with 10 analysis probes, this run has 0"):
        model.fit(x, y, epochs=3, initial_epoch=2, batch_size=8, verbose=0,
                  callbacks=[LayerWatch(path, x[:2], mode="append", budget=None)])


@pytest.mark.parametrize("kwargs, message", [
    ({"analysis_probes": np.zeros((1, 8, 8, 1))}, r"at least 2 inputs shaped like the probes"),
    ({"analysis_probes": np.zeros((5, 9, 9, 1))}, r"Received: analysis_probes.shape=\(5, 9, 9, 1\)"),
    ({"analysis_probes": [["a"]]}, r"analysis_probes must be numeric"),
    ({"analysis_every": 0}, r"analysis_every must be an integer >= 1. Received: analysis_every=0"),
])
def test_bad_analysis_arguments_are_named(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LayerWatch(tmp_path / "r.h5", np.zeros((2, 8, 8, 1)), **kwargs)


def test_gradient_accumulation_counts_optimizer_steps_not_batches(tmp_path, tiny_data):
    x, y = tiny_data
    model = tanh_relu_model()
    model.compile(optimizer=keras.optimizers.Adam(0.01, gradient_accumulation_steps=2),
                  loss="sparse_categorical_crossentropy")
    path = tmp_path / "run.h5"
    model.fit(x, y, epochs=2, batch_size=12, verbose=0,
              callbacks=[LayerWatch(path, x[:2], budget=None)])  # 4 batches = 2 steps/epoch
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["steps"][:], [0, 1, 2, 3, 4])


class _Seen(keras.callbacks.Callback):
    """After each batch, the recorded layers as the model computes them now."""

    def __init__(self, probes):
        super().__init__()
        self.probes, self.at = probes, {}

    def on_train_batch_end(self, batch, logs=None):
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        self.at[step] = conv_outputs(self.model, ["c1", "act"], self.probes)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="the fused probe pass is TensorFlow's")
def test_fused_probe_pass_is_exact_built_once_and_hands_the_train_step_back(tmp_path, tiny_data):
    from layerwatch.record.fused import FusedProbePass

    x, y = tiny_data
    model = tanh_relu_model(bn=True)
    probes = x[:3]
    watch, seen = LayerWatch(tmp_path / "run.h5", probes, budget=None), _Seen(probes)
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[watch, seen])
    fusion = watch._fusion
    assert isinstance(fusion, FusedProbePass)
    assert not isinstance(model.train_function, FusedProbePass)  # handed back after fit
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[watch, seen])
    assert watch._fusion is fusion  # a later fit reuses the traced function
    assert not isinstance(model.train_function, FusedProbePass)
    with h5py.File(tmp_path / "run.h5", "r") as f:
        steps = f["steps"][:].tolist()
        recorded = [f["activations/c1"][:], f["activations/c2"][:]]
        np.testing.assert_array_equal(f["epochs"][:], [0, 0, 0, 0, 1, 1, 1, 0, 0, 0])
    assert steps == list(range(10))
    # Each fused snapshot is the model as it stood after its step (BN statistics too).
    for index, step in enumerate(steps[1:], start=1):
        for rec, want in zip(recorded, seen.at[step]):
            np.testing.assert_allclose(rec[index], want, atol=TOL, rtol=TOL)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="the fused probe pass is TensorFlow's")
@pytest.mark.parametrize("every, budget", [(1, 0.2), (1, None), (3, None)])
def test_one_train_function_is_traced_for_the_whole_fit(tmp_path, tiny_data, every, budget):
    # Tracing a second train function costs a second or more on a slow CPU. The
    # fused step skips the probes in the same graph at unrecorded steps, at
    # epoch starts and at the time budget's plain steps: a fit with LayerWatch
    # traces the train step as often as one without it (TensorFlow itself
    # traces a new function's first call twice), and Keras' own train function
    # never.
    x, y = tiny_data

    def traced_fit(callbacks):
        model = tanh_relu_model()
        traced, train_step = [], model.train_step
        model.train_step = lambda data: (traced.append(1), train_step(data))[1]
        model.fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=callbacks)
        return len(traced)

    plain = traced_fit([])
    watch = LayerWatch(tmp_path / "run.h5", x[:3], every=every, budget=budget)
    assert traced_fit([watch]) == watch._fusion.traces == plain
    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert f["steps"][:].tolist() == sorted({*range(0, 10, every), 9})


def test_two_recorders_on_one_model_record_the_same(tmp_path, tiny_data):
    x, y = tiny_data
    model = tanh_relu_model()
    model.fit(x, y, epochs=2, batch_size=16, verbose=0,
              callbacks=[LayerWatch(tmp_path / "a.h5", x[:3], budget=None),
                         LayerWatch(tmp_path / "b.h5", x[:3], budget=None)])
    with h5py.File(tmp_path / "a.h5", "r") as a, h5py.File(tmp_path / "b.h5", "r") as b:
        assert a["steps"][:].tolist() == b["steps"][:].tolist() == list(range(7))
        # The first recorder's probes run fused into the train step, the second's in a
        # separate pass: different graphs, which may round differently (one float16
        # step) on another CPU. A snapshot from another step differs far more.
        for key in ("c1", "c2"):
            np.testing.assert_allclose(a["activations"][key][:], b["activations"][key][:],
                                       atol=TOL, rtol=TOL)


def test_a_fit_that_raised_leaves_training_working(tmp_path, tiny_data):
    class Boom(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:
                raise RuntimeError("boom")

    x, y = tiny_data
    model = tanh_relu_model()
    with pytest.raises(RuntimeError, match="boom"):
        model.fit(x, y, epochs=1, batch_size=16, verbose=0,
                  callbacks=[LayerWatch(tmp_path / "a.h5", x[:3], budget=None), Boom()])
    history = model.fit(x, y, epochs=1, batch_size=16, verbose=0)  # no recorder at all
    assert np.isfinite(history.history["loss"][0])
    start = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    assert start == 2 + 3
    model.fit(x, y, epochs=1, batch_size=16, verbose=0,
              callbacks=[LayerWatch(tmp_path / "b.h5", x[:3], budget=None)])
    with h5py.File(tmp_path / "b.h5", "r") as f:
        assert f["steps"][:].tolist() == list(range(start, start + 4))
        assert f["status"][0] == 1


# ----------------------------------------------------------------------------- #
# Disk budget
# ----------------------------------------------------------------------------- #


def test_a_run_planned_past_the_disk_budget_warns_once_with_what_fits(tmp_path, tiny_data):
    x, y = tiny_data
    model = tanh_relu_model()
    with pytest.warns(RuntimeWarning, match=r"would write about .* \(14 snapshots of .*, "
                                            r"measured on the first one\), more than "
                                            r"disk_budget=1 kB\. every=\d+") as caught:
        model.fit(x, y, epochs=4, batch_size=16, verbose=0,
                  callbacks=[LayerWatch(tmp_path / "run.h5", x[:3], budget=None,
                                        disk_budget=1000)])
    messages = [str(w.message) for w in caught if "would write" in str(w.message)]
    assert len(messages) == 1
    assert "layers= without c2, c1" in messages[0] or "layers= without c1, c2" in messages[0]


def test_the_disk_plan_counts_occlusion_and_feature_images(tmp_path, tiny_data):
    # Activations alone fit the budget; the coarse schedules' maps and images do not.
    x, y = tiny_data
    options = dict(budget=None, max_channels=1, layers=["c1"])
    model = tanh_relu_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no disk warning without them
        model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[
            LayerWatch(tmp_path / "plain.h5", x[:3], disk_budget=3_000, **options)])
    model = tanh_relu_model()
    with pytest.warns(RuntimeWarning, match=r"plus \d+(\.\d+)? kB of analysis Grams and "
                                            r"explanation maps \(uncompressed\)"):
        model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[
            LayerWatch(tmp_path / "run.h5", x[:3], y[:3], disk_budget=3_000,
                       occlusion_every=1, occlusion_patch=2, features_every=1, **options)])


def test_every_auto_thins_recording_to_the_disk_budget(tmp_path, tiny_data):
    x, y = tiny_data
    model = tanh_relu_model()
    path = tmp_path / "run.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # auto adapts, it does not warn
        model.fit(x, y, epochs=4, batch_size=16, verbose=0,
                  callbacks=[LayerWatch(path, x[:3], every="auto", budget=0.99,
                                        disk_budget=1000)])
    with h5py.File(path, "r") as f:
        steps = f["steps"][:].tolist()
        every = int(np.diff(steps[:-1]).min()) if len(steps) > 2 else None
    assert steps[0] == 0 and steps[-1] == 12 and len(steps) < 13  # fewer than every step
    assert every is None or every > 1


def test_free_space_is_a_budget_too(tmp_path, tiny_data, monkeypatch):
    import collections
    import shutil

    x, y = tiny_data
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 500, 500))
    with pytest.warns(RuntimeWarning, match=r"more than the 500 B free on its disk\. every="):
        tanh_relu_model().fit(x, y, epochs=1, batch_size=16, verbose=0,
                              callbacks=[LayerWatch(tmp_path / "run.h5", x[:3], budget=None)])


@pytest.mark.parametrize("value", [0, -1, "2GB", True])
def test_disk_budget_must_be_a_positive_number(tmp_path, value):
    with pytest.raises(ValueError, match=r"disk_budget must be a number of bytes > 0"):
        LayerWatch(tmp_path / "run.h5", np.zeros((2, 8, 8, 1)), disk_budget=value)


# ----------------------------------------------------------------------------- #
# Each step's own loss and metrics
# ----------------------------------------------------------------------------- #


def test_each_steps_own_loss_is_stored_beside_kerass_running_mean(tmp_path, tiny_data):
    x, y = tiny_data  # 48 images, batches of 16: three equal batches an epoch
    model = tanh_relu_model()
    path = tmp_path / "run.h5"
    history = model.fit(x, y, epochs=2, batch_size=16, verbose=0,
                        callbacks=[LayerWatch(path, x[:3], budget=None)])
    with open_run(path) as run:
        batch = run.metrics("batch")
    for name in ("loss", "accuracy"):
        steps, own = batch.get(name)
        _, running = batch.get(name + "_running_mean")
        assert steps.tolist() == [1, 2, 3, 4, 5, 6]
        for epoch in range(2):  # v_k = k·m_k − (k−1)·m_(k−1), restarting each epoch
            m = running[3 * epoch:3 * epoch + 3]
            k = np.arange(1, 4)
            np.testing.assert_allclose(own[3 * epoch:3 * epoch + 3],
                                       k * m - (k - 1) * np.r_[0.0, m[:-1]], rtol=1e-12)
        # Keras' own epoch means are the running means' last values.
        np.testing.assert_allclose(running[[2, 5]], history.history[name], rtol=1e-6)
    assert not np.allclose(batch.get("loss")[1], batch.get("loss_running_mean")[1])


def test_a_smaller_last_batch_is_weighted_by_its_size(tmp_path, tiny_data):
    x, y = tiny_data
    x, y = x[:40], y[:40]  # batches of 16, 16 and 8
    model = tanh_relu_model()
    path = tmp_path / "run.h5"
    history = model.fit(x, y, epochs=2, batch_size=16, verbose=0,
                        callbacks=[LayerWatch(path, x[:3], budget=None)])
    with open_run(path) as run:
        batch = run.metrics("batch")
    sizes = np.array([16, 16, 8])
    for name in ("loss", "accuracy"):
        own = batch.get(name)[1]
        for epoch in range(2):  # the epoch's mean is the size-weighted mean of its steps
            part = own[3 * epoch:3 * epoch + 3]
            np.testing.assert_allclose((part * sizes).sum() / sizes.sum(),
                                       history.history[name][epoch], rtol=1e-6)
    accuracy = batch.get("accuracy")[1]
    assert np.all((accuracy >= -1e-9) & (accuracy <= 1 + 1e-9))  # a share, every step


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="the fused probe pass is TensorFlow's")
def test_spent_data_iterators_are_destroyed_off_the_training_thread(tmp_path, tiny_data,
                                                                     monkeypatch):
    # Keras holds each epoch's tf.data iterator until the next epoch's first
    # batch (the last until fit returns), and destroying one can wait for its
    # threads for half a second. The fused train function hands each spent one
    # to the reaper's thread, which destroys it there; none is kept.
    import threading
    import time
    import weakref

    from layerwatch.record import fused, reaper

    died, seen = [], []
    call = fused.FusedProbePass.__call__

    def spy(self, iterator):
        if not any(ref() is iterator for ref in seen):
            seen.append(weakref.ref(iterator))
            weakref.finalize(iterator, lambda: died.append(threading.current_thread().name))
        return call(self, iterator)

    monkeypatch.setattr(fused.FusedProbePass, "__call__", spy)
    x, y = tiny_data
    model = tanh_relu_model()
    model.fit(x, y, epochs=3, batch_size=16, verbose=0,
              callbacks=[LayerWatch(tmp_path / "run.h5", x[:3], budget=None)])
    deadline = time.monotonic() + 60
    while len(died) < len(seen) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(seen) == 3  # one iterator an epoch
    assert died == ["layerwatch-reaper"] * 3
    assert reaper.holding() == 0


def test_the_reaper_lets_go_on_its_thread_when_due():
    import threading
    import time
    import weakref

    from layerwatch.record.reaper import Reaper

    class Thing:
        pass

    reaper, died = Reaper(), []
    soon, later = Thing(), Thing()
    for thing, name in ((soon, "soon"), (later, "later")):
        weakref.finalize(thing, lambda name=name: died.append(
            (name, threading.current_thread().name, time.monotonic())))
    start = time.monotonic()
    reaper.release(later, after=0.5)
    reaper.release(soon)
    del soon, later, thing
    while len(died) < 2 and time.monotonic() < start + 30:
        time.sleep(0.01)
    assert reaper.holding == 0
    assert [(name, thread) for name, thread, _ in died] == [
        ("soon", "layerwatch-reaper"), ("later", "layerwatch-reaper")]
    assert died[1][2] - start >= 0.5


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="the fused probe pass is TensorFlow's")
def test_the_optimizer_is_built_before_the_first_step_and_training_is_unchanged(
        tmp_path, tiny_data, monkeypatch):
    # Keras builds the optimizer inside the first traced train step, which
    # makes that first call slower; the fused step builds it just before, with
    # the calls Keras' Optimizer.apply makes. The same variables, the same
    # training.
    from layerwatch.record import fused

    built = []
    build = fused.build_optimizer
    monkeypatch.setattr(fused, "build_optimizer", lambda m: (built.append(build(m)), built[-1])[1])
    x, y = tiny_data
    plain, watched = tanh_relu_model(), tanh_relu_model()
    plain.fit(x, y, epochs=2, batch_size=16, verbose=0, shuffle=False)
    watched.fit(x, y, epochs=2, batch_size=16, verbose=0, shuffle=False,
                callbacks=[LayerWatch(tmp_path / "run.h5", x[:3], budget=None)])
    assert built == [True]  # by the fused step, before its first call
    ours, theirs = watched.optimizer.variables, plain.optimizer.variables
    assert [v.path.split("/", 1)[1] for v in ours] == [v.path.split("/", 1)[1] for v in theirs]
    assert [v.path.split("/", 1)[0] for v in ours] == [watched.optimizer.name] * len(ours)
    for a, b in zip(ours + watched.weights, theirs + plain.weights):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="the fused probe pass is TensorFlow's")
def test_a_custom_train_step_keeps_its_own_optimizer_building(tmp_path, tiny_data):
    # A train_step of one's own may apply the optimizer to other variables:
    # LayerWatch leaves the building to it.
    from layerwatch.record.fused import build_optimizer

    class Custom(keras.Model):
        def train_step(self, data):
            return super().train_step(data)

    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(2, 3, name="c1")(inp)
    model = Custom(inp, keras.layers.Dense(3)(keras.layers.Flatten()(h)))
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(True))
    assert build_optimizer(model) is False and not model.optimizer.built
    x, y = tiny_data
    model.fit(x, y, epochs=1, batch_size=16, verbose=0,
              callbacks=[LayerWatch(tmp_path / "run.h5", x[:3], budget=None)])
    assert model.optimizer.built  # by Keras, in its first step
    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert f["steps"][:].tolist() == [0, 1, 2, 3]


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="the fused probe pass is TensorFlow's")
def test_the_time_budget_times_fused_and_plain_calls_in_turn(tmp_path, tiny_data, monkeypatch):
    # The meter's plain calls come from taking every other snapshot separately.
    # They must alternate with the fused ones call by call (not three and
    # three), so a slow spell or the first steps' speed-up falls on both alike.
    from layerwatch.record import callback

    measured = []
    judge = callback.over_budget
    monkeypatch.setattr(callback, "over_budget",
                        lambda meter, **kw: (measured.append(meter), judge(meter, **kw))[1])
    x, y = tiny_data
    model = tanh_relu_model()
    model.fit(x, y, epochs=1, batch_size=2, verbose=0,  # the meter's steps in one epoch
              callbacks=[LayerWatch(tmp_path / "run.h5", x[:3], budget=0.99)])
    (meter,) = measured
    kinds = [fused for fused, _ in meter._calls]
    assert len(kinds) == CostMeter.batches and kinds[0]
    assert all(a != b for a, b in zip(kinds, kinds[1:])), "".join("FP"[not k] for k in kinds)
    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert f["steps"][:].tolist() == list(range(25))  # every step still recorded


@pytest.mark.parametrize("every", [1, 4])
def test_the_time_budget_spreads_a_replay_of_held_steps_over_them(every):
    # Snapshots held for one replay of 16 steps: 0.1 ms at a holding batch
    # end, 8 ms more at the one that replays them; 0.6 ms a recorded step. The
    # meter waits for a replay, however far apart the recorded steps are.
    meter, now, step, held = CostMeter(), 0.0, 0, 0
    while not meter.done:
        step += 1
        start = now + 0.010
        recorded = step % every == 0
        held += recorded
        released = held == 16
        end = start + (0.0001 if recorded else 0.00002) + (0.008 if released else 0.0)
        meter.add(step, start, end, 0.0 if recorded else None, held=recorded,
                  released=released)
        held %= 16
        now = end
    assert step >= 16 * every
    assert meter.record_cost() == pytest.approx(0.0001 + 0.008 / 16, rel=0.05)


def test_the_time_budget_measures_a_fused_calls_extra_time_between_neighbours():
    # Steps speeding up from 12 to 8 ms over the measured batches, fused calls
    # 0.5 ms longer, 0.1 ms to hand a snapshot over: 0.6 ms a recorded step.
    meter, now, step, fused = CostMeter(), 0.0, 0, True
    while not meter.done:
        step += 1
        seconds = 0.012 - 0.004 * min(step, 20) / 20 + (0.0005 if fused else 0.0)
        start = now + seconds
        end = start + (0.0001 if fused else 0.002)  # a separate snapshot takes longer
        meter.add(step, start, end, None if fused else 0.001, fused_call=fused,
                  handover=0.0001 if fused else None)
        fused = not meter.wants_plain_step(fused)
        now = end
    assert meter.record_cost() == pytest.approx(0.0006, abs=3e-5)
    assert meter.step_time() == pytest.approx(0.0095, abs=6e-4)
