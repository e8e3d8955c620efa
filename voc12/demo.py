"""A small synthetic dataset in VOC 2012 layout, for the CPU demo and the tests::

    python -m voc12.demo --out demo_data [--num_train 160 --num_val 60 --image_size 160 --num_classes 5]

The world is built so that image-level supervision meets the problems the method addresses:

- **Discriminative parts.** An object is a smooth blob ("body") carrying one patch, its *mark*
  (a disc over about half of the body, on one side): the mark's texture and two colours name the
  class; the body's outline and colour are drawn from distributions shared by every class. A
  classifier needs only the mark, so its CAM sits on the mark and fades over the rest of the body,
  as a real CAM lights a face and not the coat.
- **Coherent extent, clear boundaries.** A body is one saturated colour with soft shading, set
  against a muted background: the rest of the object is easy to group with the mark by appearance
  (a CRF, affinities) once something says they belong together, and its outline is a real edge.
- **Context.** Most images hold a ground region below a wavy horizon (water, grass, sand, bricks,
  snow, tiles); in two images of five its kind is the one that goes with the class of the first
  object, so CAMs leak into it as they leak into water under a boat. Blank bodies (bodies
  without a mark) stand about as unlabelled background objects that look like objects.
- **VOC's annotation.** 1 to 3 objects, overlapping (at least a third of a body and half of its
  mark stay visible), cut by the image border; label PNGs with a 255 band along object outlines.

So the CAM is partial and leaks into context; boundaries and smoothness can push it to the
body's outline; affinities learnt from CRF labels can carry it from the mark over the body; a
segmentation network trained on those labels can learn whole bodies. The ``objects`` layout
(one large object an image, near the centre) is ImageNet's kind of picture, for the demo's
pretraining corpus (``pretrain_demo.py``). Classes share a texture six classes apart, told apart
by the mark's colours (light or dark second colour, hue).

The output is what ``voc12.make_lists`` expects plus its results: JPEGImages, SegmentationClass
(palette PNGs), Annotations (VOC XML with boxes, ``truncated`` and ``difficult``),
ImageSets/Segmentation/{train,val}.txt, ``classes.txt``, and ``train.txt``, ``val.txt``,
``cls_labels.npz`` at the top. Everything is a function of the seed.
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

TEXTURES = ("stripes", "checker", "dots", "waves", "rings", "zigzag")
HUE_NAMES = ("red", "orange", "yellow", "lime", "green", "teal", "cyan", "azure", "blue", "violet", "magenta",
             "pink")
GROUNDS = ("water", "grass", "sand", "bricks", "snow", "tiles")
GOLDEN = 0.618034
MARK_OFFSET, MARK_RADIUS = 0.3, 0.7  # in body radii: where the mark sits and how large it is
CONTEXT_MATCH = 0.4  # images whose ground goes with their first object's class
MIN_INTERIOR = 40  # pixels an object keeps away from any other label, so the 255 band cannot erase it
MIN_VISIBLE, MIN_MARK_VISIBLE = 0.35, 0.5
MAX_TRIES = 12


@dataclass(frozen=True)
class Layout:
    """How a kind of image places its objects: how many (with their odds), their radius and where
    their centres fall, as fractions of the image's shorter side and of its height and width."""

    counts: tuple[int, ...]
    odds: tuple[float, ...]
    radius: tuple[float, float]
    centre: tuple[float, float]


LAYOUTS = {
    # The demo's scenes: 1 to 3 objects anywhere, cut by the border and by each other.
    "scenes": Layout(counts=(1, 2, 3), odds=(0.45, 0.35, 0.2), radius=(0.18, 0.34), centre=(0.1, 0.9)),
    # ImageNet's kind of picture, for pretraining: one large object near the centre.
    "objects": Layout(counts=(1,), odds=(1.0,), radius=(0.3, 0.42), centre=(0.3, 0.7)),
}


@dataclass(frozen=True)
class Appearance:
    """What names a class: its mark's texture, two colours and texture frequency, and the ground it
    is usually seen on."""

    texture: str
    primary: tuple[float, float, float]
    secondary: tuple[float, float, float]
    frequency: float
    ground: int


