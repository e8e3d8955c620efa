"""The SB network: SEAM's CAM and pixel correlation module (PCM) on ResNet-38, plus a semantic
boundary branch fused with a Canny edge map of the input."""
from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from network import resnet38d
from tool.imutils import denormalize, released_uint8_cast
from voc12.classes import VOC

CANNY_THRESHOLDS = (10, 100)


class ChannelAttention(nn.Module):
    """The released "CA" block: ``x + W2 ReLU(W1 avgpool(x))``; the excitation is added, not
    multiplied (the released code has no sigmoid gate)."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        self.conv_du = nn.Sequential(
            nn.Conv2d(channels, channels // reduction, 1, bias=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // reduction, channels, 1, bias=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_du(F.adaptive_avg_pool2d(x, 1))


class ResidualChannelAttentionBlock(nn.Module):
    """3x3 conv, ReLU, 3x3 conv, channel attention, added back to the input (RCAB)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=True),
            ChannelAttention(channels, reduction),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + x


class SemanticEdgeModule(nn.Module):
    """Per-class boundary logits at conv1 resolution from backbone features conv1, conv3, conv5
    and conv6: each reduced by a 1x1 conv and refined by a 3x3 conv (both with ReLU), resized to
    conv1's size, concatenated, passed through one RCAB and a 3x3 classifier."""

    def __init__(self, in_channels: tuple[int, int, int, int], num_classes: int = VOC.num_classes,
                 mid_channels: int = 32) -> None:
        super().__init__()
        c1, c3, c5, c6 = in_channels
        self.conv1 = nn.Conv2d(c1, mid_channels, 1)
        self.conv3 = nn.Conv2d(c3, mid_channels, 1)
        self.conv5 = nn.Conv2d(c5, mid_channels, 1)
        self.conv6 = nn.Conv2d(c6, mid_channels, 1)
        self.conv8_1 = nn.Conv2d(mid_channels, mid_channels, 3, padding=1)
        self.conv8_3 = nn.Conv2d(mid_channels, mid_channels, 3, padding=1)
        self.conv8_5 = nn.Conv2d(mid_channels, mid_channels, 3, padding=1)
        self.conv8_6 = nn.Conv2d(mid_channels, mid_channels, 3, padding=1)
        self.classifier = nn.Conv2d(mid_channels * 4, num_classes, 3, padding=1)
        self.rcab = ResidualChannelAttentionBlock(mid_channels * 4)

    def forward(self, conv1: torch.Tensor, conv3: torch.Tensor, conv5: torch.Tensor,
                conv6: torch.Tensor) -> torch.Tensor:
        size = conv1.shape[2:]
        edge_1 = F.relu(self.conv8_1(F.relu(self.conv1(conv1))))
        edge_3 = F.relu(self.conv8_3(F.relu(self.conv3(conv3))))
        edge_5 = F.relu(self.conv8_5(F.relu(self.conv5(conv5))))
        edge_6 = F.relu(self.conv8_6(F.relu(self.conv6(conv6))))
        edges = [edge_1] + [F.interpolate(e, size=size, mode="bilinear", align_corners=True)
                            for e in (edge_3, edge_5, edge_6)]
        return self.classifier(self.rcab(torch.cat(edges, dim=1)))


def canny_edges(x: torch.Tensor, on_rgb: bool = False) -> torch.Tensor:
    """Canny edges (thresholds 10, 100) of each image of a normalised NCHW batch: ``(N, 1, H, W)``
    of 0/255 on x's device and dtype, computed with OpenCV on the CPU.

    By default Canny sees the normalised tensor cast to uint8 as the released code does (values
    mostly 0/1/2, negatives wrapped to 254/255); ``on_rgb`` gives it the real RGB image instead.
    """
    x = x.detach()
    if on_rgb:
        images = np.clip(np.rint(denormalize(x).float().cpu().numpy()), 0, 255).astype(np.uint8)
    else:
        images = released_uint8_cast(x.float().cpu().numpy())
    images = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    edges = np.stack([cv2.Canny(image, *CANNY_THRESHOLDS) for image in images])[:, None]
    return torch.from_numpy(edges).to(device=x.device, dtype=x.dtype)


def normalize_cam_for_pcm(cam: torch.Tensor) -> torch.Tensor:
    """The CAM PCM refines: ReLU, divided by its per-channel max (+1e-5), background channel
    ``1 - max over classes``, class scores below the per-position class maximum zeroed."""
    n, c = cam.shape[:2]
    cam = F.relu(cam)
    cam_max = cam.view(n, c, -1).max(dim=-1)[0].view(n, c, 1, 1) + 1e-5
    cam_norm = F.relu(cam - 1e-5) / cam_max
    fg = cam_norm[:, 1:]
    fg_max = fg.max(dim=1, keepdim=True)[0]
    fg = torch.where(fg < fg_max, torch.zeros_like(fg), fg)
    return torch.cat([1 - fg_max, fg], dim=1)


EDGE_CHANNELS = 32
# PCM's affinity matrix holds (HW)^2 numbers per image at 1/8 of the input. Up to PCM_DENSE_ELEMENTS
# for the batch (2 GiB of float32: two 1000 x 1000 views, VOC's largest at scale 2) it is computed
# at once, as released; beyond, a block of columns at a time, each block at most PCM_BLOCK_ELEMENTS.
PCM_DENSE_ELEMENTS = 1 << 29
PCM_BLOCK_ELEMENTS = 1 << 27


