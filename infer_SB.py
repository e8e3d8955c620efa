"""SB step inference: multi-scale CAMs (cam_rv of the SB network, scales 0.5/1/1.5/2 and flips),
their argmax prediction and the dense-CRF refinements with background powers 4 and 24.

    python infer_SB.py --weights resnet38_SB.pth --infer_list voc12/train_aug.txt \
        --out_cam out_cam --out_crf out_crf --out_cam_pred out_cam_pred

Outputs are written atomically. Each output folder records the weights and flags that made it
(``tool.provenance``): with the same ones an image whose outputs all exist is skipped, so a killed
run resumes where it stopped; with other ones the command stops and names ``--overwrite``, which
deletes the old outputs and redoes everything. Under torchrun the list is split over the ranks.
"""
from __future__ import annotations

import argparse
import os
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from network import resnet38_sb
from network.resnet38d import load_weights
from tool import provenance
from tool.cli import add_data_args, add_infer_args, add_model_args, add_sb_model_args, run_main
from tool.crf import crf_with_alpha
from tool.distributed import DistInfo, distributed_session, memory_format, shard
from tool.errors import InputError
from tool.fileio import held_folders, is_valid_scores, save_label_png, save_scores
from tool.logutils import progress, setup_logging
from tool.workers import WorkerLoader, die_with_parent
from voc12.classes import load_classes
from voc12.data import VOC12ClsDatasetMSF, default_label_file, first_item

CRF_ALPHAS = (4, 24)
SCALES = (0.5, 1.0, 1.5, 2.0)
MAX_SIDE = 1280  # the scale-2.0 view of COCO's largest images (640)
UPSAMPLE_ELEMENTS = 1 << 26  # classes x pixels up to which every class is upsampled (COCO's 80 x 640 x 640)


def get_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser)
    add_model_args(parser, weights_required=True)
    add_sb_model_args(parser)
    add_infer_args(parser, infer_list="voc12/train.txt")
    parser.add_argument("--out_cam", default=None, type=str, help="folder of CAM score files (.npz)")
    parser.add_argument("--out_crf", default=None, type=str,
                        help="prefix of the CRF folders: OUT_CRF_4.0 and OUT_CRF_24.0")
    parser.add_argument("--out_cam_pred", default=None, type=str, help="folder of argmax PNGs")
    parser.add_argument("--out_cam_pred_alpha", default=0.26, type=float,
                        help="constant background score of --out_cam_pred: a pixel is background where every "
                             "class's normalised CAM is below it (a score in [0, 1], not a power like the CRF "
                             "and random-walk alphas)")
    parser.add_argument("--crf_alphas", default=list(CRF_ALPHAS), type=float, nargs="+",
                        help="background powers of the CRF outputs (low and high): background (1 - max CAM)^alpha")
    parser.add_argument("--crf_workers", default=2, type=int, help="processes running the dense CRF")
    parser.add_argument("--max_side", default=MAX_SIDE, type=int,
                        help="longer side of the largest view (scale 2.0) the network sees; a larger image is"
                             " shrunk for the network only, CAMs come back at full size (VOC's images, at most"
                             " 500, and COCO's, at most 640, are not); 0: no limit, the released behaviour,"
                             " whose memory grows with the image")
    return parser


def crf_dir(prefix: str, alpha: float) -> Path:
    """The released folder name of a CRF output: PREFIX_4.0, PREFIX_24.0."""
    return Path(f"{prefix}_{alpha:.1f}")


@torch.no_grad()
def multiscale_cam(model: torch.nn.Module, imgs: list[torch.Tensor], label: torch.Tensor,
                   size: tuple[int, int], device: torch.device,
                   layout: torch.memory_format = torch.contiguous_format) -> np.ndarray:
    """Sum of the foreground cam_rv over scales and flips, ReLU, per-class min-max normalised
    (the released formula), times the image label, for the classes present in the label only
    (:func:`present_classes`; an absent one would be -1 everywhere, below a background score in
    [0, 1]): ``(num_present, H, W)`` float32.

    Up to ``UPSAMPLE_ELEMENTS`` (classes x pixels) every class is upsampled to the image, as
    released: torch's CPU kernel rounds a channel differently with another channel count, and so
    VOC's numbers stay bit for bit what they were. A larger image upsamples its present classes only."""
    present = present_classes(label)
    every = label.numel() * size[0] * size[1] <= UPSAMPLE_ELEMENTS
    channels = slice(1, None) if every else torch.from_numpy(present + 1).to(device)
    total = torch.zeros((label.numel() if every else len(present), *size), device=device)
    for i in range(0, len(imgs), 2):
        # A scale and its flip go through the network as one batch of two.
        batch = torch.stack([imgs[i], imgs[i + 1]]).to(device, memory_format=layout)
        cam_rv = model(batch, with_edge=False).cam_rv
        cam = F.interpolate(cam_rv[:, channels], size, mode="bilinear", align_corners=False)
        total += cam[0] + cam[1].flip(-1)
    if every:
        total = total[present]
    total = (total * label[present].to(device).view(-1, 1, 1)).cpu().numpy()
    total[total < 0] = 0
    cam_max = total.max(axis=(1, 2), keepdims=True)
    cam_min = total.min(axis=(1, 2), keepdims=True)
    total[total < cam_min + 1e-5] = 0
    return ((total - cam_min - 1e-5) / (cam_max - cam_min + 1e-5)).astype(np.float32)


