"""The demo's ImageNet: train the narrow ResNet-38 as an image classifier on a generated corpus and
write its backbone, which every network of the demo starts from (as the paper's start from ImageNet).

    python pretrain_demo.py                    # writes voc12/demo_backbone.pth and its record .json

The corpus is ``voc12.demo``'s world as ImageNet pictures it: one large object an image (the
``objects`` layout), more classes than the demo uses (the demo's are its first ones, as VOC's
classes are among ImageNet's), its own seed and more images, in the demo's image size. The
classifier (``network.resnet38_cls``: the backbone, global average pooling and a linear layer) is
trained from random init with every layer and BatchNorm learning, as an ImageNet network is:
softmax cross-entropy, SGD with momentum, a poly schedule. The backbone's state_dict (the released
parameter names, float16) is written with a record beside it: the command, the recipe (every
flag), the corpus, the held-out accuracy and the file's sha256. ``tests/test_demo_backbone.py``
checks that the shipped file matches its record and the record this script's defaults and the
world ``voc12.demo`` draws today (``world_sample``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from network import resnet38_cls
from tool.cli import run_main
from tool.distributed import DistInfo, distributed_session
from tool.fileio import atomic_path, load_img_name_list
from tool.logutils import progress, setup_logging
from tool.torchutils import PolyOptimizer
from tool.trainloop import fit, make_train_loader, resume_state
from voc12.data import VOC12ClsDataset, VOC12ImageDataset, default_label_file, load_image_labels
from voc12.demo import make_demo_dataset, world_sample

CORPUS_LAYOUT = "objects"  # voc12.demo's layout of ImageNet's kind of picture
DEFAULT_OUT = Path(__file__).resolve().parent / "voc12" / "demo_backbone.pth"
# Flags that say where things go rather than what is trained: left out of the recipe.
NOT_RECIPE = ("out", "work_dir", "num_workers", "device", "tblog_dir", "resume", "log_every", "tb_image_every",
              "label_file", "dataset_classes", "voc12_root", "allow_pickle")


def get_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="the backbone file; its record is OUT with .json")
    parser.add_argument("--work_dir", default="demo_pretrain", help="the corpus, logs and checkpoints")
    g = parser.add_argument_group("corpus (voc12.demo's world)")
    g.add_argument("--num_images", default=4000, type=int, help="training images")
    g.add_argument("--num_held_out", default=300, type=int, help="held-out images, for the accuracy")
    g.add_argument("--num_classes", default=12, type=int, help="classes of the corpus (the demo uses the first)")
    g.add_argument("--image_size", default=112, type=int)
    g.add_argument("--corpus_seed", default=1000, type=int)
    g = parser.add_argument_group("training")
    g.add_argument("--backbone_width", default=0.125, type=float, help="channel multiplier of ResNet-38")
    g.add_argument("--max_epoches", default=12, type=int)
    g.add_argument("--batch_size", default=16, type=int)
    g.add_argument("--lr", default=0.01, type=float)
    g.add_argument("--momentum", default=0.9, type=float)
    g.add_argument("--wt_dec", default=1e-4, type=float)
    g.add_argument("--crop_size", default=112, type=int)
    g.add_argument("--resize_long", default=(96, 160), type=int, nargs=2, metavar=("MIN", "MAX"))
    g.add_argument("--seed", default=0, type=int, help="initialisation and sampling")
    g = parser.add_argument_group("running")
    g.add_argument("--num_workers", default=1, type=int)
    g.add_argument("--device", default=None, type=str)
    g.add_argument("--tblog_dir", default=None, type=str)
    g.add_argument("--log_every", default=50, type=int)
    g.add_argument("--tb_image_every", default=10 ** 9, type=int)
    g.add_argument("--resume", default=None, nargs="?", const="auto", type=str,
                   help="continue from WORK_DIR/classifier.ckpt")
    return parser


def recipe(args: argparse.Namespace) -> dict:
    """What the backbone is a function of: every flag but those that say where things go (as JSON
    keeps it: tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(vars(args).items()) if k not in NOT_RECIPE}


