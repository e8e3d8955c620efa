"""The synthetic demo dataset (voc12/demo.py)."""
from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from tool.fileio import load_img_name_list, load_label_png, read_image
from voc12.classes import IGNORE_INDEX, VOC, load_classes
from voc12.data import VOC12ClsDataset, load_image_labels
from voc12.demo import class_appearances, make_demo_dataset, make_image
from voc12.make_lists import SPLIT_FOLDER


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    classes = make_demo_dataset(root, num_train=24, num_val=8, image_size=112, seed=5)
    assert classes == VOC
    return root


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(demo, tmp_path):
    make_demo_dataset(tmp_path / "again", num_train=24, num_val=8, image_size=112, seed=5)
    assert all_files(tmp_path / "again") == all_files(demo)
    make_demo_dataset(tmp_path / "other", num_train=4, num_val=0, image_size=112, seed=6)
    other = all_files(tmp_path / "other")
    assert other["JPEGImages/train_00000.jpg"] != all_files(demo)["JPEGImages/train_00000.jpg"]


def objects(xml_path: Path) -> list[dict]:
    root = ET.parse(xml_path).getroot()
    return [{"name": o.findtext("name"), "truncated": int(o.findtext("truncated")),
             "difficult": int(o.findtext("difficult")),
             "box": [int(o.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]}
            for o in root.iter("object")]


def test_masks_agree_with_xml_and_labels(demo):
    classes = load_classes(demo / "classes.txt")
    assert classes == VOC
    names = load_img_name_list(demo / "train.txt") + load_img_name_list(demo / "val.txt")
    labels = load_image_labels(demo / "cls_labels.npz", names, classes.num_fg)
    for name, label in zip(names, labels, strict=True):
        mask = load_label_png(demo / "SegmentationClass" / f"{name}.png")
        img = read_image(demo / "JPEGImages" / f"{name}.jpg")
        assert mask.shape == img.shape[:2] and max(mask.shape) == 112
        objs = objects(demo / "Annotations" / f"{name}.xml")
        assert 1 <= len(objs) <= 3
        in_mask = set(np.unique(mask).tolist()) - {0, IGNORE_INDEX}
        in_xml = {classes.index(o["name"]) + 1 for o in objs}
        assert in_mask == in_xml, name
        np.testing.assert_array_equal(np.flatnonzero(label) + 1, sorted(in_xml))
        # Every pixel of a class lies in a box of an object of that class (1-based, inclusive).
        for c in in_xml:
            inside = np.zeros(mask.shape, bool)
            for o in objs:
                if classes.index(o["name"]) + 1 == c:
                    x0, y0, x1, y1 = o["box"]
                    assert 1 <= x0 <= x1 <= mask.shape[1] and 1 <= y0 <= y1 <= mask.shape[0]
                    inside[y0 - 1:y1, x0 - 1:x1] = True
            assert not ((mask == c) & ~inside).any()
        # The ignore band separates different labels, as in VOC.
        assert (mask == IGNORE_INDEX).any()
        horizontal = (mask[:, 1:] != mask[:, :-1]) & (mask[:, 1:] != IGNORE_INDEX) & (mask[:, :-1] != IGNORE_INDEX)
        assert not horizontal.any()


def test_some_objects_are_truncated_and_some_difficult():
    """VOC's flags, over 200 scenes: objects cut by the border, and small or mostly hidden ones."""
    looks = class_appearances(VOC.num_fg)
    annotations = [a for i in range(200) for a in make_image(np.random.default_rng([5, 0, i]), (112, 100), looks)[2]]
    truncated = np.mean([a["truncated"] for a in annotations])
    difficult = np.mean([a["difficult"] for a in annotations])
    assert 0.2 < truncated < 0.9 and 0.01 < difficult < 0.3


def test_lists_match_splits(demo):
    for split in ("train", "val"):
        split_names = (demo / SPLIT_FOLDER / f"{split}.txt").read_text().split()
        assert load_img_name_list(demo / f"{split}.txt") == split_names
        assert len(split_names) == {"train": 24, "val": 8}[split]


def test_custom_class_count(tmp_path):
    classes = make_demo_dataset(tmp_path, num_train=10, num_val=2, image_size=96, num_classes=5)
    assert classes.num_fg == 5 and load_classes(tmp_path / "classes.txt") == classes
    names = load_img_name_list(tmp_path / "train.txt")
    labels = load_image_labels(tmp_path / "cls_labels.npz", names, 5)
    assert labels.shape == (10, 5) and labels.sum(axis=1).min() >= 1
    for name in names:
        mask = load_label_png(tmp_path / "SegmentationClass" / f"{name}.png")
        assert mask[mask != IGNORE_INDEX].max() <= 5
    item = VOC12ClsDataset(tmp_path / "train.txt", tmp_path, tmp_path / "cls_labels.npz", classes,
                           crop_size=64, resize_long=(64, 128))[0]
    assert item["img"].shape == (3, 64, 64) and item["label"].shape == (5,)


def test_generation_is_fast(tmp_path):
    tic = time.perf_counter()
    make_demo_dataset(tmp_path, num_train=80, num_val=20, image_size=160)
    assert time.perf_counter() - tic < 15