def present_classes(label: torch.Tensor) -> np.ndarray:
    """Indices (0-based foreground) of the classes an image-level label holds."""
    return np.nonzero(label.numpy() > 1e-5)[0]


def crf_outputs(img: np.ndarray, labels: np.ndarray, cams: np.ndarray,
                alphas: list[float]) -> list[tuple[np.ndarray, np.ndarray]]:
    """CRF score maps for each background power (runs in a worker process)."""
    return [crf_with_alpha(img, labels, cams, alpha) for alpha in alphas]


def outputs_done(name: str, args: argparse.Namespace) -> bool:
    paths = []
    if args.out_cam:
        paths.append(Path(args.out_cam) / f"{name}.npz")
    if args.out_crf:
        paths += [crf_dir(args.out_crf, a) / f"{name}.npz" for a in args.crf_alphas]
    done = all(is_valid_scores(p) for p in paths)
    return done and (not args.out_cam_pred or (Path(args.out_cam_pred) / f"{name}.png").is_file())


def output_folders(args: argparse.Namespace, use_amp: bool) -> dict[Path, tuple[dict, str]]:
    """Each output folder with its provenance record and its files' suffix."""
    label_file = args.label_file or default_label_file(args.infer_list)
    base = provenance.describe(__file__, weights=args.weights, inputs=[label_file, args.dataset_classes], flags={
        "backbone_width": args.backbone_width, "canny_on_rgb": args.canny_on_rgb, "scales": SCALES,
        "amp": use_amp, "max_side": args.max_side, "voc12_root": str(Path(args.voc12_root).resolve())})
    folders = {}
    if args.out_cam:
        folders[Path(args.out_cam)] = ({**base, "output": "cam"}, ".npz")
    if args.out_crf:
        for alpha in args.crf_alphas:
            folders[crf_dir(args.out_crf, alpha)] = ({**base, "output": "crf", "crf_alpha": alpha}, ".npz")
    if args.out_cam_pred:
        folders[Path(args.out_cam_pred)] = ({**base, "output": "cam_pred",
                                             "background_score": args.out_cam_pred_alpha}, ".png")
    return folders


def infer(args: argparse.Namespace, info: DistInfo) -> None:
    logger = setup_logging(None, info)
    classes = load_classes(args.dataset_classes)
    model = resnet38_sb.Net(num_classes=classes.num_classes, width=args.backbone_width,
                            canny_on_rgb=args.canny_on_rgb)
    load_weights(model, args.weights, strict=True)
    layout = memory_format(args.channels_last, info.device)
    model = model.to(info.device, memory_format=layout).eval()

    dataset = VOC12ClsDatasetMSF(args.infer_list, args.voc12_root,
                                 args.label_file or default_label_file(args.infer_list), classes, scales=SCALES,
                                 max_side=args.max_side)
    use_amp = args.amp and info.device.type == "cuda"
    skip_finished = all([provenance.claim_outputs(folder, record, overwrite=args.overwrite, suffix=suffix,
                                                  names=dataset.names, info=info)
                         for folder, (record, suffix) in output_folders(args, use_amp).items()])
    todo = [i for i in shard(list(range(len(dataset))), info)
            if not (skip_finished and outputs_done(dataset.names[i], args))]
    logger.info("%d of %d images to infer on rank %d", len(todo), len(dataset), info.rank)
    loader = WorkerLoader(torch.utils.data.Subset(dataset, todo), batch_size=1, collate_fn=first_item,
                          num_workers=args.num_workers)
    pending: list[tuple[str, Future]] = []
    with ProcessPoolExecutor(max_workers=max(args.crf_workers, 1), initializer=die_with_parent,
                             initargs=(os.getpid(),)) as pool:
        for pack in progress(loader, info, desc="infer_SB"):
            name = pack["name"]
            with torch.autocast("cuda", enabled=use_amp):
                cams = multiscale_cam(model, pack["img"], pack["label"], tuple(pack["size"]), info.device, layout)
            labels = present_classes(pack["label"]) + 1
            if args.out_cam:
                save_scores(Path(args.out_cam) / f"{name}.npz", labels, cams)
            if args.out_cam_pred:
                bg = np.full((1, *cams.shape[1:]), args.out_cam_pred_alpha, np.float32)
                save_label_png(Path(args.out_cam_pred) / f"{name}.png",
                               np.concatenate([[0], labels])[np.argmax(np.concatenate([bg, cams]), 0)])
            if args.out_crf:
                pending.append((name, pool.submit(crf_outputs, pack["orig"], labels, cams, args.crf_alphas)))
            while pending and (pending[0][1].done() or len(pending) > 4 * max(args.crf_workers, 1)):
                write_crf(*pending.pop(0), args)
        for item in pending:
            write_crf(*item, args)


def write_crf(name: str, future: Future, args: argparse.Namespace) -> None:
    for alpha, (labels, scores) in zip(args.crf_alphas, future.result(), strict=True):
        save_scores(crf_dir(args.out_crf, alpha) / f"{name}.npz", labels, scores)


def run(args: argparse.Namespace) -> None:
    """Infer CAMs and CRFs for the list (this rank's share under torchrun)."""
    if not (args.out_cam or args.out_crf or args.out_cam_pred):
        raise InputError("nothing to write: pass --out_cam, --out_crf and/or --out_cam_pred")
    with distributed_session(args.device) as info, held_folders():
        return infer(args, info)


def main(argv: list[str] | None = None) -> None:
    run_main(run, get_arg_parser(), argv)


if __name__ == "__main__":
    main()
