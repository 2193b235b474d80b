"""The probe pass inside TensorFlow's train step, measured apart from fit().

    python bench/train_step.py                          # 24 rounds of 50 calls each
    python bench/train_step.py --intra-op-threads 1     # each TensorFlow op on one thread
    python bench/train_step.py --quick                  # tiny sizes, a smoke run

The seed model's train function is called in a tight loop, with no fit() loop
and no callbacks around it, under four conditions that take turns in blocks
of ``--calls`` calls (the order rotated every round):

  plain         the model's own train function (Keras')
  skipped       layerwatch's fused train function at a step it does not record
                (the probes skipped by its tf.cond: what every= leaves between
                recorded steps)
  fused         layerwatch's fused train function (layerwatch/record/fused.py: the
                probes run inside the train step's graph, on the weights the
                step starts from), their activations taken as NumPy arrays as
                the callback takes them
  fused+writer  the same, every snapshot handed to a RunWriter at default
                settings (float16, shuffle + deflate by ISA-L, 32 snapshots a
                block, on an idle-priority thread); each block of calls ends
                when the writer has written everything handed to it

Each line gives the median time per call, the median of the paired ratios to
the plain block of the same round (quartiles, min, max) and the same for the
process's CPU time (all threads). This separates what the fused probe pass and
the writer cost from what fit() and the callback add (bench/overhead.py
measures the whole). ``--intra-op-threads`` / ``--inter-op-threads`` set
TensorFlow's thread pools before anything runs, for experiments on how the
probes' small ops share the cores with the step's own. TensorFlow only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (sets TF_CPP_MIN_LOG_LEVEL before TensorFlow loads)


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=24, help="blocks per condition (default 24)")
    p.add_argument("--calls", type=int, default=50, help="train calls per block (default 50)")
    p.add_argument("--intra-op-threads", type=int, default=None,
                   help="TensorFlow's intra-op threads (default: TensorFlow's, one per core)")
    p.add_argument("--inter-op-threads", type=int, default=None,
                   help="TensorFlow's inter-op threads (default: TensorFlow's)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes for a smoke run: batch 32, 2 rounds of 4 calls")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_size, args.rounds, args.calls = 32, 2, 4
    if min(args.batch_size, args.rounds, args.calls) < 1:
        p.error("--batch-size, --rounds and --calls must be >= 1")
    return args


def run(args) -> int:
    import keras
    import numpy as np

    if keras.backend.backend() != "tensorflow":
        print("bench/train_step.py measures TensorFlow's fused train step: run it with "
              "KERAS_BACKEND=tensorflow.", file=sys.stderr)
        return 2
    import tensorflow as tf

    if args.intra_op_threads is not None:
        tf.config.threading.set_intra_op_parallelism_threads(args.intra_op_threads)
    if args.inter_op_threads is not None:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter_op_threads)

    from layerwatch.record.extractor import build_extractor, cast_outputs, input_spec
    from layerwatch.record.fused import FusedProbePass, can_fuse
    from layerwatch.store import LayerSpec, RunWriter

    recipe = _common.seed_recipe()
    x, y, probes, _ = _common.seed_data()
    intra = tf.config.threading.get_intra_op_parallelism_threads() or "default"
    inter = tf.config.threading.get_inter_op_parallelism_threads() or "default"
    threads = f"intra-op threads {intra}, inter-op threads {inter}"
    print(f"# bench/train_step.py — {_common.machine()}")
    print(f"# seed model {recipe.__name__}, batch {args.batch_size}, {len(probes)} probes, "
          f"{args.rounds} round(s) of {args.calls} calls, {threads}, {_common.load_average()}")

    model = recipe.build_model(seed=0)
    model.make_train_function()
    if not can_fuse(model):
        print("this model's train function cannot carry the probe pass", file=sys.stderr)
        return 2
    extractor, _, _ = build_extractor(model, None, input_spec(model, [probes]))
    recorder = cast_outputs(extractor, "float16", bounded=[True] * len(extractor.outputs))
    # (as LayerWatch stores the seed model's tanh layers)
    feed = np.asarray(probes, dtype=np.float32)
    like = [np.asarray(a) for a in recorder.predict_on_batch(feed)]  # the shapes handed back
    own = model.train_function  # Keras' own, before the fused one takes its place
    fusion = FusedProbePass(model, recorder, feed, like)
    fusion.install()
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(args.batch_size, drop_remainder=True)
    iterator = iter(data.repeat().prefetch(2))

    tmp = tempfile.mkdtemp(prefix="layerwatch-bench-")
    specs = [LayerSpec(key=f"layer{i}", shape=tuple(out.shape[1:]))
             for i, out in enumerate(recorder.outputs)]
    writer = RunWriter.create(os.path.join(tmp, "train_step.h5"), layers=specs,
                              probes_x=probes, probes_y=None, metadata={}, texts={})
    steps = [0]

    def plain():
        logs = own(iterator)
        {k: float(v) for k, v in logs.items()}  # noqa: B018  (what fit() reads back)

    def skipped():
        logs = model.train_function(iterator)  # the fused one, nothing wanted
        {k: float(v) for k, v in logs.items()}  # noqa: B018

    def fused():
        fusion.wanted = True
        logs = model.train_function(iterator)
        {k: float(v) for k, v in logs.items()}  # noqa: B018
        return fusion.take()

    def fused_written():
        arrays, _rate = fused()
        writer.add_snapshot(steps[0], 0, arrays)
        steps[0] += 1

    calls = {"plain": plain, "skipped": skipped, "fused": fused, "fused+writer": fused_written}
    for call in calls.values():  # tracing and warm-up, not timed
        for _ in range(max(args.calls, 10)):
            call()
    writer.flush(wait=True)
    names = list(calls)  # the first is the baseline
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            call = calls[name]
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.calls):
                call()
            if name == "fused+writer":
                writer.flush(wait=True)  # the block's writing counts
            wall[name].append((time.perf_counter() - t0) / args.calls)
            cpu[name].append((time.process_time() - c0) / args.calls)
    writer.close()
    fusion.restore()

    print()
    for name in names:
        print(f"per call {name:12s} median {1e3 * statistics.median(wall[name]):7.3f} ms wall, "
              f"{1e3 * statistics.median(cpu[name]):7.3f} ms CPU")
    for name in names[1:]:
        ratios = [a / b for a, b in zip(wall[name], wall["plain"])]
        print(f"ratio train-call {name}/plain = {_common.fmt_ratio(ratios)}")
    for name in names[1:]:
        ratios = [a / b for a, b in zip(cpu[name], cpu["plain"])]
        print(f"cpu-ratio train-call {name}/plain = {_common.fmt_ratio(ratios)}")
    return 0


def main(argv=None) -> int:
    return run(_parse(argv))


if __name__ == "__main__":
    sys.exit(main())
