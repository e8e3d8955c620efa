"""Inference arithmetic against independent re-computations: the multi-scale CAM of infer_SB.py
and the CAM-with-background of infer_aff.py."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import infer_aff
import infer_SB
from network import resnet38_sb
from tool.fileio import save_scores


def released_norm(total: np.ndarray) -> np.ndarray:
    """The released normalisation of the summed CAM, in float64."""
    total = np.maximum(total, 0)
    cam_max = total.max(axis=(1, 2), keepdims=True)
    cam_min = total.min(axis=(1, 2), keepdims=True)
    total = np.where(total < cam_min + 1e-5, 0, total)
    return (total - cam_min - 1e-5) / (cam_max - cam_min + 1e-5)


def test_multiscale_cam_equals_one_pass_per_view():
    torch.manual_seed(0)
    model = resnet38_sb.Net(num_classes=4, width=0.125).eval()
    size = (37, 29)
    views = []
    for scale in (0.5, 1.0, 1.5):
        img = torch.randn(3, round(size[0] * scale), round(size[1] * scale))
        views += [img, img.flip(-1)]
    label = torch.tensor([1.0, 0.0, 1.0])
    ours = infer_SB.multiscale_cam(model, views, label, size, torch.device("cpu"))

    total = np.zeros((3, *size))
    with torch.no_grad():
        for i, view in enumerate(views):
            cam_rv = model(view[None]).cam_rv
            cam = F.interpolate(cam_rv[:, 1:], size, mode="bilinear", align_corners=False)[0].double().numpy()
            total += (cam[..., ::-1] if i % 2 else cam) * label.view(-1, 1, 1).numpy()
    np.testing.assert_allclose(ours, released_norm(total), rtol=1e-4, atol=1e-5)
    assert ours.dtype == np.float32 and ours.shape == (3, *size)
    assert (ours[1] <= 0).all()  # an absent class carries no score


def test_cam_with_background(tmp_path):
    rng = np.random.default_rng(1)
    cams = rng.random((2, 5, 6)).astype(np.float32)
    save_scores(tmp_path / "a.npz", np.array([2, 4]), cams)
    full = infer_aff.cam_with_background(tmp_path / "a.npz", (5, 6), num_classes=6, alpha=4.0, allow_pickle=False)
    assert full.shape == (6, 5, 6)
    np.testing.assert_array_equal(full[[2, 4]], cams)
    assert not full[[1, 3, 5]].any()
    np.testing.assert_allclose(full[0], (1 - cams.max(0)) ** 4, rtol=1e-6)
