"""The two final segmentation networks behind one interface, for train_seg.py and infer_seg.py:
DeepLab-v2 ResNet-101 MSC (``resnet101``, the paper's) and DeepLab-v1 on ResNet-38 (``resnet38``)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from torch import nn

from network import deeplab_v1_resnet38, deeplab_v2, resnet38d
from tool.errors import InputError
from tool.imutils import Normalize

DEFAULT_INPUT = {"resnet101": "caffe", "resnet38": "imagenet"}


def input_normalizer(backbone: str, seg_input: str | None) -> Callable[[np.ndarray], np.ndarray]:
    """RGB ``(H, W, 3)`` (uint8 or float, 0..255) -> the network's float32 input, HWC."""
    kind = seg_input or DEFAULT_INPUT[backbone]
    return deeplab_v2.caffe_input if kind == "caffe" else Normalize()


def make_net(backbone: str, num_classes: int, width: float = 1.0, train_bn: bool = False,
             head_bn_momentum: float = deeplab_v1_resnet38.HEAD_BN_MOMENTUM) -> nn.Module:
    if backbone == "resnet101":
        if train_bn:
            raise InputError("--train_bn is for --seg_backbone resnet38 (DeepLab-v2 keeps BatchNorm frozen)")
        if width != 1.0:
            raise InputError("--backbone_width is for --seg_backbone resnet38 (ResNet-101 has one width)")
        return deeplab_v2.Net(num_classes)
    return deeplab_v1_resnet38.Net(num_classes, width=width, freeze_bn=not train_bn,
                                   head_bn_momentum=head_bn_momentum)


def load_weights(net: nn.Module, path: str | Path, strict: bool) -> list[str]:
    """Initialise (``strict=False``) or load trained weights (``strict=True``); return the names
    left at their init."""
    if isinstance(net, deeplab_v2.Net):
        if Path(path).is_file() and resnet38d._is_mxnet_file(Path(path)):
            use = ("not a trained segmentation network: pass the SESSION_NAME.pth of train_seg.py" if strict else
                   "which DeepLab-v2 ResNet-101 cannot start from: pass --seg_backbone resnet38 to train "
                   "DeepLab-v1 on ResNet-38 from them")
            raise InputError(f"{path} holds ResNet-38's ImageNet weights (MXNet .params), {use}")
        return deeplab_v2.load_weights(net, path, strict=strict)
    kept = deeplab_v1_resnet38.load_weights(net, path)
    if strict and kept:
        raise InputError(f"{path} is not a trained DeepLab-v1 ResNet-38: {len(kept)} parameters missing "
                         f"(first: {kept[0]})")
    return kept
