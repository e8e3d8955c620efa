"""SB step: train the ResNet-38 classifier with SEAM's equivariance losses, the semantic boundary
branch and the boundary-aware smoothness loss.

    python train_SB.py --voc12_root VOC2012 --weights ilsvrc-cls_rna-a1_cls1000_ep-0001.params \
        --session_name resnet38_SB

Both boundary weights at 0 give the SEAM baseline, which needs no boundary maps.
Launch with ``torchrun --nproc_per_node N train_SB.py ...`` for DistributedDataParallel.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from network import resnet38_sb
from network.resnet38d import load_weights
from tool.cli import add_data_args, add_model_args, add_sb_model_args, add_train_args, run_main
from tool.distributed import DistInfo, distributed_session, memory_format, wrap_model
from tool.logutils import setup_logging
from tool.losses import sb_step_loss
from tool.trainloop import fit, make_poly_optimizer, make_train_loader, resume_state
from tool.visualization import cam_picture
from voc12.classes import load_classes
from voc12.data import VOC12ClsDataset, default_label_file

VIEW2_SCALE = 0.3


class TwoViews(torch.nn.Module):
    """The image and its 0.3x copy through the same network in one call, so that
    DistributedDataParallel sees one forward per backward. ``with_edge=False`` skips the boundary
    branch (its outputs are ``None``)."""

    def __init__(self, net: torch.nn.Module, scale: float = VIEW2_SCALE, with_edge: bool = True) -> None:
        super().__init__()
        self.net = net
        self.scale = scale
        self.with_edge = with_edge

    def forward(self, img1: torch.Tensor) -> tuple[resnet38_sb.SBOutput, resnet38_sb.SBOutput]:
        img2 = F.interpolate(img1, scale_factor=self.scale, mode="bilinear", align_corners=True)
        return self.net(img1, with_edge=self.with_edge), self.net(img2, with_edge=self.with_edge)


def get_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser)
    add_model_args(parser, weights_required=False)
    add_sb_model_args(parser)
    add_train_args(parser, session_name="resnet38_SEAM", max_epoches=100)
    g = parser.add_argument_group("SB method")
    g.add_argument("--sb_map_dir", default=None, type=str, help="boundary maps (default: VOC12_ROOT/sb_map)")
    g.add_argument("--boundary_weight", default=0.01, type=float, help="weight of the boundary BCE")
    g.add_argument("--smooth_weight", default=1.0, type=float, help="weight of the smoothness loss")
    g.add_argument("--resize_long", default=(448, 768), type=int, nargs=2, metavar=("MIN", "MAX"),
                   help="random resize of the long side before cropping")
    return parser


def train(args: argparse.Namespace, info: DistInfo) -> Path:
    logger = setup_logging(args.session_name + ".log", info)
    logger.info("%s", vars(args))
    torch.manual_seed(args.seed)
    classes = load_classes(args.dataset_classes)
    use_sb_maps = args.boundary_weight > 0 or args.smooth_weight > 0

    model = resnet38_sb.Net(num_classes=classes.num_classes, width=args.backbone_width,
                            freeze_bn=not args.train_bn, canny_on_rgb=args.canny_on_rgb)
    if args.weights:
        kept = load_weights(model, args.weights, strict=False)
        logger.info("initialised from %s; %d entries keep their own init", args.weights, len(kept))
    # Only the boundary loss reads the boundary branch: without it (the SEAM baseline) the branch
    # neither runs nor trains, which also keeps DistributedDataParallel free of unused parameters.
    with_edge = args.boundary_weight > 0
    if not with_edge:
        model.not_training += [model.edge_layer, model.fuse_canny_edge]
    dataset = VOC12ClsDataset(
        args.train_list, args.voc12_root, args.label_file or default_label_file(args.train_list), classes,
        crop_size=args.crop_size, resize_long=tuple(args.resize_long),
        sb_map_dir=(args.sb_map_dir or str(Path(args.voc12_root) / "sb_map")) if use_sb_maps else None,
        seed=args.seed)
    sampler, loader = make_train_loader(dataset, args, info)
    optimizer = make_poly_optimizer(model, args, sampler)
    model.train()  # freezes layers: DistributedDataParallel must see their requires_grad=False
    layout = memory_format(args.channels_last, info.device)
    model = model.to(info.device, memory_format=layout)
    # After the move: the optimiser state loads onto its parameters' device.
    start = resume_state(args, model, optimizer)
    views = wrap_model(TwoViews(model, with_edge=with_edge), info)

    def step_fn(two_views: torch.nn.Module, pack: dict):
        label = pack["label"].to(info.device, non_blocking=True)
        sb_map = pack["sb_map"].to(info.device, non_blocking=True) if use_sb_maps else None
        out1, out2 = two_views(pack["img"].to(info.device, non_blocking=True, memory_format=layout))
        losses = sb_step_loss(out1, out2, label, sb_map, scale=VIEW2_SCALE,
                              boundary_weight=args.boundary_weight, smooth_weight=args.smooth_weight)
        return losses, out1

    def picture_fn(pack: dict, out1) -> np.ndarray:
        return cam_picture(pack["img"][0], out1.cam_rv[0].detach(), pack["label"][0])

    return fit(args=args, info=info, model=views, optimizer=optimizer, loader=loader, sampler=sampler,
               step_fn=step_fn, logger=logger, picture_fn=picture_fn, start=start, net=model)


def run(args: argparse.Namespace) -> Path:
    """Train the SB network (one process, or one rank under torchrun)."""
    with distributed_session(args.device) as info:
        return train(args, info)


def main(argv: list[str] | None = None) -> None:
    run_main(run, get_arg_parser(), argv)


if __name__ == "__main__":
    main()
