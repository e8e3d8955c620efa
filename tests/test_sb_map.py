"""Semantic boundary maps (voc12/sb_map.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse
from PIL import Image

from tool.errors import InputError
from tool.fileio import find_array_file, load_sb_map, save_label_png, save_sb_map, save_scores
from voc12 import sb_map
from voc12.classes import VOC

CAT, DOG = VOC.index("cat") + 1, VOC.index("dog") + 1


def scene(size=(48, 64)) -> np.ndarray:
    """Background, a cat square, a dog disc touching a 255 band, and that band."""
    label = np.zeros(size, np.uint8)
    label[6:26, 6:30] = CAT
    ys, xs = np.mgrid[:size[0], :size[1]]
    label[np.hypot(ys - 30, xs - 48) < 11] = DOG
    label[:, 36:38] = 255
    return label


def brute_force_core(label: np.ndarray, c: int, width: float) -> np.ndarray:
    """Pixels of class c within ``width`` of a pixel of another value, by all-pairs distances."""
    points = np.argwhere(np.ones(label.shape, bool))
    inside = label.reshape(-1) == c
    d = np.hypot(*(points[inside][:, None, :] - points[~inside][None, :, :]).transpose(2, 0, 1))
    core = np.zeros(label.size, bool)
    core[np.flatnonzero(inside)] = d.min(axis=1) <= width
    return core.reshape(label.shape)


def chessboard_distance_to(mask: np.ndarray) -> np.ndarray:
    points = np.argwhere(np.ones(mask.shape, bool))
    d = np.abs(points[:, None, :] - np.argwhere(mask)[None, :, :]).max(axis=2)
    return d.min(axis=1).reshape(mask.shape)


@pytest.mark.parametrize("width, sigma", [(2.0, 1.0), (1.0, 0.7), (3.0, 1.5)])
def test_boundaries_lie_on_region_edges_of_present_classes(width, sigma):
    label = scene()
    maps = sb_map.boundaries_from_labels(label, VOC.num_classes, width=width, sigma=sigma)
    assert maps.shape == (VOC.num_classes,) + label.shape and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1
    present = {0, CAT, DOG}
    for c in range(VOC.num_classes):
        if c not in present:
            assert not maps[c].any(), c
            continue
        core = brute_force_core(label, c, width)
        assert core.any() and (maps[c][core] == 1).all()
        # Zero beyond the (square) Gaussian footprint: far from the edge, inside or outside.
        far = chessboard_distance_to(core) > int(sigma * sb_map.TRUNCATE + 0.5)
        assert not maps[c][far].any()
        assert maps[c][~core].max() < 1
    # The cat's interior and the image border far from any edge carry nothing.
    assert maps[CAT, 16, 18] == 0 and maps[0, 46, 2] == 0
    # The dog disc is cut by the 255 band: the cut is an edge of the dog; the band has no channel.
    assert maps[DOG, 30, 38] == 1
    assert not (maps[:, label == 255] == 1).any()


def test_degenerate_maps():
    full = np.full((10, 12), CAT, np.uint8)
    assert not sb_map.boundaries_from_labels(full, VOC.num_classes).any()
    ignore = np.full((10, 12), 255, np.uint8)
    assert not sb_map.boundaries_from_labels(ignore, VOC.num_classes).any()
    with pytest.raises(ValueError, match="label value 7"):
        sb_map.boundaries_from_labels(np.full((4, 4), 7, np.uint8), 5)


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    maps = rng.uniform(0, 1, (VOC.num_classes, 30, 40)).astype(np.float32)
    maps[3] = 0
    maps[4, 0, 0], maps[4, 0, 1] = 1.2, -0.1  # clipped on save
    save_sb_map(tmp_path / "a.npz", maps)
    back = load_sb_map(tmp_path / "a.npz")
    assert back.shape == maps.shape and back.dtype == np.float32
    assert np.abs(back - np.clip(maps, 0, 1)).max() <= 0.5 / 255 + 1e-7
    with np.load(tmp_path / "a.npz") as z:
        assert list(z.keys()) == ["sb_map"] and z["sb_map"].dtype == np.uint8
    assert list(tmp_path.iterdir()) == [tmp_path / "a.npz"]  # no temporary left behind

    np.save(tmp_path / "released.npy", maps)  # the released float arrays
    np.testing.assert_array_equal(load_sb_map(tmp_path / "released.npy"), maps)
    assert find_array_file(tmp_path, "released") == tmp_path / "released.npy"
    assert find_array_file(tmp_path, "a") == tmp_path / "a.npz"
    np.save(tmp_path / "pickled.npy", np.array([{"x": 1}], dtype=object))
    with pytest.raises(InputError, match="not a boundary map"):
        load_sb_map(tmp_path / "pickled.npy")
    with pytest.raises(InputError, match="boundary map not found"):
        load_sb_map(tmp_path / "missing.npz")
    np.save(tmp_path / "flat.npy", np.zeros((30, 40)))
    with pytest.raises(InputError, match=r"not \(classes, H, W\)"):
        load_sb_map(tmp_path / "flat.npy")


def tiny_tree(root: Path) -> list[tuple[str, np.ndarray]]:
    (root / "JPEGImages").mkdir(parents=True)
    labels = [("a", scene()), ("b", scene((40, 50))[::-1])]
    for name, label in labels:
        Image.new("RGB", (label.shape[1], label.shape[0])).save(root / "JPEGImages" / f"{name}.jpg")
    (root / "list.txt").write_text("".join(f"/JPEGImages/{n}.jpg /SegmentationClassAug/{n}.png\n" for n, _ in labels))
    return labels


def command(root: Path, *extra: str) -> list[str]:
    return ["--voc12_root", str(root), "--list", str(root / "list.txt"), *extra]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_command_from_crf_scores_and_label_pngs(tmp_path, workers):
    labels = tiny_tree(tmp_path)
    for name, label in labels:
        present = np.unique(label[label != 255])
        scores = np.stack([(label == c) * 0.8 + 0.1 for c in present]).astype(np.float32)
        scores[:, label == 255] = 0.3  # decided by the first stored label: background
        save_scores(tmp_path / "crf" / f"{name}.npz", present, scores)
        save_label_png(tmp_path / "png" / f"{name}.png", np.where(label == 255, 0, label))
    out = sb_map.run(sb_map.parse_args(command(tmp_path, "--crf_dir", str(tmp_path / "crf"),
                                               "--num_workers", workers)))
    assert out == tmp_path / "sb_map"
    sb_map.run(sb_map.parse_args(command(tmp_path, "--label_dir", str(tmp_path / "png"), "--out_dir",
                                         str(tmp_path / "from_png"), "--width", "1", "--sigma", "0.5")))
    for name, label in labels:
        from_crf = load_sb_map(tmp_path / "sb_map" / f"{name}.npz")
        expected = sb_map.boundaries_from_labels(np.where(label == 255, 0, label), VOC.num_classes)
        np.testing.assert_allclose(from_crf, expected, atol=0.5 / 255)
        from_png = load_sb_map(tmp_path / "from_png" / f"{name}.npz")
        expected = sb_map.boundaries_from_labels(np.where(label == 255, 0, label), VOC.num_classes, 1.0, 0.5)
        np.testing.assert_allclose(from_png, expected, atol=0.5 / 255)


def test_command_sbd_upper_bound(tmp_path):
    labels = tiny_tree(tmp_path)
    cls_dir = tmp_path / "benchmark_RELEASE" / "dataset" / "cls"
    cls_dir.mkdir(parents=True)
    for name, label in labels:
        boundaries = np.empty(VOC.num_fg, dtype=object)
        for k in range(VOC.num_fg):
            edge = np.zeros(label.shape, np.uint8)
            if k + 1 == CAT:
                edge[label.shape[0] // 2, 3:9] = 1
            boundaries[k] = scipy.sparse.csc_matrix(edge)
        scipy.io.savemat(cls_dir / f"{name}.mat", {"GTcls": {"Boundaries": boundaries, "Segmentation": label}})
    sb_map.run(sb_map.parse_args(command(tmp_path, "--sbd_upper_bound", str(tmp_path / "benchmark_RELEASE"))))
    maps = load_sb_map(tmp_path / "sb_map" / "a.npz")
    row = labels[0][1].shape[0] // 2
    assert (maps[CAT, row, 3:9] == 1).all() and (maps[0, row, 3:9] == 1).all()
    assert maps[CAT, row, 20] == 0 and not np.delete(maps, [0, CAT], axis=0).any()


def test_command_errors(tmp_path):
    labels = tiny_tree(tmp_path)
    with pytest.raises(SystemExit):  # exactly one source is required
        sb_map.parse_args(command(tmp_path))
    with pytest.raises(InputError, match="source folder not found"):
        sb_map.run(sb_map.parse_args(command(tmp_path, "--crf_dir", str(tmp_path / "nope"))))
    with pytest.raises(InputError, match="VOC2012 folder not found"):
        sb_map.run(sb_map.parse_args(["--voc12_root", str(tmp_path / "x"), "--list", "l", "--crf_dir", "d"]))
    name, label = labels[0]
    save_label_png(tmp_path / "png" / "a.png", label[:, :-3])
    with pytest.raises(InputError, match=r"a\.png is 48x61, its image 48x64"):
        sb_map.run(sb_map.parse_args(command(tmp_path, "--label_dir", str(tmp_path / "png"))))
    save_label_png(tmp_path / "png" / "a.png", np.full(label.shape, 30, np.uint8))
    with pytest.raises(InputError, match=r"a\.png: label value 30"):
        sb_map.run(sb_map.parse_args(command(tmp_path, "--label_dir", str(tmp_path / "png"))))
    with pytest.raises(InputError, match=r"score file not found: .*a\.npz"):
        sb_map.run(sb_map.parse_args(command(tmp_path, "--crf_dir", str(tmp_path / "png"))))


def test_released_crf_dicts_are_named_with_what_reads_them(tmp_path):
    """The released code's pickled CRF dicts are not read here: the one line says what was found
    and which commands read it."""
    labels = tiny_tree(tmp_path)
    (tmp_path / "crf").mkdir()
    for name, label in labels:
        half = np.full(label.shape, 0.5, np.float32)
        np.save(tmp_path / "crf" / f"{name}.npy", {0: half, CAT: half})
    with pytest.raises(InputError) as e:
        sb_map.run(sb_map.parse_args(command(tmp_path, "--crf_dir", str(tmp_path / "crf"), "--num_workers", "1")))
    assert str(e.value) == (f"{tmp_path / 'crf'} holds a.npy, the released code's pickled CRF dict, not a.npz: "
                            "voc12.sb_map reads the .npz files of infer_SB.py --out_crf (released .npy dicts are "
                            "read by train_aff.py and evaluation.py with --allow_pickle)")


def test_maps_this_tool_did_not_write_are_never_deleted(tmp_path):
    labels = tiny_tree(tmp_path)
    for name, label in labels:
        save_label_png(tmp_path / "png" / f"{name}.png", np.where(label == 255, 0, label))
    theirs = tmp_path / "sb_map" / "a.npz"
    save_sb_map(theirs, np.zeros((VOC.num_classes, 4, 4)))
    with pytest.raises(InputError, match=r"holds 1 .npz files this tool did not write \(first: a.npz\); choose an"):
        sb_map.run(sb_map.parse_args(command(tmp_path, "--label_dir", str(tmp_path / "png"), "--num_workers", "1")))
    assert load_sb_map(theirs).shape == (VOC.num_classes, 4, 4)
