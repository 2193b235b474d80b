"""The optional ``features`` group: activation-maximization images, laid out, written, read.

A run recorded with ``LayerWatch(..., features_every=N)`` keeps, at its
features steps, per recorded layer the input that most excites each of the
layer's first channels (computed by :mod:`layerwatch.record.features`), with
the mean activation it reaches and the best probe's, so the claim "it beats
every probe" can be checked with plain h5py. Rows are committed like the
analysis Grams: the data first, then ``features/steps``, whose length readers
trust. Every name comes from :mod:`layerwatch.store.schema`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np

from layerwatch.text import printable

from .schema import (
    CHANNELS,
    FEATURES,
    FEATURES_ACTIVATION,
    FEATURES_IMAGES,
    FEATURES_PROBE_BEST,
    FEATURES_STEPS,
    INDEX_FILL,
    PROBES_X,
    fixed,
)
from .validate import MAX_RANK, MAX_SNAPSHOT_ELEMENTS, MAX_SNAPSHOTS, attr

#: The per-layer groups of ``features``: one dataset per layer key in each.
_PER_LAYER = (FEATURES_IMAGES, FEATURES_ACTIVATION, FEATURES_PROBE_BEST)


@dataclass(frozen=True)
class FeaturesSpec:
    """What the writer needs to lay out the ``features`` group.

    ``channels`` maps each layer key to the model's channel indices that get
    an image, in order; ``input_shape`` is one probe's shape; ``attrs`` (the
    schedule and the ascent's settings) are stored on the group.
    """

    input_shape: tuple[int, ...]
    channels: dict[str, np.ndarray]
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FeatureRow:
    """One layer's images at one step: ``images`` (channels, *input shape), and
    per image its mean activation and the best probe's (channels,)."""

    images: np.ndarray
    activation: np.ndarray
    probe_best: np.ndarray


def create_features(f: h5py.File, hold: Any, spec: FeaturesSpec, *,
                    compression: str | None, compression_opts: int | None) -> None:
    """Lay out the ``features`` group; ``hold`` keeps each object made open."""
    group = hold(f.create_group(FEATURES))
    for name, value in spec.attrs.items():
        group.attrs[name] = fixed(value)
    hold(f.create_dataset(FEATURES_STEPS, (0,), maxshape=(None,), dtype=np.int64,
                          chunks=(1024,), fillvalue=INDEX_FILL))
    for name in _PER_LAYER:
        hold(f.create_group(name))
    for key, channels in spec.channels.items():
        n = len(channels)
        shape = (n,) + tuple(int(d) for d in spec.input_shape)
        ds = hold(f.create_dataset(
            f"{FEATURES_IMAGES}/{key}", (0,) + shape, maxshape=(None,) + shape,
            dtype=np.float32, chunks=(1,) + shape, compression=compression,
            compression_opts=compression_opts if compression == "gzip" else None,
            shuffle=bool(compression)))
        ds.attrs[CHANNELS] = np.asarray(channels, dtype=np.int64)
        for name in (FEATURES_ACTIVATION, FEATURES_PROBE_BEST):
            hold(f.create_dataset(f"{name}/{key}", (0, n), maxshape=(None, n),
                                  dtype=np.float32, chunks=(64, n)))


def feature_keys(f: h5py.File) -> list[str] | None:
    """The layer keys of a file's features group, or None when it has none."""
    return list(f[FEATURES_IMAGES]) if FEATURES in f else None


def check_feature_rows(node: Any, keys: Sequence[str],
                       rows: Sequence[tuple[int, dict[str, FeatureRow]]]) -> None:
    """Refuse rows that do not fit the file, before anything is written."""
    if rows and keys is None:
        raise ValueError("features for a recording made without features_every=")
    for _, by_key in rows:
        if sorted(by_key) != sorted(keys):
            raise ValueError(f"features for layers {sorted(by_key)}; the recording has "
                             f"{sorted(keys)}")
        for key, row in by_key.items():
            want = node(f"{FEATURES_IMAGES}/{key}").shape[1:]
            if np.shape(row.images) != want or np.shape(row.activation) != want[:1] \
                    or np.shape(row.probe_best) != want[:1]:
                raise ValueError(f"{FEATURES_IMAGES}/{key}: features of shape "
                                 f"{np.shape(row.images)} do not fit the recording's {want}")


