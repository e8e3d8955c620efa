"""PASCAL VOC 2012 datasets: images, image-level labels, boundary maps and affinity labels.

Every item is a dict. Training datasets draw all their randomness from
``tool.imutils.item_rng(seed, epoch, index)``: call ``set_epoch`` before each epoch, and an item
depends on nothing else, whichever worker or process builds it.

Image lists use the released format, one image per line, ``/JPEGImages/NAME.jpg
/SegmentationClassAug/NAME.png``; plain ``NAME`` lines are read too. Image-level labels live in
``cls_labels.npz`` beside the list (``voc12.make_lists`` writes it): ``names`` (unicode, N) and
``labels`` (uint8, N x num_fg), class order that of the dataset's :class:`~voc12.classes.ClassList`.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from tool import imutils
from tool.affinity import effective_radius, extract_affinity_labels
from tool.errors import InputError
from tool.fileio import (
    atomic_path,
    find_array_file,
    load_img_name_list,
    load_label_png,
    load_sb_map,
    load_scores,
    read_image,
)
from tool.imutils import Normalize
from voc12.classes import IGNORE_INDEX, ClassList

IMG_FOLDER_NAME = "JPEGImages"
LABEL_FILE_NAME = "cls_labels.npz"
# Pixels whose pooled CRF scores all fall below this are crop padding (the released threshold).
NO_SCORE = 1e-5


def default_label_file(list_path: str | Path) -> str:
    """The label file that ``voc12.make_lists`` writes beside a list."""
    return str(Path(list_path).with_name(LABEL_FILE_NAME))


def save_image_labels(path: str | Path, names: list[str], labels: np.ndarray) -> None:
    """Write image-level labels (``labels``: N x num_fg, 0/1) as a label file, atomically."""
    labels = np.asarray(labels, dtype=np.uint8)
    if labels.ndim != 2 or labels.shape[0] != len(names):
        raise ValueError(f"labels of shape {labels.shape} do not match {len(names)} names")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, names=np.array(names, dtype=np.str_), labels=labels)


def load_image_labels(label_file: str | Path, names: list[str], num_fg: int) -> np.ndarray:
    """Labels of ``names`` from a label file, float32 ``(len(names), num_fg)``."""
    try:
        with np.load(label_file, allow_pickle=False) as z:
            file_names, labels = z["names"], z["labels"]
    except FileNotFoundError:
        raise InputError(f"label file not found: {label_file}") from None
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{label_file} is not a label file ({e.__class__.__name__}: {e})") from None
    if labels.ndim != 2 or labels.shape[1] != num_fg:
        raise InputError(f"{label_file} holds {labels.shape[-1]} classes per image, the class list {num_fg}"
                         " (pass the matching --dataset_classes)")
    row = {str(n): i for i, n in enumerate(file_names)}
    missing = next((n for n in names if n not in row), None)
    if missing is not None:
        raise InputError(f"{label_file} has no label for image {missing}")
    return labels[[row[n] for n in names]].astype(np.float32)


def image_path(voc12_root: str | Path, name: str) -> Path:
    return Path(voc12_root) / IMG_FOLDER_NAME / f"{name}.jpg"


def first_item(batch: list) -> dict:
    """``collate_fn`` for ``batch_size=1`` loaders that want the item itself, uncollated."""
    return batch[0]


def _first_missing(paths: list[Path]) -> Path | None:
    return next((p for p in paths if not p.is_file()), None)


class VOC12ImageDataset(Dataset):
    """Images of a list: ``{'name', 'img', 'orig'}``.

    ``img`` is the uint8 ``(H, W, 3)`` image, or with ``normalize`` the float32 ``(3, H, W)``
    network input; ``orig`` is always the uint8 image.
    """

    def __init__(self, list_path: str | Path, voc12_root: str | Path, normalize: bool = False) -> None:
        self.voc12_root = Path(voc12_root)
        if not self.voc12_root.is_dir():
            raise InputError(f"VOC2012 folder not found: {voc12_root}")
        self.names = load_img_name_list(list_path)
        missing = _first_missing([image_path(self.voc12_root, n) for n in self.names])
        if missing is not None:
            raise InputError(f"image file not found: {missing} (listed in {list_path})")
        self.normalize = Normalize() if normalize else None

    def __len__(self) -> int:
        return len(self.names)

    def read(self, index: int) -> np.ndarray:
        return read_image(image_path(self.voc12_root, self.names[index]))

    def __getitem__(self, index: int) -> dict:
        img = self.read(index)
        net_img = torch.from_numpy(imutils.hwc_to_chw(self.normalize(img))) if self.normalize else img
        return {"name": self.names[index], "img": net_img, "orig": img}


class VOC12ClsDataset(VOC12ImageDataset):
    """Training crops with image-level labels, and boundary maps given ``sb_map_dir``.

    The released SB pipeline, in its order: random long-side resize (image bicubic, map cubic
    spline), horizontal flip, colour jitter, normalisation, random crop (the normalised image
    and the map padded with 0). Item: ``{'name', 'img'`` (3, crop, crop) float32, ``'label'``
    (num_fg,) float32, and ``'sb_map'`` (num_classes, crop, crop) float32 in [0, 1]``}``.
    """

    def __init__(self, list_path: str | Path, voc12_root: str | Path, label_file: str | Path,
                 classes: ClassList, crop_size: int = 448, resize_long: tuple[int, int] | None = (448, 768),
                 sb_map_dir: str | Path | None = None, seed: int = 0) -> None:
        super().__init__(list_path, voc12_root)
        self.labels = load_image_labels(label_file, self.names, classes.num_fg)
        self.classes = classes
        self.crop_size = crop_size
        self.resize_long = resize_long
        self.sb_map_paths = None
        if sb_map_dir is not None:
            self.sb_map_paths = [find_array_file(sb_map_dir, n) for n in self.names]
            missing = _first_missing(self.sb_map_paths)
            if missing is not None:
                raise InputError(f"boundary map not found: {missing} (make them with python -m voc12.sb_map)")
        self.normalize = Normalize()
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def read_sb_map(self, index: int, size: tuple[int, int]) -> np.ndarray:
        path = self.sb_map_paths[index]
        sb_map = load_sb_map(path)
        if sb_map.shape[0] != self.classes.num_classes:
            raise InputError(f"{path} has {sb_map.shape[0]} channels, expected {self.classes.num_classes}"
                             " (background + classes)")
        if sb_map.shape[1:] != size:
            raise InputError(f"{path} is {sb_map.shape[1]}x{sb_map.shape[2]}, its image {size[0]}x{size[1]}")
        return sb_map

    def __getitem__(self, index: int) -> dict:
        rng = imutils.item_rng(self.seed, self.epoch, index)
        img = self.read(index)
        maps = [self.read_sb_map(index, img.shape[:2])] if self.sb_map_paths else []
        if self.resize_long is not None:
            img, maps = imutils.random_resize_long(rng, img, maps, *self.resize_long)
        img, maps = imutils.random_hflip(rng, img, maps)
        img = self.normalize(imutils.color_jitter(rng, img))
        img, maps = imutils.random_crop(rng, self.crop_size, img, maps)
        item = {"name": self.names[index], "img": torch.from_numpy(imutils.hwc_to_chw(img)),
                "label": torch.from_numpy(self.labels[index])}
        if maps:
            item["sb_map"] = torch.from_numpy(maps[0].astype(np.float32, copy=False))
        return item


class VOC12ClsDatasetMSF(VOC12ImageDataset):
    """Multi-scale inference inputs: ``{'name', 'img'`` (each scale, then its mirror image: CHW
    float32 tensors), ``'label'`` (num_fg,), ``'size'`` (H, W), ``'orig'`` uint8 HWC``}``.

    Scaled sizes round as released (``round(side * scale)``), bicubic PIL resize. ``max_side``
    bounds the longer side of every view: an image whose largest view would be longer is first
    resized so that it is not (its longer side to ``max_side / max(scales)``, rounded down; the views
    only: ``size`` and ``orig`` stay full size, so the CAMs come back at full size), which bounds
    the network's memory.
    """

    def __init__(self, list_path: str | Path, voc12_root: str | Path, label_file: str | Path,
                 classes: ClassList, scales: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0),
                 max_side: int | None = None) -> None:
        super().__init__(list_path, voc12_root)
        self.labels = load_image_labels(label_file, self.names, classes.num_fg)
        self.scales = scales
        self.max_side = max_side
        self.normalize = Normalize()

    def __getitem__(self, index: int) -> dict:
        orig = self.read(index)
        h, w = orig.shape[:2]
        img = orig
        largest = max(self.scales)
        if self.max_side and max(h, w) * largest > self.max_side:
            img = imutils.resize_image(orig, imutils.long_side_size((h, w), max(1, int(self.max_side / largest))))
        views = []
        for s in self.scales:
            scaled = imutils.resize_image(img, (round(img.shape[0] * s), round(img.shape[1] * s)))
            chw = imutils.hwc_to_chw(self.normalize(scaled))
            views += [torch.from_numpy(chw), torch.from_numpy(chw[..., ::-1].copy())]
        return {"name": self.names[index], "img": views, "label": torch.from_numpy(self.labels[index]),
                "size": (h, w), "orig": orig}


def affinity_label(la_labels: np.ndarray, la_scores: np.ndarray, ha_labels: np.ndarray,
                   ha_scores: np.ndarray) -> np.ndarray:
    """The released AffinityNet label map from the two CRF score maps (same ``H, W``), uint8.

    The background score is ``(1 - max)^alpha``, so the low-alpha CRF (``la``) has the stronger
    background and the high-alpha one (``ha``) the weaker. Foreground where ``la`` still picks a
    class (confident foreground); background where even ``ha`` picks the background (confident
    background); ignored (255) in between and where no score is above ``NO_SCORE`` (crop padding).
    """
    la = la_labels[np.argmax(la_scores, axis=0)]
    ha = ha_labels[np.argmax(ha_scores, axis=0)]
    label = np.where(la == 0, IGNORE_INDEX, la).astype(np.uint8)
    label[ha == 0] = 0
    no_score = np.maximum(la_scores.max(axis=0), ha_scores.max(axis=0)) < NO_SCORE
    label[no_score] = IGNORE_INDEX
    return label


class VOC12AffDataset(VOC12ImageDataset):
    """AffinityNet training crops: ``{'name', 'img'`` (3, crop, crop), ``'aff_bg', 'aff_fg',
    'aff_neg'`` (num_offsets, num_sources) float32``}``.

    The released pipeline, in its order: colour jitter, random crop of the image and both CRF
    score maps (all padded with 0 before normalisation), normalisation, horizontal flip, scores
    averaged over 8x8 blocks, :func:`affinity_label`, then ``extract_affinity_labels``.
    """

    def __init__(self, list_path: str | Path, voc12_root: str | Path, la_crf_dir: str | Path,
                 ha_crf_dir: str | Path, crop_size: int = 448, radius: int = 5, seed: int = 0,
                 allow_pickle: bool = False) -> None:
        super().__init__(list_path, voc12_root)
        self.crf_paths = [(find_array_file(la_crf_dir, n), find_array_file(ha_crf_dir, n)) for n in self.names]
        missing = _first_missing([p for pair in self.crf_paths for p in pair])
        if missing is not None:
            raise InputError(f"CRF score file not found: {missing}")
        self.crop_size = crop_size
        self.radius = radius
        self.allow_pickle = allow_pickle
        self.normalize = Normalize()
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def read_crf(self, path: Path, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        labels, scores = load_scores(path, allow_pickle=self.allow_pickle)
        if scores is None or scores.shape[1:] != size:
            got = "no scores" if scores is None else f"{scores.shape[1]}x{scores.shape[2]}"
            raise InputError(f"{path} holds {got}, its image is {size[0]}x{size[1]}")
        return labels, scores

    def __getitem__(self, index: int) -> dict:
        rng = imutils.item_rng(self.seed, self.epoch, index)
        img = self.read(index)
        (la_labels, la), (ha_labels, ha) = (self.read_crf(p, img.shape[:2]) for p in self.crf_paths[index])
        img = imutils.color_jitter(rng, img)
        img, (la, ha) = imutils.random_crop(rng, self.crop_size, img, [la, ha])
        img, (la, ha) = imutils.random_hflip(rng, self.normalize(img), [la, ha])
        label = affinity_label(la_labels, imutils.block_mean(la, 8), ha_labels, imutils.block_mean(ha, 8))
        # Small crops fall back to a smaller radius, exactly as AffinityNet does on their features.
        bg, fg, neg = extract_affinity_labels(label, effective_radius(self.radius, label.shape))
        return {"name": self.names[index], "img": torch.from_numpy(imutils.hwc_to_chw(img)),
                "aff_bg": torch.from_numpy(bg), "aff_fg": torch.from_numpy(fg),
                "aff_neg": torch.from_numpy(neg)}


class VOC12SegDataset(VOC12ImageDataset):
    """DeepLab training crops from label PNGs (``label_dir/NAME.png``, 255 ignored).

    deeplab-pytorch's pipeline, in its order: a scale drawn from ``scales`` (image bilinear,
    label nearest; sizes truncated), the network's input ``normalize`` (RGB ``(H, W, 3)`` float ->
    float, e.g. the caffe BGR mean subtraction), padding at the bottom and right to ``crop_size``
    (the image with 0, i.e. the mean after normalisation; the label with 255), a random crop and a
    horizontal flip. Item: ``{'name', 'img'`` (3, crop, crop) float32, ``'label'`` (crop, crop) int64``}``.
    """

    def __init__(self, list_path: str | Path, voc12_root: str | Path, label_dir: str | Path, num_classes: int,
                 normalize: Callable[[np.ndarray], np.ndarray], crop_size: int = 321,
                 scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5), seed: int = 0) -> None:
        super().__init__(list_path, voc12_root)
        self.label_paths = [Path(label_dir) / f"{n}.png" for n in self.names]
        missing = _first_missing(self.label_paths)
        if missing is not None:
            raise InputError(f"label file not found: {missing} (the --label_dir of the training list)")
        self.num_classes = num_classes
        self.normalize = normalize
        self.crop_size = crop_size
        self.scales = tuple(scales)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def read_label(self, index: int, size: tuple[int, int]) -> np.ndarray:
        path = self.label_paths[index]
        label = load_label_png(path)
        if label.shape != size:
            raise InputError(f"{path} is {label.shape[0]}x{label.shape[1]}, its image {size[0]}x{size[1]}")
        bad = (label >= self.num_classes) & (label != IGNORE_INDEX)
        if bad.any():
            raise InputError(f"{path} holds label {int(label[bad].max())}; the classes are 0..{self.num_classes - 1}"
                             f" and {IGNORE_INDEX} (pass the matching --dataset_classes)")
        return label

    def __getitem__(self, index: int) -> dict:
        rng = imutils.item_rng(self.seed, self.epoch, index)
        img = self.read(index)
        label = self.read_label(index, img.shape[:2])
        scale = self.scales[int(rng.integers(len(self.scales)))]
        size = (int(img.shape[0] * scale), int(img.shape[1] * scale))
        img = cv2.resize(img.astype(np.float32), size[::-1], interpolation=cv2.INTER_LINEAR)
        label = imutils.resize_map(label, size)
        img, label = imutils.random_pad_crop(rng, self.crop_size, self.normalize(img), label, 0, IGNORE_INDEX)
        img, (label,) = imutils.random_hflip(rng, img, [label])
        return {"name": self.names[index], "img": torch.from_numpy(imutils.hwc_to_chw(img)),
                "label": torch.from_numpy(label.astype(np.int64))}
