r"""MS COCO 2014 in the layout every stage reads::

    python -m coco14.prepare --coco_root COCO --out_root COCO14 [--num_workers 8] [--overwrite]

Reads the official layout (``COCO/train2014/*.jpg``, ``COCO/val2014/*.jpg``,
``COCO/annotations/instances_{train,val}2014.json``) with pycocotools and writes into ``COCO14``:

- ``JPEGImages/NAME.jpg``: symbolic links to the originals, names kept
  (``COCO_train2014_000000000009``);
- ``classes.txt``: the category names in category-id order (every stage's ``--dataset_classes``);
- ``SegmentationClass/NAME.png``: a palette PNG for every image; category ids (1..90 on COCO, 80 of
  them used) map to 1..K in id order, background 0, crowd regions 255 (ignored by evaluation);
- ``ImageSets/Segmentation/{train,val}.txt``: every image of each split, one name a line;
- ``train.txt``, ``val.txt``, ``cls_labels.npz``: the images that have an image-level label, i.e.
  at least one non-crowd object, as ``voc12.make_lists`` writes them. Images without one (no
  annotation, or crowd regions only) stay out of these lists; their number is logged.

An annotation whose segmentation pycocotools cannot read is skipped with a warning naming it and
its image, and the skipped ones are counted in the log: an empty segmentation, a polygon of an odd
number of coordinates, of fewer than 3 points (pycocotools takes one of 4 numbers for a box), of
values that are not finite numbers or lie farther outside the image than its size (pycocotools'
memory grows with the distance), an RLE without ``counts`` or ``size``. The image-level labels are
those of the instances in the mask: an image keeps a class only if one of its readable non-crowd
instances has it.

Overlaps: crowd regions are painted 255 first, then the non-crowd instances over them, larger
before smaller, so a smaller object lies on top of a larger one it overlaps (a cup on a table, a
person on a sofa); instances of equal area go in annotation order, the later on top. An
instance's area is its pixel count (``pycocotools.mask.area`` of its RLE). A pixel covered by
an instance is that instance's class even inside a crowd region.

Masks are written atomically by ``--num_workers`` processes, so a mask is finished iff its PNG
exists and a killed run picks up where it stopped. ``prepare_source.json`` records the SHA-256 of
each annotation file the masks came from; masks made from another file are refused unless
``--overwrite``, which remakes them all.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, ProcessPoolExecutor, wait
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from tool.cli import run_main
from tool.errors import InputError
from tool.fileio import atomic_path, held_folders, hold_folder, output_files, save_label_png
from tool.logutils import progress, setup_logging
from tool.workers import die_with_parent
from voc12.classes import IGNORE_INDEX
from voc12.data import IMG_FOLDER_NAME, LABEL_FILE_NAME, save_image_labels
from voc12.make_lists import SPLIT_FOLDER, write_list

SPLITS = ("train", "val")
LAYOUT = "COCO/train2014/*.jpg, COCO/val2014/*.jpg, COCO/annotations/instances_{train,val}2014.json"
MASK_FOLDER_NAME = "SegmentationClass"
CLASSES_FILE_NAME = "classes.txt"
SOURCE_RECORD_NAME = "prepare_source.json"
IMAGE_KEYS = frozenset({"id", "file_name", "height", "width"})
ANNOTATION_KEYS = frozenset({"image_id", "category_id", "segmentation", "iscrowd"})
CHUNK_SIZE = 32  # images per task: large enough to amortise the transfer, small for a smooth bar
CHUNKS_IN_FLIGHT_PER_WORKER = 4  # bounds the annotations queued for the workers
WARNINGS_PER_SPLIT = 20  # skipped annotations named one by one; the log counts them all

# One annotation as a worker needs it: (segmentation, label 1..K, crowd).
Instance = tuple[Any, int, bool]
# One mask to write: (name, height, width, instances in annotation order).
MaskJob = tuple[str, int, int, list[Instance]]


def split_paths(coco_root: Path, split: str) -> tuple[Path, Path]:
    """The image folder and the instances file of a split in the official layout."""
    return coco_root / f"{split}2014", coco_root / "annotations" / f"instances_{split}2014.json"


def check_layout(coco_root: Path) -> None:
    if not coco_root.is_dir():
        raise InputError(f"COCO folder not found: {coco_root}")
    for split in SPLITS:
        image_dir, annotation_file = split_paths(coco_root, split)
        for path, found in ((image_dir, image_dir.is_dir()), (annotation_file, annotation_file.is_file())):
            if not found:
                raise InputError(f"{path} not found; expected COCO's layout {LAYOUT}")


def _not_instances(data: Any) -> str | None:
    """Why ``data`` is not a COCO instances file, or None if it is one."""
    if not isinstance(data, dict):
        return f"its top level is a {type(data).__name__}, not an object"
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            return f"it has no '{key}' list"
    if not data["categories"]:
        return "it names no category"
    if not all(isinstance(c, dict) and isinstance(c.get("id"), int) and isinstance(c.get("name"), str)
               for c in data["categories"]):
        return "a category lacks an integer 'id' or a 'name'"
    if not all(isinstance(i, dict) and IMAGE_KEYS <= i.keys() for i in data["images"]):
        return f"an image lacks one of {sorted(IMAGE_KEYS)}"
    if not all(isinstance(a, dict) and ANNOTATION_KEYS <= a.keys() for a in data["annotations"]):
        return f"an annotation lacks one of {sorted(ANNOTATION_KEYS)}"
    return None


def load_instances(path: Path) -> tuple[COCO, str]:
    """The pycocotools index of an instances file, and the SHA-256 of the file."""
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise InputError(f"{path} is not JSON ({e})") from None
    del raw
    problem = _not_instances(data)
    if problem is not None:
        raise InputError(f"{path} is not a COCO instances file: {problem}")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints two progress lines
        coco.createIndex()
    if len(coco.cats) != len(data["categories"]):
        raise InputError(f"{path} names a category id twice")
    return coco, digest


def class_names(coco: COCO) -> list[str]:
    """Category names in id order: label k + 1 is the k-th."""
    return [coco.cats[i]["name"] for i in sorted(coco.cats)]


def image_name(image: dict) -> str:
    return Path(image["file_name"]).stem


def unreadable(segmentation: Any, height: int, width: int) -> str | None:
    """Why pycocotools cannot read ``segmentation`` (see the module docstring), or None if it can."""
    if isinstance(segmentation, dict):
        return None if {"counts", "size"} <= segmentation.keys() else "an RLE without 'counts' and 'size'"
    if not isinstance(segmentation, list):
        return f"a segmentation that is a {type(segmentation).__name__}, neither polygons nor an RLE"
    if not segmentation:
        return "an empty segmentation"
    for polygon in segmentation:
        if not (isinstance(polygon, list) and all(isinstance(v, (int, float)) for v in polygon)):
            return "a polygon that is not a list of numbers"
        if len(polygon) % 2:
            return f"a polygon of {len(polygon)} numbers, an odd count"
        if len(polygon) < 6:
            box = ": pycocotools would take it for a box" if len(polygon) == 4 else ""
            return f"a polygon of fewer than 3 points ({len(polygon)} numbers{box})"
        if not all(math.isfinite(v) for v in polygon):
            return "a polygon with a coordinate that is not finite"
        xs, ys = polygon[0::2], polygon[1::2]
        if min(xs) < -width or max(xs) > 2 * width or min(ys) < -height or max(ys) > 2 * height:
            return "a polygon farther outside the image than its size"
    return None


def instance_rle(segmentation: Any, height: int, width: int) -> dict:
    """One annotation's segmentation as an RLE, whichever of COCO's three forms it takes:
    polygons (merged into one region), uncompressed RLE, compressed RLE."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation.get("counts"), list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def semantic_mask(instances: list[Instance], height: int, width: int) -> np.ndarray:
    """uint8 ``(height, width)``: 0 background, crowd regions 255, then the other instances'
    labels painted largest first (equal areas in the given order), see the module docstring."""
    mask = np.zeros((height, width), np.uint8)
    rles = [instance_rle(segmentation, height, width) for segmentation, _, _ in instances]
    for rle, (_, _, crowd) in zip(rles, instances, strict=True):
        if crowd:
            mask[_decode(rle, height, width)] = IGNORE_INDEX
    objects = [(rle, label) for rle, (_, label, crowd) in zip(rles, instances, strict=True) if not crowd]
    areas = [int(mask_utils.area(rle)) for rle, _ in objects]
    for k in sorted(range(len(objects)), key=lambda k: -areas[k]):  # a stable sort: ties keep their order
        rle, label = objects[k]
        mask[_decode(rle, height, width)] = label
    return mask


