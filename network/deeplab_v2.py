"""DeepLab-v2: ResNet-101 ("MSRA": stride in the 1x1 reduce), output stride 8, ASPP 6/12/18/24,
inside the multi-scale (MSC) wrapper, with the module names of deeplab-pytorch's
``DeepLabV2_ResNet101_MSC`` so that its checkpoints load with ``strict=True``.

Input: caffe style, BGR with the mean (B 104.008, G 116.669, R 122.675) subtracted, no std.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from network.resnet38d import _load_torch_state
from tool.errors import InputError
from tool.torchutils import LR_MULTS

CAFFE_MEAN_BGR = (104.008, 116.669, 122.675)
ATROUS_RATES = (6, 12, 18, 24)
MSC_SCALES = (0.5, 0.75)
RESNET101_BLOCKS = (3, 4, 23, 3)
BOTTLENECK_EXPANSION = 4


class ConvBnReLU(nn.Sequential):
    """conv (no bias) -> BN (eps 1e-5) -> optional ReLU; children named conv, bn(, relu)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int, padding: int, dilation: int,
                 relu: bool = True) -> None:
        super().__init__()
        self.add_module("conv", nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, dilation, bias=False))
        # deeplab-pytorch's momentum 1 - 0.999 (caffe's moving-average fraction); BN is frozen anyway.
        self.add_module("bn", nn.BatchNorm2d(out_ch, eps=1e-5, momentum=1e-3))
        if relu:
            self.add_module("relu", nn.ReLU())


