"""Checkpoints, signals and the resumable sampler, exercised by killing a real training run."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tool.checkpoint import (
    NonFiniteLoss,
    ResumableSampler,
    StopSignal,
    check_finite,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from tool.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
TINY_TRAIN = Path(__file__).parent / "helpers" / "tiny_train.py"
# 64 samples, global batch 8: 8 steps an epoch, 3 epochs; step 11 is batch 3 of epoch 2.
# tiny_train pauses before that step until the test signals it.
STOP_STEP = 11


def tiny_train(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(TINY_TRAIN), "--out", str(out), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def run_to_end(out: Path, *extra: str) -> str:
    proc = tiny_train(out, *extra)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    return output


def wait_for_line(proc: subprocess.Popen, text: str) -> None:
    for line in proc.stdout:
        if text in line:
            return
    raise AssertionError(f"the run ended (code {proc.wait()}) before printing {text!r}")


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "final_rank0.pt", weights_only=True)["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def reference_weights(tmp_path_factory) -> dict[str, torch.Tensor]:
    """An uninterrupted run (no DataLoader workers)."""
    out = tmp_path_factory.mktemp("reference")
    run_to_end(out)
    return final_weights(out)


def tiny_model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Linear(3, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


@pytest.mark.timeout(120)
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, reference_weights):
    proc = tiny_train(tmp_path, "--workers", "2", "--pause_at", str(STOP_STEP))
    wait_for_line(proc, f"paused before step {STOP_STEP}")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpt = load_checkpoint(tmp_path / "tiny.ckpt")
    assert (ckpt["epoch"], ckpt["step"], ckpt["extra"]["batch"]) == (1, 8, 0)
    run_to_end(tmp_path, "--workers", "2", "--resume")
    # Workers or none, killed or not: the same weights to the last bit.
    assert_same_weights(final_weights(tmp_path), reference_weights)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("signum", "whole_group", "workers"), [
    (signal.SIGINT, False, "0"),  # Ctrl-C, or torchrun passing on a signal
    (signal.SIGTERM, True, "2"),  # a batch scheduler signals every process, DataLoader workers too
], ids=["sigint", "sigterm-to-group-with-workers"])
def test_signal_checkpoints_the_step_and_resumes_bit_identical(tmp_path, reference_weights, signum,
                                                               whole_group, workers):
    proc = tiny_train(tmp_path, "--workers", workers, "--pause_at", str(STOP_STEP))
    wait_for_line(proc, f"paused before step {STOP_STEP}")
    if whole_group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, output
    assert f"stopped by signal at step {STOP_STEP}" in output and "Traceback" not in output
    ckpt = load_checkpoint(tmp_path / "tiny.ckpt")
    assert (ckpt["epoch"], ckpt["step"], ckpt["extra"]["batch"]) == (1, STOP_STEP, STOP_STEP - 8)
    run_to_end(tmp_path, "--workers", workers, "--resume")
    assert_same_weights(final_weights(tmp_path), reference_weights)


@pytest.mark.timeout(120)
def test_save_every_epoch_keeps_each_epochs_weights_through_a_kill(tmp_path, reference_weights):
    proc = tiny_train(tmp_path, "--save_every_epoch", "--pause_at", str(STOP_STEP))
    wait_for_line(proc, f"paused before step {STOP_STEP}")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["tiny_ep1.pth"]
    epoch1 = torch.load(tmp_path / "tiny_ep1.pth", weights_only=True)
    run_to_end(tmp_path, "--save_every_epoch", "--resume")
    snapshots = ["tiny.pth", "tiny_ep1.pth", "tiny_ep2.pth", "tiny_ep3.pth"]
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == snapshots
    assert_same_weights(torch.load(tmp_path / "tiny_ep1.pth", weights_only=True), epoch1)
    assert_same_weights(torch.load(tmp_path / "tiny_ep3.pth", weights_only=True), reference_weights)
    assert not torch.equal(epoch1["0.weight"], reference_weights["0.weight"])


SLOW_SAVE = """
import sys, time
import torch
sys.path.insert(0, sys.argv[2])
import tool.checkpoint as checkpoint

