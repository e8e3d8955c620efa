"""Where a segmentation meets the boundaries: Boundary IoU and the trimap band, per class.

Boundary IoU (Cheng, Girshick, Dollar, Berg, Kirillov, "Boundary IoU: Improving Object-Centric
Image Segmentation Evaluation", CVPR 2021): for a ground-truth mask G and a predicted mask P,
G_d and P_d are the pixels of each mask within distance d of its contour, and

    Boundary IoU = |G_d & P_d| / |G_d | P_d|,   d = round(ratio * image diagonal), at least 1,

with the image border counting as contour. The authors' ``mask_to_boundary`` pads the mask with
one row and column of zeros, erodes it d times with a 3 x 3 kernel and keeps the mask minus its
erosion: the mask pixels within chessboard distance d of a pixel outside the mask or of the
image border. Here, per class c, G = (ground truth == c) and P = (prediction == c), and the two
counts are summed over a dataset before dividing, as the IoU's are.

The trimap (Kohli et al. 2009, used by DeepLab v1/v2 to measure accuracy near boundaries): the
pixels within ``trimap_px`` of a ground-truth class boundary. A class boundary is where the
ground-truth label changes between neighbouring pixels, 255 counting as a label of its own, so
VOC's void band around each object is a boundary; the image edge is not one. The trimap IoU is
the IoU of the pixels in that band.

Distances are chessboard distances (3 x 3 neighbourhoods), as the iterated 3 x 3 erosion of the
reference measures them.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from tool.errors import InputError
from tool.iou import CALCHIST_MAX_PIXELS, check_label_pair

_BYTE_VALUES = 256
# Bits of the band plane counted with every (ground truth, prediction) pair.
TRIMAP, GT_BOUNDARY, PRED_BOUNDARY = 1, 2, 4
_NUM_CODES = 8


def boundary_width(shape: tuple[int, ...], ratio: float) -> int:
    """Cheng et al.'s d in pixels: ``round(ratio * image diagonal)``, at least 1 (12 for a
    500 x 375 VOC image at the default ratio 0.02)."""
    return max(1, int(round(ratio * math.hypot(shape[0], shape[1]))))


def label_boundary(labels: np.ndarray, width: int, image_border: bool) -> np.ndarray:
    """The pixels that have a pixel of another label within chessboard distance ``width``, as a
    uint8 mask (255 in the band, 0 elsewhere).

    On the pixels of a label c this is Cheng et al.'s boundary region of the mask ``labels == c``
    (``mask_to_boundary`` with d = ``width``), for every label at once: a pixel is inside its mask
    by more than d iff its (2d + 1)^2 window holds one label only, i.e. the window's minimum equals
    its maximum (one erosion and one dilation of the label map with a square kernel, the same as
    d 3 x 3 ones). With ``image_border`` a window that reaches past the image edge counts as
    holding another label (the reference's zero padding); without it the pixels outside the
    image are left out of the window (the trimap).
    """
    if labels.dtype != np.uint8:
        raise TypeError(f"label map must be uint8, got {labels.dtype}")
    size = 2 * width + 1
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (size, size))
    if image_border:
        low = cv2.erode(labels, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
        high = cv2.dilate(labels, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=_BYTE_VALUES - 1)
    else:  # OpenCV's default border value leaves the outside out of both the minimum and the maximum
        low = cv2.erode(labels, kernel)
        high = cv2.dilate(labels, kernel)
    return cv2.compare(low, high, cv2.CMP_NE)


def boundary_iou(counts: np.ndarray) -> np.ndarray:
    """Per-class Boundary IoU from ``(2, C)`` summed intersections and unions (float64). As the
    IoU of :func:`tool.iou.iou_from_confusion`, an empty union gives 0 (padded with 1e-10), so a
    class absent from both ground truth and prediction counts as 0 in a mean over classes."""
    intersection, union = np.asarray(counts)
    return intersection / (union + 1e-10)


class BandCounter:
    """Pixel counts by (ground truth, prediction, band bits) summed over images, int64
    ``(C + 2, C + 2, 8)``: labels 0..C-1 are the classes, C is ``ignore_index``, C + 1 any other
    (invalid) value.

    The band bits of a pixel: ``TRIMAP`` if within ``trimap_px`` of a ground-truth class boundary,
    ``GT_BOUNDARY`` / ``PRED_BOUNDARY`` if in the boundary region of its ground-truth / predicted
    class (d from ``boundary_ratio``). A band left as ``None`` is not computed. One 3-D OpenCV
    histogram per image gives the plain confusion and every band's counts at once, in memory that
    does not grow with the number of images.
    """

    def __init__(self, num_classes: int, boundary_ratio: float | None, trimap_px: int | None,
                 ignore_index: int = 255) -> None:
        if num_classes + 1 >= _BYTE_VALUES or not num_classes <= ignore_index < _BYTE_VALUES:
            raise ValueError(f"{num_classes} classes and ignore index {ignore_index} do not fit in uint8 labels")
        self.boundary_ratio = boundary_ratio
        self.trimap_px = trimap_px
        self._compact = np.full(_BYTE_VALUES, num_classes + 1, np.uint8)
        self._compact[:num_classes] = np.arange(num_classes)
        self._compact[ignore_index] = num_classes
        self._bins = [num_classes + 2, num_classes + 2, _NUM_CODES]
        self.total = np.zeros(self._bins, np.int64)

    def bands(self, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
        """The band bits of every pixel of one image, uint8."""
        code = np.zeros(gt.shape, np.uint8)
        if self.trimap_px is not None:
            code |= label_boundary(gt, self.trimap_px, image_border=False) & TRIMAP
        if self.boundary_ratio is not None:
            width = boundary_width(gt.shape, self.boundary_ratio)
            code |= label_boundary(gt, width, image_border=True) & GT_BOUNDARY
            code |= label_boundary(pred, width, image_border=True) & PRED_BOUNDARY
        return code

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        check_label_pair(pred, gt)
        if not gt.size:
            return
        code = self.bands(pred, gt)
        planes = [cv2.LUT(gt, self._compact), cv2.LUT(pred, self._compact), code]
        planes = [np.ascontiguousarray(plane).reshape(1, -1) for plane in planes]
        ranges = [value for bins in self._bins for value in (0, bins)]
        # OpenCV counts in float32, exact below 2^24 pixels: larger images go in pieces.
        step = CALCHIST_MAX_PIXELS - 1
        for start in range(0, gt.size, step):
            piece = [plane[:, start:start + step] for plane in planes]
            self.total += cv2.calcHist(piece, [0, 1, 2], None, self._bins, ranges).astype(np.int64)


def band_joint(counts: np.ndarray, bits: int) -> np.ndarray:
    """The ``(C + 2, C + 2)`` joint counts of the pixels whose band bits include all of ``bits``
    (0: every pixel), from :class:`BandCounter` counts."""
    codes = [code for code in range(counts.shape[-1]) if code & bits == bits]
    return counts[..., codes].sum(axis=-1)


def band_confusions(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From :class:`BandCounter` counts: the ``(C, C + 1)`` confusion of every pixel (as
    :mod:`tool.iou` builds it), that of the trimap band, and the ``(2, C)`` Boundary IoU counts:
    per class c, |G_d & P_d| and |G_d | P_d| over the pixels whose ground truth is not
    ``ignore_index`` (those count for neither).

    Raises InputError if a ground-truth or predicted value is neither a class nor ``ignore_index``.
    """
    num_classes = counts.shape[0] - 2
    if counts[-1].any() or counts[:, -1].any():
        raise InputError(f"a ground-truth or predicted value is neither a class 0..{num_classes - 1} nor ignored")

    def confusion(bits: int) -> np.ndarray:
        return band_joint(counts, bits)[:num_classes, :num_classes + 1]

    gt_region = confusion(GT_BOUNDARY).sum(axis=1)  # |G_d| per class, whatever the prediction
    pred_region = confusion(PRED_BOUNDARY)[:, :num_classes].sum(axis=0)  # |P_d| on labelled pixels
    intersection = np.diagonal(confusion(GT_BOUNDARY | PRED_BOUNDARY)).copy()
    boundary = np.stack([intersection, gt_region + pred_region - intersection])
    return confusion(0), confusion(TRIMAP), boundary
