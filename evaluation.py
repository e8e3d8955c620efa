r"""Evaluate segmentation predictions or CAMs against ground-truth label PNGs (mIoU, and on request
Boundary IoU, trimap IoU, precision and recall).

    python evaluation.py --list VOC2012/ImageSets/Segmentation/train.txt --predict_dir out_rw \
        --gt_dir VOC2012/SegmentationClass --comment "rw train"
    python evaluation.py --list ... --predict_dir out_cam --type npz --curve True --comment "cam"
    python evaluation.py --list ... --predict_dir out_rw --metrics miou,biou,trimap,prf --comment "rw"

``--type png``: label predictions. ``--type npz``: our score files; a CAM file (foreground labels
only) gets a background score ``--t`` (SEAM), a CRF file (labels include the background) is a plain
argmax. ``--type npy`` (the released README's spelling): CAM or CRF score files, ours (``.npz``) or,
where only those exist, the released pickled ``.npy`` dicts, read only with ``--allow_pickle``. A
released CRF dict (key 0 = background, probabilities) is told from a CAM dict (keys = object
classes counted from 0) and scored as a CRF.
``--curve True`` evaluates every background score t = 0.00 .. 0.59 in one pass over the files,
plots the curve and reports the best t. IoU counts as the released code: TP / (T + P - TP) over
pixels whose ground truth is not 255, a class absent everywhere scoring 0. When the prediction
folder has a provenance record (``tool.provenance``: our inference scripts write one), the log
entry ends with its hash, so that a number in the log can be traced to the weights and flags that
made the predictions.
``--metrics`` adds, per class and as a mean over the classes (mIoU is always reported): ``biou``,
Boundary IoU (Cheng et al., CVPR 2021) with d = ``--boundary_ratio`` x image diagonal;
``trimap``, the IoU of the pixels within ``--trimap_px`` of a ground-truth class boundary
(``tool.boundary`` defines both); ``prf``, precision, recall and the share of false positives
and false negatives in each class's errors (``tool.iou.precision_recall_from_confusion``). With
``--curve`` they are taken at the background score the curve picks by mIoU. They print as a
second table and log as a second line of the entry, so the first line reads as released.
"""
from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tool import provenance
from tool.boundary import BandCounter, band_confusions, boundary_iou
from tool.cli import add_allow_pickle_arg, run_main, str2bool
from tool.errors import InputError
from tool.fileio import atomic_path, find_array_file, load_img_name_list, load_label_png, load_scores
from tool.iou import (
    JointCounter,
    cam_labels,
    confusion_from_joint,
    crf_labels,
    curve_confusions,
    curve_histogram,
    iou_from_confusion,
    joint_histogram,
    precision_recall_from_confusion,
)
from tool.workers import die_with_parent
from voc12.classes import BACKGROUND, IGNORE_INDEX, VOC, load_classes

CURVE_THRESHOLDS = tuple(i / 100 for i in range(60))  # the released curve: t = 0.00 .. 0.59
CHUNKS_PER_WORKER = 4
METRICS = ("miou", "biou", "trimap", "prf")
# The per-class quantities the extra metrics report, with their column titles.
EXTRA_COLUMNS = {"biou": "bIoU", "trimap": "trimap", "precision": "prec", "recall": "recall",
                 "fp_share": "FP/err", "fn_share": "FN/err"}


@dataclass(frozen=True)
class MetricOptions:
    """What ``--metrics``, ``--boundary_ratio`` and ``--trimap_px`` ask for; ``None``: not computed."""

    metrics: tuple[str, ...] = ("miou",)
    boundary_ratio: float | None = None
    trimap_px: int | None = None

    @property
    def bands(self) -> bool:
        """Whether a metric needs the label maps (Boundary IoU, trimap), not only the confusion."""
        return self.boundary_ratio is not None or self.trimap_px is not None


def metric_options(metrics: str, boundary_ratio: float, trimap_px: int) -> MetricOptions:
    """Parse and check the metric flags: a comma list of METRICS, a ratio >= 0, a band of >= 1 pixel."""
    names = tuple(dict.fromkeys(name.strip() for name in metrics.split(",")))
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise InputError(f"unknown metric {unknown[0]!r} in --metrics {metrics!r}; "
                         f"expected a comma list of {', '.join(METRICS)}")
    if not boundary_ratio >= 0:
        raise InputError(f"--boundary_ratio must be >= 0, got {boundary_ratio}")
    if trimap_px < 1:
        raise InputError(f"--trimap_px must be at least 1, got {trimap_px}")
    return MetricOptions(names, boundary_ratio if "biou" in names else None, trimap_px if "trimap" in names else None)


