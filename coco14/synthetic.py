"""A small MS COCO 2014 in the official layout and file format, for tests and benchmarks.

``make_synthetic_coco(root)`` writes ``train2014/``, ``val2014/`` (JPEGs, the first of each split
greyscale, as some of COCO's are) and ``annotations/instances_{train,val}2014.json`` with COCO's
80 categories and their sparse ids (1..90), each of COCO's three segmentation forms (polygons,
uncompressed RLE, compressed RLE), crowd regions, overlapping instances, an image without
annotations and one with a crowd region only, then random scenes of boxes and polygons.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

COCO_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)
COCO_UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)  # ids 1..90 that name no category
COCO_CATEGORIES = tuple(zip((i for i in range(1, 91) if i not in COCO_UNUSED_IDS), COCO_NAMES, strict=True))
SCENE_CATEGORIES = (1, 3, 7, 18, 44, 90)  # the random scenes draw from a few, so classes recur


def box(h: int, w: int, top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    mask[top:bottom, left:right] = 1
    return mask


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with zeros."""
    flat = mask.reshape(-1, order="F").astype(np.int64)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": counts}


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def polygon(cx: float, cy: float, r: float, sides: int, phase: float = 0.0) -> list[float]:
    angles = phase + 2 * np.pi * np.arange(sides) / sides
    return np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1).reshape(-1).round(2).tolist()


def _annotation(image_id: int, category_id: int, segmentation, crowd: bool = False) -> dict:
    return {"image_id": image_id, "category_id": category_id, "segmentation": segmentation,
            "iscrowd": int(crowd), "area": 0.0, "bbox": [0, 0, 1, 1]}


def _split(split: str, first_id: int, num_random: int, size: tuple[int, int], instances: tuple[int, int],
           seed: int) -> tuple[list[dict], list[dict]]:
    """Images and annotations of one split: the hand-made cases, then random scenes."""
    h, w = size
    images, anns = [], []

    def add_image(annotations: list[tuple]) -> None:
        image_id = first_id + len(images)
        images.append({"id": image_id, "file_name": f"COCO_{split}2014_{image_id:012d}.jpg",
                       "height": h, "width": w})
        for category_id, segmentation, crowd in annotations:
            anns.append({"id": len(anns) + first_id * 1000, "image_id": image_id, "category_id": category_id,
                         "segmentation": segmentation, "iscrowd": int(crowd), "area": 0.0, "bbox": [0, 0, 1, 1]})

    # A small train (7) listed before the large person (1) it lies on: smaller on top, whatever the
    # order; a crowd of persons (compressed RLE) under both; a two-part polygon bottle (44).
    add_image([(7, [polygon(30, 30, 8, 4, np.pi / 4)], False),
               (1, [polygon(30, 30, 22, 12)], False),
               (1, compressed_rle(box(h, w, 0, 0, 18, 80)), True),
               (44, [polygon(68, 50, 5, 6), polygon(68, 12, 4, 5)], False)])
    # Two instances of equal area overlapping (uncompressed and compressed RLE): the later on top;
    # a crowd region given as uncompressed RLE.
    add_image([(90, uncompressed_rle(box(h, w, 10, 10, 30, 40)), False),
               (44, compressed_rle(box(h, w, 22, 25, 42, 55)), False),
               (7, uncompressed_rle(box(h, w, 45, 0, 64, 30)), True)])
    add_image([])  # no annotation
    add_image([(1, compressed_rle(box(h, w, 5, 5, 50, 60)), True)])  # a crowd region only
    rng = np.random.default_rng(seed)
    for i in range(num_random):
        annotations = []
        for k in range(int(rng.integers(instances[0], instances[1] + 1))):
            category_id = int(rng.choice(SCENE_CATEGORIES))
            top, left = int(rng.integers(0, h - 16)), int(rng.integers(0, w - 16))
            bottom = top + int(rng.integers(12, h - top + 1))
            right = left + int(rng.integers(12, w - left + 1))
            form = (i + k) % 3
            if form == 0:
                segmentation = [polygon((left + right) / 2, (top + bottom) / 2, (right - left) / 2,
                                        int(rng.integers(3, 9)), float(rng.uniform(0, 1)))]
            else:
                region = box(h, w, top, left, bottom, right)
                segmentation = uncompressed_rle(region) if form == 1 else compressed_rle(region)
            annotations.append((category_id, segmentation, False))
        add_image(annotations)
    return images, anns


def _write_jpeg(path: Path, index: int, size: tuple[int, int], grey: bool) -> None:
    rng = np.random.default_rng(index)
    h, w = size
    pixels = rng.integers(0, 256, (max(h // 8, 1), max(w // 8, 1), 3)).astype(np.uint8)
    img = Image.fromarray(pixels).resize((w, h), Image.Resampling.BILINEAR)
    (img.convert("L") if grey else img).save(path, quality=90)


def make_synthetic_coco(root: Path, num_random: tuple[int, int] = (6, 3), size: tuple[int, int] = (64, 80),
                        instances: tuple[int, int] = (1, 3)) -> Path:
    """Write the dataset under ``root`` (a ``--coco_root``) and return ``root``. ``num_random``:
    random scenes in train and val, of ``size`` (height, width, at least 64 x 80) with
    ``instances`` (least, most) instances each."""
    if size[0] < 64 or size[1] < 80:
        raise ValueError(f"images of {size} are smaller than the hand-made cases (64 x 80)")
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i, "name": name, "supercategory": ""} for i, name in COCO_CATEGORIES]
    for split, first_id, extra, seed in (("train", 9, num_random[0], 1), ("val", 500000, num_random[1], 2)):
        images, anns = _split(split, first_id, extra, size, instances, seed)
        (root / f"{split}2014").mkdir(exist_ok=True)
        for k, image in enumerate(images):
            _write_jpeg(root / f"{split}2014" / image["file_name"], image["id"], size, grey=k == 0)
        data = {"info": {"description": "synthetic COCO"}, "licenses": [], "images": images,
                "annotations": anns, "categories": categories}
        (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(data))
    return root
