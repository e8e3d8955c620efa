"""Faults and bad inputs of issue 15, worst first: each ends in bounded time with one line naming
what is wrong (or is handled), never a hang, a traceback or a silent wrong result."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torch.nn.functional as F
from PIL import Image

import evaluation
import infer_SB
import train_SB
from network import resnet38_aff, resnet38_sb
from network.resnet38d import load_weights
from tool.cli import file_system_message
from tool.errors import InputError
from tool.fileio import load_img_name_list, load_sb_map, load_scores, output_files, read_image
from tool.losses import boundary_loss
from tool.trainloop import make_train_loader
from voc12 import sb_map
from voc12.classes import VOC, load_classes
from voc12.data import VOC12ClsDatasetMSF

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--backbone_width", "0.125", "--train_bn", "--crop_size", "32", "--batch_size", "2", "--max_epoches", "1",
         "--resize_long", "40", "48", "--boundary_weight", "0", "--smooth_weight", "0", "--log_every", "1"]


@pytest.fixture
def voc(tiny_voc: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny dataset that a test may break."""
    return Path(shutil.copytree(tiny_voc, tmp_path / "VOC"))


def one_line(result: subprocess.CompletedProcess | str) -> str:
    err = result if isinstance(result, str) else result.stderr
    lines = [line for line in err.strip().splitlines() if not line.startswith(("20", "warning:"))]  # log lines
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    return lines[0]


