"""The core of recording, under whichever Keras backend this process runs.

The backend is fixed per process, so CI runs this file once per backend:

    KERAS_BACKEND=jax LAYERWATCH_REQUIRE_BACKEND=jax python -m pytest tests/test_record_backends.py

Locally, a backend that is not installed skips the file; in CI (``CI`` set)
or with ``LAYERWATCH_REQUIRE_BACKEND`` it fails instead.
"""

import os
import warnings

import pytest

BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")
REQUIRED = os.environ.get("LAYERWATCH_REQUIRE_BACKEND")

try:
    import keras
except ImportError as exc:  # keras imports its backend: jax or torch may be missing
    if REQUIRED or os.environ.get("CI"):
        raise
    pytest.skip(f"Keras backend {BACKEND!r} is not installed ({exc}); "
                f"pip install layerwatch[{BACKEND}]", allow_module_level=True)

import h5py  # noqa: E402
import numpy as np  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from layerwatch import LayerWatch  # noqa: E402
from layerwatch.cli import main  # noqa: E402
from layerwatch.record.budget import CostMeter  # noqa: E402

ATOL = 2e-3  # float16 storage of values around 1


def test_runs_under_the_required_backend():
    assert keras.backend.backend() == (REQUIRED or BACKEND)


def _model(steps_per_execution=1):
    keras.utils.set_random_seed(0)
    x = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(6, 3, activation="relu", name="conv1")(x)
    h = keras.layers.Conv2D(5, 3, name="conv2")(h)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.Activation("tanh", name="act")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    y = keras.layers.Dense(3, activation="softmax")(h)
    model = keras.Model(x, y)
    model.compile("adam", "sparse_categorical_crossentropy",
                  steps_per_execution=steps_per_execution)
    reference = keras.Model(x, [model.get_layer("conv1").output, model.get_layer("act").output])
    return model, reference


def _outputs(reference, probes):
    return [keras.ops.convert_to_numpy(t) for t in reference(probes, training=False)]


class _Reference(keras.callbacks.Callback):
    """After each batch, the tapped tensors as the model computes them now."""

    def __init__(self, reference, probes):
        super().__init__()
        self.reference, self.probes, self.seen = reference, probes, {}

    def on_train_batch_end(self, batch, logs=None):
        model = self.model  # on JAX this re-attaches the training state
        step = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
        self.seen[step] = _outputs(self.reference, self.probes)


