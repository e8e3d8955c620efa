"""Datasets, lists and labels, joint transforms (voc12/data.py, voc12/make_lists.py, tool/imutils.py)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from tool import imutils
from tool.affinity import extract_affinity_labels, search_offsets
from tool.errors import InputError
from tool.fileio import save_sb_map, save_scores
from tool.imutils import IMAGENET_MEAN, IMAGENET_STD
from voc12 import make_lists
from voc12.classes import VOC, ClassList
from voc12.data import (
    VOC12AffDataset,
    VOC12ClsDataset,
    VOC12ClsDatasetMSF,
    VOC12ImageDataset,
    affinity_label,
    load_image_labels,
    load_img_name_list,
    save_image_labels,
)

XML_DIR = Path(__file__).parent / "data" / "voc_xml"


def vector(*names: str) -> np.ndarray:
    out = np.zeros(VOC.num_fg, np.uint8)
    out[[VOC.index(n) for n in names]] = 1
    return out


# --- labels from XML, lists --------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("2007_000032", ("aeroplane", "person")),  # aeroplane twice, a truncated person
    ("2008_000008", ("horse", "person")),  # the person's parts (head, hand, foot) are no classes
    ("2009_000012", ("bottle", "diningtable", "tvmonitor")),  # difficult + truncated, 'tvmonitor '
])
def test_labels_from_xml(name, expected):
    np.testing.assert_array_equal(make_lists.labels_from_xml(XML_DIR / f"{name}.xml", VOC), vector(*expected))


def test_unknown_class_in_xml_is_named(tmp_path):
    text = (XML_DIR / "2007_000032.xml").read_text().replace("<name>person</name>", "<name>unicorn</name>")
    (tmp_path / "x.xml").write_text(text)
    with pytest.raises(InputError, match=r"x\.xml.*'unicorn'"):
        make_lists.labels_from_xml(tmp_path / "x.xml", VOC)
    (tmp_path / "y.xml").write_text("<annotation><object>")
    with pytest.raises(InputError, match="not valid XML"):
        make_lists.labels_from_xml(tmp_path / "y.xml", VOC)


def test_load_img_name_list_reads_released_and_plain_lines(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n\n"
                    "2008_000008\n/JPEGImages/2009_000012.jpg\nphoto.v2\n")
    assert load_img_name_list(path) == ["2007_000032", "2008_000008", "2009_000012", "photo.v2"]
    with pytest.raises(InputError, match="image list not found"):
        load_img_name_list(tmp_path / "nope.txt")


def fake_sbd_mat(path: Path, segmentation: np.ndarray) -> None:
    scipy.io.savemat(path, {"GTcls": {"Segmentation": segmentation.astype(np.uint8)}})


def test_make_lists_voc_and_sbd(tmp_path):
    voc, sbd = tmp_path / "VOC2012", tmp_path / "benchmark_RELEASE" / "dataset"
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "Annotations").mkdir()
    (sbd / "cls").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("2008_000008\n2007_000032\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2009_000012\n")
    for xml in XML_DIR.glob("*.xml"):
        shutil.copy(xml, voc / "Annotations")
    (sbd / "train.txt").write_text("2007_000032\n2010_000001\n")
    (sbd / "val.txt").write_text("2009_000012\n2011_000002\n")
    seg = np.zeros((8, 8), np.uint8)
    seg[1:3, 1:3], seg[5:7, 5:7], seg[0, :] = VOC.index("cat") + 1, VOC.index("sofa") + 1, 255
    fake_sbd_mat(sbd / "cls" / "2010_000001.mat", seg)
    fake_sbd_mat(sbd / "cls" / "2011_000002.mat", np.zeros((8, 8), np.uint8))

    out = tmp_path / "lists"
    written = make_lists.run(make_lists.parse_args(
        ["--voc12_root", str(voc), "--sbd_root", str(tmp_path / "benchmark_RELEASE"), "--out_dir", str(out)]))
    assert sorted(written) == ["labels", "train", "train_aug", "val"]
    lines = (out / "train_aug.txt").read_text().splitlines()
    # VOC train + SBD train/val - VOC val, sorted, in the released line format.
    assert lines == [f"/JPEGImages/{n}.jpg /SegmentationClassAug/{n}.png"
                     for n in ("2007_000032", "2008_000008", "2010_000001", "2011_000002")]
    assert [line.split(" ")[0][-15:-4] for line in lines] == load_img_name_list(out / "train_aug.txt")
    assert load_img_name_list(out / "train.txt") == ["2008_000008", "2007_000032"]
    assert load_img_name_list(out / "val.txt") == ["2009_000012"]

    names = ["2011_000002", "2009_000012", "2010_000001", "2007_000032"]
    labels = load_image_labels(out / "cls_labels.npz", names, VOC.num_fg)
    assert labels.dtype == np.float32
    expected = [vector(), vector("bottle", "diningtable", "tvmonitor"), vector("cat", "sofa"),
                vector("aeroplane", "person")]
    np.testing.assert_array_equal(labels, np.stack(expected))
    with np.load(out / "cls_labels.npz", allow_pickle=False) as z:
        assert z["labels"].dtype == np.uint8 and z["names"].dtype.kind == "U"
        assert len(z["names"]) == 5


def test_make_lists_errors(tmp_path):
    voc = tmp_path / "VOC2012"
    with pytest.raises(InputError, match="VOC2012 folder not found"):
        make_lists.run(make_lists.parse_args(["--voc12_root", str(voc)]))
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    with pytest.raises(InputError, match="split file not found"):
        make_lists.run(make_lists.parse_args(["--voc12_root", str(voc), "--out_dir", str(tmp_path)]))
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("")
    with pytest.raises(InputError, match=r"split file lists no image: .*train\.txt"):
        make_lists.run(make_lists.parse_args(["--voc12_root", str(voc), "--out_dir", str(tmp_path)]))
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000032\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("../../etc/passwd\n")
    with pytest.raises(InputError, match="lists '../../etc/passwd': split files name images, not paths"):
        make_lists.run(make_lists.parse_args(["--voc12_root", str(voc), "--out_dir", str(tmp_path)]))
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000032\n")
    with pytest.raises(InputError, match="no annotation for image 2007_000032"):
        make_lists.run(make_lists.parse_args(["--voc12_root", str(voc), "--out_dir", str(tmp_path)]))


def test_custom_class_list(tmp_path):
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Segmentation" / "train.txt").write_text("a\n")
    (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_text("b\n")
    obj = "<object><name>{}</name><difficult>1</difficult></object>"
    (tmp_path / "Annotations" / "a.xml").write_text(f"<annotation>{obj.format('moon')}</annotation>")
    (tmp_path / "Annotations" / "b.xml").write_text(f"<annotation>{obj.format('sun')}{obj.format('sun')}</annotation>")
    (tmp_path / "classes.txt").write_text("background\nsun\nmoon  # a comment\n")
    make_lists.run(make_lists.parse_args(["--voc12_root", str(tmp_path), "--out_dir", str(tmp_path),
                                          "--dataset_classes", str(tmp_path / "classes.txt")]))
    np.testing.assert_array_equal(load_image_labels(tmp_path / "cls_labels.npz", ["b", "a"], 2), [[1, 0], [0, 1]])
    with pytest.raises(InputError, match="holds 2 classes per image, the class list 3"):
        load_image_labels(tmp_path / "cls_labels.npz", ["a"], 3)
    with pytest.raises(InputError, match="no label for image c"):
        load_image_labels(tmp_path / "cls_labels.npz", ["a", "c", "d"], 2)
    with pytest.raises(InputError, match="label file not found"):
        load_image_labels(tmp_path / "nope.npz", ["a"], 2)


# --- a tiny VOC tree ---------------------------------------------------------------------------

SHAPE_VALUE, BACKGROUND_VALUE = 240, 25


def l_shape(size: tuple[int, int], top: int, left: int) -> np.ndarray:
    """An asymmetric L: a flip, a shift or a transposition would not map it onto itself."""
    mask = np.zeros(size, bool)
    mask[top:top + 30, left:left + 10] = True
    mask[top + 20:top + 30, left:left + 40] = True
    return mask


def write_tree(root: Path, sizes: list[tuple[int, int]], num_classes: int = VOC.num_classes) -> list[str]:
    """Images with an L shape (PNG bytes under .jpg names, so pixels are exact), a list, labels
    and boundary maps whose channel 1 is the L."""
    (root / "JPEGImages").mkdir(parents=True)
    names = [f"img_{i}" for i in range(len(sizes))]
    for i, (name, size) in enumerate(zip(names, sizes, strict=True)):
        mask = l_shape(size, 10 + 3 * i, 15 + 2 * i)
        img = np.where(mask[..., None], SHAPE_VALUE, BACKGROUND_VALUE).astype(np.uint8).repeat(3, axis=2)
        Image.fromarray(img).save(root / "JPEGImages" / f"{name}.jpg", format="PNG")
        sb_map = np.zeros((num_classes,) + size, np.float32)
        sb_map[1] = mask
        save_sb_map(root / "sb_map" / f"{name}.npz", sb_map)
    (root / "list.txt").write_text("".join(f"/JPEGImages/{n}.jpg /SegmentationClassAug/{n}.png\n" for n in names))
    labels = np.zeros((len(names), num_classes - 1), np.uint8)
    labels[:, 0] = 1
    save_image_labels(root / "cls_labels.npz", names, labels)
    return names


def denormalize(chw: np.ndarray) -> np.ndarray:
    std, mean = np.array(IMAGENET_STD)[:, None, None], np.array(IMAGENET_MEAN)[:, None, None]
    return (chw * std + mean) * 255


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / max((a | b).sum(), 1)


# --- joint transforms --------------------------------------------------------------------------

def shape_pair(size=(90, 120)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mask = l_shape(size, 20, 30)
    img = np.where(mask[..., None], SHAPE_VALUE, BACKGROUND_VALUE).astype(np.uint8).repeat(3, axis=2)
    sb_map = np.zeros((3,) + size, np.float32)
    sb_map[2] = mask
    return img, sb_map, mask


def image_mask(img: np.ndarray) -> np.ndarray:
    grey = img.astype(np.float32).mean(axis=2)
    return grey > (grey.min() + grey.max()) / 2


@pytest.mark.parametrize("seed", range(12))
def test_each_transform_keeps_image_and_map_aligned(seed):
    rng = np.random.default_rng(seed)
    img, sb_map, mask = shape_pair()
    label = mask.astype(np.uint8) * 7

    out, (m, lab) = imutils.random_resize_long(rng, img, [sb_map, label], 60, 200)
    assert out.shape[:2] == m.shape[1:] == lab.shape and max(out.shape[:2]) in range(60, 201)
    assert m.dtype == np.float32 and lab.dtype == np.uint8 and set(np.unique(lab)) <= {0, 7}
    assert iou(image_mask(out), m[2] > 0.5) > 0.9
    assert iou(image_mask(out), lab == 7) > 0.9
    assert not m[:2].any()  # empty channels stay empty

    flipped, (m, lab) = imutils.random_hflip(rng, img, [sb_map, label])
    np.testing.assert_array_equal(image_mask(flipped), m[2] > 0.5)
    np.testing.assert_array_equal(lab == 7, m[2] > 0.5)

    crop = int(rng.integers(40, 140))
    cropped, (m,) = imutils.random_crop(np.random.default_rng(seed), crop, img, [sb_map])
    _, (lab,) = imutils.random_crop(np.random.default_rng(seed), crop, img, [label], map_fill=255)
    assert cropped.shape == (crop, crop, 3) and m.shape == (3, crop, crop)
    np.testing.assert_array_equal(cropped[..., 0] == SHAPE_VALUE, m[2] > 0.5)
    valid = (cropped != 0).any(axis=2)  # the image is never 0, so 0 is padding
    np.testing.assert_array_equal(lab, np.where(valid, np.where(m[2] > 0.5, 7, 0), 255))
    assert valid.sum() == min(crop, img.shape[0]) * min(crop, img.shape[1])

    jittered = imutils.color_jitter(rng, img)
    np.testing.assert_array_equal(image_mask(jittered), mask)


def test_resize_map_matches_released_skimage_call():
    from skimage.transform import resize

    rng = np.random.default_rng(0)
    m = np.zeros((4, 30, 40), np.float32)
    m[1] = rng.uniform(0, 1, (30, 40))
    m[3, 10:20, 5:25] = 1
    expected = resize(m, (4, 45, 60), order=3, mode="edge")  # the released call, on all channels
    np.testing.assert_allclose(imutils.resize_map(m, (45, 60)), expected, atol=1e-5)
    np.testing.assert_allclose(imutils.resize_map(m, (20, 26)), resize(m, (4, 20, 26), order=3, mode="edge"),
                               atol=1e-5)


def test_crop_box_as_released():
    # A 5-row image in a 8-square: placed at offset 0..3; a 12-column one: cut at 0..4.
    seen_rows, seen_cols = set(), set()
    for seed in range(60):
        dst_rows, dst_cols, src_rows, src_cols = imutils.random_crop_box(np.random.default_rng(seed), (5, 12), 8)
        assert src_rows == slice(0, 5) and dst_cols == slice(0, 8)
        assert dst_rows.stop - dst_rows.start == 5 and src_cols.stop - src_cols.start == 8
        seen_rows.add(dst_rows.start)
        seen_cols.add(src_cols.start)
    assert seen_rows == {0, 1, 2, 3} and seen_cols == {0, 1, 2, 3, 4}


def test_block_mean_pads_like_block_reduce():
    from skimage.measure import block_reduce

    m = np.random.default_rng(1).uniform(0, 1, (2, 19, 13)).astype(np.float32)
    expected = block_reduce(m.transpose(1, 2, 0), (8, 8, 1), np.mean).transpose(2, 0, 1)
    np.testing.assert_allclose(imutils.block_mean(m, 8), expected, rtol=1e-6)


# --- datasets ----------------------------------------------------------------------------------

@pytest.fixture
def tree(tmp_path):
    names = write_tree(tmp_path, [(100, 130), (120, 90), (70, 70)])
    return tmp_path, names


def cls_dataset(root: Path, **kwargs) -> VOC12ClsDataset:
    kwargs = {"crop_size": 96, "resize_long": (80, 160), "sb_map_dir": root / "sb_map", **kwargs}
    return VOC12ClsDataset(root / "list.txt", root, root / "cls_labels.npz", VOC, **kwargs)


def test_cls_dataset_chain_keeps_alignment(tree):
    root, names = tree
    dataset = cls_dataset(root)
    for epoch in range(10):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            item = dataset[index]
            img, sb_map = item["img"].numpy(), item["sb_map"].numpy()
            assert img.shape == (3, 96, 96) and img.dtype == np.float32
            assert sb_map.shape == (VOC.num_classes, 96, 96) and sb_map.dtype == np.float32
            assert item["name"] == names[index]
            np.testing.assert_array_equal(item["label"].numpy(), np.eye(VOC.num_fg, dtype=np.float32)[0])
            valid = (img != 0).any(axis=0)  # padding is 0 after normalisation
            raw = denormalize(img).mean(axis=0)[valid]
            shape_img = np.zeros(valid.shape, bool)
            shape_img[valid] = raw > (raw.min() + raw.max()) / 2
            assert shape_img.any()
            assert iou(shape_img, sb_map[1] > 0.5) > 0.85, (epoch, index)
            assert not sb_map[:, ~valid].any()


def test_cls_item_is_a_function_of_seed_epoch_index(tree):
    root, _ = tree
    a, b = cls_dataset(root, seed=3), cls_dataset(root, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    first = a[1]
    _ = a[0], a[2]
    for item in (a[1], b[1]):
        assert torch.equal(item["img"], first["img"]) and torch.equal(item["sb_map"], first["sb_map"])
    b.set_epoch(3)
    assert not torch.equal(b[1]["img"], first["img"])
    assert not torch.equal(cls_dataset(root, seed=4)[1]["img"], cls_dataset(root, seed=3)[1]["img"])

    # The same items from worker processes, whatever the worker.
    loader = torch.utils.data.DataLoader(a, batch_size=1, num_workers=2)
    for index, batch in enumerate(loader):
        assert torch.equal(batch["img"][0], a[index]["img"])


def test_cls_dataset_without_maps_or_resize(tree):
    root, _ = tree
    dataset = cls_dataset(root, sb_map_dir=None, resize_long=None, crop_size=64)
    item = dataset[2]
    assert "sb_map" not in item and item["img"].shape == (3, 64, 64)
    # A 70x70 image in a 64 crop is only cut, never padded.
    assert (item["img"] != 0).any(dim=0).all()


def test_image_dataset(tree):
    root, names = tree
    item = VOC12ImageDataset(root / "list.txt", root)[1]
    assert item["name"] == names[1] and item["img"].shape == (120, 90, 3) and item["img"].dtype == np.uint8
    normalized = VOC12ImageDataset(root / "list.txt", root, normalize=True)[1]
    np.testing.assert_allclose(denormalize(normalized["img"].numpy()), item["img"].transpose(2, 0, 1), atol=1e-3)
    np.testing.assert_array_equal(normalized["orig"], item["img"])


def test_msf_views_are_scales_and_their_flips(tree):
    root, _ = tree
    scales = (0.5, 1.0, 1.25)
    dataset = VOC12ClsDatasetMSF(root / "list.txt", root, root / "cls_labels.npz", VOC, scales=scales)
    item = dataset[0]
    assert item["size"] == (100, 130) and item["orig"].shape == (100, 130, 3)
    assert len(item["img"]) == 2 * len(scales)
    for k, s in enumerate(scales):
        view, mirror = item["img"][2 * k], item["img"][2 * k + 1]
        assert view.shape == (3, round(100 * s), round(130 * s))
        assert torch.equal(mirror, torch.flip(view, dims=[-1]))
    np.testing.assert_allclose(denormalize(item["img"][2].numpy()), item["orig"].transpose(2, 0, 1), atol=1e-3)
    half = np.asarray(Image.fromarray(item["orig"]).resize((65, 50), Image.BICUBIC))
    np.testing.assert_allclose(denormalize(item["img"][0].numpy()), half.transpose(2, 0, 1), atol=1e-3)
    assert item["label"].shape == (VOC.num_fg,)


# --- affinity labels ---------------------------------------------------------------------------

def brute_force_affinity(label: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    h, w = label.shape
    offsets = search_offsets(radius)
    sources = [(y, x) for y in range(h - radius + 1) for x in range(radius - 1, w - radius + 1)]
    out = np.zeros((3, len(offsets), len(sources)), np.float32)
    for j, (y, x) in enumerate(sources):
        for i, (dy, dx) in enumerate(offsets):
            a, b = label[y, x], label[y + dy, x + dx]
            if a == 255 or b == 255:
                continue
            if a == b:
                out[0 if a == 0 else 1, i, j] = 1
            else:
                out[2, i, j] = 1
    return out[0], out[1], out[2]


@pytest.mark.parametrize("seed, size, radius", [(0, (12, 12), 5), (1, (9, 14), 5), (2, (10, 8), 3)])
def test_extract_affinity_labels_matches_double_loop(seed, size, radius):
    rng = np.random.default_rng(seed)
    label = rng.choice(np.array([0, 0, 3, 5, 255], np.uint8), size=size)
    for got, expected in zip(extract_affinity_labels(label, radius), brute_force_affinity(label, radius),
                             strict=True):
        np.testing.assert_array_equal(got, expected)


def test_affinity_label_rule():
    rng = np.random.default_rng(0)
    la_labels, ha_labels = np.array([0, 4, 9]), np.array([0, 4, 9])
    la, ha = rng.uniform(0, 1, (3, 6, 7)), rng.uniform(0, 1, (3, 6, 7))
    la[:, 0, 0] = ha[:, 0, 0] = 0  # no score: padding
    got = affinity_label(la_labels, la, ha_labels, ha)
    for y in range(6):
        for x in range(7):
            la_cls, ha_cls = la_labels[la[:, y, x].argmax()], ha_labels[ha[:, y, x].argmax()]
            expected = 0 if ha_cls == 0 else (la_cls if la_cls != 0 else 255)
            assert got[y, x] == (255 if (y, x) == (0, 0) else expected)


def aff_tree(root: Path, names: list[str], crf_shape=None) -> tuple[Path, Path]:
    la_dir, ha_dir = root / "crf_la", root / "crf_ha"
    for name in names:
        h, w = crf_shape or np.asarray(Image.open(root / "JPEGImages" / f"{name}.jpg")).shape[:2]
        scores = np.zeros((2, h, w), np.float32)
        scores[0] = 0.9  # everything is background
        scores[1] = 0.1
        save_scores(la_dir / f"{name}.npz", [0, 1], scores)
        save_scores(ha_dir / f"{name}.npz", [0, 1], scores)
    return la_dir, ha_dir


def test_aff_dataset(tree):
    root, names = tree
    la_dir, ha_dir = aff_tree(root, names)
    dataset = VOC12AffDataset(root / "list.txt", root, la_dir, ha_dir, crop_size=64, radius=5, seed=1)
    item = dataset[2]  # 70x70 image, 64 crop: no padding, all background
    assert item["img"].shape == (3, 64, 64)
    # An 8x8 label map is too small for radius 5: AffinityNet's fallback radius 3 (12 offsets),
    # sources in rows 0..5 and columns 2..5.
    assert item["aff_bg"].shape == (len(search_offsets(3)), 6 * 4)
    assert item["aff_bg"].all() and not item["aff_fg"].any() and not item["aff_neg"].any()

    padded = VOC12AffDataset(root / "list.txt", root, la_dir, ha_dir, crop_size=128, radius=5)
    for index in range(3):  # all images are smaller than 128: the padding is ignored
        item = padded[index]
        assert item["aff_bg"].shape == (len(search_offsets(5)), (16 - 4) * (16 - 8))
        assert 0 < item["aff_bg"].sum() < item["aff_bg"].numel() and not item["aff_neg"].any()
    dataset.set_epoch(1)
    again = VOC12AffDataset(root / "list.txt", root, la_dir, ha_dir, crop_size=64, radius=5, seed=1)
    again.set_epoch(1)
    assert torch.equal(dataset[0]["img"], again[0]["img"])


# --- bad inputs --------------------------------------------------------------------------------

def test_bad_inputs_raise_one_line_errors(tree, tmp_path):
    root, names = tree
    labels = root / "cls_labels.npz"
    with pytest.raises(InputError, match="VOC2012 folder not found"):
        VOC12ImageDataset(root / "list.txt", root / "missing")
    with pytest.raises(InputError, match="image list not found"):
        VOC12ClsDataset(root / "nope.txt", root, labels, VOC)
    (root / "more.txt").write_text("img_0\nimg_9\n")
    with pytest.raises(InputError, match=r"image file not found: .*img_9\.jpg"):
        VOC12ImageDataset(root / "more.txt", root)
    save_image_labels(tmp_path / "two.npz", names[:2], np.ones((2, VOC.num_fg)))
    with pytest.raises(InputError, match="has no label for image img_2"):
        VOC12ClsDatasetMSF(root / "list.txt", root, tmp_path / "two.npz", VOC)
    with pytest.raises(InputError, match="classes per image"):
        VOC12ClsDataset(root / "list.txt", root, labels, ClassList(("a", "b")))
    (root / "sb_map" / "img_1.npz").unlink()
    with pytest.raises(InputError, match=r"boundary map not found: .*img_1\.npz"):
        cls_dataset(root)
    save_sb_map(root / "sb_map" / "img_1.npz", np.zeros((VOC.num_classes, 50, 50)))
    with pytest.raises(InputError, match=r"img_1\.npz is 50x50, its image 120x90"):
        cls_dataset(root)[1]
    save_sb_map(root / "sb_map" / "img_1.npz", np.zeros((3, 120, 90)))
    with pytest.raises(InputError, match="has 3 channels"):
        cls_dataset(root)[1]
    (root / "JPEGImages" / "img_1.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(InputError, match=r"img_1\.jpg does not decode"):
        VOC12ImageDataset(root / "list.txt", root)[1]

    la_dir, ha_dir = aff_tree(root, names, crf_shape=(10, 10))
    with pytest.raises(InputError, match=r"img_0\.npz holds 10x10, its image is 100x130"):
        VOC12AffDataset(root / "list.txt", root, la_dir, ha_dir, crop_size=64)[0]
    (ha_dir / "img_2.npz").unlink()
    with pytest.raises(InputError, match=r"CRF score file not found: .*img_2\.npz"):
        VOC12AffDataset(root / "list.txt", root, la_dir, ha_dir)