def class_appearances(num_classes: int) -> list[Appearance]:
    """Distinct mark textures and colour pairs for each class (fixed, not seeded)."""
    out = []
    for k in range(num_classes):
        hue = (k * GOLDEN) % 1.0
        light = k % 2 == 0
        primary = colorsys.hsv_to_rgb(hue, 0.85, 0.95 if light else 0.75)
        secondary = (0.97, 0.97, 0.95) if light else (0.08, 0.08, 0.1)
        out.append(Appearance(texture=TEXTURES[(k + k // len(TEXTURES)) % len(TEXTURES)], primary=primary,
                              secondary=secondary, frequency=3.0 + 0.5 * (k % 3), ground=k % len(GROUNDS)))
    return out


def demo_classes(num_classes: int) -> ClassList:
    """VOC's names for VOC's class count, else names that say what the class's mark looks like."""
    if num_classes == VOC.num_fg:
        return VOC
    names = []
    for k, look in enumerate(class_appearances(num_classes)):
        hue = colorsys.rgb_to_hsv(*look.primary)[0]
        name = f"{HUE_NAMES[int(round(hue * len(HUE_NAMES))) % len(HUE_NAMES)]}_{look.texture}"
        names.append(name if name not in names else f"{name}_{k}")
    return ClassList(tuple(names))


def texture(kind: str, u: np.ndarray, v: np.ndarray, frequency: float,
            rng: np.random.Generator) -> np.ndarray:
    """Mixing weight in [0, 1] between a mark's primary and secondary colour."""
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
    if kind == "zigzag":
        return (np.sin(2 * np.pi * frequency * (u + 0.3 * np.abs((frequency * v) % 1 - 0.5)) + phase) > 0
                ).astype(np.float32)
    raise ValueError(f"unknown texture {kind}")


def smooth_noise(rng: np.random.Generator, size: tuple[int, int], cells: int,
                 channels: int = 1) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a random ``cells x cells`` grid, bicubically upsampled."""
    grid = rng.uniform(0, 1, size=(cells, cells, channels)).astype(np.float32)
    up = cv2.resize(grid, (size[1], size[0]), interpolation=cv2.INTER_CUBIC)
    return np.clip(up.reshape(size + (channels,)), 0, 1)


def object_frame(ys: np.ndarray, xs: np.ndarray, cy: float, cx: float, radius: float, angle: float,
                 stretch: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates in an object's rotated, scaled frame."""
    dy, dx = ys - cy, xs - cx
    c, s = np.cos(angle), np.sin(angle)
    return (c * dx + s * dy) / (radius * stretch[0]), (-s * dx + c * dy) / (radius * stretch[1])


def body_mask(u: np.ndarray, v: np.ndarray, harmonics: np.ndarray) -> np.ndarray:
    """A smooth blob in object coordinates: radius ``1 + sum_k a_k cos(k theta + phi_k)`` for the
    rows ``(k, a_k, phi_k)`` of ``harmonics``."""
    theta = np.arctan2(v, u)
    radius = 1 + sum(a * np.cos(k * theta + phi) for k, a, phi in harmonics)
    return np.hypot(u, v) < radius


def random_body(rng: np.random.Generator, h: int, w: int, layout: Layout) -> dict:
    """Where a body sits, its outline and colour: the same distributions for every class."""
    harmonics = np.array([(k, rng.uniform(0, 0.12), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4)])
    colour = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.4, 0.85), rng.uniform(0.45, 0.9))
    return {"frame": (rng.uniform(*layout.centre) * h, rng.uniform(*layout.centre) * w,
                      rng.uniform(*layout.radius) * min(h, w), rng.uniform(0, 2 * np.pi), (1.0, rng.uniform(0.6, 1.0))),
            "harmonics": harmonics, "colour": colour, "mark_angle": rng.uniform(0, 2 * np.pi)}


def mark_mask(u: np.ndarray, v: np.ndarray, angle: float) -> np.ndarray:
    return np.hypot(u - MARK_OFFSET * np.cos(angle), v - MARK_OFFSET * np.sin(angle)) < MARK_RADIUS


def interior(mask: np.ndarray) -> int:
    """Pixels whose 3x3 neighbourhood lies in ``mask``: what survives the ignore band."""
    return int(binary_erosion(mask, structure=np.ones((3, 3), bool)).sum())


