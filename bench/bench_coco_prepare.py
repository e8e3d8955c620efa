"""MS COCO at scale: coco14.prepare's masks per second and peak memory as the image count grows,
and evaluation of 81 classes over many masks against the released per-class counting.

    .venv/bin/python bench/bench_coco_prepare.py --part prepare     # 200, 800, 3200 images
    .venv/bin/python bench/bench_coco_prepare.py --part eval        # 81 classes, 500 and 4000 masks

prepare: a synthetic COCO (coco14.synthetic) of 640x480 images with 3 to 10 instances each (COCO
averages 7.7) in the three segmentation forms; each size runs coco14.prepare in a fresh process
that reports its time, its own peak RSS (VmHWM) and the largest peak RSS of its worker processes.
eval: 640x480 ground truths of 81 classes (2 to 6 objects, a 255 band on their outlines) and
predictions; evaluation.evaluate_confusions in a fresh process per size (time, peak RSS of the
process and of its workers), and the released counting (bench_evaluation) on the smaller set.
"""
from __future__ import annotations

import argparse
import functools
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import benchutil
import cv2
import numpy as np
from bench_evaluation import released_do_python_eval

import evaluation
from coco14 import prepare
from coco14.synthetic import make_synthetic_coco
from tool.fileio import save_label_png

NUM_CLASSES = 81
IMAGE_SIZE = (480, 640)  # height, width: COCO's most common size


def peak_memory() -> dict:
    """This process's peak RSS, and the largest peak RSS of its finished children, in MiB."""
    children_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    return {"main_peak_mib": benchutil.rss_kib("VmHWM") / 1024, "worker_peak_mib": children_kib / 1024}


def probe_prepare(coco_root: str, out_root: str, workers: int) -> dict:
    start_mib = benchutil.rss_kib("VmRSS") / 1024
    tic = time.perf_counter()
    summary = prepare.run(prepare.get_arg_parser().parse_args(
        ["--coco_root", coco_root, "--out_root", out_root, "--num_workers", str(workers)]))
    seconds = time.perf_counter() - tic
    masks = sum(summary["written"].values())
    return {"masks": masks, "seconds": seconds, "masks_per_s": masks / seconds, "start_mib": start_mib,
            **peak_memory()}


def make_eval_image(index: int, root: Path) -> None:
    """A ground truth of 2-6 objects of the 80 classes with a 5 px 255 band, and a prediction
    that moves them and relabels one in five."""
    rng = np.random.default_rng(index)
    h, w = IMAGE_SIZE
    gt = np.zeros((h, w), np.uint8)
    pred = np.zeros((h, w), np.uint8)
    for cls in rng.choice(np.arange(1, NUM_CLASSES), size=rng.integers(2, 7), replace=False):
        center = (int(rng.integers(60, w - 60)), int(rng.integers(60, h - 60)))
        axes = (int(rng.integers(20, 200)), int(rng.integers(20, 150)))
        angle = float(rng.uniform(0, 180))
        cv2.ellipse(gt, center, axes, angle, 0, 360, int(cls), -1)
        cv2.ellipse(gt, center, axes, angle, 0, 360, 255, 5)
        moved = (center[0] + int(rng.integers(-20, 21)), center[1] + int(rng.integers(-20, 21)))
        label = int(cls) if rng.random() < 0.8 else int(rng.integers(1, NUM_CLASSES))
        cv2.ellipse(pred, moved, axes, angle, 0, 360, label, -1)
    save_label_png(root / "gt" / f"{index:06d}.png", gt)
    save_label_png(root / "png" / f"{index:06d}.png", pred)


def probe_eval(root: str, num_images: int, workers: int) -> dict:
    names = [f"{i:06d}" for i in range(num_images)]
    start_mib = benchutil.rss_kib("VmRSS") / 1024
    tic = time.perf_counter()
    conf = evaluation.evaluate_confusions(Path(root) / "png", Path(root) / "gt", names, NUM_CLASSES,
                                          num_workers=workers)[0]
    seconds = time.perf_counter() - tic
    miou = evaluation.metrics(conf, [str(c) for c in range(NUM_CLASSES)])["mIoU"]
    return {"images": num_images, "seconds": seconds, "start_mib": start_mib, "mIoU": miou, **peak_memory()}


