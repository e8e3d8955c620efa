"""The demo's pretrained backbone: pretrain_demo.py on tiny data, and the shipped file against its
record and the script's current recipe."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

import pretrain_demo
import run_pipeline
from network import deeplab_v1_resnet38, resnet38_aff, resnet38_cls, resnet38_sb, resnet38d
from tool.fileio import load_label_png
from voc12 import demo
from voc12.demo import demo_classes, world_sample

SHIPPED = pretrain_demo.DEFAULT_OUT
WIDTH = 0.125


def backbone_keys(width: float) -> set[str]:
    return set(resnet38d.Net(width).state_dict())


def assert_backbone_from(state: dict[str, torch.Tensor], net_state: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Every backbone entry of a network holds the file's value (float16 widened exactly)."""
    for key, value in state.items():
        torch.testing.assert_close(net_state[prefix + key], value.to(net_state[prefix + key].dtype), rtol=0, atol=0)


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    work = tmp_path_factory.mktemp("pretrain")
    argv = ["--out", str(work / "bb.pth"), "--work_dir", str(work), "--num_images", "8", "--num_held_out", "4",
            "--num_classes", "3", "--image_size", "64", "--crop_size", "48", "--resize_long", "48", "64",
            "--batch_size", "4", "--max_epoches", "1", "--num_workers", "0", "--log_every", "1"]
    out = pretrain_demo.main(argv)
    return out, argv


def test_pretraining_writes_a_released_name_backbone(tiny_backbone):
    out, argv = tiny_backbone
    state = torch.load(out, weights_only=True)
    assert set(state) == backbone_keys(WIDTH)  # the released names, no classifier
    assert {v.dtype for k, v in state.items() if not k.endswith("num_batches_tracked")} == {torch.float16}
    resnet38d.Net(WIDTH).load_state_dict(state, strict=True)
    torch.manual_seed(0)  # the script's --seed: the classifier it started from
    init = resnet38_cls.Net(3, WIDTH).backbone_state()
    assert not torch.equal(init["b4_5.conv_branch2a.weight"], state["b4_5.conv_branch2a.weight"])
    assert not torch.equal(init["conv1a.weight"], state["conv1a.weight"])  # conv1a trains too
    assert state["b2.bn_branch2a.num_batches_tracked"].item() == 2  # BatchNorm trained: 2 steps of 4 images

    record = json.loads(out.with_suffix(".json").read_text())
    assert record["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert record["recipe"] == pretrain_demo.recipe(pretrain_demo.get_arg_parser().parse_args(argv))
    assert record["corpus"] == {"train_images": 8, "held_out_images": 4, "classes": list(demo_classes(3).names),
                                "sample": world_sample(64, 1000, 3, "objects")}
    for i, drawn in enumerate(record["corpus"]["sample"]):  # the fingerprint is of the corpus it trained on
        label = load_label_png(out.parent / "corpus" / "SegmentationClass" / f"train_{i:05d}.png")
        values, counts = np.unique(label, return_counts=True)
        assert drawn["label_counts"] == {str(v): int(c) for v, c in zip(values, counts, strict=True)}
    assert 0 <= record["held_out_top1"] <= 1


def test_every_demo_network_starts_from_the_whole_backbone(tiny_backbone):
    out, _ = tiny_backbone
    state = torch.load(out, weights_only=True)
    for net in (resnet38_sb.Net(num_classes=4, width=WIDTH), resnet38_aff.Net(width=WIDTH)):
        kept = resnet38d.load_weights(net, out, strict=False)
        assert set(kept) == set(net.state_dict()) - set(state)  # only the heads keep their init
        assert_backbone_from(state, net.state_dict())
    deeplab = deeplab_v1_resnet38.Net(4, width=WIDTH)
    deeplab_v1_resnet38.load_weights(deeplab, out)
    assert_backbone_from(state, deeplab.state_dict(), prefix="backbone.")


def test_the_shipped_backbone_is_what_its_record_says():
    record = json.loads(SHIPPED.with_suffix(".json").read_text())
    assert hashlib.sha256(SHIPPED.read_bytes()).hexdigest() == record["sha256"]
    # An edit of the recipe (a default of pretrain_demo.py) without retraining fails here.
    assert record["recipe"] == pretrain_demo.recipe(pretrain_demo.get_arg_parser().parse_args([]))
    assert SHIPPED.stat().st_size <= 10 * 2 ** 20
    state = torch.load(SHIPPED, weights_only=True)
    resnet38d.Net(record["recipe"]["backbone_width"]).load_state_dict(state, strict=True)
    assert record["recipe"]["backbone_width"] == run_pipeline.DEMO["backbone_width"]
    # The demo's classes are the corpus's first ones, as VOC's are among ImageNet's.
    num_demo = run_pipeline.DEMO["num_classes"]
    assert record["corpus"]["classes"][:num_demo] == list(demo_classes(num_demo).names)
    assert record["held_out_top1"] >= 0.9
    # The world the file was trained on is the world voc12.demo draws today: an edit of the world
    # without retraining fails here (a pixel may differ on another CPU, hence the tolerances).
    recipe = record["recipe"]
    now = world_sample(recipe["image_size"], recipe["corpus_seed"], recipe["num_classes"], pretrain_demo.CORPUS_LAYOUT)
    for then, drawn in zip(record["corpus"]["sample"], now, strict=True):
        np.testing.assert_allclose(drawn["mean_rgb"], then["mean_rgb"], atol=0.5)
        assert drawn["label_counts"].keys() == then["label_counts"].keys()
        area = sum(then["label_counts"].values())
        for key, count in then["label_counts"].items():
            assert abs(drawn["label_counts"][key] - count) <= 0.01 * area


def test_the_world_sample_sees_a_change_of_the_world(monkeypatch):
    before = world_sample(112, 1000, 12, "objects", count=2)
    assert before == world_sample(112, 1000, 12, "objects", count=2)
    monkeypatch.setattr(demo, "MARK_RADIUS", demo.MARK_RADIUS * 0.8)  # smaller marks, same draws
    after = world_sample(112, 1000, 12, "objects", count=2)
    moved = [max(abs(a - b) for a, b in zip(x["mean_rgb"], y["mean_rgb"], strict=True))
             for x, y in zip(before, after, strict=True)]
    assert max(moved) > 0.5  # beyond the shipped record's tolerance
