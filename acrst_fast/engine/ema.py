"""Teacher update by exponential moving average (paper Eq. 2), in place, from the unwrapped student.

theta_t <- decay * theta_t + (1 - decay) * theta_s for floating-point parameters, done as one
`torch._foreach_lerp_` over all of them. Buffers (BatchNorm running statistics, counters) are
copied from the student with one `torch._foreach_copy_`: the teacher normalises with the statistics the student's weights were
trained with. Frozen parameters (requires_grad=False) are averaged too; they are equal anyway.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def _float_pairs(teacher: nn.Module, student: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        raise ValueError("teacher and student have different parameters")
    names = [n for n in t_params if t_params[n].is_floating_point()]
    return [t_params[n] for n in names], [s_params[n] for n in names]


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """Fused EMA: one foreach lerp over all float parameters, then buffers copied."""
    t, s = _float_pairs(teacher, student)
    if t:
        torch._foreach_lerp_(t, s, 1.0 - decay)
    t_buf, s_buf = list(teacher.buffers()), list(student.buffers())
    if t_buf:
        torch._foreach_copy_(t_buf, s_buf)


@torch.no_grad()
def ema_update_ref(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """Per-parameter reference of `ema_update`."""
    for (name, tp), (_, sp) in zip(teacher.named_parameters(), student.named_parameters()):
        if tp.is_floating_point():
            tp.mul_(decay).add_(sp, alpha=1.0 - decay)
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        tb.copy_(sb)


class EmaTeacher:
    """The teacher of a Mean Teacher, in the manner of timm's `ModelEmaV3`: a frozen copy of the student
    (eval mode, no gradients) that `reset` copies from the student when mutual learning starts, `update`
    moves towards it by the fused EMA above, and that saves and loads its own state. The detector's Mean
    Teacher and SSMLL's share it. `module` is the network; calling the teacher calls it.
    """

    def __init__(self, student: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(student).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def reset(self, student: nn.Module) -> None:
        """Teacher <- student (the start of mutual learning)."""
        self.module.load_state_dict(student.state_dict())

    def update(self, student: nn.Module) -> None:
        """Teacher <- decay * teacher + (1 - decay) * student (`ema_update`)."""
        ema_update(self.module, student, self.decay)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