def run_probe(*argv) -> dict:
    out = subprocess.run([sys.executable, __file__, *map(str, argv)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def bench_prepare(sizes: list[int], workers: int) -> None:
    print(f"coco14.prepare, {workers} workers, {IMAGE_SIZE[1]}x{IMAGE_SIZE[0]} images, 3-10 instances each:")
    print(f"  {'images':>7} {'json MiB':>9} {'masks/s':>8} {'seconds':>8} {'start MiB':>10} "
          f"{'main peak MiB':>14} {'worker peak MiB':>16}")
    for size in sizes:
        root = Path(tempfile.mkdtemp(prefix="bench_coco_"))
        try:
            make_synthetic_coco(root / "COCO", num_random=(size - 4 - size // 5, size // 5 - 4), size=IMAGE_SIZE,
                                instances=(3, 10))
            json_mib = sum(p.stat().st_size for p in (root / "COCO" / "annotations").iterdir()) / 2 ** 20
            r = run_probe("--probe_prepare", root / "COCO", root / "COCO14", workers)
            print(f"  {r['masks']:>7,} {json_mib:>9.1f} {r['masks_per_s']:>8.0f} {r['seconds']:>8.1f} "
                  f"{r['start_mib']:>10.0f} {r['main_peak_mib']:>14.0f} {r['worker_peak_mib']:>16.0f}")
        finally:
            shutil.rmtree(root)


def bench_eval(sizes: list[int], compare: int, workers: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="bench_coco_eval_"))
    try:
        for sub in ("gt", "png"):
            (root / sub).mkdir()
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(functools.partial(make_eval_image, root=root), range(max(sizes)), chunksize=64))
        print(f"\nevaluation.py, {NUM_CLASSES} classes, {workers} workers, {IMAGE_SIZE[1]}x{IMAGE_SIZE[0]} masks:")
        print(f"  {'images':>7} {'seconds':>8} {'images/s':>9} {'start MiB':>10} {'main peak MiB':>14} "
              f"{'worker peak MiB':>16}")
        ours = {}
        for size in sizes:
            r = run_probe("--probe_eval", root, size, workers)
            ours[size] = r
            print(f"  {size:>7,} {r['seconds']:>8.2f} {size / r['seconds']:>9.0f} {r['start_mib']:>10.0f} "
                  f"{r['main_peak_mib']:>14.0f} {r['worker_peak_mib']:>16.0f}")
        names = [f"{i:06d}" for i in range(compare)]
        released_s, released = benchutil.best_time(
            lambda: released_do_python_eval(root / "png", root / "gt", names, NUM_CLASSES), repeat=1)
        ours_s, mine = benchutil.best_time(
            lambda: evaluation.do_python_eval(root / "png", root / "gt", names, NUM_CLASSES, num_workers=workers),
            repeat=1)
        print(f"\n  {compare} images, released (8 processes, locked per-class counters): {released_s:.2f} s; "
              f"ours: {ours_s:.2f} s, {released_s / ours_s:.1f}x faster")
        print(f"  mIoU released {released['mIoU']:.6f}, ours {mine['mIoU']:.6f}, "
              f"difference {abs(released['mIoU'] - mine['mIoU']):.1e}")
    finally:
        shutil.rmtree(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["prepare", "eval"], default="prepare")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="image counts (default: 200 800 3200 for prepare, 500 4000 for eval)")
    parser.add_argument("--compare", default=500, type=int, help="images for the released evaluation")
    parser.add_argument("--num_workers", default=2, type=int)
    parser.add_argument("--probe_prepare", nargs=3, metavar=("COCO", "OUT", "WORKERS"), help=argparse.SUPPRESS)
    parser.add_argument("--probe_eval", nargs=3, metavar=("ROOT", "IMAGES", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe_prepare:
        print(json.dumps(probe_prepare(args.probe_prepare[0], args.probe_prepare[1], int(args.probe_prepare[2]))))
        return
    if args.probe_eval:
        print(json.dumps(probe_eval(args.probe_eval[0], int(args.probe_eval[1]), int(args.probe_eval[2]))))
        return
    print(f"machine: {benchutil.machine()}")
    if args.part == "prepare":
        bench_prepare(args.sizes or [200, 800, 3200], args.num_workers)
    else:
        sizes = args.sizes or [500, 4000]
        bench_eval(sizes, min(args.compare, max(sizes)), args.num_workers)


if __name__ == "__main__":
    main()
