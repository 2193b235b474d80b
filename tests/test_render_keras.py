"""The exactness check of issue 3 on a recording made by the real callback."""

import numpy as np
import pytest

keras = pytest.importorskip("keras")
iio = pytest.importorskip("imageio.v3")

import layerwatch  # noqa: E402
from layerwatch.rendering import colormap  # noqa: E402
from layerwatch.rendering import render  # noqa: E402


def test_constant_tanh_layer_renders_its_colour_in_every_frame(tmp_path):
    v = -0.6
    inputs = keras.Input((8, 8, 1))
    const = keras.layers.Conv2D(2, 3, padding="same", activation="tanh", name="const",
                                kernel_initializer="zeros",
                                bias_initializer=keras.initializers.Constant(np.arctanh(v)),
                                trainable=False)(inputs)
    outputs = keras.layers.Dense(2)(keras.layers.Flatten()(const))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(0)
    x = rng.random((8, 8, 8, 1)).astype("float32")
    y = rng.random((8, 2)).astype("float32")
    path = tmp_path / "const.h5"
    model.fit(x, y, batch_size=4, epochs=2, verbose=0,
              callbacks=[layerwatch.LayerWatch(str(path), x[:3], dtype="float32")])

    with layerwatch.open_run(path) as run:
        n = run.num_snapshots
    written = render(path, tmp_path / "out")
    gif = tmp_path / "out" / "const.gif"
    assert gif in written
    frames = iio.imread(gif, index=None)[..., :3]
    assert frames.shape[0] == n >= 4
    expected = np.array(colormap.color_of(v), dtype=np.uint8)
    # 3 probes x 2 channels x an 8x8 cell of the constant colour, in every frame
    hits = (frames == expected).all(axis=-1).sum(axis=(1, 2))
    assert hits.tolist() == [3 * 2 * 64] * n
