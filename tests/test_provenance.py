"""Output folders record what made them: reuse on a match, a one-line stop or a clean redo otherwise."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tool import provenance
from tool.errors import InputError
from tool.fileio import output_files

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["a", "img1", "img2"]  # what the claims below are for


def test_file_digest_is_sha256_of_the_bytes_and_follows_edits(tmp_path):
    path = tmp_path / "w.pth"
    data = bytes(range(256)) * 9000  # larger than one read chunk
    path.write_bytes(data)
    assert provenance.file_digest(path) == hashlib.sha256(data).hexdigest()
    path.write_bytes(data + b"x")
    assert provenance.file_digest(path) == hashlib.sha256(data + b"x").hexdigest()
    with pytest.raises(InputError, match="not found"):
        provenance.file_digest(tmp_path / "missing.pth")


def test_source_digest_follows_the_code_a_script_runs(tmp_path):
    """A copy of the project: an edit of the loss changes train_SB's digest, not infer_SB's."""
    for name in ("train_SB.py", "infer_SB.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    for package in ("tool", "network", "voc12"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    before = {s: provenance.source_digest(tmp_path / s, tmp_path) for s in ("train_SB.py", "infer_SB.py")}
    losses = tmp_path / "tool" / "losses.py"
    losses.write_text(losses.read_text() + "\n# an edit\n")
    after = {s: provenance.source_digest(tmp_path / s, tmp_path) for s in ("train_SB.py", "infer_SB.py")}
    assert after["train_SB.py"] != before["train_SB.py"]
    assert after["infer_SB.py"] == before["infer_SB.py"]


def outputs(folder: Path) -> list[str]:
    return [p.name for p in output_files(folder, ".png")]


def test_claim_reuses_a_match_and_refuses_or_redoes_a_mismatch(tmp_path):
    folder = tmp_path / "rw"
    first = {"weights_sha256": "a", "alpha": 4}
    provenance.claim_outputs(folder, first, overwrite=None, suffix=".png", names=NAMES)
    assert json.loads((folder / provenance.RECORD_NAME).read_text()) == first
    (folder / "img1.png").write_bytes(b"1")
    assert provenance.claim_outputs(folder, dict(first), overwrite=None, suffix=".png", names=NAMES)  # a resume
    assert provenance.claim_outputs(folder, dict(first), overwrite="stale", suffix=".png", names=NAMES)
    assert not provenance.claim_outputs(folder, dict(first), overwrite="all", suffix=".png", names=NAMES)  # redo them
    assert outputs(folder) == ["img1.png"]

    other = {"weights_sha256": "b", "alpha": 4}
    with pytest.raises(InputError, match=r"other weights_sha256; pass --overwrite") as e:
        provenance.claim_outputs(folder, other, overwrite=None, suffix=".png", names=NAMES)
    assert "\n" not in str(e.value)
    assert outputs(folder) == ["img1.png"]  # a refusal changes nothing

    (folder / "notes.txt").write_text("kept")
    assert provenance.claim_outputs(folder, other, overwrite="stale", suffix=".png", names=NAMES)
    assert outputs(folder) == [] and (folder / "notes.txt").is_file()
    assert provenance.read_record(folder) == other
    (folder / "img2.png").write_bytes(b"2")
    assert provenance.claim_outputs(folder, first, overwrite="all", suffix=".png", names=NAMES)
    assert outputs(folder) == [] and provenance.read_record(folder) == first


def test_a_killed_writes_temporary_is_no_output_and_a_redo_removes_it(tmp_path):
    folder = tmp_path / "cam"
    provenance.claim_outputs(folder, {"x": 1}, overwrite=None, suffix=".npz", names=NAMES)
    left = folder / ".a.npz.k3j9x.tmp.npz"  # atomic_path's temporary, as SIGKILL leaves it
    left.write_bytes(b"half")
    assert list(folder.glob("*.npz")) == [left] and output_files(folder, ".npz") == []
    # Nothing finished to protect: another record claims the folder without --overwrite ...
    assert provenance.claim_outputs(folder, {"x": 2}, overwrite=None, suffix=".npz", names=NAMES)
    # ... and the redo leaves no temporary behind.
    assert list(folder.glob("*.npz")) == [] and provenance.read_record(folder) == {"x": 2}


def test_outputs_without_a_record_are_never_deleted(tmp_path):
    """A folder of files this tool did not write (a copy of the ground truth): refused, --overwrite
    or not, without inviting --overwrite, and nothing deleted."""
    gt = {f"{n}.png": bytes([i]) * 10 for i, n in enumerate(["2007_000032", "2007_000039", "a"])}
    for name, data in gt.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "notes.txt").write_text("not an output")
    for overwrite in (None, "all", "stale"):
        with pytest.raises(InputError) as e:
            provenance.claim_outputs(tmp_path, {"x": 1}, overwrite=overwrite, suffix=".png", names=NAMES)
        assert str(e.value) == (f"{tmp_path} holds 3 .png files this tool did not write (first: 2007_000032.png); "
                                "choose an empty folder")
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.png")} == gt
    assert provenance.read_record(tmp_path) is None
    # Files of another suffix are not outputs: a CAM folder may be made beside them.
    assert provenance.claim_outputs(tmp_path, {"x": 1}, overwrite=None, suffix=".npz", names=NAMES)

    # A record left by a run killed before its first image: nothing to protect, so no error.
    empty = tmp_path / "empty"
    provenance.claim_outputs(empty, {"x": 1}, overwrite=None, suffix=".npz", names=NAMES)
    provenance.claim_outputs(empty, {"x": 2}, overwrite=None, suffix=".npz", names=NAMES)
    assert provenance.read_record(empty) == {"x": 2}


def test_overwrite_deletes_only_the_files_the_list_names(tmp_path):
    folder = tmp_path / "rw"
    provenance.claim_outputs(folder, {"x": 1}, overwrite=None, suffix=".png", names=["a", "b"])
    assert provenance.read_names(folder) == {"a.png", "b.png"}
    (folder / "a.png").write_bytes(b"ours")
    (folder / "c.png").write_bytes(b"copied in by hand")
    with pytest.raises(InputError, match=r"holds 1 .png files this tool did not write \(first: c.png\)"):
        provenance.claim_outputs(folder, {"x": 2}, overwrite="all", suffix=".png", names=["a", "b"])
    assert outputs(folder) == ["a.png", "c.png"]
    (folder / "c.png").unlink()
    # A second list on the same record: its names are listed before any of them is written.
    assert provenance.claim_outputs(folder, {"x": 1}, overwrite=None, suffix=".png", names=["c"])
    assert provenance.read_names(folder) == {"a.png", "b.png", "c.png"}
    (folder / "c.png").write_bytes(b"ours too")
    assert provenance.claim_outputs(folder, {"x": 2}, overwrite="stale", suffix=".png", names=["d"])
    assert outputs(folder) == [] and provenance.read_names(folder) == {"d.png"}


def test_a_record_from_before_the_lists_vouches_for_its_outputs(tmp_path):
    (tmp_path / provenance.RECORD_NAME).write_text(json.dumps({"x": 1}))
    (tmp_path / "a.png").write_bytes(b"old")
    with pytest.raises(InputError, match="other x; pass --overwrite"):
        provenance.claim_outputs(tmp_path, {"x": 2}, overwrite=None, suffix=".png", names=NAMES)
    assert provenance.claim_outputs(tmp_path, {"x": 2}, overwrite="all", suffix=".png", names=NAMES)
    assert outputs(tmp_path) == []


@pytest.mark.parametrize("damage", ["cut", "list", "text"])
def test_an_unreadable_record_says_so_and_what_to_do(tmp_path, damage):
    folder = tmp_path / "cam"
    provenance.claim_outputs(folder, {"x": 1, "alpha": 4}, overwrite=None, suffix=".npz", names=NAMES)
    (folder / "a.npz").write_bytes(b"ours")
    path = folder / provenance.RECORD_NAME
    path.write_text({"cut": path.read_text()[:9], "list": "[1, 2]", "text": '"x"'}[damage])
    assert provenance.read_record(folder) == {}
    with pytest.raises(InputError) as e:
        provenance.claim_outputs(folder, {"x": 1, "alpha": 4}, overwrite=None, suffix=".npz", names=NAMES)
    assert str(e.value) == (f"{path} is unreadable (cut short or not a record), so what made the 1 outputs "
                            "there is unknown; pass --overwrite to redo them")
    assert provenance.claim_outputs(folder, {"x": 1, "alpha": 4}, overwrite="stale", suffix=".npz", names=NAMES)
    assert outputs(folder) == [] and provenance.read_record(folder) == {"x": 1, "alpha": 4}


def test_outputs_of_another_script_are_named_as_such(tmp_path):
    cam = provenance.describe(ROOT / "infer_SB.py", flags={"output": "cam", "amp": False})
    rw = provenance.describe(ROOT / "infer_aff.py", flags={"alpha": 4, "beta": 8})
    folder = tmp_path / "out"
    provenance.claim_outputs(folder, cam, overwrite=None, suffix=".npz", names=NAMES)
    for name in ("a.npz", "img1.npz"):
        (folder / name).write_bytes(b"cam")
    # Another suffix does not hide them: a folder never mixes two origins.
    with pytest.raises(InputError) as e:
        provenance.claim_outputs(folder, rw, overwrite=None, suffix=".png", names=NAMES)
    assert str(e.value) == (f"{folder} holds 2 cam outputs of infer_SB, not outputs of infer_aff; choose another "
                            "folder, or pass --overwrite to delete them")
    crf = {**cam, "output": "crf"}
    with pytest.raises(InputError, match="holds 2 cam outputs of infer_SB, not crf outputs of infer_SB"):
        provenance.claim_outputs(folder, crf, overwrite=None, suffix=".npz", names=NAMES)
    assert provenance.read_record(folder) == cam and len(output_files(folder, ".npz")) == 2


def test_folder_digest_names_a_record(tmp_path):
    assert provenance.folder_digest(tmp_path) is None
    provenance.claim_outputs(tmp_path, {"x": 1}, overwrite=None, suffix=".npz", names=NAMES)
    digest = provenance.folder_digest(tmp_path)
    assert digest == hashlib.sha256((tmp_path / provenance.RECORD_NAME).read_bytes()).hexdigest()
    provenance.claim_outputs(tmp_path, {"x": 2}, overwrite=None, suffix=".npz", names=NAMES)
    assert provenance.folder_digest(tmp_path) != digest


def test_evaluation_log_names_the_record_of_what_it_scored(tmp_path):
    import numpy as np

    import evaluation
    from tool.fileio import save_label_png

    gt, pred = tmp_path / "gt", tmp_path / "pred"
    label = np.zeros((6, 8), np.uint8)
    label[2:5, 3:7] = 1
    save_label_png(gt / "a.png", label)
    save_label_png(pred / "a.png", label)
    (tmp_path / "list.txt").write_text("a\n")
    argv = ["--list", str(tmp_path / "list.txt"), "--gt_dir", str(gt), "--predict_dir", str(pred), "--comment", "x",
            "--logfile", str(tmp_path / "log.txt"), "--num_workers", "1"]
    released_style = evaluation.main(argv)
    assert "provenance" not in released_style and "provenance" not in (tmp_path / "log.txt").read_text()
    with pytest.raises(InputError, match="1 .png files this tool did not write"):  # of unknown origin: kept
        provenance.claim_outputs(pred, {"weights_sha256": "a"}, overwrite="stale", suffix=".png", names=["a"])
    (pred / "a.png").unlink()
    provenance.claim_outputs(pred, {"weights_sha256": "a"}, overwrite=None, suffix=".png", names=["a"])
    save_label_png(pred / "a.png", label)
    ours = evaluation.main(argv)
    assert ours["provenance"] == provenance.folder_digest(pred)
    assert f"provenance:{ours['provenance']}" in (tmp_path / "log.txt").read_text().split("=" * 37 + "\n")[-2]
    assert ours["mIoU"] == released_style["mIoU"]
