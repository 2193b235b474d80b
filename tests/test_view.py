"""`layerwatch view`: the step-slider page, checked in real headless Chromium from ``file://``.

The recordings are written with :class:`RunWriter` (no Keras): random values, so every
snapshot draws differently, two layers stored as float16 (tanh) and float32 (relu), more
snapshots than one chunk holds. Values shown on hover are compared with the file read by
plain h5py. A screenshot goes to ``test-artifacts/view.png``.
"""

from __future__ import annotations

import re
import time

import h5py
import numpy as np
import pytest
from _browser import ARTIFACTS, chromium  # noqa: F401  (chromium: a fixture)
from click.testing import CliRunner

from layerwatch.cli import main
from layerwatch.store import LayerSpec, RunWriter
from layerwatch.view import view_html, write_view
from layerwatch.view.data import CHUNK

SNAPSHOTS = CHUNK + 8  # two chunks, the second partial
PROBES = 3


def _write(path, snapshots: int, *, close: bool = True, start: int = 0,
           writer: RunWriter | None = None) -> RunWriter:
    rng = np.random.default_rng(start)
    if writer is None:
        layers = [
            LayerSpec("conv1", (6, 6, 4), {"layer_name": "conv1", "layer_class": "Conv2D",
                                           "activation": "tanh", "tensor": "conv1",
                                           "channel_axis": 2,
                                           "value_range": np.array([-1.0, 1.0])},
                      dtype="float16"),
            LayerSpec("conv2", (2, 3, 3), {"layer_name": "conv2", "layer_class": "Conv2D",
                                           "activation": "relu", "tensor": "conv2",
                                           "channel_axis": 0, "data_format": "channels_first"},
                      dtype="float32"),
        ]
        writer = RunWriter.create(
            str(path), layers=layers, probes_x=rng.normal(size=(PROBES, 6, 6, 1)).astype("f4"),
            probes_y=np.array([7, 2, 5]), metadata={"model_name": "tiny", "every": 1},
            texts={"summary": "s", "model_config": "{}"}, flush_seconds=60,
            storage_dtype="auto")
    for i in range(start, start + snapshots):
        step = 3 * i
        writer.add_snapshot(step, i // 10, [
            np.tanh(rng.normal(size=(PROBES, 6, 6, 4))).astype(np.float32),
            np.maximum(rng.normal(size=(PROBES, 2, 3, 3)) * 5, 0).astype(np.float32)])
        writer.add_batch_logs(step, {"loss": 2.0 / (i + 1), "accuracy": i / (i + 5)})
        if i % 10 == 9:
            writer.add_epoch_logs(i // 10, step, {"val_loss": 2.0 / (i + 1),
                                                  "val_accuracy": 0.5})
    if close:
        writer.close()
    else:
        writer.flush(wait=True)
    return writer


@pytest.fixture(scope="module")
def viewed(tmp_path_factory):
    d = tmp_path_factory.mktemp("view")
    _write(d / "tiny.h5", SNAPSHOTS)
    written = write_view(d / "tiny.h5", d / "view")
    return d / "tiny.h5", d / "view", written


def _open(chromium, page, fragment: str = "") -> None:
    chromium.open(page.as_uri() + fragment)
    _drawn(chromium)


def _drawn(chromium, timeout: float = 20) -> int:
    """Wait until every panel shows the slider's snapshot; return it."""
    deadline = time.monotonic() + timeout
    while True:
        state = chromium.evaluate(
            "(() => { const s = LW.state(); return [s.index, s.drawn, "
            "s.manifest.panels.length]; })()")
        index, drawn, n = state
        if len(drawn) == n and all(d == index for d in drawn):
            return index
        if time.monotonic() > deadline:
            raise TimeoutError(f"panels not drawn: {state}")
        time.sleep(0.05)


_PICTURES = """Array.from(document.querySelectorAll("canvas[data-panel]")).map(c => {
  const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  let h = 0; for (let i = 0; i < d.length; i += 4) h = (h * 31 + d[i] + 7 * d[i + 1]) % 1000003;
  return h; })"""
_CURSORS = "Array.from(document.querySelectorAll('.cursor')).map(l => l.getAttribute('x1'))"


