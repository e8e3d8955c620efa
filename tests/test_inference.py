"""Inference arithmetic against independent re-computations: the multi-scale CAM of infer_SB.py
and the CAM-with-background of infer_aff.py; the memory bounds for large photos (capped views, PCM
in column blocks, only the present classes upsampled) and that VOC-sized images keep their numbers."""
from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import infer_aff
import infer_SB
from network import resnet38_sb
from tool.fileio import load_label_png, load_scores, save_scores
from voc12.classes import VOC
from voc12.data import VOC12ClsDatasetMSF

ROOT = Path(__file__).resolve().parents[1]
PHOTO = (3000, 4000)  # a phone photo, height x width


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
    reference = released_norm(total)
    np.testing.assert_allclose(ours, reference[[0, 2]], rtol=1e-4, atol=1e-5)
    assert ours.dtype == np.float32 and ours.shape == (2, *size)  # the present classes only
    assert (reference[1] < 0).all()  # an absent class would score below any background score


def test_cam_with_background(tmp_path):
    rng = np.random.default_rng(1)
    cams = rng.random((2, 5, 6)).astype(np.float32)
    save_scores(tmp_path / "a.npz", np.array([2, 4]), cams)
    full = infer_aff.cam_with_background(tmp_path / "a.npz", (5, 6), num_classes=6, alpha=4.0, allow_pickle=False)
    assert full.shape == (6, 5, 6)
    np.testing.assert_array_equal(full[[2, 4]], cams)
    assert not full[[1, 3, 5]].any()
    np.testing.assert_allclose(full[0], (1 - cams.max(0)) ** 4, rtol=1e-6)


def all_class_cam(model: torch.nn.Module, views: list[torch.Tensor], label: torch.Tensor,
                  size: tuple[int, int]) -> np.ndarray:
    """multiscale_cam as it was before issue 21: every class upsampled and normalised."""
    total = torch.zeros((label.numel(), *size))
    with torch.no_grad():
        for i in range(0, len(views), 2):
            cam_rv = model(torch.stack([views[i], views[i + 1]]), with_edge=False).cam_rv
            cam = F.interpolate(cam_rv[:, 1:], size, mode="bilinear", align_corners=False)
            total += cam[0] + cam[1].flip(-1)
    total = (total * label.view(-1, 1, 1)).numpy()
    total[total < 0] = 0
    cam_max = total.max(axis=(1, 2), keepdims=True)
    cam_min = total.min(axis=(1, 2), keepdims=True)
    total[total < cam_min + 1e-5] = 0
    return ((total - cam_min - 1e-5) / (cam_max - cam_min + 1e-5)).astype(np.float32)


def test_voc_sized_cams_are_bit_for_bit_the_all_class_computation(monkeypatch):
    """A VOC-sized image keeps its numbers to the bit; past UPSAMPLE_ELEMENTS only the present
    classes are upsampled, equal to float rounding (torch's CPU kernel rounds a channel
    differently with another channel count)."""
    torch.manual_seed(1)
    model = resnet38_sb.Net(num_classes=VOC.num_classes, width=0.125).eval()
    size = (75, 100)
    views = []
    for scale in (0.5, 1.0, 2.0):
        img = torch.randn(3, round(size[0] * scale), round(size[1] * scale))
        views += [img, img.flip(-1)]
    label = torch.zeros(VOC.num_fg)
    label[[2, 11, 14]] = 1
    old = all_class_cam(model, views, label, size)[[2, 11, 14]]
    ours = infer_SB.multiscale_cam(model, views, label, size, torch.device("cpu"))
    assert ours.dtype == old.dtype and np.array_equal(ours, old)
    monkeypatch.setattr(infer_SB, "UPSAMPLE_ELEMENTS", 0)
    present_only = infer_SB.multiscale_cam(model, views, label, size, torch.device("cpu"))
    np.testing.assert_allclose(present_only, old, rtol=1e-5, atol=1e-6)


