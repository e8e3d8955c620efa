"""GPU cost of the stages at the paper's sizes: training images/s in float32, AMP and AMP +
channels_last, peak GPU memory, multi-scale CAM inference against the released approach, and
DeepLab inference. Writes a markdown table (default bench/GPU.md) with the device name and the date.

    python bench/bench_gpu.py                     # CUDA, full-width ResNet-38, paper sizes
    python bench/bench_gpu.py --device cpu --width 0.125 --seg_backbone resnet38 --batch 2 --crop 64 \\
        --infer_size 48 64 --steps 1 --warmup 0 --images 1 --out /tmp/gpu.md   # the code path, on a CPU
    python bench/bench_gpu.py --estimate_memory   # CPU: training memory at the paper's sizes, estimated

Training is timed on synthetic batches already on the device (the scripts' loaders prefetch with
workers and pinned memory), with the scripts' network, loss, poly SGD and GradScaler; DeepLab
(``--seg_backbone``: DeepLab-v2 ResNet-101 MSC, train_seg.py's default, whose one width ``--width``
leaves as it is, or DeepLab-v1 on the ResNet-38 of ``--width``) accumulates its batches as
train_seg.py does (5 images x 2). The released
inference (SBNet infer_SB.py, re-implemented below) runs each of the 8 views (4 scales, each
flipped) as its own batch of one through the whole network, boundary branch and Canny included,
and sums the CAMs on the CPU; ours (infer_SB.multiscale_cam) runs a scale and its flip as one batch,
skips the boundary branch and sums on the device.
"""
from __future__ import annotations

import argparse
import datetime
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import benchutil
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import infer_SB
import infer_seg
import train_seg
from network import resnet38_aff, resnet38_sb, segmentation
from tool.checkpoint import ResumableSampler
from tool.distributed import memory_format
from tool.fileio import atomic_path
from tool.losses import affinity_loss, sb_step_loss, segmentation_loss
from tool.trainloop import make_poly_optimizer
from train_SB import TwoViews
from voc12.classes import VOC

PAPER_CROP = 448
MODES = {"fp32": (False, False), "AMP": (True, False), "AMP + channels_last": (True, True)}
VOC_IMAGE = (375, 500)  # height, width of a typical VOC image


def poly_sgd(net: nn.Module, steps: int) -> torch.optim.Optimizer:
    """The ResNet-38 stages' optimiser (train_SB.py, train_aff.py) over ``steps`` steps."""
    sampler = ResumableSampler(steps, shuffle=False, seed=0, batch_size=1, drop_last=True)
    schedule = argparse.Namespace(lr=0.01, wt_dec=5e-4, momentum=None, max_epoches=1)
    return make_poly_optimizer(net, schedule, sampler)


def seg_sgd(net: nn.Module, steps: int) -> torch.optim.Optimizer:
    """train_seg.py's optimiser with its defaults, over ``steps`` iterations."""
    args = train_seg.get_arg_parser().parse_args(["--label_dir", "-", "--max_iters", str(steps)])
    return train_seg.make_optimizer(net, args)


@dataclass(frozen=True)
class Stage:
    """One trainable stage: its paper batch (per step; ``iter_size`` steps' gradients summed per
    update) and crop, and how to build a step on synthetic data.

    ``make(width, batch, crop, device)`` returns ``(net, model, pack, loss_fn)``: the network whose
    parameters train, the module the step calls, a batch on ``device`` and ``loss_fn(model, pack)``.
    ``optimizer(net, steps)`` builds the script's optimiser.
    """

    name: str
    batch: int
    crop: int
    make: Callable
    optimizer: Callable[[nn.Module, int], torch.optim.Optimizer] = poly_sgd
    iter_size: int = 1


def make_sb(width: float, batch: int, crop: int, device: torch.device):
    net = resnet38_sb.Net(num_classes=VOC.num_classes, width=width)
    gen = torch.Generator().manual_seed(0)
    pack = {"img": torch.randn(batch, 3, crop, crop, generator=gen),
            "label": (torch.rand(batch, VOC.num_fg, generator=gen) < 0.15).float(),
            "sb_map": torch.rand(batch, VOC.num_classes, crop, crop, generator=gen) ** 8}

    def loss_fn(model: nn.Module, pack: dict) -> torch.Tensor:
        out1, out2 = model(pack["img"])
        return sb_step_loss(out1, out2, pack["label"], pack["sb_map"])["loss"]

    return net, TwoViews(net), {k: v.to(device) for k, v in pack.items()}, loss_fn