class Bottleneck(nn.Module):
    """1x1 reduce (carries the stride) -> dilated 3x3 -> 1x1 increase, plus the shortcut, ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, dilation: int, downsample: bool) -> None:
        super().__init__()
        mid_ch = out_ch // BOTTLENECK_EXPANSION
        self.reduce = ConvBnReLU(in_ch, mid_ch, 1, stride, 0, 1)
        self.conv3x3 = ConvBnReLU(mid_ch, mid_ch, 3, 1, dilation, dilation)
        self.increase = ConvBnReLU(mid_ch, out_ch, 1, 1, 0, 1, relu=False)
        self.shortcut = ConvBnReLU(in_ch, out_ch, 1, stride, 0, 1, relu=False) if downsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.increase(self.conv3x3(self.reduce(x))) + self.shortcut(x))


class ResLayer(nn.Sequential):
    """``n_blocks`` bottlenecks named block1..; the first one downsamples and projects."""

    def __init__(self, n_blocks: int, in_ch: int, out_ch: int, stride: int, dilation: int) -> None:
        super().__init__()
        for i in range(n_blocks):
            self.add_module(f"block{i + 1}", Bottleneck(in_ch if i == 0 else out_ch, out_ch,
                                                        stride if i == 0 else 1, dilation, downsample=i == 0))


class Stem(nn.Sequential):
    """7x7/2 conv-BN-ReLU and a 3x3/2 max pool with ceil_mode (as deeplab-pytorch, unlike torchvision)."""

    def __init__(self, out_ch: int) -> None:
        super().__init__()
        self.add_module("conv1", ConvBnReLU(3, out_ch, 7, 2, 3, 1))
        self.add_module("pool", nn.MaxPool2d(3, 2, 1, ceil_mode=True))


class ASPP(nn.Module):
    """Sum of parallel dilated 3x3 convolutions with bias (c0..c3), straight to class logits."""

    def __init__(self, in_ch: int, out_ch: int, rates: tuple[int, ...]) -> None:
        super().__init__()
        for i, rate in enumerate(rates):
            conv = nn.Conv2d(in_ch, out_ch, 3, 1, padding=rate, dilation=rate, bias=True)
            nn.init.normal_(conv.weight, mean=0, std=0.01)
            nn.init.zeros_(conv.bias)
            self.add_module(f"c{i}", conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(conv(x) for conv in self.children())


class DeepLabV2(nn.Sequential):
    """Dilated ResNet-101 (layer4 dilation 2, layer5 dilation 4: stride 8) + ASPP."""

    def __init__(self, num_classes: int, n_blocks: tuple[int, ...] = RESNET101_BLOCKS,
                 atrous_rates: tuple[int, ...] = ATROUS_RATES) -> None:
        super().__init__()
        ch = [64 * 2 ** p for p in range(6)]
        self.add_module("layer1", Stem(ch[0]))
        self.add_module("layer2", ResLayer(n_blocks[0], ch[0], ch[2], 1, 1))
        self.add_module("layer3", ResLayer(n_blocks[1], ch[2], ch[3], 2, 1))
        self.add_module("layer4", ResLayer(n_blocks[2], ch[3], ch[4], 1, 2))
        self.add_module("layer5", ResLayer(n_blocks[3], ch[4], ch[5], 1, 4))
        self.add_module("aspp", ASPP(ch[5], num_classes, atrous_rates))


class Net(nn.Module):
    """MSC wrapper: the base network on the input and on its 0.5x and 0.75x copies (bilinear,
    align_corners False). Training returns ``[full, 0.5x, 0.75x, max]`` (each at its own size, the
    max at the full logit size); evaluation returns the pixel-wise max alone.

    BatchNorm is always frozen (eval mode, no gradient), as the recipe trains it.
    """

    def __init__(self, num_classes: int, scales: tuple[float, ...] = MSC_SCALES) -> None:
        super().__init__()
        self.base = DeepLabV2(num_classes)
        self.scales = tuple(scales)
        self.head_names = frozenset(f"base.aspp.{k}" for k in self.base.aspp.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        logits = self.base(x)
        pyramid = [self.base(F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False))
                   for s in self.scales]
        size = logits.shape[-2:]
        upsampled = [F.interpolate(p, size=size, mode="bilinear", align_corners=False) for p in pyramid]
        logits_max = torch.stack([logits, *upsampled]).max(dim=0)[0]
        if self.training:
            return [logits, *pyramid, logits_max]
        return logits_max

    def train(self, mode: bool = True) -> Net:
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
                m.weight.requires_grad_(False)
                m.bias.requires_grad_(False)
        return self

    def get_parameter_groups(self) -> list[dict]:
        """deeplab-pytorch's groups: backbone convolutions (lr x1, decay), ASPP weights (x10,
        decay), ASPP biases (x20, no decay). BatchNorm is not optimised."""
        backbone = [m.weight for name, m in self.base.named_modules()
                    if name.startswith("layer") and isinstance(m, nn.Conv2d)]
        aspp = list(self.base.aspp.children())
        pretrained_weight, _, scratch_weight, scratch_bias = LR_MULTS
        return [{"params": backbone, "lr_mult": pretrained_weight, "decay": True},
                {"params": [c.weight for c in aspp], "lr_mult": scratch_weight, "decay": True},
                {"params": [c.bias for c in aspp], "lr_mult": scratch_bias, "decay": False}]


def caffe_input(img: np.ndarray) -> np.ndarray:
    """uint8 or float RGB ``(H, W, 3)`` -> float32 BGR with the caffe mean subtracted."""
    return (np.asarray(img, np.float32)[..., ::-1] - np.array(CAFFE_MEAN_BGR, np.float32)).copy()


# --- torchvision's ImageNet ResNet-101 -----------------------------------------------------------

_TV_LAYER = re.compile(r"layer(\d)\.(\d+)\.(conv1|bn1|conv2|bn2|conv3|bn3|downsample\.0|downsample\.1)\.(\w+)")
_TV_MODULE = {"conv1": "reduce.conv", "bn1": "reduce.bn", "conv2": "conv3x3.conv", "bn2": "conv3x3.bn",
              "conv3": "increase.conv", "bn3": "increase.bn", "downsample.0": "shortcut.conv",
              "downsample.1": "shortcut.bn"}


def torchvision_to_deeplab_name(name: str) -> str | None:
    """Our name (without ``base.``) for a torchvision ``resnet101`` state_dict name; ``None`` for
    the ImageNet classifier ``fc``.

    ``conv1.weight`` -> ``layer1.conv1.conv.weight``; ``layer3.4.conv2.weight`` ->
    ``layer4.block5.conv3x3.conv.weight``; ``layer1.0.downsample.1.running_mean`` ->
    ``layer2.block1.shortcut.bn.running_mean``. torchvision's blocks stride in the 3x3 conv
    (FAIR), ours in the 1x1 reduce (MSRA): the shapes agree, the features differ slightly.
    """
    if name.startswith("fc."):
        return None
    if name.startswith("conv1."):
        return "layer1.conv1.conv." + name[len("conv1."):]
    if name.startswith("bn1."):
        return "layer1.conv1.bn." + name[len("bn1."):]
    m = _TV_LAYER.fullmatch(name)
    if m is None:
        raise InputError(f"unexpected parameter {name!r} in a torchvision ResNet-101 state_dict")
    layer, block, module, suffix = m.groups()
    return f"layer{int(layer) + 1}.block{int(block) + 1}.{_TV_MODULE[module]}.{suffix}"


def is_torchvision_resnet(state: dict) -> bool:
    return "conv1.weight" in state and "layer1.0.conv1.weight" in state


def load_weights(model: Net, path: str | Path, strict: bool) -> list[str]:
    """Load a deeplab-pytorch checkpoint (``DeepLabV2_ResNet101_MSC`` names with ``base.``, or a
    base network's names without it, e.g. ``deeplabv1_resnet101-coco.pth``), one of ours, or
    torchvision's ImageNet ``resnet101`` into ``model``; return the names left at their init.

    An ASPP head of another shape (another class count) is skipped and reported in the return
    value; ``strict`` then still requires every other parameter. Without ``strict`` (a training
    start) a missing head is fine too. Raises InputError for any other mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"weights file not found: {path}")
    state = _load_torch_state(path)
    if is_torchvision_resnet(state):
        state = {new: v for k, v in state.items() if (new := torchvision_to_deeplab_name(k)) is not None}
        strict = False
    state = {k if k.startswith("base.") else "base." + k: v for k, v in state.items()}
    own = model.state_dict()
    skipped_head = [k for k in model.head_names if k in state and state[k].shape != own[k].shape]
    for k in skipped_head:
        del state[k]
    mismatched = [k for k in own.keys() & state.keys() if state[k].shape != own[k].shape]
    if mismatched:
        k = min(mismatched)
        raise InputError(f"{path}: parameter {k} has shape {tuple(state[k].shape)} in the file but "
                         f"{tuple(own[k].shape)} in the model")
    missing = [k for k in own.keys() - state.keys() if not k.endswith("num_batches_tracked")]
    unexpected = sorted(state.keys() - own.keys())
    allowed_missing = set(skipped_head) if strict else set(model.head_names)
    required_missing = [k for k in missing if k not in allowed_missing]
    if required_missing or (strict and unexpected) or not own.keys() & state.keys():
        first = min(required_missing) if required_missing else (unexpected[0] if unexpected else "none")
        raise InputError(f"{path} does not match DeepLab-v2 ResNet-101: {len(required_missing)} missing "
                         f"parameters, {len(unexpected)} unexpected (first: {first})")
    model.load_state_dict(state, strict=False)
    return sorted(own.keys() - state.keys())
