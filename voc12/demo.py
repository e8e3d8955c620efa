"""A small synthetic dataset in VOC 2012 layout, for the CPU demo and the tests::

    python -m voc12.demo --out demo_data [--num_train 200 --num_val 60 --image_size 160 --num_classes 5]

Each class is a parametric shape (disc, ring, star, cross, ...; beyond twelve classes the shapes
come back squashed) with its own texture (stripes, checker, dots, waves, rings, speckle) and
colours, jittered per instance. Images hold 1 to 3 objects, possibly overlapping, cut by the
image border or by a bar, on cluttered backgrounds: smooth colour fields, noise, and distractor
blobs that often wear a class's texture and colours without its shape. So an image-level
classifier can learn the classes, but its CAMs also light up distractors and miss occluded parts.

The output is what ``voc12.make_lists`` expects plus its results: JPEGImages, SegmentationClass
(palette PNGs with a 255 band along object outlines, as VOC), Annotations (VOC XML with boxes,
``truncated`` and ``difficult``), ImageSets/Segmentation/{train,val}.txt, ``classes.txt``, and
``train.txt``, ``val.txt``, ``cls_labels.npz`` at the top. Everything is a function of the seed.
"""
from __future__ import annotations

import argparse
import colorsys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from scipy.ndimage import binary_erosion, maximum_filter, minimum_filter

from tool.cli import run_main
from tool.errors import InputError
from tool.fileio import atomic_path, save_label_png
from voc12 import make_lists
from voc12.classes import IGNORE_INDEX, VOC, ClassList
from voc12.make_lists import SPLIT_FOLDER

SHAPES = ("disc", "ring", "square", "triangle", "star", "cross", "crescent", "rhombus", "hexagon", "arrow",
          "ell", "flower")
TEXTURES = ("stripes", "checker", "dots", "waves", "rings", "speckle")
GOLDEN = 0.618034
MIN_INTERIOR = 40  # pixels an object keeps away from any other label, so the 255 band cannot erase it
MIN_VISIBLE = 0.35  # share of an object that must stay visible after occlusion
MAX_TRIES = 12


@dataclass(frozen=True)
class Appearance:
    """What makes a class recognisable: shape, texture, colours and texture frequency."""

    shape: str
    squash: float
    texture: str
    primary: tuple[float, float, float]
    secondary: tuple[float, float, float]
    frequency: float