def slow_save(obj, path):
    with open(path, "wb") as f:
        f.write(b"PK\\x03\\x04 the first bytes of a zip")
        f.flush()
        print("writing", flush=True)
        time.sleep(60)

checkpoint.torch.save = slow_save
model = torch.nn.Linear(3, 2)
checkpoint.save_checkpoint(sys.argv[1], model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                           epoch=2, step=16, args={})
"""


@pytest.mark.timeout(60)
def test_kill_during_save_keeps_the_previous_complete_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    model, optimizer = tiny_model_and_optimizer()
    save_checkpoint(path, model=model, optimizer=optimizer, epoch=1, step=10, args={"lr": 0.1})
    before = path.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(path), str(ROOT)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for_line(proc, "writing")
    proc.kill()
    proc.wait()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 1
    leftovers = [p for p in tmp_path.iterdir() if p != path]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".ckpt.pt.")  # the torn temporary file


def test_unsaveable_value_fails_at_save_time_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    model, optimizer = tiny_model_and_optimizer()
    save_checkpoint(path, model=model, optimizer=optimizer, epoch=1, step=10, args={})
    with pytest.raises(TypeError, match="'list_file'"):
        save_checkpoint(path, model=model, optimizer=optimizer, epoch=2, step=16,
                        args={"list_file": Path("train.txt")})
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_checkpoint_round_trip(tmp_path):
    model, optimizer = tiny_model_and_optimizer()
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()  # creates the momentum buffers
    save_checkpoint(tmp_path / "c.pt", model=nn.DataParallel(model), optimizer=optimizer, epoch=3, step=42,
                    args={"lr": 0.1, "name": "run", "flip": True, "crop": None}, extra={"batch": 5})
    ckpt = load_checkpoint(tmp_path / "c.pt")
    assert ckpt["format"] == "wsss-ckpt-1"
    assert (ckpt["epoch"], ckpt["step"], ckpt["extra"]) == (3, 42, {"batch": 5})
    assert ckpt["args"] == {"lr": 0.1, "name": "run", "flip": True, "crop": None}
    assert_same_weights(ckpt["model"], model.state_dict())  # saved unwrapped: no "module." prefix
    momentum = optimizer.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(ckpt["optimizer"]["state"][0]["momentum_buffer"], momentum)


class CreatesFileWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_crafted_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "wsss-ckpt-1", "model": CreatesFileWhenUnpickled(marker)}, path)
    with pytest.raises(InputError) as error:
        load_checkpoint(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # proof that the file really runs code when trusted
    assert marker.exists()


def test_foreign_files_are_refused_in_one_line(tmp_path):
    model, optimizer = tiny_model_and_optimizer()
    good = tmp_path / "good.pt"
    save_checkpoint(good, model=model, optimizer=optimizer, epoch=1, step=1, args={})
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    torch.save(model.state_dict(), tmp_path / "weights_only.pth")  # weights, not a training checkpoint
    for name in ("truncated.pt", "text.pt", "weights_only.pth", "missing.pt"):
        with pytest.raises(InputError) as error:
            load_checkpoint(tmp_path / name)
        assert "\n" not in str(error.value) and name in str(error.value)


def draw_everything() -> tuple:
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),  # noqa: NPY002
            np.random.normal(size=3).tolist(), torch.rand(3).tolist(), torch.randn(3).tolist())  # noqa: NPY002


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    random.gauss(0, 1)
    np.random.normal()  # noqa: NPY002 (both generators now cache a second Gaussian draw)
    model, optimizer = tiny_model_and_optimizer()
    save_checkpoint(tmp_path / "c.pt", model=model, optimizer=optimizer, epoch=0, step=0, args={})
    expected = draw_everything()
    assert draw_everything() != expected
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    assert draw_everything() == expected
    state = rng_state()
    expected = draw_everything()
    set_rng_state(state)
    assert draw_everything() == expected


def test_check_finite_names_the_step_and_the_bad_terms():
    check_finite({"cls": torch.tensor(0.5), "er": torch.tensor([0.1, 0.2])}, step=3)
    with pytest.raises(NonFiniteLoss) as error:
        check_finite({"cls": torch.tensor(0.5), "er": torch.tensor(float("nan")),
                      "ecr": torch.tensor([1.0, float("inf")])}, step=17)
    message = str(error.value)
    assert isinstance(error.value, RuntimeError)
    assert "step 17" in message and "er=nan" in message and "ecr=inf" in message and "cls" not in message


def test_deterministic_flag_holds_for_the_loop_only(monkeypatch):
    """--deterministic turns torch's deterministic algorithms on (warning, not stopping, at an op
    without a deterministic CUDA kernel) with cuBLAS's fixed workspace, for the training loop only:
    the previous setting comes back after it, also when it raises. A GPU run under it repeats bit
    for bit (tests/test_cuda.py)."""
    from tool.trainloop import deterministic_algorithms

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_algorithms(False):
        assert not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(KeyError), deterministic_algorithms(True):
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        raise KeyError
    assert not torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()


def test_stop_signal_sets_a_flag_then_restores_the_handlers():
    previous = signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        assert not stop.requested
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested and stop.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is previous


def test_second_sigint_interrupts_as_usual():
    # Python's own handler, whatever the launcher left (a background job inherits SIGINT ignored).
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), StopSignal() as stop:
            signal.raise_signal(signal.SIGINT)
            assert stop.requested and stop.exit_code == 130
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)


def sampler(n: int = 51, **kwargs) -> ResumableSampler:
    options = {"shuffle": True, "seed": 5, "batch_size": 8, "drop_last": False} | kwargs
    return ResumableSampler(n, **options)


@pytest.mark.parametrize("drop_last", [False, True])
def test_rank_shares_are_disjoint_and_cover_the_dataset(drop_last):
    shares = [list(sampler(drop_last=drop_last, rank=r, world_size=4)) for r in range(4)]
    sizes = {len(s) for s in shares}
    everything = sorted(i for s in shares for i in s)
    if drop_last:  # 6 full global batches of 8
        assert sizes == {12} and everything == sorted(set(everything)) and len(everything) == 48
    else:  # 51 padded to 52 with the first index of the order
        assert sizes == {13} and set(everything) == set(range(51)) and len(everything) == 52
    assert sampler(drop_last=drop_last, rank=1, world_size=4).batches_per_epoch() == (6 if drop_last else 7)


def test_unshuffled_shares_match_torch_distributed_sampler():
    for rank in range(4):
        ours = list(sampler(shuffle=False, rank=rank, world_size=4))
        reference = torch.utils.data.DistributedSampler(range(51), num_replicas=4, rank=rank, shuffle=False)
        assert ours == list(reference)


def test_global_batches_do_not_depend_on_the_number_of_ranks():
    one = list(sampler(drop_last=True))
    for world_size in (2, 4):
        shares = [list(sampler(drop_last=True, rank=r, world_size=world_size)) for r in range(world_size)]
        per_rank = 8 // world_size
        for k in range(6):
            batch = {i for s in shares for i in s[k * per_rank:(k + 1) * per_rank]}
            assert batch == set(one[k * 8:(k + 1) * 8])


def test_order_is_a_function_of_seed_and_epoch():
    a, b = sampler(), sampler()
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    b.set_epoch(4)
    assert list(a) != list(b)
    assert list(sampler(seed=5)) != list(sampler(seed=6))
    assert sorted(sampler(shuffle=True)) == sorted(sampler(shuffle=False))


def test_start_batch_skips_exactly_the_batches_already_trained():
    s = sampler(drop_last=True, rank=1, world_size=2)
    s.set_epoch(2)
    full = list(torch.utils.data.DataLoader(range(51), batch_size=4, sampler=s, drop_last=True))
    s.set_start_batch(4)
    assert len(s) == 2 * 4
    tail = list(torch.utils.data.DataLoader(range(51), batch_size=4, sampler=s, drop_last=True))
    assert [t.tolist() for t in tail] == [t.tolist() for t in full[4:]]
    s.set_epoch(3)  # the skip holds for one epoch only
    assert len(s) == 24 and len(list(s)) == 24
    with pytest.raises(ValueError):
        s.set_start_batch(7)
    with pytest.raises(ValueError):
        sampler(batch_size=6, world_size=4)
