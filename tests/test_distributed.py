"""torchrun, sharding, and the rank-0-only logging, progress and TensorBoard helpers."""
from __future__ import annotations

import gc
import importlib.util
import io
import logging
import os
import socket
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from tool.distributed import (
    DistInfo,
    all_reduce_mean,
    distributed_session,
    init_distributed,
    shard,
    unwrap,
    wrap_model,
)
from tool.errors import InputError
from tool.logutils import AverageMeter, TBWriter, Timer, progress, setup_logging

TINY_TRAIN = Path(__file__).parent / "helpers" / "tiny_train.py"
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def cpu_info(rank: int = 0, world_size: int = 1) -> DistInfo:
    return DistInfo(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"),
                    distributed=world_size > 1)


@pytest.fixture
def single_process(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.timeout(120)
def test_torchrun_two_ranks_train_on_disjoint_data_and_end_identical(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS} | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(TINY_TRAIN), "--out", str(tmp_path), "--epochs", "1"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stdout + result.stderr
    ranks = [torch.load(tmp_path / f"final_rank{r}.pt", weights_only=True) for r in (0, 1)]
    seen = [set(r["seen"].tolist()) for r in ranks]
    assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) == 32
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(64))
    # Different data on each rank, yet the same weights: the gradients were averaged every step.
    for key, value in ranks[0]["model"].items():
        assert torch.equal(value, ranks[1]["model"][key]), key
    assert "[rank 0] INFO step 8/8 epoch 1 " in result.stdout and "[rank 1] INFO" not in result.stdout
    assert "weights identical on all 2 ranks" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final_rank0.pt", "final_rank1.pt", "tiny.ckpt", "tiny.pth"]


