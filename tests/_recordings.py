"""Recordings made without Keras, for the store, reliability and fuzz tests."""

from __future__ import annotations

import numpy as np

from layerwatch.store import LayerSpec, RunWriter

PROBES = 3


def make_run(path, *, snapshots: int = 6, nan_at: dict | None = None, close: bool = True,
             flush_snapshots: int = 32, compression: str | None = "gzip") -> RunWriter:
    """A small recording: two layers, ``snapshots`` steps 0, 2, 4, ...; values
    of snapshot i are ``i`` everywhere (so readers can check what they got).
    ``nan_at`` maps a layer key to the first snapshot index written as NaN."""
    rng = np.random.default_rng(0)
    layers = [
        LayerSpec("conv1", (6, 6, 4), {"layer_name": "conv1", "layer_class": "Conv2D",
                                       "activation": "relu", "tensor": "conv1",
                                       "channel_axis": 2}),
        LayerSpec("conv2", (4, 4, 2), {"layer_name": "conv2", "layer_class": "Conv2D",
                                       "activation": "tanh", "tensor": "conv2",
                                       "channel_axis": 2,
                                       "value_range": np.array([-1.0, 1.0])}),
    ]
    writer = RunWriter.create(
        str(path), layers=layers, probes_x=rng.normal(size=(PROBES, 8, 8, 1)).astype("float32"),
        probes_y=np.arange(PROBES), metadata={"model_name": "tiny", "every": 1},
        texts={"summary": "a tiny model", "model_config": "{}"},
        compression=compression, flush_snapshots=flush_snapshots, flush_seconds=60)
    nan_at = nan_at or {}
    for i in range(snapshots):
        arrays = []
        for spec in layers:
            a = np.full((PROBES,) + spec.shape, float(i) / 10, dtype=np.float32)
            if spec.key in nan_at and i >= nan_at[spec.key]:
                a[0, 0, 0, 0] = np.nan if i % 2 else np.inf
            arrays.append(a)
        writer.add_snapshot(2 * i, i // 3, arrays)
        writer.add_batch_logs(2 * i, {"loss": 1.0 / (i + 1), "accuracy": i / 10})
        if i % 3 == 2:
            writer.add_epoch_logs(i // 3, 2 * i, {"val_loss": 1.0 / (i + 1)})
    if close:
        writer.close()
    else:
        writer.flush(wait=True)
    return writer