def test_recorded_equals_recomputed_before_during_and_after(tmp_path, tiny_data):
    x, y = tiny_data
    model, reference = _model()
    probes = x[:3]
    before = _outputs(reference, probes)
    during = _Reference(reference, probes)
    path = tmp_path / "run.h5"
    model.fit(x, y, batch_size=8, epochs=2, verbose=0,
              callbacks=[LayerWatch(path, probes, budget=None), during])
    after = _outputs(reference, probes)
    with h5py.File(path, "r") as f:
        steps = f["steps"][:]
        recorded = [f["activations/conv1"][:], f["activations/conv2"][:]]
        assert f.attrs["backend"].decode() == keras.backend.backend()
        assert f["activations/conv2"].attrs["recorded_layer"].decode() == "act"
    assert steps.tolist() == list(range(13))
    for rec, want in zip(recorded, before):
        np.testing.assert_allclose(rec[0], want, atol=ATOL)
    for rec, want in zip(recorded, after):
        np.testing.assert_allclose(rec[-1], want, atol=ATOL)
    # Mid-training: each snapshot is the model as it stood after that step.
    assert sorted(during.seen) == list(range(1, 13))
    for index, step in enumerate(steps[1:], start=1):
        for rec, want in zip(recorded, during.seen[int(step)]):
            np.testing.assert_allclose(rec[index], want, atol=ATOL)
    assert not np.allclose(recorded[0][0], recorded[0][-1], atol=ATOL)  # training moved it


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX's train-loop state")
def test_jax_recording_reads_the_train_loop_state_without_syncing_it(tmp_path, tiny_data):
    # Syncing JAX's state back into the variables (what reading Callback.model
    # does) assigns every variable and re-gathers them at the next step: a
    # recorder must not do it at every step. Counted: the syncs that move values.
    x, y = tiny_data

    def syncs(callbacks):
        model, _ = _model()
        done, sync = [], model.jax_state_sync
        model.jax_state_sync = lambda: (done.append(not model._jax_state_synced), sync())[1]
        model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=callbacks)
        return sum(done)

    plain = syncs([])
    recorded = syncs([LayerWatch(tmp_path / "run.h5", x[:3], budget=None, saliency=True)])
    # 12 steps recorded; at most the metric counts' reads at each epoch's first
    # and last batch (2 an epoch) come on top of Keras' own epoch-end syncs.
    assert recorded <= plain + 2 * 2
    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert f["steps"][:].tolist() == list(range(13))
        names = [n.decode() for n in f["metrics/batch/names"][:]]
        rate = f["metrics/batch/values"][:, names.index("learning_rate")]
    np.testing.assert_allclose(rate, 0.001)  # Adam's default, read from the loop's state


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX's jitted train step")
def test_jax_probes_ride_in_the_train_step_compiled_once(tmp_path, tiny_data):
    # The probes run inside the jitted train step (one dispatch a step, not
    # three): compiled once for every fit, skipped in the same function at
    # unrecorded steps, Keras' train function handed back after each fit.
    from layerwatch.record.jax_fused import JaxFusedProbePass

    x, y = tiny_data
    model, reference = _model()
    own = model
    watch = LayerWatch(tmp_path / "run.h5", x[:3], every=3, budget=None)
    during = _Reference(reference, x[:3])
    for epochs in (2, 1):
        model.fit(x, y, batch_size=8, epochs=epochs, verbose=0, callbacks=[watch, during])
        assert not isinstance(own.train_function, JaxFusedProbePass)
    assert isinstance(watch._fusion, JaxFusedProbePass) and watch._fusion.traces == 1
    with h5py.File(tmp_path / "run.h5", "r") as f:
        steps = f["steps"][:].tolist()
        recorded = f["activations/conv2"][:]
        names = [n.decode() for n in f["metrics/batch/names"][:]]
        rate = f["metrics/batch/values"][:, names.index("learning_rate")]
    assert steps == [0, 3, 6, 9, 12, 15, 18]
    for index, step in enumerate(steps[1:], start=1):
        np.testing.assert_allclose(recorded[index], during.seen[step][1], atol=ATOL)
    # Read in the same call at recorded steps (other steps log no learning rate).
    np.testing.assert_allclose(rate[~np.isnan(rate)], 0.001)
    assert np.count_nonzero(~np.isnan(rate)) >= len(steps) - 2


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX's jitted train step")
def test_jax_partial_batches_run_keras_own_step_and_the_compiled_probe_pass(tmp_path, tiny_data):
    # 48 examples in batches of 10: each epoch ends with a batch of 8. The
    # fused step is compiled for the fit's first batch shape only; the batch
    # of 8 runs Keras' own train step after the separate probe pass, on the
    # values that step starts from: the same snapshots, one trace of the fused
    # step. A later fit in batches of 16 has it compiled for those.
    from layerwatch.record.jax_fused import JaxFusedProbePass

    x, y = tiny_data
    model, reference = _model()
    watch = LayerWatch(tmp_path / "run.h5", x[:3], budget=None)
    during = _Reference(reference, x[:3])
    model.fit(x, y, batch_size=10, epochs=2, verbose=0, callbacks=[watch, during])
    assert isinstance(watch._fusion, JaxFusedProbePass) and watch._fusion.traces == 1
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[watch, during])
    assert watch._fusion.traces == 2
    with h5py.File(tmp_path / "run.h5", "r") as f:
        steps = f["steps"][:].tolist()
        recorded = [f["activations/conv1"][:], f["activations/conv2"][:]]
        names = [n.decode() for n in f["metrics/batch/names"][:]]
        rate = f["metrics/batch/values"][:, names.index("learning_rate")]
        rate_steps = f["metrics/batch/step"][:]
    assert steps == list(range(14))
    # Steps 4 and 9 are taken by the calls with the batches of 8.
    for index, step in enumerate(steps[1:], start=1):
        for got, want in zip(recorded, during.seen[step]):
            np.testing.assert_allclose(got[index], want, atol=ATOL)
    np.testing.assert_allclose(rate[np.isin(rate_steps, [4, 9])], [0.001, 0.001])


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="PyTorch's traced probe pass")
def test_torch_probe_pass_replays_a_trace_that_follows_the_weights(tiny_data):
    # The recorder's forward pass on PyTorch is a trace of Keras' (cheaper per
    # step): the same numbers as Keras' own forward pass, before and after the
    # weights move, and Keras' pass itself for any input but the probes.
    from layerwatch.record.torch_trace import TracedProbes

    x, y = tiny_data
    model, reference = _model()  # conv, BatchNormalization, activation: two outputs
    probes = x[:3]
    replay = TracedProbes(reference)

    def same(got, want):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(g), w)

    before = _outputs(reference, probes)
    same(replay(probes), before)
    assert replay.failed is None
    # Convolutions get the same channels-last input either way: no copies needed.
    assert replay.lean
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    after = _outputs(reference, probes)
    assert not np.allclose(before[1], after[1], atol=ATOL)
    same(replay(probes), after)
    other = x[3:5]
    same(replay(other), _outputs(reference, other))


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="PyTorch's traced probe pass")
def test_torch_replay_follows_a_wrapped_torch_modules_buffers(tiny_data):
    # A torch module inside the model (TorchModuleWrapper) keeps BatchNorm's
    # running statistics as buffers, not Keras variables: training moves them
    # in place, and the replay reads them as they stand, like the weights.
    import torch

    from layerwatch.record.torch_trace import TracedProbes

    x, y = tiny_data
    keras.utils.set_random_seed(0)
    inputs = keras.Input((1, 8, 8))
    norm = torch.nn.BatchNorm2d(4)
    h = keras.layers.TorchModuleWrapper(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), norm),
                                        output_shape=(None, 4, 6, 6), name="conv_torch")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(
        keras.layers.Flatten()(keras.layers.Activation("tanh", name="act")(h))))
    model.compile("adam", "sparse_categorical_crossentropy")
    reference = keras.Model(inputs, [model.get_layer("conv_torch").output,
                                     model.get_layer("act").output])
    x = np.moveaxis(x, -1, 1)
    probes = x[:3]
    replay = TracedProbes(reference)
    for got, want in zip(replay(probes), _outputs(reference, probes)):
        np.testing.assert_array_equal(got, want)
    assert replay.failed is None
    before = norm.running_mean.clone()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert not torch.equal(norm.running_mean, before)
    for got, want in zip(replay(probes), _outputs(reference, probes)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="PyTorch's traced probe pass")