def load_tiny_train():
    spec = importlib.util.spec_from_file_location("tiny_train", TINY_TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_same_seed_in_one_process_gives_the_same_loss_trajectory(tmp_path, single_process):
    tiny_train = load_tiny_train()
    first = tiny_train.main(["--out", str(tmp_path / "a"), "--epochs", "1"])
    again = tiny_train.main(["--out", str(tmp_path / "b"), "--epochs", "1"])
    other_seed = tiny_train.main(["--out", str(tmp_path / "c"), "--epochs", "1", "--seed", "8"])
    assert len(first) == 8 and first == again and first != other_seed


def test_shard_covers_every_item_once():
    items = [f"image_{i}" for i in range(23)]
    for world_size in (1, 2, 3, 4):
        shares = [shard(items, cpu_info(r, world_size)) for r in range(world_size)]
        assert sorted(x for s in shares for x in s) == sorted(items)
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_single_process_without_torchrun(single_process):
    info = init_distributed("cpu")
    assert info == cpu_info() and info.is_main
    model = nn.Linear(2, 2)
    assert wrap_model(model, info) is model
    assert unwrap(nn.DataParallel(model)) is model
    assert all_reduce_mean(2.5, info) == 2.5
    with pytest.raises(InputError, match="unknown device"):
        init_distributed("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            init_distributed("cuda")


def one_rank_group(monkeypatch) -> None:
    """torchrun's variables for a world of one process: a real Gloo group, in this process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)


def test_session_frees_ddp_before_leaving_the_group_and_leaves_together(monkeypatch):
    """DistributedDataParallel can outlive the function that used it (a closure cell of its hooks
    and a retained frame were seen keeping it), holding the process group and its last all-reduce
    until a collection; a reference cycle stands in for that here. The session collects before
    destroying the group (not at some later time, or while the interpreter shuts down), and the
    ranks meet at a barrier first, but not after an error."""
    one_rank_group(monkeypatch)
    calls = []
    real_barrier, real_destroy = dist.barrier, dist.destroy_process_group
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: (calls.append("barrier"), real_barrier(*a, **k)))
    monkeypatch.setattr(dist, "destroy_process_group",
                        lambda *a, **k: (calls.append(("destroy", wrapper() is not None)), real_destroy(*a, **k)))

    def one_step(info: DistInfo) -> weakref.ref:
        model = wrap_model(nn.Linear(3, 2), info)
        model(torch.randn(4, 3)).sum().backward()
        cycle = [model]
        cycle.append(cycle)
        return weakref.ref(model)

    gc.disable()  # the collector must not run on its own in between
    try:
        with distributed_session("cpu") as info:
            assert info.distributed
            wrapper = one_step(info)
            assert isinstance(wrapper(), nn.parallel.DistributedDataParallel)  # alive: the cycle
    finally:
        gc.enable()
    assert calls == ["barrier", ("destroy", False)] and not dist.is_initialized()

    calls.clear()
    one_rank_group(monkeypatch)
    with pytest.raises(ValueError), distributed_session("cpu"):
        wrapper = lambda: None  # noqa: E731
        raise ValueError("a rank failed")
    assert calls == [("destroy", False)] and not dist.is_initialized()


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_rank_0_of_a_terminal(monkeypatch):
    assert progress(range(3)).disable  # pytest captures stderr: not a terminal
    monkeypatch.setattr(sys, "stderr", FakeTerminal())
    bar = progress(range(3), cpu_info(0, 2), desc="epoch 1")
    assert not bar.disable and list(bar) == [0, 1, 2]
    assert "epoch 1" in sys.stderr.getvalue()
    assert progress(range(3), cpu_info(1, 2)).disable
    assert progress(range(3), disable=True).disable


def test_logging_rank_0_to_stdout_and_file_other_ranks_warnings_only(tmp_path, capsys):
    log_file = tmp_path / "logs" / "train.log"
    setup_logging(log_file, cpu_info(0, 2))
    logger = setup_logging(log_file, cpu_info(0, 2))  # a second call must not double the lines
    logger.info("step %d", 7)
    assert capsys.readouterr().out.count("[rank 0] INFO step 7") == 1
    assert log_file.read_text().count("INFO step 7") == 1
    other = setup_logging(tmp_path / "rank1.log", cpu_info(1, 2))
    other.info("hidden")
    other.warning("shown")
    out = capsys.readouterr().out
    assert "hidden" not in out and "[rank 1] WARNING shown" in out
    assert not (tmp_path / "rank1.log").exists()
    logging.getLogger("wsss").handlers.clear()


def test_tensorboard_writes_on_rank_0_only(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = TBWriter(tmp_path / "tb")
    writer.scalar("lr", 0.01, 1)
    writer.scalars({"cls": 0.5, "er": 0.25}, 2, prefix="loss/")
    writer.image("cam", np.zeros((8, 6, 3), dtype=np.uint8), 2)
    writer.image("cam_t", torch.rand(3, 8, 6), 3)
    writer.close()
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert sorted(events.Tags()["scalars"]) == ["loss/cls", "loss/er", "lr"]
    assert [(e.step, e.value) for e in events.Scalars("loss/er")] == [(2, 0.25)]
    image = events.Images("cam")[0]
    assert (image.width, image.height) == (6, 8)
    silent = TBWriter(tmp_path / "tb1", cpu_info(1, 2))
    silent.scalar("lr", 0.01, 1)
    silent.close()
    TBWriter(None).scalar("lr", 0.01, 1)
    assert not (tmp_path / "tb1").exists()


def test_average_meter_and_timer():
    meter = AverageMeter()
    meter.add({"loss": 1.0, "er": torch.tensor(0.5)})
    meter.add({"loss": 3.0})
    assert meter.get("loss") == 2.0 and meter.get("loss", "er") == (2.0, 0.5)
    assert meter.pop("er") == {"er": 0.5}
    assert meter.pop() == {"loss": 2.0} and meter.pop() == {}
    timer = Timer(total=100, done=10)
    assert timer.eta(10) == "?"
    timer.start_time -= 90  # 90 s for 30 steps: 60 steps left take 3 minutes
    assert timer.eta(40) == "0:03:00"
