"""Confusion matrices and IoU, the way the released evaluation counts them.

A confusion matrix here is ``(C, C + 1)`` int64: row = ground-truth class, column = predicted
class, and one last column for pixels predicted as ``ignore_index`` (a prediction that names no
class). The released evaluation counts those pixels as misses of their ground-truth class, so
they belong in the row totals but in no column total. Pixels whose ground truth is
``ignore_index`` are not counted at all.
"""
from __future__ import annotations

import cv2
import numpy as np

from tool.errors import InputError

_BYTE_VALUES = 256
# OpenCV counts in float32, exact while no bin passes 2^24; larger maps take np.bincount.
CALCHIST_MAX_PIXELS = 2 ** 24


def joint_histogram(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Counts of every (ground truth, prediction) pair of byte values, ``(256, 256)`` int64.

    One pass over the pixels; the confusion matrix and the check for out-of-range values are
    both read off it. OpenCV's 2-D histogram of the two byte planes is about 1.6x faster than
    ``np.bincount`` of 16-bit pair codes, which serves maps too large for its float32 counts.
    """
    check_label_pair(pred, gt)
    if 0 < gt.size < CALCHIST_MAX_PIXELS:
        return _calchist(pred, gt).astype(np.int64)
    pair = gt.astype(np.uint16)
    pair <<= 8
    pair |= pred
    return np.bincount(pair.reshape(-1), minlength=_BYTE_VALUES ** 2).reshape(_BYTE_VALUES, _BYTE_VALUES)


def check_label_pair(pred: np.ndarray, gt: np.ndarray) -> None:
    """A prediction and its ground truth: uint8 label maps of one size (a size mismatch is the user's)."""
    if pred.dtype != np.uint8 or gt.dtype != np.uint8:
        raise TypeError(f"label maps must be uint8, got {pred.dtype} and {gt.dtype}")
    if pred.shape != gt.shape:
        raise InputError(f"prediction of size {pred.shape} does not match ground truth of size {gt.shape}")


def _calchist(pred: np.ndarray, gt: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """OpenCV's float32 2-D histogram of (gt, pred), added to ``counts`` when given."""
    return cv2.calcHist([np.ascontiguousarray(gt), np.ascontiguousarray(pred)], [0, 1], None,
                        [_BYTE_VALUES, _BYTE_VALUES], [0, _BYTE_VALUES] * 2, hist=counts,
                        accumulate=counts is not None)


class JointCounter:
    """:func:`joint_histogram` summed over many images, exactly, without an int64 copy per image:
    OpenCV accumulates in float32, flushed to int64 before any bin could pass 2^24."""

    def __init__(self) -> None:
        self.total = np.zeros((_BYTE_VALUES, _BYTE_VALUES), np.int64)
        self._partial = np.zeros((_BYTE_VALUES, _BYTE_VALUES), np.float32)
        self._pending = 0

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        if pred.dtype != np.uint8 or gt.dtype != np.uint8 or pred.shape != gt.shape or not 0 < gt.size:
            self.total += joint_histogram(pred, gt)  # raises the right error, or counts an empty map
            return
        if self._pending + gt.size >= CALCHIST_MAX_PIXELS:
            self.flush()
        if gt.size >= CALCHIST_MAX_PIXELS:
            self.total += joint_histogram(pred, gt)
            return
        _calchist(pred, gt, self._partial)
        self._pending += gt.size

    def flush(self) -> np.ndarray:
        """The exact int64 counts so far."""
        if self._pending:
            self.total += self._partial.astype(np.int64)
            self._partial[:] = 0
            self._pending = 0
        return self.total


def confusion_from_joint(joint: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """The ``(C, C + 1)`` confusion matrix held in a joint byte histogram.

    Raises InputError if a ground-truth or predicted value is neither a class nor ``ignore_index``.
    """
    bad_gt = np.flatnonzero(joint.sum(axis=1)[num_classes:])
    bad_gt = bad_gt[bad_gt + num_classes != ignore_index]
    if bad_gt.size:
        raise InputError(f"ground truth holds value {bad_gt[0] + num_classes}; "
                         f"expected 0..{num_classes - 1} or {ignore_index}")
    bad_pred = np.flatnonzero(joint[:, num_classes:].sum(axis=0))
    bad_pred = bad_pred[bad_pred + num_classes != ignore_index]
    if bad_pred.size:
        raise InputError(f"prediction holds value {bad_pred[0] + num_classes}; "
                         f"expected 0..{num_classes - 1} or {ignore_index}")
    conf = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
    conf[:, :num_classes] = joint[:num_classes, :num_classes]
    if ignore_index < _BYTE_VALUES:
        conf[:, num_classes] = joint[:num_classes, ignore_index]
    return conf


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int,
                     ignore_index: int = 255) -> np.ndarray:
    """Confusion matrix ``(C, C + 1)`` of a uint8 label prediction against its uint8 ground truth."""
    return confusion_from_joint(joint_histogram(pred, gt), num_classes, ignore_index)


def iou_from_confusion(conf: np.ndarray) -> np.ndarray:
    """Per-class IoU = TP / (T + P - TP), float64, over the last two axes of ``conf``.

    ``conf`` is ``(..., C, C + 1)`` as built here, or a square ``(..., C, C)`` matrix. As in the
    released code, a class absent from both ground truth and prediction has IoU 0 (its
    denominator is padded with 1e-10), so the mean over all classes counts it.
    """
    conf = np.asarray(conf)
    num_classes = conf.shape[-2]
    if conf.shape[-1] not in (num_classes, num_classes + 1):
        raise ValueError(f"confusion matrix of shape {conf.shape} is neither (C, C) nor (C, C + 1)")
    tp = np.diagonal(conf[..., :num_classes], axis1=-2, axis2=-1)
    gt_total = conf.sum(axis=-1)
    pred_total = conf[..., :num_classes].sum(axis=-2)
    return tp / (gt_total + pred_total - tp + 1e-10)


def precision_recall_from_confusion(conf: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class ``precision`` TP / (TP + FP), ``recall`` TP / (TP + FN), and how a class's errors
    split: ``fp_share`` FP / (FP + FN) (over-activation) and ``fn_share`` FN / (FP + FN)
    (under-activation); float64, from a ``(C, C + 1)`` confusion as built here.

    FP of class c: pixels predicted c whose ground truth is another class; FN: pixels of class c
    predicted as anything else, ``ignore_index`` included (as the IoU counts them). As in
    :func:`iou_from_confusion`, an empty denominator gives 0 (padded with 1e-10): a class never
    predicted has precision 0, a class without errors has both shares 0.
    """
    conf = np.asarray(conf)
    num_classes = conf.shape[-2]
    tp = np.diagonal(conf[..., :num_classes], axis1=-2, axis2=-1)
    false_pos = conf[..., :num_classes].sum(axis=-2) - tp
    false_neg = conf.sum(axis=-1) - tp
    errors = false_pos + false_neg + 1e-10
    return {"precision": tp / (tp + false_pos + 1e-10), "recall": tp / (tp + false_neg + 1e-10),
            "fp_share": false_pos / errors, "fn_share": false_neg / errors}


def cam_labels(labels: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """The uint8 label map of a CAM at background score ``threshold``: SEAM's argmax over
    ``[t, scores...]`` (first index winning ties), i.e. the best class where its score is above t
    (compared in float32) and background elsewhere; the prediction :func:`curve_confusions` counts at t."""
    labels = np.asarray(labels, dtype=np.int64)
    if scores.ndim != 3 or scores.shape[0] != labels.size:
        raise InputError(f"scores of shape {scores.shape} do not match {labels.size} labels")
    best_class, best_score = best_of(labels, scores)
    return np.where(best_score > np.float32(threshold), best_class, 0).astype(np.uint8).reshape(scores.shape[1:])


def crf_labels(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The label map of a CRF score file (background among its ``labels``): the plain argmax,
    ties to the lowest label."""
    order = np.argsort(labels, kind="stable")
    return labels[order][scores[order].argmax(axis=0)].astype(np.uint8)


def image_miou(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = 255) -> float:
    """One image's mean IoU over the classes present in its ground truth or its prediction (pixels
    whose ground truth is ``ignore_index`` left out), in [0, 1]; NaN when no pixel counts."""
    conf = confusion_matrix(pred, gt, num_classes, ignore_index)
    present = conf.sum(axis=1) + conf[:, :num_classes].sum(axis=0) > 0
    return float(iou_from_confusion(conf)[present].mean()) if present.any() else float("nan")


def curve_histogram(labels: np.ndarray, scores: np.ndarray, gt: np.ndarray, thresholds: np.ndarray,
                    num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """Pixel counts ``(C, C, T + 1)`` by (ground truth, best class, number of thresholds below
    the best score); :func:`curve_confusions` turns them into the curve. Sums over images."""
    labels = np.asarray(labels, dtype=np.int64)
    if scores.ndim != 3 or scores.shape[0] != labels.size:
        raise InputError(f"scores of shape {scores.shape} do not match {labels.size} labels")
    if scores.shape[1:] != gt.shape:
        raise InputError(f"score map of size {scores.shape[1:]} does not match "
                         f"ground truth of size {gt.shape}")
    if labels.size and (labels.min() < 1 or labels.max() >= num_classes):
        raise InputError(f"CAM labels {labels.tolist()} are not foreground classes 1..{num_classes - 1}")
    num_bins = len(thresholds) + 1
    valid = gt.reshape(-1) != ignore_index
    gt_valid = gt.reshape(-1)[valid].astype(np.intp)
    if gt_valid.size and gt_valid.max() >= num_classes:
        raise InputError(f"ground truth holds value {gt_valid.max()}; "
                         f"expected 0..{num_classes - 1} or {ignore_index}")
    best_class, best_score = best_of(labels, scores)
    # Scores and t compared in float32, as in the released tensor that holds both.
    num_below = np.searchsorted(np.asarray(thresholds, dtype=np.float32), best_score[valid], side="left")
    index = (gt_valid * num_classes + best_class[valid]) * num_bins + num_below
    return np.bincount(index, minlength=num_classes * num_classes * num_bins).reshape(
        num_classes, num_classes, num_bins)


def best_of(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel, flattened: the label of the highest score (the lowest label on ties, as an
    argmax over a dense class axis) and that score as float32; label 0 and score -inf where
    there is no class."""
    num_labels, h, w = scores.shape
    flat = np.asarray(scores, dtype=np.float32).reshape(num_labels, h * w)
    best_class = np.zeros(flat.shape[1], np.int64)
    best_score = np.full(flat.shape[1], -np.inf, np.float32)
    # One pass per class: on these (K, HW) maps much faster than argmax over axis 0.
    for k in np.argsort(labels, kind="stable"):
        higher = flat[k] > best_score
        best_class[higher] = labels[k]
        np.maximum(best_score, flat[k], out=best_score)
    return best_class, best_score


def curve_confusions(histogram: np.ndarray) -> np.ndarray:
    """Confusions ``(T, C, C + 1)`` at each threshold from a :func:`curve_histogram`.

    At threshold k a pixel keeps its best class iff more than k thresholds lie below its score
    (score > t_k); otherwise it is background. A reversed cumulative sum over the bins gives
    every threshold at once.
    """
    num_classes, _, num_bins = histogram.shape
    kept = np.cumsum(histogram[..., ::-1], axis=-1)[..., ::-1][..., 1:]
    kept = np.moveaxis(kept, -1, 0)
    conf = np.zeros((num_bins - 1, num_classes, num_classes + 1), dtype=np.int64)
    conf[:, :, 1:num_classes] = kept[:, :, 1:]
    conf[:, :, 0] = histogram.sum(axis=(1, 2)) - kept[:, :, 1:].sum(axis=-1)
    return conf


def cam_curve_confusions(labels: np.ndarray, scores: np.ndarray, gt: np.ndarray, thresholds: np.ndarray,
                         num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """Confusions ``(T, C, C + 1)`` of one CAM score map at every background threshold, in one pass.

    ``labels`` (K,) are the foreground classes of ``scores`` (K, H, W). At threshold t the
    prediction is the argmax over ``[t, scores...]`` with the first index winning ties (SEAM):
    background where the best score is <= t, else the best class (lowest label on ties).
    ``thresholds`` must be sorted ascending.
    """
    thresholds = np.asarray(thresholds)
    if np.any(np.diff(thresholds) < 0):
        raise ValueError("thresholds must be sorted ascending")
    return curve_confusions(curve_histogram(labels, scores, gt, thresholds, num_classes, ignore_index))