def test_pcm_in_column_blocks_equals_the_dense_product(monkeypatch):
    torch.manual_seed(2)
    model = resnet38_sb.Net(num_classes=5, width=0.125).eval()
    cam = torch.rand(2, 5, 6, 7)
    features = torch.randn(2, 3 + 64 + 128, 9, 11)
    with torch.no_grad():
        dense = model.pcm(cam, features)
        monkeypatch.setattr(resnet38_sb, "PCM_DENSE_ELEMENTS", 0)
        monkeypatch.setattr(resnet38_sb, "PCM_BLOCK_ELEMENTS", 2 * 99 * 10)  # blocks of 10 columns, the last of 9
        blocks = model.pcm(cam, features)
        f = model.f9(features).double().flatten(2).numpy()
    np.testing.assert_allclose(blocks.numpy(), dense.numpy(), rtol=1e-5, atol=1e-6)
    # float64, written differently: affinities of every pair, each column divided by its sum.
    up = F.interpolate(cam.double(), (9, 11), mode="bilinear", align_corners=True).flatten(2).numpy()
    for k in range(2):
        unit = f[k] / (np.linalg.norm(f[k], axis=0) + 1e-5)
        aff = np.maximum(np.einsum("dp,dq->pq", unit, unit), 0)
        reference = up[k] @ (aff / (aff.sum(axis=0) + 1e-5))
        np.testing.assert_allclose(blocks[k].flatten(1).numpy(), reference, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """A dataset of one 4000 x 3000 JPEG with two classes."""
    root = tmp_path_factory.mktemp("photo")
    (root / "JPEGImages").mkdir()
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    small.resize(PHOTO[::-1], Image.Resampling.BILINEAR).save(root / "JPEGImages" / "photo.jpg", quality=85)
    (root / "list.txt").write_text("photo\n")
    labels = np.zeros((1, VOC.num_fg), np.uint8)
    labels[0, [2, 14]] = 1
    np.savez(root / "cls_labels.npz", names=np.array(["photo"]), labels=labels)
    return root


def test_the_largest_view_is_capped_at_max_side(photo, tmp_path):
    """The default --max_side bounds the scale-2.0 view; a VOC-sized image is not resized."""
    assert infer_SB.get_arg_parser().parse_args(["--weights", "w"]).max_side == infer_SB.MAX_SIDE == 1280
    big = VOC12ClsDatasetMSF(photo / "list.txt", photo, photo / "cls_labels.npz", VOC, scales=infer_SB.SCALES,
                             max_side=infer_SB.MAX_SIDE)[0]
    assert [tuple(v.shape[1:]) for v in big["img"][::2]] == [(240, 320), (480, 640), (720, 960), (960, 1280)]
    assert big["size"] == PHOTO and big["orig"].shape == (*PHOTO, 3)
    voc = tmp_path / "voc"
    (voc / "JPEGImages").mkdir(parents=True)
    Image.open(photo / "JPEGImages" / "photo.jpg").resize((500, 375)).save(voc / "JPEGImages" / "photo.jpg")
    item = VOC12ClsDatasetMSF(photo / "list.txt", voc, photo / "cls_labels.npz", VOC, scales=infer_SB.SCALES,
                              max_side=infer_SB.MAX_SIDE)[0]
    full = VOC12ClsDatasetMSF(photo / "list.txt", voc, photo / "cls_labels.npz", VOC, scales=infer_SB.SCALES,
                              max_side=0)[0]
    assert [tuple(v.shape[1:]) for v in item["img"][::2]] == [(188, 250), (375, 500), (562, 750), (750, 1000)]
    assert all(torch.equal(a, b) for a, b in zip(item["img"], full["img"], strict=True))


MEASURE = """
import resource, sys
sys.path.insert(0, sys.argv[1])
import infer_SB
infer_SB.main(sys.argv[2:])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.timeout(180)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB and RLIMIT_AS are Linux's")
def test_a_phone_photo_runs_in_bounded_memory(photo, tmp_path):
    """infer_SB.py at its defaults on a 4000 x 3000 photo, within 8 GiB of address space: it used to
    ask for 19 GB in PCM (a 2048 x 1536 view) and 1.9 GB to upsample all 20 classes of both views."""
    weights = tmp_path / "sb.pth"
    torch.save(resnet38_sb.Net(num_classes=VOC.num_classes, width=0.125).state_dict(), weights)
    limit = 8 << 30

    def cap_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    argv = ["--voc12_root", photo, "--label_file", photo / "cls_labels.npz", "--infer_list", photo / "list.txt",
            "--backbone_width", "0.125", "--weights", weights, "--out_cam", tmp_path / "cam", "--out_cam_pred",
            tmp_path / "pred", "--num_workers", "0", "--device", "cpu"]
    result = subprocess.run([sys.executable, "-c", MEASURE, str(ROOT), *map(str, argv)], capture_output=True,
                            text=True, timeout=170, preexec_fn=cap_memory)
    assert result.returncode == 0, result.stderr[-3000:]
    peak_gib = int(result.stdout.split()[-1]) / (1 << 20)
    assert peak_gib < 6, peak_gib
    labels, cams = load_scores(tmp_path / "cam" / "photo.npz")
    assert labels.tolist() == [3, 15] and cams.shape == (2, *PHOTO)
    assert set(np.unique(load_label_png(tmp_path / "pred" / "photo.png"))) <= {0, 3, 15}