def test_page_loads_from_file_with_no_errors_and_no_network(viewed, chromium):
    _, out, written = viewed
    assert written[0] == out / "index.html"
    assert {p.name for p in written} >= {"index.html", "viewer.js", "viewer.css",
                                         "manifest.js", "img_0_0.js", "val_1_1.js"}
    page = (out / "index.html").read_text(encoding="utf-8")
    assert not re.search(r"https?://", page)  # no CDN, nothing remote
    _open(chromium, out / "index.html")
    assert _errors(chromium) == []
    remote = [u for u in chromium.requests()
              if not (u.startswith(out.as_uri() + "/") or u.startswith("data:image/png"))]
    assert remote == []
    assert chromium.evaluate("document.title") == "tiny — layerwatch view"
    assert chromium.evaluate("getComputedStyle(document.querySelector('canvas.px'))"
                             ".imageRendering") == "pixelated"
    chromium.screenshot(ARTIFACTS / "view.png")
    assert (ARTIFACTS / "view.png").stat().st_size > 10_000


def test_the_slider_moves_every_panel_and_the_curve_cursors(viewed, chromium):
    _, out, _ = viewed
    _open(chromium, out / "index.html")
    first, cursors = chromium.evaluate(_PICTURES), chromium.evaluate(_CURSORS)
    assert len(first) == 2 and len(cursors) == 2  # loss and accuracy
    chromium.key("End")  # into the second chunk, loaded on demand
    assert _drawn(chromium) == SNAPSHOTS - 1
    last = chromium.evaluate(_PICTURES)
    assert all(a != b for a, b in zip(first, last))
    assert all(float(b) > float(a) for a, b in zip(cursors, chromium.evaluate(_CURSORS)))
    chromium.key("ArrowLeft")
    assert _drawn(chromium) == SNAPSHOTS - 2
    assert chromium.evaluate(_PICTURES) != last
    chromium.evaluate("(() => { const s = document.querySelector('input[type=range]');"
                      " s.value = 5; s.dispatchEvent(new Event('input')); })()")
    assert _drawn(chromium) == 5
    time.sleep(0.3)  # the fragment follows the slider a moment later
    assert chromium.evaluate("location.hash") == "#step=15"
    assert _errors(chromium) == []


def _hover(chromium, panel: int, channel: int, probe: int, y: int, x: int) -> dict:
    """Move the mouse over one value of one cell; the tooltip's text and exact value."""
    chromium.evaluate(f"document.querySelector('canvas[data-panel=\"{panel}\"]')"
                      ".scrollIntoView()")
    point = chromium.evaluate(f"""(() => {{
      const p = LW.state().manifest.panels[{panel}];
      const r = document.querySelector('canvas[data-panel="{panel}"]').getBoundingClientRect();
      const fx = p.grid_left + {probe} * (p.cell_w + p.gap) + ({x} + 0.5) * p.cell_w / p.vw;
      const fy = p.grid_top + (1 + {channel}) * (p.cell_h + p.gap)
                 + ({y} + 0.5) * p.cell_h / p.vh;
      return [r.left + fx * r.width / p.width, r.top + fy * r.height / p.height]; }})()""")
    chromium.mouse(*point)
    deadline = time.monotonic() + 10
    while True:
        tip = chromium.evaluate("({text: document.getElementById('tip').textContent,"
                                " value: document.getElementById('tip').dataset.value})")
        if tip["value"] is not None or time.monotonic() > deadline:
            return {**tip, "point": point}
        time.sleep(0.05)


def _errors(chromium) -> list[str]:
    """The page's errors, less Chromium's advice on the tests' own pixel reads."""
    return [e for e in chromium.errors() if "willReadFrequently" not in e]


@pytest.mark.parametrize("panel, key, channel", [(0, "conv1", 2), (1, "conv2", 1)])
def test_hover_shows_the_recorded_value(viewed, chromium, panel, key, channel):
    run, out, _ = viewed
    index, probe, y, x = SNAPSHOTS - 3, 1, 1, 2
    with h5py.File(run, "r") as f:
        ds = f["activations"][key]
        step = int(f["steps"][index])
        cell = (probe, y, x, channel) if key == "conv1" else (probe, channel, y, x)
        recorded = float(ds[(index,) + cell])
        assert ds.dtype == (np.float16 if key == "conv1" else np.float32)
    _open(chromium, out / "index.html", f"#step={step}")
    tip = _hover(chromium, panel, channel, probe, y, x)
    assert float(tip["value"]) == recorded
    assert f"channel {channel}" in tip["text"] and f"probe {probe} (label 2)" in tip["text"]
    assert f"step {step}" in tip["text"] and key in tip["text"]
    assert f"value {float(f'{recorded:.5g}'):g}"[:9] in tip["text"]
    assert _errors(chromium) == []


