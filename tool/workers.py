"""Worker processes that never outlive the run and never talk after its error.

Every process pool passes ``initializer=die_with_parent, initargs=(os.getpid(),)`` and every
DataLoader is a :class:`WorkerLoader`: on Linux the kernel kills each worker when the process that
started it dies, by SIGKILL too, so no orphan keeps its memory or sleeps on a pipe for good.
The kernel ties the worker to the *thread* that forked it; the scripts start their pools and
iterate their loaders in the main thread, which lives as long as the process.

A run that fails calls :func:`end_worker_processes` (``tool.cli.run_main`` does) before it prints
its one line.
"""
from __future__ import annotations

import ctypes
import functools
import gc
import multiprocessing
import os
import signal
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch

PR_SET_PDEATHSIG = 1  # linux/prctl.h

# The iterators of WorkerLoaders that hold worker processes, for end_worker_processes.
_LIVE_ITERATORS: weakref.WeakSet = weakref.WeakSet()


def die_with_parent(parent_pid: int) -> None:
    """Initializer of worker processes: on Linux the kernel kills the worker when its parent
    dies, by SIGKILL or SIGTERM alike (a no-op elsewhere). A parent that died before this ran is
    caught by its pid (under forkserver the parent is the server, which exits with the process
    that started it, so only a ``parent_pid`` that is gone ends the worker)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid and not _running(parent_pid):
        os._exit(1)


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie has)."""
    if sys.platform.startswith("linux"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _start_loader_worker(parent_pid: int, then: Callable[[int], None] | None, worker_id: int) -> None:
    die_with_parent(parent_pid)
    if then is not None:
        then(worker_id)


class WorkerLoader(torch.utils.data.DataLoader):
    """A DataLoader whose worker processes die with this process (:func:`die_with_parent`, then
    ``worker_init_fn``) and are shut down by :func:`end_worker_processes` after an error."""

    def __init__(self, dataset: torch.utils.data.Dataset, *, worker_init_fn: Callable[[int], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(dataset, worker_init_fn=functools.partial(_start_loader_worker, os.getpid(),
                                                                   worker_init_fn), **kwargs)

    def __iter__(self) -> Iterator:
        iterator = super().__iter__()
        if hasattr(iterator, "_shutdown_workers"):
            _LIVE_ITERATORS.add(iterator)
        return iterator


def end_worker_processes() -> None:
    """Stop the workers a failed run leaves behind, quietly.

    First each DataLoader iterator still alive shuts its workers down as an exhausted one does
    (tells them to stop, waits up to 5 s each, closes its queues). The error's traceback holds
    the iterator in a reference cycle: left to the garbage collector, the queues are finalised
    before the iterator, so the workers never hear the stop (and killing them instead makes the
    queues' threads print tracebacks about closed pipes). Then the daemonic children still there
    are killed: DataLoader workers ignore SIGTERM (``tool.checkpoint.ignore_stop_signals``), and
    the interpreter's exit would wait for them forever.
    """
    for iterator in list(_LIVE_ITERATORS):
        iterator._shutdown_workers()
    if hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would raise on these deaths
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join(timeout=5)
    gc.collect()  # drops the failed loop's frames, and with them the iterators