@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_torch_replay_adds_a_bias_inside_its_convolution_only_where_that_is_exact(
        tiny_data, policy):
    # The replay hands a convolution its bias instead of adding it afterwards as
    # Keras does, where this CPU's kernel gives the same bits at the layer's
    # shapes (on the machine this was written on: float32 yes, float16 no).
    # Biases start at zero, so the numbers are compared once training has moved them.
    import torch

    from layerwatch.record.torch_trace import TracedProbes

    x, y = tiny_data
    keras.mixed_precision.set_global_policy(policy)
    try:
        model, reference = _model()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    probes = x[:3]
    replay = TracedProbes(reference)
    replay(probes)
    expected = 0
    for name in ("conv1", "conv2"):
        layer = model.get_layer(name)
        shape = (3,) + tuple(layer.input.shape[1:])
        generator = torch.Generator().manual_seed(0)

        def random(*size):
            return torch.randn(*size, generator=generator).to(getattr(torch, layer.compute_dtype))

        inputs = random(*shape).permute(0, 3, 1, 2)  # NHWC as the model holds it
        kernel = random(*layer.kernel.shape).permute(3, 2, 0, 1).contiguous(
            memory_format=torch.channels_last)
        bias = random(layer.filters)
        apart = torch.nn.functional.conv2d(inputs, kernel) + bias.reshape(1, -1, 1, 1)
        expected += torch.equal(apart, torch.nn.functional.conv2d(inputs, kernel, bias))
    assert replay.lean and replay.fused_biases == expected
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert np.abs(keras.ops.convert_to_numpy(model.get_layer("conv2").bias)).min() > 0
    for got, want in zip(replay(probes), _outputs(reference, probes)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="PyTorch's traced probe pass")
@pytest.mark.parametrize("how", ["differs", "fails"])
def test_torch_trace_keeps_its_layout_copies_where_the_lean_graph_differs_or_fails(
        monkeypatch, tiny_data, how):
    # Without its layout copies an op may compute differently (on this machine a
    # transposed convolution does): the trace with every copy is checked and used
    # instead, and it still follows the weights.
    from layerwatch.record import torch_graph, torch_trace

    x, y = tiny_data
    model, reference = _model()
    probes = x[:3]
    replay_of = torch_trace._replay
    lean_graphs = []

    def drop_copies(graph):
        lean_graphs.append(graph)
        if how == "fails":
            raise RuntimeError("a graph TorchScript cannot rewrite")

    def replay(traced, tensors):
        arrays = replay_of(traced, tensors)
        if traced.graph in lean_graphs:  # the lean graph, made to differ
            arrays[0] = arrays[0] + 1
        return arrays

    monkeypatch.setattr(torch_graph, "drop_copies", drop_copies)
    monkeypatch.setattr(torch_trace, "_replay", replay)
    traced = torch_trace.TracedProbes(reference)
    for step in range(2):
        want = _outputs(reference, probes)
        for got, expected in zip(traced(probes), want):
            np.testing.assert_array_equal(got, expected)
        assert traced.failed is None and not traced.lean and len(lean_graphs) == 1
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)


