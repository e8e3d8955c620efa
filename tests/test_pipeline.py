"""End to end: the five stage scripts as a user runs them (subprocesses) on a tiny generated
dataset, resume after a kill, torchrun, and one-line errors for bad input."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation import do_python_eval
from network import resnet38_sb
from tool import provenance
from tool.fileio import load_img_name_list, load_label_png, load_scores, output_files
from voc12.classes import load_classes

ROOT = Path(__file__).resolve().parents[1]
WIDTH = ["--backbone_width", "0.125"]
TINY_TRAIN = [*WIDTH, "--train_bn", "--crop_size", "64", "--batch_size", "4", "--num_workers", "0",
              "--max_epoches", "1", "--log_every", "1", "--lr", "0.02"]


def run_script(script: str, *args, check: bool = True, timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *(["-m", script] if not script.endswith(".py") else [str(ROOT / script)]),
           *map(str, args)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def common_args(root: Path) -> list:
    return ["--voc12_root", root, "--dataset_classes", root / "classes.txt"]


@pytest.fixture(scope="session")
def stages(tiny_voc: Path, tmp_path_factory) -> Path:
    """Every stage once, in the README's order."""
    work = tmp_path_factory.mktemp("stages")
    data, train = common_args(tiny_voc), tiny_voc / "train.txt"
    sb_train = [*data, *TINY_TRAIN, "--train_list", train, "--resize_long", "56", "80", "--tblog_dir", work / "tb"]
    run_script("train_SB.py", *sb_train, "--session_name", work / "r1", "--boundary_weight", "0",
               "--smooth_weight", "0")
    run_script("infer_SB.py", *data, *WIDTH, "--num_workers", "0", "--crf_workers", "1", "--weights",
               work / "r1.pth", "--infer_list", train, "--out_crf", work / "r1crf")
    run_script("voc12.sb_map", *data, "--list", train, "--crf_dir", work / "r1crf_4.0", "--out_dir", work / "sb_map")
    run_script("train_SB.py", *sb_train, "--session_name", work / "sb", "--sb_map_dir", work / "sb_map")
    run_script("infer_SB.py", *data, *WIDTH, "--num_workers", "0", "--crf_workers", "1", "--weights",
               work / "sb.pth", "--infer_list", train, "--out_cam", work / "cam", "--out_crf", work / "crf",
               "--out_cam_pred", work / "cam_pred")
    run_script("train_aff.py", *data, *TINY_TRAIN, "--train_list", train, "--session_name", work / "aff",
               "--la_crf_dir", work / "crf_4.0", "--ha_crf_dir", work / "crf_24.0", "--tblog_dir", work / "tb_aff")
    run_script("infer_aff.py", *data, *WIDTH, "--num_workers", "0", "--weights", work / "aff.pth",
               "--infer_list", train, "--cam_dir", work / "cam", "--out_rw", work / "rw")
    return work


def evaluate(root: Path, work: Path, predict: str, kind: str, *extra) -> subprocess.CompletedProcess:
    return run_script("evaluation.py", "--list", root / "train.txt", "--gt_dir", root / "SegmentationClass",
                      "--predict_dir", work / predict, "--type", kind, "--comment", predict, "--logfile",
                      work / "evallog.txt", "--dataset_classes", root / "classes.txt", *extra)


def test_every_stage_writes_its_outputs(stages: Path, tiny_voc: Path):
    names = load_img_name_list(tiny_voc / "train.txt")
    labels = np.load(tiny_voc / "cls_labels.npz")
    label_of = dict(zip(labels["names"].tolist(), labels["labels"], strict=True))
    for name in names:
        cam_labels, cams = load_scores(stages / "cam" / f"{name}.npz")
        np.testing.assert_array_equal(cam_labels, np.nonzero(label_of[name])[0] + 1)
        assert np.isfinite(cams).all() and cams.max() <= 1 + 1e-4  # the released norm can go below 0
        for alpha in ("4.0", "24.0"):
            crf_labels, crf = load_scores(stages / f"crf_{alpha}" / f"{name}.npz")
            np.testing.assert_array_equal(crf_labels, np.concatenate([[0], cam_labels]))
            np.testing.assert_allclose(crf.sum(0), 1, atol=1e-3)
        gt = load_label_png(tiny_voc / "SegmentationClass" / f"{name}.png")
        for folder in ("rw", "cam_pred"):
            pred = load_label_png(stages / folder / f"{name}.png")
            assert pred.shape == gt.shape
            assert set(np.unique(pred)) <= {0, *cam_labels.tolist()}
    for session in ("r1", "sb", "aff"):
        assert (stages / f"{session}.pth").is_file() and (stages / f"{session}.ckpt").is_file()
        assert "step 1/" in (stages / f"{session}.log").read_text()
    assert list((stages / "tb").glob("events.out.tfevents.*"))


