"""Boundary IoU, trimap IoU, precision / recall (tool.boundary, tool.iou, evaluation.py --metrics)
against float64 re-computations written here: the contour bands from scipy's chessboard distance
transform (the code erodes with OpenCV), the counts from per-class boolean masks."""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.ndimage import distance_transform_cdt

import evaluation
from tool import boundary
from tool.boundary import boundary_width, label_boundary
from tool.errors import InputError
from tool.fileio import save_label_png, save_scores
from tool.iou import cam_labels, precision_recall_from_confusion
from voc12.classes import VOC

NUM_CLASSES = VOC.num_classes
IGNORE = 255


def region(mask: np.ndarray, width: int, image_border: bool) -> np.ndarray:
    """The mask's pixels within chessboard distance ``width`` of a pixel outside it (and, with
    ``image_border``, of the outside of the image), from a distance transform."""
    if image_border:
        dist = distance_transform_cdt(np.pad(mask, 1), metric="chessboard")[1:-1, 1:-1]
    elif mask.all():  # no pixel outside the mask: no contour
        return np.zeros_like(mask)
    else:
        dist = distance_transform_cdt(mask, metric="chessboard")
    return mask & (dist <= width)


def published_width(shape: tuple[int, int], ratio: float) -> int:
    """Cheng et al.'s ``mask_to_boundary``: int(round(ratio * sqrt(h^2 + w^2))), at least 1."""
    return max(1, int(round(ratio * np.sqrt(shape[0] ** 2 + shape[1] ** 2))))


def reference_counts(preds: list[np.ndarray], gts: list[np.ndarray], num_classes: int, ratio: float,
                     trimap_px: int) -> dict[str, np.ndarray]:
    """Per-class float64 sums: Boundary IoU intersection / union, trimap TP / T / P, TP / FP / FN."""
    sums = {key: np.zeros(num_classes) for key in ("inter", "union", "t_tp", "t_gt", "t_pred", "tp", "fp", "fn")}
    for pred, gt in zip(preds, gts, strict=True):
        valid = gt != IGNORE
        width = published_width(gt.shape, ratio)
        trimap = np.zeros(gt.shape, bool)
        for value in np.unique(gt):  # every label, 255 included, bounds the others
            trimap |= region(gt == value, trimap_px, image_border=False)
        for c in range(num_classes):
            g, p = gt == c, pred == c
            g_region = region(g, width, True) & valid
            p_region = region(p, width, True) & valid
            sums["inter"][c] += np.sum(g_region & p_region, dtype=np.float64)
            sums["union"][c] += np.sum(g_region | p_region, dtype=np.float64)
            band = trimap & valid
            sums["t_tp"][c] += np.sum(g & p & band, dtype=np.float64)
            sums["t_gt"][c] += np.sum(g & band, dtype=np.float64)
            sums["t_pred"][c] += np.sum(p & band, dtype=np.float64)
            sums["tp"][c] += np.sum(g & p & valid, dtype=np.float64)
            sums["fp"][c] += np.sum(p & ~g & valid, dtype=np.float64)
            sums["fn"][c] += np.sum(g & ~p & valid, dtype=np.float64)
    return sums


