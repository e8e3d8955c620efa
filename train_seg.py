"""Final segmentation network: DeepLab trained on the pseudo labels (the random-walk PNGs).

    python train_seg.py --voc12_root VOC2012 --train_list voc12/train_aug.txt --label_dir out_rw \
        --weights deeplabv1_resnet101-coco.pth --session_name deeplabv2_rw

Defaults are deeplab-pytorch's VOC recipe (configs/voc12.yaml): DeepLab-v2 ResNet-101 MSC, 20,000
iterations of 5 images x 2 accumulated, crop 321, scales 0.5..1.5, lr 2.5e-4 (x10 ASPP weights,
x20 ASPP biases), momentum 0.9, poly 0.9 updated every 10 iterations, BatchNorm frozen.
``--seg_backbone resnet38`` trains DeepLab-v1 on ResNet-38 (SEAM's codebase) from the ImageNet
``.params`` or an SB checkpoint. Launch with ``torchrun --nproc_per_node N train_seg.py ...``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from network import segmentation
from network.deeplab_v1_resnet38 import HEAD_BN_MOMENTUM
from tool.cli import add_data_args, add_model_args, add_seg_model_args, add_train_args, run_main
from tool.distributed import DistInfo, distributed_session, memory_format, wrap_model
from tool.errors import InputError
from tool.logutils import setup_logging
from tool.losses import segmentation_loss
from tool.torchutils import PolyOptimizer
from tool.trainloop import fit_iterations, make_train_loader, resume_state
from voc12.classes import load_classes
from voc12.data import VOC12SegDataset

SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)


def get_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser)
    add_model_args(parser, weights_required=False)
    add_seg_model_args(parser)
    add_train_args(parser, session_name="deeplab_seg", max_epoches=None, crop_size=321)
    parser.set_defaults(batch_size=5, lr=2.5e-4, momentum=0.9, log_every=10)
    g = parser.add_argument_group("segmentation training")
    g.add_argument("--label_dir", required=True, type=str, help="label PNGs of the training list (255 = ignored)")
    g.add_argument("--max_iters", default=20000, type=int)
    g.add_argument("--iter_size", default=2, type=int, help="batches accumulated per iteration")
    g.add_argument("--lr_step", default=10, type=int, help="iterations between poly learning-rate updates")
    g.add_argument("--scales", default=list(SCALES), type=float, nargs="+", help="random scales of the image")
    g.add_argument("--balanced_ce", action="store_true",
                   help="background/foreground balanced cross-entropy (ImageNet-initialised runs need it)")
    g.add_argument("--head_bn_momentum", default=HEAD_BN_MOMENTUM, type=float,
                   help="momentum of the resnet38 head's BatchNorm (SEAM's codebase: 3e-4)")
    g.add_argument("--save_every", default=1000, type=int, help="iterations between checkpoints")
    return parser


def make_optimizer(net: torch.nn.Module, args: argparse.Namespace) -> PolyOptimizer:
    """SGD over the network's lr groups (multiples of --lr; no weight decay where the group says so),
    poly schedule over --max_iters updated every --lr_step iterations."""
    groups = [{"params": g["params"], "lr": args.lr * g["lr_mult"], "weight_decay": args.wt_dec if g["decay"] else 0}
              for g in net.get_parameter_groups() if g["params"]]
    return PolyOptimizer(groups, lr=args.lr, weight_decay=args.wt_dec, max_step=args.max_iters,
                         momentum=args.momentum, step_size=args.lr_step)


def train(args: argparse.Namespace, info: DistInfo) -> Path:
    logger = setup_logging(args.session_name + ".log", info)
    logger.info("%s", vars(args))
    torch.manual_seed(args.seed)
    classes = load_classes(args.dataset_classes)
    net = segmentation.make_net(args.seg_backbone, classes.num_classes, width=args.backbone_width,
                                train_bn=args.train_bn, head_bn_momentum=args.head_bn_momentum)
    if args.weights:
        kept = segmentation.load_weights(net, args.weights, strict=False)
        logger.info("initialised from %s; %d entries keep their own init%s", args.weights, len(kept),
                    f" (first: {kept[0]})" if kept else "")
    else:
        logger.warning("no --weights: the network starts from random init")
    dataset = VOC12SegDataset(args.train_list, args.voc12_root, args.label_dir, classes.num_classes,
                              segmentation.input_normalizer(args.seg_backbone, args.seg_input),
                              crop_size=args.crop_size, scales=tuple(args.scales), seed=args.seed)
    sampler, loader = make_train_loader(dataset, args, info)
    net.train()  # freezes BatchNorm: DistributedDataParallel must see their requires_grad=False
    optimizer = make_optimizer(net, args)
    layout = memory_format(args.channels_last, info.device)
    net = net.to(info.device, memory_format=layout)
    # After the move: the optimiser state loads onto its parameters' device.
    start = resume_state(args, net, optimizer)
    model = wrap_model(net, info)

    def step_fn(model: torch.nn.Module, pack: dict):
        outputs = model(pack["img"].to(info.device, non_blocking=True, memory_format=layout))
        label = pack["label"].to(info.device, non_blocking=True)
        return {"loss": segmentation_loss(outputs, label, balanced=args.balanced_ce)}, outputs

    return fit_iterations(args=args, info=info, model=model, optimizer=optimizer, loader=loader, sampler=sampler,
                          step_fn=step_fn, logger=logger, start=start, net=net)


def run(args: argparse.Namespace) -> Path:
    """Train the segmentation network (one process, or one rank under torchrun)."""
    if args.iter_size < 1 or args.max_iters < 1:
        raise InputError("--iter_size and --max_iters must be at least 1")
    with distributed_session(args.device) as info:
        return train(args, info)


def main(argv: list[str] | None = None) -> None:
    run_main(run, get_arg_parser(), argv)


if __name__ == "__main__":
    main()