@pytest.mark.timeout(240)
def test_corrupt_image_with_worker_processes_ends_in_one_line(voc, tmp_path):
    """Real DataLoader workers (2): the run ends with one line naming the file instead of the worker's
    traceback and a hang at exit; --skip_bad_images trains past it with a warning."""
    names = load_img_name_list(voc / "train.txt")[:4]
    (tmp_path / "list.txt").write_text("".join(n + "\n" for n in names))
    bad = voc / "JPEGImages" / f"{names[1]}.jpg"
    bad.write_bytes(bad.read_bytes()[:300])
    argv = [sys.executable, str(ROOT / "train_SB.py"), "--voc12_root", voc, "--dataset_classes", voc / "classes.txt",
            "--train_list", tmp_path / "list.txt", "--label_file", voc / "cls_labels.npz", "--num_workers", "2",
            "--session_name", tmp_path / "run", "--tblog_dir", tmp_path / "tb", *TRAIN]
    start = time.monotonic()
    result = subprocess.run(list(map(str, argv)), capture_output=True, text=True, timeout=150)
    assert result.returncode == 2
    assert str(bad) in one_line(result) and "does not decode" in result.stderr
    assert "Traceback" not in result.stderr and time.monotonic() - start < 150
    assert not (tmp_path / "run.pth").exists()
    result = subprocess.run([*map(str, argv), "--skip_bad_images"], capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"warning: skipped, {bad} does not decode" in result.stderr
    assert (tmp_path / "run.pth").is_file()


def test_nan_stop_with_the_boundary_loss_on(voc, tmp_path, capsys, monkeypatch):
    """F.binary_cross_entropy raises on NaN: the boundary loss must hand the NaN to the finite check,
    and the message must not promise a checkpoint that does not exist."""
    edge = torch.tensor([[[[0.3, float("nan")], [-1.0, 2.0]]]], requires_grad=True)
    target, label = torch.rand(1, 1, 2, 2), torch.ones(1, 1, 1, 1)
    assert torch.isnan(boundary_loss(edge, target, label))
    finite = torch.randn(2, 3, 4, 5, requires_grad=True)
    target, label = torch.rand(2, 3, 4, 5), torch.ones(2, 3, 1, 1)
    ours = boundary_loss(finite, target, label)
    reference = F.binary_cross_entropy(torch.sigmoid(finite), target)
    assert ours.item() == reference.item()
    grad_ours, = torch.autograd.grad(ours, finite)
    grad_ref, = torch.autograd.grad(reference, finite)
    assert torch.equal(grad_ours, grad_ref)

    sb_map.run(sb_map.parse_args(["--voc12_root", str(voc), "--list", str(voc / "train.txt"), "--label_dir",
                                  str(voc / "SegmentationClass"), "--dataset_classes", str(voc / "classes.txt"),
                                  "--num_workers", "1"]))
    real_loss = train_SB.sb_step_loss

    def nan_edges(out1, *args, **kwargs):
        return real_loss(out1._replace(edge=out1.edge * float("nan")), *args, **kwargs)

    monkeypatch.setattr(train_SB, "sb_step_loss", nan_edges)
    argv = ["--voc12_root", voc, "--dataset_classes", voc / "classes.txt", "--train_list", voc / "train.txt",
            "--session_name", tmp_path / "run", "--tblog_dir", tmp_path / "tb", "--num_workers", "0", *TRAIN,
            "--boundary_weight", "0.01", "--smooth_weight", "1"]
    with pytest.raises(SystemExit) as exit_info:
        train_SB.main(list(map(str, argv)))
    assert exit_info.value.code == 1
    line = one_line(capsys.readouterr().err)
    assert "non-finite loss at step 0" in line and "loss_boundary=nan" in line
    assert "no checkpoint was written yet" in line and not (tmp_path / "run.ckpt").exists()


KILL_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from concurrent.futures import ProcessPoolExecutor
    sys.path.insert(0, sys.argv[1])
    from tool.workers import die_with_parent
    pool = ProcessPoolExecutor(2, initializer=die_with_parent, initargs=(os.getpid(),))
    pids = {pool.submit(os.getpid).result() for _ in range(4)}
    print(" ".join(map(str, sorted(pids))), flush=True)
    time.sleep(120)
""")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.is_file() and "State:\tZ" in status.read_text())


def all_gone(pids: list[int] | set[int], seconds: float) -> bool:
    """Whether every one of ``pids`` has exited within ``seconds``."""
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(alive(p) for p in pids)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_crf_workers_die_with_their_parent(tmp_path, signum):
    """infer_SB's CRF pool uses die_with_parent: a killed parent leaves no worker behind."""
    assert "initializer=die_with_parent" in (ROOT / "infer_SB.py").read_text()
    script = tmp_path / "pool.py"
    script.write_text(KILL_SCRIPT)
    parent = subprocess.Popen([sys.executable, str(script), str(ROOT)], stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(p) for p in parent.stdout.readline().split()]
        assert workers and all(alive(p) for p in workers)
        parent.send_signal(signum)
        parent.wait(timeout=30)
        assert all_gone(workers, 20)
    finally:
        if parent.poll() is None:
            parent.kill()


def test_file_system_errors_name_the_path(tmp_path, capsys):
    gt = tmp_path / "gt"
    gt.mkdir()
    (tmp_path / "list.txt").write_text("a\n")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(gt / "a.png")
    log_dir = tmp_path / "log_is_a_folder"
    log_dir.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        evaluation.main(["--list", str(tmp_path / "list.txt"), "--predict_dir", str(gt), "--gt_dir", str(gt),
                         "--comment", "x", "--logfile", str(log_dir), "--num_workers", "1"])
    assert exit_info.value.code == 1
    line = one_line(capsys.readouterr().err)
    assert line == f"error: {log_dir}: Is a directory"
    # A read-only folder (root ignores permissions, so the error itself is built here).
    error = PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/data/out_cam/x.npz")
    assert file_system_message(error) == "/data/out_cam/x.npz: Permission denied"
    error = OSError(errno.EXDEV, os.strerror(errno.EXDEV), "/a/.x.tmp", None, "/b/x")
    assert file_system_message(error) == "/a/.x.tmp -> /b/x: Invalid cross-device link"


def test_out_cam_naming_a_file_is_one_line(voc, tmp_path, capsys):
    weights = tmp_path / "sb.pth"
    num_classes = load_classes(voc / "classes.txt").num_classes
    torch.save(resnet38_sb.Net(num_classes=num_classes, width=0.125).state_dict(), weights)
    (tmp_path / "cam").write_text("a file, not a folder")
    (tmp_path / "one.txt").write_text(load_img_name_list(voc / "val.txt")[0] + "\n")
    with pytest.raises(SystemExit) as exit_info:
        infer_SB.main(["--voc12_root", str(voc), "--dataset_classes", str(voc / "classes.txt"), "--label_file",
                       str(voc / "cls_labels.npz"), "--backbone_width", "0.125", "--infer_list",
                       str(tmp_path / "one.txt"), "--num_workers", "0", "--weights", str(weights),
                       "--out_cam", str(tmp_path / "cam")])
    assert exit_info.value.code == 1
    assert one_line(capsys.readouterr().err).startswith(f"error: {tmp_path / 'cam'}")


def test_large_images_go_through_the_network_at_max_side(voc, tmp_path):
    name = load_img_name_list(voc / "val.txt")[0]
    big = np.asarray(Image.open(voc / "JPEGImages" / f"{name}.jpg").resize((300, 200)))
    Image.fromarray(big).save(voc / "JPEGImages" / f"{name}.jpg")
    (tmp_path / "one.txt").write_text(name + "\n")
    data = (tmp_path / "one.txt", voc, voc / "cls_labels.npz", load_classes(voc / "classes.txt"))
    item = VOC12ClsDatasetMSF(*data, scales=(0.5, 1.0), max_side=100)[0]
    assert item["size"] == (200, 300) and item["orig"].shape == (200, 300, 3)
    assert [tuple(v.shape[1:]) for v in item["img"]] == [(34, 50), (34, 50), (67, 100), (67, 100)]
    full = VOC12ClsDatasetMSF(*data, scales=(0.5, 1.0), max_side=0)[0]
    assert [tuple(v.shape[1:]) for v in full["img"]][::2] == [(100, 150), (200, 300)]
    assert infer_SB.get_arg_parser().parse_args(["--weights", "w"]).max_side == 1280
    weights = tmp_path / "sb.pth"
    torch.save(resnet38_sb.Net(num_classes=data[3].num_classes, width=0.125).state_dict(), weights)
    infer_SB.main(["--voc12_root", str(voc), "--label_file", str(voc / "cls_labels.npz"), "--backbone_width",
                   "0.125", "--infer_list", str(tmp_path / "one.txt"), "--num_workers", "0", "--weights",
                   str(weights), "--out_cam", str(tmp_path / "cam"), "--out_crf", str(tmp_path / "crf"),
                   "--max_side", "64", "--crf_workers", "1"])
    _, cams = load_scores(tmp_path / "cam" / f"{name}.npz")
    _, crf = load_scores(tmp_path / "crf_4.0" / f"{name}.npz")
    assert cams.shape[1:] == crf.shape[1:] == (200, 300)  # the outputs come back at full size


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    grey = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    path = tmp_path / "deep.png"
    Image.fromarray(grey).save(path)
    assert Image.open(path).mode.startswith("I")
    img = read_image(path)
    assert img.dtype == np.uint8 and img.shape == (8, 8, 3)
    np.testing.assert_array_equal(img[..., 0], (grey >> 8).astype(np.uint8))
    assert img.max() == 63000 >> 8  # not clipped at 255 to a white image
    Image.fromarray(np.ones((4, 4), np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(InputError, match="floating-point image"):
        read_image(tmp_path / "float.tif")


def test_training_list_shorter_than_the_batch(voc):
    from tool.distributed import DistInfo

    class Args:
        batch_size, num_workers, seed = 8, 0, 0

    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False)
    with pytest.raises(InputError, match="holds 3 images, fewer than --batch_size 8: no step would run"):
        make_train_loader(list(range(3)), Args, info)


def test_infer_sb_without_outputs(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        infer_SB.main(["--weights", str(tmp_path / "none.pth")])
    assert exit_info.value.code == 2
    assert one_line(capsys.readouterr().err) == ("error: nothing to write: pass --out_cam, --out_crf and/or"
                                                 " --out_cam_pred")


def test_sbd_upper_bound_with_images_sbd_lacks(tmp_path, capsys):
    from tests.test_sb_map import CAT, command, tiny_tree

    labels = tiny_tree(tmp_path)
    cls_dir = tmp_path / "benchmark_RELEASE" / "dataset" / "cls"
    cls_dir.mkdir(parents=True)
    name, label = labels[0]  # SBD has "a", lacks "b"
    boundaries = np.empty(VOC.num_fg, dtype=object)
    for k in range(VOC.num_fg):
        boundaries[k] = scipy.sparse.csc_matrix(np.zeros(label.shape, np.uint8))
    scipy.io.savemat(cls_dir / f"{name}.mat", {"GTcls": {"Boundaries": boundaries, "Segmentation": label}})
    args = command(tmp_path, "--sbd_upper_bound", str(tmp_path / "benchmark_RELEASE"), "--num_workers", "1")
    out = sb_map.run(sb_map.parse_args(args))
    assert capsys.readouterr().out.strip() == ("1 of 2 images are not in SBD (b): skipped, no map written"
                                               " (--fallback_crf_dir makes them from CRF files)")
    assert [p.name for p in output_files(out, ".npz")] == ["a.npz"]
    from tool.fileio import save_scores

    b_label = labels[1][1]
    present = np.unique(b_label[b_label != 255])
    save_scores(tmp_path / "crf" / "b.npz", present, np.stack([(b_label == c) * 1.0 for c in present]))
    sb_map.run(sb_map.parse_args([*args, "--fallback_crf_dir", str(tmp_path / "crf")]))
    assert "their maps come from the CRF files" in capsys.readouterr().out
    assert load_sb_map(out / "b.npz")[CAT].any()
    with pytest.raises(InputError, match="SBD file not found|not an SBD GTcls"):
        sb_map.sbd_boundaries(cls_dir / "missing.mat", VOC.num_classes)


def test_state_dict_of_another_network_type_gets_the_right_hint(tmp_path):
    torch.save(resnet38_aff.Net(width=0.125).state_dict(), tmp_path / "aff.pth")
    with pytest.raises(InputError, match=r"another network type \(SB / AffinityNet\)") as error:
        load_weights(resnet38_sb.Net(num_classes=21, width=0.125), tmp_path / "aff.pth", strict=True)
    assert "backbone_width" not in str(error.value)
    torch.save(resnet38_sb.Net(num_classes=21, width=0.25).state_dict(), tmp_path / "wide.pth")
    with pytest.raises(InputError, match=r"another --backbone_width\?"):
        load_weights(resnet38_sb.Net(num_classes=21, width=0.125), tmp_path / "wide.pth", strict=True)