def _fit_recording(path, data):
    """A 48-step fit of :func:`_model` recorded in float32, every snapshot
    checked against Keras' own pass after its step; the probe pass returned."""
    x, y = data
    model, reference = _model()
    during = _Reference(reference, x[:3])
    watch = LayerWatch(path, x[:3], budget=None, dtype="float32")
    model.fit(x, y, batch_size=2, epochs=2, verbose=0, callbacks=[watch, during])
    with h5py.File(path, "r") as f:
        steps = f["steps"][:]
        assert steps.tolist() == list(range(49))
        assert f["epochs"][:].tolist() == [0] * 25 + [1] * 24
        assert np.all(np.diff(f["wall_time"][:]) >= 0)
        for key, tap in zip(("conv1", "conv2"), range(2)):
            recorded = f[f"activations/{key}"][:]
            for index, step in enumerate(steps[1:], start=1):
                np.testing.assert_array_equal(recorded[index], during.seen[int(step)][tap])
    return watch._probes._predict


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="PyTorch's batched replay")
def test_torch_steps_replayed_together_keep_each_steps_own_numbers(monkeypatch, tmp_path,
                                                                   tiny_data):
    # On a small model the probes of up to 16 steps are replayed in one pass
    # (layerwatch.record.torch_batch): each snapshot is still exactly Keras'
    # pass on the weights of its own step, in step order, with its own epoch.
    from layerwatch.record import torch_batch

    monkeypatch.setattr(torch_batch, "FASTER", float("inf"))  # not timed here
    replay = _fit_recording(tmp_path / "run.h5", tiny_data)
    # Where this CPU's grouped convolutions or vectorized ops give other bits
    # than the single replay's, steps are replayed one by one: the file is
    # the same. Nothing else may stop the batching on this model.
    if replay.unbatched is None:
        assert replay.slots == torch_batch.SLOTS
    else:
        assert "differs" in replay.unbatched or "other bits" in replay.unbatched, \
            replay.unbatched


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="PyTorch's batched replay")
@pytest.mark.parametrize("how, reason", [
    ("an op differs", "gives other bits for elements computed one at a time"),
    ("the pass differs", "the batched replay differs from the single one"),
    ("slower", "no faster here"),
])
def test_torch_batched_replay_gives_way_to_single_replays(monkeypatch, tmp_path, tiny_data,
                                                          how, reason):
    # No batched replay where an op may give other bits for an element at
    # another position; none after a first release that differs from the
    # single replay, or a second that is not faster. No step loses its numbers.
    from layerwatch.record import torch_batch

    if how == "slower":
        monkeypatch.setattr(torch_batch, "FASTER", 0.0)
    else:
        monkeypatch.setattr(torch_batch, "FASTER", float("inf"))
        monkeypatch.setattr(torch_batch, "_same", lambda a, b: False)
        if how == "the pass differs":
            monkeypatch.setattr(torch_batch._Program, "_check_position_free",
                                lambda *args: None)
    replay = _fit_recording(tmp_path / "run.h5", tiny_data)
    assert replay.slots == 0
    assert reason in replay.unbatched


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="PyTorch's batched replay")
def test_torch_held_steps_reach_the_file_when_fit_raises(monkeypatch, tmp_path, tiny_data):
    # Steps waiting for one replay of several are recorded when the process
    # exits after fit() raised (the exit hook closes the files left open).
    from layerwatch.record import callback, torch_batch

    monkeypatch.setattr(torch_batch, "FASTER", float("inf"))

    class Stop(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 4:
                raise RuntimeError("stopped at step 5")

    x, y = tiny_data
    model, _ = _model()
    watch = LayerWatch(tmp_path / "run.h5", x[:3], budget=None)
    with pytest.raises(RuntimeError, match="step 5"):
        model.fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=[watch, Stop()])
    callback._close_open_writers()  # what the exit hook does
    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert f["steps"][:].tolist() == list(range(6))
        assert len(f["activations/conv1"]) == 6


def _finite_difference_saliency(model, probes, labels, eps=1e-2):
    """d model(x)[label] / dx by central differences, one batched call per side."""
    size = probes[0].size
    basis = np.eye(size, dtype=np.float64).reshape((size,) + probes.shape[1:]) * eps
    plus = (probes[:, None] + basis[None]).reshape((-1,) + probes.shape[1:])
    minus = (probes[:, None] - basis[None]).reshape((-1,) + probes.shape[1:])

    def at_label(batch):
        out = keras.ops.convert_to_numpy(model(batch.astype("float32"), training=False))
        out = out.astype(np.float64).reshape(len(probes), size, -1)
        return out[np.arange(len(probes)), :, labels]

    return ((at_label(plus) - at_label(minus)) / (2 * eps)).reshape(probes.shape)


