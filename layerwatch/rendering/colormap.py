"""The fixed GIF palette and the mapping from activation values to it.

Every frame of every GIF uses the same 256-entry palette, so a colour means
the same value in every frame and no frame is re-quantized or dithered:

====================  =========================================================
indices               meaning
====================  =========================================================
0 .. LEVELS-1         matplotlib's ``RdBu``: low end red, middle white, high blue
INPUT_START ..        the probe inputs: a grey ramp, or the colours of RGB probes
NAN                   a non-finite value (NaN or ±inf)
GAP                   the lines between cells
HEADER, TEXT          the caption band and its text
TRANSPARENT           never drawn: GIF frames use it for "unchanged pixel"
====================  =========================================================
"""

from __future__ import annotations

import numpy as np

#: Number of colour levels for values; odd, so 0 of a symmetric range is exactly white.
#: 97 levels (steps of 1/48 of the range) look continuous; more levels make GIFs
#: of slowly drifting layers larger without a visible difference.
LEVELS = 97
INPUT_START = LEVELS
#: Palette slots for the probe inputs (grey levels, or the colours of RGB probes).
INPUT_LEVELS = 128
NAN = INPUT_START + INPUT_LEVELS
GAP = NAN + 1
HEADER = NAN + 2
TEXT = NAN + 3
TRANSPARENT = 255
PALETTE_SIZE = 256

NAN_RGB = (0, 230, 0)
GAP_RGB = (150, 150, 150)
HEADER_RGB = (255, 255, 255)
TEXT_RGB = (0, 0, 0)

_LEVEL_RGB: np.ndarray | None = None


def level_colors() -> np.ndarray:
    """The ``(LEVELS, 3)`` uint8 colours of the value levels (matplotlib ``RdBu``)."""
    global _LEVEL_RGB
    if _LEVEL_RGB is None:
        import matplotlib  # deferred: only the palette needs it, once

        rgba = matplotlib.colormaps["RdBu"](np.linspace(0.0, 1.0, LEVELS))
        _LEVEL_RGB = np.round(rgba[:, :3] * 255).astype(np.uint8)
    return _LEVEL_RGB.copy()


def build_palette(*, input_colors: np.ndarray | None = None) -> np.ndarray:
    """The full 256-entry palette as a ``(256, 3)`` uint8 array.

    Parameters
    ----------
    input_colors
        Up to ``INPUT_LEVELS`` RGB colours for the input slots (used for RGB
        probes). By default the input slots hold a black-to-white grey ramp.

    Returns
    -------
    numpy.ndarray
        ``palette[i]`` is the RGB colour of index ``i``.
    """
    palette = np.zeros((PALETTE_SIZE, 3), dtype=np.uint8)
    palette[:LEVELS] = level_colors()
    if input_colors is None:
        grey = np.round(np.linspace(0, 255, INPUT_LEVELS)).astype(np.uint8)
        palette[INPUT_START:INPUT_START + INPUT_LEVELS] = grey[:, None]
    else:
        colors = np.asarray(input_colors, dtype=np.uint8).reshape(-1, 3)
        if len(colors) > INPUT_LEVELS:
            raise ValueError(f"At most {INPUT_LEVELS} input colours fit in the palette. "
                             f"Received: {len(colors)} colours.")
        palette[INPUT_START:INPUT_START + len(colors)] = colors
    palette[NAN] = NAN_RGB
    palette[GAP] = GAP_RGB
    palette[HEADER] = HEADER_RGB
    palette[TEXT] = TEXT_RGB
    return palette


def value_indices(values: np.ndarray, vmin: float, vmax: float, *,
                  previous: np.ndarray | None = None, hold: float = 0.0) -> np.ndarray:
    """Map values to palette indices of the red-white-blue levels.

    ``vmin`` maps to the red end, ``vmax`` to the blue end, values outside
    are clipped, and non-finite values map to :data:`NAN`.

    Parameters
    ----------
    values
        Any float array.
    vmin, vmax
        The colour range, ``vmin < vmax``.
    previous
        The indices this array had in the previous frame, for ``hold``.
    hold
        Hysteresis in levels: a value keeps its ``previous`` level while it is
        within ``0.5 + hold`` levels of it, so jitter smaller than a level does
        not make pixels flicker (and GIFs grow). The colour is then within
        ``0.5 + hold`` levels of the value instead of 0.5.

    Returns
    -------
    numpy.ndarray
        uint8 array of the same shape.

    Examples
    --------
    >>> value_indices(np.array([-1.0, 0.0, 1.0, np.nan]), -1.0, 1.0).tolist()
    [0, 48, 96, 225]
    """
    if not vmin < vmax:
        raise ValueError(f"The colour range must have vmin < vmax. Received: ({vmin}, {vmax}).")
    a = np.asarray(values, dtype=np.float32)
    t = (a - np.float32(vmin)) * np.float32((LEVELS - 1) / (vmax - vmin))
    finite = np.isfinite(t)
    with np.errstate(invalid="ignore"):
        np.clip(t, 0, LEVELS - 1, out=t)
    out = np.rint(t)
    out[~finite] = 0
    out = out.astype(np.uint8)
    if previous is not None and hold > 0:
        keep = (previous < LEVELS) & finite & (np.abs(t - previous) <= 0.5 + hold)
        out[keep] = previous[keep]
    out[~finite] = NAN
    return out


def grey_indices(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Map values to the grey input ramp (``vmin`` black, ``vmax`` white; NaN to :data:`NAN`)."""
    a = np.asarray(values, dtype=np.float32)
    span = vmax - vmin if vmax > vmin else 1.0
    t = (a - np.float32(vmin)) * np.float32((INPUT_LEVELS - 1) / span)
    finite = np.isfinite(t)
    with np.errstate(invalid="ignore"):
        np.clip(t, 0, INPUT_LEVELS - 1, out=t)
    np.rint(t, out=t)
    t[~finite] = 0
    out = t.astype(np.uint8) + np.uint8(INPUT_START)
    out[~finite] = NAN
    return out


def color_of(value: float, vmin: float = -1.0, vmax: float = 1.0) -> tuple[int, int, int]:
    """The RGB colour a value is drawn with (its palette level's colour)."""
    index = int(value_indices(np.array([value]), vmin, vmax)[0])
    return tuple(int(c) for c in build_palette()[index])  # type: ignore[return-value]
