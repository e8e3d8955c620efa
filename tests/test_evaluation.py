"""evaluation.py and tool/iou.py against independent confusion matrices (torchmetrics) and the
released per-class counting, on generated files."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.classification import MulticlassConfusionMatrix

import evaluation
from tool import iou
from tool.errors import InputError
from tool.fileio import save_label_png, save_scores
from tool.iou import cam_curve_confusions, confusion_matrix, iou_from_confusion
from voc12.classes import VOC

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = VOC.num_classes
THRESHOLDS = (0.0, 0.05, 0.2, 0.37, 0.59)


def reference_confusion(preds: list[np.ndarray], gts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """torchmetrics' confusion with an extra class for predictions of 255, first C rows:
    the ``(C, C + 1)`` layout of tool.iou."""
    metric = MulticlassConfusionMatrix(num_classes + 1, ignore_index=255, validate_args=False)
    for pred, gt in zip(preds, gts, strict=True):
        pred = np.where(pred == 255, num_classes, pred).astype(np.int64)
        metric.update(torch.from_numpy(pred).reshape(-1), torch.from_numpy(gt.astype(np.int64)).reshape(-1))
    return metric.compute().numpy()[:num_classes].astype(np.int64)


def released_miou(preds: list[np.ndarray], gts: list[np.ndarray], num_classes: int) -> float:
    """The released per-class counting of TP, P, T (SEAM evaluation.py), in percent."""
    tp, p, t = np.zeros(num_classes), np.zeros(num_classes), np.zeros(num_classes)
    for pred, gt in zip(preds, gts, strict=True):
        cal = gt < 255
        mask = (pred == gt) * cal
        for i in range(num_classes):
            p[i] += np.sum((pred == i) * cal)
            t[i] += np.sum((gt == i) * cal)
            tp[i] += np.sum((gt == i) * mask)
    return float(np.mean(tp / (t + p - tp + 1e-10)) * 100)


def seam_cam_prediction(labels: np.ndarray, scores: np.ndarray, t: float, num_classes: int) -> np.ndarray:
    """SEAM: a dense float32 tensor, background channel = t, argmax (first index on ties)."""
    tensor = np.zeros((num_classes, *scores.shape[1:]), np.float32)
    tensor[labels] = scores
    tensor[0] = t
    return np.argmax(tensor, axis=0).astype(np.uint8)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    """Six images of different sizes: ground truth with 255, PNG predictions (some 255), CAM
    files on a 0.01 grid (exact ties with the thresholds), CRF files, released CAM dicts."""
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("eval")
    for sub in ("gt", "png", "cam", "crf", "npy"):
        (root / sub).mkdir()
    data = {"root": root, "names": [], "gt": [], "png": [], "cam": [], "crf_pred": []}
    for i in range(6):
        name = f"img_{i}"
        h, w = rng.integers(30, 60, size=2)
        gt = rng.integers(0, NUM_CLASSES, size=(h, w)).astype(np.uint8)
        gt[rng.random((h, w)) < 0.1] = 255
        noise = rng.integers(0, NUM_CLASSES, size=(h, w))
        pred = np.where(rng.random((h, w)) < 0.5, gt, noise).astype(np.uint8)
        pred[rng.random((h, w)) < 0.05] = 255
        save_label_png(root / "gt" / f"{name}.png", gt)
        save_label_png(root / "png" / f"{name}.png", pred)

        labels = np.sort(rng.choice(np.arange(1, NUM_CLASSES), size=3, replace=False))
        scores = (rng.integers(0, 70, size=(3, h, w)) / 100).astype(np.float32)
        scores[1, :4] = scores[0, :4]  # class ties
        save_scores(root / "cam" / f"{name}.npz", labels, scores)
        np.save(root / "npy" / f"{name}.npy", {int(k) - 1: s for k, s in zip(labels, scores, strict=True)})

        crf_labels = np.concatenate([[0], labels])
        crf_scores = rng.random((4, h, w)).astype(np.float32)
        save_scores(root / "crf" / f"{name}.npz", crf_labels, crf_scores)

        data["names"].append(name)
        data["gt"].append(gt)
        data["png"].append(pred)
        data["cam"].append((labels, scores))
        data["crf_pred"].append(crf_labels[crf_scores.argmax(axis=0)].astype(np.uint8))
    (root / "list.txt").write_text("".join(f"/JPEGImages/{n}.jpg /SegmentationClassAug/{n}.png\n"
                                           for n in data["names"]))
    return data


def test_confusion_matrix_matches_torchmetrics(dataset):
    pairs = zip(dataset["png"], dataset["gt"], strict=True)
    ours = sum(confusion_matrix(pred, gt, NUM_CLASSES) for pred, gt in pairs)
    assert ours.shape == (NUM_CLASSES, NUM_CLASSES + 1)
    np.testing.assert_array_equal(ours, reference_confusion(dataset["png"], dataset["gt"], NUM_CLASSES))


def test_joint_histogram_paths_agree(dataset, monkeypatch):
    """OpenCV's float32 histogram and the np.bincount fallback for huge maps count alike."""
    pred, gt = dataset["png"][0], dataset["gt"][0]
    fast = iou.joint_histogram(pred, gt)
    monkeypatch.setattr(iou, "CALCHIST_MAX_PIXELS", 0)
    np.testing.assert_array_equal(iou.joint_histogram(pred, gt), fast)
    expected = np.zeros((256, 256), np.int64)
    np.add.at(expected, (gt.reshape(-1), pred.reshape(-1)), 1)
    np.testing.assert_array_equal(fast, expected)
    with pytest.raises(TypeError):
        iou.joint_histogram(pred.astype(np.int64), gt)


