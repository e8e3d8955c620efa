"""Random-walk step inference: propagate the SB CAMs with AffinityNet's transition matrix.

    python infer_aff.py --weights resnet38_aff.pth --infer_list voc12/train.txt \
        --cam_dir out_cam --out_rw out_rw

Each prediction is a VOC-palette PNG written atomically. The output folder records the weights,
the CAM folder's own record and the flags that made it (``tool.provenance``): with the same ones
existing PNGs are skipped (a killed run resumes), with other ones the command stops and names
``--overwrite``. Under torchrun the list is split over the ranks.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from network import resnet38_aff
from network.resnet38d import load_weights
from tool import provenance
from tool.cli import add_aff_model_args, add_data_args, add_infer_args, add_model_args, run_main, str2bool
from tool.crf import background_score, crf_inference
from tool.distributed import DistInfo, distributed_session, memory_format, shard
from tool.errors import InputError
from tool.fileio import find_array_file, held_folders, load_scores, save_label_png
from tool.logutils import progress, setup_logging
from tool.randomwalk import propagate
from tool.workers import WorkerLoader
from voc12.classes import load_classes
from voc12.data import VOC12ImageDataset, first_item

FEATURE_STRIDE = 8


def get_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser)
    add_model_args(parser, weights_required=True)
    add_aff_model_args(parser)
    add_infer_args(parser, infer_list="voc12/val.txt")
    parser.add_argument("--cam_dir", required=True, type=str, help="CAM score files of infer_SB.py")
    parser.add_argument("--out_rw", default="out_rw", type=str)
    parser.add_argument("--alpha", default=6, type=float, help="background power (1 - max CAM)^alpha")
    parser.add_argument("--beta", default=8, type=float, help="affinity power")
    parser.add_argument("--logt", default=6, type=int, help="the walk takes 2^logt steps")
    parser.add_argument("--crf", default=False, type=str2bool, help="dense CRF on the walk's scores")
    return parser


def cam_with_background(cam_file: Path, size: tuple[int, int], num_classes: int, alpha: float,
                        allow_pickle: bool) -> np.ndarray:
    """``(num_classes, H, W)`` scores: the CAM's classes, background (1 - max)^alpha."""
    labels, cams = load_scores(cam_file, allow_pickle=allow_pickle, released_cam=True)
    full = np.zeros((num_classes, *size), np.float32)
    if labels.size:
        if cams.shape[1:] != tuple(size):
            raise InputError(f"{cam_file}: CAM of size {cams.shape[1:]} for an image of size {tuple(size)}")
        full[labels] = cams
    full[0] = background_score(full[1:], alpha)[0]
    return full


@torch.no_grad()
def random_walk(model: torch.nn.Module, img: torch.Tensor, scores: np.ndarray, args: argparse.Namespace,
                device: torch.device) -> torch.Tensor:
    """Walk scores at 1/8 resolution, upsampled to the padded image: ``(C, Hp, Wp)``. With ``--amp``
    AffinityNet runs in mixed precision; its affinities (an exp, autocast's float32) and the walk
    stay in the scores' precision."""
    h, w = img.shape[-2:]
    pad_h, pad_w = -h % FEATURE_STRIDE, -w % FEATURE_STRIDE
    img = F.pad(img[None], (0, pad_w, 0, pad_h)).to(device, memory_format=memory_format(args.channels_last, device))
    cam = F.pad(torch.from_numpy(scores), (0, pad_w, 0, pad_h))
    cam = F.avg_pool2d(cam, FEATURE_STRIDE, FEATURE_STRIDE).to(device)
    with torch.autocast(device.type, enabled=args.amp and device.type == "cuda"):
        aff = model(img)[0]
    walked = propagate(cam, aff, beta=args.beta, logt=args.logt, radius=args.radius)
    return F.interpolate(walked[None], img.shape[-2:], mode="bilinear", align_corners=False)[0]


def infer(args: argparse.Namespace, info: DistInfo) -> None:
    logger = setup_logging(None, info)
    classes = load_classes(args.dataset_classes)
    model = resnet38_aff.Net(width=args.backbone_width, radius=args.radius)
    load_weights(model, args.weights, strict=True)
    model = model.to(info.device, memory_format=memory_format(args.channels_last, info.device)).eval()

    dataset = VOC12ImageDataset(args.infer_list, args.voc12_root, normalize=True)
    out_dir = Path(args.out_rw)
    record = provenance.describe(__file__, weights=args.weights, inputs=[args.dataset_classes],
                                 flags={"backbone_width": args.backbone_width, "radius": args.radius,
                                        "alpha": args.alpha, "beta": args.beta, "logt": args.logt, "crf": args.crf,
                                        "voc12_root": str(Path(args.voc12_root).resolve()),
                                        "cam_dir": str(Path(args.cam_dir).resolve()),
                                        "cam_provenance": provenance.folder_digest(args.cam_dir)})
    skip_finished = provenance.claim_outputs(out_dir, record, overwrite=args.overwrite, suffix=".png",
                                             names=dataset.names, info=info)
    todo = [i for i in shard(list(range(len(dataset))), info)
            if not (skip_finished and (out_dir / f"{dataset.names[i]}.png").is_file())]
    logger.info("%d of %d images to walk on rank %d", len(todo), len(dataset), info.rank)
    loader = WorkerLoader(torch.utils.data.Subset(dataset, todo), batch_size=1, collate_fn=first_item,
                          num_workers=args.num_workers)
    for pack in progress(loader, info, desc="infer_aff"):
        name, img = pack["name"], pack["img"]
        h, w = img.shape[-2:]
        scores = cam_with_background(find_array_file(args.cam_dir, name), (h, w), classes.num_classes, args.alpha,
                                     args.allow_pickle)
        walked = random_walk(model, img, scores, args, info.device).cpu().numpy()
        if args.crf:
            rgb = np.ascontiguousarray(pack["orig"])
            padded = np.zeros((walked.shape[1], walked.shape[2], 3), np.uint8)
            padded[:h, :w] = rgb
            walked = crf_inference(padded, walked, t=1, labels=walked.shape[0])
        save_label_png(out_dir / f"{name}.png", np.argmax(walked, 0)[:h, :w])


def run(args: argparse.Namespace) -> None:
    """Random-walk the CAMs of the list (this rank's share under torchrun)."""
    with distributed_session(args.device) as info, held_folders():
        return infer(args, info)


def main(argv: list[str] | None = None) -> None:
    run_main(run, get_arg_parser(), argv)


if __name__ == "__main__":
    main()
