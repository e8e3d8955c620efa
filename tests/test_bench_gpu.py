"""bench/gpu.sh and bench/bench_gpu.py on a CPU: the skip line, and the benchmark's code path at
tiny sizes with the markdown it writes."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip of a machine without a GPU")
def test_gpu_sh_skips_in_one_line_without_a_gpu():
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and "no CUDA GPU" in result.stdout and "skipped" in result.stdout


def test_bench_gpu_writes_its_table_on_cpu(tmp_path: Path):
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_gpu

    out = tmp_path / "GPU.md"
    # DeepLab-v1 on the narrow ResNet-38: the full ResNet-101 takes a minute a mode on a CPU.
    bench_gpu.main(["--device", "cpu", "--width", "0.125", "--seg_backbone", "resnet38", "--batch", "1", "--crop",
                    "48", "--infer_size", "24", "32", "--steps", "1", "--warmup", "0", "--images", "1", "--out",
                    str(out)])
    text = out.read_text()
    assert text.startswith("# GPU benchmark\n\nDevice: CPU: ") and "Date: " in text
    modes = ("fp32", "AMP (= fp32 off CUDA)", "AMP + channels_last (= fp32 off CUDA)")
    stages = {"SB step (two views)": "1", "AffinityNet": "1", "DeepLab-v1 ResNet-38": "1 x 2"}
    train = re.findall(r"^\| ([^|]+) \| ([\dx ]+) \| 48 \| ([^|]+) \| ([\d.]+) \| n/a \(CPU\) \|", text, re.M)
    assert [(stage, batch, mode.strip()) for stage, batch, mode, _ in train] == [
        (stage, batch, mode) for stage, batch in stages.items() for mode in modes]
    assert all(float(rate) > 0 for *_, rate in train)
    infer = re.findall(r"^\| (released|ours)[^|]*\| ([\d.]+) \| ([\d.]+)x \| ([\d.e+-]+) \| (\d+) \|", text,
                       re.M)
    assert [m for m, *_ in infer] == ["released", "ours", "ours", "ours"]
    # The released per-view loop, re-implemented in the bench, and ours compute the same CAM; each
    # of the image's two classes has its minimum on the floor.
    assert all(float(diff) < 1e-5 and int(floor) >= 2 for *_, diff, floor in infer)
    assert "## DeepLab-v1 ResNet-38 inference (infer_seg.py, one 24x32 image" in text
    seg = re.findall(r"^\| (fp32|AMP[^|]*) \| ([\d.]+) \| ([\d.]+)x \| ([\d.e+-]+) \|", text, re.M)
    assert [m.strip() for m, *_ in seg] == list(modes) and all(float(r) > 0 for _, r, *_ in seg)
    # Off CUDA every mode is float32 and contiguous: the same probabilities.
    assert all(float(diff) == 0 for *_, diff in seg)


def test_off_floor_difference_leaves_out_a_moved_minimum():
    """Rounding that moves a class's minimum pixel moves it by the whole released floor; the bench's
    CAM difference is taken off the floor, and counts the pixels it left out."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_gpu

    released = np.array([[[-4.0, 0.5, 1.0], [0.2, 0.3, 0.7]]])
    moved = np.array([[[0.0, 0.5, 1.001], [0.2, -4.0, 0.7]]])  # the minimum moved; one other pixel off by 1e-3
    assert bench_gpu.off_floor_difference(moved, released) == (pytest.approx(0.001), 2)
    assert bench_gpu.off_floor_difference(released, released) == (0.0, 1)


def test_memory_estimate_extrapolates_a_measured_forward():
    """Saved tensors measured at 16 and 32 px a side, extrapolated to 96 px and a batch of 2, against
    the saved tensors of a real 96 px forward (times 2)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_gpu

    stage = bench_gpu.STAGES[0]
    estimate = bench_gpu.estimate_memory(stage, 0.125, batch=2, crop=96, probe=16)
    net = stage.make(0.125, 1, 16, torch.device("cpu"))[0]
    trained = sum(p.numel() for group in net.get_parameter_groups() for p in group)
    assert estimate["weights_bytes"] == 4 * (estimate["params"] + 2 * trained)
    measured = sum(bench_gpu.saved_tensor_bytes(stage, 0.125, 96))
    assert estimate["activation_bytes"] == pytest.approx(2 * measured, rel=0.1)
