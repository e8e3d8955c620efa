"""ResNet-38 as a plain image classifier: the demo's stand-in for ImageNet pretraining
(``pretrain_demo.py``), whose backbone every network of the demo starts from."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from network import resnet38d


class Net(resnet38d.Net):
    """ResNet-38, global average pooling of conv7 and a linear layer: ``forward(x)`` -> logits
    ``(N, num_fg)``. Every layer trains, BatchNorm and conv1a included (the method's networks
    keep conv1a frozen, as the released ones do after ImageNet)."""

    def __init__(self, num_fg: int, width: float = 1.0) -> None:
        super().__init__(width, freeze_bn=False)
        self.dropout7 = nn.Dropout(0.5)
        self.fc = nn.Conv2d(self.channels["conv7"], num_fg, 1, bias=False)
        nn.init.xavier_uniform_(self.fc.weight)
        self.not_training = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(super().forward(x), 1)
        return self.fc(self.dropout7(pooled)).flatten(1)

    def backbone_state(self) -> dict[str, torch.Tensor]:
        """The backbone's entries, by their released names, in float16 (counts stay integers)."""
        return {k: v.half() if v.is_floating_point() else v for k, v in self.state_dict().items()
                if k in self.backbone_names}
