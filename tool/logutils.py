"""Log lines, progress bars and TensorBoard curves, written by rank 0 only.

Progress bars appear only on a terminal, so batch jobs and CI logs hold the log lines alone.
"""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tool.distributed import DistInfo

LOGGER_NAME = "wsss"


def _is_main(info: DistInfo | None) -> bool:
    return info is None or info.is_main


def setup_logging(log_file: str | Path | None, info: DistInfo | None = None) -> logging.Logger:
    """The ``wsss`` logger: INFO to stdout on rank 0 (also appended to ``log_file``), WARNING on
    the other ranks. Calling it again replaces the handlers instead of doubling every line."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = False
    main = _is_main(info)
    logger.setLevel(logging.INFO if main else logging.WARNING)
    rank_tag = "" if info is None or not info.distributed else f"[rank {info.rank}] "
    formatter = logging.Formatter(f"%(asctime)s {rank_tag}%(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if main and log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="a"))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger


def progress(iterable: Iterable, info: DistInfo | None = None, **tqdm_kwargs) -> tqdm:
    """A tqdm bar over ``iterable``, shown on rank 0 when stderr is a terminal, silent otherwise."""
    hidden = tqdm_kwargs.pop("disable", False) or not _is_main(info) or not sys.stderr.isatty()
    tqdm_kwargs.setdefault("mininterval", 1.0)
    tqdm_kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=hidden, **tqdm_kwargs)


class TBWriter:
    """TensorBoard on rank 0; every method is a no-op elsewhere or when ``log_dir`` is None."""

    def __init__(self, log_dir: str | Path | None, info: DistInfo | None = None):
        self.writer = None
        if log_dir is not None and _is_main(info):
            from torch.utils.tensorboard import SummaryWriter  # imported only where it writes

            self.writer = SummaryWriter(str(log_dir))

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, float(value), step)

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        """One curve per key, named ``prefix + key``."""
        for key, value in values.items():
            self.scalar(prefix + key, value, step)

    def image(self, tag: str, image: torch.Tensor | np.ndarray, step: int) -> None:
        """A CHW tensor or an HWC (or HW) array; uint8 in 0..255 or float in 0..1."""
        if self.writer is None:
            return
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu()
            layout = "CHW" if image.ndim == 3 else "HW"
        else:
            layout = "HWC" if image.ndim == 3 else "HW"
        self.writer.add_image(tag, image, step, dataformats=layout)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class AverageMeter:
    """Running means of named values (losses between two log lines)."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def add(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self._sums[key] = self._sums.get(key, 0.0) + float(value)
            self._counts[key] = self._counts.get(key, 0) + 1

    def get(self, *keys: str) -> float | tuple[float, ...]:
        """The mean of one key, or a tuple of means for several."""
        means = tuple(self._sums[k] / self._counts[k] for k in keys)
        return means[0] if len(means) == 1 else means

    def pop(self, *keys: str) -> dict[str, float]:
        """The means of ``keys`` (all when none given), which then start again from nothing."""
        keys = keys or tuple(self._sums)
        means = {k: self._sums[k] / self._counts[k] for k in keys}
        for k in keys:
            del self._sums[k], self._counts[k]
        return means


class Timer:
    """Elapsed time and the estimated time left of a run of ``total`` steps."""

    def __init__(self, total: int, done: int = 0):
        self.total = total
        self.start_done = done
        self.start_time = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start_time

    def eta(self, done: int) -> str:
        """``H:MM:SS`` left at the rate measured since this timer started (``?`` before a step)."""
        finished = done - self.start_done
        if finished <= 0:
            return "?"
        seconds = int(self.elapsed() / finished * max(self.total - done, 0))
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