class SBOutput(NamedTuple):
    """What the SB network returns; all maps at the input size."""

    cam: torch.Tensor  # raw class activation maps (N, C, H, W), background in channel 0
    cam_rv: torch.Tensor  # the CAMs refined by PCM
    edge: torch.Tensor | None  # boundary logits (N, C, H, W); None when skipped


class Net(resnet38d.Net):
    """``forward(x) -> SBOutput(cam, cam_rv, edge)``: raw CAM and PCM-refined CAM at the input size
    (bilinear, align_corners), boundary logits at conv1 resolution (= the input size)."""

    def __init__(self, num_classes: int = VOC.num_classes, width: float = 1.0, freeze_bn: bool = True,
                 canny_on_rgb: bool = False) -> None:
        super().__init__(width, freeze_bn)
        c = self.channels
        self.canny_on_rgb = canny_on_rgb
        self.dropout7 = nn.Dropout2d(0.5)
        self.fc8 = nn.Conv2d(c["conv7"], num_classes, 1, bias=False)
        self.f8_3 = nn.Conv2d(c["conv4"], 64, 1, bias=False)
        self.f8_4 = nn.Conv2d(c["conv5"], 128, 1, bias=False)
        self.f9 = nn.Conv2d(3 + 64 + 128, 192, 1, bias=False)
        nn.init.xavier_uniform_(self.fc8.weight)
        nn.init.kaiming_normal_(self.f8_3.weight)
        nn.init.kaiming_normal_(self.f8_4.weight)
        nn.init.xavier_uniform_(self.f9.weight, gain=4)
        self.from_scratch_layers = [self.f8_3, self.f8_4, self.f9, self.fc8]
        self.not_training += [self.b2, self.b2_1, self.b2_2]
        self.fuse_canny_edge = nn.Conv2d(2 * num_classes, num_classes, 1, bias=False)
        # The edge branch works at the input resolution: a narrow backbone gets a narrow branch
        # too, or the branch would cost more than the whole backbone (width 1 keeps the released 32).
        self.edge_layer = SemanticEdgeModule((c["conv1"], c["conv3"], c["conv5"], c["conv6"]), num_classes,
                                             mid_channels=max(4, round(EDGE_CHANNELS * width)))

    def forward(self, x: torch.Tensor, with_edge: bool = True) -> SBOutput:
        """``with_edge=False`` skips the boundary branch (inference needs only the CAMs) and
        returns ``None`` for it."""
        size = x.shape[2:]
        d = self.forward_as_dict(x)
        cam = self.fc8(self.dropout7(d["conv7"]))
        with torch.no_grad():
            # Under AMP the CAM arrives in float16, where two classes can tie for a position's
            # maximum and PCM would spread both: the normalisation decides in float32 at least.
            cam_norm = normalize_cam_for_pcm(cam.detach().to(torch.promote_types(cam.dtype, torch.float32)))
        # PCM features do not train the backbone: conv4/conv5 are detached.
        f8_3 = F.relu(self.f8_3(d["conv4"].detach()))
        f8_4 = F.relu(self.f8_4(d["conv5"].detach()))
        x_small = F.interpolate(x, cam.shape[2:], mode="bilinear", align_corners=True)
        features = torch.cat([x_small, f8_3, f8_4], dim=1)
        cam_rv = F.interpolate(self.pcm(cam_norm, features), size, mode="bilinear", align_corners=True)
        cam = F.interpolate(cam, size, mode="bilinear", align_corners=True)

        if not with_edge:
            return SBOutput(cam, cam_rv, None)
        edge = self.edge_layer(d["conv1"], d["conv3"], d["conv5"], d["conv6"])
        canny = canny_edges(x, self.canny_on_rgb).expand(-1, edge.shape[1], -1, -1)
        edge = self.fuse_canny_edge(torch.cat([edge, canny], dim=1))
        return SBOutput(cam, cam_rv, edge)

    def pcm(self, cam: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Pixel correlation module: ``cam_rv = cam @ A`` with ``A = ReLU(f^T f)`` column-normalised,
        f = f9(features) L2-normalised per position. A column of ``cam_rv`` needs only the same
        column of ``A``: a large ``A`` is computed a block of columns at a time (see
        ``PCM_DENSE_ELEMENTS``), which bounds the memory and gives the same numbers up to float rounding."""
        n, _, h, w = features.shape
        cam = F.interpolate(cam, (h, w), mode="bilinear", align_corners=True).view(n, -1, h * w)
        f = self.f9(features).view(n, -1, h * w)
        f = f / (torch.norm(f, dim=1, keepdim=True) + 1e-5)
        if n * (h * w) ** 2 <= PCM_DENSE_ELEMENTS:
            return refine_columns(cam, f, f).view(n, -1, h, w)
        step = max(1, PCM_BLOCK_ELEMENTS // (n * h * w))
        blocks = [refine_columns(cam, f, f[..., j:j + step]) for j in range(0, h * w, step)]
        return torch.cat(blocks, dim=2).view(n, -1, h, w)


def refine_columns(cam: torch.Tensor, f: torch.Tensor, f_columns: torch.Tensor) -> torch.Tensor:
    """The columns of ``cam @ A`` (PCM) at the positions whose features are ``f_columns``:
    ``(N, C, len)`` from ``cam`` ``(N, C, HW)``, ``f`` ``(N, D, HW)``, ``f_columns`` ``(N, D, len)``."""
    aff = F.relu(torch.matmul(f.transpose(1, 2), f_columns))
    aff = aff / (torch.sum(aff, dim=1, keepdim=True) + 1e-5)
    return torch.matmul(cam, aff)
