"""The Grad-CAM and occlusion datasets: laid out, checked, read, continued and cut.

Both are optional (``LayerWatch(..., gradcam=True, occlusion_every=N)``, see
``docs/FORMAT.md``). ``gradcam/<key>`` grows by one row per snapshot, written
with the activations (like ``saliency``); ``occlusion/values`` grows at its own
coarse schedule, committed by its own index ``occlusion/steps`` (like the
analysis Grams). The writer, reader, append and repair call the helpers here,
so every rule about these datasets sits in one module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import h5py
import numpy as np

from layerwatch.text import printable

from . import codec
from .schema import (
    ATTR_OCCLUSION_EVERY,
    ATTR_OCCLUSION_FILL,
    ATTR_OCCLUSION_PATCH,
    ATTR_OCCLUSION_STRIDE,
    GRADCAM,
    INDEX_FILL,
    OCCLUSION,
    OCCLUSION_STEPS,
    OCCLUSION_VALUES,
    RecordingError,
)

# -- laying out a new file ----------------------------------------------------- #

def create_gradcam(f: h5py.File, hold: Callable, n_probes: int,
                   shapes: dict[str, tuple[int, int]], *, compression: str | None,
                   compression_opts: int | None, shuffle: bool) -> None:
    """One ``gradcam/<key>`` dataset (T, probes, h, w) float32 per layer in ``shapes``,
    chunked along time and compressed like the activations."""
    group = hold(f.create_group(GRADCAM))
    for key, (h, w) in shapes.items():
        shape = (n_probes, int(h), int(w))
        hold(group.create_dataset(
            key, (0,) + shape, maxshape=(None,) + shape, dtype=np.float32,
            chunks=(codec.time_chunk(shape, np.float32),) + shape, compression=compression,
            compression_opts=compression_opts if compression == "gzip" else None,
            shuffle=shuffle if compression else False))


def create_occlusion(f: h5py.File, hold: Callable, n_probes: int, *, every: int, patch: int,
                     stride: int, fill: float, grid: tuple[int, int]) -> None:
    """The ``occlusion`` group: its attributes, ``steps`` and ``values``."""
    group = hold(f.create_group(OCCLUSION))
    group.attrs[ATTR_OCCLUSION_EVERY] = int(every)
    group.attrs[ATTR_OCCLUSION_PATCH] = int(patch)
    group.attrs[ATTR_OCCLUSION_STRIDE] = int(stride)
    group.attrs[ATTR_OCCLUSION_FILL] = float(fill)
    shape = (n_probes, int(grid[0]), int(grid[1]))
    hold(f.create_dataset(OCCLUSION_STEPS, (0,), maxshape=(None,), dtype=np.int64,
                          chunks=(1024,), fillvalue=INDEX_FILL))
    hold(f.create_dataset(OCCLUSION_VALUES, (0,) + shape, maxshape=(None,) + shape,
                          dtype=np.float32, chunks=(1,) + shape, compression="gzip",
                          compression_opts=4, shuffle=True))


def gradcam_keys(f: h5py.File) -> list[str]:
    """The layer keys with a Grad-CAM dataset, sorted (the order rows are handed over in)."""
    if GRADCAM not in f:
        return []
    group = f[GRADCAM]
    if not isinstance(group, h5py.Group) or len(group) > 4096 or not all(
            isinstance(group.get(k, getlink=True), h5py.HardLink) for k in group):
        raise RecordingError(f"{f.filename} is damaged: '{GRADCAM}' is not a group of "
                             "datasets.")
    return sorted(group)


def occlusion_settings(f: h5py.File) -> dict[str, Any] | None:
    """``{"every", "patch", "stride", "fill"}`` of a file's occlusion group, or None."""
    if OCCLUSION not in f:
        return None
    attrs = f[OCCLUSION].attrs
    out = {}
    for name, kind in ((ATTR_OCCLUSION_EVERY, int), (ATTR_OCCLUSION_PATCH, int),
                       (ATTR_OCCLUSION_STRIDE, int), (ATTR_OCCLUSION_FILL, float)):
        value = attrs.get(name)
        if value is None or np.ndim(value) != 0:
            raise RecordingError(f"{f.filename} is damaged: the attribute "
                                 f"{OCCLUSION}/{name} is missing or not a number.")
        out[name] = kind(value)
    return out


