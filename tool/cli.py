"""Argument groups shared by the stage scripts, and the guard that turns user mistakes into
one-line errors.

The flag names and defaults are the released code's (``--voc12_root``, ``--weights``,
``--session_name``, ...); the additions a user needs today (``--device``, ``--backbone_width``,
``--resume``, ...) are grouped here so that every script spells them the same way.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from tool.errors import InputError, NonFiniteLoss
from tool.workers import end_worker_processes

OVERWRITE_MODES = ("all", "stale")


def str2bool(value: str | bool) -> bool:
    """Parse 'True'/'False'/'1'/'0'/'yes'/'no' (the released ``type=bool`` made 'False' true)."""
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "y", "on"):
        return True
    if lowered in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """Where the images, labels and class names are."""
    g = parser.add_argument_group("data")
    g.add_argument("--voc12_root", default="VOC2012", type=str,
                   help="VOC2012 folder (JPEGImages, SegmentationClass, ...)")
    g.add_argument("--label_file", default=None, type=str,
                   help="image-level label file (default: cls_labels.npz beside the list)")
    g.add_argument("--dataset_classes", default=None, type=str,
                   help="class-list file of a custom dataset (default: the 20 VOC classes)")
    g.add_argument("--num_workers", default=8, type=int)
    add_allow_pickle_arg(g)


def add_allow_pickle_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The one switch that lets a script unpickle the released code's ``.npy`` files."""
    parser.add_argument("--allow_pickle", action="store_true",
                        help="read the released code's pickled .npy CAM/CRF files (trusted files only)")


def add_model_args(parser: argparse.ArgumentParser, weights_required: bool) -> None:
    """Which network, on which device."""
    g = parser.add_argument_group("model")
    g.add_argument("--weights", required=weights_required, default=None, type=str,
                   help="MXNet .params ImageNet file, or a checkpoint of ours or of the released code")
    g.add_argument("--backbone_width", default=1.0, type=float,
                   help="channel multiplier of ResNet-38 (1.0 = the paper; the CPU demo uses 0.125)")
    g.add_argument("--device", default=None, type=str, help="cuda or cpu (default: cuda when available)")
    g.add_argument("--amp", action="store_true", help="mixed precision on CUDA")
    g.add_argument("--channels_last", action="store_true", help="channels_last memory format on CUDA")


def add_sb_model_args(parser: argparse.ArgumentParser) -> None:
    """Options of the SB network that training and inference must agree on."""
    parser.add_argument("--canny_on_rgb", action="store_true",
                        help="Canny on the real RGB image (the released code runs it on the normalised tensor)")


def add_aff_model_args(parser: argparse.ArgumentParser) -> None:
    """Options of AffinityNet that training and inference must agree on."""
    parser.add_argument("--radius", default=5, type=int,
                        help="pairs of positions within this distance on the 1/8 feature map get an affinity")


def add_train_args(parser: argparse.ArgumentParser, *, session_name: str, max_epoches: int | None,
                   crop_size: int = 448) -> None:
    """The released training flags plus resume, seeding and logging (``max_epoches=None``: a
    script that counts iterations instead)."""
    g = parser.add_argument_group("training")
    g.add_argument("--batch_size", default=8, type=int, help="global batch, split over GPUs/ranks")
    if max_epoches is not None:
        g.add_argument("--max_epoches", default=max_epoches, type=int)
    g.add_argument("--lr", default=0.01, type=float)
    g.add_argument("--wt_dec", default=5e-4, type=float)
    g.add_argument("--momentum", default=None, type=float,
                   help="real SGD momentum; default reproduces the released quirk (momentum = wt_dec)")
    g.add_argument("--crop_size", default=crop_size, type=int)
    g.add_argument("--train_list", default="voc12/train_aug.txt", type=str)
    g.add_argument("--session_name", default=session_name, type=str)
    g.add_argument("--tblog_dir", default="./tblog", type=str)
    g.add_argument("--tb_image_every", default=200, type=int, help="steps between CAM pictures in TensorBoard")
    g.add_argument("--log_every", default=50, type=int)
    g.add_argument("--resume", default=None, nargs="?", const="auto", type=str,
                   help="continue from a training checkpoint (default: SESSION_NAME.ckpt)")
    g.add_argument("--seed", default=100000, type=int)
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic GPU kernels: a run repeats bit for bit and a resumed one ends where an "
                        "uninterrupted one does (slower; the CPU always does)")
    g.add_argument("--save_every_epoch", action="store_true",
                   help="also keep the weights of every epoch, SESSION_NAME_epN.pth (the released code's snapshots)")
    g.add_argument("--train_bn", action="store_true",
                   help="let BatchNorm train (needed from random init; the paper freezes it)")
    g.add_argument("--skip_bad_images", action="store_true",
                   help="go on past images (or CRF files) that do not read, with a warning naming each")


def add_seg_model_args(parser: argparse.ArgumentParser) -> None:
    """The segmentation network, which training and inference must agree on."""
    g = parser.add_argument_group("segmentation network")
    g.add_argument("--seg_backbone", default="resnet101", choices=("resnet101", "resnet38"),
                   help="resnet101: DeepLab-v2 MSC (the paper); resnet38: DeepLab-v1 LargeFOV (SEAM's codebase)")
    g.add_argument("--seg_input", default=None, choices=("caffe", "imagenet"),
                   help="input normalisation: caffe = BGR minus the mean (resnet101 default), imagenet = "
                        "RGB mean/std (resnet38 default; torchvision's resnet101 weights want it too)")


def add_infer_args(parser: argparse.ArgumentParser, infer_list: str) -> None:
    g = parser.add_argument_group("inference")
    g.add_argument("--infer_list", default=infer_list, type=str)
    g.add_argument("--overwrite", nargs="?", const="all", default=None, choices=OVERWRITE_MODES,
                   help="redo outputs that already exist: all of them (the default), or with 'stale' only "
                        "those of other weights, flags or code while finished ones of the same are kept")


def run_main(run: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser,
             argv: list[str] | None = None) -> Any:
    """Parse ``argv``, call ``run(args)``; a user mistake exits 2 and a diverged training exits 1,
    each with one line on stderr."""
    args = parser.parse_args(argv)
    try:
        return run(args)
    except InputError as e:
        message, code = one_line(e), 2
    except NonFiniteLoss as e:
        message, code = one_line(e), 1
    except OSError as e:
        if e.filename is None:
            raise
        message, code = file_system_message(e), 1
    end_worker_processes()
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def one_line(error: Exception) -> str:
    """The message of an error; one re-raised from a DataLoader worker carries the worker's whole
    traceback, of which its last line holds the original message."""
    message = str(error)
    if "\nOriginal Traceback" in message:
        message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return message


def file_system_message(error: OSError) -> str:
    """``PATH: what went wrong``, naming both paths of a failed rename or link."""
    paths = str(error.filename) + (f" -> {error.filename2}" if error.filename2 is not None else "")
    return f"{paths}: {error.strerror or error}"