def make_aff(width: float, batch: int, crop: int, device: torch.device):
    net = resnet38_aff.Net(width=width)
    gen = torch.Generator().manual_seed(0)
    img = torch.randn(batch, 3, crop, crop, generator=gen)
    with torch.no_grad():
        shape = net.eval()(img[:1, :, :crop, :crop]).shape[1:]
    kind = torch.randint(0, 4, (batch, *shape), generator=gen)  # bg, fg, neg or ignored pair
    pack = {"img": img, **{k: (kind == i).float() for i, k in enumerate(("aff_bg", "aff_fg", "aff_neg"))}}

    def loss_fn(model: nn.Module, pack: dict) -> torch.Tensor:
        return affinity_loss(model(pack["img"]), pack["aff_bg"], pack["aff_fg"], pack["aff_neg"])["loss"]

    return net, net, {k: v.to(device) for k, v in pack.items()}, loss_fn


def make_seg_net(backbone: str, width: float) -> nn.Module:
    """train_seg.py's network (BatchNorm frozen); ``width`` applies to ResNet-38 only."""
    return segmentation.make_net(backbone, VOC.num_classes, width=width if backbone == "resnet38" else 1.0)


def make_seg(backbone: str, width: float, batch: int, crop: int, device: torch.device):
    """DeepLab (``backbone`` as train_seg.py's --seg_backbone), random images and label maps with
    5% of the pixels ignored, and train_seg.py's loss over the network's outputs (MSC: four)."""
    net = make_seg_net(backbone, width)
    gen = torch.Generator().manual_seed(0)
    label = torch.randint(0, VOC.num_classes, (batch, crop, crop), generator=gen)
    label[torch.rand(batch, crop, crop, generator=gen) < 0.05] = 255
    pack = {"img": torch.randn(batch, 3, crop, crop, generator=gen), "label": label}

    def loss_fn(model: nn.Module, pack: dict) -> torch.Tensor:
        return segmentation_loss(model(pack["img"]), pack["label"])

    return net, net, {k: v.to(device) for k, v in pack.items()}, loss_fn


# The paper's settings; DeepLab-v2's are deeplab-pytorch's VOC recipe (train_seg.py's defaults),
# DeepLab-v1 ResNet-38's the README's (SEAM's codebase: crop 448).
SEG_STAGES = {"resnet101": Stage("DeepLab-v2 ResNet-101 (MSC)", 5, 321, partial(make_seg, "resnet101"), seg_sgd, 2),
              "resnet38": Stage("DeepLab-v1 ResNet-38", 5, PAPER_CROP, partial(make_seg, "resnet38"), seg_sgd, 2)}
STAGES = [Stage("SB step (two views)", 8, PAPER_CROP, make_sb),
          Stage("AffinityNet", 8, PAPER_CROP, make_aff),
          SEG_STAGES["resnet101"]]


def stages_for(seg_backbone: str) -> list[Stage]:
    """The stages, DeepLab on ``seg_backbone``."""
    return [SEG_STAGES[seg_backbone] if stage in SEG_STAGES.values() else stage for stage in STAGES]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_rate(stage: Stage, width: float, batch: int, crop: int, device: torch.device, amp: bool,
               channels_last: bool, steps: int, warmup: int) -> tuple[float, int | None]:
    """Training images/s and peak device memory (bytes; None on a CPU) of ``steps`` timed updates,
    each of ``stage.iter_size`` batches."""
    net, model, pack, loss_fn = stage.make(width, batch, crop, device)
    layout = memory_format(channels_last, device)
    net.train().to(device, memory_format=layout)
    pack["img"] = pack["img"].contiguous(memory_format=layout)
    optimizer = stage.optimizer(net, steps + warmup)
    use_amp = amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    tic = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            tic = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        for _ in range(stage.iter_size):
            with torch.autocast(device.type, enabled=use_amp):
                loss = loss_fn(model, pack)
            scaler.scale(loss / stage.iter_size).backward()
        scaler.step(optimizer)
        scaler.update()
    sync(device)
    rate = batch * stage.iter_size * steps / (time.perf_counter() - tic)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return rate, peak


