"""The released poly learning-rate SGD optimiser."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

# The released optimiser's learning-rate multipliers, by group: pretrained weights, pretrained
# biases, from-scratch weights, from-scratch biases (heads trained from random init).
LR_MULTS = (1, 2, 10, 20)


class PolyOptimizer(torch.optim.SGD):
    """SGD whose learning rates follow lr_t = lr_group * (1 - t / max_step) ** power.

    With ``step_size`` k > 1, t is rounded down to a multiple of k: the rate changes every k steps
    (deeplab-pytorch's ``PolynomialLR(step_size=10)``).

    Before step t (t = ``global_step``, counted from 0) every group's learning rate is set from its
    initial value; after ``max_step`` steps the last rate is kept, as released. The schedule is a
    function of ``global_step`` alone, which ``state_dict`` carries so that a resumed run continues it.

    Released quirk: ``SGD(params, lr, weight_decay)`` passes the weight decay positionally as SGD's
    *momentum* (so momentum = 5e-4 with the default --wt_dec); weight decay itself then comes only
    from the groups' own 'weight_decay' entries. ``momentum=None`` (default) reproduces this. A float
    ``momentum`` gives real momentum, with ``weight_decay`` as the default for groups without an entry.
    """

    def __init__(self, params: Iterable, lr: float, weight_decay: float, max_step: int, power: float = 0.9,
                 momentum: float | None = None, step_size: int = 1):
        if momentum is None:
            super().__init__(params, lr, momentum=weight_decay)
        else:
            super().__init__(params, lr, momentum=momentum, weight_decay=weight_decay)
        self.global_step = 0
        self.max_step = max_step
        self.power = power
        self.step_size = step_size
        for group in self.param_groups:
            group["initial_lr"] = group["lr"]

    def poly_factor(self) -> float:
        """(1 - t / max_step) ** power for the current step (t rounded down to a multiple of step_size)."""
        return (1 - self.global_step // self.step_size * self.step_size / self.max_step) ** self.power

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One SGD step at the learning rates of step ``global_step``, then count it."""
        if self.global_step < self.max_step:
            factor = self.poly_factor()
            for group in self.param_groups:
                group["lr"] = group["initial_lr"] * factor
        loss = super().step(closure)
        self.global_step += 1
        return loss

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["global_step"] = self.global_step
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.global_step = state_dict.pop("global_step")
        super().load_state_dict(state_dict)
