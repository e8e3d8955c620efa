"""Pictures: VOC-palette PNGs, CAM overlays, the visualisation command and TensorBoard images."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from tool import visualization
from tool.fileio import load_img_name_list, load_label_png, save_label_png, save_scores, voc_palette


def test_palette_png_round_trip_in_voc_colours(tmp_path):
    label = np.zeros((7, 9), np.uint8)
    label[2:5, 3:6] = 15  # person
    label[0, :] = 255
    save_label_png(tmp_path / "x.png", label)
    with Image.open(tmp_path / "x.png") as img:
        assert img.mode == "P"
        rgb = np.asarray(img.convert("RGB"))
    np.testing.assert_array_equal(load_label_png(tmp_path / "x.png"), label)
    assert tuple(rgb[3, 4]) == (192, 128, 128)  # VOC's person colour
    assert tuple(rgb[0, 0]) == (224, 224, 192)  # VOC's ignore colour
    assert tuple(rgb[6, 0]) == (0, 0, 0)
    assert tuple(voc_palette()[1]) == (128, 0, 0)


def test_colorize_and_heatmap():
    label = np.array([[0, 1], [2, 255]], np.uint8)
    np.testing.assert_array_equal(visualization.colorize_label(label), voc_palette()[label])
    hot = visualization.heatmap(np.array([[0.0, 1.0]]))
    assert hot[0, 0, 2] > hot[0, 0, 0] and hot[0, 1, 0] > hot[0, 1, 2]  # low is blue, high is red


def test_cam_picture_shows_the_present_class():
    img = torch.zeros(3, 16, 16)
    cam = torch.zeros(4, 16, 16)
    cam[2, 4:8, 4:8] = 5.0
    cam[3] = 9.0  # absent from the label: must not show
    pic = visualization.cam_picture(img, cam, torch.tensor([0.0, 1.0, 0.0]))
    assert pic.shape == (16, 32, 3) and pic.dtype == np.uint8
    overlay = pic[:, 16:].astype(int)
    assert overlay[6, 6, 0] > overlay[12, 12, 0]  # red where the class is


def test_visualisation_command(tiny_voc, tmp_path):
    names = load_img_name_list(tiny_voc / "val.txt")[:3]
    cam_dir, pred_dir = tmp_path / "cam", tmp_path / "pred"
    for name in names:
        gt = load_label_png(tiny_voc / "SegmentationClass" / f"{name}.png")
        save_scores(cam_dir / f"{name}.npz", np.array([1]), np.random.default_rng(0).random((1, *gt.shape)))
        save_label_png(pred_dir / f"{name}.png", np.where(gt == 255, 0, gt))
    out = visualization.main(["--voc12_root", str(tiny_voc), "--list", str(tiny_voc / "val.txt"), "--gt_dir",
                              str(tiny_voc / "SegmentationClass"), "--cam_dir", str(cam_dir), "--pred_dir",
                              str(pred_dir), "--out", str(tmp_path / "vis.png"), "--max_images", "3"])
    assert out == tmp_path / "vis.png"
    with Image.open(out) as img:
        assert img.mode == "RGB"
        # four panels (image, gt, cam, prediction) side by side, three rows
        assert img.width >= 4 * 48 and img.height >= 3 * 48

