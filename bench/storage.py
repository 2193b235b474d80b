"""What a recording costs on disk, and what each compression choice costs to write.

    python bench/storage.py                        # records a seed run (2 epochs, batch 64)
    python bench/storage.py runs/mnist.h5          # or measures an existing recording
    python bench/storage.py --quick                # tiny sizes, a smoke run

First line: bytes on disk ÷ bytes of the same activations as raw float32, at
the default settings (float16; byte shuffle + deflate, which layerwatch
compresses itself with ISA-L; chunks of up to 32 snapshots and 1 MiB). The
whole file counts (metadata, metrics, probes, and any space HDF5 could not
reuse); the activation chunks alone are in brackets. Target: <= 0.25.

Then a table: the same activations written again through layerwatch's own
``RunWriter`` under each storage choice, with the ratio and the writer
thread's CPU time per snapshot (``RunWriter._write``, which stacks, compresses
and writes; it runs beside training, so on a 2-core machine it competes with
it). "isal-N" rows are what layerwatch writes: HDF5's gzip filter, the chunks
compressed by ISA-L at its level N (layerwatch maps zlib levels 1–3, 4–6, 7–9
to ISA-L 1, 2, 3; the default gzip level 4 is ISA-L 2); "zlib-N" rows are the
same filter compressed by the standard zlib at level N, as HDF5 itself would;
"1 per chunk" rows are the layout of layerwatch 0.1 (one snapshot per chunk).
All of them are standard HDF5 filters that plain h5py reads. Rows marked
"lossy" round float16 mantissas before compressing (a prototype, not a
library option). The last rows write the same snapshots as a slow run
would: handed over a few at a time, so chunks are written partly filled
and rewritten as they fill.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

TARGET = 0.25

#: (label, storage dtype, compression, level, shuffle, mantissa bits kept or None,
#:  codec: "isal" | "zlib" (deflate rows), chunked along time or one snapshot per chunk)
CHOICES = [
    ("none", "float32", None, None, False, None, "isal", True),
    ("none", "float16", None, None, False, None, "isal", True),
    ("lzf", "float16", "lzf", None, False, None, "isal", True),
    ("shuffle+lzf", "float16", "lzf", None, True, None, "isal", True),
    ("deflate isal-1", "float16", "gzip", 1, False, None, "isal", True),
    ("deflate isal-2", "float16", "gzip", 4, False, None, "isal", True),
    ("shuffle+deflate isal-1", "float16", "gzip", 1, True, None, "isal", True),
    ("shuffle+deflate isal-2", "float16", "gzip", 4, True, None, "isal", True),  # the default
    ("shuffle+deflate isal-3", "float16", "gzip", 9, True, None, "isal", True),
    ("shuffle+deflate zlib-1", "float16", "gzip", 1, True, None, "zlib", True),
    ("shuffle+deflate zlib-4", "float16", "gzip", 4, True, None, "zlib", True),
    ("shuffle+deflate zlib-9", "float16", "gzip", 9, True, None, "zlib", True),
    ("shuffle+deflate zlib-4, 1 per chunk", "float16", "gzip", 4, True, None, "zlib", False),
    ("shuffle+deflate isal-2, 1 per chunk", "float16", "gzip", 4, True, None, "isal", False),
    ("shuffle+deflate isal-2", "float32", "gzip", 4, True, None, "isal", True),
    ("shuffle+deflate isal-2 lossy 7-bit mant.", "float16", "gzip", 4, True, 7, "isal", True),
    ("shuffle+deflate isal-2 lossy 5-bit mant.", "float16", "gzip", 4, True, 5, "isal", True),
]
DEFAULT = ("shuffle+deflate isal-2", "float16")
#: Extra rows: the default, handed to the writer every N snapshots (a slow run's flushes).
HANDOVERS = (8, 1)


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", nargs="?", help="a recording to measure (default: record one)")
    p.add_argument("--epochs", type=int, default=2, help="epochs of the recorded run (2)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--snapshots", type=int, default=None,
                   help="rewrite only the first N snapshots in the table (default: all)")
    p.add_argument("--repeats", type=int, default=3,
                   help="rewrites per choice; the median write time is reported (3)")
    p.add_argument("--activation", default="tanh",
                   help="the seed model's conv activation (tanh; relu records float32 layers)")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.snapshots, args.repeats = 1, 8, 1
        args.train_size = 128
    else:
        args.train_size = None
    return args


def record_seed_run(path: str, *, epochs: int, batch_size: int, train_size=None,
                    activation: str = "tanh") -> None:
    """Train the seed model with LayerWatch at default settings into ``path``."""
    from layerwatch import LayerWatch

    x, y, probes, labels = _common.seed_data(train_size=train_size)
    model = _common.seed_recipe().build_model(seed=0, activation=activation)
    model.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0,
              callbacks=[LayerWatch(path, probes, labels)])


def round_mantissa(a, bits: int):
    """float16 with only ``bits`` of its 10 mantissa bits (round to nearest)."""
    import numpy as np

    u = np.asarray(a, dtype=np.float16).view(np.uint16)
    drop = 10 - bits
    half = np.uint16(1 << (drop - 1))
    mask = np.uint16((0xFFFF << drop) & 0xFFFF)
    return ((u + half) & mask).view(np.float16)


def rewrite(arrays, layers, probes_x, path, *, dtype, compression, level, shuffle, bits,
            handover=None, reference=None):
    """Write ``arrays`` (list per snapshot of per-layer arrays) with one storage choice,
    handing blocks to the writer thread every ``handover`` snapshots (default: its own
    blocks of 32).

    Returns (stored bytes, raw float32 bytes, writer CPU seconds, max abs error vs
    ``reference``, the recording's own values, or ``arrays`` themselves).
    """
    import numpy as np

    from layerwatch.store import LayerSpec, RunWriter, open_run

    specs = [LayerSpec(key=layer.key, shape=layer.shape) for layer in layers]
    writer = RunWriter.create(path, layers=specs, probes_x=probes_x, probes_y=None,
                              metadata={}, texts={}, storage_dtype=dtype,
                              compression=compression, compression_opts=level,
                              shuffle=shuffle)
    spent = [0.0]
    inner = writer._write

    def timed_write(*job):
        # CPU time of the writer thread: what it takes from training's cores,
        # and far steadier than wall time on a shared machine.
        t0 = time.thread_time()
        inner(*job)
        spent[0] += time.thread_time() - t0

    writer._write = timed_write  # the thread looks it up per job
    for i, snapshot in enumerate(arrays):
        if bits is not None:
            snapshot = [round_mantissa(a, bits) for a in snapshot]
        writer.add_snapshot(i, 0, snapshot)
        if handover and (i + 1) % handover == 0:
            writer.flush(wait=True)
    writer.close()
    error = 0.0
    with open_run(path) as run:
        stored, raw = run.storage_bytes()
        for j, layer in enumerate(run.layers):
            back = run.activations(layer.key)
            want = np.stack([s[j] for s in (arrays if reference is None else reference)])
            error = max(error, float(np.max(np.abs(back - want))))
    return stored, raw, spent[0], error


@contextlib.contextmanager
def _storage_variant(codec: str, in_time: bool):
    """Write with zlib instead of ISA-L, and/or one snapshot per chunk (0.1's layout)."""
    from layerwatch.store import codec as store_codec

    saved = store_codec._isal, store_codec.MAX_CHUNK_SNAPSHOTS
    if codec == "zlib":
        store_codec._isal = None
    if not in_time:
        store_codec.MAX_CHUNK_SNAPSHOTS = 1
    try:
        yield
    finally:
        store_codec._isal, store_codec.MAX_CHUNK_SNAPSHOTS = saved


def run(args) -> int:
    import numpy as np

    from layerwatch.store import open_run

    print(f"# bench/storage.py — {_common.machine()}, {_common.load_average()}")
    tmp = tempfile.mkdtemp(prefix="layerwatch-bench-")
    path = args.path
    if path is None:
        path = os.path.join(tmp, "seed.h5")
        t0 = time.perf_counter()
        record_seed_run(path, epochs=args.epochs, batch_size=args.batch_size,
                        train_size=args.train_size, activation=args.activation)
        print(f"# recorded the seed model ({args.activation} convs), {args.epochs} epoch(s) at "
              f"batch {args.batch_size}, "
              f"in {time.perf_counter() - t0:.1f} s: {path}")
    with open_run(path) as run_:
        stored, raw = run_.storage_bytes()
        n = run_.num_snapshots
        layers = run_.layers
        probes_x = run_.probes_x()
        dtype = ", ".join(sorted({layer.dtype for layer in run_.layers}))
        take = n if args.snapshots is None else min(n, args.snapshots)
        per_layer = [run_.activations(layer.key, slice(0, take)) for layer in layers]
    file_bytes = os.path.getsize(path)
    print(f"# {n} snapshots, {len(layers)} layers, {len(probes_x)} probes, stored as {dtype}; "
          f"raw float32 {raw / n / 1024:.1f} KiB per snapshot")
    ratio = file_bytes / raw
    verdict = "met" if ratio <= TARGET else "MISSED"
    if args.path is None and args.activation != "tanh":
        verdict = f"no target ({args.activation} is unbounded: its layers are stored as float32)"
    print(f"ratio storage on-disk/raw-float32 = {ratio:.3f}  (whole file "
          f"{file_bytes / 2**20:.2f} MiB for {raw / 2**20:.2f} MiB of raw float32; activation "
          f"chunks alone {stored / 2**20:.2f} MiB = {stored / raw:.3f})   "
          f"target <= {TARGET:.2f}: {verdict}")

    # The table rewrites the recording's activations (read back as float32) under
    # each choice; "max abs err" is each choice's error against them (for a
    # float16 recording, against its float16 values).
    arrays = [[a[i] for a in per_layer] for i in range(take)]
    print(f"\n## storage choices, {take} snapshots rewritten through RunWriter "
          "(blocks of 32), "
          f"median write time of {args.repeats}")
    print(f"{'choice':46s} {'dtype':8s} {'ratio':>6s} {'file':>6s} {'KiB/snap':>9s} "
          f"{'write CPU ms/snap':>17s} {'max abs err':>12s}")
    print("# ratio: activation chunks; file: the whole file; max abs err: largest difference "
          "from the recording's own values")
    slow = [(f"shuffle+deflate isal-2, handed over {k} at a time", "float16", "gzip", 4, True,
             None, "isal", True, k) for k in HANDOVERS]
    as_stored = {dt: [[a.astype(dt) for a in s] for s in arrays]  # as the callback hands them
                 for dt in {c[1] for c in CHOICES}}
    for label, dt, comp, level, shuffle, bits, codec, in_time, *handover in CHOICES + slow:
        out = os.path.join(tmp, "choice.h5")
        times = []
        for _ in range(args.repeats):
            with _storage_variant(codec, in_time):
                s, r, seconds, err = rewrite(as_stored[dt], layers, probes_x, out, dtype=dt,
                                             compression=comp, level=level, shuffle=shuffle,
                                             bits=bits, handover=(handover or [None])[0],
                                             reference=arrays)
            times.append(seconds)
        seconds = statistics.median(times)
        mark = "  <- default" if (label, dt) == DEFAULT else ""
        print(f"{label:46s} {dt:8s} {s / r:6.3f} {os.path.getsize(out) / r:6.3f} "
              f"{s / take / 1024:9.1f} {1e3 * seconds / take:17.2f} {err:12.2e}{mark}")
        os.unlink(out)
    print(f"# done, {_common.load_average()}")
    return 0 if np.isfinite(ratio) else 1


def main(argv=None) -> int:
    return run(_parse(argv))


if __name__ == "__main__":
    sys.exit(main())
