"""The segmentation stage: its loss, lr groups and schedule against hand-computed values, its data,
a training run with resume, and infer_seg.py's CRF, skipping and server layout."""
from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import numpy as np
import pydensecrf.densecrf as dcrf
import pytest
import torch
from PIL import Image

import infer_seg
import train_seg
from network import deeplab_v2, segmentation
from tool import provenance
from tool.crf import DEEPLAB_CRF, crf_inference
from tool.errors import InputError
from tool.fileio import load_label_png
from tool.losses import balanced_cross_entropy, resize_label, segmentation_loss
from tool.torchutils import PolyOptimizer
from voc12.classes import load_classes
from voc12.data import VOC12SegDataset, load_img_name_list

TINY = ["--seg_backbone", "resnet38", "--backbone_width", "0.125", "--train_bn", "--crop_size", "40",
        "--batch_size", "2", "--num_workers", "0", "--log_every", "1", "--lr", "0.01", "--head_bn_momentum", "0.1"]


def numpy_ce(logits: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Per-pixel -log softmax at the label, float64; ``logits`` (N, K, H, W), ``label`` (N, H, W) < K."""
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -np.take_along_axis(log_p, label[:, None], axis=1)[:, 0]


def test_resize_label_is_pils_nearest():
    label = np.random.default_rng(0).integers(0, 6, (2, 41, 37)).astype(np.uint8)
    for size in ((21, 19), (31, 28), (41, 37), (9, 33), (30, 12), (13, 7)):
        ours = resize_label(torch.from_numpy(label), size).numpy()
        pil = np.stack([np.asarray(Image.fromarray(m).resize(size[::-1], resample=Image.NEAREST)) for m in label])
        np.testing.assert_array_equal(ours, pil)
    for n_in, n_out in ((12, 9), (321, 41), (161, 21), (241, 31), (100, 75)):  # ties
        square = np.random.default_rng(n_in).integers(0, 250, (1, n_in, n_in)).astype(np.uint8)
        pil = np.asarray(Image.fromarray(square[0]).resize((n_out, n_out), resample=Image.NEAREST))
        np.testing.assert_array_equal(resize_label(torch.from_numpy(square), (n_out, n_out)).numpy()[0], pil)


def test_segmentation_loss_sums_the_outputs_cross_entropy():
    rng = np.random.default_rng(1)
    label = rng.integers(0, 4, (2, 12, 12))
    label[0, :3] = 255
    outputs = [rng.normal(size=(2, 4, s, s)) for s in (12, 6, 9, 12)]
    got = segmentation_loss([torch.from_numpy(o) for o in outputs], torch.from_numpy(label)).item()
    expected = 0.0
    for o in outputs:
        s = o.shape[-1]
        small = np.stack([np.asarray(Image.fromarray(m.astype(np.uint8)).resize((s, s), Image.NEAREST))
                          for m in label]).astype(np.int64)
        valid = small != 255
        expected += numpy_ce(o, np.where(valid, small, 0))[valid].mean()
    assert got == pytest.approx(expected, rel=1e-6)


def test_balanced_cross_entropy_by_hand():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(1, 3, 5, 5))
    label = np.zeros((1, 5, 5), np.int64)
    label[0, 1:3, 1:4] = 2
    label[0, 4] = 255
    label[0, 0, 0] = 1
    ce = numpy_ce(logits, np.where(label == 255, 0, label))
    bg, fg = label == 0, (label > 0) & (label < 255)
    expected = (ce[bg].mean() + ce[fg].mean()) / 2
    got = balanced_cross_entropy(torch.from_numpy(logits), torch.from_numpy(label)).item()
    assert got == pytest.approx(expected, rel=1e-6)
    # No foreground: the background term alone, halved.
    only_bg = np.where(label == 255, 255, 0)
    got = balanced_cross_entropy(torch.from_numpy(logits), torch.from_numpy(only_bg)).item()
    ce_bg = numpy_ce(logits, np.zeros_like(label))
    assert got == pytest.approx(ce_bg[only_bg == 0].mean() / 2, rel=1e-6)


def test_lr_groups_and_poly_every_10_iterations():
    args = train_seg.get_arg_parser().parse_args(["--label_dir", "x", "--max_iters", "100"])
    net = deeplab_v2.Net(3).train()
    optimizer = train_seg.make_optimizer(net, args)
    assert [(g["lr"], g["weight_decay"], g["momentum"]) for g in optimizer.param_groups] == [
        (2.5e-4, 5e-4, 0.9), (2.5e-3, 5e-4, 0.9), (5e-3, 0.0, 0.9)]
    assert args.batch_size == 5 and args.iter_size == 2 and args.crop_size == 321

    opt = PolyOptimizer([{"params": [torch.zeros(1, requires_grad=True)], "lr": 0.1}], lr=0.1, weight_decay=0,
                        max_step=100, momentum=0.9, step_size=10)
    seen = []
    for _ in range(25):
        opt.step()
        seen.append(opt.param_groups[0]["lr"])
    # deeplab-pytorch: iterations 1..10 at the base rate, then base * (1 - 10/100)^0.9 for 11..20, ...
    expected = [0.1] * 10 + [0.1 * 0.9 ** 0.9] * 10 + [0.1 * 0.8 ** 0.9] * 5
    np.testing.assert_allclose(seen, expected, rtol=1e-12)


def test_seg_dataset_pads_with_the_mean_and_ignore(tiny_voc):
    classes = load_classes(tiny_voc / "classes.txt")
    normalize = segmentation.input_normalizer("resnet101", None)
    ds = VOC12SegDataset(tiny_voc / "ImageSets/Segmentation/train.txt", tiny_voc, tiny_voc / "SegmentationClass",
                         classes.num_classes, normalize, crop_size=80, scales=(1.0,), seed=0)
    item = ds[0]
    assert item["img"].shape == (3, 80, 80) and item["label"].shape == (80, 80)
    img, label = item["img"].numpy(), item["label"].numpy()
    orig = ds.read(0)
    h, w = orig.shape[:2]
    assert h < 80 and w < 80
    gt = load_label_png(tiny_voc / "SegmentationClass" / f"{ds.names[0]}.png")
    flipped = not np.array_equal(label[:h, :w], gt)
    if flipped:  # the padding sits bottom-right before the flip
        img, label = img[..., ::-1], label[:, ::-1]
    assert (label[h:] == 255).all() and (label[:, w:] == 255).all()  # padding: label 255, image the mean
    assert (img[:, h:] == 0).all() and (img[:, :, w:] == 0).all()
    np.testing.assert_allclose(img[:, :h, :w].transpose(1, 2, 0), deeplab_v2.caffe_input(orig), atol=1e-4)
    np.testing.assert_array_equal(label[:h, :w], gt)


def train_args(root: Path, tmp: Path, session: str, *extra: str) -> list[str]:
    return ["--voc12_root", str(root), "--dataset_classes", str(root / "classes.txt"),
            "--train_list", str(root / "ImageSets/Segmentation/train.txt"),
            "--label_dir", str(root / "SegmentationClass"), "--session_name", str(tmp / session),
            "--tblog_dir", str(tmp / "tb"), *TINY, *extra]


def test_train_resume_and_infer(tiny_voc, tmp_path, capsys):
    # lr_step beyond max_iters: a constant rate, so a 2-iteration run resumed to 4 must equal a 4-iteration run.
    constant = ["--lr_step", "1000", "--save_every", "2"]
    straight = train_seg.run(train_seg.get_arg_parser().parse_args(
        train_args(tiny_voc, tmp_path, "straight", "--max_iters", "4", *constant)))
    first = train_seg.run(train_seg.get_arg_parser().parse_args(
        train_args(tiny_voc, tmp_path, "resumed", "--max_iters", "2", *constant)))
    assert first.is_file() and (tmp_path / "resumed.ckpt").is_file()
    after_two = torch.load(first)
    resumed = train_seg.run(train_seg.get_arg_parser().parse_args(
        train_args(tiny_voc, tmp_path, "resumed", "--max_iters", "4", "--resume", *constant)))
    a, b = torch.load(straight), torch.load(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["cls_conv.weight"], after_two["cls_conv.weight"])

    # Inference: raw argmax and CRF PNGs against an independent recomputation.
    out = tmp_path / "sub"
    raw = tmp_path / "raw"
    val = tiny_voc / "ImageSets/Segmentation/val.txt"
    common = ["--voc12_root", str(tiny_voc), "--dataset_classes", str(tiny_voc / "classes.txt"),
              "--infer_list", str(val), "--seg_backbone", "resnet38", "--backbone_width", "0.125",
              "--weights", str(straight), "--num_workers", "0", "--crf_workers", "1"]
    tar_path = infer_seg.run(infer_seg.get_arg_parser().parse_args(
        [*common, "--out_dir", str(out), "--out_raw_dir", str(raw), "--server_layout"]))
    names = load_img_name_list(val)
    with tarfile.open(tar_path) as tar:
        assert sorted(tar.getnames()) == sorted(f"results/VOC2012/Segmentation/comp6_test_cls/{n}.png" for n in names)
    net = segmentation.make_net("resnet38", load_classes(tiny_voc / "classes.txt").num_classes, width=0.125)
    net.load_state_dict(a)
    net.eval()
    name = names[0]
    img = np.array(Image.open(tiny_voc / "JPEGImages" / f"{name}.jpg").convert("RGB"))
    x = torch.from_numpy(segmentation.input_normalizer("resnet38", None)(img).transpose(2, 0, 1).copy())
    with torch.no_grad():
        probs = torch.softmax(net(x[None])[0], dim=0).numpy()
    np.testing.assert_array_equal(load_label_png(raw / f"{name}.png"), probs.argmax(0))
    crf = dcrf.DenseCRF2D(img.shape[1], img.shape[0], probs.shape[0])
    crf.setUnaryEnergy(np.ascontiguousarray(-np.log(np.clip(probs, 1e-5, None)).reshape(probs.shape[0], -1)))
    crf.addPairwiseGaussian(sxy=1, compat=3)
    crf.addPairwiseBilateral(sxy=67, srgb=3, rgbim=np.ascontiguousarray(img), compat=4)
    expected = np.array(crf.inference(10)).reshape(probs.shape).argmax(0)
    crf_png = load_label_png(out / "results/VOC2012/Segmentation/comp6_test_cls" / f"{name}.png")
    assert (crf_png == expected).mean() > 0.999  # the same CRF; probs from another batch may differ by ulps

    # Finished outputs are skipped.
    stamp = (raw / f"{name}.png").stat().st_mtime_ns
    infer_seg.run(infer_seg.get_arg_parser().parse_args([*common, "--out_dir", str(out), "--out_raw_dir", str(raw),
                                                         "--server_layout"]))
    assert (raw / f"{name}.png").stat().st_mtime_ns == stamp

    # Outputs of other weights are refused in one line that names --overwrite, and left as they are.
    two = tmp_path / "two.pth"
    torch.save(after_two, two)
    other = [a if a != str(straight) else str(two) for a in common]
    refused = other + ["--out_dir", str(out), "--out_raw_dir", str(raw), "--server_layout"]
    with pytest.raises(SystemExit) as exit_info:
        infer_seg.main(refused)
    message = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(message.splitlines()) == 1
    assert "other weights_sha256" in message and "--overwrite" in message
    assert (raw / f"{name}.png").stat().st_mtime_ns == stamp
    # --overwrite redoes every output with the new weights; the record names them.
    infer_seg.run(infer_seg.get_arg_parser().parse_args([*refused, "--overwrite", "--crf", "False"]))
    assert all((raw / f"{n}.png").stat().st_mtime_ns > stamp for n in names)
    net.load_state_dict(after_two)
    with torch.no_grad():
        probs = torch.softmax(net(x[None])[0], dim=0).numpy()
    np.testing.assert_array_equal(load_label_png(raw / f"{name}.png"), probs.argmax(0))
    record = provenance.read_record(raw)
    assert record["weights_sha256"] == hashlib.sha256(two.read_bytes()).hexdigest()
    assert record["output"] == "raw" and provenance.read_record(out / infer_seg.SERVER_DIR)["crf"] is False
    # --crf changes only the labels: --overwrite stale redoes their folder and keeps the raw one's record.
    raw_record = (raw / provenance.RECORD_NAME).read_bytes()
    infer_seg.run(infer_seg.get_arg_parser().parse_args([*refused, "--overwrite", "stale"]))
    assert (raw / provenance.RECORD_NAME).read_bytes() == raw_record
    assert provenance.read_record(out / infer_seg.SERVER_DIR)["crf_image"] == "rgb"
    np.testing.assert_array_equal(load_label_png(raw / f"{name}.png"), probs.argmax(0))


def test_crf_image_is_deeplab_pytorchs_wrapped_input_by_default():
    rng = np.random.default_rng(7)
    img = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    img[0, 0] = (122, 116, 104)  # 0.675, 0.669 and 0.008 below the mean: truncated to 0
    # deeplab-pytorch: cv2's BGR image as float32, minus the mean, .astype(np.uint8) (wraps below 0).
    bgr = img[..., ::-1].astype(np.float64) - np.array([104.008, 116.669, 122.675])
    expected = np.mod(np.fix(bgr), 256).astype(np.uint8)
    parse = infer_seg.get_arg_parser().parse_args
    base = ["--weights", "w.pth", "--out_dir", "o"]
    assert infer_seg.crf_image_kind(parse(base)) == "released"
    assert infer_seg.crf_image_kind(parse([*base, "--crf_on_rgb"])) == "rgb"
    assert infer_seg.crf_image_kind(parse([*base, "--seg_backbone", "resnet38"])) == "rgb"
    released = infer_seg.crf_image(img, "released")
    np.testing.assert_array_equal(released, expected)
    assert (released[0, 0] == 0).all() and (released > 150).any()  # dark pixels wrap to bright
    np.testing.assert_array_equal(infer_seg.crf_image(img, "rgb"), img)
    # The CRF sees that image: its labels equal pydensecrf's on it.
    probs = rng.dirichlet(np.ones(3), size=img.shape[:2]).transpose(2, 0, 1).astype(np.float32)
    crf = dcrf.DenseCRF2D(img.shape[1], img.shape[0], 3)
    crf.setUnaryEnergy(np.ascontiguousarray(-np.log(np.clip(probs, 1e-5, None)).reshape(3, -1)))
    crf.addPairwiseGaussian(sxy=1, compat=3)
    crf.addPairwiseBilateral(sxy=67, srgb=3, rgbim=expected, compat=4)
    np.testing.assert_array_equal(infer_seg.crf_label(released, probs),
                                  np.array(crf.inference(10)).reshape(probs.shape).argmax(0))


def test_wrapped_crf_image_splits_colours_either_side_of_the_mean():
    # Two regions 2 grey levels apart, on either side of the caffe mean: alike for the real image,
    # 255 and 0 after the wrap. The confident left region pulls the unsure right one only on --crf_on_rgb.
    img = np.zeros((8, 16, 3), np.uint8)
    img[:, :12], img[:, 12:] = (121, 115, 103), (123, 117, 105)
    probs = np.zeros((2, 8, 16), np.float32)
    probs[0, :, :12], probs[0, :, 12:] = 0.9, 0.45
    probs[1] = 1 - probs[0]
    released = infer_seg.crf_image(img, "released")
    assert (released[:, :12] == 255).all() and (released[:, 12:] == 0).all()
    np.testing.assert_array_equal(infer_seg.crf_label(released, probs), probs.argmax(0))
    assert (infer_seg.crf_label(infer_seg.crf_image(img, "rgb"), probs) == 0).all()


def test_deeplab_crf_parameters():
    rng = np.random.default_rng(4)
    img = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
    probs = rng.dirichlet(np.ones(3), size=(20, 24)).transpose(2, 0, 1).astype(np.float32)
    crf = dcrf.DenseCRF2D(24, 20, 3)
    crf.setUnaryEnergy(np.ascontiguousarray(-np.log(np.clip(probs, 1e-5, None)).reshape(3, -1)))
    crf.addPairwiseGaussian(sxy=1, compat=3)
    crf.addPairwiseBilateral(sxy=67, srgb=3, rgbim=img, compat=4)
    expected = np.array(crf.inference(10)).reshape(3, 20, 24)
    np.testing.assert_allclose(crf_inference(img, probs, t=10, **DEEPLAB_CRF), expected, rtol=1e-5, atol=1e-6)


def test_mxnet_resnet38_weights_name_the_backbone_that_takes_them(tiny_voc, fixtures_dir, tmp_path, capsys):
    """train_seg.py's default DeepLab-v2 ResNet-101 given the ImageNet ResNet-38 .params: the one line
    says whose they are and which --seg_backbone starts from them; infer_seg.py says they are untrained."""
    params = fixtures_dir / "mxnet_resnet38_subset.params"
    with pytest.raises(SystemExit) as exit_info:
        train_seg.main(["--voc12_root", str(tiny_voc), "--dataset_classes", str(tiny_voc / "classes.txt"),
                        "--train_list", str(tiny_voc / "train.txt"), "--label_dir", str(tiny_voc / "SegmentationClass"),
                        "--session_name", str(tmp_path / "seg"), "--weights", str(params)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {params} holds ResNet-38's ImageNet weights (MXNet .params), which DeepLab-v2 ResNet-101 cannot "
        "start from: pass --seg_backbone resnet38 to train DeepLab-v1 on ResNet-38 from them")
    with pytest.raises(InputError, match=r"MXNet \.params\), not a trained segmentation network: pass the "
                                         r"SESSION_NAME\.pth of train_seg\.py"):
        segmentation.load_weights(segmentation.make_net("resnet101", 21), params, strict=True)
