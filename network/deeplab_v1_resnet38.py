"""DeepLab-v1 (LargeFOV head) on our ResNet-38, as SEAM's segmentation codebase builds it
(YudeWang/semantic-segmentation-codebase, ``deeplabv1`` with backbone ``resnet38``).

Names: the backbone under ``backbone.`` (our ResNet-38 names), then ``conv_fov`` (3x3, dilation
12, 512 x the backbone width, no bias), ``bn_fov``, ``conv_fov2`` (1x1, same width, no bias), ``bn_fov2``, dropout 0.5,
``cls_conv`` (1x1 with bias); the logits are upsampled (bilinear, align_corners True) to the
input size. Input: RGB with the ImageNet normalisation (:class:`tool.imutils.Normalize`).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from network import resnet38d
from tool.errors import InputError
from tool.torchutils import LR_MULTS

HEAD_CHANNELS = 512
FOV_DILATION = 12
# SEAM's codebase passes TRAIN_BN_MOM 0.0003 to the head's BatchNorm as torch's momentum.
HEAD_BN_MOMENTUM = 3e-4


class Net(nn.Module):
    """``forward(x)``: training -> ``[logits]`` (a list, like the MSC network's), eval -> logits,
    both ``(N, num_classes, H, W)`` at the input size.

    The backbone's conv1a is never trained and, with ``freeze_bn``, its BatchNorm stays frozen
    (SEAM's codebase, ImageNet start); the head's BatchNorm always trains.
    """

    def __init__(self, num_classes: int, width: float = 1.0, freeze_bn: bool = True,
                 head_bn_momentum: float = HEAD_BN_MOMENTUM) -> None:
        super().__init__()
        self.backbone = resnet38d.Net(width, freeze_bn)
        in_ch = self.backbone.channels["conv7"]
        head_ch = max(1, round(HEAD_CHANNELS * width))
        self.conv_fov = nn.Conv2d(in_ch, head_ch, 3, 1, padding=FOV_DILATION, dilation=FOV_DILATION, bias=False)
        self.bn_fov = nn.BatchNorm2d(head_ch, momentum=head_bn_momentum)
        self.conv_fov2 = nn.Conv2d(head_ch, head_ch, 1, bias=False)
        self.bn_fov2 = nn.BatchNorm2d(head_ch, momentum=head_bn_momentum)
        self.dropout1 = nn.Dropout(0.5)
        self.cls_conv = nn.Conv2d(head_ch, num_classes, 1)
        for conv in (self.conv_fov, self.conv_fov2, self.cls_conv):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        self.from_scratch_layers = [self.conv_fov, self.conv_fov2, self.cls_conv]

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        feature = F.relu(self.bn_fov(self.conv_fov(self.backbone(x))))
        feature = self.dropout1(F.relu(self.bn_fov2(self.conv_fov2(feature))))
        logits = F.interpolate(self.cls_conv(feature), x.shape[-2:], mode="bilinear", align_corners=True)
        return [logits] if self.training else logits

    def get_parameter_groups(self) -> list[dict]:
        """SEAM codebase's groups: backbone weights x1 and biases x2, head convolutions x10
        (weights) and x20 (biases, no decay); trained BatchNorm affine terms ride with the x1/x2
        groups of their part."""
        head = {id(m) for m in self.from_scratch_layers}
        groups: tuple[list, list, list, list] = ([], [], [], [])  # in the order of LR_MULTS
        for m in self.modules():
            if not isinstance(m, nn.Conv2d | nn.BatchNorm2d):
                continue
            offset = 2 if id(m) in head else 0
            if m.weight.requires_grad:
                groups[offset].append(m.weight)
            if m.bias is not None and m.bias.requires_grad:
                groups[offset + 1].append(m.bias)
        return [{"params": params, "lr_mult": mult, "decay": i % 2 == 0}  # biases: no decay
                for i, (params, mult) in enumerate(zip(groups, LR_MULTS, strict=True))]


def load_weights(model: Net, path: str | Path) -> list[str]:
    """Initialise the backbone from the ImageNet ``.params``, an SB / AffinityNet checkpoint (their
    backbone names, no prefix) or a full DeepLab-v1 checkpoint of ours or of SEAM's codebase
    (``backbone.`` names and the head, loaded whole when the head matches). Returns the names left
    at their init; InputError when the backbone does not fit (e.g. another ``--backbone_width``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"weights file not found: {path}")
    state = None if resnet38d._is_mxnet_file(path) else resnet38d._load_torch_state(path)
    own = model.state_dict()
    if state is None or not any(k.startswith("backbone.") for k in state):
        resnet38d.load_weights(model.backbone, path, strict=False)
        return sorted(k for k in own if not k.startswith("backbone."))
    mismatched = [k for k in own.keys() & state.keys() if state[k].shape != own[k].shape]
    bad = [k for k in mismatched if k.startswith("backbone.")]
    if bad:
        raise InputError(f"{path}: parameter {bad[0]} has shape {tuple(state[bad[0]].shape)} in the file but "
                         f"{tuple(own[bad[0]].shape)} in the model (another --backbone_width?)")
    state = {k: v for k, v in state.items() if k in own and k not in mismatched}
    model.load_state_dict(state, strict=False)
    return sorted(own.keys() - state.keys())