def test_saliency_at_the_last_step_matches_finite_differences(tmp_path, tiny_data):
    x, y = tiny_data
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(3, 3, activation="tanh", name="conv1")(inputs)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(h))
    model.compile("adam", "sparse_categorical_crossentropy")
    probes, labels = x[:3], y[:3].astype(int)
    path = tmp_path / "run.h5"
    model.fit(x, y, batch_size=8, epochs=1, verbose=0,
              callbacks=[LayerWatch(path, probes, labels, saliency=True, budget=None)])
    with h5py.File(path, "r") as f:
        saliency, steps = f["saliency"][:], f["steps"][:]
        assert len(f["activations/conv1"]) == len(steps)
    assert saliency.shape == (len(steps), 3, 8, 8, 1) and saliency.dtype == np.float32
    want = _finite_difference_saliency(model, probes, labels)
    scale = np.abs(want).max()
    assert scale > 0
    np.testing.assert_allclose(saliency[-1], want, atol=2e-2 * scale)
    assert not np.allclose(saliency[0], saliency[-1], atol=2e-2 * scale)  # training moved it


def _gradcam_model(data_format="channels_last"):
    keras.utils.set_random_seed(0)
    first = data_format == "channels_first"
    conv = keras.layers.Conv2D(3, 3, activation="tanh", name="conv1", data_format=data_format)
    pool = keras.layers.GlobalAveragePooling2D(data_format=data_format)
    dense = keras.layers.Dense(3, activation="softmax")
    inputs = keras.Input((1, 8, 8) if first else (8, 8, 1))
    model = keras.Model(inputs, dense(pool(conv(inputs))))
    model.compile(keras.optimizers.Adam(0.05), "sparse_categorical_crossentropy")
    tapped = keras.Input((3, 6, 6) if first else (6, 6, 3))
    return model, keras.Model(inputs, conv.output), keras.Model(tapped, dense(pool(tapped)))


@pytest.mark.parametrize("data_format", [
    "channels_last",
    pytest.param("channels_first", marks=pytest.mark.skipif(
        BACKEND == "tensorflow", reason="TensorFlow's CPU Conv2D is channels-last only")),
])
def test_gradcam_at_the_last_step_matches_finite_differences(tmp_path, tiny_data, data_format):
    x, y = tiny_data
    first = data_format == "channels_first"
    if first:
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    model, conv, head = _gradcam_model(data_format)
    probes, labels = x[:3], y[:3].astype(int)
    path = tmp_path / "run.h5"
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[LayerWatch(
        path, probes, labels, saliency=True, gradcam=True, max_channels=1, budget=None)])
    with h5py.File(path, "r") as f:
        cams, steps = f["gradcam/conv1"][:], f["steps"][:]
        assert len(f["saliency"]) == len(steps)
        assert f["activations/conv1"].shape[2 if first else -1] == 1
    assert cams.shape == (len(steps), 3, 6, 6) and cams.dtype == np.float32
    # The Grad-CAM weight of channel c is the spatial mean of d picked / d A[..., c]:
    # the derivative along "all of channel c", divided by its 36 positions.
    a = keras.ops.convert_to_numpy(conv(probes, training=False)).astype(np.float64)
    if first:
        a = a.transpose(0, 2, 3, 1)  # compared channels-last below
    eps = 1e-2
    weights = np.zeros((3, 3))
    for c in range(3):
        step = np.zeros_like(a)
        step[..., c] = eps

        def picked(t):
            t = t.transpose(0, 3, 1, 2) if first else t
            out = keras.ops.convert_to_numpy(head(t.astype("float32"), training=False))
            return out[np.arange(3), labels].astype(np.float64)

        weights[:, c] = (picked(a + step) - picked(a - step)) / (2 * eps) / 36
    want = np.maximum((a * weights[:, None, None, :]).sum(axis=-1), 0)
    scale = np.abs(want).max()
    assert scale > 0
    np.testing.assert_allclose(cams[-1], want, atol=2e-2 * scale)
    assert not np.allclose(cams[0], cams[-1], atol=2e-2 * scale)  # training moved it


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.conv = keras.layers.Conv2D(3, 3, activation="tanh", name="conv")
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.dense = keras.layers.Dense(3, activation="softmax")

    def call(self, x):
        return self.dense(self.pool(self.conv(x)))


