"""The score-map format, atomic writes and image lists."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from tool.errors import InputError
from tool.fileio import (
    atomic_path,
    is_valid_scores,
    load_img_name_list,
    load_sb_map,
    load_scores,
    output_files,
    save_label_png,
    save_sb_map,
    save_scores,
)


def test_scores_round_trip_without_pickle(tmp_path):
    scores = np.random.default_rng(0).random((2, 3, 4)).astype(np.float32)
    save_scores(tmp_path / "a.npz", np.array([0, 7]), scores)
    labels, back = load_scores(tmp_path / "a.npz")
    np.testing.assert_array_equal(labels, [0, 7])
    np.testing.assert_array_equal(back, scores)
    assert is_valid_scores(tmp_path / "a.npz")
    with pytest.raises(ValueError, match="do not match"):
        save_scores(tmp_path / "b.npz", np.array([1]), scores)


def test_released_npy_dicts_need_allow_pickle(tmp_path):
    np.save(tmp_path / "cam.npy", {0: np.ones((2, 2)), 14: np.zeros((2, 2))})
    with pytest.raises(InputError, match="--allow_pickle"):
        load_scores(tmp_path / "cam.npy")
    labels, scores = load_scores(tmp_path / "cam.npy", allow_pickle=True, released_cam=True)
    np.testing.assert_array_equal(labels, [1, 15])
    assert scores.shape == (2, 2, 2)


def test_truncated_or_foreign_score_files(tmp_path):
    save_scores(tmp_path / "a.npz", np.array([1]), np.ones((1, 8, 8), np.float32))
    data = (tmp_path / "a.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "evil.npz").write_bytes(pickle.dumps({"labels": 1}))
    for name in ("cut.npz", "evil.npz", "missing.npz"):
        assert not is_valid_scores(tmp_path / name)
        with pytest.raises(InputError):
            load_scores(tmp_path / name)


def test_atomic_path_leaves_nothing_under_the_final_name_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert not target.exists() and not list(tmp_path.iterdir())
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"new but half")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"old"


def test_output_files_leave_out_a_write_in_progress(tmp_path):
    save_label_png(tmp_path / "b.png", np.zeros((2, 2), np.uint8))
    with atomic_path(tmp_path / "a.png") as tmp:
        tmp.write_bytes(b"half")
        # A glob of *.png matches atomic_path's temporary; output_files does not.
        assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted([tmp.name, "b.png"])
        assert output_files(tmp_path, ".png") == [tmp_path / "b.png"]
    assert output_files(tmp_path, ".png") == [tmp_path / "a.png", tmp_path / "b.png"]
    assert output_files(tmp_path, ".npz") == [] and output_files(tmp_path / "missing", ".png") == []


def test_outputs_get_the_usual_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        save_label_png(tmp_path / "p.png", np.zeros((2, 2), np.uint8))
    finally:
        os.umask(mask)
    assert (tmp_path / "p.png").stat().st_mode & 0o777 == 0o644


def test_image_lists(tmp_path):
    path = tmp_path / "l.txt"
    path.write_text("/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n2008_000008\n\n")
    assert load_img_name_list(path) == ["2007_000032", "2008_000008"]
    path.write_text("\n")
    with pytest.raises(InputError, match="empty"):
        load_img_name_list(path)


def test_truncated_boundary_map(tmp_path):

    save_sb_map(tmp_path / "m.npz", np.random.default_rng(0).random((3, 20, 20)))
    data = (tmp_path / "m.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[:100])
    with pytest.raises(InputError, match="not a boundary map"):
        load_sb_map(tmp_path / "cut.npz")
