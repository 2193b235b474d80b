"""Which channels of a wide layer to record (``max_channels``, ``channel_selection``)."""

from __future__ import annotations

from typing import Callable, Sequence

import keras
import numpy as np


def channel_axis(layer: keras.layers.Layer, ndim: int) -> int:
    """The channel axis of a batched output of ``layer``."""
    data_format = getattr(layer, "data_format", None) or keras.config.image_data_format()
    return 1 if data_format == "channels_first" else ndim - 1


def most_varying(array: np.ndarray, axis: int, k: int) -> np.ndarray:
    """The k channels whose values differ most between probes, in channel order."""
    spread = np.var(array.astype(np.float64), axis=0)  # over probes, per position
    channel = axis - 1
    spread = np.moveaxis(spread, channel, 0).reshape(spread.shape[channel], -1).mean(axis=1)
    return np.sort(np.argsort(-spread, kind="stable")[:k])


def choose_channels(totals: Sequence[int], axes: Sequence[int], k: int | None, selection: str,
                    *, stored: dict[int, np.ndarray] | None,
                    outputs: Callable[[], list[np.ndarray]]) -> list[np.ndarray | None]:
    """Per layer, the channel indices to keep, or None for all of them.

    ``stored`` holds the channels a resumed recording kept (by layer index):
    they are kept again rather than chosen anew. ``outputs()`` computes every
    layer's full probe activations, for ``selection="variance"``.
    """
    if k is None or all(total <= k for total in totals):
        return [None] * len(totals)
    full = outputs() if selection == "variance" and stored is None else None
    channels: list[np.ndarray | None] = []
    for i, (total, axis) in enumerate(zip(totals, axes)):
        if total <= k:
            channels.append(None)
        elif stored is not None and stored.get(i) is not None:
            channels.append(np.asarray(stored[i], dtype=np.int64))
        elif selection == "variance":
            channels.append(most_varying(full[i], axis, k))
        else:
            channels.append(np.arange(k))
    return channels
