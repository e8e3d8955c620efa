"""Random-walk step: train AffinityNet on the pair labels of the two CRF outputs of infer_SB.py.

    python train_aff.py --voc12_root VOC2012 --weights ilsvrc-cls_rna-a1_cls1000_ep-0001.params \
        --la_crf_dir out_crf_4.0 --ha_crf_dir out_crf_24.0 --session_name resnet38_aff

Launch with ``torchrun --nproc_per_node N train_aff.py ...`` for DistributedDataParallel.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from network import resnet38_aff
from network.resnet38d import load_weights
from tool.cli import add_aff_model_args, add_data_args, add_model_args, add_train_args, run_main
from tool.distributed import DistInfo, distributed_session, memory_format, wrap_model
from tool.logutils import setup_logging
from tool.losses import affinity_loss
from tool.trainloop import fit, make_poly_optimizer, make_train_loader, resume_state
from voc12.data import VOC12AffDataset


def get_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser)
    add_model_args(parser, weights_required=False)
    add_train_args(parser, session_name="resnet38_aff", max_epoches=8)
    parser.add_argument("--la_crf_dir", required=True, type=str, help="CRF outputs with the low background power")
    parser.add_argument("--ha_crf_dir", required=True, type=str, help="CRF outputs with the high background power")
    add_aff_model_args(parser)
    return parser


def train(args: argparse.Namespace, info: DistInfo) -> Path:
    logger = setup_logging(args.session_name + ".log", info)
    logger.info("%s", vars(args))
    torch.manual_seed(args.seed)

    model = resnet38_aff.Net(width=args.backbone_width, freeze_bn=not args.train_bn, radius=args.radius)
    if args.weights:
        kept = load_weights(model, args.weights, strict=False)
        logger.info("initialised from %s; %d entries keep their own init", args.weights, len(kept))
    dataset = VOC12AffDataset(args.train_list, args.voc12_root, args.la_crf_dir, args.ha_crf_dir,
                              crop_size=args.crop_size, radius=args.radius, seed=args.seed,
                              allow_pickle=args.allow_pickle)
    sampler, loader = make_train_loader(dataset, args, info)
    optimizer = make_poly_optimizer(model, args, sampler)
    model.train()  # freezes layers: DistributedDataParallel must see their requires_grad=False
    layout = memory_format(args.channels_last, info.device)
    model = model.to(info.device, memory_format=layout)
    # After the move: the optimiser state loads onto its parameters' device.
    start = resume_state(args, model, optimizer)
    model = wrap_model(model, info)

    def step_fn(net: torch.nn.Module, pack: dict):
        aff = net(pack["img"].to(info.device, non_blocking=True, memory_format=layout))
        labels = [pack[k].to(info.device, non_blocking=True) for k in ("aff_bg", "aff_fg", "aff_neg")]
        return affinity_loss(aff, *labels), aff

    return fit(args=args, info=info, model=model, optimizer=optimizer, loader=loader, sampler=sampler,
               step_fn=step_fn, logger=logger, start=start)


def run(args: argparse.Namespace) -> Path:
    """Train AffinityNet (one process, or one rank under torchrun)."""
    with distributed_session(args.device) as info:
        return train(args, info)


def main(argv: list[str] | None = None) -> None:
    run_main(run, get_arg_parser(), argv)


if __name__ == "__main__":
    main()
