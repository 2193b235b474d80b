"""The recording's schema: every HDF5 name, attribute and constant of the format.

This is the one place the file's layout is spelled out in code; the writer,
the reader and repair take their names from here, and ``docs/FORMAT.md``
describes the same layout for people. Change a name here only with a
``FORMAT_VERSION`` bump and a reader for the old version.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

FORMAT_NAME = "layerwatch"
FORMAT_VERSION = 3
#: Versions this layerwatch reads (see docs/FORMAT.md, "Versions").
READABLE_VERSIONS = (1, 2, 3)

#: Values of the ``status`` dataset.
STATUS_RECORDING = 0
STATUS_COMPLETE = 1
STATUS_STOPPED = 2

# -- datasets and groups ------------------------------------------------------ #
STEPS = "steps"              #: (T,) int64 optimizer step of each snapshot; the commit index
EPOCHS = "epochs"            #: (T,) int32 zero-based epoch of each snapshot
WALL_TIME = "wall_time"      #: (T,) float64 Unix time each snapshot was taken
#: The per-snapshot index datasets, in the order they are cut and grown.
PER_SNAPSHOT = (STEPS, EPOCHS, WALL_TIME)
STATUS = "status"            #: (1,) int8, one of the STATUS_* values
HEARTBEAT = "heartbeat"      #: (1,) float64 Unix time of the writer's last flush
PROBES = "probes"
PROBES_X = "probes/x"        #: (probes, *input shape) the probe inputs, as the model took them
PROBES_Y = "probes/y"        #: (probes,) int64 labels, optional
#: group, multi-input models only: one (probes, *input shape) dataset per model input,
#: named by the input (``probes/x`` is the first of them)
PROBE_INPUTS = "probes/inputs"
ATTR_INPUT_INDEX = "index"   #: on each probes/inputs/<name>: its position among the inputs
ACTIVATIONS = "activations"  #: group: one (T, probes, *layer shape) dataset per layer
#: optional (T, probes, *input shape) float32: d output[label] / d input of each probe
SALIENCY = "saliency"
#: optional group: one (T, probes, h, w) float32 Grad-CAM dataset per layer with 2-D
#: spatial output (``LayerWatch(..., gradcam=True)``), rows indexed by ``steps``
GRADCAM = "gradcam"
#: optional group: occlusion sensitivity at a coarse schedule (``occlusion_every=``)
OCCLUSION = "occlusion"
OCCLUSION_STEPS = "occlusion/steps"    #: (O,) int64, its own commit index
OCCLUSION_VALUES = "occlusion/values"  #: (O, probes, gh, gw) float32 output drops
#: attributes of the occlusion group
ATTR_OCCLUSION_EVERY = "every"
ATTR_OCCLUSION_PATCH = "patch"         #: patch side, input pixels
ATTR_OCCLUSION_STRIDE = "stride"       #: step between patch positions, input pixels
ATTR_OCCLUSION_FILL = "fill"           #: the grey a patch is set to (the probes' mean)
META = "meta"                #: group: scalar text datasets (model_config, summary)
METRICS = "metrics"          #: groups batch/ and epoch/
#: The metric tables and their index columns; the last column is the commit index.
METRIC_GROUPS = {"batch": ("step",), "epoch": ("epoch", "step")}
METRIC_NAMES = "names"       #: (M,) S128 metric names, columns of values
METRIC_VALUES = "values"     #: (rows, M) float64, NaN where a metric was not logged
#: metrics/batch column suffixes: Keras' epoch-so-far mean of a mean metric (the column
#: without the suffix is that step's own value), and the epoch-so-far value of a metric
#: that is not a mean (AUC, ...), which has no per-step value
RUNNING_MEAN = "_running_mean"
RUNNING = "_running"
ANALYSIS = "analysis"        #: optional group: analysis-probe Gram matrices
ANALYSIS_STEPS = "analysis/steps"
ANALYSIS_PROBES = "analysis/probes_x"
ANALYSIS_GRAMS = "analysis/gram"  #: group: one (G, n, n) float32 dataset per layer
#: optional group (``LayerWatch(features_every=N)``): activation maximization, per
#: layer the input that most excites each of its first channels (docs/FORMAT.md, "Features").
#: Per-layer data lives in subgroups, so no layer key can collide with ``steps``.
FEATURES = "features"
FEATURES_STEPS = "features/steps"            #: (F,) int64 step of each row; the commit index
FEATURES_IMAGES = "features/images"          #: group: (F, channels, *input shape) float32 per layer
#: group: (F, channels) float32 per layer, the mean activation each image reaches
FEATURES_ACTIVATION = "features/activation"
#: group: (F, channels) float32 per layer, the highest of the probes' mean activations
FEATURES_PROBE_BEST = "features/probe_best"
#: on the features group: the schedule and the ascent's settings
ATTR_FEATURES_EVERY = "every"
ATTR_FEATURES_ITERATIONS = "iterations"
ATTR_FEATURES_STEP_SIZE = "step_size"
ATTR_FEATURES_SEED = "seed"
ATTR_FEATURES_METHOD = "method"

# -- root attributes ---------------------------------------------------------- #
ATTR_FORMAT = "format"
ATTR_FORMAT_VERSION = "format_version"
ATTR_STORAGE_DTYPE = "storage_dtype"
#: Values of ``storage_dtype``: one dtype for every layer, or each layer's own ("auto").
STORAGE_DTYPES = ("float16", "float32", "auto")
ATTR_WRITER_PID = "writer_pid"
ATTR_WRITER_HOST = "writer_host"
ATTR_FLUSH_SECONDS = "flush_seconds"
ATTR_FLUSH_SNAPSHOTS = "flush_snapshots"
ATTR_ANALYSIS_EVERY = "every"  #: on the analysis group

# -- per-layer attributes (on each activations/<key> dataset) ---------------- #
LAYER_NAME = "layer_name"
LAYER_PATH = "layer_path"
LAYER_CLASS = "layer_class"
ACTIVATION = "activation"
TENSOR = "tensor"
RECORDED_LAYER = "recorded_layer"
RECORDED_CLASS = "recorded_class"
DATA_FORMAT = "data_format"
CHANNEL_AXIS = "channel_axis"
VALUE_RANGE = "value_range"
CHANNELS = "channels"
CHANNELS_TOTAL = "channels_total"
#: multi-input models: the input (probes/inputs/<name>) a layer is computed from
PROBE_INPUT = "probe_input"

NAME_DTYPE = "S128"  # fixed-length: variable-length strings are not SWMR-safe
INDEX_FILL = -1      # fill value of the commit indexes: a row grown but not yet written


class RecordingError(Exception):
    """A file is missing, is not a layerwatch recording, or is damaged."""


@dataclass(frozen=True)
class LayerSpec:
    """What the writer needs to know about one recorded layer.

    ``key`` is the dataset name under ``/activations``; ``shape`` is the
    per-probe output shape; ``attrs`` are stored verbatim as dataset attributes
    (see :func:`layer_attrs` for the ones the format defines).
    """

    key: str
    shape: tuple[int, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    #: this layer's storage dtype; None: the recording's ``storage_dtype``
    dtype: str | None = None


def layer_attrs(*, layer_name: str, layer_path: str, layer_class: str, activation: str,
                tensor: str, recorded_layer: str, recorded_class: str, data_format: str,
                channel_axis: int, value_range: tuple[float, float] | None = None,
                channels: Any = None, channels_total: int | None = None,
                probe_input: str | None = None) -> dict[str, Any]:
    """The attributes of one ``activations/<key>`` dataset, by their format names."""
    attrs: dict[str, Any] = {
        LAYER_NAME: layer_name, LAYER_PATH: layer_path, LAYER_CLASS: layer_class,
        ACTIVATION: activation, TENSOR: tensor, RECORDED_LAYER: recorded_layer,
        RECORDED_CLASS: recorded_class, DATA_FORMAT: data_format, CHANNEL_AXIS: channel_axis,
    }
    if value_range is not None:
        attrs[VALUE_RANGE] = np.array(value_range, dtype=np.float64)
    if channels is not None:
        attrs[CHANNELS] = np.asarray(channels, dtype=np.int64)
        attrs[CHANNELS_TOTAL] = int(channels_total)
    if probe_input is not None:
        attrs[PROBE_INPUT] = probe_input
    return attrs


def fixed(value: Any) -> Any:
    """Strings are stored as fixed-length UTF-8 bytes, never variable-length.

    Reading a variable-length string goes through HDF5's global heap, which a
    damaged file can send into an endless loop; fixed-length strings are
    plain bytes of a size known before reading, so readers can refuse the
    other kind outright.
    """
    return np.bytes_(value.encode("utf-8")) if isinstance(value, str) else value


def utc_now() -> str:
    """The ``created`` attribute's form: ISO 8601 UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
