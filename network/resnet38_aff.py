"""AffinityNet on ResNet-38: pixel affinities ``exp(-mean |f_i - f_j|)`` between positions
within a radius on the 1/8 feature map (the pair layout of :mod:`tool.affinity`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from network import resnet38d
from tool.affinity import effective_radius, get_indices_of_pairs


def dense_affinity_matrix(aff: torch.Tensor, ind_from: torch.Tensor, ind_to: torch.Tensor,
                          area: int) -> torch.Tensor:
    """The symmetric ``(area, area)`` matrix of one image's pair affinities ``(num_offsets,
    num_sources)``, with ones on the diagonal; pairs out of reach are 0."""
    rows = ind_from.repeat(aff.shape[0])  # offset-major, as aff.reshape(-1)
    values = aff.reshape(-1)
    matrix = torch.zeros(area, area, dtype=aff.dtype, device=aff.device)
    matrix.index_put_((rows, ind_to), values, accumulate=True)
    matrix.index_put_((ind_to, rows), values, accumulate=True)
    matrix.diagonal().add_(1)
    return matrix


class Net(resnet38d.Net):
    """``forward(x)`` -> affinities ``(N, num_offsets, num_sources)``; ``forward(x, to_dense=True)``
    (N = 1) -> the dense symmetric ``(HW, HW)`` matrix of the 1/8 map.

    The radius falls back to a smaller one on maps too small for it (as released).
    """

    def __init__(self, width: float = 1.0, freeze_bn: bool = True, radius: int = 5) -> None:
        super().__init__(width, freeze_bn)
        c = self.channels
        self.f8_3 = nn.Conv2d(c["conv4"], 64, 1, bias=False)
        self.f8_4 = nn.Conv2d(c["conv5"], 128, 1, bias=False)
        self.f8_5 = nn.Conv2d(c["conv7"], 256, 1, bias=False)
        self.f9 = nn.Conv2d(64 + 128 + 256, 448, 1, bias=False)
        nn.init.kaiming_normal_(self.f8_3.weight)
        nn.init.kaiming_normal_(self.f8_4.weight)
        nn.init.kaiming_normal_(self.f8_5.weight)
        nn.init.xavier_uniform_(self.f9.weight, gain=4)
        self.not_training += [self.b2, self.b2_1, self.b2_2]
        self.from_scratch_layers = [self.f8_3, self.f8_4, self.f8_5, self.f9]
        self.radius = radius

    def forward(self, x: torch.Tensor, to_dense: bool = False) -> torch.Tensor:
        d = self.forward_as_dict(x)
        f8_3 = F.elu(self.f8_3(d["conv4"]))
        f8_4 = F.elu(self.f8_4(d["conv5"]))
        f8_5 = F.elu(self.f8_5(d["conv7"]))
        f = F.elu(self.f9(torch.cat([f8_3, f8_4, f8_5], dim=1)))

        n, c, h, w = f.shape
        radius = effective_radius(self.radius, (h, w))
        if radius < 2:
            raise ValueError(f"a {h}x{w} feature map is too small for pair affinities (needs at least 5x5)")
        ind_from, ind_to = (torch.from_numpy(i).to(x.device) for i in get_indices_of_pairs(radius, (h, w)))
        f = f.reshape(n, c, h * w)
        f_from = f.index_select(2, ind_from).unsqueeze(2)
        f_to = f.index_select(2, ind_to).view(n, c, -1, ind_from.numel())
        aff = torch.exp(-torch.mean(torch.abs(f_to - f_from), dim=1))
        if not to_dense:
            return aff
        if n != 1:
            raise ValueError(f"to_dense needs a batch of one image, got {n}")
        return dense_affinity_matrix(aff[0], ind_from, ind_to, h * w)
