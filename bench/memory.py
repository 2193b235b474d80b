"""Peak memory of recording and rendering: does it grow with the run's length?

    python bench/memory.py                         # 100 vs 1,000 steps at batch 64
    python bench/memory.py --naive                 # also the naive recorder (slow)
    python bench/memory.py --quick                 # tiny sizes, a smoke run

Every measurement runs in a fresh subprocess (so one run's allocations never
count in another's) and reports that process's peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``). The seed model trains on 50
batches of the bundled digits per epoch, for as many epochs as the step count
needs, under:

  none        no recording (what TensorFlow/Keras itself grows by)
  layerwatch  LayerWatch(every=1), default settings
  naive       (--naive) predict() after every step, arrays kept in a list

The layerwatch recordings are then rendered with ``layerwatch.render`` (when
the installed layerwatch has it), again one subprocess each: rendering a long
run must stream from disk, not grow with its length.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

GROWTH_LIMIT_MIB = 5.0


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _current_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


# -- children --------------------------------------------------------------- #


def child_train(mode: str, steps: int, batch: int, steps_per_epoch: int, path: str) -> dict:
    import keras

    from layerwatch import LayerWatch

    x, y, probes, labels = _common.seed_data(train_size=batch * steps_per_epoch)
    model = _common.seed_recipe().build_model(seed=0)
    rss = []

    class Sample(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            rss.append(_current_mib())

    callbacks: list = []
    if mode == "layerwatch":
        callbacks.append(LayerWatch(path, probes, labels, every=1))
    elif mode == "naive":
        kept: list = []

        class Naive(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.tap = keras.Model(self.model.inputs, _common.conv_outputs(self.model))

            def on_train_batch_end(self, batch, logs=None):
                kept.append(self.tap.predict(probes, verbose=0))

        callbacks.append(Naive())
    start_rss = _current_mib()
    t0 = time.perf_counter()
    epochs = -(-steps // steps_per_epoch)
    model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0, callbacks=callbacks + [Sample()])
    return {"peak_mib": _peak_mib(), "rss_start_mib": start_rss, "rss_epochs_mib": rss,
            "steps": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
            "seconds": time.perf_counter() - t0, "machine": _common.machine()}


def child_render(path: str, out_dir: str) -> dict:
    import layerwatch

    try:
        render = layerwatch.render
    except (AttributeError, ImportError) as exc:
        return {"error": f"layerwatch.render is not available: {exc}"}
    from layerwatch import open_run

    with open_run(path) as run:
        snapshots = run.num_snapshots
    base = _current_mib()
    t0 = time.perf_counter()
    written = render(path, out_dir)
    return {"peak_mib": _peak_mib(), "rss_before_mib": base, "snapshots": snapshots,
            "seconds": time.perf_counter() - t0, "files": len(written),
            "bytes": sum(os.path.getsize(p) for p in written)}


# -- the parent --------------------------------------------------------------- #


def _spawn(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args],
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise SystemExit(f"child {args} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return json.loads(lines[-1])


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, nargs=2, default=[100, 1000], metavar=("SHORT", "LONG"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps-per-epoch", type=int, default=50)
    p.add_argument("--naive", action="store_true", help="also measure the naive recorder")
    p.add_argument("--no-render", action="store_true", help="skip the render measurement")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.steps_per_epoch = [4, 12], 16, 4
        args.naive = False
    return args


def run(args) -> int:
    if args.child:
        kind, *rest = args.child
        if kind == "train":
            mode, steps, batch, spe, path = rest
            result = child_train(mode, int(steps), int(batch), int(spe), path)
        else:
            result = child_render(*rest)
        print(json.dumps(result))
        return 0

    # The parent never imports Keras: the children do, and name the machine.
    print(f"# bench/memory.py — {_common.load_average()}")
    print(f"# seed model, batch {args.batch_size}, {args.steps_per_epoch} steps per epoch; "
          "peak RSS of one fresh process per row")
    tmp = tempfile.mkdtemp(prefix="layerwatch-bench-")
    short, long_ = args.steps
    # --quick skips the no-recording baseline: it only shows the script runs.
    modes = ([] if args.quick else ["none"]) + ["layerwatch"] + (["naive"] if args.naive else [])
    results: dict[tuple[str, int], dict] = {}
    for mode in modes:
        for steps in (short, long_):
            path = os.path.join(tmp, f"{mode}-{steps}.h5")
            r = _spawn(["--child", "train", mode, str(steps), str(args.batch_size),
                        str(args.steps_per_epoch), path])
            if not results:
                print(f"# {r['machine']}")
            results[mode, steps] = r
            epochs = r["rss_epochs_mib"]
            print(f"peak RSS {mode:10s} {r['steps']:5d} steps: {r['peak_mib']:8.1f} MiB   "
                  f"(RSS after epoch 1 {epochs[0]:.1f}, after last {epochs[-1]:.1f} MiB; "
                  f"{r['seconds']:.1f} s)", flush=True)
    for mode in modes:
        a, b = results[mode, short], results[mode, long_]
        print(f"ratio memory {mode} peak-RSS {long_}/{short} steps = "
              f"{b['peak_mib'] / a['peak_mib']:.3f}  ({b['peak_mib'] - a['peak_mib']:+.1f} MiB)")
    if "none" in modes:
        lw_growth = ((results["layerwatch", long_]["peak_mib"]
                      - results["layerwatch", short]["peak_mib"])
                     - (results["none", long_]["peak_mib"] - results["none", short]["peak_mib"]))
        verdict = "met" if lw_growth <= GROWTH_LIMIT_MIB else "MISSED"
        print(f"growth due to layerwatch from {short} to {long_} steps: {lw_growth:+.1f} MiB "
              f"(its growth minus the baseline's)   target <= {GROWTH_LIMIT_MIB:.0f} MiB: "
              f"{verdict}")

    if args.no_render:
        return 0
    rendered = {}
    for steps in (short, long_):
        path = os.path.join(tmp, f"layerwatch-{steps}.h5")
        r = _spawn(["--child", "render", path, os.path.join(tmp, f"render-{steps}")])
        if "error" in r:
            print(f"# render not measured: {r['error']}")
            return 0
        rendered[steps] = r
        print(f"peak RSS render {r['snapshots']:5d} snapshots: {r['peak_mib']:8.1f} MiB   "
              f"(before rendering {r['rss_before_mib']:.1f} MiB; {r['seconds']:.1f} s, "
              f"{r['files']} files, {r['bytes'] / 2**20:.2f} MiB)", flush=True)
    a, b = rendered[short], rendered[long_]
    print(f"ratio memory render peak-RSS {b['snapshots']}/{a['snapshots']} snapshots = "
          f"{b['peak_mib'] / a['peak_mib']:.3f}  ({b['peak_mib'] - a['peak_mib']:+.1f} MiB)")
    print(f"# done, {_common.load_average()}")
    return 0


def main(argv=None) -> int:
    return run(_parse(argv))


if __name__ == "__main__":
    sys.exit(main())
