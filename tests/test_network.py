"""ResNet-38 SB network and AffinityNet against the released implementation.

tests/data/network_released_layout.json and network_released_outputs.npz were produced by the
released SBNet code (network/resnet38_SEAM_BD.py, network/resnet38_aff.py) run on the CPU in a
scratch folder, with every state_dict entry filled by ``fill_deterministic`` below.
"""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from network import resnet38_aff, resnet38_sb, resnet38d
from tool import imutils
from tool.affinity import get_indices_of_pairs, search_offsets
from tool.errors import InputError
from voc12.classes import VOC

DATA = Path(__file__).resolve().parent / "data"


def fill_deterministic(model: torch.nn.Module, seed: int = 0) -> None:
    """Fill every floating state_dict entry from a seeded generator, in sorted-key order."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var") or (tensor.dim() == 1 and name.endswith("weight")):
                values = 0.5 + torch.rand(tensor.shape, generator=gen)
            elif tensor.dim() == 1:
                values = 0.1 * torch.randn(tensor.shape, generator=gen)
            else:
                values = torch.randn(tensor.shape, generator=gen) / tensor[0].numel() ** 0.5
            tensor.copy_(values)


def to_input(images: np.ndarray) -> torch.Tensor:
    norm = imutils.Normalize()
    return torch.from_numpy(np.stack([norm(im) for im in images]).transpose(0, 3, 1, 2).copy())


def names(model: torch.nn.Module, params: list) -> list[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for p in params]


@pytest.fixture(scope="module")
def layout() -> dict:
    return json.loads((DATA / "network_released_layout.json").read_text())


@pytest.fixture(scope="module")
def released() -> dict:
    with np.load(DATA / "network_released_outputs.npz") as z:
        return dict(z)


@pytest.fixture(scope="module")
def sb_full() -> resnet38_sb.Net:
    model = resnet38_sb.Net()
    fill_deterministic(model)
    return model.eval()


@pytest.fixture(scope="module")
def aff_full() -> resnet38_aff.Net:
    model = resnet38_aff.Net()
    fill_deterministic(model)
    return model.eval()


def test_state_dict_layout_equals_released(layout, sb_full, aff_full):
    assert [[k, list(v.shape)] for k, v in sb_full.state_dict().items()] == layout["sb"]
    assert [[k, list(v.shape)] for k, v in aff_full.state_dict().items()] == layout["aff"]
    assert len(layout["sb"]) == 259 and len(layout["aff"]) == 232
    sb_params = sum(p.numel() for p in sb_full.parameters())
    assert sb_params == layout["sb_num_parameters"]
    assert round(sb_params / 1e6, 1) == 105.8
    assert sum(p.numel() for p in aff_full.parameters()) == layout["aff_num_parameters"]


def test_narrow_width_keeps_names(layout):
    sb = resnet38_sb.Net(width=0.125)
    aff = resnet38_aff.Net(width=0.125)
    assert list(sb.state_dict()) == [k for k, _ in layout["sb"]]
    assert list(aff.state_dict()) == [k for k, _ in layout["aff"]]
    assert sb.state_dict()["b7.conv_branch2b2.weight"].shape == (512, 256, 1, 1)
    assert sb.channels == {"conv1": 8, "conv2": 16, "conv3": 32, "conv4": 64, "conv5": 128,
                           "conv6": 256, "conv7": 512}
    assert sum(p.numel() for p in resnet38d.Net(width=0.125).parameters()) < 1.7e6


def test_normalize_equals_released_formula(released):
    images = released["sb_images"]
    x = to_input(images)
    assert np.array_equal(x.numpy(), released["sb_input"])
    mean, std = np.array(imutils.IMAGENET_MEAN), np.array(imutils.IMAGENET_STD)
    expected = ((images / 255.0 - mean) / std).astype(np.float32).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(x.numpy(), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(imutils.denormalize(x).numpy(), images.transpose(0, 3, 1, 2), atol=2e-4)


def test_sb_forward_matches_released(released, sb_full):
    x = torch.from_numpy(released["sb_input"])
    with torch.no_grad():
        outputs = sb_full(x)
    assert outputs._fields == ("cam", "cam_rv", "edge")
    for name in outputs._fields:
        out = getattr(outputs, name)
        assert out.shape == (2, VOC.num_classes, 64, 64)
        out = out.numpy()
        sample = out.reshape(-1)[released[f"sb_{name}_index"]]
        scale = np.abs(released[f"sb_{name}_sample"]).max()
        np.testing.assert_allclose(sample, released[f"sb_{name}_sample"], rtol=1e-5, atol=1e-6 * scale)
        np.testing.assert_allclose(out.astype(np.float64).sum(axis=(2, 3)), released[f"sb_{name}_sum"],
                                   rtol=1e-5, atol=1e-5 * scale * out.shape[2] * out.shape[3])


def test_aff_forward_matches_released(released, aff_full):
    with torch.no_grad():
        x = to_input(released["aff_images"])
        assert x.shape[2:] == (96, 96)
        aff = aff_full(x)
        dense = aff_full(x, to_dense=True)
        x_small = to_input(released["aff_small_images"])
        aff_small = aff_full(x_small)
        dense_small = aff_full(x_small, to_dense=True)
    assert aff.shape == (1, 34, 32)
    np.testing.assert_allclose(aff.numpy(), released["aff_affinity"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dense.numpy(), released["aff_dense"], rtol=1e-5, atol=1e-7)
    # A 7x7 map is too small for radius 5: the released code falls back to radius 3.
    assert aff_small.shape == (1, len(search_offsets(3)), 15)
    np.testing.assert_allclose(aff_small.numpy(), released["aff_small_affinity"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dense_small.double().sum(1).numpy(), released["aff_small_dense_sum"],
                               rtol=1e-5)

    # The dense matrix is symmetric, one on the diagonal and the pair affinities at (from, to).
    d = dense.numpy()
    np.testing.assert_array_equal(d, d.T)
    np.testing.assert_array_equal(np.diag(d), 1.0)
    ind_from, ind_to = get_indices_of_pairs(5, (12, 12))
    np.testing.assert_array_equal(d[np.tile(ind_from, 34), ind_to], aff.numpy().reshape(-1))
    assert np.count_nonzero(d) == 144 + 2 * 34 * 32


def test_aff_batch_shape_and_input_checks():
    model = resnet38_aff.Net(width=0.125).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        aff = model(x)
        assert aff.shape == (2, 34, 32)
        assert torch.all((aff > 0) & (aff <= 1))
        with pytest.raises(ValueError, match="batch of one"):
            model(x, to_dense=True)
        with pytest.raises(ValueError, match="too small"):
            model(torch.randn(1, 3, 32, 32))


def test_canny_quirk_and_rgb_each_match_cv2(released):
    images = released["sb_images"]
    x = torch.from_numpy(released["sb_input"])
    quirk = resnet38_sb.canny_edges(x).numpy()
    rgb = resnet38_sb.canny_edges(x, on_rgb=True).numpy()
    assert quirk.shape == rgb.shape == (2, 1, 64, 64)
    hwc = x.numpy().transpose(0, 2, 3, 1)
    # Independent cast: int32 truncates toward zero, the low byte wraps modulo 256.
    wrapped = np.ascontiguousarray((hwc.astype(np.int32) & 0xFF).astype(np.uint8))
    assert {0, 1, 2, 254, 255} <= set(np.unique(wrapped))
    for i in range(2):
        np.testing.assert_array_equal(quirk[i, 0], cv2.Canny(wrapped[i], 10, 100))
        np.testing.assert_array_equal(rgb[i, 0], cv2.Canny(np.ascontiguousarray(images[i]), 10, 100))
    assert (quirk != rgb).mean() > 0.01
    assert rgb.any() and quirk.any()


def test_canny_flag_changes_only_the_edge_output():
    torch.manual_seed(0)
    quirk_net = resnet38_sb.Net(num_classes=5, width=0.125).eval()
    rgb_net = resnet38_sb.Net(num_classes=5, width=0.125, canny_on_rgb=True).eval()
    rgb_net.load_state_dict(quirk_net.state_dict())
    x = to_input(np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8))
    with torch.no_grad():
        cam_a, rv_a, edge_a = quirk_net(x)
        cam_b, rv_b, edge_b = rgb_net(x)
    assert cam_a.shape == rv_a.shape == edge_a.shape == (1, 5, 32, 32)
    torch.testing.assert_close(cam_a, cam_b, rtol=0, atol=0)
    torch.testing.assert_close(rv_a, rv_b, rtol=0, atol=0)
    assert not torch.equal(edge_a, edge_b)


def frozen_names(model: torch.nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.split(".")[0] in ("conv1a", "b2", "b2_1", "b2_2")}


def test_frozen_layers_get_no_gradient():
    model = resnet38_sb.Net(width=0.125).train()
    cam, cam_rv, edge = model(torch.randn(2, 3, 32, 32))
    (cam.square().mean() + cam_rv.mean() + edge.square().mean()).backward()
    frozen = frozen_names(model)
    assert len(frozen) == 1 + 7 + 6 + 6  # conv1a; b2 with its shortcut; b2_1; b2_2
    for name, p in model.named_parameters():
        is_bn = ".bn" in name or name.startswith("bn7")
        if name in frozen or is_bn:
            assert p.grad is None and not p.requires_grad, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def running_means(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith("running_mean")}


def test_batchnorm_frozen_by_default_and_trained_without_freeze_bn():
    x = torch.randn(2, 3, 48, 48) * 3 + 1
    frozen = resnet38_aff.Net(width=0.125).train()
    before = running_means(frozen)
    frozen(x).sum().backward()
    assert all(torch.equal(before[k], v) for k, v in running_means(frozen).items())
    assert all(not m.training for m in frozen.modules() if isinstance(m, torch.nn.BatchNorm2d))

    trained = resnet38_aff.Net(width=0.125, freeze_bn=False).train()
    before = running_means(trained)
    trained(x).sum().backward()
    after = running_means(trained)
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert trained.b3.bn_branch2a.weight.grad is not None
    assert trained.b2.bn_branch2a.weight.grad is None  # b2 stays frozen


def test_dropout_active_in_train_mode_only():
    model = resnet38_sb.Net(width=0.125).train()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(model(x)[0], model(x)[0])
        model.eval()
        torch.testing.assert_close(model(x)[0], model(x)[0], rtol=0, atol=0)
    assert model.b6.dropout_2b1.p == 0.3 and model.b7.dropout_2b2.p == 0.5 and model.dropout7.p == 0.5


@pytest.mark.parametrize("net_class, key", [(resnet38_sb.Net, "sb"), (resnet38_aff.Net, "aff")])
def test_parameter_groups_as_released(layout, net_class, key):
    model = net_class(width=0.125).train()
    groups = model.get_parameter_groups()
    assert [names(model, g) for g in groups] == layout[f"{key}_groups"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(layout[f"{key}_trainable"])
    grouped = [n for g in groups for n in names(model, g)]
    assert len(grouped) == len(set(grouped)) and set(grouped) == trainable


def test_parameter_groups_with_trained_batchnorm():
    model = resnet38_sb.Net(width=0.125, freeze_bn=False).train()
    groups = [names(model, g) for g in model.get_parameter_groups()]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    grouped = [n for g in groups for n in g]
    assert len(grouped) == len(set(grouped)) and set(grouped) == trainable
    assert "b3.bn_branch2a.weight" in groups[0] and "bn7.bias" in groups[1]
    assert "b2.bn_branch2a.weight" not in grouped
    assert groups[2] == ["fc8.weight", "f8_3.weight", "f8_4.weight", "f9.weight"] and groups[3] == []


# --- load_weights --------------------------------------------------------------------------------

def test_load_weights_round_trip_and_module_prefix(tmp_path):
    source = resnet38_sb.Net(width=0.125)
    fill_deterministic(source, seed=3)
    ours = tmp_path / "ours.pth"
    torch.save({"model": source.state_dict(), "epoch": 2}, ours)
    released_style = tmp_path / "released.pth"
    torch.save({"module." + k: v for k, v in source.state_dict().items()}, released_style)
    for path in (ours, released_style):
        target = resnet38_sb.Net(width=0.125)
        resnet38d.load_weights(target, path, strict=True)
        for k, v in source.state_dict().items():
            assert torch.equal(target.state_dict()[k], v), k


def test_load_weights_tolerates_missing_num_batches_tracked(tmp_path):
    source = resnet38_aff.Net(width=0.125)
    fill_deterministic(source, seed=4)
    path = tmp_path / "old_torch.pth"
    torch.save({k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    target = resnet38_aff.Net(width=0.125)
    resnet38d.load_weights(target, path, strict=True)
    assert torch.equal(target.f9.weight, source.f9.weight)


def assert_one_line_input_error(call, match: str) -> None:
    with pytest.raises(InputError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


def test_load_weights_rejects_wrong_files(tmp_path):
    model = resnet38_sb.Net(width=0.125)
    assert_one_line_input_error(lambda: resnet38d.load_weights(model, tmp_path / "none.pth", strict=True),
                                "not found")

    wrong_kind = tmp_path / "wrong_kind.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, wrong_kind)
    assert_one_line_input_error(lambda: resnet38d.load_weights(model, wrong_kind, strict=False),
                                "shares no parameter name")

    other_width = tmp_path / "width_quarter.pth"
    torch.save({"model": resnet38_sb.Net(width=0.25).state_dict()}, other_width)
    assert_one_line_input_error(lambda: resnet38d.load_weights(model, other_width, strict=False),
                                r"conv1a.weight has shape \(16, 3, 3, 3\) in the file but \(8, 3, 3, 3\)")

    sb_checkpoint = tmp_path / "sb.pth"
    torch.save({"model": model.state_dict()}, sb_checkpoint)
    aff = resnet38_aff.Net(width=0.125)
    assert_one_line_input_error(lambda: resnet38d.load_weights(aff, sb_checkpoint, strict=True),
                                r"f9.weight has shape \(192, 195, 1, 1\) in the file but \(448, 448, 1, 1\)")

    backbone = resnet38d.Net(width=0.125)
    fill_deterministic(backbone, seed=5)
    backbone_checkpoint = tmp_path / "backbone.pth"
    torch.save({"model": backbone.state_dict()}, backbone_checkpoint)
    assert_one_line_input_error(lambda: resnet38d.load_weights(model, backbone_checkpoint, strict=True),
                                r"31 missing parameters \(first: edge_layer.classifier.bias\), 0 unexpected")
    resnet38d.load_weights(model, backbone_checkpoint, strict=False)
    assert torch.equal(model.b4.conv_branch2a.weight, backbone.b4.conv_branch2a.weight)

    not_torch = tmp_path / "text.pth"
    not_torch.write_text("hello")
    assert_one_line_input_error(lambda: resnet38d.load_weights(model, not_torch, strict=True),
                                "cannot be read as a torch weights file")


class _Exploit:
    """Unpickling this object would create ``marker``: any code could run in its place."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_load_weights_refuses_a_crafted_pickle(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "crafted.pth"
    torch.save({"model": {"conv1a.weight": _Exploit(marker)}}, path)
    assert not marker.exists()
    model = resnet38_sb.Net(width=0.125)
    assert_one_line_input_error(lambda: resnet38d.load_weights(model, path, strict=False),
                                "not a plain weights file: it asks to unpickle io.open")
    assert not marker.exists()


def test_affinitynet_starts_from_an_sb_checkpoint_backbone(tmp_path):
    sb = resnet38_sb.Net(width=0.125)
    path = tmp_path / "sb.pth"
    torch.save(sb.state_dict(), path)
    aff = resnet38_aff.Net(width=0.125)
    kept = resnet38d.load_weights(aff, path, strict=False)
    assert {"f8_5.weight", "f9.weight"} <= set(kept)  # f9 differs in shape, f8_5 is AffinityNet's own
    assert not set(kept) & aff.backbone_names
    for name in aff.backbone_names:
        assert torch.equal(aff.state_dict()[name], sb.state_dict()[name]), name
    assert torch.equal(aff.f8_3.weight, sb.f8_3.weight)  # same name and shape: loaded, as released
    with pytest.raises(InputError, match="f9.weight"):
        resnet38d.load_weights(resnet38_aff.Net(width=0.125), path, strict=True)
    with pytest.raises(InputError, match="another --backbone_width"):
        resnet38d.load_weights(resnet38_aff.Net(width=0.25), path, strict=False)
