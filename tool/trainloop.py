"""The training loops: epochs (train_SB.py, train_aff.py) and iterations with gradient accumulation
(train_seg.py), sharing resume, checkpoints, signals and logging.

Each script builds its model, data and optimiser and hands ``fit`` a ``step_fn(model, pack)``
that returns ``(losses, outputs)`` with ``losses['loss']`` the objective. ``fit`` owns what must be
the same in every stage: the poly schedule's step count, checkpoints written atomically at each
epoch end and on SIGTERM/SIGINT, exact resume (model, optimiser, RNG, position in the epoch), a
stop on a non-finite loss that keeps the last good checkpoint, progress bars, log lines and
TensorBoard curves; with ``--save_every_epoch`` also the weights of every epoch.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tool.checkpoint import (
    ResumableSampler,
    StopSignal,
    check_finite,
    ignore_stop_signals,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from tool.distributed import DistInfo, all_reduce_mean, ranks_agree, unwrap
from tool.errors import InputError, NonFiniteLoss
from tool.fileio import atomic_path
from tool.logutils import AverageMeter, TBWriter, Timer, progress
from tool.torchutils import LR_MULTS, PolyOptimizer
from tool.workers import WorkerLoader

StepFn = Callable[[torch.nn.Module, dict], tuple[dict[str, torch.Tensor], Any]]
PictureFn = Callable[[dict, Any], np.ndarray]


def checkpoint_path(args: argparse.Namespace) -> Path:
    return Path(args.session_name + ".ckpt")


def final_weights_path(args: argparse.Namespace) -> Path:
    return Path(args.session_name + ".pth")


def last_good_state(args: argparse.Namespace) -> str:
    """Where a stopped run's last good state is, said only if that checkpoint exists."""
    path = checkpoint_path(args)
    if path.is_file():
        return f"the last good state is {path} (resume with --resume)"
    every = f"every {args.save_every} iterations" if getattr(args, "max_iters", None) else "at each epoch end"
    return f"no checkpoint was written yet (it is written {every})"


def epoch_weights_path(args: argparse.Namespace, epoch: int) -> Path:
    """Where ``--save_every_epoch`` keeps the weights after ``epoch`` epochs (1-based)."""
    return Path(f"{args.session_name}_ep{epoch}.pth")


def save_weights(net: torch.nn.Module, path: Path) -> None:
    """A plain state_dict, loadable by the released code, written atomically."""
    with atomic_path(path) as tmp:
        torch.save(net.state_dict(), tmp)


def make_poly_optimizer(net: torch.nn.Module, args: argparse.Namespace, sampler: ResumableSampler) -> PolyOptimizer:
    """The released optimiser and learning-rate groups: pretrained x1/x2, from scratch x10/x20, no
    decay on biases; the poly schedule spans ``args.max_epoches``."""
    groups = net.get_parameter_groups()
    lr, wt_dec = args.lr, args.wt_dec
    return PolyOptimizer([
        {"params": params, "lr": mult * lr, "weight_decay": 0 if i % 2 else wt_dec}  # biases: no decay
        for i, (params, mult) in enumerate(zip(groups, LR_MULTS, strict=True))
    ], lr=lr, weight_decay=wt_dec, max_step=sampler.batches_per_epoch() * args.max_epoches, momentum=args.momentum)


