"""Benchmark: ``layerwatch.render`` against a straightforward matplotlib renderer.

Run it (not a test)::

    python bench/render.py                   # synthesizes a seed-like recording
    python bench/render.py runs/mnist.h5     # or renders a real one

The seed-like recording has the layers of ``shared/seed-experiment.md``
(28x28x4, 28x28x4, 14x14x8, 14x14x8, 7x7x16, 7x7x16), ten digit probes, five
epochs of 59 steps (296 snapshots) and tanh activations that settle slowly,
deeper layers later, with a little step-to-step jitter like SGD's.

The baseline is what one writes first: one matplotlib figure per layer
(an ``imshow`` per cell, nearest interpolation, RdBu), reused for every
frame with ``set_data``, the canvas read back as an array, and the frames
written with ``imageio``. Prints both times, the ratio, and GIF sizes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from layerwatch.rendering import render  # noqa: E402
from layerwatch.store import LayerSpec, RunWriter, open_run  # noqa: E402

SEED_LAYERS = [("conv1", 28, 4), ("conv2", 28, 4), ("conv3", 14, 8), ("conv4", 14, 8),
               ("conv5", 7, 16), ("conv6", 7, 16)]


def digit_probes() -> np.ndarray:
    """Ten 28x28 images of the digits 0-9, drawn with Pillow's bitmap font."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default_imagefont()
    out = np.zeros((10, 28, 28, 1), dtype=np.float32)
    for d in range(10):
        image = Image.new("L", (8, 12))
        ImageDraw.Draw(image).text((1, 0), str(d), font=font, fill=255)
        big = np.kron(np.asarray(image, dtype=np.float32) / 255, np.ones((2, 2)))
        out[d, 2:26, 6:22, 0] = big
    return out