def views_of(img: torch.Tensor, scales: tuple[float, ...]) -> list[torch.Tensor]:
    """The inference views of a CHW image: each scale (rounded as released), then its mirror image."""
    h, w = img.shape[1:]
    views = []
    for s in scales:
        scaled = F.interpolate(img[None], (round(h * s), round(w * s)), mode="bicubic", align_corners=False)[0]
        views += [scaled, scaled.flip(-1)]
    return views


@torch.no_grad()
def released_multiscale_cam(model: nn.Module, views: list[torch.Tensor], label: torch.Tensor,
                            size: tuple[int, int], device: torch.device) -> np.ndarray:
    """The released SBNet inference of one image: every view alone through the full forward,
    its foreground cam_rv upsampled, moved to the CPU, times the label, mirrored back, summed in
    NumPy, then normalised."""
    cams = []
    for i, view in enumerate(views):
        _, cam_rv, _ = model(view[None].to(device))
        cam = F.interpolate(cam_rv[:, 1:], size, mode="bilinear", align_corners=False)[0]
        cam = cam.cpu().numpy() * label.view(-1, 1, 1).numpy()
        cams.append(np.flip(cam, -1) if i % 2 else cam)
    total = np.sum(cams, axis=0)
    total[total < 0] = 0
    cam_max = np.max(total, (1, 2), keepdims=True)
    cam_min = np.min(total, (1, 2), keepdims=True)
    total[total < cam_min + 1e-5] = 0
    # The present classes, in label order, as infer_SB.multiscale_cam returns them.
    return ((total - cam_min - 1e-5) / (cam_max - cam_min + 1e-5))[label.numpy() > 0]


def off_floor_difference(cam: np.ndarray, released: np.ndarray) -> tuple[float, int]:
    """The largest difference between two normalised CAMs away from the released floor, and the
    pixels on it. The released normalisation zeroes a class's minimum before dividing, so its minimum
    pixels end at -min / (max - min), far below 0 when a class is positive everywhere; a rounding
    that moves which pixel is the minimum moves that pixel by the whole floor."""
    floor = (np.isclose(cam, cam.min(axis=(1, 2), keepdims=True))
             | np.isclose(released, released.min(axis=(1, 2), keepdims=True)))
    return float(np.abs(cam - released)[~floor].max()), int(floor.sum())


def inference_rates(width: float, size: tuple[int, int], device: torch.device, images: int,
                    warmup: int) -> list[tuple[str, float, float, int]]:
    """(method, images/s, largest difference to the released CAM off its floor, pixels on the
    floor) of multi-scale CAM inference."""
    torch.manual_seed(0)
    model = resnet38_sb.Net(num_classes=VOC.num_classes, width=width).eval().to(device)
    gen = torch.Generator().manual_seed(1)
    img = torch.randn(3, *size, generator=gen)
    views = views_of(img, infer_SB.SCALES)
    label = torch.zeros(VOC.num_fg)
    label[[4, 14]] = 1

    def ours(amp: bool, channels_last: bool) -> Callable[[], np.ndarray]:
        layout = memory_format(channels_last, device)

        def run() -> np.ndarray:
            model.to(memory_format=layout)
            with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
                return infer_SB.multiscale_cam(model, views, label, size, device, layout)
        return run

    def released() -> np.ndarray:
        model.to(memory_format=torch.contiguous_format)
        return released_multiscale_cam(model, views, label, size, device)

    methods = {"released (per view, batch 1, with boundary branch)": released,
               "ours fp32 (scale + flip batched, no boundary branch)": ours(False, False),
               "ours AMP": ours(True, False), "ours AMP + channels_last": ours(True, True)}
    rows, reference = [], None
    for name, fn in methods.items():
        for _ in range(warmup):
            fn()
        sync(device)
        tic = time.perf_counter()
        for _ in range(images):
            cam = fn()
        sync(device)
        rate = images / (time.perf_counter() - tic)
        reference = cam if reference is None else reference
        rows.append((name, rate, *off_floor_difference(cam, reference)))
    return rows