def class_appearances(num_classes: int) -> list[Appearance]:
    """Distinct shape, texture and colour statistics for each class (fixed, not seeded)."""
    out = []
    for k in range(num_classes):
        hue = (k * GOLDEN) % 1.0
        sat, val = 0.45 + 0.4 * ((k * 7) % 5) / 4, 0.55 + 0.4 * ((k * 3) % 4) / 3
        shift = (0.5, 0.08, 0.0)[k % 3]
        secondary = colorsys.hsv_to_rgb((hue + shift) % 1.0, sat * (0.6 if shift else 0.3), val * 0.55)
        out.append(Appearance(shape=SHAPES[k % len(SHAPES)], squash=1.0 if k < len(SHAPES) else 0.55,
                              texture=TEXTURES[(k + 3 * (k // len(SHAPES))) % len(TEXTURES)],
                              primary=colorsys.hsv_to_rgb(hue, sat, val), secondary=secondary,
                              frequency=1.6 + 0.35 * (k % 5)))
    return out


def demo_classes(num_classes: int) -> ClassList:
    """VOC's names for VOC's class count, else names that say what the class looks like."""
    if num_classes == VOC.num_fg:
        return VOC
    return ClassList(tuple(f"{a.shape}{'_flat' if a.squash < 1 else ''}_{a.texture}"
                           for a in class_appearances(num_classes)))


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test of a shape in object coordinates (the shape fits the unit disc)."""
    r = np.hypot(u, v)
    theta = np.arctan2(v, u)
    if shape == "disc":
        return r < 1
    if shape == "ring":
        return (r < 1) & (r > 0.55)
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) < 0.78
    if shape == "triangle":
        normals = np.pi / 2 + 2 * np.pi / 3 * np.arange(3)
        return np.max([u * np.cos(a) + v * np.sin(a) for a in normals], 0) < 0.55
    if shape == "star":
        return r < 0.4 + 0.6 * ((1 + np.cos(5 * theta)) / 2) ** 2
    if shape == "cross":
        return ((np.abs(u) < 0.3) & (np.abs(v) < 1)) | ((np.abs(v) < 0.3) & (np.abs(u) < 1))
    if shape == "crescent":
        return (r < 1) & (np.hypot(u - 0.5, v) > 0.75)
    if shape == "rhombus":
        return np.abs(u) / 0.55 + np.abs(v) < 1
    if shape == "hexagon":
        return np.max([np.abs(u * np.cos(a) + v * np.sin(a)) for a in np.pi / 3 * np.arange(3)], 0) < 0.85
    if shape == "arrow":
        shaft = (np.abs(v) < 0.22) & (u > -1) & (u < 0.15)
        return shaft | ((u >= 0.15) & (u < 1) & (np.abs(v) < 0.85 * (1 - u) / 0.85))
    if shape == "ell":
        return (((u > -0.8) & (u < 0.8) & (v > 0.3) & (v < 0.8))
                | ((u > -0.8) & (u < -0.3) & (v > -0.8) & (v < 0.8)))
    if shape == "flower":
        return r < 0.6 + 0.4 * np.cos(3 * theta)
    raise ValueError(f"unknown shape {shape}")


def texture(kind: str, u: np.ndarray, v: np.ndarray, frequency: float,
            rng: np.random.Generator) -> np.ndarray:
    """Mixing weight in [0, 1] between a class's primary and secondary colour."""
    phase = rng.uniform(0, 2 * np.pi)
    if kind == "stripes":
        return (np.sin(2 * np.pi * frequency * u + phase) > 0).astype(np.float32)
    if kind == "checker":
        return ((np.floor(frequency * u + phase) + np.floor(frequency * v)) % 2).astype(np.float32)
    if kind == "dots":
        fu, fv = (frequency * u + phase) % 1 - 0.5, (frequency * v) % 1 - 0.5
        return (np.hypot(fu, fv) < 0.3).astype(np.float32)
    if kind == "waves":
        wobble = 0.25 * np.sin(2 * np.pi * frequency * v)
        return 0.5 + 0.5 * np.sin(2 * np.pi * frequency * (u + wobble) + phase)
    if kind == "rings":
        return (np.sin(2 * np.pi * frequency * np.hypot(u, v) + phase) > 0).astype(np.float32)
    if kind == "speckle":
        return rng.uniform(0, 0.7, size=u.shape).astype(np.float32)
    raise ValueError(f"unknown texture {kind}")


def smooth_noise(rng: np.random.Generator, size: tuple[int, int], cells: int,
                 channels: int = 1) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a random ``cells x cells`` grid, bicubically upsampled."""
    grid = rng.uniform(0, 1, size=(cells, cells, channels)).astype(np.float32)
    up = cv2.resize(grid, (size[1], size[0]), interpolation=cv2.INTER_CUBIC)
    return np.clip(up.reshape(size + (channels,)), 0, 1)


def paint(canvas: np.ndarray, where: np.ndarray, look: Appearance, u: np.ndarray, v: np.ndarray,
          rng: np.random.Generator, shading: float) -> None:
    """Fill ``where`` with a jittered instance of an appearance, lit from a random side."""
    jitter = rng.uniform(0.85, 1.15, size=3)
    t = texture(look.texture, u, v, look.frequency * rng.uniform(0.85, 1.15), rng)[where, None]
    colour = (np.array(look.primary) * (1 - t) + np.array(look.secondary) * t) * jitter
    angle = rng.uniform(0, 2 * np.pi)
    light = 1 + shading * (np.cos(angle) * u[where] + np.sin(angle) * v[where])
    canvas[where] = colour * light[:, None]


def object_frame(ys: np.ndarray, xs: np.ndarray, cy: float, cx: float, radius: float, angle: float,
                 stretch: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates in an object's rotated, scaled frame."""
    dy, dx = ys - cy, xs - cx
    c, s = np.cos(angle), np.sin(angle)
    return (c * dx + s * dy) / (radius * stretch[0]), (-s * dx + c * dy) / (radius * stretch[1])


def interior(mask: np.ndarray) -> int:
    """Pixels whose 3x3 neighbourhood lies in ``mask``: what survives the ignore band."""
    return int(binary_erosion(mask, structure=np.ones((3, 3), bool)).sum())


def layout_ok(owner: np.ndarray, full_area: list[int]) -> bool:
    """Every object keeps enough visible pixels, and enough of them away from its outline."""
    for i, area in enumerate(full_area):
        visible = owner == i
        if visible.sum() < MIN_VISIBLE * area or interior(visible) < MIN_INTERIOR:
            return False
    return True


def make_image(rng: np.random.Generator, size: tuple[int, int],
               looks: list[Appearance]) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """One image: uint8 RGB, its label map (with the 255 band) and its objects for the XML."""
    h, w = size
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    side = min(h, w)
    owner = np.full(size, -1, dtype=np.int64)
    objects = []
    full_area = []
    for _ in range(int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))):
        for _ in range(MAX_TRIES):
            cls = int(rng.integers(len(looks)))
            look = looks[cls]
            radius = rng.uniform(0.16, 0.36) * side
            frame = (rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w, radius, rng.uniform(0, 2 * np.pi),
                     (rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15) * look.squash))
            u, v = object_frame(ys, xs, *frame)
            mask = shape_mask(look.shape, u, v)
            trial = owner.copy()
            trial[mask] = len(objects)
            if mask.any() and layout_ok(trial, full_area + [int(mask.sum())]):
                owner = trial
                objects.append({"cls": cls, "frame": frame})
                full_area.append(int(mask.sum()))
                break
        else:
            if not objects:
                raise RuntimeError("could not place an object; image too small?")

    bar = None
    if rng.random() < 0.25:
        width = rng.uniform(0.05, 0.1) * side
        centre = rng.uniform(0, h), rng.uniform(0, w)
        u, v = object_frame(ys, xs, *centre, 1.0, rng.uniform(0, np.pi), (1.0, width))
        trial = np.where(np.abs(v) < 1, -1, owner)
        if layout_ok(trial, full_area):
            owner, bar = trial, (u, v, np.abs(v) < 1)

    canvas = background(rng, size, looks, ys, xs)
    for i, obj in enumerate(objects):
        u, v = object_frame(ys, xs, *obj["frame"])
        paint(canvas, owner == i, looks[obj["cls"]], u, v, rng, shading=0.18)
    if bar is not None:
        u, v, where = bar
        paint(canvas, where, looks[int(rng.integers(len(looks)))], u / side, v, rng, shading=0.0)
    canvas *= 0.8 + 0.4 * smooth_noise(rng, size, 3)  # uneven illumination
    canvas = canvas * 255 + rng.normal(0, 6, size=canvas.shape)
    img = np.clip(canvas, 0, 255).astype(np.uint8)

    label = np.zeros(size, dtype=np.uint8)
    for i, obj in enumerate(objects):
        label[owner == i] = obj["cls"] + 1
    band = maximum_filter(label, size=3) != minimum_filter(label, size=3)
    label[band] = IGNORE_INDEX

    annotations = []
    for i, obj in enumerate(objects):
        visible = owner == i
        rows, cols = np.flatnonzero(visible.any(axis=1)), np.flatnonzero(visible.any(axis=0))
        box = (int(cols[0]) + 1, int(rows[0]) + 1, int(cols[-1]) + 1, int(rows[-1]) + 1)
        touches_border = visible[0].any() or visible[-1].any() or visible[:, 0].any() or visible[:, -1].any()
        small = max(box[2] - box[0], box[3] - box[1]) < 0.15 * side
        annotations.append({"cls": obj["cls"], "box": box, "truncated": int(touches_border),
                            "difficult": int(small or visible.sum() < 0.6 * full_area[i])})
    return img, label, annotations


