"""Recording under distribution engines, each run in fresh processes.

Device layouts (logical CPU devices, XLA host devices) and TF_CONFIG must be
set before the framework starts, so every case runs its training in
subprocesses bounded by a timeout.
"""

import os
import socket
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

TIMEOUT = 240
ATOL = 2e-3

COMMON = """
import os, sys, json
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np

def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(48, 8, 8, 1)).astype("float32"), np.arange(48) % 3

def model_fn(keras):
    keras.utils.set_random_seed(0)
    x = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, activation="relu", name="conv1")(x)
    h = keras.layers.Conv2D(4, 3, activation="relu", name="conv2")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(x, keras.layers.Dense(3, activation="softmax")(h))
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    return model

def conv_outputs(keras, model, probes):
    ref = keras.Model(model.inputs, [model.get_layer(n).output for n in ("conv1", "conv2")])
    return [keras.ops.convert_to_numpy(t) for t in ref(probes, training=False)]
"""


def _run(script: str, tmp_path, name: str, env: dict | None = None, args=()) -> subprocess.Popen:
    path = tmp_path / f"{name}.py"
    path.write_text(COMMON + textwrap.dedent(script))
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([sys.executable, str(path), *map(str, args)], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc: subprocess.Popen) -> str:
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"worker did not finish in {TIMEOUT} s:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MIRRORED = """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from layerwatch import LayerWatch
out = sys.argv[1]
x, y = data()
single = model_fn(keras)
weights = single.get_weights()
single.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
           callbacks=[LayerWatch(f"{out}/single.h5", x[:3], budget=None)])
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():  # fit inside the scope too: the harder case for predict
    mirrored = model_fn(keras)
    mirrored.set_weights(weights)
    mirrored.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
                 callbacks=[LayerWatch(f"{out}/mirrored.h5", x[:3], budget=None)])
np.savez(f"{out}/after.npz", *conv_outputs(keras, mirrored, x[:3]))
"""


def test_mirrored_strategy_records_one_snapshot_per_step_like_one_device(tmp_path):
    _wait(_run(MIRRORED, tmp_path, "mirrored", {"KERAS_BACKEND": "tensorflow"}, [tmp_path]))
    with h5py.File(tmp_path / "single.h5", "r") as one, \
            h5py.File(tmp_path / "mirrored.h5", "r") as two:
        assert two["steps"][:].tolist() == one["steps"][:].tolist() == list(range(13))
        for key in ("conv1", "conv2"):
            assert two[f"activations/{key}"].shape == one[f"activations/{key}"].shape
            np.testing.assert_allclose(two[f"activations/{key}"][:],
                                       one[f"activations/{key}"][:], atol=ATOL)
        after = np.load(tmp_path / "after.npz")
        np.testing.assert_allclose(two["activations/conv2"][-1], after["arr_1"], atol=ATOL)
        assert not np.allclose(two["activations/conv2"][0], two["activations/conv2"][-1],
                               atol=ATOL)


MULTI_WORKER = """
index, port0, port1, path, out = sys.argv[1:6]
os.environ["TF_CONFIG"] = json.dumps({
    "cluster": {"worker": [f"127.0.0.1:{port0}", f"127.0.0.1:{port1}"]},
    "task": {"type": "worker", "index": int(index)}})
import tensorflow as tf
strategy = tf.distribute.MultiWorkerMirroredStrategy()
import keras
import keras.src.backend.tensorflow.trainer as tf_trainer
from layerwatch import LayerWatch
# Keras 3 cannot fit under MultiWorkerMirroredStrategy as shipped
# (keras-team/keras#20585): its symbolic build and its log reduction both
# fail. These two patches are the user's workaround, not layerwatch's.
tf_trainer._collective_all_reduce_multi_worker = lambda strategy: False
x, y = data()
with strategy.scope():
    model = model_fn(keras)
model._maybe_symbolic_build = lambda *args, **kwargs: None
callback = LayerWatch(path, x[:3])  # the same path on every worker, mode "new"
dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
model.fit(dataset, epochs=2, verbose=0, callbacks=[callback])
np.savez(f"{out}/after{index}.npz", *conv_outputs(keras, model, x[:3]))
print("steps", int(model.optimizer.iterations.numpy()))
"""


def test_multi_worker_only_the_chief_writes(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    runs.mkdir()
    out.mkdir()
    ports = [_free_port(), _free_port()]
    env = {"KERAS_BACKEND": "tensorflow"}
    workers = [_run(MULTI_WORKER, tmp_path, f"worker{i}", env,
                    [i, *ports, runs / "run.h5", out]) for i in range(2)]
    outputs = [_wait(w) for w in workers]
    assert all("steps 12" in o for o in outputs), outputs[0][-2000:]
    assert sorted(os.listdir(runs)) == ["run.h5"]  # nothing else, no temp files left
    after = np.load(out / "after0.npz")
    with h5py.File(runs / "run.h5", "r") as f:
        assert f["steps"][:].tolist() == list(range(13))
        assert f["activations/conv1"].shape == (13, 3, 6, 6, 4)
        np.testing.assert_allclose(f["activations/conv1"][-1], after["arr_0"], atol=ATOL)
        np.testing.assert_allclose(f["activations/conv2"][-1], after["arr_1"], atol=ATOL)


JAX_DATA_PARALLEL = """
import jax
import keras
from layerwatch import LayerWatch
out = sys.argv[1]
devices = keras.distribution.list_devices()
assert len(devices) == 2, devices
keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
x, y = data()
model = model_fn(keras)
before = conv_outputs(keras, model, x[:3])
model.fit(x, y, batch_size=8, epochs=2, verbose=0,
          callbacks=[LayerWatch(f"{out}/run.h5", x[:3], budget=None)])
np.savez(f"{out}/ref.npz", *before, *conv_outputs(keras, model, x[:3]))
print("process", jax.process_index(), "of", jax.process_count())
"""


def test_jax_data_parallel_records_on_process_zero(tmp_path):
    probe = subprocess.run([sys.executable, "-c", "import jax"], capture_output=True)
    if probe.returncode != 0:
        if os.environ.get("CI") or os.environ.get("LAYERWATCH_REQUIRE_BACKEND"):
            pytest.fail("jax is required in CI: pip install layerwatch[jax]")
        pytest.skip("jax is not installed (pip install layerwatch[jax])")
    env = {"KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    output = _wait(_run(JAX_DATA_PARALLEL, tmp_path, "jax_dp", env, [tmp_path]))
    assert "process 0 of 1" in output
    ref = np.load(tmp_path / "ref.npz")
    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert f["steps"][:].tolist() == list(range(13))
        assert f.attrs["backend"].decode() == "jax"
        np.testing.assert_allclose(f["activations/conv1"][0], ref["arr_0"], atol=ATOL)
        np.testing.assert_allclose(f["activations/conv2"][-1], ref["arr_3"], atol=ATOL)