def write_feature_rows(node: Any, keys: Sequence[str],
                       rows: Sequence[tuple[int, dict[str, FeatureRow]]]
                       ) -> tuple[h5py.Dataset, list[int]]:
    """Write the rows' data; return ``(features/steps, their steps)`` for the
    caller to commit after a flush. ``node(path)`` opens a dataset of the file."""
    f0 = node(FEATURES_STEPS).shape[0]
    for key in keys:
        for name, column in ((FEATURES_IMAGES, "images"), (FEATURES_ACTIVATION, "activation"),
                             (FEATURES_PROBE_BEST, "probe_best")):
            ds = node(f"{name}/{key}")
            ds.resize(f0 + len(rows), axis=0)
            ds[f0:] = np.stack([getattr(by_key[key], column) for _, by_key in rows]
                               ).astype(np.float32)
    return node(FEATURES_STEPS), [step for step, _ in rows]


def cut_features(node: Any, rows: int) -> None:
    """Cut every dataset of the features group to ``rows`` rows."""
    f = node.file
    paths = [FEATURES_STEPS] + [f"{name}/{key}" for name in _PER_LAYER for key in f[name]]
    for path in paths:
        ds = node(path)
        ds.resize(min(rows, ds.shape[0]), axis=0)


def rows_through(f: h5py.File, step: int) -> int:
    """Rows of ``features/steps`` at or before ``step`` (0 without features)."""
    if FEATURES not in f:
        return 0
    steps = f[FEATURES_STEPS][:]
    return int(np.searchsorted(steps, step, side="right"))


