"""Smoke runs of the bench/ scripts' --quick modes.

They assert only that each script runs and prints its ratio lines (and the
facts it counts): timings belong in bench/, never in assertions.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _run_quick(script: str, tmp_path, **env_vars: str) -> str:
    # The scripts' files land in tmp_path; env_vars set more (e.g. KERAS_BACKEND).
    env = dict(os.environ, TMPDIR=str(tmp_path), **env_vars)
    proc = subprocess.run([sys.executable, str(BENCH / script), "--quick"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _assert_ratio(out: str, what: str) -> None:
    assert re.search(rf"^ratio {what} = \d+\.\d+", out, re.MULTILINE), out


def test_overhead_quick(tmp_path):
    out = _run_quick("overhead.py", tmp_path)
    # The headline: whole fit() in alternating pairs, beside the plain step time.
    assert re.search(r"^fit-ratio b64 layerwatch/none = \d+\.\d+", out, re.MULTILINE), out
    assert re.search(r"^fit-cpu-ratio b64 naive/none = \d+\.\d+", out, re.MULTILINE), out
    assert re.search(r"^plain fit b64: .* plain step \d+\.\d+ ms", out, re.MULTILINE), out
    _assert_ratio(out, "batch=32 layerwatch/none")
    _assert_ratio(out, "batch=32 naive/none")
    traces = re.search(r"^probe function traces: (\d+) during warm-up, (\d+) during", out,
                       re.MULTILINE)
    assert traces, out
    if "backend tensorflow" in out:
        # One probe function, for the separate pass and inside the fused step.
        assert traces.groups() == ("1", "0"), out
    elif "backend jax" in out:
        # The fused step's probe branch and the separate jitted function (the
        # epochs' ends, the final step), each traced once however many steps.
        assert traces.groups() == ("2", "0"), out


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="bench/train_step.py times TensorFlow's fused train step")
def test_train_step_quick(tmp_path):
    out = _run_quick("train_step.py", tmp_path)
    for condition in ("fused", "fused+writer"):
        _assert_ratio(out, rf"train-call {re.escape(condition)}/plain")
        assert re.search(rf"^cpu-ratio train-call {re.escape(condition)}/plain = \d+\.\d+", out,
                         re.MULTILINE), out


def test_storage_quick(tmp_path):
    out = _run_quick("storage.py", tmp_path)
    _assert_ratio(out, "storage on-disk/raw-float32")
    sys.path.insert(0, str(BENCH))
    try:
        import storage
    finally:
        sys.path.remove(str(BENCH))
    rows = [line for line in out.splitlines()
            if re.match(r"^\S.*\s(float16|float32)\s+\d+\.\d{3}\s", line)]
    assert len(rows) == len(storage.CHOICES) + len(storage.HANDOVERS), out


def test_memory_quick(tmp_path):
    out = _run_quick("memory.py", tmp_path)
    _assert_ratio(out, r"memory layerwatch peak-RSS 12/4 steps")
    _assert_ratio(out, r"memory render peak-RSS \d+/\d+ snapshots")


def test_epoch_gaps_quick(tmp_path):
    out = _run_quick("epoch_gaps.py", tmp_path)
    for condition in ("none", "layerwatch", "no-reaper"):
        assert re.search(rf"^{condition}: 3 gaps .* median \d+ ms, max \d+ ms", out,
                         re.MULTILINE), out


def test_phases_quick(tmp_path):
    out = _run_quick("phases.py", tmp_path)
    for phase in ("train_begin", "first_call", "step", "batch_ends", "epoch_ends", "train_end",
                  "total"):
        assert re.search(rf"^phase {phase} +\d+\.\d +\d+\.\d +[+-]\d+\.\d$", out,
                         re.MULTILINE), out


def test_callback_sync_quick(tmp_path):
    out = _run_quick("callback_sync.py", tmp_path)
    assert re.search(r"^step: \d+\.\d+ ms", out, re.MULTILINE), out
    for condition in ("none", "noop", "noop-async-safe"):
        assert re.search(rf"^{condition} +fit \d+\.\d+ s; ÷ none \d+\.\d+", out,
                         re.MULTILINE), out


def test_features_quick(tmp_path):
    out = _run_quick("features.py", tmp_path)
    assert re.search(r"^step: \d+\.\d+ ms", out, re.MULTILINE), out
    # Step 0's call runs in on_train_begin; steps 10, 20 and 30 at batch ends.
    calls = re.findall(r"^features call at batch (\d+): compute \d+ ms, stall -?\d+ ms", out,
                       re.MULTILINE)
    assert calls == ["9", "19", "29"], out
    assert re.search(r"^stall - compute: median [+-]\d+\.\d ms over 3 call", out,
                     re.MULTILINE), out


def test_torch_replay_quick(tmp_path):
    pytest.importorskip("torch")
    out = _run_quick("torch_replay.py", tmp_path, KERAS_BACKEND="torch")
    # The seed model's six conv layers; the copies into NCHW (of 6 convs' and 2 pools' inputs).
    # The convolutions that add their own (random, non-zero) bias: all six where
    # this CPU's kernel gives the same bits that way.
    assert re.search(r"^seed: 6 recorded layers, 8 of \d+ contiguous\(\) calls left out, "
                     r"[0-6] of 6 convolutions add their own bias; "
                     r"lean graph same as Keras' pass: yes$", out, re.MULTILINE), out
    # Several steps in one replay, or (where this CPU's ops give other bits
    # that way) one by one.
    assert re.search(r"^  (16 steps replayed together: \d+\.\d{3} ms a step \(the first release "
                     r"checked: same as the single replays\)|steps replayed one by one: .+)$",
                     out, re.MULTILINE), out
    _assert_ratio(out, "seed lean/full")
    _assert_ratio(out, "seed lean/nocopy")