# -- the commit rules ---------------------------------------------------------- #

def gradcam_rows(f: h5py.File) -> int | None:
    """The fewest rows of any Grad-CAM dataset (None without Grad-CAM): a bound on the
    snapshots committed, as ``saliency``'s length is."""
    keys = gradcam_keys(f)
    return min(f[GRADCAM][k].shape[0] for k in keys) if keys else None


def committed_occlusion_rows(f: h5py.File) -> int:
    """Occlusion rows whose index was written: ``min(len(values), len(steps))`` cut at
    the first step that is the fill value or does not increase."""
    if OCCLUSION not in f:
        return 0
    rows = min(f[OCCLUSION_STEPS].shape[0], f[OCCLUSION_VALUES].shape[0])
    steps = np.asarray(f[OCCLUSION_STEPS][:rows], dtype=np.int64)
    bad = np.flatnonzero((steps < 0) | (np.diff(steps, prepend=-1) <= 0))
    return int(bad[0]) if len(bad) else int(rows)


def refresh(f: h5py.File) -> None:
    """See what a live writer committed to these datasets since they were opened."""
    for key in gradcam_keys(f):
        f[GRADCAM][key].refresh()
    if OCCLUSION in f:
        f[OCCLUSION_STEPS].refresh()
        f[OCCLUSION_VALUES].refresh()


def cut(node: Any, snapshots: int, occlusion_rows: int | None) -> None:
    """Cut the Grad-CAM rows to ``snapshots`` and occlusion to ``occlusion_rows`` (None:
    keep). ``node`` opens datasets (:class:`~layerwatch.store.closing.Handles`)."""
    f = node.file
    for key in gradcam_keys(f):
        ds = node(f"{GRADCAM}/{key}")
        ds.resize(min(snapshots, ds.shape[0]), axis=0)
    if OCCLUSION in f and occlusion_rows is not None:
        for name in (OCCLUSION_STEPS, OCCLUSION_VALUES):
            ds = node(name)
            ds.resize(min(occlusion_rows, ds.shape[0]), axis=0)


def check_appendable(run: Any, *, gradcam: Sequence[str] | None,
                     occlusion: dict[str, Any] | None) -> str | None:
    """Why ``run`` cannot be continued by a run recording ``gradcam`` (layer keys) and
    ``occlusion`` (settings), or None when it can."""
    stored = list(run.gradcam_layers)
    wanted = sorted(gradcam or [])
    if stored != wanted:
        if not stored or not wanted:
            return (f"it was recorded {'with' if stored else 'without'} Grad-CAM, this run "
                    f"{'records it' if wanted else 'does not'}. Pass the same gradcam=")
        return (f"its Grad-CAM layers {stored} differ from this run's {wanted}. Pass the "
                "same gradcam= and layers=")
    held = run.occlusion_settings
    if (held is None) != (occlusion is None):
        return (f"it was recorded {'with' if held else 'without'} occlusion, this run "
                f"{'records it' if occlusion else 'does not'}. Pass the same occlusion_every=")
    if held is not None:
        for name in (ATTR_OCCLUSION_PATCH, ATTR_OCCLUSION_STRIDE):
            if held[name] != occlusion[name]:
                return (f"its occlusion {name} is {held[name]}, this run's "
                        f"{occlusion[name]}. Pass occlusion_{name}={held[name]}")
    return None


# -- reading ------------------------------------------------------------------- #

