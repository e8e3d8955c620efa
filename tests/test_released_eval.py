"""evaluation.py on the released code's pickled .npy dicts and on ours, against numbers computed by the
released evaluation.py files themselves (SEAM's and SBNet's ``do_python_eval``, run in a scratch folder
on ``tests/data/released_eval/released_eval_arrays.npz``; the numbers are in the .json beside it)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import evaluation
from tool.errors import InputError
from tool.fileio import load_scores, save_label_png, save_scores

DATA = Path(__file__).parent / "data" / "released_eval"
REFERENCE = json.loads((DATA / "released_eval_reference.json").read_text())


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    """The generated arrays as the released files (pickled dicts) and as ours (.npz)."""
    root = tmp_path_factory.mktemp("released_eval")
    arrays = np.load(DATA / "released_eval_arrays.npz")
    names = [str(n) for n in arrays["names"]]
    for name in names:
        save_label_png(root / "gt" / f"{name}.png", arrays[f"{name}_gt"])
        for kind in ("cam", "crf"):
            keys, maps = arrays[f"{name}_{kind}_keys"], arrays[f"{name}_{kind}"]
            (root / f"released_{kind}").mkdir(exist_ok=True)
            np.save(root / f"released_{kind}" / f"{name}.npy", {int(k): m for k, m in zip(keys, maps, strict=True)})
            labels = keys + 1 if kind == "cam" else keys
            save_scores(root / f"our_{kind}" / f"{name}.npz", labels, maps)
            # The released SBNet evaluation puts each CAM at channel = key: one class down.
            if kind == "cam":
                save_scores(root / "shifted_cam" / f"{name}.npz", keys, maps)
    return {"root": root, "names": names}


def evaluate(folders: dict, sub: str, input_type: str, t: float, **kwargs) -> dict:
    root = folders["root"]
    return evaluation.do_python_eval(root / sub, root / "gt", folders["names"], input_type=input_type,
                                     threshold=t, **kwargs)


def assert_same(ours: dict, reference: dict) -> None:
    assert set(ours) == set(reference)
    for key, value in reference.items():
        assert ours[key] == pytest.approx(value, rel=1e-7, abs=1e-6), key


@pytest.mark.parametrize("t", [0.2, 0.35])
def test_released_cam_dicts_score_as_seam(folders, t):
    reference = REFERENCE[f"seam_cam_t{t:.2f}"]
    assert_same(evaluate(folders, "released_cam", "npy", t, allow_pickle=True), reference)
    # Our .npz CAM files: the same numbers with --type npy (no pickle, no flag) and with --type npz.
    assert_same(evaluate(folders, "our_cam", "npy", t), reference)
    assert_same(evaluate(folders, "our_cam", "npz", t), reference)


def test_released_crf_dicts_are_not_shifted(folders):
    """A CRF dict holds the background (key 0): scored as SBNet's evaluation scores it, not shifted
    (SEAM's evaluation would shift it and score almost nothing)."""
    reference = REFERENCE["sbnet_crf"]
    assert REFERENCE["seam_crf_t0.20"]["mIoU"] < 1
    assert_same(evaluate(folders, "released_crf", "npy", 0.2, allow_pickle=True), reference)
    assert_same(evaluate(folders, "our_crf", "npy", 0.2), reference)
    labels, _ = load_scores(folders["root"] / "released_crf" / "img1.npy", allow_pickle=True, released_cam=True)
    assert labels.tolist() == [0, 1]
    labels, _ = load_scores(folders["root"] / "released_cam" / "img1.npy", allow_pickle=True, released_cam=True)
    assert labels.tolist() == [1]  # a CAM dict holding only aeroplane (key 0) is still a CAM dict


def test_sbnet_evaluation_quirk_is_a_one_class_shift(folders):
    """The README's claim: SBNet's evaluation.py puts CAM key k at label k (the first object class on
    the background) and scores the background as 0, whatever --t says."""
    assert_same(evaluate(folders, "shifted_cam", "npz", 0.0), REFERENCE["sbnet_cam_t0.20"])
    assert REFERENCE["sbnet_cam_t0.20"]["mIoU"] < REFERENCE["seam_cam_t0.20"]["mIoU"]


def test_npy_errors_name_the_flag_that_helps(folders, tmp_path):
    with pytest.raises(InputError, match="--allow_pickle"):
        evaluate(folders, "released_cam", "npy", 0.2)
    with pytest.raises(InputError, match="pass --type npy --allow_pickle"):
        evaluate(folders, "released_cam", "npz", 0.2)
    with pytest.raises(InputError, match="img0.npz is there: pass --type npz"):
        evaluate(folders, "our_cam", "png", 0.2)
    with pytest.raises(InputError, match=r"not found: .*img0.npz \(nor img0.npy\)"):
        evaluation.do_python_eval(tmp_path, folders["root"] / "gt", ["img0"], input_type="npy", threshold=0.2)


def test_plain_npy_with_allow_pickle_is_one_line(folders, tmp_path, capsys):
    root = folders["root"]
    np.save(tmp_path / "img0.npy", np.zeros((3, 4), np.float32))
    (tmp_path / "list.txt").write_text("img0\n")
    with pytest.raises(SystemExit) as exit_info:
        evaluation.main(["--list", str(tmp_path / "list.txt"), "--predict_dir", str(tmp_path), "--gt_dir",
                         str(root / "gt"), "--type", "npy", "--t", "0.2", "--allow_pickle", "--comment", "x",
                         "--logfile", str(tmp_path / "log.txt"), "--num_workers", "1"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "not a released CAM/CRF dict but a float32 array of shape (3, 4)" in lines[0]
