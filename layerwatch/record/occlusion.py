"""Occlusion sensitivity of the probes: how much the labelled output drops per grey patch.

For each probe and each patch position on a grid, the probe with that square
patch set to a grey is run through the model; the map holds
``picked(probe) - picked(patched probe)``, where ``picked`` is the output at the
probe's label (the unoccluded probe's top class at that step without labels),
the same scalar saliency and Grad-CAM differentiate. Positive: the patch
mattered for the class; negative: hiding it made the class more likely.

* grey: one value, the mean of every pixel of every probe (``fill``), so on
  images with a dark background a patch over background changes little;
* patch positions: ``0, stride, 2·stride, …`` along each spatial axis while the
  patch fits (``(size - patch) // stride + 1`` of them); all input channels of
  the patch are set;
* every patched copy of every probe (and the probes themselves) runs in one
  compiled inference call — chunks of :data:`CHUNK` images when there are more.

Inputs of one image each: ``(h, w, channels)`` (or ``(channels, h, w)`` under
``channels_first``) or ``(h, w)``.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from .extractor import probe_function

#: Default patch side and the largest batch of patched images per compiled call.
DEFAULT_PATCH = 7
CHUNK = 1024


def check_occlusion_options(every: Any, patch: Any, stride: Any) -> None:
    """Raise ValueError naming the first occlusion argument out of range (at construction)."""
    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if every is not None and not (is_int(every) and every >= 1):
        raise ValueError("occlusion_every must be an integer >= 1, or None (no occlusion). "
                         f"Received: occlusion_every={every!r}")
    if not (is_int(patch) and patch >= 1):
        raise ValueError(f"occlusion_patch must be an integer >= 1 (pixels). "
                         f"Received: occlusion_patch={patch!r}")
    if stride is not None and not (is_int(stride) and stride >= 1):
        raise ValueError("occlusion_stride must be an integer >= 1 (pixels), or None (the "
                         f"patch size). Received: occlusion_stride={stride!r}")


def spatial_axes(shape: tuple[int, ...]) -> tuple[int, int]:
    """The two spatial axes of a per-probe image shape."""
    if len(shape) == 2:
        return 0, 1
    if len(shape) == 3:
        return (1, 2) if keras.config.image_data_format() == "channels_first" else (0, 1)
    raise ValueError(f"occlusion_every= needs image inputs, (h, w, channels) or (h, w) per "
                     f"probe. Received probes of shape {shape}.")


class Occlusion:
    """The occlusion maps of the probes ``x`` of ``model``: built once, called per step.

    Attributes
    ----------
    patch, stride : int
    fill : float
        The grey patches are set to.
    grid : (int, int)
        Patch positions along each spatial axis.
    """

    def __init__(self, model: keras.Model, x: np.ndarray, labels: np.ndarray | None, *,
                 patch: int, stride: int | None):
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"occlusion_every= needs a floating-point input to grey out; "
                             f"model '{model.name}' takes {x.dtype}.")
        outputs = model.outputs if getattr(model, "outputs", None) else None
        if outputs is not None and len(outputs) != 1:
            raise ValueError(f"occlusion_every= needs a model with one output; model "
                             f"'{model.name}' has {len(outputs)}.")
        shape = tuple(x.shape[1:])
        ay, ax = spatial_axes(shape)
        h, w = shape[ay], shape[ax]
        self.patch, self.stride = int(patch), int(stride or patch)
        if self.patch > min(h, w):
            raise ValueError(f"occlusion_patch={self.patch} does not fit the probes' "
                             f"{h}×{w} images; pass a smaller occlusion_patch=.")
        self.fill = float(np.mean(x, dtype=np.float64))
        ys = range(0, h - self.patch + 1, self.stride)
        xs = range(0, w - self.patch + 1, self.stride)
        self.grid = (len(ys), len(xs))
        patched = np.repeat(x[:, None], len(ys) * len(xs), axis=1)  # (P, G, *shape)
        for j, (y0, x0) in enumerate((y0, x0) for y0 in ys for x0 in xs):
            index = [slice(None), j] + [slice(None)] * len(shape)
            index[2 + ay] = slice(y0, y0 + self.patch)
            index[2 + ax] = slice(x0, x0 + self.patch)
            patched[tuple(index)] = self.fill
        self._images = np.concatenate([x, patched.reshape((-1,) + shape)]).astype(x.dtype)
        self._count = len(x)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        inputs = keras.Input(shape=shape, dtype=str(x.dtype))
        self._predict = probe_function(
            model, keras.Model(inputs, model(inputs), name=f"{model.name}_layerwatch_occlusion"))

    @property
    def images(self) -> int:
        """How many images one call runs (the probes and all their patched copies)."""
        return len(self._images)

    def __call__(self) -> np.ndarray:
        """The maps now: ``(probes, gh, gw)`` float32."""
        outs = [keras.ops.convert_to_numpy(self._predict(self._images[i:i + CHUNK]))
                for i in range(0, len(self._images), CHUNK)]
        out = np.concatenate(outs).astype(np.float64).reshape(len(self._images), -1)
        p = self._count
        base = out[:p]
        labels = self.labels if self.labels is not None else base.argmax(axis=1)
        patched = out[p:].reshape(p, -1, out.shape[1])
        rows = np.arange(p)
        drop = base[rows, labels][:, None] - patched[rows, :, labels]
        return drop.reshape((p,) + self.grid).astype(np.float32)
