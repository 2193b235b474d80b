import matplotlib
import numpy as np
import pytest

from layerwatch.rendering import colormap


def test_levels_are_matplotlib_rdbu():
    expected = matplotlib.colormaps["RdBu"](np.linspace(0, 1, colormap.LEVELS))[:, :3]
    assert np.array_equal(colormap.level_colors(), np.round(expected * 255).astype(np.uint8))


def test_orientation_minus_one_red_zero_white_plus_one_blue():
    red, white, blue = (colormap.color_of(v) for v in (-1.0, 0.0, 1.0))
    assert red[0] > 90 and red[2] < 40
    assert min(white) > 240
    assert blue[2] > 90 and blue[0] < 40


def test_value_indices_clip_and_mark_non_finite():
    values = np.array([-5.0, -1.0, 0.0, 1.0, 5.0, np.nan, np.inf, -np.inf])
    idx = colormap.value_indices(values, -1.0, 1.0)
    mid = (colormap.LEVELS - 1) // 2
    assert idx.tolist() == [0, 0, mid, colormap.LEVELS - 1, colormap.LEVELS - 1,
                            colormap.NAN, colormap.NAN, colormap.NAN]
    assert idx.dtype == np.uint8


def test_value_indices_rejects_empty_range():
    with pytest.raises(ValueError, match=r"vmin < vmax. Received: \(1.0, 1.0\)"):
        colormap.value_indices(np.zeros(3), 1.0, 1.0)


def test_hold_ignores_jitter_but_follows_real_change():
    step = 2.0 / (colormap.LEVELS - 1)
    first = colormap.value_indices(np.array([0.0, 0.0, 0.0]), -1, 1)
    jitter = np.array([0.9 * step, -0.9 * step, 2.0 * step])
    held = colormap.value_indices(jitter, -1, 1, previous=first, hold=0.5)
    fresh = colormap.value_indices(jitter, -1, 1)
    assert held[:2].tolist() == first[:2].tolist()
    assert fresh[:2].tolist() != first[:2].tolist()
    assert held[2] == fresh[2] == first[2] + 2


def test_hold_never_keeps_a_colour_for_nan():
    first = colormap.value_indices(np.array([0.0]), -1, 1)
    assert colormap.value_indices(np.array([np.nan]), -1, 1, previous=first,
                                  hold=0.5).tolist() == [colormap.NAN]


def test_palette_layout():
    palette = colormap.build_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    assert colormap.NAN < colormap.TRANSPARENT and colormap.TEXT < colormap.TRANSPARENT
    grey = palette[colormap.INPUT_START:colormap.INPUT_START + colormap.INPUT_LEVELS]
    assert grey[0].tolist() == [0, 0, 0] and grey[-1].tolist() == [255, 255, 255]
    special = {tuple(palette[i]) for i in (colormap.NAN, colormap.GAP, colormap.HEADER)}
    assert len(special) == 3
    assert tuple(palette[colormap.NAN]) not in {tuple(c) for c in colormap.level_colors()}


def test_too_many_input_colours_message():
    with pytest.raises(ValueError, match=r"At most 128 input colours fit in the palette. "
                                         r"Received: 200 colours."):
        colormap.build_palette(input_colors=np.zeros((200, 3)))
