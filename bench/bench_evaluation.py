"""Evaluation: evaluation.py against the released per-class counting, on synthetic VOC-sized files.

    .venv/bin/python bench/bench_evaluation.py                     # 1,464 PNGs, curve on 100 CAMs
    .venv/bin/python bench/bench_evaluation.py --num_images 200 --curve_images 20
    .venv/bin/python bench/bench_evaluation.py --part metrics      # --metrics miou,biou,trimap,prf vs miou

Generates 500x375 ground-truth PNGs (objects with a 255 boundary band, like VOC) and predictions
in a temporary folder, then times: the released do_python_eval (8 processes adding to locked
shared counters, three masks per class per image; re-implemented here), ours, and just decoding
the two PNGs of every image. The CAM curve: the released way (60 thresholds, every file reloaded
at each one) against ours (one pass). Both must give identical numbers. ``--part metrics``: our
evaluation with every metric (Boundary IoU, trimap, precision/recall) against mIoU alone on the
same PNGs, timed in turn; the two confusions must be identical.
"""
from __future__ import annotations

import argparse
import functools
import multiprocessing
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import benchutil
import cv2
import numpy as np
from PIL import Image

import evaluation
from tool.fileio import load_label_png, save_label_png, save_scores
from voc12.classes import VOC

IMAGE_SIZE = (375, 500)  # height, width
RELEASED_PROCESSES = 8


def released_do_python_eval(predict_folder: Path, gt_folder: Path, name_list: list[str], num_cls: int,
                            input_type: str = "png", threshold: float = 1.0) -> dict:
    """The released evaluation: 8 processes striding over the list, each adding per-class pixel
    counts (three masks per class) to lock-protected shared integers."""
    counters = [[multiprocessing.Value("i", 0, lock=True) for _ in range(num_cls)] for _ in range(3)]
    workers = [multiprocessing.Process(target=_released_compare,
                                       args=(start, name_list, predict_folder, gt_folder, num_cls, input_type,
                                             threshold, counters))
               for start in range(RELEASED_PROCESSES)]
    for p in workers:
        p.start()
    for p in workers:
        p.join()
    tp, pred_total, gt_total = ([c.value for c in row] for row in counters)
    iou = [tp[i] / (gt_total[i] + pred_total[i] - tp[i] + 1e-10) for i in range(num_cls)]
    result = {name: iou[i] * 100 for i, name in enumerate(VOC.all_names[:num_cls])}
    result["mIoU"] = float(np.mean(np.array(iou))) * 100
    return result


def _released_compare(start: int, name_list: list[str], predict_folder: Path, gt_folder: Path, num_cls: int,
                      input_type: str, threshold: float, counters: list) -> None:
    tp, pred_total, gt_total = counters
    for name in name_list[start::RELEASED_PROCESSES]:
        if input_type == "png":
            predict = np.array(Image.open(predict_folder / f"{name}.png"))
        else:
            cam = np.load(predict_folder / f"{name}.npy", allow_pickle=True).item()
            h, w = next(iter(cam.values())).shape
            tensor = np.zeros((num_cls, h, w), np.float32)
            for key, value in cam.items():
                tensor[key + 1] = value
            tensor[0] = threshold
            predict = np.argmax(tensor, axis=0).astype(np.uint8)
        gt = np.array(Image.open(gt_folder / f"{name}.png"))
        cal = gt < 255
        mask = (predict == gt) * cal
        for i in range(num_cls):
            for counter, count in ((pred_total[i], (predict == i) * cal), (gt_total[i], (gt == i) * cal),
                                   (tp[i], (gt == i) * mask)):
                with counter.get_lock():
                    counter.value += int(np.sum(count))


