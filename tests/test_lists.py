"""The shipped VOC 2012 / SBD lists and labels, make_lists' check against them, text encodings."""
from __future__ import annotations

import numpy as np
import pytest

from tool.errors import InputError
from tool.fileio import load_img_name_list, read_text
from voc12 import make_lists
from voc12.classes import VOC, load_classes
from voc12.data import load_image_labels

SHIPPED = make_lists.SHIPPED_DIR


def test_shipped_lists_counts_and_labels():
    lists = {split: load_img_name_list(SHIPPED / f"{split}.txt") for split in ("train", "val", "train_aug")}
    assert {k: len(v) for k, v in lists.items()} == {"train": 1464, "val": 1449, "train_aug": 10582}
    assert all(len(set(v)) == len(v) for v in lists.values())
    assert set(lists["train"]) <= set(lists["train_aug"]) and not set(lists["val"]) & set(lists["train_aug"])
    assert lists["train"][0] == "2007_000032"
    labels = load_image_labels(SHIPPED / "cls_labels.npz", lists["train_aug"] + lists["val"], VOC.num_fg)
    assert labels.shape == (12031, 20) and set(np.unique(labels)) == {0.0, 1.0}
    assert labels.sum(axis=1).min() >= 1  # every VOC image holds an object
    # 2007_000032 (tests/data/voc_xml): aeroplanes and people.
    np.testing.assert_array_equal(np.nonzero(labels[0])[0], [VOC.index("aeroplane"), VOC.index("person")])
    assert labels.sum(axis=0)[VOC.index("person")] == 4600  # the released cls_labels.npy count


def test_make_lists_reports_difference_from_shipped(tmp_path):
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    make_lists.write_list(shipped / "train.txt", ["a", "b"])
    make_lists.write_list(shipped / "val.txt", ["c"])
    same = make_lists.compare_with_shipped({"train": ["b", "a"], "val": ["c"]}, shipped)
    assert same == f"train, val match the shipped lists in {shipped}"
    differ = make_lists.compare_with_shipped({"train": ["a", "x", "y"], "val": ["c"]}, shipped)
    assert "\n" not in differ
    assert differ.endswith("train: 2 images only in yours (e.g. x), 1 only in the shipped list (e.g. b)")


def test_text_files_with_bom_and_utf16(tmp_path):
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffcat\ndog\n".encode())
    assert load_classes(bom).names == ("cat", "dog")
    bom.write_bytes("\ufeff2007_000032\n".encode())
    assert load_img_name_list(bom) == ["2007_000032"]
    utf16 = tmp_path / "utf16.txt"
    utf16.write_text("cat\ndog\n", encoding="utf-16")
    for read in (load_classes, load_img_name_list, read_text):
        with pytest.raises(InputError, match="is UTF-16 or UTF-32 text .*save it as UTF-8"):
            read(utf16)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match="is not UTF-8 text"):
        load_classes(latin)
