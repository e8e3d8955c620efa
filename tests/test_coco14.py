"""coco14.prepare on a small COCO in the official format: masks against pycocotools' own annToMask,
lists, labels, classes, links, resume, refusals; then every stage on the prepared dataset."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

import run_pipeline
from coco14 import prepare
from coco14.synthetic import COCO_CATEGORIES, make_synthetic_coco
from network import resnet38_sb
from tool import provenance
from tool.fileio import load_img_name_list, load_label_png, output_files, read_image
from voc12.classes import load_classes
from voc12.data import load_image_labels

ROOT = Path(__file__).resolve().parents[1]
NUM_TRAIN, NUM_VAL = 10, 7  # 4 hand-made images and 6 / 3 random scenes


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    return make_synthetic_coco(tmp_path_factory.mktemp("coco") / "COCO")


@pytest.fixture(scope="module")
def prepared(coco: Path) -> tuple[Path, dict]:
    out = coco.parent / "COCO14"
    return out, prepare.main(["--coco_root", str(coco), "--out_root", str(out), "--num_workers", "2"])


def expected_mask(coco: COCO, image_id: int) -> np.ndarray:
    """The documented rule from pycocotools' annToMask: crowd 255 first, then instances by
    decreasing pixel count, equal counts in annotation order (later on top)."""
    img = coco.imgs[image_id]
    label_of = {cat_id: k + 1 for k, cat_id in enumerate(sorted(coco.cats))}
    mask = np.zeros((img["height"], img["width"]), np.uint8)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
    for ann in anns:
        if ann["iscrowd"]:
            mask[coco.annToMask(ann) == 1] = 255
    objects = [(coco.annToMask(ann), label_of[ann["category_id"]]) for ann in anns if not ann["iscrowd"]]
    areas = [int(m.astype(np.int64).sum()) for m, _ in objects]
    for k in sorted(range(len(objects)), key=lambda k: (-areas[k], k)):
        mask[objects[k][0] == 1] = objects[k][1]
    return mask


def test_masks_match_pycocotools(coco: Path, prepared):
    out, summary = prepared
    assert summary["images"] == {"train": NUM_TRAIN, "val": NUM_VAL}
    for split in ("train", "val"):
        index = COCO(str(coco / "annotations" / f"instances_{split}2014.json"))
        assert summary["written"][split] == len(index.imgs)
        for image_id, img in index.imgs.items():
            ours = Image.open(out / "SegmentationClass" / img["file_name"].replace(".jpg", ".png"))
            assert ours.mode == "P"
            np.testing.assert_array_equal(np.asarray(ours), expected_mask(index, image_id), img["file_name"])


def test_overlap_crowd_and_sparse_ids_by_hand(prepared):
    out, _ = prepared
    first, second, empty, crowd_only = (load_label_png(out / "SegmentationClass" / f"COCO_train2014_{i:012d}.png")
                                        for i in (9, 10, 11, 12))
    person, train, bottle, toothbrush = 1, 7, 40, 80  # COCO ids 1, 7, 44, 90
    assert first[30, 30] == train  # the small train over the large person, though listed first
    assert first[30, 45] == person and first[10, 30] == person  # the person inside the crowd region
    assert first[2, 2] == 255 and first[60, 2] == 0
    assert first[50, 68] == bottle and first[12, 68] == bottle  # both parts of the polygon
    assert second[25, 30] == bottle  # equal areas: the later on top
    assert second[15, 15] == toothbrush and second[50, 10] == 255
    assert not empty.any()
    assert set(np.unique(crowd_only)) == {0, 255}


def test_lists_labels_classes_and_links(coco: Path, prepared):
    out, summary = prepared
    classes = load_classes(out / "classes.txt")
    assert classes.names == tuple(name for _, name in COCO_CATEGORIES) and classes.num_classes == 81
    assert summary["unlabeled"] == {"train": 2, "val": 2}  # no annotation; a crowd region only
    for split, num in (("train", NUM_TRAIN), ("val", NUM_VAL)):
        index = COCO(str(coco / "annotations" / f"instances_{split}2014.json"))
        every = sorted(Path(img["file_name"]).stem for img in index.imgs.values())
        assert (out / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split() == every
        labelled = load_img_name_list(out / f"{split}.txt")
        assert len(labelled) == num - 2
        lines = (out / f"{split}.txt").read_text().splitlines()
        assert lines[0] == f"/JPEGImages/{labelled[0]}.jpg /SegmentationClassAug/{labelled[0]}.png"
        labels = load_image_labels(out / "cls_labels.npz", labelled, 80)
        sorted_ids = sorted(index.cats)
        for name, label in zip(labelled, labels, strict=True):
            image_id = next(i for i, img in index.imgs.items() if img["file_name"] == f"{name}.jpg")
            cats = {a["category_id"] for a in index.loadAnns(index.getAnnIds(imgIds=[image_id])) if not a["iscrowd"]}
            assert np.flatnonzero(label).tolist() == sorted(sorted_ids.index(c) for c in cats)
        with_objects = {Path(index.imgs[a["image_id"]]["file_name"]).stem for a in index.dataset["annotations"]
                        if not a["iscrowd"]}
        assert labelled == sorted(with_objects)
        for name in every:
            link = out / "JPEGImages" / f"{name}.jpg"
            assert link.is_symlink() and link.resolve() == (coco / f"{split}2014" / f"{name}.jpg").resolve()


def test_greyscale_jpeg_reads_as_rgb(coco: Path, prepared):
    out, _ = prepared
    name = "COCO_train2014_000000000009"
    assert Image.open(coco / "train2014" / f"{name}.jpg").mode == "L"
    rgb = read_image(out / "JPEGImages" / f"{name}.jpg")
    grey = np.asarray(Image.open(coco / "train2014" / f"{name}.jpg"))
    assert rgb.shape == (*grey.shape, 3)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], grey)


def test_resume_keeps_finished_masks_and_refuses_other_annotations(coco: Path, prepared, tmp_path: Path, capsys):
    out, _ = prepared
    copy = Path(shutil.copytree(out, tmp_path / "COCO14", symlinks=True))
    masks = output_files(copy / "SegmentationClass", ".png")
    removed = masks[::3]
    for path in removed:  # the state a kill leaves: finished masks, missing ones, a writer's temporary
        path.unlink()
    (copy / "SegmentationClass" / f".{removed[0].name}.abc.tmp.png").write_bytes(b"half")
    os.utime(masks[1], ns=(1, 1))
    argv = ["--coco_root", str(coco), "--out_root", str(copy), "--num_workers", "0"]
    summary = prepare.main(argv)
    assert sum(summary["written"].values()) == len(removed)
    assert masks[1].stat().st_mtime_ns == 1  # kept, not rewritten
    for path in masks:
        np.testing.assert_array_equal(load_label_png(path), load_label_png(out / "SegmentationClass" / path.name))

    ann_path = coco.parent / "edited" / "annotations" / "instances_val2014.json"
    edited = Path(shutil.copytree(coco, coco.parent / "edited", symlinks=True))
    data = json.loads(ann_path.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] != 1]
    ann_path.write_text(json.dumps(data))
    with pytest.raises(SystemExit):
        prepare.main(["--coco_root", str(edited), "--out_root", str(copy), "--num_workers", "0"])
    assert "masks made from another instances_val2014.json; pass --overwrite" in capsys.readouterr().err
    summary = prepare.main(["--coco_root", str(edited), "--out_root", str(copy), "--num_workers", "0", "--overwrite"])
    assert summary["written"] == {"train": NUM_TRAIN, "val": NUM_VAL}
    index = COCO(str(ann_path))
    for image_id, img in index.imgs.items():
        np.testing.assert_array_equal(load_label_png(copy / "SegmentationClass" / img["file_name"].replace(
            ".jpg", ".png")), expected_mask(index, image_id))


def one_line_error(capsys, argv: list[str], match: str) -> None:
    with pytest.raises(SystemExit) as exc:
        prepare.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err


def test_a_held_out_root_an_unreadable_record_and_masks_it_did_not_write(coco: Path, prepared, tmp_path: Path,
                                                                         capsys):
    out, _ = prepared
    copy = Path(shutil.copytree(out, tmp_path / "COCO14", symlinks=True))
    argv = ["--coco_root", str(coco), "--out_root", str(copy), "--num_workers", "0"]
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from tool.fileio import hold_folder; hold_folder(sys.argv[2]); print(flush=True); "
                               "time.sleep(60)", str(ROOT), str(copy)], stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()
        one_line_error(capsys, argv, f"{copy} is in use by another run")
    finally:
        holder.kill()
        holder.wait()
    masks = {p.name: p.read_bytes() for p in output_files(copy / "SegmentationClass", ".png")}
    record = copy / prepare.SOURCE_RECORD_NAME
    record.write_text(record.read_text()[:12])
    one_line_error(capsys, argv, f"{record} is unreadable (cut short or not a record), so the origin of the masks in "
                                 f"{copy / 'SegmentationClass'} is unknown; pass --overwrite to remake them")
    record.unlink()  # as if the masks were put there by hand: never deleted, --overwrite or not
    for extra in ([], ["--overwrite"]):
        one_line_error(capsys, argv + extra, f"holds {NUM_TRAIN} train masks this tool did not write (first: "
                                             "COCO_train2014_000000000009.png); choose an empty --out_root")
    assert {p.name: p.read_bytes() for p in output_files(copy / "SegmentationClass", ".png")} == masks


@pytest.mark.parametrize(("breakage", "match"), [
    ("no_val_folder", "val2014 not found; expected COCO's layout"),
    ("no_annotations", "instances_train2014.json not found"),
    ("not_json", "is not JSON"),
    ("captions", "is not a COCO instances file: an annotation lacks one of"),
    ("list", "is not a COCO instances file: its top level is a list"),
    ("unknown_category", "has category 12, which 'categories' does not name"),
    ("missing_image", "images of instances_val2014.json are not in"),
])
def test_refusals(coco: Path, tmp_path: Path, capsys, breakage: str, match: str):
    root = Path(shutil.copytree(coco, tmp_path / "COCO"))
    train_json, val_json = (root / "annotations" / f"instances_{s}2014.json" for s in ("train", "val"))
    if breakage == "no_val_folder":
        shutil.rmtree(root / "val2014")
    elif breakage == "no_annotations":
        train_json.unlink()
    elif breakage == "not_json":
        train_json.write_text("{'images': []")
    elif breakage == "captions":
        data = json.loads(train_json.read_text())
        data["annotations"] = [{"image_id": a["image_id"], "id": a["id"], "caption": "a cat"}
                               for a in data["annotations"]]
        train_json.write_text(json.dumps(data))
    elif breakage == "list":
        train_json.write_text("[]")
    elif breakage == "unknown_category":
        data = json.loads(train_json.read_text())
        data["annotations"][0]["category_id"] = 12
        train_json.write_text(json.dumps(data))
    elif breakage == "missing_image":
        next((root / "val2014").glob("*.jpg")).unlink()
    one_line_error(capsys, ["--coco_root", str(root), "--out_root", str(tmp_path / "out"), "--num_workers", "0"],
                   match)
    one_line_error(capsys, ["--coco_root", str(tmp_path / "nowhere"), "--out_root", str(tmp_path / "out")],
                   "COCO folder not found")


def test_the_pipeline_runs_every_stage_on_coco(coco: Path, prepared, tmp_path: Path):
    """run_pipeline.py --coco_root: prepares (here: finds the prepared masks) and runs the chain."""
    out, _ = prepared
    train = tmp_path / "train5.txt"  # 5 labelled images: 2 steps of batch 2, one of DeepLab's batch of 5
    train.write_text("".join(line + "\n" for line in (out / "train.txt").read_text().splitlines()[:5]))
    shutil.copy(out / "cls_labels.npz", tmp_path)  # the labels beside the list
    narrow = tmp_path / "narrow.pth"
    torch.save(resnet38_sb.Net(num_classes=len(COCO_CATEGORIES) + 1, width=0.125).state_dict(), narrow)
    work = tmp_path / "out"
    argv = ["--coco_root", coco, "--coco14_root", out, "--weights", narrow, "--out_dir", work, "--train_list", train,
            "--eval_train_list", train, "--backbone_width", "0.125", "--batch_size", "2", "--crop_size", "64",
            "--resize_long", "56", "80", "--round1_epoches", "1", "--sb_epoches", "1", "--aff_epoches", "1",
            "--num_workers", "0", "--seg_backbone", "resnet38", "--seg_iters", "1"]
    results = run_pipeline.run(run_pipeline.get_arg_parser().parse_args([str(a) for a in argv]))
    names = load_img_name_list(train)
    labels = load_image_labels(out / "cls_labels.npz", names, len(COCO_CATEGORIES))
    for name, label in zip(names, labels, strict=True):
        pred = load_label_png(work / "rw_train" / f"{name}.png")
        assert pred.shape == load_label_png(out / "SegmentationClass" / f"{name}.png").shape
        assert set(np.unique(pred).tolist()) <= {0, *(np.flatnonzero(label) + 1).tolist()}
    log = (work / "evallog.txt").read_text()
    per_class = log[log.index("\trw_train"):].splitlines()[1]
    scored = [item.split(":")[0] for item in per_class.split("  ") if item.strip()]
    assert scored[:-2] == ["background", *load_classes(out / "classes.txt").names] and scored[-2] == "mIoU"
    assert set(results["rw"]) == {"train", "val"} and 0 <= results["rw"]["val"] <= 100
    assert results["provenance"]["rw_train"] == provenance.folder_digest(work / "rw_train")  # infer_aff's record


def test_the_pipeline_refuses_a_class_list_beside_coco(coco: Path, tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_pipeline.main(["--coco_root", str(coco), "--dataset_classes", str(tmp_path / "classes.txt"),
                           "--out_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("drop --dataset_classes")


BROKEN = (  # segmentations pycocotools cannot read, and the reason each warning gives
    ([], "an empty segmentation"),
    ([[10.0, 10.0, 40.0, 40.0]], "a polygon of fewer than 3 points (4 numbers: pycocotools would take it for a box)"),
    ([[10.0, 10.0]], "a polygon of fewer than 3 points (2 numbers)"),
    ([[10, 10, 40, 10, 40, 40, 25]], "a polygon of 7 numbers, an odd count"),
    ([[10, 10, 40, 10, 40, 40], [5, 5, 9, 5, 9]], "a polygon of 5 numbers, an odd count"),
    ([[10, 10, 40, 10, float("nan"), 40]], "a polygon with a coordinate that is not finite"),
    ([[10, 10, 40, 10, 1e9, 40]], "a polygon farther outside the image than its size"),
    ([[10, 10, "40", 10, 40, 40]], "a polygon that is not a list of numbers"),
    ({"size": [64, 80]}, "an RLE without 'counts' and 'size'"),
)


def test_unreadable_segmentations_are_skipped_and_labels_match_the_masks(coco: Path, prepared, tmp_path: Path,
                                                                         capsys):
    """Broken annotations of a class (dog) the first image lacks: skipped, named, counted; that
    image's mask and labels stay the clean run's. A scene whose every instance is a 4-number
    polygon: a background mask, no image-level label, out of train.txt. Each used to end the run
    with a traceback from pycocotools (the odd counts were drawn without their last number)."""
    out, clean = prepared
    root = Path(shutil.copytree(coco, tmp_path / "COCO"))
    train_json = root / "annotations" / "instances_train2014.json"
    data = json.loads(train_json.read_text())
    first, scene = data["images"][0], data["images"][-1]
    first_name, scene_name = (Path(img["file_name"]).stem for img in (first, scene))
    next_id = max(a["id"] for a in data["annotations"]) + 1
    data["annotations"] += [{"id": next_id + k, "image_id": first["id"], "category_id": 18, "segmentation": seg,
                             "iscrowd": 0, "area": 0.0, "bbox": [0, 0, 1, 1]} for k, (seg, _) in enumerate(BROKEN)]
    scene_ids = [a["id"] for a in data["annotations"] if a["image_id"] == scene["id"]]
    for ann in data["annotations"]:
        if ann["image_id"] == scene["id"]:
            ann["segmentation"] = [[1, 2, 30, 40]]
    train_json.write_text(json.dumps(data))

    summary = prepare.main(["--coco_root", str(root), "--out_root", str(tmp_path / "COCO14"), "--num_workers", "2"])
    new = tmp_path / "COCO14"
    err = capsys.readouterr().err.splitlines()
    assert summary["skipped"] == {"train": len(BROKEN) + len(scene_ids), "val": 0}
    expected = [f"warning: train: skipped annotation {next_id + k} of {first_name}: {reason}"
                for k, (_, reason) in enumerate(BROKEN)]
    expected += [f"warning: train: skipped annotation {i} of {scene_name}: a polygon of fewer than 3 points "
                 "(4 numbers: pycocotools would take it for a box)" for i in scene_ids]
    assert sorted(err) == sorted(expected)

    for path in output_files(out / "SegmentationClass", ".png"):
        mask = load_label_png(new / "SegmentationClass" / path.name)
        if path.stem == scene_name:
            assert not mask.any() and load_label_png(path).any()
        else:
            np.testing.assert_array_equal(mask, load_label_png(path), path.name)
    clean_train = load_img_name_list(out / "train.txt")
    assert load_img_name_list(new / "train.txt") == [n for n in clean_train if n != scene_name]
    kept = load_img_name_list(new / "train.txt")
    np.testing.assert_array_equal(load_image_labels(new / "cls_labels.npz", kept, 80),
                                  load_image_labels(out / "cls_labels.npz", kept, 80))
    with np.load(new / "cls_labels.npz") as z:
        assert scene_name not in z["names"]