def test_round1_leaves_the_boundary_branch_untrained(stages: Path, tiny_voc: Path):
    """The SEAM baseline (no boundary loss) neither runs nor trains the boundary branch: its
    weights leave round 1 as initialised; the SB step trains them."""
    torch.manual_seed(100000)  # train_SB.py's default seed, set before it builds the network
    init = resnet38_sb.Net(num_classes=load_classes(tiny_voc / "classes.txt").num_classes, width=0.125).state_dict()
    round1 = torch.load(stages / "r1.pth", weights_only=True)
    sb = torch.load(stages / "sb.pth", weights_only=True)
    branch = [k for k in init if k.startswith(("edge_layer.", "fuse_canny_edge."))]
    assert len(branch) > 10
    for key in branch:
        torch.testing.assert_close(round1[key], init[key], rtol=0, atol=0)
    assert not any(torch.equal(sb[key], round1[key]) for key in branch if key.endswith("weight"))
    assert not torch.equal(round1["fc8.weight"], init["fc8.weight"])


def test_outputs_evaluate(stages: Path, tiny_voc: Path):
    names = load_img_name_list(tiny_voc / "train.txt")
    num_classes = load_classes(tiny_voc / "classes.txt").num_classes
    for predict, kind in (("cam", "npz"), ("crf_4.0", "npz"), ("rw", "png"), ("cam_pred", "png")):
        result = evaluate(tiny_voc, stages, predict, kind, *(["--t", "0.26"] if predict == "cam" else []))
        assert "mIoU" in result.stdout
        miou = do_python_eval(stages / predict, tiny_voc / "SegmentationClass", names, num_cls=num_classes,
                              input_type=kind, threshold=0.26)["mIoU"]
        assert 0 <= miou <= 100
    curve = evaluate(tiny_voc, stages, "cam", "npz", "--curve", "True")
    assert curve.returncode == 0
    assert len((stages / "evallog.txt").read_text().splitlines()) >= 5


