"""`layerwatch report`: the self-contained HTML page, checked in a real browser, and Markdown.

The page is opened from ``file://`` in headless Chromium (Debian's ``chromium``
package), driven through the DevTools protocol over a pipe
(``--remote-debugging-pipe``: null-terminated JSON on file descriptors 3 and
4), so the test needs nothing but the browser. It checks that every image
decoded (``naturalWidth > 0``), that nothing was logged as an error (console,
uncaught exceptions, CSP violations, failed loads) and that no request left
the page; a screenshot goes to ``test-artifacts/report.png``.

Without Chromium the browser tests fail when ``CI`` is set and skip otherwise.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from _browser import ARTIFACTS, chromium  # noqa: F401  (chromium: a fixture)
from click.testing import CliRunner

from layerwatch.cli import main
from layerwatch.report import report
from layerwatch.store import LayerSpec, RunWriter

# --------------------------------------------------------------------------- #
# Recordings
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A real tiny training run (tanh and relu conv layers) and its report."""
    import keras

    from layerwatch import LayerWatch

    d = tmp_path_factory.mktemp("report")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(3, 3, padding="same", activation="tanh", name="conv1"),
        keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="conv2"),
        keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")], name="tiny")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 8, 8, 1)).astype("float32")
    y = np.arange(24) % 3
    run = d / "tiny.h5"
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, validation_data=(x[:6], y[:6]),
              callbacks=[LayerWatch(run, x[:6], y[:6])])
    out = d / "out"
    written = report(run, out)
    return run, out, written


EVIL = '<script>document.title="pwned"</script><img src=x onerror=alert(1)>'


@pytest.fixture
def hostile(tmp_path):
    """A crafted recording whose names and texts are HTML/Markdown injections."""
    key = "evil<img src=x onerror=alert(1)>"
    spec = LayerSpec(key, (4, 4, 2), {"layer_name": key, "layer_class": EVIL,
                                      "activation": "tanh", "tensor": EVIL, "channel_axis": 2,
                                      "value_range": np.array([-1.0, 1.0])})
    rng = np.random.default_rng(1)
    writer = RunWriter.create(
        str(tmp_path / "hostile.h5"), layers=[spec],
        probes_x=rng.normal(size=(3, 4, 4, 1)).astype(np.float32), probes_y=None,
        metadata={"model_name": EVIL, EVIL: "](javascript:alert(1)) | ``` \n# heading"},
        texts={"summary": "</pre>" + EVIL + "\n```\n[x](javascript:alert(1))"},
        storage_dtype="float32")
    for step in range(3):
        writer.add_snapshot(step, 0, [np.tanh(rng.normal(size=(3, 4, 4, 2))).astype(np.float32)])
        writer.add_batch_logs(step, {"loss": 1.0 / (step + 1), EVIL: 0.5})
    writer.close()
    return tmp_path / "hostile.h5"


# --------------------------------------------------------------------------- #
# Tests
# --------------------------------------------------------------------------- #


def test_report_writes_a_self_contained_page_and_markdown(recorded):
    run, out, written = recorded
    names = sorted(p.name for p in written)
    assert names == sorted(["report.html", "report.md", "conv1.gif", "conv1.png", "conv2.gif",
                            "conv2.png", "curves.png", "drift.png", "health.png", "index.html"])
    page = (out / "report.html").read_text(encoding="utf-8")
    sources = re.findall(r'\bsrc="([^"]*)"', page)
    assert len(sources) == 3 + 2 * 2  # curves, drift, health + GIF and still per layer
    assert all(s.startswith(("data:image/png;base64,", "data:image/gif;base64,"))
               for s in sources)
    # nothing to fetch; one link, to the step viewer beside it
    assert re.findall(r"\b(?:href|url)\s*[=(]\s*\"?([^\">]*)", page) == ["view/index.html"]
    assert (out / "view" / "index.html").is_file()
    assert "<script" not in page
    assert "Content-Security-Policy" in page
    assert "CKA rests on 6 rendered probes" in page
    markdown = (out / "report.md").read_text(encoding="utf-8")
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert sorted(images) == sorted(["curves.png", "drift.png", "health.png", "conv1.gif",
                                     "conv1.png", "conv2.gif", "conv2.png"])
    assert all((out / name).is_file() for name in images)  # relative to the .md


def test_report_opens_in_chromium_with_every_image_loaded(recorded, chromium):
    _, out, _ = recorded
    chromium.open((out / "report.html").as_uri())
    images = chromium.evaluate(
        "Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
    assert len(images) == 7
    assert [alt for alt, complete, width in images if not (complete and width > 0)] == []
    assert chromium.errors() == []
    assert set(chromium.requests()) <= {(out / "report.html").as_uri()} | {
        u for u in chromium.requests() if u.startswith("data:image/")}
    assert chromium.evaluate("document.title") == "tiny — layerwatch report"
    chromium.screenshot(ARTIFACTS / "report.png")
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000


def test_untrusted_file_contents_are_escaped(hostile, tmp_path, chromium):
    out = tmp_path / "out"
    report(hostile, out)
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "<script>" not in page and "<img src=x" not in page
    assert "&lt;script&gt;document.title=&quot;pwned&quot;&lt;/script&gt;" in page
    chromium.open((out / "report.html").as_uri())
    assert chromium.evaluate("document.title") != "pwned"
    assert chromium.evaluate("document.querySelectorAll('script').length") == 0
    images = chromium.evaluate(
        "Array.from(document.images).map(i => [i.alt, i.naturalWidth])")
    assert len(images) == 5 and all(width > 0 for _, width in images)
    assert chromium.errors() == []
    markdown = (out / "report.md").read_text(encoding="utf-8")
    # The summary is fenced (inert) with a fence longer than any ``` inside it...
    fence = re.search(r"^(`{3,})text$", markdown, re.M).group(1)
    assert len(fence) > 3
    outside = re.sub(rf"^{fence}text\n.*?\n{fence}$", "", markdown, flags=re.M | re.S)
    assert outside.count(fence) == 0
    # ...and everything else from the file is escaped text: no HTML, links or headings.
    assert "<img" not in outside and "<script" not in outside
    assert "](javascript:" not in outside
    assert not any(line.startswith("# heading") for line in outside.splitlines())


def test_cli_report(recorded, tmp_path):
    run, _, _ = recorded
    result = CliRunner().invoke(main, ["report", str(run), "-o", str(tmp_path / "r"),
                                       "--max-frames", "3", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "report.html").is_file()
    missing = CliRunner().invoke(main, ["report", str(tmp_path / "nope.h5")])
    assert missing.exit_code == 1
    assert missing.output.startswith("Error: ") and "does not exist" in missing.output
    bad = CliRunner().invoke(main, ["report", str(run), "--max-bytes", "lots"])
    assert bad.exit_code == 2 and "is not a size" in bad.output


def test_the_page_shows_the_whole_model_summary_and_not_the_writer_process(recorded):
    run, out, _ = recorded
    page = (out / "report.html").read_text(encoding="utf-8")
    markdown = (out / "report.md").read_text(encoding="utf-8")
    for text in (page, markdown):
        assert "Param #" in text  # the summary table is not cut at 80 columns
        assert "writer_pid" not in text and "writer\\_pid" not in text
        assert "writer_host" not in text and "writer\\_host" not in text
        assert "flush_seconds" not in text and "flush\\_seconds" not in text
    assert "model_name" in page  # the run's own metadata stays
    info = CliRunner().invoke(main, ["info", str(run)])  # `info` still tells who writes it
    assert info.exit_code == 0