def _decode(rle: dict, height: int, width: int) -> np.ndarray:
    region = mask_utils.decode(rle)
    if region.shape != (height, width):
        raise InputError(f"an RLE of size {list(region.shape)} on an image of size {[height, width]}")
    return region.astype(bool)


def write_masks(mask_dir: Path, jobs: list[MaskJob]) -> int:
    """Write the mask PNG of each job, atomically; return how many."""
    for name, height, width, instances in jobs:
        try:
            mask = semantic_mask(instances, height, width)
        except InputError as e:
            raise InputError(f"{name}: {e}") from None
        save_label_png(mask_dir / f"{name}.png", mask)
    return len(jobs)


def _chunks(jobs: Iterable[MaskJob], size: int) -> Iterator[list[MaskJob]]:
    it = iter(jobs)
    return iter(lambda: list(islice(it, size)), [])


def write_all_masks(pool: Executor | None, mask_dir: Path, jobs: Iterable[MaskJob], total: int,
                    workers: int, desc: str) -> None:
    """Run :func:`write_masks` over ``jobs`` in chunks, a bounded number queued at a time."""
    bar = progress(None, total=total, desc=desc, unit="mask")
    if pool is None:
        for chunk in _chunks(jobs, CHUNK_SIZE):
            bar.update(write_masks(mask_dir, chunk))
    else:
        pending: set = set()
        for chunk in _chunks(jobs, CHUNK_SIZE):
            pending.add(pool.submit(write_masks, mask_dir, chunk))
            if len(pending) >= workers * CHUNKS_IN_FLIGHT_PER_WORKER:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    bar.update(future.result())
        for future in wait(pending).done:
            bar.update(future.result())
    bar.close()


