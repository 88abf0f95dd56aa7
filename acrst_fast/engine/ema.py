"""Teacher update by exponential moving average (paper Eq. 2), in place, from the unwrapped student.

theta_t <- decay * theta_t + (1 - decay) * theta_s for the student's trainable floating-point parameters,
one `torch._foreach_lerp_` per (device, dtype) group. Buffers that training changes (BatchNorm running
statistics and their int64 counters) are copied from the student, one `torch._foreach_copy_` per group: the
teacher normalises with the statistics the student's weights were trained with. Frozen parameters
(requires_grad=False) and constant buffers (`FrozenBatchNorm2d`'s) are skipped: they are equal since the
teacher was copied from the student (`EmaTeacher.reset`). Mixing dtypes in one foreach list (float
statistics with int64 counters) would send it down the per-tensor slow path; the groups are built once
(`EmaPlan`) instead of on every call.

`EmaTeacher(compute_dtype=torch.bfloat16)` also keeps a copy of the teacher's convolution and linear
weights in that dtype, refreshed by every update, for the teacher's forward under autocast: autocast
then stops re-casting the float32 weights on every call, with the same numbers.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

Group = tuple[list[torch.Tensor], list[torch.Tensor]]  # (teacher tensors, student tensors), one device and dtype


def _grouped(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[Group]:
    groups: dict[tuple, Group] = {}
    for t, s in pairs:
        dst, src = groups.setdefault((t.device, t.dtype, s.device, s.dtype), ([], []))
        dst.append(t)
        src.append(s)
    return list(groups.values())


def _named(module: nn.Module, kind: str) -> dict[str, torch.Tensor]:
    return dict(module.named_parameters() if kind == "parameters" else module.named_buffers())


def _matched(teacher: nn.Module, student: nn.Module, kind: str) -> tuple[dict, dict]:
    t, s = _named(teacher, kind), _named(student, kind)
    if t.keys() != s.keys():
        raise ValueError(f"teacher and student have different {kind}")
    return t, s


def _constant_buffers(module: nn.Module) -> set[str]:
    """Names of buffers no training step changes (those of FrozenBatchNorm2d layers)."""
    return {f"{name}.{b}" if name else b for name, mod in module.named_modules()
            if isinstance(mod, FrozenBatchNorm2d) for b in mod._buffers}


@dataclass
class EmaPlan:
    """What one EMA update touches, grouped by (device, dtype): `lerp` the trainable float parameters,
    `copy` the buffers training changes; `skipped` counts the frozen parameters and constant buffers."""

    lerp: list[Group]
    copy: list[Group]
    skipped: int

    @classmethod
    def build(cls, teacher: nn.Module, student: nn.Module) -> "EmaPlan":
        t_par, s_par = _matched(teacher, student, "parameters")
        t_buf, s_buf = _matched(teacher, student, "buffers")
        live = [n for n in s_par if s_par[n].is_floating_point() and s_par[n].requires_grad]
        constant = _constant_buffers(student)
        changing = [n for n in s_buf if n not in constant]
        return cls(_grouped([(t_par[n], s_par[n]) for n in live]), _grouped([(t_buf[n], s_buf[n]) for n in changing]),
                   len(s_par) - len(live) + len(s_buf) - len(changing))

    @torch.no_grad()
    def apply(self, decay: float) -> None:
        for t, s in self.lerp:
            torch._foreach_lerp_(t, s, 1.0 - decay)
        for t, s in self.copy:
            torch._foreach_copy_(t, s)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """Fused EMA (see the module doc), planning the groups on this call; `EmaTeacher` plans once."""
    EmaPlan.build(teacher, student).apply(decay)


@torch.no_grad()
def ema_update_ref(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """Per-tensor reference of `ema_update`: every float parameter averaged, every buffer copied."""
    for (name, tp), (_, sp) in zip(teacher.named_parameters(), student.named_parameters()):
        if tp.is_floating_point():
            tp.mul_(decay).add_(sp, alpha=1.0 - decay)
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        tb.copy_(sb)


def _compute_copy(master: nn.Module, student: nn.Module, dtype: torch.dtype) -> tuple[nn.Module, list[Group], list[Group]]:
    """A module computing as `master` does, whose convolution and linear weights (the ones autocast casts on
    every call) are copies in `dtype`; every other parameter and buffer is the master's own tensor.
    Returns (module, groups (copy, master) of all those weights, groups of the student's trainable ones)."""
    compute = copy.deepcopy(master)
    pairs = []
    for mc, mm in zip(compute.modules(), master.modules()):
        cast = isinstance(mc, (nn.Conv2d, nn.Linear))
        for k, p in mm._parameters.items():
            if cast and p is not None:
                mc._parameters[k] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
                pairs.append((mc._parameters[k], p))
            else:
                mc._parameters[k] = p
        mc._buffers.update(mm._buffers)
    student_of = dict(zip(map(id, master.parameters()), student.parameters()))
    live = [(c, m) for c, m in pairs if student_of[id(m)].requires_grad]
    return compute, _grouped(pairs), _grouped(live)


class EmaTeacher:
    """The teacher of a Mean Teacher, in the manner of timm's `ModelEmaV3`: a frozen copy of the student
    (eval mode, no gradients) that `reset` copies from the student when mutual learning starts, `update`
    moves towards it by the fused EMA above, and that saves and loads its own state. The detector's Mean
    Teacher and SSMLL's share it. `module` is the network (float32; evaluation and checkpoints use it).

    compute_dtype (bf16 / fp16, or None): calling the teacher runs a copy whose convolution and linear
    weights are kept in that dtype by `reset`, `update` and `load_state_dict`; call it under autocast of
    that dtype (it then computes what `module` computes under that autocast, without re-casting weights).
    """

    def __init__(self, student: nn.Module, decay: float, compute_dtype: torch.dtype | None = None):
        self.decay = decay
        self.module = copy.deepcopy(student).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._plan: EmaPlan | None = None
        self._plan_student: nn.Module | None = None
        self.compute, self._compute_groups, self._compute_live = None, [], []
        if compute_dtype is not None:
            self.compute, self._compute_groups, self._compute_live = _compute_copy(self.module, student, compute_dtype)

    def __call__(self, *args, **kwargs):
        return (self.compute if self.compute is not None else self.module)(*args, **kwargs)

    def _refresh(self, groups: list[Group]) -> None:
        for c, m in groups:
            torch._foreach_copy_(c, m)

    @torch.no_grad()
    def reset(self, student: nn.Module) -> None:
        """Teacher <- student (the start of mutual learning)."""
        self.module.load_state_dict(student.state_dict())
        self._refresh(self._compute_groups)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """Teacher <- decay * teacher + (1 - decay) * student (`EmaPlan`, built on the first call)."""
        if self._plan is None or self._plan_student is not student:
            self._plan, self._plan_student = EmaPlan.build(self.module, student), student
        self._plan.apply(self.decay)
        self._refresh(self._compute_live)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
        self._refresh(self._compute_groups)