def test_gradcam_of_a_subclassed_model_matches_finite_differences(tmp_path, tiny_data):
    x, y = tiny_data
    keras.utils.set_random_seed(0)
    model = Subclassed()
    model(x[:1])
    model.compile(keras.optimizers.Adam(0.05), "sparse_categorical_crossentropy")
    probes, labels = x[:3], y[:3].astype(int)
    path = tmp_path / "run.h5"
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[LayerWatch(
        path, probes, labels, gradcam=True, budget=None)])
    with h5py.File(path, "r") as f:
        cams = f["gradcam/conv"][:]
    a = keras.ops.convert_to_numpy(model.conv(probes)).astype(np.float64)
    eps, weights = 1e-2, np.zeros((3, 3))
    for c in range(3):
        step = np.zeros_like(a)
        step[..., c] = eps

        def picked(t):
            out = keras.ops.convert_to_numpy(model.dense(model.pool(t.astype("float32"))))
            return out[np.arange(3), labels].astype(np.float64)

        weights[:, c] = (picked(a + step) - picked(a - step)) / (2 * eps) / 36
    want = np.maximum((a * weights[:, None, None, :]).sum(axis=-1), 0)
    scale = np.abs(want).max()
    assert scale > 0 and len(cams) == 7
    np.testing.assert_allclose(cams[-1], want, atol=2e-2 * scale)


@pytest.mark.parametrize("chunk", [None, 8], ids=["one_call", "in_chunks"])
def test_occlusion_matches_predict_on_the_patched_probes(tmp_path, tiny_data, monkeypatch,
                                                         chunk):
    # in_chunks: 30 patched images, 8 a call (a large probe set's way; on
    # PyTorch the first chunk is replayed from a trace, the others are not).
    if chunk is not None:
        monkeypatch.setattr("layerwatch.record.occlusion.CHUNK", chunk)
    x, y = tiny_data
    model, _, _ = _gradcam_model()
    probes, labels = x[:3], y[:3].astype(int)
    path = tmp_path / "run.h5"
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[LayerWatch(
        path, probes, labels, occlusion_every=3, occlusion_patch=4, occlusion_stride=2,
        budget=None)])
    fill = probes.mean(dtype=np.float64)
    base = model.predict(probes, verbose=0)[np.arange(3), labels]
    want = np.zeros((3, 3, 3))
    for i, y0 in enumerate((0, 2, 4)):
        for j, x0 in enumerate((0, 2, 4)):
            patched = probes.copy()
            patched[:, y0:y0 + 4, x0:x0 + 4] = fill
            want[:, i, j] = base - model.predict(patched, verbose=0)[np.arange(3), labels]
    with h5py.File(path, "r") as f:
        assert f["occlusion/steps"][:].tolist() == [0, 3, 6]
        values = f["occlusion/values"][:]
    assert values.shape == (3, 3, 3, 3) and np.abs(want).max() > 1e-4
    np.testing.assert_allclose(values[-1], want, atol=1e-5)


def test_gradcam_and_occlusion_resume_with_every(tmp_path, tiny_data):
    x, y = tiny_data
    model, _, _ = _gradcam_model()
    path = tmp_path / "run.h5"
    options = dict(every=2, gradcam=True, saliency=True, occlusion_every=3, occlusion_patch=4,
                   budget=None)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0,
              callbacks=[LayerWatch(path, x[:2], y[:2], **options)])
    model.fit(x, y, batch_size=8, epochs=2, initial_epoch=1, verbose=0,
              callbacks=[LayerWatch(path, x[:2], y[:2], mode="append", **options)])
    with h5py.File(path, "r") as f:
        steps = f["steps"][:].tolist()
        assert len(f["gradcam/conv1"]) == len(f["saliency"]) == len(steps)
        # step 0, the first snapshot at or after 3, 6, 9 and 12 (also the final step)
        assert f["occlusion/steps"][:].tolist() == [0, 4, 6, 10, 12]
        assert f["occlusion/values"].shape == (5, 2, 2, 2)
    assert steps == [0, 2, 4, 6, 8, 10, 12]
    # `layerwatch info` says what the file holds beside the activations.
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 0, result.output
    assert "saliency: a map per probe at each of the 7 snapshots" in result.output
    assert "grad-cam: at each snapshot, layers conv1" in result.output
    assert "occlusion: 5 map set(s), steps 0..12; patch 4, stride 4, every 3 steps" \
        in result.output
    assert "features:" not in result.output


@pytest.mark.skipif(BACKEND == "torch", reason="Keras refuses steps_per_execution > 1 on torch")
def test_steps_per_execution_records_true_steps(tmp_path, tiny_data):
    x, y = tiny_data
    model, reference = _model(steps_per_execution=4)
    path = tmp_path / "run.h5"
    model.fit(x, y, batch_size=8, epochs=2, verbose=0,
              callbacks=[LayerWatch(path, x[:3], budget=None)])
    with h5py.File(path, "r") as f:
        steps = f["steps"][:].tolist()
        last = f["activations/conv1"][-1]
    assert steps == [0, 4, 6, 10, 12]  # 6 batches per epoch, one call per 4 (or fewer)
    np.testing.assert_allclose(last, _outputs(reference, x[:3])[0], atol=ATOL)