def make_image(index: int, root: Path, with_cam: bool) -> None:
    """One ground truth (2-4 objects, 5 px 255 band on their outlines), a prediction that moves
    and sometimes mislabels them, and for the curve a CAM as our .npz and the released .npy."""
    rng = np.random.default_rng(index)
    h, w = IMAGE_SIZE
    gt = np.zeros((h, w), np.uint8)
    pred = np.zeros((h, w), np.uint8)
    objects = []
    for cls in rng.choice(np.arange(1, VOC.num_classes), size=rng.integers(2, 5), replace=False):
        center = (int(rng.integers(60, w - 60)), int(rng.integers(60, h - 60)))
        axes = (int(rng.integers(20, 150)), int(rng.integers(20, 120)))
        angle = float(rng.uniform(0, 180))
        objects.append((int(cls), center, axes, angle))
        cv2.ellipse(gt, center, axes, angle, 0, 360, int(cls), -1)
        cv2.ellipse(gt, center, axes, angle, 0, 360, 255, 5)
        moved = (center[0] + int(rng.integers(-20, 21)), center[1] + int(rng.integers(-20, 21)))
        label = int(cls) if rng.random() < 0.8 else int(rng.integers(1, VOC.num_classes))
        cv2.ellipse(pred, moved, axes, angle, 0, 360, label, -1)
    name = f"{index:06d}"
    save_label_png(root / "gt" / f"{name}.png", gt)
    save_label_png(root / "png" / f"{name}.png", pred)
    if with_cam:
        labels = np.array([cls for cls, *_ in objects])
        scores = np.zeros((len(objects), h, w), np.float32)
        for k, (_, center, axes, angle) in enumerate(objects):
            cv2.ellipse(scores[k], center, (axes[0] + 15, axes[1] + 15), angle, 0, 360, 0.3, -1)
            cv2.ellipse(scores[k], center, axes, angle, 0, 360, 0.8, -1)
        scores = np.clip(cv2.GaussianBlur(scores.transpose(1, 2, 0), (0, 0), 9).reshape(h, w, -1), 0, 1)
        scores = np.ascontiguousarray(scores.transpose(2, 0, 1), dtype=np.float32)
        save_scores(root / "cam" / f"{name}.npz", labels, scores)
        np.save(root / "npy" / f"{name}.npy", {int(c) - 1: s for c, s in zip(labels, scores, strict=True)})


def decode_chunk(root: Path, names: list[str]) -> int:
    """Just read the two PNGs of each image (the floor for any PNG evaluation)."""
    pixels = 0
    for name in names:
        for folder in ("png", "gt"):
            pixels += load_label_png(root / folder / f"{name}.png").size
    return pixels