def layout_ok(owner: np.ndarray, bodies: list[dict]) -> bool:
    """Every object (``owner`` value i: ``bodies[i]``, its full ``area`` and its ``mark``) keeps
    enough of its body and of its mark visible, and enough pixels away from its outline."""
    for i, body in enumerate(bodies):
        visible = owner == i
        if visible.sum() < MIN_VISIBLE * body["area"] or interior(visible) < MIN_INTERIOR:
            return False
        if (visible & body["mark"]).sum() < MIN_MARK_VISIBLE * body["mark"].sum():
            return False
    return True


def paint_body(canvas: np.ndarray, where: np.ndarray, colour: tuple[float, float, float], u: np.ndarray,
               v: np.ndarray, rng: np.random.Generator) -> None:
    """One colour, lit from a random side."""
    angle = rng.uniform(0, 2 * np.pi)
    light = 1 + 0.15 * (np.cos(angle) * u[where] + np.sin(angle) * v[where])
    canvas[where] = np.array(colour) * rng.uniform(0.92, 1.08, size=3) * light[:, None]


def paint_mark(canvas: np.ndarray, where: np.ndarray, look: Appearance, u: np.ndarray, v: np.ndarray,
               rng: np.random.Generator) -> None:
    t = texture(look.texture, u, v, look.frequency * rng.uniform(0.85, 1.15), rng)[where, None]
    colour = np.array(look.primary) * (1 - t) + np.array(look.secondary) * t
    canvas[where] = colour * rng.uniform(0.9, 1.1, size=3)


def ground(rng: np.random.Generator, canvas: np.ndarray, kind: int, ys: np.ndarray, xs: np.ndarray) -> None:
    """A region of the scene below a wavy horizon, in a muted texture of its kind."""
    h, w = canvas.shape[:2]
    horizon = rng.uniform(0.5, 0.8) * h + 0.06 * h * np.sin(2 * np.pi * xs / w * rng.uniform(0.5, 2)
                                                              + rng.uniform(0, 2 * np.pi))
    where = ys > horizon
    name = GROUNDS[kind]
    y, x = ys[where] / h, xs[where] / w
    if name == "water":
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (14 * y + 0.6 * np.sin(2 * np.pi * 3 * x)))
        tint, other = (0.25, 0.4, 0.6), (0.45, 0.6, 0.75)
    elif name == "grass":
        t = rng.uniform(0, 1, y.shape) * (0.5 + 0.5 * np.sin(2 * np.pi * 40 * x))
        tint, other = (0.3, 0.5, 0.25), (0.45, 0.62, 0.3)
    elif name == "sand":
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (5 * y + 0.4 * np.sin(2 * np.pi * 1.5 * x)))
        tint, other = (0.75, 0.68, 0.5), (0.66, 0.58, 0.42)
    elif name == "bricks":
        row = np.floor(12 * y)
        t = (((12 * y) % 1 < 0.15) | (((8 * x + 0.5 * row) % 1) < 0.08)).astype(np.float32)
        tint, other = (0.55, 0.35, 0.3), (0.7, 0.65, 0.6)
    elif name == "snow":
        t = rng.uniform(0, 1, y.shape) * 0.5
        tint, other = (0.88, 0.9, 0.93), (0.7, 0.74, 0.8)
    else:  # tiles
        t = ((np.floor(9 * x) + np.floor(9 * y)) % 2).astype(np.float32)
        tint, other = (0.5, 0.47, 0.55), (0.62, 0.6, 0.66)
    canvas[where] = np.array(tint) * (1 - t[:, None]) + np.array(other) * t[:, None]


