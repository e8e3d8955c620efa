"""DeepLab-v2 ResNet-101 (deeplab-pytorch's names and outputs), the torchvision name map and the
ResNet-38 DeepLab-v1 head."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from network import deeplab_v1_resnet38, deeplab_v2
from tool.errors import InputError

DATA = Path(__file__).parent / "data"
REFERENCE = DATA / "deeplab_v2_reference.npz"
REFERENCE_SEED = 11
REFERENCE_CLASSES = 21


def seeded_state(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Deterministic float64 weights for a DeepLab-v2 state_dict, drawn in sorted-name order (the
    recipe that made tests/data/deeplab_v2_reference.npz with deeplab-pytorch's own model code):
    conv weights N(0, 1/fan_in), BN weight 1 + 0.1 N, BN bias / running mean 0.1 N, running var
    1 + 0.2 |N|, ASPP biases 0.1 N."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(state):
        value = state[name]
        if name.endswith("num_batches_tracked"):
            out[name] = value.clone()
            continue
        r = torch.randn(value.shape, generator=g, dtype=torch.float64)
        if value.ndim == 4:
            out[name] = r / value[0].numel() ** 0.5
        elif name.endswith("running_var"):
            out[name] = 1 + 0.2 * r.abs()
        elif name.endswith("weight"):
            out[name] = 1 + 0.1 * r
        else:
            out[name] = 0.1 * r
    return out


@pytest.fixture(scope="module")
def seeded_net() -> deeplab_v2.Net:
    net = deeplab_v2.Net(REFERENCE_CLASSES).double()
    net.load_state_dict(seeded_state(net.state_dict(), REFERENCE_SEED), strict=True)
    return net


def test_state_dict_names_and_shapes_are_deeplab_pytorchs():
    net = deeplab_v2.Net(21)
    state = net.state_dict()
    assert len(state) == 632
    assert state["base.layer1.conv1.conv.weight"].shape == (64, 3, 7, 7)
    assert state["base.layer2.block1.shortcut.conv.weight"].shape == (256, 64, 1, 1)
    assert state["base.layer4.block23.conv3x3.conv.weight"].shape == (256, 256, 3, 3)
    assert state["base.layer5.block3.increase.bn.running_var"].shape == (2048,)
    assert state["base.aspp.c3.weight"].shape == (21, 2048, 3, 3)
    assert state["base.aspp.c3.bias"].shape == (21,)
    assert not any(".shortcut." in k for k in state if ".block2." in k)
    dilations = {name: m.dilation for name, m in net.base.named_modules() if name.endswith("conv3x3.conv")}
    assert dilations["layer3.block1.conv3x3.conv"] == (1, 1)
    assert dilations["layer4.block7.conv3x3.conv"] == (2, 2)
    assert dilations["layer5.block2.conv3x3.conv"] == (4, 4)
    assert net.base.layer3.block1.reduce.conv.stride == (2, 2)  # MSRA: the stride in the 1x1 reduce


def test_eval_and_train_logits_equal_deeplab_pytorch(seeded_net):
    """The arrays come from deeplab-pytorch's DeepLabV2_ResNet101_MSC with the same seeded weights,
    both in float64: the only differences are summation orders, ~1e-13 relative."""
    ref = np.load(REFERENCE)
    x = torch.from_numpy(ref["input"]).double()
    seeded_net.eval()
    with torch.no_grad():
        out = seeded_net(x).numpy()
    scale = np.abs(ref["eval"]).max()
    assert out.shape == ref["eval"].shape == (1, REFERENCE_CLASSES, 9, 9)
    np.testing.assert_allclose(out, ref["eval"], rtol=0, atol=1e-9 * scale)
    seeded_net.train()
    with torch.no_grad():
        outs = seeded_net(x)
    assert [tuple(o.shape[-2:]) for o in outs] == [(9, 9), (5, 5), (7, 7), (9, 9)]
    for i, o in enumerate(outs):
        np.testing.assert_allclose(o.numpy(), ref[f"train{i}"], rtol=0, atol=1e-9 * scale)
    seeded_net.eval()


def test_strict_load_of_deeplab_pytorch_names(tmp_path, seeded_net):
    state = {k: v.float() for k, v in seeded_net.state_dict().items()}
    path = tmp_path / "deeplabv2_resnet101_msc-vocaug.pth"
    torch.save(state, path)
    net = deeplab_v2.Net(REFERENCE_CLASSES)
    assert deeplab_v2.load_weights(net, path, strict=True) == []
    assert torch.equal(net.state_dict()["base.aspp.c2.weight"], state["base.aspp.c2.weight"])

    # Another class count: the head is skipped, and said so; the backbone still loads.
    other = deeplab_v2.Net(6)
    skipped = deeplab_v2.load_weights(other, path, strict=True)
    assert skipped == sorted(f"base.aspp.c{i}.{p}" for i in range(4) for p in ("bias", "weight"))
    assert torch.equal(other.state_dict()["base.layer5.block3.increase.conv.weight"],
                       state["base.layer5.block3.increase.conv.weight"])

    # The COCO init: a base network's names without 'base.', a 91-class head.
    coco = {k[len("base."):]: v for k, v in state.items() if not k.startswith("base.aspp")}
    coco.update({f"aspp.c{i}.weight": torch.zeros(91, 2048, 3, 3) for i in range(4)})
    torch.save(coco, tmp_path / "coco.pth")
    assert len(deeplab_v2.load_weights(deeplab_v2.Net(21), tmp_path / "coco.pth", strict=False)) == 8

    # A missing backbone parameter fails strict loading with one line.
    del state["base.layer3.block2.reduce.bn.running_mean"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(InputError, match="1 missing"):
        deeplab_v2.load_weights(deeplab_v2.Net(REFERENCE_CLASSES), tmp_path / "broken.pth", strict=True)


def test_torchvision_resnet101_maps_completely(tmp_path):
    import torchvision

    tv = torchvision.models.resnet101(weights=None).state_dict()
    ours = deeplab_v2.Net(21).state_dict()
    mapped = {k: deeplab_v2.torchvision_to_deeplab_name(k) for k in tv}
    dropped = sorted(k for k, v in mapped.items() if v is None)
    assert dropped == ["fc.bias", "fc.weight"]
    targets = ["base." + v for v in mapped.values() if v is not None]
    assert len(set(targets)) == len(targets)
    backbone = {k for k in ours if not k.startswith("base.aspp")}
    assert set(targets) == backbone  # every torchvision key lands, every backbone key is covered
    for k, v in mapped.items():
        if v is not None:
            assert tv[k].shape == ours["base." + v].shape, k
    path = tmp_path / "resnet101-63fe2227.pth"
    torch.save(tv, path)
    net = deeplab_v2.Net(21)
    kept = deeplab_v2.load_weights(net, path, strict=True)  # ImageNet weights: the head keeps its init
    assert kept == sorted(f"base.aspp.c{i}.{p}" for i in range(4) for p in ("bias", "weight"))
    assert torch.equal(net.state_dict()["base.layer4.block5.conv3x3.conv.weight"], tv["layer3.4.conv2.weight"])
    assert torch.equal(net.state_dict()["base.layer2.block1.shortcut.bn.running_mean"],
                       tv["layer1.0.downsample.1.running_mean"])


def test_parameter_groups_are_deeplab_pytorchs():
    net = deeplab_v2.Net(3).train()
    groups = net.get_parameter_groups()
    assert [g["lr_mult"] for g in groups] == [1, 10, 20]
    assert len(groups[0]["params"]) == 104  # every backbone conv (no biases), BN excluded
    assert [p.shape for p in groups[2]["params"]] == [(3,)] * 4
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert trainable == {id(p) for g in groups for p in g["params"]}  # frozen BN has no gradient


def test_resnet38_deeplab_v1_loads_sb_backbone(tmp_path):
    from network import resnet38_sb

    sb = resnet38_sb.Net(num_classes=4, width=0.125)
    torch.save(sb.state_dict(), tmp_path / "sb.pth")
    net = deeplab_v1_resnet38.Net(num_classes=4, width=0.125)
    kept = deeplab_v1_resnet38.load_weights(net, tmp_path / "sb.pth")
    assert all(not k.startswith("backbone.") for k in kept)
    assert torch.equal(net.backbone.b4_2.conv_branch2a.weight, sb.b4_2.conv_branch2a.weight)
    x = torch.randn(2, 3, 40, 48)
    net.train()
    outs = net(x)
    assert len(outs) == 1 and outs[0].shape == (2, 4, 40, 48)
    net.eval()
    assert net(x).shape == (2, 4, 40, 48)
    wrong = deeplab_v1_resnet38.Net(num_classes=4, width=0.25)
    with pytest.raises(InputError, match="backbone_width"):
        deeplab_v1_resnet38.load_weights(wrong, tmp_path / "sb.pth")
