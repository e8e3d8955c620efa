"""Dense CRF (pydensecrf) with the released parameters, or DeepLab's. infer_SB.py and infer_seg.py run
it in a process pool."""
from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_softmax

# DeepLab's test-time CRF (deeplab-pytorch configs/voc12.yaml: POS_XY_STD 1, POS_W 3, BI_XY_STD 67,
# BI_RGB_STD 3, BI_W 4, 10 iterations).
DEEPLAB_CRF = {"gauss_sxy": 1, "gauss_compat": 3, "bilateral_sxy": 67, "bilateral_srgb": 3, "bilateral_compat": 4}


def crf_inference(img: np.ndarray, probs: np.ndarray, t: int = 10, scale_factor: float = 1,
                  labels: int | None = None, *, gauss_sxy: float = 3, gauss_compat: float = 3,
                  bilateral_sxy: float = 80, bilateral_srgb: float = 13, bilateral_compat: float = 10) -> np.ndarray:
    """Mean-field dense CRF: ``img`` uint8 ``(H, W, 3)``, ``probs`` ``(K, H, W)`` scores in [0, 1]
    (clipped at 1e-5 for the unary -log p); returns the ``(K, H, W)`` float32 marginals after
    ``t`` iterations. Defaults are the released (PSA/SEAM/SBNet) parameters: Gaussian sxy
    3/scale compat 3, bilateral sxy 80/scale srgb 13 compat 10; :data:`DEEPLAB_CRF` holds
    DeepLab's."""
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"img must be uint8 (H, W, 3), got {img.dtype} {img.shape}")
    if probs.ndim != 3 or probs.shape[1:] != img.shape[:2]:
        raise ValueError(f"probs of shape {probs.shape} do not match an image of size {img.shape[:2]}")
    num_labels = probs.shape[0] if labels is None else labels
    if num_labels != probs.shape[0]:
        raise ValueError(f"labels={num_labels} but probs have {probs.shape[0]} channels")
    h, w = img.shape[:2]
    crf = dcrf.DenseCRF2D(w, h, num_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=gauss_sxy / scale_factor, compat=gauss_compat)
    # pydensecrf takes the image as a writable buffer: a read-only one (np.asarray of a PIL image) is copied.
    rgbim = np.require(img, requirements=["C_CONTIGUOUS", "WRITEABLE"])
    crf.addPairwiseBilateral(sxy=bilateral_sxy / scale_factor, srgb=bilateral_srgb, rgbim=rgbim,
                             compat=bilateral_compat)
    return np.array(crf.inference(t), dtype=np.float32).reshape(num_labels, h, w)


def background_score(cam_scores: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 - max over classes)^alpha``, ``(1, H, W)``; 1 where there is no class."""
    if cam_scores.shape[0] == 0:
        return np.ones((1, *cam_scores.shape[1:]), cam_scores.dtype)
    return np.power(1 - cam_scores.max(axis=0, keepdims=True), alpha)


def crf_with_alpha(img: np.ndarray, labels: np.ndarray, cam_scores: np.ndarray,
                   alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """CRF of a CAM with background ``(1 - max)^alpha`` (released ``_crf_with_alpha``).

    ``labels`` (K,) are the foreground segmentation indices of ``cam_scores`` (K, H, W). Returns
    ``(labels_with_bg, crf_scores)``: ``[0, *labels]`` and the ``(K + 1, H, W)`` marginals,
    background first, ready for :func:`tool.fileio.save_scores`.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if cam_scores.ndim != 3 or cam_scores.shape[0] != labels.size:
        raise ValueError(f"cam_scores of shape {cam_scores.shape} do not match {labels.size} labels")
    if np.any(labels <= 0):
        raise ValueError(f"labels {labels.tolist()} must be foreground indices (> 0)")
    bg_cam = np.concatenate([background_score(cam_scores, alpha), cam_scores])
    return np.concatenate([[0], labels]), crf_inference(img, bg_cam, labels=bg_cam.shape[0])