def background(rng: np.random.Generator, size: tuple[int, int], ground_kind: int | None,
               ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """A muted colour field with fine noise, and the ground region of ``ground_kind``; float RGB."""
    grey = smooth_noise(rng, size, 4)
    canvas = 0.3 + 0.35 * grey + 0.12 * (smooth_noise(rng, size, 3, channels=3) - 0.5)
    canvas += 0.1 * (smooth_noise(rng, size, 24) - 0.5)
    if ground_kind is not None:
        ground(rng, canvas, ground_kind, ys, xs)
    return canvas


def make_image(rng: np.random.Generator, size: tuple[int, int], looks: list[Appearance],
               layout: Layout = LAYOUTS["scenes"]) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """One image: uint8 RGB, its label map (with the 255 band) and its objects for the XML."""
    h, w = size
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    side = min(h, w)
    owner = np.full(size, -1, dtype=np.int64)
    objects = []
    for _ in range(int(rng.choice(layout.counts, p=layout.odds))):
        for _ in range(MAX_TRIES):
            body = random_body(rng, h, w, layout)
            body["cls"] = int(rng.integers(len(looks)))
            u, v = object_frame(ys, xs, *body["frame"])
            mask = body_mask(u, v, body["harmonics"])
            mark = mark_mask(u, v, body["mark_angle"]) & mask
            trial = owner.copy()
            trial[mask] = len(objects)
            body.update(u=u, v=v, mark=mark, area=int(mask.sum()))  # kept for painting
            if mark.any() and layout_ok(trial, objects + [body]):
                owner = trial
                objects.append(body)
                break
        else:
            if not objects:
                raise RuntimeError("could not place an object; image too small?")

    kind = rng.random()
    ground_kind = (looks[objects[0]["cls"]].ground if kind < CONTEXT_MATCH
                   else int(rng.integers(len(GROUNDS))) if kind < 0.85 else None)
    canvas = background(rng, size, ground_kind, ys, xs)
    for _ in range(int(rng.choice([0, 1, 2], p=[0.5, 0.35, 0.15]))):  # blank bodies, behind the objects
        blank = random_body(rng, h, w, LAYOUTS["scenes"])
        u, v = object_frame(ys, xs, *blank["frame"])
        paint_body(canvas, body_mask(u, v, blank["harmonics"]) & (owner < 0), blank["colour"], u, v, rng)
    for i, obj in enumerate(objects):
        visible = owner == i  # within the body, so within it the mark is obj["mark"]
        paint_body(canvas, visible, obj["colour"], obj["u"], obj["v"], rng)
        paint_mark(canvas, visible & obj["mark"], looks[obj["cls"]], obj["u"], obj["v"], rng)
    canvas *= 0.85 + 0.3 * smooth_noise(rng, size, 3)  # uneven illumination
    canvas = canvas * 255 + rng.normal(0, 5, size=canvas.shape)
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
                            "difficult": int(small or visible.sum() < 0.6 * obj["area"])})
    return img, label, annotations


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


def dataset_image(seed: int, split_id: int, i: int, image_size: int, looks: list[Appearance],
                  layout: Layout) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Image ``i`` of split ``split_id`` (0 train, 1 val) of the dataset drawn with ``seed``."""
    rng = np.random.default_rng([seed, split_id, i])
    short = int(round(image_size * rng.uniform(0.7, 1.0)))
    size = (image_size, short) if rng.random() < 0.3 else (short, image_size)
    return make_image(rng, size, looks, layout)


def world_sample(image_size: int, seed: int, num_classes: int, layout: str, count: int = 4) -> list[dict]:
    """A fingerprint of the world: the mean colour and the label counts of the first ``count``
    training images, drawn again. A file trained on the world records it, so a test can tell when
    the world changed under the file (compare with a tolerance: a last-bit difference of a sine on
    another CPU may move a pixel)."""
    looks = class_appearances(num_classes)
    sample = []
    for i in range(count):
        img, label, _ = dataset_image(seed, 0, i, image_size, looks, LAYOUTS[layout])
        values, counts = np.unique(label, return_counts=True)
        sample.append({"mean_rgb": [round(float(c), 2) for c in img.reshape(-1, 3).mean(0)],
                       "label_counts": {str(v): int(c) for v, c in zip(values, counts, strict=True)}})
    return sample


def make_demo_dataset(root: str | Path, num_train: int = 160, num_val: int = 60, image_size: int = 160,
                      seed: int = 0, num_classes: int = VOC.num_fg, layout: str = "scenes") -> ClassList:
    """Write the demo dataset under ``root``; ``num_classes`` counts object classes (no background),
    ``layout`` names the kind of image (a key of LAYOUTS).

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
            img, label, annotations = dataset_image(seed, split_id, i, image_size, looks, LAYOUTS[layout])
            name = f"{split}_{i:05d}"
            with atomic_path(root / "JPEGImages" / f"{name}.jpg") as tmp:
                Image.fromarray(img).save(tmp, format="JPEG", quality=90)
            save_label_png(root / "SegmentationClass" / f"{name}.png", label)
            with atomic_path(root / "Annotations" / f"{name}.xml") as tmp:
                annotation_xml(name, label.shape, annotations, classes).write(tmp, encoding="utf-8")
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
    parser.add_argument("--num_train", default=160, type=int)
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
