"""Pictures of CAMs and masks: TensorBoard images, the demo's figure and a command that overlays
CAMs and predictions on images.

    python -m tool.visualization --voc12_root VOC2012 --list voc12/val.txt --cam_dir out_cam \
        --pred_dir out_rw --out vis --max_images 8
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tool.cli import add_allow_pickle_arg, run_main
from tool.fileio import load_img_name_list, load_label_png, load_scores, read_image, voc_palette
from tool.imutils import denormalize


def colorize_label(label: np.ndarray) -> np.ndarray:
    """A label map in the VOC palette, ``(H, W, 3)`` uint8."""
    return voc_palette()[np.asarray(label, dtype=np.uint8)]


def heatmap(score: np.ndarray) -> np.ndarray:
    """A [0, 1] map as a blue-to-red jet-like colour image, ``(H, W, 3)`` uint8."""
    s = np.clip(score, 0, 1)[..., None]
    rgb = np.concatenate([np.clip(1.5 - np.abs(4 * s - 3), 0, 1), np.clip(1.5 - np.abs(4 * s - 2), 0, 1),
                          np.clip(1.5 - np.abs(4 * s - 1), 0, 1)], axis=-1)
    return (255 * rgb).astype(np.uint8)


def blend(img: np.ndarray, overlay: np.ndarray, weight: float = 0.5) -> np.ndarray:
    return ((1 - weight) * img.astype(np.float32) + weight * overlay.astype(np.float32)).astype(np.uint8)


def denormalize_image(img: torch.Tensor | np.ndarray) -> np.ndarray:
    """A normalised CHW image back to uint8 HWC RGB."""
    rgb = denormalize(torch.as_tensor(img).detach().cpu().float()).numpy().transpose(1, 2, 0)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def cam_picture(img: torch.Tensor, cam: torch.Tensor, label: torch.Tensor) -> np.ndarray:
    """TensorBoard picture of one training image: the image beside the max over its present
    classes of the max-normalised CAM, ``(H, 2W, 3)`` uint8."""
    rgb = denormalize_image(img)
    present = torch.nonzero(label > 0).flatten() + 1
    cam = torch.relu(cam.float())
    if present.numel():
        cam = cam[present] / (cam[present].flatten(1).max(1)[0].view(-1, 1, 1) + 1e-5)
        score = cam.max(0)[0].cpu().numpy()
    else:
        score = np.zeros(cam.shape[1:], np.float32)
    score = np.asarray(Image.fromarray(score).resize(rgb.shape[1::-1], Image.BILINEAR))
    return np.concatenate([rgb, blend(rgb, heatmap(score))], axis=1)


def cam_max_score(cam_file: Path, size: tuple[int, int], allow_pickle: bool = False) -> np.ndarray:
    labels, scores = load_scores(cam_file, allow_pickle=allow_pickle, released_cam=True)
    return scores.max(0) if labels.size else np.zeros(size, np.float32)


def figure_row(img: np.ndarray, panels: list[np.ndarray]) -> np.ndarray:
    """One image and its panels (each ``(H, W, 3)``) side by side with a white gap."""
    gap = np.full((img.shape[0], 4, 3), 255, np.uint8)
    parts = [img]
    for p in panels:
        parts += [gap, p]
    return np.concatenate(parts, axis=1)


def stack_rows(rows: list[np.ndarray]) -> np.ndarray:
    """Rows of different widths/heights stacked on a white canvas."""
    width = max(r.shape[1] for r in rows)
    gap = np.full((4, width, 3), 255, np.uint8)
    out = []
    for r in rows:
        pad = np.full((r.shape[0], width - r.shape[1], 3), 255, np.uint8)
        out += [np.concatenate([r, pad], axis=1), gap]
    return np.concatenate(out[:-1], axis=0)


def run(args: argparse.Namespace) -> Path:
    root = Path(args.voc12_root)
    names = load_img_name_list(args.list)[: args.max_images]
    rows = []
    for name in names:
        img_path = root / "JPEGImages" / f"{name}.jpg"
        img = read_image(img_path)
        panels = []
        if args.gt_dir:
            panels.append(colorize_label(load_label_png(Path(args.gt_dir) / f"{name}.png")))
        if args.cam_dir:
            cam_file = Path(args.cam_dir) / f"{name}.npz"
            panels.append(blend(img, heatmap(cam_max_score(cam_file, img.shape[:2], args.allow_pickle))))
        for pred_dir in args.pred_dir or []:
            panels.append(blend(img, colorize_label(load_label_png(Path(pred_dir) / f"{name}.png")), 0.6))
        rows.append(figure_row(img, panels))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(stack_rows(rows)).save(out)
    return out


def get_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--voc12_root", required=True)
    parser.add_argument("--list", required=True)
    parser.add_argument("--gt_dir", default=None, help="ground-truth PNGs (first panel)")
    parser.add_argument("--cam_dir", default=None, help="CAM score files: max over classes as a heat map")
    parser.add_argument("--pred_dir", default=None, nargs="+", help="prediction PNG folders, one panel each")
    parser.add_argument("--out", default="vis.png")
    parser.add_argument("--max_images", default=8, type=int)
    add_allow_pickle_arg(parser)
    return parser


def main(argv: list[str] | None = None) -> Path:
    return run_main(run, get_arg_parser(), argv)


if __name__ == "__main__":
    main()
