"""bench/demo_seeds.py on two tiny seeds: the pipeline per seed, resumable, and its statistics
against numpy's on the seeds' own results."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--demo_scale", "0.05", "--demo_image_size", "64", "--demo_classes", "3", "--seg_iters", "2"]


def run_seeds(out: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "demo_seeds.py"), "--seeds", "0", "1", "--out_dir",
                             str(out), "--", *TINY], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_two_seeds_summarised_and_not_redone(tmp_path):
    out = tmp_path / "seeds"
    first = run_seeds(out)
    per_seed = [json.loads((out / f"seed{s}" / "results.json").read_text()) for s in (0, 1)]
    assert per_seed[0]["rw"] != per_seed[1]["rw"]  # the seed changes the data and the training
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1]
    for key in ("round1_cam", "cam", "rw", "seg_crf"):
        for title, values in (("mIoU val", [r[key]["val"] for r in per_seed]),
                              ("bIoU val", [r["metrics"][key]["val"]["biou"]["mean"] for r in per_seed])):
            cell = summary["rows"][key][title]
            assert cell["values"] == values
            np.testing.assert_allclose([cell["mean"], cell["std"]], [np.mean(values), np.std(values, ddof=1)])
    diff = np.array([r["rw"]["val"] - r["cam"]["val"] for r in per_seed])
    gain = summary["gains"]["rw - cam"]["val"]
    np.testing.assert_allclose([gain["mean"], gain["std"]], [diff.mean(), diff.std(ddof=1)])
    half = stats.t.ppf(0.975, 1) * diff.std(ddof=1) / np.sqrt(2)
    np.testing.assert_allclose(gain["ci95"], [diff.mean() - half, diff.mean() + half])
    assert gain["within_noise"] == bool(abs(diff.mean()) <= half)
    lowest = summary["lowest_class_iou"]
    assert lowest["iou"] == min(r["metrics"][k][split][c] for r in per_seed for k in r["metrics"]
                                for split in ("train", "val") for c in ("background", *lowest_names(out)))
    assert summary["seconds"] == {str(seed): r["seconds"] for seed, r in enumerate(per_seed)}
    assert "± " in first.stdout and "SB CAM over SEAM baseline CAM (round 1)" in first.stdout

    again = run_seeds(out)  # finished seeds: every stage up to date, nothing trained or inferred again
    assert again.stdout.count("up to date") == 2 * len(run_pipeline.STAGES)
    assert "\n$ python train_SB.py" not in again.stdout
    assert (out / "summary.md").read_text() in again.stdout


def lowest_names(out: Path) -> list[str]:
    lines = (out / "seed0" / "data" / "classes.txt").read_text().splitlines()
    return [line for line in lines if line and not line.startswith("#")]


def test_one_seed_has_no_spread():
    sys.path.insert(0, str(ROOT / "bench"))
    import demo_seeds

    one, two = demo_seeds.mean_std([57.25]), demo_seeds.mean_std([57.25, 59.25])
    assert one["std"] is None and demo_seeds.spread(one) == "57.2" and demo_seeds.spread(one, "+") == "+57.2"
    assert two["std"] == pytest.approx(np.std([57.25, 59.25], ddof=1))
    assert demo_seeds.spread(two) == f"58.2 ± {np.std([57.25, 59.25], ddof=1):.1f}"
    assert "ci95" not in demo_seeds.paired_gain([1.0], [0.5])