def link_images(image_dir: Path, file_names: list[str], link_dir: Path) -> int:
    """Symbolic links ``link_dir/NAME.jpg`` to ``image_dir/FILE_NAME`` (absolute); a link that
    points elsewhere is replaced atomically. Returns how many were made."""
    link_dir.mkdir(parents=True, exist_ok=True)
    target_dir = image_dir.resolve()
    made = 0
    for file_name in file_names:
        link = link_dir / f"{Path(file_name).stem}.jpg"
        target = target_dir / file_name
        if link.is_symlink() and Path(os.readlink(link)) == target:
            continue
        tmp = link.with_name(f".{link.name}.tmp")
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)
        os.replace(tmp, link)
        made += 1
    return made


def _instances(coco: COCO, image: dict, label_of: dict[int, int]) -> tuple[list[Instance], list[str]]:
    """The image's readable instances, and a warning for each annotation skipped."""
    instances, skipped = [], []
    for ann in coco.imgToAnns.get(image["id"], []):
        label = label_of.get(ann["category_id"])
        if label is None:
            raise InputError(f"annotation {ann.get('id')} has category {ann['category_id']}, "
                             "which 'categories' does not name")
        problem = unreadable(ann["segmentation"], int(image["height"]), int(image["width"]))
        if problem is None:
            instances.append((ann["segmentation"], label, bool(ann["iscrowd"])))
        else:
            skipped.append(f"annotation {ann.get('id')} of {image_name(image)}: {problem}")
    return instances, skipped


