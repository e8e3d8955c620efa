"""Worker processes of issue 21, with real processes: every pool and every DataLoader worker dies
with its parent (a real SIGKILL, then the process table), and a corrupt image met by busy
DataLoader workers ends in the one error line, without the workers' shutdown noise."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from coco14.synthetic import make_synthetic_coco
from network import resnet38_sb
from tests.test_faults import TRAIN, alive, all_gone, one_line
from voc12.classes import load_classes

ROOT = Path(__file__).resolve().parents[1]
SLOW_RUN = ROOT / "tests" / "helpers" / "slow_run.py"
QUIET_TORCH = "ignore::UserWarning:torch.utils.data.dataloader"  # "more workers than this machine's cores"
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")


@pytest.fixture
def voc(tiny_voc: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny dataset that a test may break."""
    return Path(shutil.copytree(tiny_voc, tmp_path / "VOC"))


def children(pid: int) -> set[int]:
    """The processes whose parent is ``pid``, from /proc."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.add(int(stat.parent.name))
    return found


def sb_weights(voc: Path, path: Path) -> Path:
    torch.save(resnet38_sb.Net(num_classes=load_classes(voc / "classes.txt").num_classes, width=0.125).state_dict(),
               path)
    return path


def stage(name: str, voc: Path, tmp_path: Path) -> tuple[str, list]:
    """The ``tool.fileio`` function that only the stage's workers call, and the stage's command."""
    data = ["--voc12_root", voc, "--dataset_classes", voc / "classes.txt"]
    if name == "train_SB":
        return "read_image", [name, *data, "--train_list", voc / "train.txt", "--session_name", tmp_path / "run",
                              "--tblog_dir", tmp_path / "tb", *TRAIN]
    if name == "infer_SB":
        return "read_image", [name, *data, "--label_file", voc / "cls_labels.npz", "--infer_list", voc / "train.txt",
                              "--backbone_width", "0.125", "--weights", sb_weights(voc, tmp_path / "sb.pth"),
                              "--out_cam", tmp_path / "cam", "--device", "cpu"]
    if name == "evaluation":
        gt = voc / "SegmentationClass"
        return "load_label_png", [name, "--list", voc / "val.txt", "--predict_dir", gt, "--gt_dir", gt,
                                  "--comment", "x", "--logfile", tmp_path / "log.txt"]
    if name == "voc12.sb_map":
        return "load_label_png", [name, *data, "--list", voc / "train.txt", "--label_dir", voc / "SegmentationClass",
                                  "--out_dir", tmp_path / "sb_map"]
    assert name == "coco14.prepare"
    coco = make_synthetic_coco(tmp_path / "COCO")
    return "save_label_png", [name, "--coco_root", coco, "--out_root", tmp_path / "COCO14"]


@linux_only
@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", ["train_SB", "infer_SB", "evaluation", "voc12.sb_map", "coco14.prepare"])
def test_workers_die_with_their_parent(voc, tmp_path, name):
    """Two workers busy (their file function sleeps a minute): a SIGKILL of the parent takes them
    along at once (they used to run on, orphaned, and pool workers then sleep on their pipe for good)."""
    function, command = stage(name, voc, tmp_path)
    with open(tmp_path / "stderr.txt", "w") as err:
        parent = subprocess.Popen([sys.executable, str(SLOW_RUN), function, "60", *map(str, command),
                                   "--num_workers", "2"], stdout=subprocess.DEVNULL, stderr=err)
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 90
        while len(workers) < 2 and parent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            workers = children(parent.pid)
        assert len(workers) >= 2, (tmp_path / "stderr.txt").read_text()[-3000:]
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        assert all_gone(workers, 10)
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", ["train_SB", "infer_SB"])
def test_corrupt_image_with_busy_workers_is_one_line(voc, tmp_path, name):
    """Eight DataLoader workers, each image taking a second to read, one image corrupt: stderr
    holds the one error line. The workers used to be killed while the failed loop's iterator still
    waited for the garbage collector, which then finalised its queues under their feeder threads:
    up to 40 lines of OSError / ValueError tracebacks after the error."""
    bad = voc / "JPEGImages" / "train_00002.jpg"
    bad.write_bytes(bad.read_bytes()[:300])
    function, command = stage(name, voc, tmp_path)
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-W", QUIET_TORCH, str(SLOW_RUN), function, "1", *map(str, command),
                             "--num_workers", "8"], capture_output=True, text=True, timeout=150)
    assert result.returncode == 2, result.stderr[-3000:]
    assert one_line(result).startswith(f"error: {bad} does not decode")
    assert "Traceback" not in result.stderr
    assert time.monotonic() - start < 60
