"""Pictures of CAMs and masks: TensorBoard images, the demo's figure and a command that overlays
CAMs and predictions on images.

    python -m tool.visualization --voc12_root VOC2012 --list voc12/val.txt --cam_dir out_cam \
        --pred_dir out_rw --out vis --max_images 8
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tool.cli import add_allow_pickle_arg, run_main
from tool.fileio import atomic_path, load_img_name_list, load_label_png, load_scores, read_image, voc_palette
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


def max_score(labels: np.ndarray, scores: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A CAM's best class score at each pixel; zeros for an image without classes."""
    return scores.max(0) if labels.size else np.zeros(size, np.float32)


def cam_max_score(cam_file: Path, size: tuple[int, int], allow_pickle: bool = False) -> np.ndarray:
    return max_score(*load_scores(cam_file, allow_pickle=allow_pickle, released_cam=True), size)


def save_grid(path: str | Path, column_titles: Sequence[str], rows: Sequence[Sequence[np.ndarray]],
              captions: Sequence[Sequence[str]] | None = None, panel_inches: float = 1.9) -> None:
    """Panels (``(H, W, 3)`` uint8 each) in a grid with a title over each column and an optional
    caption under each panel, written as an RGB PNG atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    num_cols = len(column_titles)
    if any(len(row) != num_cols for row in rows):
        raise ValueError(f"every row needs {num_cols} panels, one per column title")
    fig = Figure(figsize=(panel_inches * num_cols, (panel_inches + 0.3) * len(rows) + 0.3), dpi=100)
    axes = fig.subplots(len(rows), num_cols, squeeze=False)
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            ax = axes[r][c]
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(column_titles[c], fontsize=9)
            if captions is not None and captions[r][c]:
                ax.set_xlabel(captions[r][c], fontsize=8)
    fig.tight_layout()
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    picture = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3])  # opaque: the alpha is 255
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")


def run(args: argparse.Namespace) -> Path:
    root = Path(args.voc12_root)
    names = load_img_name_list(args.list)[: args.max_images]
    titles = ["image"] + ["ground truth"] * bool(args.gt_dir) + ["CAM"] * bool(args.cam_dir)
    titles += [Path(d).name for d in args.pred_dir or []]
    rows = []
    for name in names:
        img = read_image(root / "JPEGImages" / f"{name}.jpg")
        panels = [img]
        if args.gt_dir:
            panels.append(colorize_label(load_label_png(Path(args.gt_dir) / f"{name}.png")))
        if args.cam_dir:
            cam_file = Path(args.cam_dir) / f"{name}.npz"
            panels.append(blend(img, heatmap(cam_max_score(cam_file, img.shape[:2], args.allow_pickle))))
        for pred_dir in args.pred_dir or []:
            panels.append(blend(img, colorize_label(load_label_png(Path(pred_dir) / f"{name}.png")), 0.6))
        rows.append(panels)
    out = Path(args.out)
    save_grid(out, titles, rows, [[name] + [""] * (len(titles) - 1) for name in names])
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