def _finished_masks(mask_dir: Path, names: set[str]) -> set[str]:
    return {p.stem for p in output_files(mask_dir, ".png")} & names


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def get_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coco_root", required=True, type=str,
                        help="folder holding train2014/, val2014/ and annotations/")
    parser.add_argument("--out_root", required=True, type=str, help="the dataset to write (e.g. COCO14)")
    parser.add_argument("--num_workers", default=min(8, os.cpu_count() or 1), type=int,
                        help="processes writing masks (0: in this process)")
    parser.add_argument("--overwrite", action="store_true", help="remake every mask")
    return parser


def read_source_record(path: Path) -> dict[str, str] | None:
    """``prepare_source.json``: the annotation file's SHA-256 by split ({} before the first run,
    None when it cannot be read)."""
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def run(args: argparse.Namespace) -> dict:
    """Write the dataset; return its paths and counts (``images``, ``unlabeled``, ``written``,
    ``skipped`` annotations per split). ``--out_root`` is held for the run: a second run into it stops."""
    coco_root, out_root = Path(args.coco_root), Path(args.out_root)
    check_layout(coco_root)
    if out_root.resolve() == coco_root.resolve():
        raise InputError("--out_root must differ from --coco_root")
    with held_folders():
        hold_folder(out_root)
        return prepare(args, coco_root, out_root)


