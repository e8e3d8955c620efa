"""A tiny training run on synthetic data, used only by the tests of the training infrastructure.

Like train_SB.py it runs two views per step through one (possibly DDP-wrapped) model, draws from
Python's, NumPy's and torch's generators, decays an SGD-with-momentum learning rate polynomially,
checkpoints every epoch and on SIGTERM/SIGINT, resumes with ``--resume`` and runs under torchrun.
Each rank ends by saving its weights and the sample indices it trained on to OUT/final_rankR.pt.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tool.checkpoint import (  # noqa: E402
    ResumableSampler,
    StopSignal,
    check_finite,
    ignore_stop_signals,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from tool.distributed import all_reduce_mean, cleanup, init_distributed, unwrap, wrap_model  # noqa: E402
from tool.logutils import progress, setup_logging  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--epochs", default=3, type=int)
    parser.add_argument("--samples", default=64, type=int)
    parser.add_argument("--num_classes", default=4, type=int)
    parser.add_argument("--batch_size", default=8, type=int, help="global batch")
    parser.add_argument("--workers", default=0, type=int)
    parser.add_argument("--seed", default=7, type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--pause_at", default=-1, type=int,
                        help="after this step wait (a minute at most) for a signal: a test stops it there")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[float]:
    """Train; return the loss of every step (averaged over ranks)."""
    args = parse_args(argv)
    info = init_distributed("cpu")
    logger = setup_logging(None, info)
    random.seed(args.seed)
    np.random.seed(args.seed)  # noqa: NPY002 (the legacy global generator is what is checkpointed)
    torch.manual_seed(args.seed)
    data = torch.Generator().manual_seed(0)
    images = torch.randn(args.samples, 3, 16, 16, generator=data)
    labels = torch.randint(args.num_classes, (args.samples,), generator=data)
    dataset = torch.utils.data.TensorDataset(images, labels, torch.arange(args.samples))
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Dropout2d(0.3),
                        nn.Conv2d(16, args.num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = wrap_model(net, info)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sampler = ResumableSampler(args.samples, shuffle=True, seed=args.seed, batch_size=args.batch_size,
                               drop_last=True, rank=info.rank, world_size=info.world_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size // info.world_size,
                                         sampler=sampler, drop_last=True, num_workers=args.workers,
                                         worker_init_fn=ignore_stop_signals, generator=torch.Generator())
    max_step = sampler.batches_per_epoch() * args.epochs
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt_path = args.out / "ckpt.pt"
    start_epoch, start_batch, step = 0, 0, 0
    if args.resume:
        ckpt = load_checkpoint(ckpt_path)
        unwrap(model).load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        start_epoch, start_batch, step = ckpt["epoch"], ckpt["extra"]["batch"], ckpt["step"]

    def save(epoch: int, batch: int) -> None:
        if info.is_main:
            save_checkpoint(ckpt_path, model=model, optimizer=optimizer, epoch=epoch, step=step,
                            args={k: str(v) for k, v in vars(args).items()}, extra={"batch": batch})

    losses, seen = [], []
    with StopSignal() as stop:
        for epoch in range(start_epoch, args.epochs):
            sampler.set_epoch(epoch)
            sampler.set_start_batch(start_batch if epoch == start_epoch else 0)
            for batch, (image, label, index) in enumerate(progress(loader, info), start=sampler.start_batch):
                for group in optimizer.param_groups:
                    group["lr"] = 0.1 * (1 - step / max_step) ** 0.9
                small = F.interpolate(image, scale_factor=random.choice((0.5, 0.75)), mode="bilinear")
                terms = {"view1": F.cross_entropy(model(image), label),
                         "view2": (1 + np.random.rand()) * F.cross_entropy(model(small), label)}  # noqa: NPY002
                check_finite(terms, step)
                loss = terms["view1"] + terms["view2"]
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
                losses.append(all_reduce_mean(loss.item(), info))
                seen += index.tolist()
                logger.info("step %d loss %.6f", step, losses[-1])
                deadline = time.monotonic() + 60 if step == args.pause_at else 0
                while not stop.requested and time.monotonic() < deadline:
                    time.sleep(0.01)
                if all_reduce_mean(float(stop.requested), info) > 0:
                    save(epoch, batch + 1)
                    logger.info("stopped at step %d", step)
                    raise SystemExit(stop.exit_code or 143)
            save(epoch + 1, 0)
    torch.save({"model": unwrap(model).state_dict(), "seen": torch.tensor(seen)},
               args.out / f"final_rank{info.rank}.pt")
    cleanup()
    return losses


if __name__ == "__main__":
    main()
