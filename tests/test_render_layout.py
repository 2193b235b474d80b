import numpy as np
import pytest

from layerwatch.rendering import colormap
from layerwatch.rendering import layout as frames


def test_nearest_neighbour_blocks_and_channel_rows():
    probes = np.zeros((2, 8, 8, 1), dtype=np.float32)
    layout = frames.build_layout((2, 2, 3), 2, probes, caption_sample="s")
    acts = np.zeros((2, 2, 2, 3), dtype=np.float32)
    acts[1, 0, 1, 2] = 1.0  # probe 1, top-right block, channel 2
    acts[0, 1, 0, 0] = -1.0  # probe 0, bottom-left block, channel 0
    frame = layout.compose(acts, -1.0, 1.0)
    assert frame.shape == (layout.height, layout.width)
    # rows: input + 3 channels of 8 px with 1-px gaps; columns: 2 probes
    grid_h = 1 + 4 * 9
    assert layout.height - grid_h > 0 and layout.width >= 1 + 2 * 9
    top = layout.height - grid_h
    left = (layout.width - (1 + 2 * 9)) // 2

    def cell(row, probe):
        y, x = top + 1 + row * 9, left + 1 + probe * 9
        return frame[y:y + 8, x:x + 8]

    blue, red = colormap.LEVELS - 1, 0
    white = (colormap.LEVELS - 1) // 2
    c = cell(3, 1)  # channel 2 of probe 1
    assert (c[:4, 4:] == blue).all() and (c[:4, :4] == white).all() and (c[4:] == white).all()
    c = cell(1, 0)  # channel 0 of probe 0
    assert (c[4:, :4] == red).all() and (c[:4] == white).all()
    assert (cell(0, 0) == colormap.INPUT_START).all()  # black input
    assert (frame[top:top + 1, left:left + 19] == colormap.GAP).all()


def test_caption_is_drawn_top_left_in_text_colour():
    probes = np.zeros((1, 8, 8, 1), dtype=np.float32)
    layout = frames.build_layout((8, 8, 1), 2, probes, caption_sample="step 123")
    frame = layout.compose(np.zeros((1, 8, 8, 1)), -1, 1, caption="step 123")
    ink = np.argwhere(frame == colormap.TEXT)
    assert ink.size and ink[:, 0].max() < layout.height - (1 + 2 * 9)
    assert ink[:, 1].min() < 10
    assert not (layout.compose(np.zeros((1, 8, 8, 1)), -1, 1) == colormap.TEXT).any()


def test_scale_zooms_everything():
    probes = np.zeros((2, 8, 8, 1), dtype=np.float32)
    one = frames.build_layout((4, 4, 2), 2, probes, scale=1)
    three = frames.build_layout((4, 4, 2), 2, probes, scale=3)
    assert (three.height, three.width) == (3 * one.height, 3 * one.width)


def test_max_channels_limits_rows():
    probes = np.zeros((2, 8, 8, 1), dtype=np.float32)
    all_rows = frames.build_layout((4, 4, 10), 2, probes)
    some = frames.build_layout((4, 4, 10), 2, probes, max_channels=3)
    assert (some.channels_shown, some.channels) == (3, 10)
    assert all_rows.height - some.height == 7 * 9


def test_channels_first_layer():
    probes = np.zeros((1, 1, 4, 4), dtype=np.float32)
    acts = np.zeros((1, 2, 4, 4), dtype=np.float32)
    acts[0, 1] = 1.0  # channel 1 all +1
    layout = frames.build_layout((2, 4, 4), 0, probes, channels_first_input=True,
                                 caption_sample="x")
    frame = layout.compose(acts, -1, 1)
    last_row = frame[-5:-1]  # the row of channel 1: 4x4 pixels of +1
    assert (last_row == colormap.LEVELS - 1).sum() == 16


def test_conv1d_outputs_draw_as_strips():
    probes = np.random.default_rng(0).random((3, 20, 2)).astype(np.float32)
    layout = frames.build_layout((10, 4), 1, probes)
    grid_h = 1 + 5 * (frames.STRIP_HEIGHT + 1)
    assert layout.height > grid_h
    acts = np.zeros((3, 10, 4), dtype=np.float32)
    acts[:, :5, :] = 1.0
    frame = layout.compose(acts, -1, 1)
    strip = frame[-1 - frames.STRIP_HEIGHT:-1]
    left = (layout.width - (1 + 3 * 21)) // 2
    cell = strip[:, left + 1:left + 21]
    assert (cell[:, :10] == colormap.LEVELS - 1).all()
    assert (cell[:, 10:] == (colormap.LEVELS - 1) // 2).all()


def test_rgb_probes_use_their_own_palette_colours():
    probes = np.zeros((2, 4, 4, 3), dtype=np.float32)
    probes[0, ..., 0] = 1.0  # red
    probes[1, ..., 2] = 1.0  # blue
    layout = frames.build_layout((4, 4, 1), 2, probes, caption_sample="x")
    frame = layout.compose(np.zeros((2, 4, 4, 1)), -1, 1)
    rgb = layout.palette[frame]
    colours = {tuple(c) for c in rgb.reshape(-1, 3)}
    assert (255, 0, 0) in colours and (0, 0, 255) in colours


def test_bad_layout_options_messages():
    probes = np.zeros((1, 4, 4, 1), dtype=np.float32)
    with pytest.raises(ValueError, match=r"scale must be a positive integer. Received: scale=0"):
        frames.build_layout((4, 4, 1), 2, probes, scale=0)
    with pytest.raises(ValueError, match=r"max_channels must be a positive integer or None. "
                                         r"Received: max_channels=0"):
        frames.build_layout((4, 4, 1), 2, probes, max_channels=0)
