"""User mistakes end with one line on stderr and exit code 2, never a traceback; a diverging run
stops with the step named and its last good checkpoint intact; pickles are refused."""
from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import infer_aff
import infer_SB
import train_SB
from network import resnet38_aff, resnet38_sb
from tool.fileio import load_img_name_list, save_sb_map
from voc12.classes import load_classes

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--backbone_width", "0.125", "--train_bn", "--crop_size", "64", "--batch_size", "4", "--num_workers", "0",
         "--max_epoches", "1", "--resize_long", "56", "80", "--boundary_weight", "0", "--smooth_weight", "0"]


@pytest.fixture
def voc(tiny_voc: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny dataset that a test may break."""
    return Path(shutil.copytree(tiny_voc, tmp_path / "VOC"))


def train_argv(voc: Path, tmp_path: Path, *extra) -> list[str]:
    return [str(a) for a in ("--voc12_root", voc, "--dataset_classes", voc / "classes.txt", "--train_list",
                             voc / "train.txt", "--session_name", tmp_path / "run", "--tblog_dir", tmp_path / "tb",
                             *TRAIN, *extra)]


def one_line_error(capsys, main, argv: list[str], match: str, code: int = 2) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert match in err[0], err[0]
    return err[0]


def test_missing_root_list_and_image(voc, tmp_path, capsys):
    one_line_error(capsys, train_SB.main, train_argv(tmp_path / "nowhere", tmp_path), "not found")
    one_line_error(capsys, train_SB.main, train_argv(voc, tmp_path, "--train_list", tmp_path / "no.txt"),
                   "image list not found")
    (voc / "JPEGImages" / "train_00003.jpg").unlink()
    one_line_error(capsys, train_SB.main, train_argv(voc, tmp_path), "train_00003")


def test_image_that_does_not_decode(voc, tmp_path, capsys):
    (voc / "JPEGImages" / "train_00002.jpg").write_bytes(b"\xff\xd8 half a jpeg")
    one_line_error(capsys, train_SB.main, train_argv(voc, tmp_path, "--num_workers", "0"), "train_00002.jpg")


def test_label_file_missing_an_image(voc, tmp_path, capsys):
    with np.load(voc / "cls_labels.npz") as z:
        names, labels = z["names"], z["labels"]
    keep = names != "train_00005"
    np.savez(voc / "cls_labels.npz", names=names[keep], labels=labels[keep])
    one_line_error(capsys, train_SB.main, train_argv(voc, tmp_path), "train_00005")


def test_boundary_map_of_the_wrong_size(voc, tmp_path, capsys):
    sb_dir = tmp_path / "sb_map"
    num_classes = load_classes(voc / "classes.txt").num_classes
    for name in load_img_name_list(voc / "train.txt"):
        save_sb_map(sb_dir / f"{name}.npz", np.zeros((num_classes, 10, 12), np.float32))
    argv = train_argv(voc, tmp_path, "--boundary_weight", "0.01", "--sb_map_dir", sb_dir)
    one_line_error(capsys, train_SB.main, argv, "10")


def test_weights_of_the_wrong_kind(voc, tmp_path, capsys):
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights")
    infer = ["--voc12_root", str(voc), "--dataset_classes", str(voc / "classes.txt"), "--backbone_width", "0.125",
             "--infer_list", str(voc / "val.txt"), "--out_cam", str(tmp_path / "cam"), "--num_workers", "0"]
    one_line_error(capsys, infer_SB.main, [*infer, "--weights", str(text)], "notes.pth")
    aff = tmp_path / "aff.pth"
    torch.save(resnet38_aff.Net(width=0.125).state_dict(), aff)
    one_line_error(capsys, infer_SB.main, [*infer, "--weights", str(aff)], "aff.pth")


class Exploit:
    """Unpickling this would create a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_crafted_pickles_are_refused(voc, tmp_path, capsys):
    marker = tmp_path / "pwned"
    torch.save({"model": Exploit(marker)}, tmp_path / "evil.pth")
    infer = ["--voc12_root", str(voc), "--dataset_classes", str(voc / "classes.txt"), "--backbone_width", "0.125",
             "--infer_list", str(voc / "val.txt"), "--num_workers", "0"]
    one_line_error(capsys, infer_SB.main, [*infer, "--weights", str(tmp_path / "evil.pth"), "--out_cam",
                                           str(tmp_path / "cam")], "evil.pth")
    one_line_error(capsys, train_SB.main, train_argv(voc, tmp_path, "--resume", tmp_path / "evil.pth"), "evil.pth")
    cam_dir = tmp_path / "cam_npy"
    cam_dir.mkdir()
    for name in load_img_name_list(voc / "val.txt"):
        (cam_dir / f"{name}.npy").write_bytes(pickle.dumps(Exploit(marker)))
    weights = tmp_path / "aff.pth"
    torch.save(resnet38_aff.Net(width=0.125).state_dict(), weights)
    one_line_error(capsys, infer_aff.main, [*infer, "--weights", str(weights), "--cam_dir", str(cam_dir),
                                            "--out_rw", str(tmp_path / "rw")], "--allow_pickle")
    assert not marker.exists()


def test_non_finite_loss_names_the_step_and_keeps_the_last_checkpoint(voc, tmp_path, capsys, monkeypatch):
    train_SB.main(train_argv(voc, tmp_path))
    good = (tmp_path / "run.ckpt").read_bytes()
    real_loss = train_SB.sb_step_loss

    def diverging(*args, **kwargs):
        losses = real_loss(*args, **kwargs)
        losses["loss_er"] = losses["loss_er"] * float("nan")
        losses["loss"] = losses["loss"] + losses["loss_er"]
        return losses

    monkeypatch.setattr(train_SB, "sb_step_loss", diverging)
    line = one_line_error(capsys, train_SB.main, train_argv(voc, tmp_path, "--max_epoches", "2", "--resume"),
                          "non-finite loss at step 3", code=1)
    assert "er" in line
    assert (tmp_path / "run.ckpt").read_bytes() == good


def test_no_traceback_from_the_command_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train_SB.py"), "--voc12_root", str(tmp_path / "none")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: ")


def test_sb_network_of_another_class_count(voc, tmp_path, capsys):
    weights = tmp_path / "sb21.pth"
    torch.save(resnet38_sb.Net(num_classes=6, width=0.125).state_dict(), weights)
    infer = ["--voc12_root", str(voc), "--backbone_width", "0.125", "--infer_list", str(voc / "val.txt"),
             "--num_workers", "0", "--weights", str(weights), "--out_cam", str(tmp_path / "cam")]
    one_line_error(capsys, infer_SB.main, infer, "fc8")