def background(rng: np.random.Generator, size: tuple[int, int], looks: list[Appearance],
               ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Clutter, float RGB in [0, 1]: a muted colour field, fine noise and distractor blobs. A
    third of the blobs wear a class's texture and colours, a third only its texture."""
    h, w = size
    side = min(h, w)
    grey = smooth_noise(rng, size, 4)
    canvas = 0.2 + 0.5 * grey + 0.25 * (smooth_noise(rng, size, 3, channels=3) - 0.5)
    canvas += 0.15 * (smooth_noise(rng, size, 24) - 0.5)
    for _ in range(int(rng.integers(1, 4))):
        blob = smooth_noise(rng, size, 5)[..., 0]
        cy, cx, reach = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.15, 0.35) * side
        where = (blob > 0.55) & (np.hypot(ys - cy, xs - cx) < reach)
        if not where.any():
            continue
        look = looks[int(rng.integers(len(looks)))]
        kind = rng.random()
        if kind >= 1 / 3:
            dull = tuple(rng.uniform(0.2, 0.8, 3))
            look = Appearance("disc", 1.0, look.texture, dull, tuple(0.5 * np.array(dull)), look.frequency)
        if kind >= 2 / 3:
            look = Appearance("disc", 1.0, TEXTURES[int(rng.integers(len(TEXTURES)))], look.primary,
                              look.secondary, rng.uniform(1, 4))
        u, v = object_frame(ys, xs, cy, cx, reach, rng.uniform(0, 2 * np.pi), (1.0, 1.0))
        paint(canvas, where, look, u, v, rng, shading=0.1)
    return canvas