def test_the_fragment_restores_the_step(viewed, chromium):
    _, out, _ = viewed
    _open(chromium, out / "index.html", "#step=61")  # between snapshots: the one before
    assert chromium.evaluate("LW.state().step") == 60
    assert chromium.evaluate("document.querySelector('input[type=range]').value") == "20"
    assert "step 60" in chromium.evaluate("document.querySelector('.stepinfo').textContent")
    chromium.key("ArrowRight")
    assert _drawn(chromium) == 21
    time.sleep(0.3)
    assert chromium.evaluate("location.hash") == "#step=63"


def test_a_click_on_a_cell_shows_that_channel_over_training(viewed, chromium):
    _, out, _ = viewed
    _open(chromium, out / "index.html")
    point = _hover(chromium, 0, 3, 1, 2, 2)["point"]
    chromium.mouse(*point, "mousePressed")
    chromium.mouse(*point, "mouseReleased")
    assert chromium.evaluate("document.querySelector('#focus h2').textContent").startswith(
        "conv1 · channel 3")
    assert chromium.evaluate("document.querySelectorAll('#focus canvas')[1].height") > 0
    assert _errors(chromium) == []


def test_writing_again_reuses_full_chunks_and_follows_a_growing_run(tmp_path, chromium):
    run, out = tmp_path / "live.h5", tmp_path / "view"
    writer = _write(run, CHUNK + 2, close=False)
    notes = []
    write_view(run, out, notes=notes.append)
    assert notes[-1].startswith("4 chunk(s) written, 0 reused")
    manifest = (out / "data" / "manifest.js").read_text()
    assert '"live":true' in manifest
    _open(chromium, out / "index.html")
    _write(run, 5, start=CHUNK + 2, writer=writer, close=True)
    write_view(run, out, notes=notes.append)
    # conv1 (tanh, fixed colours): only its partial chunk is redrawn; conv2 (relu) is
    # redrawn whole, its measured colour range having moved with the new values.
    assert notes[-1].startswith("3 chunk(s) written, 1 reused")
    chromium.evaluate("LW.manifest({...LW.state().manifest, rev: -1, live: false})")
    with h5py.File(run, "r") as f:
        assert len(f["steps"]) == CHUNK + 7
    assert _errors(chromium) == []


def test_cli_view(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default output folder would go
    _write(tmp_path / "tiny.h5", 4)
    result = CliRunner().invoke(main, ["view", str(tmp_path / "tiny.h5"), "-o",
                                       str(tmp_path / "v")])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1].startswith(str(tmp_path / "v" / "index.html"))
    assert "open it in a browser" in result.output
    missing = CliRunner().invoke(main, ["view", str(tmp_path / "nope.h5")])
    assert missing.exit_code == 1
    assert missing.output.startswith("Error: ") and "does not exist" in missing.output
    unknown = CliRunner().invoke(main, ["view", str(tmp_path / "tiny.h5"), "--layers", "conv9"])
    assert unknown.exit_code == 1
    assert "no layer 'conv9'. Recorded layers: conv1, conv2" in unknown.output
    assert not (tmp_path / "outputs").exists()  # a refused command writes no folder


def test_an_empty_run_names_what_to_do(tmp_path):
    writer = _write(tmp_path / "empty.h5", 0, close=False)
    with pytest.raises(Exception, match="holds no snapshot yet: nothing to view"):
        write_view(tmp_path / "empty.h5", tmp_path / "v")
    writer.close()


def test_show_gives_the_slider_inline(viewed, tmp_path, monkeypatch, chromium):
    import sys
    import types

    from layerwatch.notebook import show

    class HTML:
        def __init__(self, data=None):
            self.data = data

    display = types.ModuleType("IPython.display")
    display.HTML = HTML
    monkeypatch.setitem(sys.modules, "IPython", types.ModuleType("IPython"))
    monkeypatch.setitem(sys.modules, "IPython.display", display)
    monkeypatch.chdir(tmp_path)
    shown = show(viewed[0], max_frames=10)
    assert isinstance(shown, HTML) and shown.data.startswith("<iframe srcdoc=")
    assert list(tmp_path.iterdir()) == []
    page = tmp_path / "inline.html"
    page.write_text(view_html(viewed[0], max_frames=10), encoding="utf-8")
    _open(chromium, page)
    assert chromium.evaluate("LW.state().manifest.steps.length") == 10
    assert [u for u in chromium.requests() if not u.startswith(("file:", "data:"))] == []
    assert _errors(chromium) == []
