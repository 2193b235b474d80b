"""The viewer's data: each layer's frames and cell values, chunked by snapshot.

A panel's frames are drawn by :class:`~layerwatch.rendering.panel.LayerPanel`
(the GIFs' palette, layout and caption), exact to the nearest colour level
(no GIF hysteresis, so a paused step shows that step's colours), and stacked
into PNG sprite sheets of ``chunk`` snapshots. Beside each sheet go the values
its cells show, ``(snapshots, probes, channels, h, w)`` in the layer's own
storage dtype (float16 or float32: the recorded numbers, not a rounding of
them), byte-shuffled and deflated. Both travel as JavaScript files that call
``LW.add(kind, panel, chunk, base64)``: a page opened from ``file://`` may run
scripts beside it but may not fetch files.

The page is generic over panels: today every panel is a recorded layer
(``kind: "layer"``); a recorded quantity such as saliency maps becomes a panel
by drawing its frames and values here, under its own ``kind``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from layerwatch.rendering.curves import is_accuracy
from layerwatch.rendering.panel import LayerPanel
from layerwatch.store import LayerInfo, Run

#: Page data format; a page only reads data of its own version.
DATA_VERSION = 1
#: Snapshots per chunk (fewer for tall frames, see :data:`MAX_SHEET_HEIGHT`).
CHUNK = 32
#: Sprite sheets are at most this many pixels tall (browsers decode them whole).
MAX_SHEET_HEIGHT = 16384
_STEP_DIGITS = 6  # captions leave room for steps up to 999,999
_CURVE_DIGITS = 6  # significant digits kept of curve values


@dataclass
class PanelData:
    """One panel of the page: its description for the manifest and its drawer."""

    meta: dict[str, Any]
    panel: LayerPanel


def chunk_size(frame_height: int) -> int:
    """Snapshots per chunk for frames ``frame_height`` pixels tall: a power of two
    up to :data:`CHUNK`, the sheet at most :data:`MAX_SHEET_HEIGHT` tall."""
    k = CHUNK
    while k > 1 and k * frame_height > MAX_SHEET_HEIGHT:
        k //= 2
    return k


def layer_panels(run: Run, layers: Sequence[LayerInfo], *, max_channels: int | None,
                 n: int) -> list[PanelData]:
    """The panels of these layers, with the geometry the page needs for hovering."""
    panels = []
    widest = max(_STEP_DIGITS, len(str(run.steps[:n].max(initial=0))))
    for index, layer in enumerate(layers):
        # The frame is as wide as its widest caption: one that a growing run does
        # not outgrow keeps the layout, so a rewrite keeps the chunks it has.
        sample = f"step {'0' * widest}  epoch 000  {layer.layer_name or layer.key}"
        panel = LayerPanel(run, layer, max_channels=max_channels, n=n, caption_sample=sample)
        layout = panel.layout(1)
        shown = layout.channels_shown
        ids = list(layer.channels[:shown]) if layer.channels else list(range(shown))
        meta = {
            "kind": "layer", "index": index, "key": layer.key, "title": panel.name,
            "info": f"{layer.layer_class} · output {layer.shape} · {layer.activation}",
            "width": layout.width, "height": layout.height, "chunk": chunk_size(layout.height),
            "grid_top": layout.grid_top, "grid_left": layout.grid_left,
            "cell_h": layout.cell_height, "cell_w": layout.cell_width, "gap": layout.gap,
            "vh": layout.cell_values_shape[0], "vw": layout.cell_values_shape[1],
            "probes": int(run.probes_for(layer).shape[0]), "channels_shown": shown,
            "channels": layout.channels,
            "channel_ids": [int(c) for c in ids], "dtype": _value_dtype(layer).str[1:],
            "vmin": panel.vmin, "vmax": panel.vmax,
        }
        meta["sig"] = _signature(meta, max_channels)
        panels.append(PanelData(meta, panel))
    return panels


def _value_dtype(layer: LayerInfo) -> np.dtype:
    return np.dtype("<f2") if layer.dtype == "float16" else np.dtype("<f4")


def _signature(meta: dict[str, Any], max_channels: int | None) -> str:
    """What a chunk's content depends on besides its steps: reused only if equal."""
    text = json.dumps([DATA_VERSION, meta, max_channels], sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def panel_chunks(data: PanelData, indices: np.ndarray, *,
                 keep: Callable[[int], bool] = lambda c: False
                 ) -> Iterator[tuple[int, str, str]]:
    """``(chunk, image script, values script)`` of each chunk of one panel's
    snapshots ``indices``; chunks for which ``keep(chunk)`` is true are skipped
    (their files from an earlier build are still right)."""
    k = data.meta["chunk"]
    layout = data.panel.layout(1)
    dtype = np.dtype(data.meta["dtype"])
    for c in range(-(-len(indices) // k)):
        if keep(c):
            continue
        part = indices[c * k:(c + 1) * k]
        frames, values = [], []
        for frame, activations in data.panel.frames_and_values(part.tolist(), 1, hold=0.0):
            frames.append(frame)
            values.append(layout.cell_values(activations).astype(dtype))
        sheet = _png(np.concatenate(frames), layout.palette)
        yield c, _script("img", data.meta["index"], c, sheet), \
            _script("val", data.meta["index"], c, _shuffled_deflate(np.stack(values)))


def _png(indices: np.ndarray, palette: np.ndarray) -> bytes:
    from PIL import Image

    image = Image.fromarray(indices, "P")
    image.putpalette(palette.astype(np.uint8).ravel().tolist())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _shuffled_deflate(values: np.ndarray) -> bytes:
    """Byte planes one after another (as HDF5's shuffle filter), then zlib: floats
    of one layer share their high bytes, which then compress well."""
    raw = np.ascontiguousarray(values).view(np.uint8).reshape(-1, values.dtype.itemsize)
    return zlib.compress(np.ascontiguousarray(raw.T).tobytes(), 6)


def _script(kind: str, panel: int, chunk: int, payload: bytes) -> str:
    return f'LW.add("{kind}",{panel},{chunk},"{base64.b64encode(payload).decode("ascii")}");\n'


def chunk_name(kind: str, panel: int, chunk: int) -> str:
    """The file name of one chunk script, relative to the page's ``data/`` folder."""
    return f"{kind}_{panel}_{chunk}.js"


def curves(run: Run) -> list[dict[str, Any]]:
    """Loss and accuracy against the step: ``train`` per logged step, ``val`` per epoch."""
    batch, epoch = run.metrics("batch"), run.metrics("epoch")
    names = [n for n in ("loss",) if n in batch.names or n in epoch.names]
    names += [n for n in batch.names + epoch.names
              if n not in names and not n.startswith("val_")
              and is_accuracy(n)][:1]
    out = []
    for name in names:
        entry: dict[str, Any] = {"name": name}
        for label, table, column in (("train", batch, name), ("train", epoch, name),
                                     ("val", epoch, "val_" + name)):
            if label in entry or column not in table.names:
                continue
            steps, values = table.get(column)
            keep = np.isfinite(values)
            entry[label] = [steps[keep].tolist(),
                            [float(f"{v:.{_CURVE_DIGITS}g}") for v in values[keep]]]
        out.append(entry)
    return out


def json_for_script(value: Any) -> str:
    """JSON that is also safe inside an HTML ``<script>`` element (no ``</script>``)."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
