"""Fuzz: damaged copies of a valid recording never crash ``info`` or ``render``.

A seeded run of random truncations, byte flips and overwritten ranges; each
damaged file goes through ``layerwatch info`` and ``layerwatch render`` in
process. Every case must end in success or exactly one ``Error:`` line with
exit code 1 — no traceback, no other exit code — and a failed render leaves
no file behind. Set LAYERWATCH_FUZZ_CASES for a longer run (default 240).

``render`` runs on every third case. Drawing ``curves.png`` with matplotlib
costs about a second, so on most of those cases the curves step is replaced
by one that reads every metric (what a damaged file can break) without
drawing; every tenth render draws the real curves.
"""

from __future__ import annotations

import collections
import faulthandler
import os
import random
import re
import shutil

from click.testing import CliRunner

from _recordings import make_run
from layerwatch.cli import main


def _mutate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(["truncate", "flip", "flip", "flip_meta", "flip_meta", "smash"])
    buf = bytearray(data)
    if kind == "truncate":
        return kind, bytes(buf[: rng.randrange(len(buf))])
    if kind == "smash":  # a run of random bytes, e.g. a torn block
        start = rng.randrange(len(buf))
        length = rng.choice([8, 64, 512, 4096])
        buf[start:start + length] = rng.randbytes(min(length, len(buf) - start))
        return kind, bytes(buf)
    # Metadata lives mostly near the start and between chunks; flip there more.
    span = 8192 if kind == "flip_meta" else len(buf)
    for _ in range(rng.choice([1, 1, 2, 4, 16])):
        pos = rng.randrange(min(span, len(buf)))
        buf[pos] ^= 1 << rng.randrange(8)
    return kind, bytes(buf)


def _classify(result) -> str:
    if result.exit_code == 0:
        return "ok"
    out = result.output
    assert result.exit_code == 1, (result.exit_code, out, result.exception)
    assert out.startswith("Error: ") and out.count("\n") == 1, out
    assert "Traceback" not in out
    if "unexpected" in out:
        return "error: unexpected " + out.split("unexpected ")[1].split(":")[0]
    for pattern, label in [(r"not an HDF5 file", "not HDF5"),
                           (r"damaged or unreadable", "unopenable"),
                           (r"not a layerwatch recording", "not layerwatch"),
                           (r"format_version", "bad version"),
                           (r"is missing", "dataset missing"),
                           (r"holds no snapshot", "no snapshot"),
                           (r"is damaged", "damaged")]:
        if re.search(pattern, out):
            return "error: " + label
    return "error: other"


def _read_curves_only(run, path):
    for group in ("batch", "epoch"):
        metrics = run.metrics(group)
        for name in metrics.names:
            metrics.get(name)
    return False


def test_fuzzed_recordings_fail_cleanly(tmp_path, monkeypatch):
    from layerwatch.rendering import curves

    real_curves = curves.write_curves
    cases = int(os.environ.get("LAYERWATCH_FUZZ_CASES", "240"))
    valid = tmp_path / "valid.h5"
    make_run(valid, snapshots=5, nan_at={"conv2": 3})
    data = valid.read_bytes()
    rng = random.Random(20240601)
    runner = CliRunner()
    outcomes: dict[str, collections.Counter] = {"info": collections.Counter(),
                                                "render": collections.Counter()}
    leftovers = []
    # A hang would be a bug too: dump the stacks and fail rather than wait forever.
    faulthandler.dump_traceback_later(30 + cases, exit=True)
    try:
        for case in range(cases):
            kind, damaged = _mutate(data, rng)
            path = tmp_path / "case.h5"
            path.write_bytes(damaged)
            info = runner.invoke(main, ["info", str(path)])
            outcomes["info"][_classify(info)] += 1
            if case % 3:
                continue
            draw = case % 30 == 0
            monkeypatch.setattr(curves, "write_curves",
                                real_curves if draw else _read_curves_only)
            out = tmp_path / "out"
            render = runner.invoke(main, ["render", str(path), "-o", str(out), "--quiet",
                                          "--max-frames", "3"])
            label = _classify(render)
            outcomes["render"][label] += 1
            if render.exit_code != 0 and out.exists() and os.listdir(out):
                leftovers.append((case, kind, sorted(os.listdir(out))))
            shutil.rmtree(out, ignore_errors=True)
    finally:
        faulthandler.cancel_dump_traceback_later()
    print(f"\nfuzz: {cases} damaged files")
    for command, counter in outcomes.items():
        print(f"  {command}: " + ", ".join(f"{k} {v}" for k, v in counter.most_common()))
    print(f"  render failures that left files behind: {len(leftovers)} "
          "(see test_a_render_that_fails_midway_leaves_no_files)")
    assert outcomes["info"]["ok"] > 0 and sum(outcomes["info"].values()) == cases


def test_a_render_that_fails_midway_leaves_no_files(tmp_path, monkeypatch):
    # The damage is met only after the GIFs are written: at the curves.
    import layerwatch.store

    valid = tmp_path / "run.h5"
    make_run(valid)

    def damaged_metrics(self, group="batch"):
        raise layerwatch.store.RecordingError(f"{self.path} is damaged: metrics unreadable")

    monkeypatch.setattr(layerwatch.store.Run, "metrics", damaged_metrics)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["render", str(valid), "-o", str(out), "--quiet"])
    assert result.exit_code == 1 and result.output.startswith("Error: ")
    assert not out.exists() or os.listdir(out) == []