class FeaturesReading:
    """The reader's side of the features group (a part of :class:`~layerwatch.store.Run`)."""

    @property
    def has_features(self) -> bool:
        """Whether the run recorded feature images (``LayerWatch(..., features_every=N)``)."""
        return FEATURES in self._f

    def _features(self) -> int:
        """Committed rows of a well-formed features group (KeyError without one)."""
        if not self.has_features:
            raise KeyError(f"{self.path} holds no feature images (recorded without "
                           "features_every=; pass LayerWatch(..., features_every=N) to "
                           "record them).")
        check = self._check
        check.group(FEATURES)
        steps = check.dataset(FEATURES_STEPS, ndim=(1,), kinds="iu")
        rows = min(steps.shape[0], MAX_SNAPSHOTS)
        px = self._f[PROBES_X].shape[1:]
        for key in check.group(FEATURES_IMAGES):
            images = check.dataset(f"{FEATURES_IMAGES}/{key}", ndim=range(2, MAX_RANK + 3),
                                   kinds="f")
            n = images.shape[1]
            if images.shape[2:] != px or n * int(np.prod(px)) > MAX_SNAPSHOT_ELEMENTS:
                raise check.damaged(f"{FEATURES_IMAGES}/{printable(key)} has shape "
                                    f"{images.shape}; expected (rows, channels, *{px}).")
            rows = min(rows, images.shape[0])
            for name in (FEATURES_ACTIVATION, FEATURES_PROBE_BEST):
                ds = check.dataset(f"{name}/{key}", ndim=(2,), kinds="f")
                if ds.shape[1] != n:
                    raise check.damaged(f"{name}/{printable(key)} has shape {ds.shape}.")
                rows = min(rows, ds.shape[0])
        with self._reading():
            values = np.asarray(steps[:rows], dtype=np.int64)
        bad = np.flatnonzero((values < 0) | (np.diff(values, prepend=-1) <= 0))
        return int(bad[0]) if len(bad) else int(rows)

    @property
    def feature_steps(self) -> np.ndarray:
        """Steps of the committed feature rows (empty without features)."""
        if not self.has_features:
            return np.zeros(0, dtype=np.int64)
        rows = self._features()
        with self._reading():
            return np.asarray(self._f[FEATURES_STEPS][:rows], dtype=np.int64)

    @property
    def feature_layers(self) -> list[str]:
        """Keys of the layers that have feature images, in the file's layer order."""
        if not self.has_features:
            return []
        held = set(self._f[FEATURES_IMAGES])
        return [layer.key for layer in self.layers if layer.key in held]

    @property
    def feature_settings(self) -> dict[str, Any]:
        """The features group's attributes: ``every``, ``iterations``, ``step_size``, …"""
        self._features()
        group = self._f[FEATURES]
        return {printable(k): attr(group, k) for k in list(group.attrs)[:64]}

    def _feature_dataset(self, group: str, key: str) -> tuple[h5py.Dataset, int]:
        rows = self._features()
        layer = self.layer(key)
        if layer.key not in self._f[FEATURES_IMAGES]:
            raise KeyError(f"{self.path} holds no feature images of layer {key!r}.")
        with self._reading():
            return self._f[group][layer.key], rows

    def feature_channels(self, key: str) -> np.ndarray:
        """The model's channel indices that have an image, in order."""
        ds, _ = self._feature_dataset(FEATURES_IMAGES, key)
        with self._reading():
            return np.asarray(ds.attrs[CHANNELS], dtype=np.int64)

    def features(self, key: str, index: Any = slice(None)) -> np.ndarray:
        """Feature images of one layer, indexed along feature rows, float32:
        ``(channels, *input shape)`` per row."""
        ds, rows = self._feature_dataset(FEATURES_IMAGES, key)
        return _rows(self, ds, rows, index)

    def feature_activation(self, key: str) -> np.ndarray:
        """``(rows, channels)``: each image's mean activation of its channel."""
        ds, rows = self._feature_dataset(FEATURES_ACTIVATION, key)
        return _rows(self, ds, rows, slice(None))

    def feature_probe_best(self, key: str) -> np.ndarray:
        """``(rows, channels)``: the highest mean activation of that channel over the probes."""
        ds, rows = self._feature_dataset(FEATURES_PROBE_BEST, key)
        return _rows(self, ds, rows, slice(None))

    def _refresh_features(self) -> None:
        if not self.has_features:
            return
        self._f[FEATURES_STEPS].refresh()
        for name in _PER_LAYER:
            for ds in self._f[name].values():
                ds.refresh()


def _rows(run: Any, ds: h5py.Dataset, rows: int, index: Any) -> np.ndarray:
    if isinstance(index, (int, np.integer)):
        i = int(index) + (rows if index < 0 else 0)
        if not 0 <= i < rows:
            raise IndexError(f"feature row {index} out of range 0..{rows - 1}")
        index = slice(i, i + 1)
        single = True
    else:
        single = False
    if not isinstance(index, slice):
        raise TypeError("features are indexed by an int or a slice")
    start, stop, step = index.indices(rows)
    with run._reading():
        out = ds[start:stop:step] if step > 0 else ds[:rows][index]
    out = np.asarray(out, dtype=np.float32)
    return out[0] if single else out


def check_features_appendable(run: Any, spec: FeaturesSpec | None) -> str | None:
    """Why ``run`` cannot be continued with ``spec`` (None: it can)."""
    if run.has_features != (spec is not None):
        return (f"it was recorded {'with' if run.has_features else 'without'} feature images, "
                f"this run {'records them' if spec is not None else 'does not'}. Pass the same "
                "features_every= (and features_channels=), or record a new file.")
    if spec is None:
        return None
    held = {key: run.feature_channels(key).tolist() for key in run.feature_layers}
    wanted = {key: np.asarray(c).tolist() for key, c in spec.channels.items()}
    if held != wanted:
        return (f"its feature images are of channels {held}, this run's of {wanted}. Pass "
                "the same features_channels= (and max_channels=), or record a new file.")
    return None
