"""The six commands of the released SBNet README (github.com/Carlisle-Liu/SBNet), typed as written,
with only small-run flags added, on generated data in the VOC layout.

The run sits in a folder laid out as the released README assumes: ``VOC2012/`` (with the boundary
maps in ``VOC2012/sb_map``, the default of ``train_SB.py``) and the lists and labels in ``voc12/``,
which for VOC 2012 ship with the repository and here are written by ``voc12.make_lists`` in the
same formats (the generated images have their own names).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from network import resnet38_sb
from tool.fileio import load_img_name_list, load_scores
from voc12 import make_lists, sb_map

ROOT = Path(__file__).resolve().parents[1]
SMALL_TRAIN = ["--backbone_width", "0.125", "--max_epoches", "1", "--batch_size", "2", "--num_workers", "0",
               "--crop_size", "64"]
SMALL_INFER = ["--backbone_width", "0.125", "--num_workers", "0"]

# The released README's six commands, $variables filled in, each with the small-run flags it takes.
COMMANDS = [
    "python train_SB.py --voc12_root VOC2012 --weights pretrained.pth --session_name sb",
    "python infer_SB.py --weights sb.pth --infer_list voc12/train_aug.txt --out_cam cam --out_crf crf",
    "python evaluation.py --list VOC2012/ImageSets/Segmentation/train.txt --predict_dir cam"
    " --gt_dir VOC2012/SegmentationClass --comment sb_cam --type npy --curve True",
    "python train_aff.py --weights pretrained.pth --voc12_root VOC2012 --la_crf_dir crf_4.0 --ha_crf_dir crf_24.0"
    " --session_name aff",
    "python infer_aff.py --weights aff.pth --infer_list voc12/train.txt --cam_dir cam --voc12_root VOC2012"
    " --out_rw rw",
    "python evaluation.py --list VOC2012/ImageSets/Segmentation/train.txt --predict_dir rw"
    " --gt_dir VOC2012/SegmentationClass --comment rw --type png",
]
SMALL_FLAGS = [SMALL_TRAIN + ["--resize_long", "56", "80"], SMALL_INFER, [], SMALL_TRAIN, SMALL_INFER, []]


@pytest.fixture
def workdir(tiny_voc: Path, tmp_path: Path) -> Path:
    voc = Path(shutil.copytree(tiny_voc, tmp_path / "VOC2012"))
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    sbd.mkdir(parents=True)
    split = voc / "ImageSets" / "Segmentation" / "train.txt"
    train = split.read_text().split()[:4]  # a small train split keeps the six runs short
    split.write_text("".join(n + "\n" for n in train))
    (sbd / "train.txt").write_text("".join(n + "\n" for n in train[:-1]))
    (sbd / "val.txt").write_text("".join(n + "\n" for n in train[-1:]))
    make_lists.run(make_lists.parse_args(["--voc12_root", str(voc), "--sbd_root", str(sbd.parent),
                                          "--out_dir", str(tmp_path / "voc12")]))
    sb_map.run(sb_map.parse_args(["--voc12_root", str(voc), "--list", str(tmp_path / "voc12" / "train_aug.txt"),
                                  "--label_dir", str(voc / "SegmentationClass"), "--num_workers", "1"]))
    torch.save(resnet38_sb.Net(num_classes=21, width=0.125).state_dict(), tmp_path / "pretrained.pth")
    return tmp_path


def test_the_released_readme_commands_as_written(workdir):
    for command, small in zip(COMMANDS, SMALL_FLAGS, strict=True):
        words = command.split()
        assert words[0] == "python"
        argv = [sys.executable, str(ROOT / words[1]), *words[2:], *small]
        start = time.monotonic()
        result = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, timeout=300)
        print(f"{time.monotonic() - start:.1f} s: {command}")
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        if "--curve True" in command:
            assert "best background score" in result.stdout
        if "--type png" in command:
            assert "mIoU" in result.stdout
    names = load_img_name_list(workdir / "voc12" / "train_aug.txt")
    assert sorted(names) == sorted(load_img_name_list(workdir / "VOC2012" / "ImageSets" / "Segmentation" / "train.txt"))
    for name in names:
        labels, scores = load_scores(workdir / "crf_4.0" / f"{name}.npz")
        assert labels[0] == 0 and np.allclose(scores.sum(axis=0), 1, atol=1e-3)
        assert (workdir / "rw" / f"{name}.png").is_file()
    assert (workdir / "sb.pth").is_file() and (workdir / "aff.pth").is_file()
    log = (workdir / "evallog.txt").read_text()
    assert "sb_cam" in log and "rw" in log
