"""A tiny training run on synthetic data through ``tool.trainloop.fit`` itself, used by the tests of
the training infrastructure (signals, checkpoints, exact resume, torchrun).

Like train_SB.py it runs two views per step through one (possibly DDP-wrapped) model, draws from
Python's, NumPy's and torch's generators, decays an SGD-with-momentum learning rate polynomially
and lets ``fit`` checkpoint every epoch and on SIGTERM/SIGINT; ``--resume`` continues. Each rank
ends by saving its weights and the sample indices it trained on to OUT/final_rankR.pt.
"""
from __future__ import annotations

import argparse
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tool.distributed import DistInfo, distributed_session, unwrap, wrap_model  # noqa: E402
from tool.logutils import setup_logging  # noqa: E402
from tool.torchutils import PolyOptimizer  # noqa: E402
from tool.trainloop import fit, make_train_loader, resume_state  # noqa: E402


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
    parser.add_argument("--save_every_epoch", action="store_true")
    parser.add_argument("--pause_at", default=-1, type=int,
                        help="before this step log 'paused' and wait (a minute at most) for a signal")
    return parser.parse_args(argv)


def fit_args(args: argparse.Namespace) -> argparse.Namespace:
    """The options ``fit`` reads, as the stage scripts' add_train_args gives them."""
    return argparse.Namespace(
        session_name=str(args.out / "tiny"), max_epoches=args.epochs, batch_size=args.batch_size,
        num_workers=args.workers, seed=args.seed, resume="auto" if args.resume else None, amp=False,
        tblog_dir=None, log_every=1, tb_image_every=10**9, save_every_epoch=args.save_every_epoch, deterministic=False)


def wait_for_signal() -> None:
    """Wait (a minute at most) until fit's own handler has seen SIGTERM or SIGINT."""
    stop = signal.getsignal(signal.SIGTERM).__self__  # the StopSignal that fit installed
    deadline = time.monotonic() + 60
    while not stop.requested and time.monotonic() < deadline:
        time.sleep(0.01)


def main(argv: list[str] | None = None) -> list[float]:
    """Train; return the loss of every step of this run (this rank's)."""
    args = parse_args(argv)
    with distributed_session("cpu") as info:  # as the stage scripts run
        return train(args, info)


def train(args: argparse.Namespace, info: DistInfo) -> list[float]:
    run_args = fit_args(args)
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
    args.out.mkdir(parents=True, exist_ok=True)
    sampler, loader = make_train_loader(dataset, run_args, info)
    optimizer = PolyOptimizer(net.parameters(), lr=0.1, weight_decay=5e-4, momentum=0.9,
                              max_step=sampler.batches_per_epoch() * args.epochs)
    start = resume_state(run_args, net, optimizer)
    model = wrap_model(net, info)
    losses: list[float] = []
    seen: list[int] = []

    def step_fn(model: nn.Module, pack: list) -> tuple[dict, None]:
        image, label, index = pack
        if optimizer.global_step + 1 == args.pause_at:
            logger.info("paused before step %d", args.pause_at)
            wait_for_signal()
        small = F.interpolate(image, scale_factor=random.choice((0.5, 0.75)), mode="bilinear")
        terms = {"view1": F.cross_entropy(model(image), label),
                 "view2": (1 + np.random.rand()) * F.cross_entropy(model(small), label)}  # noqa: NPY002
        terms["loss"] = terms["view1"] + terms["view2"]
        losses.append(terms["loss"].item())
        seen.extend(index.tolist())
        return terms, None

    fit(args=run_args, info=info, model=model, optimizer=optimizer, loader=loader, sampler=sampler,
        step_fn=step_fn, logger=logger, start=start)
    final = {"model": unwrap(model).state_dict(), "seen": torch.tensor(seen)}
    torch.save(final, args.out / f"final_rank{info.rank}.pt")
    return losses


if __name__ == "__main__":
    main()