def decode_all(root: Path, names: list[str], workers: int) -> int:
    if workers <= 1:
        return decode_chunk(root, names)
    size = -(-len(names) // (workers * evaluation.CHUNKS_PER_WORKER))
    with ProcessPoolExecutor(workers) as pool:
        return sum(pool.map(functools.partial(decode_chunk, root), [names[i:i + size]
                                                                    for i in range(0, len(names), size)]))


def bench_metrics(root: Path, names: list[str], workers: int, repeat: int) -> None:
    """``--metrics miou,biou,trimap,prf`` against ``--metrics miou`` (evaluation.evaluate_counts and
    the metrics read off the counts, as evaluation.run does them)."""
    every = evaluation.metric_options(",".join(evaluation.METRICS), 0.02, 5)
    miou_only = evaluation.metric_options("miou", 0.02, 5)

    def measure(options: evaluation.MetricOptions) -> tuple[np.ndarray, dict]:
        counts = evaluation.evaluate_counts(root / "png", root / "gt", names, VOC.num_classes,
                                            num_workers=workers, options=options)
        conf = counts.confusions[0]
        return conf, {"mIoU": evaluation.metrics(conf, VOC.all_names)["mIoU"],
                      **evaluation.extra_metrics(counts, conf, VOC.all_names, options)}

    timed = benchutil.best_times({"miou": lambda: measure(miou_only), "all": lambda: measure(every)}, repeat)
    (miou_s, (miou_conf, _)), (all_s, (all_conf, result)) = timed["miou"], timed["all"]
    print(f"\n--metrics, {len(names)} PNG predictions of {IMAGE_SIZE[1]}x{IMAGE_SIZE[0]}, {workers} processes, "
          f"best of {repeat}:")
    print(f"  {'--metrics miou':<52}{miou_s:7.2f} s")
    print(f"  {'--metrics miou,biou,trimap,prf':<52}{all_s:7.2f} s   {all_s / miou_s:.2f}x the time of miou")
    print(f"  confusions identical: {np.array_equal(miou_conf, all_conf)}; mIoU {result['mIoU']:.4f}, "
          + ", ".join(f"{key} {result[key]['mean']:.4f}" for key in evaluation.EXTRA_COLUMNS) + " (means, %)")


def max_difference(a: dict, b: dict) -> float:
    return max(abs(a[key] - b[key]) for key in b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", default=1464, type=int, help="VOC train has 1,464 images")
    parser.add_argument("--curve_images", default=100, type=int, help="images for the CAM curve comparison")
    parser.add_argument("--num_workers", type=int,
                        default=evaluation.get_arg_parser().get_default("num_workers"))
    parser.add_argument("--repeat", default=3, type=int, help="best of this many runs for the fast methods")
    parser.add_argument("--part", default="all", choices=["all", "released", "metrics"],
                        help="released: against the released evaluation (PNGs and the CAM curve); "
                             "metrics: every --metrics against mIoU alone")
    args = parser.parse_args()
    num_classes = VOC.num_classes
    workers = args.num_workers
    print(f"machine: {benchutil.machine()}; our workers: {workers}, released processes: {RELEASED_PROCESSES}")

    root = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    try:
        for sub in ("gt", "png", "cam", "npy"):
            (root / sub).mkdir()
        num_cams = 0 if args.part == "metrics" else args.curve_images
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(functools.partial(make_image, root=root, with_cam=False), range(num_cams, args.num_images)))
            list(pool.map(functools.partial(make_image, root=root, with_cam=True), range(num_cams)))
        names = [f"{i:06d}" for i in range(args.num_images)]
        cam_names = names[:num_cams]
        if args.part in ("all", "metrics"):
            bench_metrics(root, names, workers, args.repeat)
        if args.part == "metrics":
            return

        print(f"\nPNG evaluation, {len(names)} predictions of {IMAGE_SIZE[1]}x{IMAGE_SIZE[0]}:")
        released_s, released = benchutil.best_time(
            lambda: released_do_python_eval(root / "png", root / "gt", names, num_classes), repeat=1)
        timed = benchutil.best_times({
            "ours": lambda: evaluation.do_python_eval(root / "png", root / "gt", names, num_classes,
                                                      num_workers=workers),
            "decode": lambda: decode_all(root, names, workers),
            "decode1": lambda: decode_all(root, names, 1),
        }, repeat=args.repeat)
        (ours_s, ours), (decode_s, _), (decode1_s, _) = timed["ours"], timed["decode"], timed["decode1"]
        print(f"  {'released (8 processes, locked per-class counters)':<52}{released_s:7.2f} s")
        print(f"  {f'ours ({workers} processes, one joint histogram per image)':<52}{ours_s:7.2f} s"
              f"   {released_s / ours_s:.1f}x faster")
        print(f"  {f'decoding the PNGs only, {workers} processes':<52}{decode_s:7.2f} s"
              f"   ours takes {ours_s / decode_s:.2f}x that")
        print(f"  {'decoding the PNGs only, 1 process':<52}{decode1_s:7.2f} s")
        print(f"  mIoU: released {released['mIoU']:.6f}, ours {ours['mIoU']:.6f}; "
              f"largest difference over the class IoUs and mIoU: {max_difference(ours, released):.1e}")

        print(f"\nCAM curve, 60 background thresholds over {len(cam_names)} CAMs:")
        thresholds = evaluation.CURVE_THRESHOLDS
        released_curve_s, released_curve = benchutil.best_time(
            lambda: [released_do_python_eval(root / "npy", root / "gt", cam_names, num_classes, "npy",
                                             t)["mIoU"] for t in thresholds], repeat=1)

        def our_curve() -> list[float]:
            confs = evaluation.evaluate_confusions(root / "cam", root / "gt", cam_names, num_classes, "npz",
                                                   thresholds, num_workers=workers)
            return [evaluation.metrics(conf, VOC.all_names)["mIoU"] for conf in confs]

        ours_curve_s, ours_curve = benchutil.best_time(our_curve, repeat=args.repeat)
        best = int(np.argmax(ours_curve))
        print(f"  {'released (reload every file at each threshold)':<52}{released_curve_s:7.2f} s")
        print(f"  {'ours (one pass, cumulative histogram)':<52}{ours_curve_s:7.2f} s"
              f"   {released_curve_s / ours_curve_s:.1f}x faster")
        difference = max(abs(a - b) for a, b in zip(ours_curve, released_curve, strict=True))
        print(f"  best t {thresholds[best]:.2f}: mIoU {ours_curve[best]:.4f}; "
              f"largest difference over the curve: {difference:.1e}")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