class ExplanationReads:
    """The reading side, mixed into :class:`~layerwatch.store.reader.Run` (which
    provides ``_f``, ``_check``, ``_reading``, ``_rows``, ``_iter_rows``, ``path``,
    ``num_snapshots``)."""

    _f: h5py.File

    @property
    def has_gradcam(self) -> bool:
        """Whether the run recorded Grad-CAM maps (``LayerWatch(..., gradcam=True)``)."""
        return GRADCAM in self._f

    @property
    def gradcam_layers(self) -> list[str]:
        """Keys of the layers with Grad-CAM maps (those with 2-D spatial output), sorted."""
        if not self.has_gradcam:
            return []
        with self._reading():
            return gradcam_keys(self._f)

    def _gradcam_dataset(self, key: str) -> h5py.Dataset:
        if not self.has_gradcam:
            raise KeyError(f"{self.path} holds no Grad-CAM maps (recorded without "
                           "gradcam=True).")
        keys = self.gradcam_layers
        if key not in keys:
            # a layer name may differ from its key (nested models: "encoder.conv1")
            named = [layer.key for layer in self.layers if layer.layer_name == key]
            if len(named) == 1 and named[0] in keys:
                key = named[0]
            else:
                raise KeyError(f"{self.path} holds no Grad-CAM maps of layer "
                               f"{printable(key)!r}; it has them of {keys} (layers with a "
                               "2-D spatial output).")
        ds = self._check.dataset(f"{GRADCAM}/{key}", ndim=(4,), kinds="f")
        n_probes = self._f["probes/x"].shape[0]
        if ds.shape[1] != n_probes or int(np.prod(ds.shape[1:], dtype=np.float64)) > (1 << 27):
            raise self._check.damaged(f"{GRADCAM}/{printable(key)} has shape {ds.shape}.")
        return ds

    def gradcam(self, key: str, index: Any = slice(None)) -> np.ndarray:
        """Grad-CAM maps of one layer, indexed along snapshots, float32:
        ``(probes, h, w)`` per snapshot, ``h, w`` the layer's spatial size."""
        ds = self._gradcam_dataset(key)
        with self._reading():
            return self._rows(ds, index)

    def iter_gradcam(self, key: str, indices: Sequence[int] | None = None
                     ) -> Iterator[np.ndarray]:
        """Yield the Grad-CAM maps of one layer, one snapshot at a time."""
        return self._iter_rows(self._gradcam_dataset(key), self.num_snapshots, indices,
                               "snapshot", np.float32)

    @property
    def has_occlusion(self) -> bool:
        """Whether the run recorded occlusion sensitivity (``occlusion_every=``)."""
        return OCCLUSION in self._f

    @property
    def occlusion_settings(self) -> dict[str, Any] | None:
        """``{"every", "patch", "stride", "fill"}`` of the occlusion recording, or None."""
        with self._reading():
            return occlusion_settings(self._f)

    def _occlusion_rows(self) -> int:
        if not self.has_occlusion:
            raise KeyError(f"{self.path} holds no occlusion maps (recorded without "
                           "occlusion_every=).")
        self._check.dataset(OCCLUSION_STEPS, ndim=(1,), kinds="iu")
        values = self._check.dataset(OCCLUSION_VALUES, ndim=(4,), kinds="f")
        if values.shape[1] != self._f["probes/x"].shape[0] \
                or int(np.prod(values.shape[1:], dtype=np.float64)) > (1 << 27):
            raise self._check.damaged(f"{OCCLUSION_VALUES} has shape {values.shape}.")
        with self._reading():
            return committed_occlusion_rows(self._f)

    @property
    def occlusion_steps(self) -> np.ndarray:
        """Steps that carry occlusion maps (empty without occlusion)."""
        if not self.has_occlusion:
            return np.zeros(0, dtype=np.int64)
        rows = self._occlusion_rows()
        with self._reading():
            return np.asarray(self._f[OCCLUSION_STEPS][:rows], dtype=np.int64)

    def occlusion(self, index: Any = slice(None)) -> np.ndarray:
        """Occlusion maps indexed along :attr:`occlusion_steps`, float32: per step
        ``(probes, gh, gw)``, how much the labelled output drops when the patch at
        each grid position is set to the grey ``occlusion_settings["fill"]``."""
        rows = self._occlusion_rows()
        with self._reading():
            ds = self._f[OCCLUSION_VALUES]
            if isinstance(index, (int, np.integer)):
                i = int(index) + rows if index < 0 else int(index)
                if not 0 <= i < rows:
                    raise IndexError(f"occlusion index {index} out of range 0..{rows - 1}")
                return np.asarray(ds[i], dtype=np.float32)
            chosen = np.arange(rows)[index]
            if not len(chosen):
                return np.zeros((0,) + ds.shape[1:], dtype=np.float32)
            return np.stack([ds[int(i)] for i in chosen]).astype(np.float32)
