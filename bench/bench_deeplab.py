"""DeepLab-v2 ResNet-101 MSC: training iterations/s and inference images/s, ours against a faithful
re-run of deeplab-pytorch's step (main.py ``train`` and ``test``, re-implemented here from reading it).

    .venv/bin/python bench/bench_deeplab.py --crop 97 --iters 3     # about 1-2 minutes on 2 cores

Released training step: forward MSC, for each of the 4 outputs the labels resized one by one with
PIL nearest on the CPU and ``nn.CrossEntropyLoss(ignore_index=255)``, loss / ITER_SIZE backward,
after ITER_SIZE batches ``SGD.step`` (3 groups: backbone convs, ASPP weights, ASPP biases) and
``PolynomialLR.step(epoch=iteration)``. Ours: train_seg.py's step (``segmentation_loss``, PolyOptimizer
with step_size 10). Same network, same weights, same data; the losses must agree.
"""
from __future__ import annotations

import argparse

import benchutil  # noqa: F401  (puts the repository on sys.path)
import numpy as np
import torch
import torch.nn.functional as F
from benchutil import best_times, machine
from PIL import Image
from torch import nn

import infer_seg
import train_seg
from network import deeplab_v2
from tool.losses import segmentation_loss


def released_resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """main.py ``resize_labels``: each label through PIL nearest as a float image."""
    out = [np.asarray(Image.fromarray(label.float().numpy()).resize(size, resample=Image.NEAREST)) for label in labels]
    return torch.LongTensor(np.stack(out))


def released_optimizer(model: deeplab_v2.Net, lr: float, wd: float) -> torch.optim.SGD:
    def params(key: str):
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d):
                if key == "1x" and "layer" in name:
                    yield from m.parameters()
                elif key == "10x" and "aspp" in name:
                    yield m.weight
                elif key == "20x" and "aspp" in name:
                    yield m.bias
    return torch.optim.SGD([{"params": params("1x"), "lr": lr, "weight_decay": wd},
                            {"params": params("10x"), "lr": 10 * lr, "weight_decay": wd},
                            {"params": params("20x"), "lr": 20 * lr, "weight_decay": 0.0}], momentum=0.9)


def released_poly(optimizer: torch.optim.SGD, base_lrs: list[float], iteration: int, step_size: int = 10,
                  iter_max: int = 20000, power: float = 0.9) -> None:
    """PolynomialLR.step(epoch=iteration)."""
    if iteration == 0 or iteration % step_size or iteration > iter_max:
        return
    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = base * (1 - iteration / iter_max) ** power


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--crop", default=97, type=int)
    parser.add_argument("--batch", default=2, type=int)
    parser.add_argument("--iter_size", default=2, type=int)
    parser.add_argument("--iters", default=3, type=int)
    parser.add_argument("--images", default=4, type=int)
    parser.add_argument("--repeat", default=2, type=int)
    args = parser.parse_args()
    torch.manual_seed(0)
    num_classes = 21
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(args.batch, 3, args.crop, args.crop, generator=g) * 50,
                torch.randint(0, num_classes, (args.batch, args.crop, args.crop), generator=g))
               for _ in range(args.iter_size)]
    init = deeplab_v2.Net(num_classes).state_dict()

    def ours_train() -> float:
        net = deeplab_v2.Net(num_classes)
        net.load_state_dict(init)
        net.train()
        opt_args = train_seg.get_arg_parser().parse_args(["--label_dir", "x"])
        optimizer = train_seg.make_optimizer(net, opt_args)
        for _ in range(args.iters):
            optimizer.zero_grad(set_to_none=True)
            for img, label in batches:
                loss = segmentation_loss(net(img), label)
                (loss / args.iter_size).backward()
            optimizer.step()
        return loss.item()

    def released_train() -> float:
        net = deeplab_v2.Net(num_classes)
        net.load_state_dict(init)
        net.train()
        for p in net.parameters():  # released: BN has requires_grad, only left out of the optimiser
            p.requires_grad_(True)
        optimizer = released_optimizer(net, 2.5e-4, 5e-4)
        base_lrs = [grp["lr"] for grp in optimizer.param_groups]
        criterion = nn.CrossEntropyLoss(ignore_index=255)
        for iteration in range(1, args.iters + 1):
            optimizer.zero_grad()
            for img, label in batches:
                iter_loss = 0
                for logit in net(img):
                    h, w = logit.shape[-2:]
                    iter_loss += criterion(logit, released_resize_labels(label, (h, w)))
                iter_loss /= args.iter_size
                iter_loss.backward()
            optimizer.step()
            released_poly(optimizer, base_lrs, iteration)
        return iter_loss.item() * args.iter_size

    images = [torch.randn(3, args.crop + 16 * i, args.crop + 8 * i, generator=g) * 50 for i in range(args.images)]
    net_eval = deeplab_v2.Net(num_classes)
    net_eval.load_state_dict(init)
    net_eval.eval()

    def ours_infer() -> list[np.ndarray]:
        return [infer_seg.predict_probs(net_eval, img, [1.0], False, torch.device("cpu")).argmax(0) for img in images]

    @torch.no_grad()
    def released_infer() -> list[np.ndarray]:
        out = []
        for img in images:
            logits = F.interpolate(net_eval(img[None]), size=img.shape[-2:], mode="bilinear", align_corners=False)
            out.append(torch.argmax(F.softmax(logits, dim=1), dim=1)[0].numpy())
        return out

    print(machine(), f"torch threads {torch.get_num_threads()}")
    train = best_times({"released": released_train, "ours": ours_train}, args.repeat)
    infer = best_times({"released": released_infer, "ours": ours_infer}, args.repeat)
    assert abs(train["ours"][1] - train["released"][1]) < 1e-3 * abs(train["released"][1]), \
        (train["ours"][1], train["released"][1])
    same = all(np.array_equal(a, b) for a, b in zip(infer["ours"][1], infer["released"][1], strict=True))
    print(f"training, {args.iters} iterations of {args.batch} x {args.iter_size} crops of {args.crop}px "
          f"(last loss {train['ours'][1]:.5f} ours, {train['released'][1]:.5f} released)")
    for name in ("released", "ours"):
        print(f"  {name:9s} {args.iters / train[name][0]:.3f} iterations/s")
    print(f"  ours / released speed: {train['released'][0] / train['ours'][0]:.2f}x")
    print(f"inference, {args.images} images, MSC + upsample + softmax + argmax (identical labels: {same})")
    for name in ("released", "ours"):
        print(f"  {name:9s} {args.images / infer[name][0]:.3f} images/s")
    print(f"  ours / released speed: {infer['released'][0] / infer['ours'][0]:.2f}x")


if __name__ == "__main__":
    main()