def annotation_xml(name: str, size: tuple[int, int], annotations: list[dict],
                   classes: ClassList) -> ET.ElementTree:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2012"
    ET.SubElement(root, "filename").text = f"{name}.jpg"
    ET.SubElement(ET.SubElement(root, "source"), "database").text = "SBNet synthetic demo"
    size_el = ET.SubElement(root, "size")
    for tag, value in (("width", size[1]), ("height", size[0]), ("depth", 3)):
        ET.SubElement(size_el, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "1"
    for ann in annotations:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = classes.names[ann["cls"]]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = str(ann["truncated"])
        ET.SubElement(obj, "difficult").text = str(ann["difficult"])
        box = ET.SubElement(obj, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), ann["box"], strict=True):
            ET.SubElement(box, tag).text = str(value)
    tree = ET.ElementTree(root)
    ET.indent(tree)
    return tree


def make_demo_dataset(root: str | Path, num_train: int = 200, num_val: int = 60, image_size: int = 160,
                      seed: int = 0, num_classes: int = VOC.num_fg) -> ClassList:
    """Write the demo dataset under ``root``; ``num_classes`` counts object classes (no background).

    Image ``i`` of a split depends only on ``(seed, split, i)``.
    """
    if num_classes < 1 or num_classes + 1 > IGNORE_INDEX:
        raise InputError(f"--num_classes must be in 1..{IGNORE_INDEX - 2}, got {num_classes}")
    if image_size < 48:
        raise InputError(f"--image_size must be at least 48, got {image_size}")
    root = Path(root)
    classes = demo_classes(num_classes)
    looks = class_appearances(num_classes)
    for folder in ("JPEGImages", "SegmentationClass", "Annotations", SPLIT_FOLDER):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for split_id, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        names = []
        for i in range(count):
            rng = np.random.default_rng([seed, split_id, i])
            short = int(round(image_size * rng.uniform(0.7, 1.0)))
            size = (image_size, short) if rng.random() < 0.3 else (short, image_size)
            img, label, annotations = make_image(rng, size, looks)
            name = f"{split}_{i:05d}"
            with atomic_path(root / "JPEGImages" / f"{name}.jpg") as tmp:
                Image.fromarray(img).save(tmp, format="JPEG", quality=90)
            save_label_png(root / "SegmentationClass" / f"{name}.png", label)
            with atomic_path(root / "Annotations" / f"{name}.xml") as tmp:
                annotation_xml(name, size, annotations, classes).write(tmp, encoding="utf-8")
            names.append(name)
        with atomic_path(root / SPLIT_FOLDER / f"{split}.txt") as tmp:
            tmp.write_text("".join(n + "\n" for n in names))
    with atomic_path(root / "classes.txt") as tmp:
        tmp.write_text("# classes of the synthetic demo dataset (voc12/demo.py)\n"
                       + "".join(n + "\n" for n in classes.names))
    make_lists.run(argparse.Namespace(voc12_root=str(root), sbd_root=None, out_dir=str(root),
                                      dataset_classes=str(root / "classes.txt")))
    return classes


def get_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=str, help="folder to write (VOC2012 layout)")
    parser.add_argument("--num_train", default=200, type=int)
    parser.add_argument("--num_val", default=60, type=int)
    parser.add_argument("--image_size", default=160, type=int, help="long side in pixels")
    parser.add_argument("--num_classes", default=VOC.num_fg, type=int, help="object classes (no background)")
    parser.add_argument("--seed", default=0, type=int)
    return parser


def run(args: argparse.Namespace) -> ClassList:
    return make_demo_dataset(args.out, num_train=args.num_train, num_val=args.num_val,
                             image_size=args.image_size, seed=args.seed, num_classes=args.num_classes)


def main(argv: list[str] | None = None) -> None:
    run_main(run, get_arg_parser(), argv)


if __name__ == "__main__":
    main()