def make_optimizer(net: nn.Module, args: argparse.Namespace, max_step: int) -> PolyOptimizer:
    """SGD with momentum, poly schedule; no weight decay on BatchNorm and biases."""
    decay = [p for p in net.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.requires_grad and p.ndim <= 1]
    return PolyOptimizer([{"params": decay}, {"params": no_decay, "weight_decay": 0}], lr=args.lr,
                         weight_decay=args.wt_dec, max_step=max_step, momentum=args.momentum)


@torch.no_grad()
def held_out_accuracy(net: resnet38_cls.Net, root: Path, list_path: Path, num_fg: int, device: torch.device) -> float:
    """Top-1 accuracy over the held-out images (one object each), whole images at their own size."""
    dataset = VOC12ImageDataset(list_path, root, normalize=True)
    truth = load_image_labels(default_label_file(list_path), dataset.names, num_fg).argmax(1)
    net.eval()
    predicted = [net(item["img"][None].to(device))[0].argmax().item() for item in progress(dataset, desc="held-out")]
    return float(np.mean(np.asarray(predicted) == truth))


def train(args: argparse.Namespace, info: DistInfo) -> Path:
    work = Path(args.work_dir)
    logger = setup_logging(work / "classifier.log", info)
    logger.info("%s", vars(args))
    root = work / "corpus"
    classes = make_demo_dataset(root, num_train=args.num_images, num_val=args.num_held_out,
                                image_size=args.image_size, seed=args.corpus_seed, num_classes=args.num_classes,
                                layout=CORPUS_LAYOUT)
    torch.manual_seed(args.seed)
    net = resnet38_cls.Net(classes.num_fg, args.backbone_width)
    dataset = VOC12ClsDataset(root / "train.txt", root, default_label_file(root / "train.txt"), classes,
                              crop_size=args.crop_size, resize_long=tuple(args.resize_long), seed=args.seed)
    # fit's flags: the session (checkpoint, final weights) lives in the work folder.
    loop_args = argparse.Namespace(**vars(args), session_name=str(work / "classifier"), amp=False, deterministic=False,
                                   save_every_epoch=False, skip_bad_images=False)
    sampler, loader = make_train_loader(dataset, loop_args, info)
    net.train()
    optimizer = make_optimizer(net, args, sampler.batches_per_epoch() * args.max_epoches)
    net = net.to(info.device)
    start = resume_state(loop_args, net, optimizer)

    def step_fn(model: nn.Module, pack: dict):
        logits = model(pack["img"].to(info.device))
        return {"loss": F.cross_entropy(logits, pack["label"].argmax(1).to(info.device))}, None

    fit(args=loop_args, info=info, model=net, optimizer=optimizer, loader=loader, sampler=sampler,
        step_fn=step_fn, logger=logger, start=start)
    accuracy = held_out_accuracy(net, root, root / "val.txt", classes.num_fg, info.device)
    logger.info("held-out top-1 accuracy %.4f", accuracy)
    out = Path(args.out)
    with atomic_path(out) as tmp:
        torch.save(net.backbone_state(), tmp)
    record = {
        "command": shlex.join(["python", "pretrain_demo.py", *sys.argv[1:]]) if sys.argv[0].endswith("pretrain_demo.py")
        else "python pretrain_demo.py",
        "recipe": recipe(args),
        "corpus": {"train_images": len(load_img_name_list(root / "train.txt")),
                   "held_out_images": len(load_img_name_list(root / "val.txt")), "classes": list(classes.names),
                   "sample": world_sample(args.image_size, args.corpus_seed, args.num_classes, CORPUS_LAYOUT)},
        "held_out_top1": accuracy,
        "torch": torch.__version__,
        "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
    }
    with atomic_path(out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
    logger.info("wrote %s and its record %s", out, out.with_suffix(".json"))
    return out


def run(args: argparse.Namespace) -> Path:
    with distributed_session(args.device) as info:
        return train(args, info)


def main(argv: list[str] | None = None) -> Path:
    return run_main(run, get_arg_parser(), argv)


if __name__ == "__main__":
    main()