def seg_inference_rates(backbone: str, width: float, size: tuple[int, int], device: torch.device, images: int,
                        warmup: int) -> list[tuple[str, float, float]]:
    """(mode, images/s, largest difference to the float32 class probabilities) of infer_seg.py's
    network pass: test scale 1 without flip (its defaults), softmax on the device, probabilities to
    the CPU; the CRF (CPU worker processes) not included."""
    torch.manual_seed(0)
    net = make_seg_net(backbone, width).eval().to(device)
    img = torch.randn(3, *size, generator=torch.Generator().manual_seed(1))

    def run(amp: bool, layout: torch.memory_format) -> np.ndarray:
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            return infer_seg.predict_probs(net, img, [1.0], False, device, layout)

    rows, reference = [], None
    for mode, (amp, channels_last) in MODES.items():
        layout = memory_format(channels_last, device)
        net.to(memory_format=layout)
        for _ in range(warmup):
            run(amp, layout)
        sync(device)
        tic = time.perf_counter()
        for _ in range(images):
            probs = run(amp, layout)
        sync(device)
        reference = probs if reference is None else reference
        rows.append((mode, images / (time.perf_counter() - tic), float(np.abs(probs - reference).max())))
    return rows


def batch_label(stage: Stage, batch: int) -> str:
    return f"{batch} x {stage.iter_size}" if stage.iter_size > 1 else str(batch)


def gib(nbytes: float | None) -> str:
    return "n/a (CPU)" if nbytes is None else f"{nbytes / 2**30:.1f} GiB"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}, torch {torch.__version__})"
    return f"CPU: {benchutil.machine()}, torch {torch.__version__}"


