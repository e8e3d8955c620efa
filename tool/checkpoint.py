"""What makes a training run survive a kill: atomic checkpoints that resume bit for bit.

A checkpoint holds the model, the optimiser, the epoch, the step, the arguments and every random
generator's state, all as tensors and plain Python values, so it loads with
``torch.load(weights_only=True)`` and a crafted file cannot run code. Resuming mid-epoch needs the
data order too: :class:`ResumableSampler` derives it from (seed, epoch) alone and can skip the
batches already trained on.
"""
from __future__ import annotations

import math
import pickle
import random
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tool.distributed import unwrap
from tool.errors import InputError, NonFiniteLoss
from tool.fileio import atomic_path

CHECKPOINT_FORMAT = "wsss-ckpt-1"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def rng_state() -> dict:
    """The states of Python's, NumPy's, torch's CPU and every CUDA generator, as plain values."""
    version, python_state, gauss = random.getstate()
    # The legacy global generator is the one that augmentation code shares, so it is saved too.
    _, keys, pos, has_gauss, cached_gauss = np.random.get_state()  # noqa: NPY002
    return {
        "python": {"version": version, "state": list(python_state), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(cached_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (CUDA states for the devices present)."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    numpy = state["numpy"]
    legacy_state = ("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                    numpy["gauss"])
    np.random.set_state(legacy_state)  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def _check_plain(value: Any, where: str) -> None:
    """Fail at save time, not at resume, on anything ``weights_only`` loading would refuse."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key, where)
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif not isinstance(value, (torch.Tensor, str, int, float, bool, type(None))):
        raise TypeError(f"checkpoint entry {where} is a {type(value).__name__}; store plain values only")


def save_checkpoint(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                    step: int, args: dict, extra: dict | None = None) -> None:
    """Write a training checkpoint atomically: a kill leaves the previous file, never half a file.

    ``epoch`` and ``step`` count what is finished; ``extra`` holds the caller's own plain values
    (e.g. the batches done in ``epoch``).
    """
    content = {
        "format": CHECKPOINT_FORMAT,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": int(epoch),
        "step": int(step),
        "args": dict(args),
        "rng": rng_state(),
        "extra": dict(extra or {}),
    }
    _check_plain(content, "checkpoint")
    with atomic_path(path) as tmp:
        torch.save(content, tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`, refusing anything that is not plain data."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    try:
        content = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        reason = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
        raise InputError(f"{path} is not a loadable checkpoint: {reason}") from None
    if not isinstance(content, dict) or content.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path} is not a training checkpoint of this project "
                         f"(no format {CHECKPOINT_FORMAT!r})")
    return content


def check_finite(losses: dict[str, torch.Tensor], step: int) -> None:
    """Raise :class:`NonFiniteLoss` naming ``step`` and every term that is NaN or infinite."""
    if not losses:
        return
    finite = torch.stack([torch.isfinite(v.detach()).all() for v in losses.values()]).tolist()
    bad = [f"{name}={losses[name].detach().float().sum().item()}"
           for name, ok in zip(losses, finite, strict=True) if not ok]
    if bad:
        raise NonFiniteLoss(f"non-finite loss at step {step}: {', '.join(bad)}")


class StopSignal:
    """Within ``with StopSignal() as stop:``, SIGTERM and SIGINT set ``stop.requested`` instead of
    killing the process, so the loop can finish its step, checkpoint and exit with
    ``stop.exit_code`` (143 or 130). A second signal acts as usual, for a user who insists."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """The shell's code for death by this signal: 128 + its number."""
        return 128 + self.signum if self.signum is not None else 0

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            self._restore()
            signal.raise_signal(signum)
            return
        self.signum = signum

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> StopSignal:
        # Python lets only the main thread install handlers; elsewhere signals keep their default.
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._restore()


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a Ctrl-C or a scheduler's SIGTERM reaches the whole process
    group; workers ignore it, so the main process can still fetch, checkpoint and shut them down."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class ResumableSampler(torch.utils.data.Sampler[int]):
    """The sample order of an epoch as a pure function of (seed, epoch), split over ranks.

    ``batch_size`` is the global batch; each rank's DataLoader takes ``batch_size // world_size``.
    Rank ``r`` takes positions ``r, r + world_size, ...`` of the order, like DistributedSampler, so
    the k-th global batch is the same whatever the number of ranks. ``drop_last`` drops the last
    incomplete global batch; otherwise the order is padded from its start to a multiple of
    ``world_size``. Call :meth:`set_epoch` before each epoch and, when resuming mid-epoch,
    :meth:`set_start_batch` after it.
    """

    def __init__(self, dataset_len: int, *, shuffle: bool, seed: int, batch_size: int, drop_last: bool,
                 rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} does not split over {world_size} ranks")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        if dataset_len < 1:
            raise ValueError("the dataset is empty")
        self.dataset_len = dataset_len
        self.shuffle = shuffle
        self.seed = seed
        self.batch_size = batch_size
        self.rank_batch_size = batch_size // world_size
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order; any start batch set before is forgotten."""
        self.epoch = epoch
        self.start_batch = 0

    def set_start_batch(self, batch: int) -> None:
        """Skip the first ``batch`` batches of the current epoch (those trained before a stop)."""
        if not 0 <= batch <= self.batches_per_epoch():
            raise ValueError(f"start batch {batch} outside 0..{self.batches_per_epoch()}")
        self.start_batch = batch

    def _rank_len(self) -> int:
        if self.drop_last:
            return self.dataset_len // self.batch_size * self.rank_batch_size
        return math.ceil(self.dataset_len / self.world_size)

    def batches_per_epoch(self) -> int:
        """Batches each rank's DataLoader yields in a full epoch."""
        return math.ceil(self._rank_len() / self.rank_batch_size)

    def rank_order(self) -> list[int]:
        """This rank's full order for the current epoch, before any start-batch skip."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.dataset_len)
        else:
            order = np.arange(self.dataset_len)
        total = self._rank_len() * self.world_size
        order = np.resize(order, total)  # repeats from the start when padding, truncates when dropping
        return order[self.rank::self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_order()[self.start_batch * self.rank_batch_size:])

    def __len__(self) -> int:
        return max(self._rank_len() - self.start_batch * self.rank_batch_size, 0)