def test_resume_appends_continuous_steps_and_renders(tmp_path, tiny_data):
    x, y = tiny_data
    model, reference = _model()
    path = tmp_path / "run.h5"
    model.fit(x, y, batch_size=8, epochs=1, verbose=0,
              callbacks=[LayerWatch(path, x[:3], budget=None)])
    model.fit(x, y, batch_size=8, epochs=2, initial_epoch=1, verbose=0,
              callbacks=[LayerWatch(path, x[:3], mode="append", budget=None)])
    with h5py.File(path, "r") as f:
        assert f["steps"][:].tolist() == list(range(13))
        np.testing.assert_allclose(f["activations/conv1"][-1],
                                   _outputs(reference, x[:3])[0], atol=ATOL)

    runner = CliRunner()
    result = runner.invoke(main, ["info", str(path)])
    assert result.exit_code == 0, result.output
    assert "conv1" in result.output
    out = tmp_path / "out"
    result = runner.invoke(main, ["render", str(path), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    import imageio.v3 as iio

    frames = iio.imread(out / "conv1.gif", index=None)
    assert len(frames) == 13


@pytest.mark.parametrize("selection", ["first", "variance"])
def test_max_channels_keeps_the_chosen_channels(tmp_path, tiny_data, selection):
    x, y = tiny_data
    model, reference = _model()
    probes = x[:4]
    before = _outputs(reference, probes)
    path = tmp_path / "run.h5"
    model.fit(x, y, batch_size=8, epochs=1, verbose=0,
              callbacks=[LayerWatch(path, probes, max_channels=3, budget=None,
                                    channel_selection=selection)])
    after = _outputs(reference, probes)
    with h5py.File(path, "r") as f:
        ds = f["activations/conv1"]
        channels = ds.attrs["channels"].tolist()
        assert ds.shape == (7, 4, 6, 6, 3)
        assert ds.attrs["channels_total"] == 6
        first, last = ds[0], ds[-1]
    if selection == "first":
        assert channels == [0, 1, 2]
    else:
        spread = before[0].var(axis=0).mean(axis=(0, 1))
        assert channels == sorted(np.argsort(-spread, kind="stable")[:3].tolist())
    np.testing.assert_allclose(first, before[0][..., channels], atol=ATOL)
    np.testing.assert_allclose(last, after[0][..., channels], atol=ATOL)


def test_over_budget_warns_once_with_the_settings_that_fit(tmp_path, tiny_data):
    x, y = tiny_data
    model, _ = _model()
    with pytest.warns(RuntimeWarning, match=r"above budget=1e-06\. every=\d+") as caught:
        model.fit(x, y, batch_size=8, epochs=4, verbose=0,  # measured over the first 18 steps
                  callbacks=[LayerWatch(tmp_path / "run.h5", x[:3], budget=1e-6)])
    assert len([w for w in caught if "budget" in str(w.message)]) == 1


def test_every_auto_thins_recording_to_the_budget(tmp_path, tiny_data):
    x, y = tiny_data
    model, _ = _model()
    path = tmp_path / "run.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # auto adapts, it does not warn
        model.fit(x, y, batch_size=8, epochs=6, verbose=0,
                  callbacks=[LayerWatch(path, x[:3], every="auto", budget=1e-6)])
    with h5py.File(path, "r") as f:
        steps = f["steps"][:].tolist()
    # Every step while measuring (the warm-up, then the measured batch ends),
    # then far apart, and the last.
    measured = CostMeter.warmup + CostMeter.batches
    assert steps[:measured + 1] == list(range(measured + 1))
    assert steps[-1] == 36 and len(steps) <= measured + 3


def _two_input_model():
    keras.utils.set_random_seed(0)
    image = keras.Input((8, 8, 1), name="image")
    mask = keras.Input((6, 6, 2), name="mask")
    a = keras.layers.Conv2D(3, 3, activation="tanh", name="conv_image")(image)
    b = keras.layers.Conv2D(2, 3, activation="relu", name="conv_mask")(mask)
    h = keras.layers.Concatenate()([keras.layers.Flatten()(a), keras.layers.Flatten()(b)])
    model = keras.Model([image, mask], keras.layers.Dense(3, activation="softmax")(h))
    model.compile("adam", "sparse_categorical_crossentropy")
    reference = keras.Model(model.inputs, [model.get_layer("conv_image").output,
                                           model.get_layer("conv_mask").output])
    return model, reference


@pytest.mark.parametrize("as_dict", [False, True])
def test_a_multi_input_model_is_recorded_per_input(tmp_path, tiny_data, as_dict):
    x, y = tiny_data
    extra = np.random.default_rng(3).normal(size=(len(x), 6, 6, 2)).astype("float32")
    model, reference = _two_input_model()
    probes = {"image": x[:3], "mask": extra[:3]} if as_dict else [x[:3], extra[:3]]
    path = tmp_path / "run.h5"
    model.fit([x, extra], y, batch_size=8, epochs=1, verbose=0,
              callbacks=[LayerWatch(path, probes, budget=None)])
    want = _outputs(reference, [x[:3], extra[:3]])
    with h5py.File(path, "r") as f:
        assert f["steps"][:].tolist() == list(range(7))
        np.testing.assert_array_equal(f["probes/inputs/image"][:], x[:3])
        np.testing.assert_array_equal(f["probes/inputs/mask"][:], extra[:3])
        np.testing.assert_array_equal(f["probes/x"][:], x[:3])  # the first input
        image, mask = f["activations/conv_image"], f["activations/conv_mask"]
        assert image.attrs["probe_input"].decode() == "image"
        assert mask.attrs["probe_input"].decode() == "mask"
        np.testing.assert_allclose(image[-1], want[0], atol=ATOL)
        np.testing.assert_allclose(mask[-1], want[1], rtol=1e-5, atol=1e-6)  # float32
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["render", str(path), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    import imageio.v3 as iio

    # Each layer's top row shows its own input: 6×6 cells for the mask's layer.
    assert len(iio.imread(out / "conv_mask.gif", index=None)) == 7


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="subclassed")
        self.conv1 = keras.layers.Conv2D(4, 3, activation="relu", name="conv1")
        self.pool = keras.layers.MaxPooling2D()
        self.conv2 = keras.layers.Conv2D(3, 3, activation="tanh", name="conv2")
        self.head = keras.layers.Dense(3, activation="softmax")

    def call(self, x):
        h = self.conv2(self.pool(self.conv1(x)))
        return self.head(keras.ops.mean(h, axis=(1, 2)))


def test_a_subclassed_model_is_recorded(tmp_path, tiny_data):
    x, y = tiny_data
    keras.utils.set_random_seed(0)
    model = _Subclassed()
    model.compile("adam", "sparse_categorical_crossentropy")
    model(x[:1])  # built
    path = tmp_path / "run.h5"
    model.fit(x, y, batch_size=8, epochs=2, verbose=0,
              callbacks=[LayerWatch(path, x[:3], budget=None)])
    conv1 = keras.ops.convert_to_numpy(model.conv1(x[:3]))
    conv2 = keras.ops.convert_to_numpy(model.conv2(model.pool(model.conv1(x[:3]))))
    with h5py.File(path, "r") as f:
        assert f["steps"][:].tolist() == list(range(13))
        assert sorted(f["activations"]) == ["conv1", "conv2"]
        assert f["activations/conv1"].dtype == np.float32  # ReLU: unbounded
        np.testing.assert_allclose(f["activations/conv1"][-1], conv1, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(f["activations/conv2"][-1], conv2, atol=ATOL)
        assert not np.allclose(f["activations/conv1"][0], f["activations/conv1"][-1])
    # The model trains and predicts as before: no layer is left wrapped.
    assert "call" not in vars(model.conv1)
    model.predict(x[:2], verbose=0)


def test_features_beat_every_probe_at_the_final_step(tmp_path, tiny_data):
    x, y = tiny_data
    model, reference = _model()
    probes = x[:3]
    path = tmp_path / "run.h5"
    model.fit(x, y, batch_size=8, epochs=1, verbose=0,
              callbacks=[LayerWatch(path, probes, features_every=4, features_channels=4,
                                    budget=None)])
    with h5py.File(path, "r") as f:
        assert f["features/steps"][:].tolist() == [0, 4, 6]
        rows = {key: (f[f"features/images/{key}"][-1],
                      f[f"features/images/{key}"].attrs["channels"],
                      f[f"features/activation/{key}"][-1]) for key in ("conv1", "conv2")}
    # Recomputed with the trained model: each image excites its own channel
    # (mean over positions, inference mode) more than any probe does.
    probe_means = [o.mean(axis=(1, 2)) for o in _outputs(reference, probes)]
    for i, (key, (images, channels, stored)) in enumerate(rows.items()):
        assert images.shape == (4,) + probes.shape[1:]
        means = _outputs(reference, images)[i].mean(axis=(1, 2))
        own = means[np.arange(len(channels)), channels]
        np.testing.assert_allclose(own, stored, rtol=1e-4, atol=1e-5)
        assert (own > probe_means[i][:, channels].max(axis=0)).all(), key
    result = CliRunner().invoke(main, ["info", str(path)])
    assert "features: 3 set(s), steps 0..6; images per layer: conv1 (4), conv2 (4)" \
        in result.output, result.output
