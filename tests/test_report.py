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

import json
import os
import re
import select
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from layerwatch.cli import main
from layerwatch.report import report
from layerwatch.store import LayerSpec, RunWriter

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
INSTALL = "apt-get install -y chromium"


# --------------------------------------------------------------------------- #
# A minimal DevTools-protocol client over --remote-debugging-pipe
# --------------------------------------------------------------------------- #


class Chromium:
    """Headless Chromium driven over its DevTools pipe (fd 3: commands in, fd 4: out)."""

    def __init__(self, exe: str, user_data_dir: Path):
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()

        def child_fds():
            os.dup2(to_r, 3)
            os.dup2(from_w, 4)

        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-extensions", "--hide-scrollbars",
             f"--user-data-dir={user_data_dir}", "--remote-debugging-pipe",
             "--window-size=1200,900", "about:blank"],
            pass_fds=(3, 4), preexec_fn=child_fds,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_r)
        os.close(from_w)
        self._w, self._r = to_w, from_r
        self._buffer = b""
        self._id = 0
        self.events: list[dict] = []
        self.session: str | None = None

    def send(self, method: str, params: dict | None = None, *, timeout: float = 60) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if self.session is not None and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._w, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str, *, timeout: float = 60) -> dict:
        for event in self.events:
            if event.get("method") == method:
                return event
        deadline = time.monotonic() + timeout
        while True:
            event = self._read(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def settle(self, seconds: float) -> None:
        """Collect events for a while (late console messages)."""
        deadline = time.monotonic() + seconds
        try:
            while True:
                self.events.append(self._read(deadline))
        except TimeoutError:
            pass

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from chromium")
            ready, _, _ = select.select([self._r], [], [], left)
            if ready:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise EOFError("chromium closed its DevTools pipe")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget",
                                 {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")
        self.send("Page.navigate", {"url": url})
        self.wait_for("Page.loadEventFired")
        self.settle(0.5)

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression,
                                                "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def errors(self) -> list[str]:
        """Console errors/warnings, uncaught exceptions and logged errors (CSP, loads)."""
        out = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in (
                    "error", "warning", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description")))
                                                  for a in params.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                out.append("exception: " + json.dumps(params.get("exceptionDetails"))[:500])
            elif method == "Log.entryAdded" and params["entry"].get("level") in (
                    "error", "warning"):
                out.append(f"log ({params['entry'].get('source')}): {params['entry']['text']}")
            elif method == "Network.loadingFailed":
                out.append(f"load failed: {params.get('errorText')}")
        return out

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events
                if e.get("method") == "Network.requestWillBeSent"]

    def screenshot(self, path: Path) -> None:
        size = self.send("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 8000),
                "scale": 1}
        data = self.send("Page.captureScreenshot", {"format": "png", "clip": clip,
                                                    "captureBeyondViewport": True})["data"]
        import base64

        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.session = None
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)


@pytest.fixture
def chromium(tmp_path):
    exe = next((shutil.which(name) for name in ("chromium", "chromium-browser")
                if shutil.which(name)), None)
    if exe is None:
        message = f"headless Chromium is needed for the report test: {INSTALL}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    browser = Chromium(exe, tmp_path / "chromium-profile")
    yield browser
    browser.close()


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
                            "conv2.png", "curves.png", "drift.png", "health.png"])
    page = (out / "report.html").read_text(encoding="utf-8")
    sources = re.findall(r'\bsrc="([^"]*)"', page)
    assert len(sources) == 3 + 2 * 2  # curves, drift, health + GIF and still per layer
    assert all(s.startswith(("data:image/png;base64,", "data:image/gif;base64,"))
               for s in sources)
    assert not re.search(r"\b(href|url)\s*[=(]", page)  # nothing to fetch
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