def prepare(args: argparse.Namespace, coco_root: Path, out_root: Path) -> dict:
    """:func:`run`'s work, inside its hold of ``out_root``."""
    logger = setup_logging(None)
    mask_dir = out_root / MASK_FOLDER_NAME
    record_path = out_root / SOURCE_RECORD_NAME
    record = read_source_record(record_path)
    unreadable = record is None
    record = record or {}
    workers = max(0, args.num_workers)
    summary: dict = {"images": {}, "unlabeled": {}, "written": {}, "skipped": {}}
    labels: dict[str, list[int]] = {}
    names_of: dict[str, list[str]] = {}
    classes: list[str] | None = None
    with (ProcessPoolExecutor(workers, initializer=die_with_parent, initargs=(os.getpid(),)) if workers
          else contextlib.nullcontext()) as pool:
        if pool is not None:
            pool.submit(int).result()  # start (fork) the workers now, before the index fills this process
        for split in SPLITS:
            image_dir, annotation_file = split_paths(coco_root, split)
            logger.info("%s: reading %s", split, annotation_file)
            coco, digest = load_instances(annotation_file)
            if classes is None:
                classes = class_names(coco)
                if len(classes) >= IGNORE_INDEX:
                    raise InputError(f"{annotation_file} names {len(classes)} categories; "
                                     f"at most {IGNORE_INDEX - 1} fit a PNG label")
            elif class_names(coco) != classes:
                raise InputError(f"{annotation_file} names other categories than the train split")
            label_of = {cat_id: k + 1 for k, cat_id in enumerate(sorted(coco.cats))}
            images = sorted(coco.imgs.values(), key=image_name)
            names = [image_name(img) for img in images]
            if len(set(names)) != len(names):
                raise InputError(f"{annotation_file} lists an image file twice")
            present = set(os.listdir(image_dir))
            missing = [img["file_name"] for img in images if img["file_name"] not in present]
            if missing:
                raise InputError(f"{len(missing)} images of {annotation_file.name} are not in {image_dir} "
                                 f"(first: {missing[0]})")
            del present

            finished = _finished_masks(mask_dir, set(names))
            if finished and split not in record and not unreadable:  # the record comes first: not ours
                raise InputError(f"{mask_dir} holds {len(finished)} {split} masks this tool did not write "
                                 f"(first: {min(finished)}.png); choose an empty --out_root")
            if finished and (args.overwrite or record.get(split) != digest):
                if not args.overwrite:
                    raise InputError(f"{record_path} is unreadable (cut short or not a record), so the origin of "
                                     f"the masks in {mask_dir} is unknown; pass --overwrite to remake them"
                                     if unreadable else f"{mask_dir} holds {split} masks made from another "
                                     f"{annotation_file.name}; pass --overwrite to remake them")
                for name in finished:
                    (mask_dir / f"{name}.png").unlink()
                finished = set()
            record[split] = digest
            _write_text(record_path, json.dumps(record, indent=1))
            linked = link_images(image_dir, [img["file_name"] for img in images], out_root / IMG_FOLDER_NAME)

            split_labels, skipped = {}, []
            for img, name in zip(images, names, strict=True):
                instances, unread = _instances(coco, img, label_of)
                skipped += unread
                present_labels = sorted({label for _, label, crowd in instances if not crowd})
                if present_labels:
                    split_labels[name] = present_labels
            for warning in skipped[:WARNINGS_PER_SPLIT]:
                print(f"warning: {split}: skipped {warning}", file=sys.stderr)
            summary["skipped"][split] = len(skipped)
            if skipped:
                unnamed = len(skipped) - WARNINGS_PER_SPLIT
                logger.warning("%s: %d annotations skipped: pycocotools cannot read their segmentation%s", split,
                               len(skipped), f" ({unnamed} not named above)" if unnamed > 0 else "")
            labels.update(split_labels)
            names_of[split] = names
            summary["images"][split] = len(names)
            summary["unlabeled"][split] = len(names) - len(split_labels)
            logger.info("%s: %d images (%d links made), %d without a readable non-crowd object: no image-level label, "
                        "left out of %s.txt", split, len(names), linked, summary["unlabeled"][split], split)

            todo = [(img, name) for img, name in zip(images, names, strict=True) if name not in finished]
            logger.info("%s: %d masks to write, %d already finished", split, len(todo), len(finished))
            jobs = ((name, int(img["height"]), int(img["width"]), _instances(coco, img, label_of)[0])
                    for img, name in todo)
            tic = time.perf_counter()
            write_all_masks(pool, mask_dir, jobs, len(todo), workers, f"{split} masks")
            seconds = time.perf_counter() - tic
            summary["written"][split] = len(todo)
            if todo:
                logger.info("%s: %d masks in %.1f s (%.0f masks/s)", split, len(todo), seconds, len(todo) / seconds)
            del coco, images, todo

    assert classes is not None
    paths = {"classes": out_root / CLASSES_FILE_NAME, "labels": out_root / LABEL_FILE_NAME}
    _write_text(paths["classes"], "".join(f"{name}\n" for name in classes))
    for split in SPLITS:
        paths[f"{split}_all"] = out_root / SPLIT_FOLDER / f"{split}.txt"
        _write_text(paths[f"{split}_all"], "".join(f"{name}\n" for name in names_of[split]))
        paths[split] = out_root / f"{split}.txt"
        write_list(paths[split], [n for n in names_of[split] if n in labels])
    labelled = sorted(labels)
    label_array = np.zeros((len(labelled), len(classes)), np.uint8)
    for row, name in enumerate(labelled):
        label_array[row, np.asarray(labels[name]) - 1] = 1
    save_image_labels(paths["labels"], labelled, label_array)
    logger.info("wrote %s: %d classes, %s", out_root, len(classes),
                ", ".join(f"{s} {summary['images'][s]} images ({summary['images'][s] - summary['unlabeled'][s]} "
                          "with image-level labels)" for s in SPLITS))
    return {**summary, "paths": paths}


def main(argv: list[str] | None = None) -> dict:
    return run_main(run, get_arg_parser(), argv)


if __name__ == "__main__":
    main()
