"""What the recording is told about the model: each layer's attributes, the run's metadata.

The attribute names are the format's (:mod:`layerwatch.store.schema`); this
module only knows where in a Keras model each value comes from.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import keras
import numpy as np

from layerwatch.version import __version__
from layerwatch.store.schema import LayerSpec, layer_attrs, utc_now

from .extractor import BOUNDED_RANGES, Tap


_SUMMARY_WIDTH = 100  # characters of the model summary table


def layer_specs(taps: Sequence[Tap], arrays: Sequence[np.ndarray],
                channels: Sequence[np.ndarray | None], totals: Sequence[int],
                dtypes: Sequence[str], inputs: Sequence[str]) -> list[LayerSpec]:
    """One :class:`LayerSpec` per tap, shaped like its recorded ``arrays`` (probes
    first); ``inputs`` are the model's input names (one: no ``probe_input``)."""
    specs = []
    for tap, array, kept, total, dtype in zip(taps, arrays, channels, totals, dtypes):
        data_format = getattr(tap.layer, "data_format", None) \
            or keras.config.image_data_format()
        attrs = layer_attrs(
            layer_name=tap.layer.name, layer_path=tap.path,
            layer_class=type(tap.layer).__name__, activation=tap.activation,
            tensor=" -> ".join(tap.chain), recorded_layer=tap.recorded.name,
            recorded_class=type(tap.recorded).__name__, data_format=data_format,
            channel_axis=0 if data_format == "channels_first" else array.ndim - 2,
            value_range=BOUNDED_RANGES.get(tap.activation),
            channels=kept, channels_total=total if kept is not None else None,
            probe_input=inputs[tap.input_index] if len(inputs) > 1 else None)
        specs.append(LayerSpec(key=tap.key, shape=tuple(array.shape[1:]), attrs=attrs,
                               dtype=dtype))
    return specs


def run_metadata(model: keras.Model, *, every: int, num_probes: int) -> dict[str, Any]:
    """The root attributes of a new recording."""
    return {
        "layerwatch_version": __version__, "keras_version": keras.__version__,
        "backend": keras.backend.backend(), "model_name": model.name,
        "created": utc_now(), "image_data_format": keras.config.image_data_format(),
        "every": every, "num_probes": num_probes,
    }


def model_texts(model: keras.Model) -> dict[str, str]:
    """The ``/meta`` documents: the model's config (JSON) and its summary table."""
    texts = {}
    try:
        texts["model_config"] = json.dumps(model.get_config(), default=str)
    except Exception as exc:  # custom layers without get_config
        texts["model_config"] = json.dumps({"error": f"{type(exc).__name__}: {exc}"})
    lines: list[str] = []
    # Keras draws the table with rich, which is as wide as the terminal it
    # thinks it has (80 columns when it has none) and cuts what does not fit:
    # the "Param #" column, at line_length=100. Give it room for the table.
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(_SUMMARY_WIDTH + 4)
    try:
        model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line),
                      line_length=_SUMMARY_WIDTH)
    except Exception:
        pass
    finally:
        if saved is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved
    texts["summary"] = "\n".join(lines)
    return texts
