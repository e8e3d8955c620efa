"""tool/torchutils.PolyOptimizer: the released poly schedule, its momentum quirk and resumability."""
import argparse
import io
import logging

import numpy as np
import pytest
import torch

from tool.torchutils import PolyOptimizer

LR, WD, MAX_STEP = 0.01, 5e-4, 10
GROUPS = [(1, WD), (2, 0.0), (10, WD), (20, 0.0)]  # (lr multiplier, weight decay) as in train_SB.py


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(3, 2, generator=gen, dtype=torch.float64)) for _ in GROUPS]


def make_optimizer(params, momentum=None, max_step=MAX_STEP) -> PolyOptimizer:
    groups = [{"params": [p], "lr": mult * LR, "weight_decay": wd} for p, (mult, wd) in zip(params, GROUPS,
                                                                                           strict=True)]
    return PolyOptimizer(groups, lr=LR, weight_decay=WD, max_step=max_step, momentum=momentum)


def set_grads(params, step: int) -> list[np.ndarray]:
    grads = []
    for i, p in enumerate(params):
        g = torch.from_numpy(np.random.RandomState(100 * step + i).standard_normal((3, 2)))
        p.grad = g.clone()
        grads.append(g.numpy())
    return grads


def test_lr_follows_poly_formula_in_every_group():
    params = make_params()
    opt = make_optimizer(params)
    seen = []
    for step in range(MAX_STEP + 3):
        set_grads(params, step)
        opt.step()
        seen.append([g["lr"] for g in opt.param_groups])
    for step in (0, 1, 4, 7, MAX_STEP - 1):
        expected = [mult * LR * (1 - step / MAX_STEP) ** 0.9 for mult, _ in GROUPS]
        np.testing.assert_allclose(seen[step], expected, rtol=1e-14)
    # After max_step the last rate is kept (released behaviour), not zero or negative.
    assert seen[MAX_STEP] == seen[MAX_STEP + 2] == seen[MAX_STEP - 1]
    assert opt.global_step == MAX_STEP + 3


def test_power_is_configurable():
    params = make_params()
    opt = PolyOptimizer([{"params": params, "lr": LR}], lr=LR, weight_decay=WD, max_step=4, power=2.0)
    for step in range(3):
        set_grads(params, step)
        opt.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(LR * (1 - step / 4) ** 2, rel=1e-14)


def test_released_quirk_uses_weight_decay_as_momentum():
    opt = make_optimizer(make_params())
    assert [g["momentum"] for g in opt.param_groups] == [WD] * len(GROUPS)
    assert [g["weight_decay"] for g in opt.param_groups] == [wd for _, wd in GROUPS]
    # As released, the constructor's weight_decay is no default decay for a group without an entry.
    bare = PolyOptimizer(make_params()[:1], lr=LR, weight_decay=WD, max_step=MAX_STEP)
    assert bare.param_groups[0]["weight_decay"] == 0 and bare.param_groups[0]["momentum"] == WD


def test_real_momentum_when_given():
    opt = make_optimizer(make_params(), momentum=0.9)
    assert [g["momentum"] for g in opt.param_groups] == [0.9] * len(GROUPS)
    assert [g["weight_decay"] for g in opt.param_groups] == [wd for _, wd in GROUPS]
    bare = PolyOptimizer(make_params()[:1], lr=LR, weight_decay=WD, max_step=MAX_STEP, momentum=0.9)
    assert bare.param_groups[0]["weight_decay"] == WD


def hand_sgd(params0, grads_per_step, momentum):
    """Plain numpy SGD with heavy-ball momentum (buffer = gradient on the first step), L2 weight decay."""
    values = [p.copy() for p in params0]
    buffers = [None] * len(values)
    for step, grads in enumerate(grads_per_step):
        factor = (1 - step / MAX_STEP) ** 0.9
        for i, ((mult, wd), g) in enumerate(zip(GROUPS, grads, strict=True)):
            d = g + wd * values[i]
            buffers[i] = d if buffers[i] is None else momentum * buffers[i] + d
            values[i] = values[i] - mult * LR * factor * buffers[i]
    return values


@pytest.mark.parametrize("momentum, effective", [(None, WD), (0.9, 0.9)])
def test_steps_equal_hand_computed_sgd(momentum, effective):
    params = make_params(1)
    start = [p.detach().numpy().copy() for p in params]
    opt = make_optimizer(params, momentum=momentum)
    grads_per_step = []
    for step in range(3):
        grads_per_step.append(set_grads(params, step))
        opt.step()
    expected = hand_sgd(start, grads_per_step, effective)
    for p, e in zip(params, expected, strict=True):
        np.testing.assert_allclose(p.detach().numpy(), e, rtol=1e-13, atol=1e-15)
    # The quirk's tiny momentum is not no momentum: the two runs differ.
    without = hand_sgd(start, grads_per_step, 0.0)
    assert not np.allclose(expected[0], without[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_state_dict_round_trip_resumes_schedule(momentum):
    params = make_params(2)
    opt = make_optimizer(params, momentum=momentum)
    for step in range(3):
        set_grads(params, step)
        opt.step()
    buffer = io.BytesIO()  # through a file, as a checkpoint: the live state shares momentum buffers
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    assert state["global_step"] == 3

    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = make_optimizer(resumed_params, momentum=momentum)
    resumed.load_state_dict(state)
    assert resumed.global_step == 3
    assert "global_step" in state, "load_state_dict must not consume the caller's dict"

    for step in range(3, 6):
        set_grads(params, step)
        set_grads(resumed_params, step)
        opt.step()
        resumed.step()
    for a, b in zip(params, resumed_params, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [g["lr"] for g in resumed.param_groups] == [g["lr"] for g in opt.param_groups]
    np.testing.assert_allclose(resumed.param_groups[0]["lr"], LR * (1 - 5 / MAX_STEP) ** 0.9, rtol=1e-14)


def test_a_step_the_loss_scaler_skips_still_counts(tmp_path):
    """With --amp the loss scaler skips an update whose scaled gradients overflow; the training loop
    counts that step anyway (the schedule, logs, checkpoints and resume count batches), so a resumed
    AMP run ends where an uninterrupted one does. The loop's scaler is CUDA's; the CPU's skips alike."""
    from tool import trainloop
    from tool.distributed import DistInfo

    params = [torch.nn.Parameter(torch.ones(3, 2)) for _ in GROUPS]
    opt = make_optimizer(params)
    args = argparse.Namespace(amp=False, tblog_dir=None, log_every=1, session_name=str(tmp_path / "s"))
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False)
    session = trainloop._Session(args, info, torch.nn.Linear(1, 1), opt, logging.getLogger("test"), total=MAX_STEP,
                                 start={})
    session.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    # A finite loss whose gradient, scaled by 2^16, overflows float32: the update is skipped.
    session.backward({"loss": sum(p.sum() for p in params) * 1e35})
    assert session.step() == 1 and opt.global_step == 1
    assert all(torch.equal(p, torch.ones(3, 2)) for p in params)
    assert session.scaler.get_scale() == 2.0**15
    opt.zero_grad(set_to_none=True)
    session.backward({"loss": sum(p.sum() for p in params)})
    assert session.step() == 2
    # The update ran at step 1's learning rates: lr x poly(1) x multiplier, gradient 1 everywhere.
    factor = (1 - 1 / MAX_STEP) ** 0.9
    for p, (mult, wd) in zip(params, GROUPS, strict=True):
        expected = 1 - LR * mult * factor * (1 + wd)
        torch.testing.assert_close(p.detach(), torch.full((3, 2), expected), rtol=1e-6, atol=0)