@dataclass(frozen=True)
class EvalSetup:
    """What every worker needs to turn one image's files into counts."""

    predict_dir: Path
    gt_dir: Path
    num_classes: int
    input_type: str
    thresholds: tuple[float, ...] | None
    allow_pickle: bool
    options: MetricOptions = MetricOptions()


def _prediction(setup: EvalSetup, name: str, gt: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """One image's prediction: ``(label map, None)`` or, for a CAM, ``(None, curve histogram)``."""
    path = prediction_path(setup.predict_dir, name, setup.input_type)
    if setup.input_type == "png":
        return load_label_png(path), None
    if path.suffix == ".npy" and not setup.allow_pickle:
        raise InputError(f"{path} is a pickled .npy file of the released code; pass --allow_pickle if you trust it")
    try:
        labels, scores = load_scores(path, allow_pickle=setup.allow_pickle,
                                     released_cam=setup.input_type == "npy")
    except InputError:
        raise
    except Exception as e:  # a released pickle can fail in many ways; all mean "not a CAM dict"
        raise InputError(f"{path} is not a released CAM dict ({e.__class__.__name__}: {e})") from None
    if scores is None:  # an image without any class: background everywhere
        scores = np.zeros((0, *gt.shape), np.float32)
    if labels.size and (labels.min() < 0 or labels.max() >= setup.num_classes):
        raise InputError(f"{path} holds labels {labels.tolist()} outside 0..{setup.num_classes - 1}")
    if 0 in labels:
        return crf_labels(labels, scores), None  # a CRF file: background included
    if setup.thresholds is None:
        raise InputError(f"{path} is a CAM without background: pass --t or --curve")
    if setup.options.bands:  # the band metrics need the label map at the (one) threshold
        return cam_labels(labels, scores, setup.thresholds[0]), None
    return None, curve_histogram(labels, scores, gt, np.asarray(setup.thresholds), setup.num_classes,
                                 IGNORE_INDEX)


def prediction_path(predict_dir: Path, name: str, input_type: str) -> Path:
    """The file of one image: ``NAME.png``; for score files our ``NAME.npz``, or with ``--type npy``
    the released ``NAME.npy`` where only that exists (the released README's ``--type npy`` reads both)."""
    if input_type == "png":
        path = predict_dir / f"{name}.png"
    else:
        path = find_array_file(predict_dir, name) if input_type == "npy" else predict_dir / f"{name}.npz"
    if path.is_file():
        return path
    hint = ""
    if input_type == "npz" and path.with_suffix(".npy").is_file():
        hint = f" ({name}.npy is there: pass --type npy --allow_pickle)"
    elif input_type == "npy":
        hint = f" (nor {name}.npy)"
    elif (predict_dir / f"{name}.npz").is_file():
        hint = f" ({name}.npz is there: pass --type npz)"
    raise InputError(f"prediction file not found: {path}{hint}")


@dataclass(frozen=True)
class Counts:
    """Everything counted over the images; the metrics are read off it."""

    confusions: np.ndarray  # (T, C, C + 1): one confusion per threshold (T = 1 without thresholds)
    trimap: np.ndarray  # (C, C + 1): the confusion of the trimap band (zeros when not asked for)
    boundary: np.ndarray  # (2, C): Boundary IoU intersections and unions (zeros when not asked for)


def count_chunk(setup: EvalSetup, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Summed counts of some images: fixed predictions as a ``(C, C + 1)`` confusion, CAMs as a
    ``(C, C, T + 1)`` curve histogram, the trimap band's ``(C, C + 1)`` confusion and the
    ``(2, C)`` Boundary IoU counts (zeros unless ``setup.options`` asks for them)."""
    num_classes = setup.num_classes
    num_bins = len(setup.thresholds or ()) + 1
    options = setup.options
    if options.bands:
        joint = BandCounter(num_classes, options.boundary_ratio, options.trimap_px, IGNORE_INDEX)
    else:
        joint = JointCounter()
    histogram = np.zeros((num_classes, num_classes, num_bins), np.int64)
    for name in names:
        gt = _ground_truth(setup, name)
        try:
            pred, cam_histogram = _prediction(setup, name, gt)
            if pred is None:
                histogram += cam_histogram
            else:
                joint.add(pred, gt)
        except InputError as e:
            raise InputError(f"{name}: {e}") from None
    try:
        if options.bands:
            fixed, trimap, boundary = band_confusions(joint.total)
        else:
            fixed = confusion_from_joint(joint.flush(), num_classes, IGNORE_INDEX)
            trimap, boundary = np.zeros_like(fixed), np.zeros((2, num_classes), np.int64)
        return fixed, histogram, trimap, boundary
    except InputError:
        # Values out of range: find the first image that holds one, to name it (error path only).
        for name in names:
            gt = _ground_truth(setup, name)
            pred, _ = _prediction(setup, name, gt)
            if pred is None:
                continue
            try:
                confusion_from_joint(joint_histogram(pred, gt), num_classes, IGNORE_INDEX)
            except InputError as e:
                raise InputError(f"{name}: {e}") from None
        raise


def _ground_truth(setup: EvalSetup, name: str) -> np.ndarray:
    gt_path = setup.gt_dir / f"{name}.png"
    if not gt_path.is_file():
        raise InputError(f"ground truth not found: {gt_path}")
    return load_label_png(gt_path)


def evaluate_counts(predict_dir: str | Path, gt_dir: str | Path, names: Sequence[str], num_classes: int,
                    input_type: str = "png", thresholds: Sequence[float] | None = None, num_workers: int = 1,
                    allow_pickle: bool = False, options: MetricOptions = MetricOptions()) -> Counts:
    """The confusion at each threshold and, as ``options`` asks, the band counts, over all images.

    Files are read once, by ``num_workers`` processes (inline for 0 or 1), each summing into
    fixed-size counts. The band metrics need label maps: CAMs then take one threshold only.
    """
    if input_type not in ("png", "npy", "npz"):
        raise InputError(f"unknown input type {input_type!r}; expected png, npy or npz")
    for folder, what in ((predict_dir, "prediction"), (gt_dir, "ground-truth")):
        if not Path(folder).is_dir():
            raise InputError(f"{what} folder not found: {folder}")
    if thresholds is not None:
        thresholds = tuple(float(t) for t in thresholds) or None  # an empty list: no threshold
    if thresholds and list(thresholds) != sorted(thresholds):
        raise InputError("background thresholds must be sorted ascending")
    if options.bands and thresholds and len(thresholds) > 1:
        raise ValueError("Boundary IoU and trimap are counted at one background threshold, not a curve")
    setup = EvalSetup(Path(predict_dir), Path(gt_dir), num_classes, input_type, thresholds, allow_pickle, options)
    count = functools.partial(count_chunk, setup)
    workers = min(num_workers, len(names))
    if workers <= 1:
        fixed, histogram, trimap, boundary = count(names)
    else:
        size = -(-len(names) // (workers * CHUNKS_PER_WORKER))
        chunks = [names[i:i + size] for i in range(0, len(names), size)]
        with ProcessPoolExecutor(workers, initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
            fixed, histogram, trimap, boundary = (sum(parts) for parts in zip(*pool.map(count, chunks), strict=True))
    confusions = fixed[None] + curve_confusions(histogram) if thresholds else fixed[None]
    return Counts(confusions, trimap, boundary)


def evaluate_confusions(predict_dir: str | Path, gt_dir: str | Path, names: Sequence[str], num_classes: int,
                        input_type: str = "png", thresholds: Sequence[float] | None = None,
                        num_workers: int = 1, allow_pickle: bool = False) -> np.ndarray:
    """Confusions ``(T, C, C + 1)`` over all images, one per threshold (T = 1 without thresholds)."""
    return evaluate_counts(predict_dir, gt_dir, names, num_classes, input_type, thresholds, num_workers,
                           allow_pickle).confusions


def class_names_for(num_classes: int) -> tuple[str, ...]:
    """VOC's names for VOC's class count, otherwise ``background, class1, class2, ...``."""
    if num_classes == VOC.num_classes:
        return VOC.all_names
    return (BACKGROUND,) + tuple(f"class{i}" for i in range(1, num_classes))


def metrics(conf: np.ndarray, class_names: Sequence[str]) -> dict:
    """Each class's IoU keyed by name and ``mIoU``, in percent, as the released dict."""
    iou = iou_from_confusion(conf)
    result = {name: float(v * 100) for name, v in zip(class_names, iou, strict=True)}
    result["mIoU"] = float(np.mean(iou) * 100)
    return result


def print_table(result: dict, class_names: Sequence[str]) -> None:
    """Two classes a line, then the mIoU, in the released layout."""
    for i, name in enumerate(class_names):
        print(f"{name:>11}:{result[name]:7.3f}%", end="\n" if i % 2 == 1 else "\t")
    print("\n======================================================")
    print(f"{'mIoU':>11}:{result['mIoU']:7.3f}%")


def extra_metrics(counts: Counts, conf: np.ndarray, class_names: Sequence[str], options: MetricOptions) -> dict:
    """The metrics beyond mIoU that ``options`` asks for, in percent, each as ``{class name: value,
    ..., "mean": value}``: ``biou``, ``trimap`` and for ``prf`` ``precision``, ``recall``,
    ``fp_share`` and ``fn_share`` (from ``conf``). The mean is over all classes, a class absent
    from ground truth and prediction counting 0, as in the mIoU."""
    per_class = {}
    if "biou" in options.metrics:
        per_class["biou"] = boundary_iou(counts.boundary)
    if "trimap" in options.metrics:
        per_class["trimap"] = iou_from_confusion(counts.trimap)
    if "prf" in options.metrics:
        per_class.update(precision_recall_from_confusion(conf))
    return {key: {**{name: float(v * 100) for name, v in zip(class_names, values, strict=True)},
                  "mean": float(np.mean(values) * 100)} for key, values in per_class.items()}


def metric_parameters(options: MetricOptions) -> dict:
    """The parameters of the band metrics asked for, as logged and returned."""
    parameters = {"boundary_ratio": options.boundary_ratio, "trimap_px": options.trimap_px}
    return {key: value for key, value in parameters.items() if value is not None}


def print_extra_table(extra: dict, class_names: Sequence[str], options: MetricOptions) -> None:
    """One line per class, one column per extra metric, then their means over the classes."""
    legend = []
    if options.boundary_ratio is not None:
        legend.append(f"bIoU: Boundary IoU, d = {options.boundary_ratio:g} x image diagonal")
    if options.trimap_px is not None:
        legend.append(f"trimap: IoU within {options.trimap_px} px of a class boundary")
    if "prf" in options.metrics:
        legend.append("prec, recall; FP/err, FN/err: false positives, false negatives in the class's errors")
    print("\n" + "; ".join(legend) + " (%)")
    print(f"{'':>11}" + "".join(f"{EXTRA_COLUMNS[key]:>8}" for key in extra))
    for name in class_names:
        print(f"{name:>11}" + "".join(f"{values[name]:8.3f}" for values in extra.values()))
    print("======================================================")
    print(f"{'mean':>11}" + "".join(f"{values['mean']:8.3f}" for values in extra.values()))


def do_python_eval(predict_folder: str | Path, gt_folder: str | Path, name_list: Sequence[str],
                   num_cls: int = VOC.num_classes, input_type: str = "png", threshold: float = 1.0,
                   printlog: bool = False, class_names: Sequence[str] | None = None, num_workers: int = 1,
                   allow_pickle: bool = False) -> dict:
    """The released function: per-class IoU by name and ``mIoU`` in percent at one background
    score ``threshold`` (used by CAM files only)."""
    class_names = class_names or class_names_for(num_cls)
    conf = evaluate_confusions(predict_folder, gt_folder, list(name_list), num_cls, input_type, [threshold],
                               num_workers, allow_pickle)[0]
    result = metrics(conf, class_names)
    if printlog:
        print_table(result, class_names)
    return result


def write_log(path: str | Path, metric: dict, comment: str, extra: dict | None = None) -> None:
    """Append the released log entry: time and comment, ``key:value`` pairs, a rule; ``extra``
    pairs (the metrics beyond mIoU) on a line of their own before the rule."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [metric, extra] if extra else [metric]
    with open(path, "a") as f:
        f.write(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime()) + f"\t{comment}\n")
        for pairs in lines:
            f.write("".join(f"{key}:{value}  " for key, value in pairs.items()) + "\n")
        f.write("=====================================\n")


def plot_curve(path: str | Path, thresholds: Sequence[float], miou: Sequence[float], comment: str) -> None:
    """mIoU against the background score, 640 x 480 pixels."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    ax = fig.add_subplot()
    ax.plot(thresholds, miou, marker=".")
    best = int(np.argmax(miou))
    ax.axvline(thresholds[best], color="grey", linestyle="--", label=f"best t = {thresholds[best]:.2f}")
    ax.set_xlabel("background score t")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(comment)
    ax.legend()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def default_curve_png(logfile: str | Path) -> Path:
    logfile = Path(logfile)
    return logfile.with_name(f"{logfile.stem}_curve.png")


def get_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", default="./VOC2012/ImageSets/Segmentation/train.txt", type=str)
    parser.add_argument("--predict_dir", default="./out_rw", type=str)
    parser.add_argument("--gt_dir", default="./VOC2012/SegmentationClass", type=str)
    parser.add_argument("--logfile", default="./evallog.txt", type=str)
    parser.add_argument("--comment", required=True, type=str)
    parser.add_argument("--type", default="png", choices=["png", "npy", "npz"], type=str)
    parser.add_argument("--t", default=None, type=float, help="background score of CAM files")
    parser.add_argument("--curve", default=False, nargs="?", const=True, type=str2bool,
                        help="evaluate CAMs at t = 0.00 .. 0.59 and report the best")
    parser.add_argument("--dataset_classes", default=None, type=str,
                        help="class-list file of a custom dataset (default: the VOC classes)")
    parser.add_argument("--num_workers", default=min(8, os.cpu_count() or 1), type=int,
                        help="processes reading the files")
    add_allow_pickle_arg(parser)
    parser.add_argument("--curve_png", default=None, type=str,
                        help="where to plot the curve (default: LOGFILE_curve.png beside the log file)")
    parser.add_argument("--metrics", default="miou", type=str,
                        help=f"comma list of {', '.join(METRICS)} (mIoU is always reported)")
    parser.add_argument("--boundary_ratio", default=0.02, type=float,
                        help="Boundary IoU's d as a fraction of the image diagonal (Cheng et al.'s dilation ratio)")
    parser.add_argument("--trimap_px", default=5, type=int,
                        help="width of the trimap band around the ground-truth class boundaries, in pixels")
    return parser


def run(args: argparse.Namespace) -> dict:
    """Evaluate, print, log; return the logged metrics (with ``threshold``, ``provenance``: the hash
    of the prediction folder's record if it has one, for a curve ``curve``: the mIoU at each t, and
    the metrics ``--metrics`` adds, as :func:`extra_metrics` gives them, with their parameters)."""
    options = metric_options(args.metrics, args.boundary_ratio, args.trimap_px)
    try:
        classes = load_classes(args.dataset_classes)
    except ValueError as e:
        raise InputError(str(e)) from None
    names = load_img_name_list(args.list)
    class_names = classes.all_names
    thresholds = CURVE_THRESHOLDS if args.curve else None if args.t is None else (args.t,)
    # Folders made by our inference scripts carry a record; others (released outputs) log as released.
    origin = {"provenance": digest} if (digest := provenance.folder_digest(args.predict_dir)) else {}
    evaluate = functools.partial(evaluate_counts, args.predict_dir, args.gt_dir, names, classes.num_classes,
                                 args.type, num_workers=args.num_workers, allow_pickle=args.allow_pickle)
    # The curve's pass counts confusions only; the band metrics follow at the t it picks.
    counts = evaluate(thresholds=thresholds, options=MetricOptions(options.metrics) if args.curve else options)
    if args.curve:
        curve = [metrics(conf, class_names)["mIoU"] for conf in counts.confusions]
        for i, (t, miou) in enumerate(zip(CURVE_THRESHOLDS, curve, strict=True)):
            print(f"{i}/{len(curve)} background score: {t:.3f}\tmIoU: {miou:.3f}%")
        best = int(np.argmax(curve))
        conf = counts.confusions[best]
        result = metrics(conf, class_names)
        print_table(result, class_names)
        print(f"best background score: {CURVE_THRESHOLDS[best]:.2f}\tmIoU: {curve[best]:.3f}%")
        result["threshold"] = CURVE_THRESHOLDS[best]
        result["curve"] = curve
        result.update(origin)
        logged = {"mIoU": curve, "best_t": result["threshold"], "best_mIoU": result["mIoU"], **origin}
        if options.bands:  # a second pass over the files, at the chosen t
            counts = evaluate(thresholds=(CURVE_THRESHOLDS[best],), options=options)
    else:
        conf = counts.confusions[0]
        result = metrics(conf, class_names)
        print_table(result, class_names)
        if args.t is not None:
            result["threshold"] = args.t
        result.update(origin)
        logged = dict(result)
    extra = extra_metrics(counts, conf, class_names, options)
    parameters = metric_parameters(options)
    if extra:
        print_extra_table(extra, class_names, options)
    extra_pairs = {f"{key}/{name}": value for key, values in extra.items() for name, value in values.items()}
    write_log(args.logfile, logged, args.comment, {**parameters, **extra_pairs})
    if args.curve:
        plot_curve(args.curve_png or default_curve_png(args.logfile), CURVE_THRESHOLDS, curve, args.comment)
    result.update(parameters)
    result.update(extra)
    return result


def main(argv: list[str] | None = None) -> dict:
    return run_main(run, get_arg_parser(), argv)


if __name__ == "__main__":
    main()
