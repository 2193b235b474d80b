"""What a recording must look like before anything in it is trusted.

A damaged or crafted file can declare any shape, dtype, filter or link; the
checks here bound every read (about 1 GB at most, whatever the file says),
refuse external data and plugin filters, and turn what h5py raises into
:class:`~layerwatch.store.schema.RecordingError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from layerwatch.text import printable

from .schema import (ACTIVATION, ACTIVATIONS, ATTR_FORMAT, ATTR_FORMAT_VERSION, CHANNELS,
                     CHANNEL_AXIS, FORMAT_NAME, HEARTBEAT, LAYER_CLASS, LAYER_NAME, METRICS,
                     METRIC_GROUPS, METRIC_NAMES, METRIC_VALUES, PER_SNAPSHOT, PROBES_X, PROBES_Y,
                     PROBE_INPUT, PROBE_INPUTS, READABLE_VERSIONS, SALIENCY, STATUS, TENSOR, VALUE_RANGE,
                     RecordingError)

# Limits on what a file may declare. A damaged or crafted file can claim any
# shape; these keep every read bounded (about 1 GB at most) whatever it says.
MAX_RANK = 6
_MAX_LAYERS = 4096
_MAX_METRICS = 4096
MAX_SNAPSHOTS = 1 << 24
MAX_SNAPSHOT_ELEMENTS = 1 << 27  # one snapshot of one layer: probes × H × W × C
_MAX_PROBE_ELEMENTS = 1 << 26
_MAX_METRIC_ELEMENTS = 1 << 26
MAX_ATTRS = 256
_MAX_ATTR_BYTES = 1 << 20
_MAX_ATTR_ELEMENTS = 4096
_MAX_STRING = 10_000
# Filters built into HDF5/h5py. Any other filter id would make HDF5 look for a
# plugin library to load: a file must never choose code to run.
_SAFE_FILTERS = frozenset({1, 2, 3, 4, 5, 6, 32000})


@dataclass(frozen=True)
class LayerInfo:
    """One recorded layer, as the file describes it."""

    key: str
    shape: tuple[int, ...]           #: per-probe output shape
    layer_name: str
    layer_class: str
    activation: str
    tensor: str                      #: which tensor was recorded, e.g. "conv1 -> relu1"
    value_range: tuple[float, float] | None  #: natural range of the activation, if bounded
    channel_axis: int                #: axis of ``shape`` that holds channels
    #: indices of the model's channels that were kept (``max_channels``), or None for all
    channels: tuple[int, ...] | None = None
    #: the dataset's dtype, how the layer is stored ("float16", "float32")
    dtype: str = "float32"
    #: multi-input models: the name of the input (``probes/inputs/<name>``) it comes from
    probe_input: str | None = None


class Checker:
    """Checks the objects of one open file (``f``, read from ``path``) as they are taken."""

    def __init__(self, f: h5py.File, path: str):
        self.f, self.path = f, path

    def damaged(self, what: str) -> RecordingError:
        return RecordingError(f"{self.path} is damaged: {what}")

    def validate(self) -> list[LayerInfo]:
        f = self.f
        fmt = attr(f, ATTR_FORMAT, strict=True)
        if fmt != FORMAT_NAME:
            raise RecordingError(
                f"{self.path} is an HDF5 file but not a layerwatch recording "
                "(no root attribute format='layerwatch').")
        version = attr(f, ATTR_FORMAT_VERSION, strict=True)
        if isinstance(version, bool) or not isinstance(version, int) \
                or version not in READABLE_VERSIONS:
            readable = ", ".join(str(v) for v in READABLE_VERSIONS[:-1]) + f" and {READABLE_VERSIONS[-1]}"
            raise RecordingError(
                f"{self.path} has format_version={printable(repr(version))[:40]}; this "
                f"layerwatch reads versions {readable}. Upgrade layerwatch to read "
                "newer files.")
        for name in PER_SNAPSHOT:
            ds = self.dataset(name, ndim=(1,), kinds="iuf")
            if ds.shape[0] > MAX_SNAPSHOTS:
                raise self.damaged(f"'{name}' declares {ds.shape[0]} snapshots.")
        status = self.dataset(STATUS, ndim=(1,), kinds="iu")
        if status.shape != (1,):
            raise self.damaged(f"'status' has shape {status.shape}; expected (1,).")
        if HEARTBEAT in f:
            self.dataset(HEARTBEAT, ndim=(1,), kinds="f")
        px = self.dataset(PROBES_X, ndim=range(2, MAX_RANK + 2), kinds="fiub")
        if px.size > _MAX_PROBE_ELEMENTS or px.shape[0] < 1:
            raise self.damaged(f"{PROBES_X} has shape {px.shape}.")
        if PROBE_INPUTS in f:
            inputs = self.group(PROBE_INPUTS)
            if len(inputs) > _MAX_LAYERS:
                raise self.damaged(f"'{PROBE_INPUTS}' holds {len(inputs)} entries.")
            for name in inputs:
                ds = self.dataset(f"{PROBE_INPUTS}/{name}", ndim=range(2, MAX_RANK + 2),
                                  kinds="fiub")
                if ds.size > _MAX_PROBE_ELEMENTS or ds.shape[0] != px.shape[0]:
                    raise self.damaged(f"{PROBE_INPUTS}/{printable(name)} has shape {ds.shape}.")
        if PROBES_Y in f:
            py = self.dataset(PROBES_Y, ndim=(1,), kinds="iu")
            if py.shape != (px.shape[0],):
                raise self.damaged(f"{PROBES_Y} does not match {PROBES_X}.")
        group = self.group(ACTIVATIONS)
        if len(group) > _MAX_LAYERS:
            raise self.damaged(f"'{ACTIVATIONS}' holds {len(group)} entries.")
        layers = []
        for key in group:
            ds = self.dataset(f"{ACTIVATIONS}/{key}", ndim=range(3, MAX_RANK + 3), kinds="f")
            shape = ds.shape
            per_snapshot = int(np.prod(shape[1:], dtype=np.float64))
            if shape[1] != px.shape[0] or per_snapshot > MAX_SNAPSHOT_ELEMENTS \
                    or per_snapshot == 0 or shape[0] > MAX_SNAPSHOTS:
                raise self.damaged(
                    f"{ACTIVATIONS}/{printable(key)} has shape {shape}; expected (snapshots, "
                    f"{px.shape[0]} probes, ...) with at most {MAX_SNAPSHOT_ELEMENTS} "
                    "values per snapshot.")
            layers.append(layer_info(key, ds))
        if not layers:
            raise RecordingError(f"{self.path} holds no recorded layer.")
        if SALIENCY in f:
            ds = self.dataset(SALIENCY, ndim=(px.ndim + 1,), kinds="f")
            if ds.shape[1:] != px.shape or ds.shape[0] > MAX_SNAPSHOTS \
                    or int(np.prod(ds.shape[1:], dtype=np.float64)) > MAX_SNAPSHOT_ELEMENTS:
                raise self.damaged(
                    f"{SALIENCY} has shape {ds.shape}; expected (snapshots, *{PROBES_X} shape "
                    f"{px.shape}) with at most {MAX_SNAPSHOT_ELEMENTS} values per snapshot.")
        for group_name, index_names in METRIC_GROUPS.items():
            group_path = f"{METRICS}/{group_name}"
            self.group(group_path)
            names = self.dataset(f"{group_path}/{METRIC_NAMES}", ndim=(1,), kinds="S")
            values = self.dataset(f"{group_path}/{METRIC_VALUES}", ndim=(2,), kinds="f")
            if names.shape[0] > _MAX_METRICS or names.dtype.itemsize > 1024:
                raise self.damaged(f"{group_path}/{METRIC_NAMES} is too large.")
            for name in index_names:
                ds = self.dataset(f"{group_path}/{name}", ndim=(1,), kinds="iu")
                if ds.shape[0] > MAX_SNAPSHOTS * 4:
                    raise self.damaged(f"{group_path}/{name} is too long.")
            rows = min(values.shape[0], f[f"{group_path}/{index_names[-1]}"].shape[0])
            if rows * min(values.shape[1], names.shape[0]) > _MAX_METRIC_ELEMENTS:
                raise self.damaged(f"{group_path}/{METRIC_VALUES} has shape {values.shape}.")
        return layers

    def group(self, name: str) -> h5py.Group:
        obj = self._resolve(name)
        if not isinstance(obj, h5py.Group):
            raise self.damaged(f"'{name}' is not a group.")
        return obj

    def dataset(self, name: str, *, ndim, kinds: str) -> h5py.Dataset:
        ds = self._resolve(name)
        label = printable(name)
        if not isinstance(ds, h5py.Dataset):
            raise self.damaged(f"'{label}' is not a dataset.")
        if ds.ndim not in ndim:
            raise self.damaged(f"'{label}' has {ds.ndim} dimensions.")
        if ds.dtype.kind not in kinds or ds.dtype.itemsize > 8 and ds.dtype.kind != "S":
            raise self.damaged(f"'{label}' has dtype {ds.dtype}.")
        if ds.is_virtual:
            raise self.damaged(f"'{label}' is a virtual dataset (data in other files).")
        plist = ds.id.get_create_plist()
        if plist.get_external_count():
            raise self.damaged(f"'{label}' keeps its data in external files.")
        for i in range(plist.get_nfilters()):
            code = plist.get_filter(i)[0]
            if code not in _SAFE_FILTERS:
                raise self.damaged(
                    f"'{label}' uses HDF5 filter {code}, which layerwatch does not load "
                    "(only built-in filters are trusted).")
        if ds.chunks is not None \
                and int(np.prod(ds.chunks, dtype=np.float64)) > MAX_SNAPSHOT_ELEMENTS:
            raise self.damaged(f"'{label}' has chunks {ds.chunks}.")
        return ds

    def _resolve(self, name: str):
        """Follow ``name`` through hard links only: soft and external links
        (which could point into other files) are not part of the format."""
        obj = self.f
        for part in name.split("/"):
            if not isinstance(obj, h5py.Group) or part not in obj:
                raise self.damaged(f"'{printable(name)}' is missing.")
            link = obj.get(part, getlink=True)
            if not isinstance(link, h5py.HardLink):
                raise self.damaged(f"'{printable(name)}' is a link, not data.")
            obj = obj[part]
        return obj


def attr(obj: h5py.HLObject, name: str, *, strict: bool = False) -> Any:
    """One attribute as a plain value (str, int, float, bool or a small numeric
    array), or None when it is absent, too large or not a plain value. The
    size is checked before anything is read. With ``strict``, an attribute
    HDF5 cannot read (a damaged file) raises instead of reading as absent."""
    try:
        if name not in obj.attrs:
            return None
        aid = h5py.h5a.open(obj.id, name.encode("utf-8"))
        shape = aid.shape
        if shape is None or int(np.prod(shape, dtype=np.float64)) > _MAX_ATTR_ELEMENTS \
                or aid.get_storage_size() > _MAX_ATTR_BYTES:
            return None
        kind = aid.dtype.kind
        if kind not in "biufS":  # variable-length strings are never read: see schema.fixed
            return None
        value = obj.attrs[name]
    except Exception:  # unreadable on a damaged file
        if strict:
            raise
        return None
    if isinstance(value, bytes):
        return printable(value.decode("utf-8", "replace"))[:_MAX_STRING]
    if isinstance(value, str):
        return printable(value)[:_MAX_STRING]
    if isinstance(value, np.generic):
        value = value.item()
        return printable(value.decode("utf-8", "replace")) if isinstance(value, bytes) \
            else value
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return value
    return None


def layer_info(key: str, ds: h5py.Dataset) -> LayerInfo:
    def text(name: str, default: str) -> str:
        value = attr(ds, name)
        return value[:1000] if isinstance(value, str) else default

    value_range = None
    raw_range = attr(ds, VALUE_RANGE)
    if isinstance(raw_range, np.ndarray):
        arr = np.asarray(raw_range, dtype=np.float64).ravel()
        if arr.shape == (2,) and np.all(np.isfinite(arr)) and arr[0] < arr[1]:
            value_range = (float(arr[0]), float(arr[1]))
    per_probe = tuple(int(s) for s in ds.shape[2:])
    channel_axis = attr(ds, CHANNEL_AXIS)
    if not isinstance(channel_axis, int) or isinstance(channel_axis, bool) \
            or not -len(per_probe) <= channel_axis < len(per_probe):
        channel_axis = len(per_probe) - 1
    channels = attr(ds, CHANNELS)
    kept = None
    if isinstance(channels, np.ndarray) and channels.ndim == 1 and channels.dtype.kind in "iu" \
            and channels.size == per_probe[channel_axis % len(per_probe)]:
        kept = tuple(int(c) for c in channels)
    return LayerInfo(key=key, shape=per_probe, layer_name=text(LAYER_NAME, key),
                     layer_class=text(LAYER_CLASS, ""), activation=text(ACTIVATION, ""),
                     tensor=text(TENSOR, key), value_range=value_range,
                     channel_axis=channel_axis % len(per_probe), channels=kept,
                     dtype=str(ds.dtype), probe_input=text(PROBE_INPUT, "") or None)
