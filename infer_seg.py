"""Final segmentation network inference: MSC logits (optionally more scales and flips), softmax,
DeepLab's dense CRF, palette PNGs.

    python infer_seg.py --voc12_root VOC2012 --weights deeplabv2_rw.pth --infer_list voc12/val.txt \
        --out_dir out_seg
    python infer_seg.py --voc12_root VOC2012 --weights deeplabv2_rw.pth --infer_list voc12/test.txt \
        --out_dir submission --server_layout      # results/VOC2012/Segmentation/comp6_test_cls + tar

PNGs are written atomically. Each output folder records the weights and the flags that made it
(``tool.provenance``): with the same ones an image whose outputs exist is skipped (a killed run
resumes), with other ones the command stops and names ``--overwrite``. Under torchrun the list is
split over the ranks.

The CRF's bilateral term compares colours. deeplab-pytorch (the ResNet-101 recipe) gives it the
network's input, the BGR image minus the caffe mean, cast to uint8 (negative values wrap); that is
the default for ``--seg_backbone resnet101`` and ``--crf_on_rgb`` gives it the real image. SEAM's
codebase (``resnet38``) gives it the real image.
"""
from __future__ import annotations

import argparse
import os
import tarfile
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from network import segmentation
from network.deeplab_v2 import caffe_input
from tool import imutils, provenance
from tool.cli import add_data_args, add_infer_args, add_model_args, add_seg_model_args, run_main, str2bool
from tool.crf import DEEPLAB_CRF, crf_inference
from tool.distributed import DistInfo, distributed_session, memory_format, shard
from tool.errors import InputError
from tool.fileio import atomic_path, held_folders, save_label_png
from tool.logutils import progress, setup_logging
from tool.workers import WorkerLoader, die_with_parent
from voc12.classes import load_classes
from voc12.data import VOC12ImageDataset, first_item

CRF_ITERATIONS = 10
SERVER_DIR = Path("results/VOC2012/Segmentation/comp6_test_cls")
SERVER_TAR = "results.tar"


def get_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser)
    add_model_args(parser, weights_required=True)
    add_seg_model_args(parser)
    add_infer_args(parser, infer_list="voc12/val.txt")
    parser.add_argument("--out_dir", required=True, type=str,
                        help="label PNGs (after the CRF unless --crf False); with --server_layout the submission root")
    parser.add_argument("--out_raw_dir", default=None, type=str, help="also the network's argmax PNGs, before the CRF")
    parser.add_argument("--crf", default=True, type=str2bool, help="dense CRF on the softmax (default True)")
    parser.add_argument("--test_scales", default=[1.0], type=float, nargs="+",
                        help="input scales whose logits are averaged (each through the MSC network)")
    parser.add_argument("--flip", action="store_true", help="also average the mirrored input's logits")
    parser.add_argument("--server_layout", action="store_true",
                        help=f"write OUT_DIR/{SERVER_DIR}/NAME.png and OUT_DIR/{SERVER_TAR} for the VOC test server")
    parser.add_argument("--crf_on_rgb", action="store_true",
                        help="the CRF compares the real image's colours; by default (resnet101) it sees the "
                             "caffe mean-subtracted BGR input cast to uint8, as deeplab-pytorch's does")
    parser.add_argument("--crf_workers", default=2, type=int, help="processes running the dense CRF")
    return parser


@torch.no_grad()
def predict_probs(model: torch.nn.Module, img: torch.Tensor, scales: list[float], flip: bool,
                  device: torch.device, layout: torch.memory_format = torch.contiguous_format) -> np.ndarray:
    """Softmax of the logits averaged over scales (and mirror images), each upsampled to the image
    (bilinear, align_corners False): ``(num_classes, H, W)`` float32."""
    h, w = img.shape[-2:]
    total = None
    for scale in scales:
        x = img[None].to(device, memory_format=layout)
        if scale != 1:
            x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", align_corners=False)
        if flip:
            x = torch.cat([x, x.flip(-1)])
        logits = F.interpolate(model(x).float(), size=(h, w), mode="bilinear", align_corners=False)
        summed = logits[0] + logits[1].flip(-1) if flip else logits[0]
        total = summed if total is None else total + summed
    views = len(scales) * (2 if flip else 1)
    return torch.softmax(total / views, dim=0).cpu().numpy()


def crf_image_kind(args: argparse.Namespace) -> str:
    """What the CRF's bilateral term sees: ``released`` (deeplab-pytorch's wrapped mean-subtracted
    BGR) or ``rgb``."""
    return "released" if args.seg_backbone == "resnet101" and not args.crf_on_rgb else "rgb"


def crf_image(img: np.ndarray, kind: str) -> np.ndarray:
    """The uint8 ``(H, W, 3)`` image the CRF compares colours of, from the RGB image ``img``."""
    return imutils.released_uint8_cast(caffe_input(img)) if kind == "released" else img


