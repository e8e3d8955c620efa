"""Training losses of the SB step (SEAM + semantic boundaries + smoothness), of AffinityNet and of
the final segmentation network (DeepLab).

Every map has the background in channel 0 and takes its class count from the tensor's shape.
``label`` below is the with-background image label of shape (N, K, 1, 1): 1 for the background and
for each class present in the image, 0 otherwise, with K the channels of the CAM. The functions
reproduce the released train_SB.py / train_aff.py computations in value and gradient.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))
SOBEL_Y = ((-1.0, -2.0, -1.0), (0.0, 0.0, 0.0), (1.0, 2.0, 1.0))
LAPLACIAN = ((-1.0, -1.0, -1.0), (-1.0, 8.0, -1.0), (-1.0, -1.0, -1.0))

ECR_TOP_FRACTION = 0.2
SMOOTH_EDGE_SHARPNESS = 10.0
SMOOTH_FIRST_ORDER_WEIGHT = 10.0
CHARBONNIER_EPS = 1e-3


class SBViews(Protocol):
    """One view's outputs of the SB network (``network.resnet38_sb.SBOutput``)."""

    cam: torch.Tensor
    cam_rv: torch.Tensor
    edge: torch.Tensor | None


def max_norm(p: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per sample and channel min-max normalisation of a (N, K, H, W) map.

    q = ReLU(p),  norm(p) = ReLU(q - min q - eps) / (max q - min q + eps),
    min and max taken over the spatial positions.
    """
    p = F.relu(p)
    flat = p.flatten(2)
    max_v = torch.max(flat, dim=-1)[0][..., None, None]
    min_v = torch.min(flat, dim=-1)[0][..., None, None]
    return F.relu(p - min_v - eps) / (max_v - min_v + eps)


def classification_loss(cam: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Multilabel soft margin on the global average pooled raw CAM, foreground classes only.

    s_c = mean_{x} cam_c(x);  L = -1/(N(K-1)) sum_{n, c>=1} [y_c log sigma(s_c) + (1-y_c) log sigma(-s_c)].
    """
    scores = cam[:, 1:].mean(dim=(2, 3))
    return F.multilabel_soft_margin_loss(scores, label.flatten(1)[:, 1:])


def rv_min_loss(cam_rv: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Adaptive min pooling on the refined CAM (released ``adaptive_min_pooling_loss``).

    m(x) = max_{c>=1} cam_rv_c(x) y_c;  L = 1/(N k) sum_n sum_{x in k smallest m} ReLU(m(x)),  k = HW // 4.
    It pushes the least activated quarter of each image towards no foreground score.
    """
    n, _, h, w = cam_rv.shape
    k = h * w // 4
    max_fg = torch.max((cam_rv * label)[:, 1:], dim=1)[0]
    smallest = torch.topk(max_fg.reshape(n, -1), k=k, dim=-1, largest=False)[0]
    return F.relu(smallest).sum() / (k * n)


def er_loss(cam1_norm_small: torch.Tensor, cam2_norm: torch.Tensor) -> torch.Tensor:
    """Equivariant regularisation between the two views' normalised CAMs.

    L = mean_{n, c>=1, x} |A(norm(cam1))_c(x) - norm(cam2)_c(x)|, where A resizes view 1 to view 2
    and both maps are already multiplied by the label.
    """
    return torch.mean(torch.abs(cam1_norm_small[:, 1:] - cam2_norm[:, 1:]))


def _with_background(cam_norm: torch.Tensor) -> torch.Tensor:
    """Background channel replaced by 1 - max over the classes (released in-place assignment)."""
    background = 1 - torch.max(cam_norm[:, 1:], dim=1, keepdim=True)[0]
    return torch.cat((background, cam_norm[:, 1:]), dim=1)


def _max_onehot(cam: torch.Tensor) -> torch.Tensor:
    """Class scores other than the per-pixel maximum over classes 1.. set to 0; background kept."""
    classes = cam[:, 1:]
    top = torch.max(classes, dim=1, keepdim=True)[0]
    return torch.cat((cam[:, :1], torch.where(classes == top, classes, torch.zeros_like(classes))), dim=1)


def _top_fraction_mean(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of the k = int(K h w fraction) largest values of each sample, over all samples."""
    n, c, h, w = x.shape
    k = int(c * h * w * fraction)
    return torch.mean(torch.topk(x.reshape(n, -1), k=k, dim=-1)[0])


def ecr_loss(cam1_norm_small: torch.Tensor, cam_rv1_norm_small: torch.Tensor,
             cam2_norm: torch.Tensor, cam_rv2_norm: torch.Tensor) -> torch.Tensor:
    """Equivariant cross regularisation between each view's CAM and the other view's refined CAM.

    B(p) = p with channel 0 := 1 - max_{c>=1} p_c, then classes other than the per-pixel argmax
    zeroed (max_onehot); sg = stop-gradient; T_k = mean of the largest fifth of the K h w values of a sample:
    L = T_k(|B(sg norm cam2) - norm cam_rv1|) + T_k(|B(sg norm cam1) - norm cam_rv2|).
    All inputs are normalised, label-multiplied maps at view 2's size. The refined maps keep their
    own normalised background channel, as released; only the CAM targets get 1 - max. The released
    code edits the CAMs in place after ER, which reads classes 1.. only: building the targets out of
    place gives the same values and gradients and leaves the inputs intact.
    """
    target2 = _max_onehot(_with_background(cam2_norm.detach()))
    target1 = _max_onehot(_with_background(cam1_norm_small.detach()))
    return (_top_fraction_mean(torch.abs(target2 - cam_rv1_norm_small), ECR_TOP_FRACTION)
            + _top_fraction_mean(torch.abs(target1 - cam_rv2_norm), ECR_TOP_FRACTION))


def boundary_loss(edge: torch.Tensor, sb_map: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the semantic edge map against the label-masked boundary map.

    t = clamp(sb_map, 0, 1) y,  p = sigmoid(edge);  L = -mean[t log p + (1 - t) log(1 - p)]
    (torch's BCE, logs clamped at -100, as released). The clamp keeps resized maps a valid target.
    """
    target = sb_map.clamp(0, 1) * label
    prob = torch.sigmoid(edge)
    # torch's BCE raises on a NaN input: score NaN as 0.5, and add 0 * sum so that the NaN still
    # reaches the finite check of the training loop (same value and gradient otherwise).
    return F.binary_cross_entropy(torch.nan_to_num(prob, nan=0.5), target) + 0 * prob.sum()


def _per_channel_filter(x: torch.Tensor, kernel: tuple) -> torch.Tensor:
    """3x3 cross-correlation of every channel with one kernel, zero padding."""
    c = x.shape[1]
    weight = torch.tensor(kernel, dtype=x.dtype, device=x.device).expand(c, 1, 3, 3)
    return F.conv2d(x, weight, padding=1, groups=c)


def _charbonnier(s: torch.Tensor) -> torch.Tensor:
    """C(s) = sqrt(s^2 + 1e-6), a differentiable |s|."""
    return torch.sqrt(s * s + CHARBONNIER_EPS ** 2)


def smoothness_loss(prob: torch.Tensor, sb_map: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Boundary-aware smoothness of the class probabilities (released ``smoothness_loss``).

    w = exp(-10 sb_map),  C(s) = sqrt(s^2 + 1e-6),  Sx, Sy Sobel and Lap Laplacian 3x3 filters:
    L = 10 mean[(C(|Sx p| w) + C(|Sy p| w)) y] + mean[C(|Lap p| w) y],  p = sigmoid(raw CAM).
    Gradients of p are penalised everywhere except across the semantic boundaries.
    """
    weight = torch.exp(-SMOOTH_EDGE_SHARPNESS * sb_map)
    grad_x = _charbonnier(torch.abs(_per_channel_filter(prob, SOBEL_X)) * weight)
    grad_y = _charbonnier(torch.abs(_per_channel_filter(prob, SOBEL_Y)) * weight)
    second = _charbonnier(torch.abs(_per_channel_filter(prob, LAPLACIAN)) * weight)
    return SMOOTH_FIRST_ORDER_WEIGHT * torch.mean((grad_x + grad_y) * label) + torch.mean(second * label)


def _full_precision(t: torch.Tensor | None) -> torch.Tensor | None:
    """Half and bfloat16 tensors as float32; other tensors (and None) unchanged."""
    if t is not None and t.is_floating_point() and t.element_size() < 4:
        return t.float()
    return t


def affinity_loss(aff: torch.Tensor, bg_label: torch.Tensor, fg_label: torch.Tensor,
                  neg_label: torch.Tensor) -> dict[str, torch.Tensor]:
    """AffinityNet cross-entropies over the radius pairs (released train_aff.py).

    L_bg = -sum(bg log(a + 1e-5)) / (sum bg + 1e-5),  L_fg likewise with fg,
    L_neg = -sum(neg log(1 + 1e-5 - a)) / (sum neg + 1e-5);  L = L_bg/4 + L_fg/4 + L_neg/2.
    Returns 'loss', 'bg_loss', 'fg_loss', 'neg_loss'.
    """
    aff = _full_precision(aff)  # 1 + 1e-5 rounds to 1 in half precision
    bg_loss = torch.sum(-bg_label * torch.log(aff + 1e-5)) / (torch.sum(bg_label) + 1e-5)
    fg_loss = torch.sum(-fg_label * torch.log(aff + 1e-5)) / (torch.sum(fg_label) + 1e-5)
    neg_loss = torch.sum(-neg_label * torch.log(1.0 + 1e-5 - aff)) / (torch.sum(neg_label) + 1e-5)
    loss = bg_loss / 4 + fg_loss / 4 + neg_loss / 2
    return {"loss": loss, "bg_loss": bg_loss, "fg_loss": fg_loss, "neg_loss": neg_loss}


def _resize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The released view-2 resize: bilinear by a scale factor, corners aligned."""
    return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=True)


def sb_step_loss(out1: SBViews, out2: SBViews, label: torch.Tensor, sb_map: torch.Tensor | None,
                 scale: float = 0.3, boundary_weight: float = 0.01,
                 smooth_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """The whole per-step objective of the released train_SB.py.

    out1, out2: the network outputs (.cam, .cam_rv, .edge) of view 1 and of view 2 = view 1 resized by ``scale``;
    label: (N, K-1) foreground 0/1 labels; sb_map: (N, K, H, W) boundary map of view 1 in [0, 1].
    L = cls + rv_min + ER + ECR + boundary_weight/2 (B_1 + B_2) + smooth_weight/2 (S_1 + S_2),
    cls and rv_min averaged over the views. With both weights 0 this is SEAM: sb_map may be None
    and the edges are not used (they may be None too).
    Returns 'loss', 'loss_cls' (classification + rv-min, as released), 'loss_er', 'loss_ecr',
    'loss_boundary', 'loss_smooth' (both weighted).
    """
    if sb_map is None and (boundary_weight > 0 or smooth_weight > 0):
        raise ValueError("sb_step_loss needs sb_map when boundary_weight or smooth_weight is positive")
    # Under autocast the BCE would refuse half precision and the top-k means would lose it.
    with torch.autocast(out1.cam.device.type, enabled=False):
        cam1, cam_rv1, edge1 = (_full_precision(t) for t in (out1.cam, out1.cam_rv, out1.edge))
        cam2, cam_rv2, edge2 = (_full_precision(t) for t in (out2.cam, out2.cam_rv, out2.edge))
        label = label.to(cam1.dtype)
        label = torch.cat((torch.ones_like(label[:, :1]), label), dim=1)[..., None, None]
        zero = cam1.new_zeros(())

        loss_boundary = loss_smooth = zero
        if sb_map is not None:
            sb_map = sb_map.to(cam1.dtype)
            sb_map2 = _resize(sb_map, scale)
        if boundary_weight > 0:
            loss_boundary = boundary_weight * 0.5 * (boundary_loss(edge1, sb_map, label)
                                                     + boundary_loss(edge2, sb_map2, label))
        if smooth_weight > 0:
            loss_smooth = smooth_weight * 0.5 * (smoothness_loss(torch.sigmoid(cam1), sb_map, label)
                                                 + smoothness_loss(torch.sigmoid(cam2), sb_map2, label))

        loss_cls = ((classification_loss(cam1, label) + classification_loss(cam2, label)) / 2
                    + (rv_min_loss(cam_rv1, label) + rv_min_loss(cam_rv2, label)) / 2)
        cam1_norm_small = _resize(max_norm(cam1), scale) * label
        cam_rv1_norm_small = _resize(max_norm(cam_rv1), scale) * label
        cam2_norm = max_norm(cam2) * label
        cam_rv2_norm = max_norm(cam_rv2) * label
        loss_er = er_loss(cam1_norm_small, cam2_norm)
        loss_ecr = ecr_loss(cam1_norm_small, cam_rv1_norm_small, cam2_norm, cam_rv2_norm)

        loss = loss_cls + loss_er + loss_ecr + loss_boundary + loss_smooth
    return {"loss": loss, "loss_cls": loss_cls, "loss_er": loss_er, "loss_ecr": loss_ecr,
            "loss_boundary": loss_boundary, "loss_smooth": loss_smooth}


def _pil_nearest_index(n_out: int, n_in: int) -> torch.Tensor:
    """Source indices of PIL's nearest resize (``ImagingScaleAffine``): floor((i + 0.5) * n_in / n_out),
    the position summed step by step in float64 as PIL's loop does (which decides the ties)."""
    step = n_in / n_out
    pos = np.cumsum(np.concatenate([[step * 0.5], np.full(n_out - 1, step)]))
    return torch.from_numpy(np.minimum(pos.astype(np.int64), n_in - 1))


def resize_label(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """An ``(N, H, W)`` label map resized by nearest neighbour exactly as PIL's ``Image.NEAREST``,
    which deeplab-pytorch uses to fit the labels to each output."""
    if tuple(label.shape[-2:]) == tuple(size):
        return label.long()
    rows = _pil_nearest_index(size[0], label.shape[-2]).to(label.device)
    cols = _pil_nearest_index(size[1], label.shape[-1]).to(label.device)
    return label.long()[:, rows[:, None], cols[None, :]]


def balanced_cross_entropy(logits: torch.Tensor, label: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Background/foreground balanced cross-entropy (AdvCAM, CLIMS):

    L = 1/2 (sum_{x: y=0} -log p_0(x) / |B| + sum_{x: 0<y<ignore} -log p_y(x) / |F|),
    B and F the background and foreground pixels; an empty set contributes 0.
    """
    ce = F.cross_entropy(logits.float(), label, ignore_index=ignore_index, reduction="none")
    background = label == 0
    foreground = (label != 0) & (label != ignore_index)
    bg = (ce * background).sum() / background.sum().clamp(min=1)
    fg = (ce * foreground).sum() / foreground.sum().clamp(min=1)
    return (bg + fg) / 2


def segmentation_loss(outputs: list[torch.Tensor], label: torch.Tensor, balanced: bool = False,
                      ignore_index: int = 255) -> torch.Tensor:
    """The DeepLab training loss: the sum over the network's outputs (MSC: full, 0.5x, 0.75x and
    their max) of the cross-entropy against the label resized to each output by nearest neighbour,

    L = sum_o CE(outputs_o, resize(y, size_o)),  CE averaged over the non-ignored pixels
    (or :func:`balanced_cross_entropy` with ``balanced``).
    """
    terms = []
    for logits in outputs:
        target = resize_label(label, logits.shape[-2:])
        if balanced:
            terms.append(balanced_cross_entropy(logits, target, ignore_index))
        else:
            terms.append(F.cross_entropy(logits.float(), target, ignore_index=ignore_index))
    return torch.stack(terms).sum()