class SkipBadItems(torch.utils.data.Dataset):
    """``--skip_bad_images``: an item whose files do not read (a corrupt image or CRF file) is
    replaced by the next readable one, with one warning line naming the file."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict:
        for offset in range(len(self)):
            try:
                return self.dataset[(index + offset) % len(self)]
            except InputError as e:
                print(f"warning: skipped, {e}", file=sys.stderr)
        raise InputError("no item of the training list could be read")


def make_train_loader(dataset: torch.utils.data.Dataset, args: argparse.Namespace,
                      info: DistInfo) -> tuple[ResumableSampler, torch.utils.data.DataLoader]:
    if args.batch_size % info.world_size:
        raise InputError(f"--batch_size {args.batch_size} does not split over {info.world_size} ranks")
    if len(dataset) < args.batch_size:
        raise InputError(f"the training list holds {len(dataset)} images, fewer than --batch_size"
                         f" {args.batch_size}: no step would run")
    if getattr(args, "skip_bad_images", False):
        dataset = SkipBadItems(dataset)
    sampler = ResumableSampler(len(dataset), shuffle=True, seed=args.seed, batch_size=args.batch_size,
                               drop_last=True, rank=info.rank, world_size=info.world_size)
    loader = WorkerLoader(
        dataset, batch_size=args.batch_size // info.world_size, sampler=sampler, drop_last=True,
        num_workers=args.num_workers, pin_memory=info.device.type == "cuda", worker_init_fn=ignore_stop_signals,
        # A private generator keeps the global RNG (dropout) independent of loader creation, so that
        # a resumed run draws the same numbers as an uninterrupted one.
        generator=torch.Generator())
    return sampler, loader


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """With ``enabled`` (``--deterministic``): deterministic cuDNN and cuBLAS kernels, so that a GPU
    run repeats bit for bit and a resumed one ends where an uninterrupted one does (the CPU always
    does). An op without a deterministic CUDA kernel warns rather than stops. The previous setting
    is restored on exit."""
    if not enabled:
        yield
        return
    # cuBLAS is deterministic only with a fixed workspace; torch reads this when it needs one.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _stop_everywhere(stop: StopSignal, info: DistInfo) -> bool:
    """A signal may reach the ranks one step apart: agree, or the collective ops would hang."""
    if not info.distributed:
        return stop.requested
    flag = torch.tensor([1.0 if stop.requested else 0.0], device=info.device)
    torch.distributed.all_reduce(flag)
    return bool(flag.item() > 0)


def resume_state(args: argparse.Namespace, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer) -> dict:
    """Load ``--resume`` into model, optimiser and RNGs; return where to start: ``epoch``, ``batch``
    (batches done in that epoch) and the AMP ``scaler`` state."""
    if not args.resume:
        return {"epoch": 0, "batch": 0}
    path = checkpoint_path(args) if args.resume == "auto" else Path(args.resume)
    if not path.is_file():
        raise InputError(f"no checkpoint to resume from at {path}")
    ckpt = load_checkpoint(path)
    unwrap(model).load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    extra = ckpt.get("extra") or {}
    return {"epoch": int(ckpt["epoch"]), "batch": int(extra.get("batch", 0)), "scaler": extra.get("scaler")}


class _Session:
    """What both loops share: AMP (float16 autocast and its loss scaler, CUDA only), the loss meter,
    log lines and TensorBoard curves, the timer, the checkpoint writer and the signal stop."""

    def __init__(self, args: argparse.Namespace, info: DistInfo, net: torch.nn.Module,
                 optimizer: PolyOptimizer, logger: logging.Logger, total: int, start: dict) -> None:
        self.args, self.info, self.net, self.optimizer, self.logger = args, info, net, optimizer, logger
        self.use_amp = args.amp and info.device.type == "cuda"
        if args.amp and not self.use_amp:
            logger.warning("--amp has no effect on %s: training in float32", info.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        if start.get("scaler"):
            self.scaler.load_state_dict(start["scaler"])
        self.tb = TBWriter(args.tblog_dir, info)
        self.meter = AverageMeter()
        self.timer = Timer(total=total, done=optimizer.global_step)
        self.run_args = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.float16) if self.use_amp else contextlib.nullcontext()

    def backward(self, losses: dict[str, torch.Tensor], divide: int = 1) -> None:
        """Stop on a non-finite loss (naming the last good checkpoint), else backpropagate it."""
        try:
            check_finite(losses, self.optimizer.global_step)
        except NonFiniteLoss as e:
            raise NonFiniteLoss(f"{e}; {last_good_state(self.args)}") from None
        self.scaler.scale(losses["loss"] / divide).backward()
        self.meter.add({k: v.item() for k, v in losses.items()})

    def step(self) -> int:
        """One update through the loss scaler; return the steps counted. A step that the scaler
        skips (float16 gradients overflowed while it finds its scale) counts too: the schedule, the
        logs, checkpoints and resume count batches (iterations), so a resumed AMP run ends where an
        uninterrupted one does."""
        counted = self.optimizer.global_step + 1
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.global_step = counted
        return counted

    def log(self, step: int, where: str, images_per_step: int) -> None:
        """Every ``--log_every`` steps: the losses averaged over the steps since and over the ranks."""
        if step % self.args.log_every != 1 and self.args.log_every != 1:
            return
        avg = {k: all_reduce_mean(v, self.info) for k, v in self.meter.pop().items()}
        lr = self.optimizer.param_groups[0]["lr"]
        self.logger.info("%s %s lr %.6f %.1f img/s eta %s", where, " ".join(f"{k} {v:.4f}" for k, v in avg.items()),
                         lr, (step - self.timer.start_done) * images_per_step / max(self.timer.elapsed(), 1e-6),
                         self.timer.eta(step))
        self.tb.scalars(avg, step, prefix="loss/")
        self.tb.scalar("lr", lr, step)

    def save(self, epoch: int, batch: int) -> None:
        """The checkpoint (rank 0): weights, optimiser, RNGs and the data position."""
        if self.info.is_main:
            save_checkpoint(checkpoint_path(self.args), model=self.net, optimizer=self.optimizer, epoch=epoch,
                            step=self.optimizer.global_step, args=self.run_args,
                            extra={"batch": batch, "scaler": self.scaler.state_dict()})

    def stop_if_asked(self, stop: StopSignal, epoch: int, batch: int) -> None:
        """On SIGTERM/SIGINT (agreed over the ranks): checkpoint at this position and exit."""
        if _stop_everywhere(stop, self.info):
            self.save(epoch, batch)
            self.logger.warning("stopped by signal at step %d; resume with --resume", self.optimizer.global_step)
            self.tb.close()
            raise SystemExit(stop.exit_code or 143)


def fit(*, args: argparse.Namespace, info: DistInfo, model: torch.nn.Module,
        optimizer: PolyOptimizer, loader: torch.utils.data.DataLoader,
        sampler: ResumableSampler, step_fn: StepFn, logger: logging.Logger,
        picture_fn: PictureFn | None = None, start: dict | None = None,
        net: torch.nn.Module | None = None) -> Path:
    """Train to ``args.max_epoches``; return the path of the final weights (a plain state_dict,
    loadable by the released code). ``model`` is what ``step_fn`` calls (possibly wrapped for
    DDP); ``net`` the network whose weights are saved (default: ``model`` unwrapped)."""
    net = net if net is not None else unwrap(model)
    max_step = sampler.batches_per_epoch() * args.max_epoches
    start = start or {"epoch": 0, "batch": 0}
    session = _Session(args, info, net, optimizer, logger, total=max_step, start=start)
    start_epoch, start_batch = start["epoch"], start["batch"]
    model.train()
    with StopSignal() as stop, deterministic_algorithms(args.deterministic):
        for epoch in range(start_epoch, args.max_epoches):
            first = start_batch if epoch == start_epoch else 0
            _set_position(loader, sampler, epoch, first)
            bar = progress(loader, info, desc=f"epoch {epoch + 1}/{args.max_epoches}",
                           total=sampler.batches_per_epoch() - first)
            for batch, pack in enumerate(bar, start=first):
                with session.autocast():
                    losses, outputs = step_fn(model, pack)
                optimizer.zero_grad(set_to_none=True)
                session.backward(losses)
                step = session.step()
                session.log(step, f"step {step}/{max_step} epoch {epoch + 1}", args.batch_size)
                if picture_fn is not None and info.is_main and step % args.tb_image_every == 1:
                    session.tb.image("cam", picture_fn(pack, outputs), step)
                session.stop_if_asked(stop, epoch, batch + 1)
            # The snapshot first: a run killed between the two redoes nothing and loses no snapshot.
            if args.save_every_epoch and info.is_main:
                save_weights(net, epoch_weights_path(args, epoch + 1))
            session.save(epoch + 1, 0)
    session.tb.close()
    return _save_final(args, info, net, logger)


def _save_final(args: argparse.Namespace, info: DistInfo, net: torch.nn.Module, logger: logging.Logger) -> Path:
    """Check that the ranks agree, then write the final weights (a plain state_dict) atomically."""
    if info.distributed:
        if not ranks_agree(net, info):
            raise RuntimeError("the ranks ended with different weights")
        logger.info("weights identical on all %d ranks", info.world_size)
    final = final_weights_path(args)
    if info.is_main:
        save_weights(net, final)
        logger.info("saved %s", final)
    return final


def _set_position(loader: torch.utils.data.DataLoader, sampler: ResumableSampler, epoch: int, batch: int) -> None:
    """Make the loader's next pass epoch ``epoch``'s order (and augmentation) from batch ``batch`` on."""
    sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
    sampler.set_start_batch(batch)


def _endless_batches(loader: torch.utils.data.DataLoader, sampler: ResumableSampler, epoch: int,
                     batch: int) -> Iterator[tuple[int, int, dict]]:
    """``(epoch, batch, pack)`` from position (epoch, batch) on, epoch after epoch."""
    while True:
        _set_position(loader, sampler, epoch, batch)
        for b, pack in enumerate(loader, start=batch):
            yield epoch, b, pack
        epoch, batch = epoch + 1, 0


def fit_iterations(*, args: argparse.Namespace, info: DistInfo, model: torch.nn.Module,
                   optimizer: PolyOptimizer, loader: torch.utils.data.DataLoader, sampler: ResumableSampler,
                   step_fn: StepFn, logger: logging.Logger, start: dict | None = None,
                   net: torch.nn.Module | None = None) -> Path:
    """:func:`fit` counted in iterations (``args.max_iters``) rather than epochs, each iteration
    accumulating the gradients of ``args.iter_size`` batches (each loss divided by
    ``iter_size``, deeplab-pytorch's ``ITER_SIZE``). The checkpoint, written every
    ``args.save_every`` iterations and on SIGTERM/SIGINT, records the data position (epoch,
    batch); the schedule's position is the optimiser's ``global_step``."""
    net = net if net is not None else unwrap(model)
    start = start or {"epoch": 0, "batch": 0}
    session = _Session(args, info, net, optimizer, logger, total=args.max_iters, start=start)
    batches = _endless_batches(loader, sampler, start["epoch"], start["batch"])
    position = (start["epoch"], start["batch"])
    model.train()
    with StopSignal() as stop, deterministic_algorithms(args.deterministic):
        bar = progress(range(optimizer.global_step, args.max_iters), info, desc="iterations",
                       total=args.max_iters, initial=optimizer.global_step)
        for _ in bar:
            optimizer.zero_grad(set_to_none=True)
            for micro in range(args.iter_size):
                epoch, batch, pack = next(batches)
                last = micro == args.iter_size - 1
                # DDP all-reduces the gradients once per iteration, on the last accumulated batch.
                no_sync = model.no_sync() if info.distributed and not last else contextlib.nullcontext()
                with no_sync:
                    with session.autocast():
                        losses, _ = step_fn(model, pack)
                    session.backward(losses, divide=args.iter_size)
                position = (epoch, batch + 1)
            step = session.step()
            session.log(step, f"iteration {step}/{args.max_iters}", args.batch_size * args.iter_size)
            session.stop_if_asked(stop, *position)
            if step % args.save_every == 0 or step == args.max_iters:
                session.save(*position)
    session.tb.close()
    return _save_final(args, info, net, logger)