def crf_label(img: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Argmax after DeepLab's CRF (runs in a worker process)."""
    return np.argmax(crf_inference(img, probs, t=CRF_ITERATIONS, **DEEPLAB_CRF), axis=0).astype(np.uint8)


def pred_dir(args: argparse.Namespace) -> Path:
    return Path(args.out_dir) / SERVER_DIR if args.server_layout else Path(args.out_dir)


def outputs_done(name: str, args: argparse.Namespace) -> bool:
    paths = [pred_dir(args) / f"{name}.png"] + ([Path(args.out_raw_dir) / f"{name}.png"] if args.out_raw_dir else [])
    return all(p.is_file() for p in paths)


def output_folders(args: argparse.Namespace, use_amp: bool) -> dict[Path, dict]:
    """Each output folder with its provenance record."""
    base = provenance.describe(__file__, weights=args.weights, inputs=[args.dataset_classes], flags={
        "seg_backbone": args.seg_backbone, "seg_input": args.seg_input or segmentation.DEFAULT_INPUT[args.seg_backbone],
        "backbone_width": args.backbone_width, "test_scales": args.test_scales, "flip": args.flip, "amp": use_amp,
        "voc12_root": str(Path(args.voc12_root).resolve())})
    folders = {pred_dir(args): {**base, "output": "label", "crf": args.crf,
                                "crf_image": crf_image_kind(args) if args.crf else None}}
    if args.out_raw_dir:
        folders[Path(args.out_raw_dir)] = {**base, "output": "raw"}
    return folders


def write_server_tar(out_dir: Path, names: list[str]) -> Path:
    """Tar the submission folder (``results/...``) into OUT_DIR/results.tar, atomically."""
    folder = out_dir / SERVER_DIR
    missing = next((n for n in names if not (folder / f"{n}.png").is_file()), None)
    if missing is not None:
        raise InputError(f"no prediction for {missing} in {folder}; run inference on the whole list first")
    tar_path = out_dir / SERVER_TAR
    with atomic_path(tar_path) as tmp, tarfile.open(tmp, "w") as tar:
        for name in names:
            tar.add(folder / f"{name}.png", arcname=str(SERVER_DIR / f"{name}.png"))
    return tar_path


def infer(args: argparse.Namespace, info: DistInfo) -> Path | None:
    logger = setup_logging(None, info)
    classes = load_classes(args.dataset_classes)
    net = segmentation.make_net(args.seg_backbone, classes.num_classes, width=args.backbone_width)
    segmentation.load_weights(net, args.weights, strict=True)
    layout = memory_format(args.channels_last, info.device)
    model = net.to(info.device, memory_format=layout).eval()
    normalize = segmentation.input_normalizer(args.seg_backbone, args.seg_input)

    dataset = VOC12ImageDataset(args.infer_list, args.voc12_root)
    use_amp = args.amp and info.device.type == "cuda"
    folders = output_folders(args, use_amp)
    if len(folders) < 1 + bool(args.out_raw_dir):
        raise InputError("--out_raw_dir must differ from the folder of the labels (--out_dir)")
    skip_finished = all([provenance.claim_outputs(folder, record, overwrite=args.overwrite, suffix=".png",
                                                  names=dataset.names, info=info)
                         for folder, record in folders.items()])
    todo = [i for i in shard(list(range(len(dataset))), info)
            if not (skip_finished and outputs_done(dataset.names[i], args))]
    logger.info("%d of %d images to infer on rank %d", len(todo), len(dataset), info.rank)
    loader = WorkerLoader(torch.utils.data.Subset(dataset, todo), batch_size=1, collate_fn=first_item,
                          num_workers=args.num_workers)
    out = pred_dir(args)
    pending: list[tuple[str, Future]] = []
    kind = crf_image_kind(args)
    with ProcessPoolExecutor(max_workers=max(args.crf_workers, 1), initializer=die_with_parent,
                             initargs=(os.getpid(),)) as pool:
        for pack in progress(loader, info, desc="infer_seg"):
            name, img = pack["name"], pack["orig"]
            net_img = torch.from_numpy(imutils.hwc_to_chw(normalize(img)))
            with torch.autocast("cuda", enabled=use_amp):
                probs = predict_probs(model, net_img, args.test_scales, args.flip, info.device, layout)
            raw = np.argmax(probs, axis=0).astype(np.uint8)
            if args.out_raw_dir:
                save_label_png(Path(args.out_raw_dir) / f"{name}.png", raw)
            if not args.crf:
                save_label_png(out / f"{name}.png", raw)
                continue
            pending.append((name, pool.submit(crf_label, crf_image(img, kind), probs)))
            while pending and (pending[0][1].done() or len(pending) > 4 * max(args.crf_workers, 1)):
                done_name, future = pending.pop(0)
                save_label_png(out / f"{done_name}.png", future.result())
        for done_name, future in pending:
            save_label_png(out / f"{done_name}.png", future.result())
    if not args.server_layout:
        return None
    if info.distributed:
        torch.distributed.barrier()
    if not info.is_main:
        return None
    tar_path = write_server_tar(Path(args.out_dir), dataset.names)
    logger.info("wrote %s (%d PNGs): upload it to the VOC evaluation server", tar_path, len(dataset))
    return tar_path


def run(args: argparse.Namespace) -> Path | None:
    """Infer the list (this rank's share under torchrun); return the tar with --server_layout."""
    with distributed_session(args.device) as info, held_folders():
        return infer(args, info)


def main(argv: list[str] | None = None) -> None:
    run_main(run, get_arg_parser(), argv)


if __name__ == "__main__":
    main()