def reference_metrics(sums: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The per-class metrics in percent; 0 where the denominator is 0."""
    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        return np.divide(num, den, out=np.zeros_like(num), where=den > 0) * 100

    errors = sums["fp"] + sums["fn"]
    return {"biou": ratio(sums["inter"], sums["union"]),
            "trimap": ratio(sums["t_tp"], sums["t_gt"] + sums["t_pred"] - sums["t_tp"]),
            "precision": ratio(sums["tp"], sums["tp"] + sums["fp"]),
            "recall": ratio(sums["tp"], sums["tp"] + sums["fn"]),
            "fp_share": ratio(sums["fp"], errors), "fn_share": ratio(sums["fn"], errors)}


def random_pair(rng: np.random.Generator, shape: tuple[int, int], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth of ellipses with a 255 outline band (some cut by the image border) and
    scattered 255 pixels; a prediction that moves, relabels and speckles them, with some 255."""
    h, w = shape
    gt = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    for cls in rng.choice(np.arange(1, num_classes), size=4, replace=False):
        center = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(4, w // 2)), int(rng.integers(4, h // 2)))
        angle = float(rng.uniform(0, 180))
        cv2.ellipse(gt, center, axes, angle, 0, 360, int(cls), -1)
        cv2.ellipse(gt, center, axes, angle, 0, 360, IGNORE, int(rng.integers(1, 3)))
        label = int(cls) if rng.random() < 0.75 else int(rng.integers(1, num_classes))
        moved = (center[0] + int(rng.integers(-4, 5)), center[1] + int(rng.integers(-4, 5)))
        cv2.ellipse(pred, moved, axes, angle, 0, 360, label, -1)
    gt[rng.random(shape) < 0.01] = IGNORE
    speckle = rng.random(shape) < 0.02
    pred[speckle] = rng.integers(0, num_classes, size=int(speckle.sum()))
    pred[rng.random(shape) < 0.005] = IGNORE
    return pred, gt


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    """Seven images of different sizes (so d differs): PNG predictions and CAM files."""
    rng = np.random.default_rng(19)
    root = tmp_path_factory.mktemp("structure")
    data = {"root": root, "names": [], "gt": [], "png": [], "cam": []}
    for i in range(7):
        name = f"im{i}"
        shape = (int(rng.integers(40, 110)), int(rng.integers(40, 150)))
        pred, gt = random_pair(rng, shape, NUM_CLASSES)
        save_label_png(root / "gt" / f"{name}.png", gt)
        save_label_png(root / "png" / f"{name}.png", pred)
        labels = np.sort(rng.choice(np.arange(1, NUM_CLASSES), size=3, replace=False))
        scores = (rng.integers(0, 60, size=(3, *shape)) / 100).astype(np.float32)
        scores = cv2.blur(scores.transpose(1, 2, 0), (7, 7)).transpose(2, 0, 1).round(2).astype(np.float32)
        save_scores(root / "cam" / f"{name}.npz", labels, np.ascontiguousarray(scores))
        data["names"].append(name)
        data["gt"].append(gt)
        data["png"].append(pred)
        data["cam"].append((labels, scores))
    (root / "list.txt").write_text("".join(n + "\n" for n in data["names"]))
    return data


ALL = evaluation.MetricOptions(evaluation.METRICS, boundary_ratio=0.05, trimap_px=3)
ALL_KEYS = ("biou", "trimap", "precision", "recall", "fp_share", "fn_share")


def evaluate(data: dict, sub: str = "png", options: evaluation.MetricOptions = ALL, num_classes: int = NUM_CLASSES,
             **kwargs) -> evaluation.Counts:
    return evaluation.evaluate_counts(data["root"] / sub, data["root"] / "gt", data["names"], num_classes,
                                      "png" if sub == "png" else "npz", options=options, **kwargs)


def extra(counts: evaluation.Counts, num_classes: int = NUM_CLASSES,
          options: evaluation.MetricOptions = ALL) -> dict:
    names = evaluation.class_names_for(num_classes)
    return evaluation.extra_metrics(counts, counts.confusions[0], names, options)


def assert_metrics_match(result: dict, expected: dict[str, np.ndarray], num_classes: int) -> None:
    names = evaluation.class_names_for(num_classes)
    assert list(result) == list(ALL_KEYS)
    for key, values in expected.items():
        np.testing.assert_allclose([result[key][n] for n in names], values, rtol=1e-9, atol=1e-9, err_msg=key)
        assert result[key]["mean"] == pytest.approx(values.mean(), rel=1e-9, abs=1e-9)


# --- the contour band ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("width", [1, 2, 5, 12])
def test_label_boundary_is_each_labels_contour_band(width):
    """On every label's pixels, the band is that label's mask pixels within chessboard distance d
    of its contour (the distance transform), with and without the image border as contour."""
    rng = np.random.default_rng(width)
    for shape in ((37, 53), (80, 64)):
        pred, gt = random_pair(rng, shape, 8)
        for labels in (pred, gt):
            for image_border in (True, False):
                expected = np.zeros(shape, bool)
                for value in np.unique(labels):
                    expected |= region(labels == value, width, image_border)
                band = label_boundary(labels, width, image_border)
                assert band.dtype == np.uint8 and set(np.unique(band)) <= {0, 255}
                np.testing.assert_array_equal(band > 0, expected)


def test_image_border_is_a_contour_for_boundary_iou_only():
    """One label everywhere: the Boundary IoU band is the frame of width d along the image edge;
    the trimap band is empty (no class boundary)."""
    labels = np.full((20, 30), 3, np.uint8)
    band = label_boundary(labels, 4, image_border=True) > 0
    frame = np.ones((20, 30), bool)
    frame[4:-4, 4:-4] = False
    np.testing.assert_array_equal(band, frame)
    assert band.sum() == 20 * 30 - 12 * 22
    assert not label_boundary(labels, 4, image_border=False).any()


def test_boundary_width_is_the_published_one():
    assert boundary_width((375, 500), 0.02) == 12  # 0.02 * 625 = 12.5 rounds to even
    assert boundary_width((10, 10), 0.02) == 1  # at least one pixel
    assert boundary_width((480, 640), 0.02) == 16
    for shape in ((37, 53), (333, 500), (1000, 1)):
        for ratio in (0.0, 0.005, 0.02, 0.1):
            assert boundary_width(shape, ratio) == published_width(shape, ratio)


# --- hand-counted cases --------------------------------------------------------------------------------------------

def test_square_shifted_by_one_pixel_counted_by_hand(tmp_path):
    """A 4 x 4 square of class 1 in a 10 x 10 image (d = 1), predicted one pixel to the right.

    Class 1: each square's band is its 12-pixel ring (16 minus the 2 x 2 inside). Both squares
    cover columns 3..5 of rows 2..5 (12 pixels), of which the pixels inside either square's
    inner 2 x 2 (columns 3..5 of rows 3..4: 6 pixels) are in one ring only: 6 in both rings,
    12 + 12 - 6 = 18 in either, Boundary IoU 1/3.
    Background: its band is the 36-pixel image frame plus the 20-pixel ring just outside the
    square (rows 1 and 6, columns 1 and 6 of the 6 x 6 block around it): 56, for both. Both
    share the frame and rows 1 and 6 over columns 2..6 (10 pixels): 46 in both, 56 + 56 - 46 = 66
    in either. (Plain IoU: class 1 12 / 20, background 80 / 88.)
    """
    gt = np.zeros((10, 10), np.uint8)
    gt[2:6, 2:6] = 1
    pred = np.zeros((10, 10), np.uint8)
    pred[2:6, 3:7] = 1
    names = write_pairs(tmp_path, [pred], [gt])
    options = evaluation.MetricOptions(("miou", "biou"), boundary_ratio=0.02)
    counts = evaluation.evaluate_counts(tmp_path / "pred", tmp_path / "gt", names, 2, options=options)
    np.testing.assert_array_equal(counts.boundary, [[46, 6], [66, 18]])
    result = evaluation.extra_metrics(counts, counts.confusions[0], ["background", "object"], options)
    assert result["biou"]["object"] == pytest.approx(100 / 3)
    assert result["biou"]["background"] == pytest.approx(100 * 46 / 66)
    assert result["biou"]["mean"] == pytest.approx((100 / 3 + 100 * 46 / 66) / 2)


def test_trimap_and_ignore_counted_by_hand(tmp_path):
    """A 1-pixel 255 column splits a 6 x 9 image: class 1 left (columns 0..3), background right
    (5..8). With a 2-pixel trimap the band is columns 2..6 (within 2 of a label change; the
    image edge is none); its labelled pixels are columns 2, 3, 5, 6: 6 rows x 4 = 24. The
    prediction calls columns 0..5 class 1: in the band, class 1 has TP 12 (columns 2, 3), FP 6
    (column 5), background TP 6 (column 6), FN 6. The prediction's 1 on the 255 column counts
    nowhere."""
    gt = np.zeros((6, 9), np.uint8)
    gt[:, :4] = 1
    gt[:, 4] = IGNORE
    pred = np.zeros((6, 9), np.uint8)
    pred[:, :6] = 1
    names = write_pairs(tmp_path, [pred], [gt])
    options = evaluation.MetricOptions(("miou", "trimap", "prf"), trimap_px=2)
    counts = evaluation.evaluate_counts(tmp_path / "pred", tmp_path / "gt", names, 2, options=options)
    np.testing.assert_array_equal(counts.trimap, [[6, 6, 0], [0, 12, 0]])
    result = evaluation.extra_metrics(counts, counts.confusions[0], ["background", "object"], options)
    assert result["trimap"]["object"] == pytest.approx(100 * 12 / 18)
    assert result["trimap"]["background"] == pytest.approx(100 * 6 / 12)
    # Over the whole image: class 1 TP 24, FP 6; background TP 18, FN 6.
    assert result["precision"]["object"] == pytest.approx(100 * 24 / 30)
    assert result["recall"]["background"] == pytest.approx(100 * 18 / 24)
    assert result["fp_share"]["object"] == pytest.approx(100) and result["fn_share"]["background"] == pytest.approx(100)


def test_empty_class_and_all_ignore(tmp_path):
    """A class in neither map scores 0 in every metric and counts in the means; ground truth that
    is all 255 counts nothing."""
    gt = np.zeros((12, 12), np.uint8)
    gt[3:9, 3:9] = 1
    gt_void = np.full((12, 12), IGNORE, np.uint8)
    names = write_pairs(tmp_path, [gt.copy(), gt.copy()], [gt, gt_void])
    options = evaluation.MetricOptions(evaluation.METRICS, boundary_ratio=0.1, trimap_px=2)
    counts = evaluation.evaluate_counts(tmp_path / "pred", tmp_path / "gt", names, 3, options=options)
    result = evaluation.extra_metrics(counts, counts.confusions[0], ["background", "a", "b"], options)
    for key in ("biou", "trimap", "precision", "recall"):
        assert result[key]["a"] == pytest.approx(100) and result[key]["background"] == pytest.approx(100)
        assert result[key]["b"] == 0
        assert result[key]["mean"] == pytest.approx(200 / 3)
    assert result["fp_share"]["b"] == 0 and result["fn_share"]["a"] == 0  # no errors: both shares 0
    alone = evaluation.evaluate_counts(tmp_path / "pred", tmp_path / "gt", names[1:], 3, options=options)
    assert not alone.boundary.any() and not alone.trimap.any() and not alone.confusions.any()


# --- generated datasets against the float64 re-computation ---------------------------------------------------------

def test_png_metrics_match_the_float64_recomputation(dataset):
    counts = evaluate(dataset)
    sums = reference_counts(dataset["png"], dataset["gt"], NUM_CLASSES, ALL.boundary_ratio, ALL.trimap_px)
    np.testing.assert_array_equal(counts.boundary, np.stack([sums["inter"], sums["union"]]))
    assert_metrics_match(extra(counts), reference_metrics(sums), NUM_CLASSES)
    assert sums["inter"].sum() > 0 and sums["t_tp"].sum() > 0  # not vacuous


def test_81_classes(tmp_path):
    rng = np.random.default_rng(81)
    pairs = [random_pair(rng, (70, 90), 81) for _ in range(4)]
    for pred, gt in pairs:  # classes beyond VOC's 20
        gt[gt == 1] = 80
        pred[pred == 1] = 80
    preds, gts = [p for p, _ in pairs], [g for _, g in pairs]
    data = {"root": tmp_path, "names": write_pairs(tmp_path, preds, gts, pred_dir="png")}
    counts = evaluate(data, num_classes=81)
    sums = reference_counts(preds, gts, 81, ALL.boundary_ratio, ALL.trimap_px)
    assert sums["union"][80] > 0 and sums["union"][40:].sum() > sums["union"][80]
    assert_metrics_match(extra(counts, 81), reference_metrics(sums), 81)


def test_precision_recall_from_confusion():
    conf = np.array([[5, 1, 0, 2], [3, 4, 0, 0], [0, 0, 0, 0]])  # last column: predicted 255
    result = precision_recall_from_confusion(conf)
    np.testing.assert_allclose(result["precision"], [5 / 8, 4 / 5, 0])
    np.testing.assert_allclose(result["recall"], [5 / 8, 4 / 7, 0])
    np.testing.assert_allclose(result["fp_share"], [3 / 6, 1 / 4, 0])
    np.testing.assert_allclose(result["fn_share"], [3 / 6, 3 / 4, 0])


def test_workers_agree_with_one_process(dataset):
    one = evaluate(dataset, num_workers=1)
    two = evaluate(dataset, num_workers=3)
    for field in ("confusions", "trimap", "boundary"):
        np.testing.assert_array_equal(getattr(two, field), getattr(one, field))


def test_band_counter_counts_large_images_in_pieces(dataset, monkeypatch):
    """Images larger than OpenCV's float32-exact limit are counted in pieces, to the same counts."""
    expected = evaluate(dataset)
    monkeypatch.setattr(boundary, "CALCHIST_MAX_PIXELS", 1000)
    pieces = evaluate(dataset)
    for field in ("confusions", "trimap", "boundary"):
        np.testing.assert_array_equal(getattr(pieces, field), getattr(expected, field))


def test_confusion_unchanged_by_the_band_metrics(dataset):
    plain = evaluation.evaluate_confusions(dataset["root"] / "png", dataset["root"] / "gt", dataset["names"],
                                           NUM_CLASSES)
    np.testing.assert_array_equal(evaluate(dataset).confusions, plain)


# --- CAMs -------------------------------------------------------------------------------------------------------------

def seam_prediction(labels: np.ndarray, scores: np.ndarray, t: float) -> np.ndarray:
    tensor = np.zeros((NUM_CLASSES, *scores.shape[1:]), np.float32)
    tensor[labels] = scores
    tensor[0] = t
    return np.argmax(tensor, axis=0).astype(np.uint8)


@pytest.mark.parametrize("t", [0.0, 0.2, 0.25])
def test_cam_at_a_threshold(dataset, t):
    preds = [seam_prediction(labels, scores, t) for labels, scores in dataset["cam"]]
    for (labels, scores), pred in zip(dataset["cam"], preds, strict=True):
        np.testing.assert_array_equal(cam_labels(labels, scores, t), pred)
    counts = evaluate(dataset, "cam", thresholds=[t])
    sums = reference_counts(preds, dataset["gt"], NUM_CLASSES, ALL.boundary_ratio, ALL.trimap_px)
    assert_metrics_match(extra(counts), reference_metrics(sums), NUM_CLASSES)
    curve = evaluation.evaluate_confusions(dataset["root"] / "cam", dataset["root"] / "gt", dataset["names"],
                                           NUM_CLASSES, "npz", [t])
    np.testing.assert_array_equal(counts.confusions, curve)  # the label maps are what the curve counts


def cli(data: dict, log: Path, *extra_args: str, sub: str = "png") -> dict:
    return evaluation.main(["--list", str(data["root"] / "list.txt"), "--predict_dir", str(data["root"] / sub),
                            "--gt_dir", str(data["root"] / "gt"), "--logfile", str(log), "--comment", "c",
                            "--num_workers", "1", *extra_args])


def test_curve_reports_the_metrics_at_its_threshold(dataset, tmp_path, capsys):
    flags = ["--type", "npz", "--metrics", "miou,biou,trimap,prf", "--boundary_ratio", "0.05", "--trimap_px", "3"]
    curve = cli(dataset, tmp_path / "log.txt", *flags, "--curve", "True", "--curve_png", str(tmp_path / "c.png"),
                sub="cam")
    t = curve["threshold"]
    assert t == evaluation.CURVE_THRESHOLDS[int(np.argmax(curve["curve"]))]
    fixed = cli(dataset, tmp_path / "log.txt", *flags, "--t", str(t), sub="cam")
    for key in ("mIoU", "biou", "trimap", "precision", "recall", "fp_share", "fn_share"):
        assert curve[key] == fixed[key], key
    preds = [seam_prediction(labels, scores, t) for labels, scores in dataset["cam"]]
    sums = reference_counts(preds, dataset["gt"], NUM_CLASSES, 0.05, 3)
    assert_metrics_match({k: curve[k] for k in ALL_KEYS}, reference_metrics(sums), NUM_CLASSES)
    # A threshold other than the best gives other numbers (the check above can tell them apart).
    other = cli(dataset, tmp_path / "log.txt", *flags, "--t", "0.0", sub="cam")
    assert other["biou"]["mean"] != curve["biou"]["mean"]
    out = capsys.readouterr().out
    assert out.count("best background score:") == 1 and out.count("       mean") == 3


# --- the command line ----------------------------------------------------------------------------------------------

def test_cli_table_log_and_result(dataset, tmp_path, capsys):
    log = tmp_path / "log.txt"
    result = cli(dataset, log, "--metrics", "prf,biou", "--boundary_ratio", "0.05")
    assert list(result)[NUM_CLASSES + 1:] == ["boundary_ratio", "biou", "precision", "recall", "fp_share", "fn_share"]
    assert "trimap" not in result and "trimap_px" not in result
    sums = reference_counts(dataset["png"], dataset["gt"], NUM_CLASSES, 0.05, 3)
    expected = reference_metrics(sums)
    assert result["biou"]["mean"] == pytest.approx(expected["biou"].mean(), abs=1e-9)
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "bIoU" in line and "prec" in line and "Boundary" not in line)
    assert header.split() == ["bIoU", "prec", "recall", "FP/err", "FN/err"]
    mean_line = out.splitlines()[-1].split()
    assert mean_line[0] == "mean" and float(mean_line[1]) == pytest.approx(result["biou"]["mean"], abs=5e-4)
    assert f"{'aeroplane':>11}{result['biou']['aeroplane']:8.3f}" in out
    entry = log.read_text().split("=====================================\n")[0].splitlines()
    assert len(entry) == 3
    released = dict(pair.split(":", 1) for pair in entry[1].split("  ") if pair)
    assert list(released) == [*VOC.all_names, "mIoU"]  # the released line, unchanged
    added = dict(pair.rsplit(":", 1) for pair in entry[2].split("  ") if pair)
    assert added["boundary_ratio"] == "0.05"
    assert float(added["biou/mean"]) == result["biou"]["mean"]
    assert float(added["recall/aeroplane"]) == result["recall"]["aeroplane"]
    assert len(added) == 1 + 5 * (NUM_CLASSES + 1)


def test_default_output_is_the_released_one(dataset, tmp_path, capsys):
    """Without --metrics: the mIoU table only, a two-line log entry, the released keys."""
    log = tmp_path / "log.txt"
    result = cli(dataset, log)
    assert list(result) == [*VOC.all_names, "mIoU"]
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("       mIoU:") and "bIoU" not in out
    assert len(out.splitlines()) == math.ceil(NUM_CLASSES / 2) + 2
    entry = log.read_text().split("=====================================\n")
    assert len(entry) == 2 and len(entry[0].splitlines()) == 2
    assert cli(dataset, tmp_path / "same.txt", "--metrics", "miou") == result


@pytest.mark.parametrize(("flags", "message"), [
    (["--metrics", "miou,bIoU"], "unknown metric 'bIoU'"),
    (["--metrics", "miou,"], "unknown metric ''"),
    (["--trimap_px", "0", "--metrics", "trimap"], "--trimap_px must be at least 1"),
    (["--boundary_ratio", "-0.1"], "--boundary_ratio must be >= 0"),
])
def test_bad_metric_flags_fail_in_one_line(dataset, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        cli(dataset, tmp_path / "log.txt", *flags)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "log.txt").exists()


def test_bad_values_are_named_with_the_band_metrics(tmp_path):
    gt = np.zeros((10, 12), np.uint8)
    bad = gt.copy()
    bad[4, 5] = 30
    names = write_pairs(tmp_path, [gt, gt], [gt, bad])
    options = evaluation.MetricOptions(("biou",), boundary_ratio=0.02)
    with pytest.raises(InputError, match="^p1: ground truth holds value 30;"):
        evaluation.evaluate_counts(tmp_path / "pred", tmp_path / "gt", names, NUM_CLASSES, options=options)
    names = write_pairs(tmp_path, [gt, bad], [gt, gt])
    with pytest.raises(InputError, match="^p1: prediction holds value 30;"):
        evaluation.evaluate_counts(tmp_path / "pred", tmp_path / "gt", names, NUM_CLASSES, options=options)


def test_metric_options_parse():
    options = evaluation.metric_options("prf, biou,prf", 0.02, 5)
    assert options.metrics == ("prf", "biou") and options.boundary_ratio == 0.02 and options.trimap_px is None
    assert options.bands and not evaluation.metric_options("miou,prf", 0.02, 5).bands
    with pytest.raises(InputError):
        evaluation.metric_options("iou", 0.02, 5)


def write_pairs(root: Path, preds: list[np.ndarray], gts: list[np.ndarray], pred_dir: str = "pred") -> list[str]:
    names = [f"p{i}" for i in range(len(preds))]
    for name, pred, gt in zip(names, preds, gts, strict=True):
        save_label_png(root / pred_dir / f"{name}.png", pred)
        save_label_png(root / "gt" / f"{name}.png", gt)
    (root / "list.txt").write_text("".join(n + "\n" for n in names))
    return names
