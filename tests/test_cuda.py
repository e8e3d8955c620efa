"""The device paths of the stage scripts (SB step, AffinityNet, DeepLab): one GPU in float32, --amp and
--channels_last, DataParallel, torchrun with NCCL, and GPU inference against the CPU's.

Each test body takes the device as a parameter. The "cuda" cases carry the ``cuda`` mark and skip
without a GPU (``pytest -m cuda`` runs only them, as ``bench/gpu.sh`` does); the "cpu" cases run in
the normal suite, so the checking code itself is exercised on every CI run.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from test_distributed import TORCHRUN_VARS
from test_pipeline import run_script

import infer_aff
import infer_SB
import infer_seg
import train_aff
import train_SB
import train_seg
from network import resnet38_aff, resnet38_sb, segmentation
from tool import imutils, trainloop
from tool.fileio import load_label_png, save_sb_map, save_scores
from tool.losses import sb_step_loss
from voc12.classes import load_classes
from voc12.data import VOC12ClsDatasetMSF, VOC12ImageDataset, load_img_name_list
from voc12.sb_map import boundaries_from_labels

GPU_COUNT = torch.cuda.device_count() if torch.cuda.is_available() else 0
NEEDS_GPU = pytest.mark.skipif(GPU_COUNT == 0, reason="needs a CUDA GPU")
NEEDS_TWO_GPUS = pytest.mark.skipif(GPU_COUNT < 2, reason="needs 2 CUDA GPUs")
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, NEEDS_GPU])
DEVICES = ["cpu", CUDA]
WIDTH = 0.125
TINY = ["--backbone_width", str(WIDTH), "--crop_size", "64", "--num_workers", "0", "--log_every", "1", "--lr", "0.02",
        "--tb_image_every", "1000"]
# Training images: 4 on the CPU keep its cases to seconds; 12 on a GPU give AMP's loss scaler room
# for the steps it skips while it finds its scale.
TRAIN_IMAGES = {"cpu": 4, "cuda": 12}
MODES = {"fp32": [], "amp": ["--amp"], "channels_last": ["--channels_last"],
         "amp_channels_last": ["--amp", "--channels_last"]}
# The CPU runs float32 only: AMP and channels_last are CUDA-only, so on the CPU they would repeat it.
TRAIN_CASES = [("cpu", "fp32")] + [pytest.param("cuda", m, marks=[pytest.mark.cuda, NEEDS_GPU]) for m in MODES]
SCRIPTS = {"train_SB.py": train_SB, "train_aff.py": train_aff, "train_seg.py": train_seg}
# Where each network's ResNet-38 names start: DeepLab-v1 (SEAM's codebase) holds it as "backbone.".
BACKBONE = {"train_SB.py": "", "train_aff.py": "", "train_seg.py": "backbone."}
# Layers that never train, on any device: conv1a and block 2 of the SB and AffinityNet networks (as
# released; from random init their BatchNorm trains, --train_bn), conv1a of DeepLab's backbone.
FROZEN_PREFIXES = {"train_SB.py": ("conv1a.", "b2.", "b2_1.", "b2_2."),
                   "train_aff.py": ("conv1a.", "b2.", "b2_1.", "b2_2."),
                   "train_seg.py": ("backbone.conv1a.",)}
# DeepLab trains as its recipe does, without --train_bn: the backbone's BatchNorm is frozen, its
# affine terms and running statistics alike; the head's BatchNorm trains.
FROZEN_BN = {"train_seg.py"}
# train_seg.py accumulates 3 batches an iteration over epochs of 2 (CPU) or 6 (GPU) batches: an
# iteration crosses an epoch's end on the CPU, and DDP's no_sync path runs.
SEG_ITER_SIZE = 3


@pytest.fixture(autouse=True)
def close_log_files():
    yield
    logging.getLogger("wsss").handlers.clear()


@pytest.fixture(scope="session")
def gt_inputs(tiny_voc: Path, tmp_path_factory) -> dict[str, Path]:
    """What the trainers read besides images, made from the ground truth so that no other stage has
    to run first: boundary maps (train_SB.py) and one-hot "CRF" score files (train_aff.py)."""
    out = tmp_path_factory.mktemp("gt_inputs")
    num_classes = load_classes(tiny_voc / "classes.txt").num_classes
    for name in load_img_name_list(tiny_voc / "train.txt"):
        label = load_label_png(tiny_voc / "SegmentationClass" / f"{name}.png")
        save_sb_map(out / "sb_map" / f"{name}.npz", boundaries_from_labels(label, num_classes))
        present = np.array([0, *sorted(set(np.unique(label).tolist()) - {0, 255})])
        scores = (label[None] == present[:, None, None]).astype(np.float32)  # ignored pixels score nothing
        for crf in ("la", "ha"):
            save_scores(out / crf / f"{name}.npz", present, scores)
    names = load_img_name_list(tiny_voc / "train.txt")
    (out / "train4.txt").write_text("".join(n + "\n" for n in names[:TRAIN_IMAGES["cpu"]]))
    return {"sb_map": out / "sb_map", "la": out / "la", "ha": out / "ha", "cpu": out / "train4.txt",
            "cuda": tiny_voc / "train.txt"}


def initial_weights(script: str, tiny_voc: Path, path: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    num_classes = load_classes(tiny_voc / "classes.txt").num_classes
    if script == "train_SB.py":
        net = resnet38_sb.Net(num_classes=num_classes, width=WIDTH)
    elif script == "train_aff.py":
        net = resnet38_aff.Net(width=WIDTH)
    else:
        net = segmentation.make_net("resnet38", num_classes, width=WIDTH)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    torch.save(state, path)
    return state


def schedule(script: str, epochs: int, device: str, batch: int = 2) -> tuple[list[str], int, int]:
    """The flags that train about ``epochs`` epochs at global batch ``batch``; the optimiser steps
    they take and the batches in an epoch. train_seg.py counts iterations of SEG_ITER_SIZE batches,
    rounded up."""
    per_epoch = TRAIN_IMAGES[device.split(":")[0]] // batch
    if script != "train_seg.py":
        return ["--max_epoches", str(epochs), "--batch_size", str(batch)], epochs * per_epoch, per_epoch
    iterations = -(-epochs * per_epoch // SEG_ITER_SIZE)
    return (["--max_iters", str(iterations), "--iter_size", str(SEG_ITER_SIZE), "--batch_size", str(batch)],
            iterations, per_epoch)


def train_argv(script: str, tiny_voc: Path, gt: dict[str, Path], work: Path, device: str, *extra,
               epochs: int, batch: int = 2) -> list[str]:
    argv = ["--voc12_root", tiny_voc, "--dataset_classes", tiny_voc / "classes.txt", "--train_list",
            gt[device.split(":")[0]], "--label_file", tiny_voc / "cls_labels.npz", *TINY, "--device", device,
            "--weights", work / "init.pth", "--tblog_dir", work / "tb", *schedule(script, epochs, device, batch)[0],
            *extra]
    if script == "train_SB.py":
        argv += ["--train_bn", "--resize_long", "56", "80", "--sb_map_dir", gt["sb_map"]]
    elif script == "train_aff.py":
        argv += ["--train_bn", "--la_crf_dir", gt["la"], "--ha_crf_dir", gt["ha"]]
    else:  # the ground truth stands in for the random-walk labels
        argv += ["--seg_backbone", "resnet38", "--label_dir", tiny_voc / "SegmentationClass"]
    return [str(a) for a in argv]


def run_in_process(script: str, argv: list[str], stop_at: int | None = None) -> None:
    """Run a training script as its CLI does; ``stop_at`` acts as a SIGTERM after that many steps."""
    module = SCRIPTS[script]
    args = module.get_arg_parser().parse_args(argv)
    if stop_at is None:
        module.run(args)
        return
    calls = []

    def stop_after(stop, info) -> bool:
        calls.append(1)
        return len(calls) >= stop_at

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainloop, "_stop_everywhere", stop_after)
        with pytest.raises(SystemExit):
            module.run(args)


def logged_losses(log_file: Path) -> list[float]:
    """The loss of every step (fit) or iteration (fit_iterations) logged, with --log_every 1."""
    return [float(v) for v in re.findall(r"(?:step \d+/\d+ epoch \d+|iteration \d+/\d+) loss (\S+)",
                                         log_file.read_text())]


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys) -> float:
    return max((a[k].double() - b[k].double()).norm().item() for k in keys)


def check_trained(script: str, final: dict[str, torch.Tensor], init: dict[str, torch.Tensor]) -> list[str]:
    """Frozen layers exactly as initialised (a frozen BatchNorm's running statistics too), every
    other weight moved; return the trained keys."""
    assert final.keys() == init.keys()
    running = ("running_mean", "running_var")
    weights = [k for k, v in init.items() if v.is_floating_point() and not k.endswith(running)]
    frozen = [k for k in weights if k.startswith(FROZEN_PREFIXES[script])]
    if script in FROZEN_BN:
        # A BatchNorm is the module with running statistics; its name is all the state_dict needs.
        norms = tuple(k.removesuffix(".running_mean") + "." for k in init
                      if k.endswith(".running_mean") and k.startswith(BACKBONE[script]))
        frozen += [k for k in init if k.startswith(norms) and k.endswith(("weight", "bias", *running))]
        assert len(norms) > 30
    trained = [k for k in weights if k not in frozen]
    assert frozen and trained
    for key in frozen:
        assert torch.equal(final[key].cpu(), init[key]), key
    unchanged = [k for k in trained if torch.equal(final[k].cpu(), init[k])]
    assert not unchanged, unchanged
    for value in final.values():
        assert torch.isfinite(value.float()).all()
    return trained


@pytest.mark.parametrize("device,mode", TRAIN_CASES)
@pytest.mark.parametrize("script", SCRIPTS)
def test_training_epoch_trains_and_resumes(script: str, device: str, mode: str, tiny_voc: Path,
                                           gt_inputs: dict[str, Path], tmp_path: Path):
    """Two epochs straight, and the same two epochs stopped mid-way and resumed from the checkpoint:
    finite losses, frozen layers untouched, the rest trained, and the resumed run bit for bit where
    the straight one ended, on every device (--deterministic; on an H200 without it two straight runs
    already differ by up to half the distance the weights travel). Under AMP the loss scaler skips
    the first steps while it finds its scale, and they count as steps."""
    device = "cuda:0" if device == "cuda" else device
    # On a GPU DeepLab trains 8 epochs: AMP's scaler skips more than its first 4 iterations.
    epochs = 8 if script == "train_seg.py" and device != "cpu" else 2
    init = initial_weights(script, tiny_voc, tmp_path / "init.pth")
    argv = train_argv(script, tiny_voc, gt_inputs, tmp_path, device, *MODES[mode], "--deterministic", epochs=epochs)
    _, steps, per_epoch = schedule(script, epochs, device)
    run_in_process(script, [*argv, "--session_name", str(tmp_path / "straight")])
    # Stop in the middle of an epoch: batch 1 of epoch 2 (SB, AffinityNet; DeepLab on the CPU) or
    # batch 3 of epoch 1 (DeepLab on a GPU).
    stop_at, accumulated = (1, SEG_ITER_SIZE) if script == "train_seg.py" else (per_epoch + 1, 1)
    run_in_process(script, [*argv, "--session_name", str(tmp_path / "resumed")], stop_at=stop_at)
    stopped = torch.load(tmp_path / "resumed.ckpt", map_location="cpu", weights_only=True)
    batches = stop_at * accumulated
    assert stopped["step"] == stop_at
    assert (stopped["epoch"], stopped["extra"]["batch"]) == ((batches - 1) // per_epoch, (batches - 1) % per_epoch + 1)
    assert 0 < stopped["extra"]["batch"] < per_epoch
    run_in_process(script, [*argv, "--session_name", str(tmp_path / "resumed"), "--resume"])

    losses = logged_losses(tmp_path / "straight.log")
    assert len(losses) == steps and np.isfinite(losses).all()
    assert len(logged_losses(tmp_path / "resumed.log")) == steps
    straight = torch.load(tmp_path / "straight.pth", map_location="cpu", weights_only=True)
    resumed = torch.load(tmp_path / "resumed.pth", map_location="cpu", weights_only=True)
    trained = check_trained(script, straight, init)
    check_trained(script, resumed, init)
    assert largest_difference(resumed, straight, trained) == 0

    ckpt = torch.load(tmp_path / "straight.ckpt", map_location="cpu", weights_only=True)
    scaler = ckpt["extra"]["scaler"]
    amp_on = "amp" in mode and device != "cpu"
    assert bool(scaler) == amp_on and (not amp_on or scaler["scale"] > 0)
    conv = straight[BACKBONE[script] + "b4.conv_branch2a.weight"]
    assert conv.is_contiguous() != ("channels_last" in mode and device != "cpu")


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_gives_the_same_gradients(device: str):
    """The SB network and loss in the channels-last layout against the default layout: the same
    loss and gradients. The CPU's oneDNN is off here: torch 2.14 corrupts memory in its
    channels-last weight gradient of strided 1x1 convolutions (why the scripts keep the CPU contiguous)."""
    torch.manual_seed(0)
    net = resnet38_sb.Net(num_classes=4, width=WIDTH).train().to(device)
    img = torch.randn(2, 3, 40, 40, device=device)
    label = torch.tensor([[1.0, 0, 1], [0, 1, 0]], device=device)
    sb_map = torch.rand(2, 4, 40, 40, device=device)
    view2 = train_SB.TwoViews(net)
    grads = []
    layouts = (torch.contiguous_format, torch.channels_last)
    no_onednn = torch.backends.mkldnn.flags(enabled=False) if device == "cpu" else contextlib.nullcontext()
    with no_onednn, strict_fp32():
        for layout in layouts:
            net.to(memory_format=layout)
            torch.manual_seed(1)  # the same dropout masks
            out1, out2 = view2(img.contiguous(memory_format=layout))
            loss = sb_step_loss(out1, out2, label, sb_map)["loss"]
            net.zero_grad()
            loss.backward()
            grads.append((loss.item(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}))
    (loss0, g0), (loss1, g1) = grads
    assert loss0 == pytest.approx(loss1, rel=1e-5)
    assert g0.keys() == g1.keys() and len(g0) > 50
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-3, atol=1e-5 * g0[name].abs().max().item())


@pytest.mark.cuda
@NEEDS_TWO_GPUS
@pytest.mark.parametrize("script", SCRIPTS)
def test_dataparallel_over_the_visible_gpus(script: str, tiny_voc: Path, gt_inputs: dict[str, Path],
                                            tmp_path: Path, monkeypatch):
    """One process given plain ``cuda`` with several GPUs: the released DataParallel, the batch split
    over the GPUs, weights trained and frozen layers untouched."""
    module = SCRIPTS[script]
    real_wrap, wrapped = module.wrap_model, []

    def spy(model, info, **kwargs):
        wrapped.append(real_wrap(model, info, **kwargs))
        return wrapped[-1]

    monkeypatch.setattr(module, "wrap_model", spy)
    init = initial_weights(script, tiny_voc, tmp_path / "init.pth")
    argv = train_argv(script, tiny_voc, gt_inputs, tmp_path, "cuda", "--session_name", tmp_path / "dp", epochs=1,
                      batch=2 * GPU_COUNT)
    run_in_process(script, argv)
    assert isinstance(wrapped[0], torch.nn.DataParallel) and len(wrapped[0].device_ids) == GPU_COUNT
    assert np.isfinite(logged_losses(tmp_path / "dp.log")).all()
    check_trained(script, torch.load(tmp_path / "dp.pth", map_location="cpu", weights_only=True), init)


def torchrun_train(script: str, device: str, nproc: int, tiny_voc: Path, gt: dict[str, Path], work: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS} | {"OMP_NUM_THREADS": "1"}
    argv = train_argv(script, tiny_voc, gt, work, device, "--session_name", work / "ddp", epochs=1, batch=2 * nproc)
    result = run_script("torch.distributed.run", "--standalone", "--nproc_per_node", nproc,
                        Path(__file__).resolve().parents[1] / script, *argv, env=env, timeout=600)
    return result.stdout + result.stderr


# On the CPU DeepLab's run: its accumulated batches skip DDP's all-reduce (no_sync) but the last,
# which no other test runs under torchrun (tests/test_pipeline.py runs the other two).
@pytest.mark.parametrize("script,device", [("train_seg.py", "cpu"),
                                           *[pytest.param(s, "cuda", marks=[pytest.mark.cuda, NEEDS_GPU])
                                             for s in SCRIPTS]])
def test_torchrun_ranks_end_identical(script: str, device: str, tiny_voc: Path, gt_inputs: dict[str, Path],
                                      tmp_path: Path):
    """torchrun: NCCL on GPUs (2 ranks where 2 GPUs exist, else 1; each rank on cuda:LOCAL_RANK),
    Gloo on the CPU. fit() compares every rank's parameters at the end and fails if they differ."""
    nproc = min(2, GPU_COUNT) if device == "cuda" else 2
    init = initial_weights(script, tiny_voc, tmp_path / "init.pth")
    output = torchrun_train(script, device, nproc, tiny_voc, gt_inputs, tmp_path)
    assert f"weights identical on all {nproc} ranks" in output
    assert np.isfinite(logged_losses(tmp_path / "ddp.log")).all()
    check_trained(script, torch.load(tmp_path / "ddp.pth", map_location="cpu", weights_only=True), init)


@contextlib.contextmanager
def strict_fp32():
    """Full float32 on the GPU: no TF32 in cuDNN convolutions or in matmuls."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def worst_error(ours: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """Largest absolute difference, relative to the largest reference value of each output."""
    return max(float(np.abs(o - r).max() / np.abs(r).max()) for o, r in zip(ours, reference, strict=True))


# Tolerances of GPU against CPU. Strict float32: the GPU sums in another order (and cuDNN may use
# Winograd or FFT convolutions), so it may err up to 100x as much as the CPU's float32 does against
# float64, plus 1e-6 of the range. TF32 convolutions (torch's default for float32 on a GPU) and AMP
# round to 10 mantissa bits; how far that moves an output depends on the network (a random
# ResNet-101 amplifies it to 25% of its probabilities), so the bound is measured: the CPU runs a copy
# whose convolutions round the same way (:func:`rounded_copy`), and the GPU may err up to 3x as
# much. On an H200 (torch 2.11) every case but AMP's CAMs came within 1.35x of its emulation; those
# erred 37x as much, as the CPU's float16 autocast did, while the SB network decided PCM's class
# maxima in float16. Deciding them in float32 brought the CPU's case within bound; no GPU has run
# that change yet.
FP32_FACTOR, FP32_FLOOR, LOW_PRECISION_FACTOR = 100.0, 1e-6, 3.0


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 rounded to 10 mantissa bits (TF32's and float16's), to nearest."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def rounded_copy(net: torch.nn.Module, float16_outputs: bool) -> torch.nn.Module:
    """A float32 CPU copy of ``net`` whose convolutions round their weights and inputs as TF32 does
    and, with ``float16_outputs``, their outputs to float16 as AMP does."""
    net = copy.deepcopy(net).to("cpu", torch.float32)
    for conv in [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]:
        conv.weight.data = round_to_tf32(conv.weight.data)
        conv.register_forward_pre_hook(lambda module, args: (round_to_tf32(args[0]), *args[1:]))
        if float16_outputs:
            conv.register_forward_hook(lambda module, args, out: out.half().float())
    return net


def check_against_cpu(net: torch.nn.Module, run, device: str) -> None:
    """``run(model, model_dtype, device, amp, layout)`` -> list of outputs; compare the device's with
    the CPU's, float64 being the reference: strict float32, then the low precisions against the
    CPU's emulation of their rounding: on a GPU TF32 and AMP in both layouts, on the CPU its float16
    autocast, which runs the networks' AMP code (the scripts' --amp is CUDA's)."""
    cpu = torch.device("cpu")
    reference = run(net, torch.float64, cpu, False, torch.contiguous_format)
    cpu32 = run(net, torch.float32, cpu, False, torch.contiguous_format)
    device = torch.device(device)
    with strict_fp32():
        strict = run(net, torch.float32, device, False, torch.contiguous_format)
    assert worst_error(strict, reference) <= FP32_FACTOR * worst_error(cpu32, reference) + FP32_FLOOR
    layouts = (torch.contiguous_format, torch.channels_last)
    modes = [(amp, layout) for amp in (False, True) for layout in layouts] if device.type == "cuda" else \
        [(True, torch.contiguous_format)]
    emulated = {amp: worst_error(run(rounded_copy(net, amp), torch.float32, cpu, False, torch.contiguous_format),
                                 reference) for amp in {amp for amp, _ in modes}}
    for amp, layout in modes:
        outputs = run(net, torch.float32, device, amp, layout)
        assert worst_error(outputs, reference) <= LOW_PRECISION_FACTOR * emulated[amp] + FP32_FLOOR, (amp, layout)


@pytest.mark.parametrize("device", DEVICES)
def test_multiscale_cams_match_the_cpu(device: str, tiny_voc: Path):
    classes = load_classes(tiny_voc / "classes.txt")
    # Two scales of the four keep the CPU case short; multiscale_cam treats every scale alike.
    dataset = VOC12ClsDatasetMSF(tiny_voc / "train.txt", tiny_voc, tiny_voc / "cls_labels.npz", classes,
                                 scales=(0.5, 1.0))
    packs = [dataset[i] for i in range(2)]
    torch.manual_seed(0)
    net = resnet38_sb.Net(num_classes=classes.num_classes, width=WIDTH).eval()

    def run(model, dtype, dev, amp, layout) -> list[np.ndarray]:
        model = model.to(dev, dtype, memory_format=layout)
        with torch.autocast(dev.type, torch.float16, enabled=amp):
            cams = [infer_SB.multiscale_cam(model, [v.to(dtype) for v in p["img"]], p["label"], p["size"], dev,
                                            layout) for p in packs]
        # The out_cam_pred decision: background at 0.26 against the classes.
        return [np.concatenate([np.full((1, *c.shape[1:]), 0.26, np.float32), c]) for c in cams]

    check_against_cpu(net, run, device)


@pytest.mark.parametrize("device", DEVICES)
def test_random_walk_matches_the_cpu(device: str, tiny_voc: Path):
    dataset = VOC12ImageDataset(tiny_voc / "train.txt", tiny_voc, normalize=True)
    imgs = [dataset[i]["img"] for i in range(2)]
    rng = np.random.default_rng(0)
    scores = [rng.random((4, *img.shape[1:])) ** 4 for img in imgs]
    torch.manual_seed(0)
    net = resnet38_aff.Net(width=WIDTH).eval()

    def run(model, dtype, dev, amp, layout) -> list[np.ndarray]:
        model = model.to(dev, dtype, memory_format=layout)
        args = infer_aff.get_arg_parser().parse_args(["--weights", "-", "--cam_dir", "-"])
        args.amp, args.channels_last = amp, layout == torch.channels_last
        return [infer_aff.random_walk(model, img.to(dtype), s.astype(np.float64 if dtype == torch.float64 else
                                                                      np.float32), args, dev).cpu().numpy()
                for img, s in zip(imgs, scores, strict=True)]

    check_against_cpu(net, run, device)


@torch.no_grad()
def calibrate(net: torch.nn.Module, img: torch.Tensor) -> None:
    """Give a randomly initialised segmentation network varied labels: every BatchNorm takes the
    statistics of ``img``, and the class biases are shifted so that each class's mean logit over
    ``img`` is 0. At init the network labels every pixel alike, and agreement would prove nothing.
    Leaves ``net`` in eval mode."""
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    net.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # the running statistics become those of the one batch
        norm.train()
    net(img[None])
    for norm in norms:
        norm.eval()
    last = net.cls_conv if hasattr(net, "cls_conv") else net.base.aspp.c0  # DeepLab-v1 / v2
    last.bias -= net(img[None]).mean((0, 2, 3))


SEG_CASES = [("resnet38", "cpu"), pytest.param("resnet38", "cuda", marks=[pytest.mark.cuda, NEEDS_GPU]),
             pytest.param("resnet101", "cuda", marks=[pytest.mark.cuda, NEEDS_GPU])]


@pytest.mark.parametrize("backbone,device", SEG_CASES)
def test_segmentation_matches_the_cpu(backbone: str, device: str, tiny_voc: Path):
    """infer_seg.predict_probs (two scales and the flip, softmax of the averaged logits): the tiny
    DeepLab-v1 ResNet-38 everywhere, the paper's DeepLab-v2 ResNet-101 MSC on a GPU only (its float64
    CPU reference takes too long for the normal suite). A pixel whose two best probabilities lie
    more than twice the error bound apart keeps its label."""
    classes = load_classes(tiny_voc / "classes.txt")
    dataset = VOC12ImageDataset(tiny_voc / "train.txt", tiny_voc)
    normalize = segmentation.input_normalizer(backbone, None)
    imgs = [torch.from_numpy(imutils.hwc_to_chw(normalize(dataset[i]["orig"]))) for i in range(2)]
    torch.manual_seed(0)
    net = segmentation.make_net(backbone, classes.num_classes, width=WIDTH if backbone == "resnet38" else 1.0)
    calibrate(net, imgs[0])
    assert len(np.unique(infer_seg.predict_probs(net, imgs[0], [1.0], False, torch.device("cpu")).argmax(0))) >= 5

    def run(model, dtype, dev, amp, layout) -> list[np.ndarray]:
        model = model.to(dev, dtype, memory_format=layout)
        with torch.autocast(dev.type, torch.float16, enabled=amp):
            return [infer_seg.predict_probs(model, img.to(dtype), [1.0, 0.75], True, dev, layout) for img in imgs]

    check_against_cpu(net, run, device)