def _pool(x: np.ndarray, factor: int) -> np.ndarray:
    p, h, w, c = x.shape
    return x.reshape(p, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def _features(x: np.ndarray, size: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    """Random 3x3 'conv' features of the input at a resolution: (P, size, size, channels)."""
    p = x.shape[0]
    img = x[..., 0]
    padded = np.pad(img, ((0, 0), (1, 1), (1, 1)))
    shifts = np.stack([padded[:, dy:dy + 28, dx:dx + 28] for dy in range(3) for dx in range(3)],
                      axis=-1)  # (P, 28, 28, 9)
    kernels = rng.normal(size=(9, channels))
    f = shifts @ kernels + rng.normal(scale=0.3, size=channels)
    f = _pool(f, 28 // size)
    f /= f.std() + 1e-6
    return f.reshape(p, size, size, channels)


def synthesize(path: str, *, steps_per_epoch: int = 59, epochs: int = 5, seed: int = 0) -> None:
    """Write a seed-like recording with :class:`RunWriter`."""
    rng = np.random.default_rng(seed)
    probes = digit_probes()
    specs, final, start, tau = [], [], [], []
    for depth, (name, size, channels) in enumerate(SEED_LAYERS):
        specs.append(LayerSpec(name, (size, size, channels), attrs={
            "layer_name": name, "layer_class": "Conv2D", "activation": "tanh",
            "tensor": name, "value_range": [-1.0, 1.0], "channel_axis": 2}))
        final.append(1.5 * _features(probes, size, channels, rng))
        start.append(0.3 * _features(probes, size, channels, rng))
        tau.append(15.0 * (1 + depth))  # deeper layers settle later
    writer = RunWriter.create(path, layers=specs, probes_x=probes, probes_y=np.arange(10),
                              metadata={"model_name": "seed-like (synthetic)"}, texts={})
    total = steps_per_epoch * epochs
    for step in range(total + 1):
        epoch = min(max(step - 1, 0) // steps_per_epoch, epochs - 1)
        arrays = []
        for f, g, t in zip(final, start, tau):
            w = 1.0 - np.exp(-step / t)
            jitter = (0.05 * np.exp(-step / 60.0) + 0.004) * rng.normal(size=f.shape)
            arrays.append(np.tanh(w * f + (1 - w) * g + jitter).astype(np.float32))
        writer.add_snapshot(step, epoch, arrays)
        if step:
            loss = 2.3 * np.exp(-step / 40.0) + 0.08 + 0.05 * rng.normal()
            acc = 0.98 - 0.88 * np.exp(-step / 35.0) + 0.01 * rng.normal()
            writer.add_batch_logs(step, {"loss": loss, "accuracy": acc,
                                         "learning_rate": 1e-3})
            if step % steps_per_epoch == 0:
                writer.add_epoch_logs(step // steps_per_epoch - 1, step, {
                    "loss": loss, "accuracy": acc, "val_loss": loss * 0.9,
                    "val_accuracy": min(acc + 0.01, 1.0)})
    writer.close()


def baseline(path: str, out_dir: str, *, max_frames: int | None = None) -> tuple[float, int]:
    """The straightforward matplotlib renderer. Returns (seconds, frames rendered)."""
    import imageio.v3 as iio
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    count = 0
    with open_run(path) as run:
        probes = run.probes_x()[..., 0]
        steps = run.steps
        n = run.num_snapshots if max_frames is None else min(max_frames, run.num_snapshots)
        for layer in run.layers:
            channels = layer.shape[-1]
            rows, cols = channels + 1, probes.shape[0]
            fig = Figure(figsize=(cols * 0.3, rows * 0.3 + 0.2), dpi=100)
            canvas = FigureCanvasAgg(fig)
            axes = fig.subplots(rows, cols, gridspec_kw={"wspace": 0.03, "hspace": 0.03})
            first = run.activations(layer.key, 0)
            images = []
            for p in range(cols):
                axes[0, p].imshow(probes[p], cmap="gray", interpolation="nearest")
                for c in range(channels):
                    images.append(axes[c + 1, p].imshow(
                        first[p, ..., c], cmap="RdBu", vmin=-1, vmax=1,
                        interpolation="nearest"))
            for ax in axes.ravel():
                ax.set_axis_off()
            label = fig.text(0.01, 0.995, "", ha="left", va="top", fontsize=7)
            frames = []
            for i, a in enumerate(run.iter_activations(layer.key, range(n))):
                k = 0
                for p in range(cols):
                    for c in range(channels):
                        images[k].set_data(a[p, ..., c])
                        k += 1
                label.set_text(f"step {steps[i]}")
                canvas.draw()
                frames.append(np.asarray(canvas.buffer_rgba())[..., :3].copy())
                count += 1
            iio.imwrite(os.path.join(out_dir, f"{layer.key}.gif"), np.stack(frames),
                        duration=100, loop=0)
    return time.perf_counter() - t0, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recording", nargs="?", help="a recording to render (default: synthesize)")
    parser.add_argument("--baseline-frames", type=int, default=None,
                        help="time the baseline on the first N snapshots per layer only and "
                             "scale its time to all frames (default: all)")
    parser.add_argument("--keep", help="write outputs here instead of a temporary directory")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or tmp
        os.makedirs(work, exist_ok=True)
        path = args.recording
        if path is None:
            path = os.path.join(work, "seed.h5")
            t = time.perf_counter()
            synthesize(path)
            print(f"synthesized {path} in {time.perf_counter() - t:.1f} s")
        with open_run(path) as run:
            n, layers = run.num_snapshots, len(run.layers)
        print(f"recording: {layers} layers x {n} snapshots")

        t, c = time.perf_counter(), time.process_time()
        written = render(path, os.path.join(work, "layerwatch"), notes=lambda s: print("  " + s))
        ours, ours_cpu = time.perf_counter() - t, time.process_time() - c
        gifs = [p for p in written if p.suffix == ".gif"]
        for p in written:
            print(f"  {p.name:<14} {p.stat().st_size / 1e6:7.3f} MB")
        largest = max(gifs, key=lambda p: p.stat().st_size)
        per100 = largest.stat().st_size / n * 100

        c = time.process_time()
        base, frames = baseline(path, os.path.join(work, "baseline"),
                                max_frames=args.baseline_frames)
        base_cpu = time.process_time() - c
        scale = (n * layers) / frames
        base_all, base_cpu_all = base * scale, base_cpu * scale
        note = "" if frames == n * layers else f" (timed {frames} frames, scaled to {n * layers})"
        print(f"load average       : {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
              "(CPU times are robust to other load; wall times are not)")
        print(f"layerwatch.render  : {ours:7.2f} s wall, {ours_cpu:7.2f} s CPU "
              f"for {n * layers} frames + stills + curves")
        print(f"matplotlib baseline: {base_all:7.2f} s wall, {base_cpu_all:7.2f} s CPU{note}")
        print(f"speed-up           : {base_all / ours:7.1f}x wall, "
              f"{base_cpu_all / ours_cpu:.1f}x CPU")
        print(f"largest GIF        : {largest.name}, {largest.stat().st_size / 1e6:.3f} MB "
              f"= {per100 / 1e6:.3f} MB per 100 frames")


if __name__ == "__main__":
    main()