def test_iou_square_and_absent_classes():
    conf = np.array([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
    expected = [5 / (6 + 7 - 5), 3 / (5 + 4 - 3), 0.0]
    np.testing.assert_allclose(iou_from_confusion(conf), expected, rtol=1e-9)
    with_unlabelled = np.array([[5, 1, 0, 4], [2, 3, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_allclose(iou_from_confusion(with_unlabelled), [5 / (10 + 7 - 5), 3 / 6, 0.0], rtol=1e-9)
    with pytest.raises(ValueError):
        iou_from_confusion(np.zeros((3, 5)))


@pytest.mark.parametrize("num_workers", [1, 2])
def test_png_evaluation(dataset, num_workers):
    root = dataset["root"]
    conf = evaluation.evaluate_confusions(root / "png", root / "gt", dataset["names"], NUM_CLASSES, "png",
                                          num_workers=num_workers)
    np.testing.assert_array_equal(conf[0], reference_confusion(dataset["png"], dataset["gt"], NUM_CLASSES))
    result = evaluation.do_python_eval(root / "png", root / "gt", dataset["names"], num_workers=num_workers)
    assert list(result) == [*VOC.all_names, "mIoU"]
    assert all(isinstance(v, float) for v in result.values())
    expected = released_miou(dataset["png"], dataset["gt"], NUM_CLASSES)
    assert result["mIoU"] == pytest.approx(expected, abs=1e-9)
    assert result["mIoU"] == pytest.approx(np.mean([result[n] for n in VOC.all_names]), abs=1e-9)


@pytest.mark.parametrize("t", THRESHOLDS)
def test_npz_cam_at_threshold(dataset, t):
    root = dataset["root"]
    preds = [seam_cam_prediction(labels, scores, t, NUM_CLASSES) for labels, scores in dataset["cam"]]
    names = dataset["names"]
    result = evaluation.do_python_eval(root / "cam", root / "gt", names, input_type="npz", threshold=t)
    assert result["mIoU"] == pytest.approx(released_miou(preds, dataset["gt"], NUM_CLASSES), abs=1e-9)
    conf = evaluation.evaluate_confusions(root / "cam", root / "gt", names, NUM_CLASSES, "npz", [t])
    np.testing.assert_array_equal(conf[0], reference_confusion(preds, dataset["gt"], NUM_CLASSES))


def test_one_pass_curve_equals_per_threshold(dataset):
    thresholds = np.asarray(evaluation.CURVE_THRESHOLDS)
    for (labels, scores), gt in zip(dataset["cam"], dataset["gt"], strict=True):
        curve = cam_curve_confusions(labels, scores, gt, thresholds, NUM_CLASSES)
        assert curve.shape == (len(thresholds), NUM_CLASSES, NUM_CLASSES + 1)
        for k, t in enumerate(thresholds):
            pred = seam_cam_prediction(labels, scores, t, NUM_CLASSES)
            np.testing.assert_array_equal(curve[k], confusion_matrix(pred, gt, NUM_CLASSES))
    root = dataset["root"]
    total = evaluation.evaluate_confusions(root / "cam", root / "gt", dataset["names"], NUM_CLASSES, "npz",
                                           thresholds, num_workers=2)
    for k in (0, 17, 59):
        preds = [seam_cam_prediction(labels, scores, thresholds[k], NUM_CLASSES)
                 for labels, scores in dataset["cam"]]
        np.testing.assert_array_equal(total[k], reference_confusion(preds, dataset["gt"], NUM_CLASSES))


def test_cam_ties_and_empty_cams():
    """Unsorted labels with equal scores: the lowest label wins, as in a dense argmax; a CAM with
    no class is background everywhere; a score equal to t is background."""
    gt = np.array([[3, 7, 0, 255]], np.uint8)
    scores = np.array([[[0.5, 0.5, 0.2, 0.9]], [[0.5, 0.1, 0.2, 0.1]]], np.float32)
    curve = cam_curve_confusions(np.array([7, 3]), scores, gt, [0.2, 0.5], NUM_CLASSES)
    for k, t in enumerate((0.2, 0.5)):
        pred = seam_cam_prediction(np.array([7, 3]), scores, t, NUM_CLASSES)
        np.testing.assert_array_equal(curve[k], confusion_matrix(pred, gt, NUM_CLASSES))
    assert curve[0][3, 3] == 1 and curve[0][7, 7] == 1 and curve[0][0, 0] == 1  # 0.2 == t: background
    assert curve[1][3, 0] == 1 and curve[1][7, 0] == 1
    no_class = np.zeros((0, 1, 4), np.float32)
    empty = cam_curve_confusions(np.zeros(0, np.int64), no_class, gt, [0.0], NUM_CLASSES)
    assert empty[0, :, 0].sum() == 3 and empty.sum() == 3


def test_npz_crf_is_plain_argmax(dataset):
    root = dataset["root"]
    for t in (0.0, 0.9):  # the threshold does not touch files holding the background
        result = evaluation.do_python_eval(root / "crf", root / "gt", dataset["names"], input_type="npz",
                                           threshold=t)
        assert result["mIoU"] == pytest.approx(released_miou(dataset["crf_pred"], dataset["gt"], NUM_CLASSES),
                                               abs=1e-9)


def test_released_npy_needs_allow_pickle(dataset):
    root, names = dataset["root"], dataset["names"]
    with pytest.raises(InputError, match="allow_pickle"):
        evaluation.do_python_eval(root / "npy", root / "gt", names, input_type="npy", threshold=0.2)
    ours = evaluation.do_python_eval(root / "npy", root / "gt", names, input_type="npy", threshold=0.2,
                                     allow_pickle=True)
    npz = evaluation.do_python_eval(root / "cam", root / "gt", names, input_type="npz", threshold=0.2)
    assert ours == npz


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "evaluation.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_png_table_and_log(dataset, tmp_path):
    root = dataset["root"]
    log = tmp_path / "log.txt"
    args = ["--list", root / "list.txt", "--predict_dir", root / "png", "--gt_dir", root / "gt",
            "--logfile", log]
    first = run_cli(*args, "--comment", "first run", "--num_workers", "2")
    assert first.returncode == 0, first.stderr
    miou = released_miou(dataset["png"], dataset["gt"], NUM_CLASSES)
    assert f"{'mIoU':>11}:{miou:7.3f}%" in first.stdout
    assert "  aeroplane:" in first.stdout and "  tvmonitor:" in first.stdout
    second = run_cli(*args, "--comment", "second run", "--curve", "False")
    assert second.returncode == 0, second.stderr
    entries = log.read_text().split("=====================================\n")
    assert len(entries) == 3 and entries[2] == ""
    assert entries[0].splitlines()[0].endswith("\tfirst run")
    assert entries[1].splitlines()[0].endswith("\tsecond run")
    logged = dict(pair.split(":", 1) for pair in entries[1].splitlines()[1].split())
    assert list(logged) == [*VOC.all_names, "mIoU"]
    assert float(logged["mIoU"]) == pytest.approx(miou, abs=1e-9)


def test_cli_curve_plot(dataset, tmp_path):
    root = dataset["root"]
    log = tmp_path / "sub" / "log.txt"
    result = run_cli("--list", root / "list.txt", "--predict_dir", root / "cam", "--gt_dir", root / "gt",
                     "--logfile", log, "--type", "npz", "--curve", "True", "--comment", "cam curve")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "/60 background score:" in line]
    assert len(lines) == 60 and lines[0].startswith("0/60 background score: 0.000")
    reference = [released_miou([seam_cam_prediction(labels, scores, i / 100, NUM_CLASSES)
                                for labels, scores in dataset["cam"]], dataset["gt"], NUM_CLASSES)
                 for i in range(60)]
    assert [line.split("mIoU: ")[1] for line in lines] == [f"{m:.3f}%" for m in reference]
    best = int(np.argmax(reference))
    assert f"best background score: {best / 100:.2f}" in result.stdout
    with Image.open(tmp_path / "sub" / "log_curve.png") as img:
        assert img.format == "PNG" and img.size == (640, 480)
    assert "best_t:" in log.read_text()


def test_cli_dataset_classes(tmp_path):
    rng = np.random.default_rng(3)
    classes = tmp_path / "classes.txt"
    classes.write_text("background\ncat\ndog\nfish\n")
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    gt = rng.integers(0, 4, size=(20, 30)).astype(np.uint8)
    pred = rng.integers(0, 4, size=(20, 30)).astype(np.uint8)
    save_label_png(tmp_path / "gt" / "a.png", gt)
    save_label_png(tmp_path / "pred" / "a.png", pred)
    (tmp_path / "list.txt").write_text("a\n")
    result = run_cli("--list", tmp_path / "list.txt", "--predict_dir", tmp_path / "pred",
                     "--gt_dir", tmp_path / "gt", "--logfile", tmp_path / "log.txt", "--comment", "x",
                     "--dataset_classes", classes)
    assert result.returncode == 0, result.stderr
    assert "       fish:" in result.stdout and "aeroplane" not in result.stdout
    assert f"{released_miou([pred], [gt], 4):7.3f}%" in result.stdout


def write_pair(folder: Path, gt: np.ndarray, pred: np.ndarray) -> Path:
    for sub in ("gt", "pred"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    save_label_png(folder / "gt" / "a.png", gt)
    save_label_png(folder / "pred" / "a.png", pred)
    (folder / "list.txt").write_text("a\n")
    return folder


def bad_input_cases(tmp_path: Path) -> dict[str, tuple[list, str]]:
    good = np.zeros((10, 12), np.uint8)
    ok = write_pair(tmp_path / "ok", good, good)
    size = write_pair(tmp_path / "size", good, np.zeros((10, 13), np.uint8))
    bad_gt = write_pair(tmp_path / "bad_gt", np.full((10, 12), 30, np.uint8), good)
    bad_pred = write_pair(tmp_path / "bad_pred", good, np.full((10, 12), NUM_CLASSES, np.uint8))
    missing = write_pair(tmp_path / "missing", good, good)
    (missing / "list.txt").write_text("a\nb\n")
    save_label_png(missing / "gt" / "b.png", good)
    no_gt = write_pair(tmp_path / "no_gt", good, good)
    (no_gt / "gt" / "a.png").unlink()
    (tmp_path / "npy").mkdir()
    np.save(tmp_path / "npy" / "a.npy", {0: np.zeros((10, 12), np.float32)})
    cam = tmp_path / "cam"
    save_scores(cam / "a.npz", np.array([3]), np.zeros((1, 10, 12), np.float32))

    def args(folder, pred=None, **extra):
        out = ["--list", folder / "list.txt", "--predict_dir", pred or folder / "pred",
               "--gt_dir", folder / "gt"]
        for key, value in extra.items():
            out += [f"--{key}", value]
        return out

    return {
        "missing list": (["--list", tmp_path / "nope.txt", "--predict_dir", ok / "pred",
                          "--gt_dir", ok / "gt"], "image list not found"),
        "missing folder": (args(ok, pred=tmp_path / "nope"), "prediction folder not found"),
        "missing gt folder": (["--list", ok / "list.txt", "--predict_dir", ok / "pred", "--gt_dir",
                               tmp_path / "nope"], "ground-truth folder not found"),
        "missing file": (args(missing), "prediction file not found"),
        "missing ground truth": (args(no_gt), "ground truth not found"),
        "size": (args(size), "does not match ground truth"),
        "bad gt value": (args(bad_gt), "ground truth holds value 30"),
        "bad prediction value": (args(bad_pred), f"prediction holds value {NUM_CLASSES}"),
        "pickle refused": (args(ok, pred=tmp_path / "npy", type="npy", t="0.2"), "allow_pickle"),
        "cam without t": (args(ok, pred=cam, type="npz"), "pass --t or --curve"),
        "bad class file": (args(ok, dataset_classes=tmp_path / "nope.txt"), "class list file not found"),
    }


def test_bad_inputs_fail_in_one_line(tmp_path, capsys):
    """Every user mistake: exit 2 and one ``error:`` line, no traceback, nothing logged."""
    for case, (args, message) in bad_input_cases(tmp_path).items():
        with pytest.raises(SystemExit) as exit_info:
            evaluation.main([*map(str, args), "--logfile", str(tmp_path / "log.txt"), "--comment", "bad",
                             "--num_workers", "1"])
        assert exit_info.value.code == 2, case
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (case, lines)
    assert not (tmp_path / "log.txt").exists()


def test_cli_bad_input_as_a_process(tmp_path):
    args, message = bad_input_cases(tmp_path)["bad gt value"]
    result = run_cli(*args, "--logfile", tmp_path / "log.txt", "--comment", "bad")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and message in result.stderr


def test_curve_flag_parses_booleans():
    parser = evaluation.get_arg_parser()
    for text, value in (("True", True), ("False", False), ("1", True), ("0", False)):
        assert parser.parse_args(["--comment", "c", "--curve", text]).curve is value
    assert parser.parse_args(["--comment", "c"]).curve is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--comment", "c", "--curve", "maybe"])


def test_joint_counter_is_exact_across_flushes(monkeypatch):
    rng = np.random.default_rng(4)
    maps = [(rng.integers(0, 6, (30, 40)).astype(np.uint8), rng.integers(0, 6, (30, 40)).astype(np.uint8))
            for _ in range(7)]
    monkeypatch.setattr(iou, "CALCHIST_MAX_PIXELS", 2500)  # a flush every other image, large maps via bincount
    counter = iou.JointCounter()
    for pred, gt in maps:
        counter.add(pred, gt)
    counter.add(np.full((60, 50), 255, np.uint8), np.zeros((60, 50), np.uint8))  # 3000 px: the bincount path
    expected = sum(np.bincount(gt.astype(np.int64).ravel() * 256 + pred.ravel(), minlength=256 * 256)
                   for pred, gt in maps).reshape(256, 256)
    expected[0, 255] += 3000
    np.testing.assert_array_equal(counter.flush(), expected)