def run_benchmark(args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    lines = [f"# GPU benchmark\n\nDevice: {device_name(device)}. Date: {datetime.date.today().isoformat()}.",
             f"ResNet-38 width {args.width} (ResNet-101 at its one width); {args.steps} timed "
             f"updates after {args.warmup} warm-up updates (a batch of N x 2: 2 batches of N accumulated per "
             "update); synthetic batches on the device. Command: `"
             + " ".join(["python bench/bench_gpu.py", *args.argv]) + "`.\n",
             "## Training\n", "| stage | batch | crop | mode | images/s | peak memory | vs fp32 |",
             "|---|---|---|---|---|---|---|"]
    for stage in stages_for(args.seg_backbone):
        batch, crop = args.batch or stage.batch, args.crop or stage.crop
        base = None
        for mode, (amp, channels_last) in MODES.items():
            mode = mode if device.type == "cuda" or mode == "fp32" else f"{mode} (= fp32 off CUDA)"
            try:
                rate, peak = train_rate(stage, args.width, batch, crop, device, amp, channels_last,
                                        args.steps, args.warmup)
            except torch.cuda.OutOfMemoryError:
                lines.append(f"| {stage.name} | {batch_label(stage, batch)} | {crop} | {mode} | out of memory | | |")
                continue
            base = base or rate
            lines.append(f"| {stage.name} | {batch_label(stage, batch)} | {crop} | {mode} | {rate:.2f} | "
                         f"{gib(peak)} | {rate / base:.2f}x |")
            print(lines[-1], flush=True)
    h, w = args.infer_size
    lines += ["", f"## Multi-scale CAM inference (SB network, one {h}x{w} image, scales "
              f"{', '.join(map(str, infer_SB.SCALES))} and flips, CRF not included)\n",
              "The released normalisation leaves each class's minimum pixels at -min / (max - min), far "
              "below 0 for a class positive everywhere; where rounding moves which pixel is the minimum, "
              "that pixel moves by the whole floor, so the difference is taken off the floor pixels, "
              "counted on the right.\n",
              "| method | images/s | vs released | max difference to released CAM | floor pixels |",
              "|---|---|---|---|---|"]
    rows = inference_rates(args.width, (h, w), device, args.images, args.warmup)
    for name, rate, diff, floor in rows:
        lines.append(f"| {name} | {rate:.2f} | {rate / rows[0][1]:.2f}x | {diff:.1e} | {floor} |")
        print(lines[-1], flush=True)
    seg_name = SEG_STAGES[args.seg_backbone].name
    lines += ["", f"## {seg_name} inference (infer_seg.py, one {h}x{w} image, test scale 1, no flip, CRF not "
              "included; the released DeepLab codes run the same single pass)\n",
              "| mode | images/s | vs fp32 | max difference to fp32 probabilities |", "|---|---|---|---|"]
    seg_rows = seg_inference_rates(args.seg_backbone, args.width, (h, w), device, args.images, args.warmup)
    for mode, rate, diff in seg_rows:
        mode = mode if device.type == "cuda" or mode == "fp32" else f"{mode} (= fp32 off CUDA)"
        lines.append(f"| {mode} | {rate:.2f} | {rate / seg_rows[0][1]:.2f}x | {diff:.1e} |")
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


# --- memory estimate without a GPU -----------------------------------------------------------------

def saved_tensor_bytes(stage: Stage, width: float, crop: int) -> list[int]:
    """Bytes of each distinct tensor autograd keeps for the backward pass of one image, in order
    (the parameters, which convolutions save too, left out)."""
    net, model, pack, loss_fn = stage.make(width, 1, crop, torch.device("cpu"))
    net.train()
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss_fn(model, pack)
    return list(seen.values())


def estimate_memory(stage: Stage, width: float, batch: int, crop: int, probe: int = 64) -> dict[str, float]:
    """Training memory at ``batch`` x ``crop`` from two small CPU forwards (``probe`` and 2 x probe
    pixels a side): each saved tensor grows with the pixel count to the power its two sizes show
    (0, 1, or 2 for PCM's pixel-by-pixel affinity), scaled to ``crop`` and times ``batch``; plus
    weights, gradients and SGD momentum in float32; no allocator slack, no cuDNN workspace, no
    transient gradient buffers. What a CPU run saves: against an H200's peaks it came within 2% for
    the SB step, 46% and 20% over for AffinityNet and DeepLab (CUDA's kernels seem to save less)."""
    small, large = saved_tensor_bytes(stage, width, probe), saved_tensor_bytes(stage, width, 2 * probe)
    if len(small) != len(large):
        raise RuntimeError("the two probe sizes saved different tensors")
    activations = 0.0
    for a, b in zip(small, large, strict=True):
        power = round(math.log(b / a, 4)) if a else 0
        activations += a * (crop / probe) ** (2 * power)
    net = stage.make(width, 1, probe, torch.device("cpu"))[0].train()
    params = sum(p.numel() for p in net.parameters())
    trained = sum(p.numel() for group in stage.optimizer(net, 1).param_groups for p in group["params"])
    return {"params": params, "weights_bytes": 4 * (params + 2 * trained), "activation_bytes": activations * batch}


def memory_report(width: float, seg_backbone: str) -> str:
    lines = ["| stage | batch x crop | parameters | weights + grads + momentum | saved activations | total |",
             "|---|---|---|---|---|---|"]
    for stage in stages_for(seg_backbone):
        for batch in (stage.batch, stage.batch // 4):
            est = estimate_memory(stage, width, batch, stage.crop)
            total = est["weights_bytes"] + est["activation_bytes"]
            lines.append(f"| {stage.name} | {batch} x {stage.crop} | {est['params'] / 1e6:.1f} M | "
                         f"{gib(est['weights_bytes'])} | {gib(est['activation_bytes'])} | {gib(total)} |")
            print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def get_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", type=str)
    parser.add_argument("--width", default=1.0, type=float, help="ResNet-38 width (1.0 = the paper)")
    parser.add_argument("--seg_backbone", default="resnet101", choices=sorted(SEG_STAGES),
                        help="DeepLab's network, as train_seg.py's --seg_backbone")
    parser.add_argument("--batch", default=None, type=int, help="override every stage's paper batch")
    parser.add_argument("--crop", default=None, type=int, help="override every stage's paper crop")
    parser.add_argument("--steps", default=10, type=int, help="timed training steps per mode")
    parser.add_argument("--warmup", default=3, type=int, help="untimed steps (and inference images) first")
    parser.add_argument("--images", default=10, type=int, help="timed inference images per method")
    parser.add_argument("--infer_size", default=list(VOC_IMAGE), type=int, nargs=2, metavar=("H", "W"))
    parser.add_argument("--out", default=str(Path(__file__).with_name("GPU.md")), type=str)
    parser.add_argument("--estimate_memory", action="store_true",
                        help="print the training-memory estimate of the paper's sizes (CPU, no GPU needed)")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = get_arg_parser().parse_args(argv)
    args.argv = argv
    if args.estimate_memory:
        memory_report(args.width, args.seg_backbone)
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py: CUDA is not available (use --device cpu to try the code path)")
    table = run_benchmark(args)
    with atomic_path(args.out) as tmp:
        tmp.write_text(table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