def test_train_resumes_after_sigkill_to_identical_weights(tiny_voc: Path, tmp_path: Path):
    args = [*common_args(tiny_voc), *TINY_TRAIN, "--max_epoches", "2", "--train_list", tiny_voc / "train.txt",
            "--resize_long", "56", "80", "--boundary_weight", "0", "--smooth_weight", "0",
            "--tblog_dir", tmp_path / "tb"]
    run_script("train_SB.py", *args, "--session_name", tmp_path / "whole")
    cmd = [sys.executable, str(ROOT / "train_SB.py"), *map(str, args), "--session_name", str(tmp_path / "killed")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # 3 steps an epoch: step 5 is in the middle of the second epoch
        if "step 5/" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed.pth").exists()
    assert torch.load(tmp_path / "killed.ckpt", weights_only=True)["epoch"] == 1
    run_script("train_SB.py", *args, "--session_name", tmp_path / "killed", "--resume")
    whole = torch.load(tmp_path / "whole.pth", weights_only=True)
    resumed = torch.load(tmp_path / "killed.pth", weights_only=True)
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key


def test_infer_resumes_after_sigkill_with_each_output_once(stages: Path, tiny_voc: Path, tmp_path: Path):
    args = [*common_args(tiny_voc), *WIDTH, "--num_workers", "0", "--crf_workers", "1", "--weights",
            stages / "sb.pth", "--infer_list", tiny_voc / "train.txt"]
    cmd = [sys.executable, str(ROOT / "infer_SB.py"), *map(str, args), "--out_cam", str(tmp_path / "cam")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(output_files(tmp_path / "cam", ".npz")) < 3 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    partial = [p.name for p in output_files(tmp_path / "cam", ".npz")]
    names = load_img_name_list(tiny_voc / "train.txt")
    assert 3 <= len(partial) < len(names)
    result = run_script("infer_SB.py", *args, "--out_cam", tmp_path / "cam")
    assert f"{len(names) - len(partial)} of {len(names)} images to infer" in result.stdout
    for name in names:
        ours = load_scores(tmp_path / "cam" / f"{name}.npz")
        reference = load_scores(stages / "cam" / f"{name}.npz")
        np.testing.assert_array_equal(ours[0], reference[0])
        np.testing.assert_allclose(ours[1], reference[1], atol=1e-6)
    assert [p.name for p in output_files(tmp_path / "cam", ".npz")] == sorted(f"{n}.npz" for n in names)


def torchrun(script: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return run_script("torch.distributed.run", "--standalone", "--nproc_per_node", "2", ROOT / script,
                      *args, env=env)


@pytest.mark.parametrize("script", ["train_SB.py", "round1", "train_aff.py"])
def test_torchrun_two_ranks_end_with_identical_weights(script: str, stages: Path, tiny_voc: Path, tmp_path: Path):
    args = [*common_args(tiny_voc), *TINY_TRAIN, "--train_list", tiny_voc / "train.txt",
            "--session_name", tmp_path / "ddp", "--tblog_dir", tmp_path / "tb"]
    if script == "round1":  # the SEAM baseline: the boundary branch frozen, no unused parameters
        script, args = "train_SB.py", [*args, "--boundary_weight", "0", "--smooth_weight", "0"]
    elif script == "train_SB.py":
        args += ["--sb_map_dir", stages / "sb_map"]
    else:
        args += ["--la_crf_dir", stages / "crf_4.0", "--ha_crf_dir", stages / "crf_24.0"]
    result = torchrun(script, *args)
    assert "weights identical on all 2 ranks" in result.stdout + result.stderr
    assert (tmp_path / "ddp.pth").is_file()


def test_distributed_inference_writes_each_output_once(stages: Path, tiny_voc: Path, tmp_path: Path):
    result = torchrun("infer_aff.py", *common_args(tiny_voc), *WIDTH, "--num_workers", "0", "--weights",
                      stages / "aff.pth", "--infer_list", tiny_voc / "train.txt", "--cam_dir", stages / "cam",
                      "--out_rw", tmp_path / "rw")
    names = load_img_name_list(tiny_voc / "train.txt")
    assert [p.stem for p in output_files(tmp_path / "rw", ".png")] == sorted(names)
    for name in names:
        np.testing.assert_array_equal(load_label_png(tmp_path / "rw" / f"{name}.png"),
                                      load_label_png(stages / "rw" / f"{name}.png"))
    assert result.returncode == 0


def test_outputs_of_other_weights_are_refused_then_redone_with_overwrite(stages: Path, tiny_voc: Path,
                                                                          tmp_path: Path):
    cam, rw = tmp_path / "cam", tmp_path / "rw"
    shutil.copytree(stages / "cam", cam)
    shutil.copytree(stages / "rw", rw)
    args = [*common_args(tiny_voc), *WIDTH, "--num_workers", "0", "--weights", stages / "r1.pth",
            "--infer_list", tiny_voc / "train.txt", "--out_cam", cam]
    refused = run_script("infer_SB.py", *args, check=False)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "other weights_sha256" in refused.stderr and "--overwrite" in refused.stderr
    names = load_img_name_list(tiny_voc / "train.txt")
    assert all(np.array_equal(load_scores(cam / f"{n}.npz")[1], load_scores(stages / "cam" / f"{n}.npz")[1])
               for n in names)  # refused: nothing touched

    copied = {n: (cam / f"{n}.npz").stat().st_mtime_ns for n in names}
    redone = run_script("infer_SB.py", *args, "--overwrite")
    assert f"{len(names)} of {len(names)} images to infer" in redone.stdout
    record = provenance.read_record(cam)
    assert record["weights_sha256"] == hashlib.sha256((stages / "r1.pth").read_bytes()).hexdigest()
    assert all((cam / f"{n}.npz").stat().st_mtime_ns > copied[n] for n in names)
    assert not all(np.array_equal(load_scores(cam / f"{n}.npz")[1], load_scores(stages / "cam" / f"{n}.npz")[1])
                   for n in names)

    # The random walk of the old CAMs is stale now that the CAM folder changed.
    walk = run_script("infer_aff.py", *common_args(tiny_voc), *WIDTH, "--num_workers", "0", "--weights",
                      stages / "aff.pth", "--infer_list", tiny_voc / "train.txt", "--cam_dir", cam, "--out_rw", rw,
                      check=False)
    assert walk.returncode == 2 and "other cam_dir, cam_provenance" in walk.stderr, walk.stderr
