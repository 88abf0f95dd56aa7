"""Fused EMA equals the per-parameter reference; buffers follow the student."""
import copy
import random

import pytest
import torch
from torch import nn

from torchvision.ops import FrozenBatchNorm2d

from conftest import seeds
from acrst_fast.engine.ema import EmaPlan, EmaTeacher, ema_update, ema_update_ref


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9996, 0.999999])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_fused_equals_reference(decay, dtype, tol):
    seed = random.SystemRandom().randrange(2**31)
    torch.manual_seed(seed)
    student = _net().to(dtype)
    teacher = _net().to(dtype)
    student(torch.randn(2, 3, 8, 8, dtype=dtype))  # moves BN running stats
    t_fast, t_ref = copy.deepcopy(teacher), copy.deepcopy(teacher)
    for _ in range(3):
        ema_update(t_fast, student, decay)
        ema_update_ref(t_ref, student, decay)
    for (name, a), b in zip(t_fast.state_dict().items(), t_ref.state_dict().values()):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m: f"seed {seed} {name}: {m}")
    # float64 closed form for one parameter after 3 updates: t*d^3 + s*(1 - d^3)
    w_t, w_s = teacher[0].weight.double(), student[0].weight.double()
    expected = w_t * decay**3 + w_s * (1 - decay**3)
    torch.testing.assert_close(t_fast[0].weight.double(), expected, atol=tol * 10, rtol=tol * 10)
    assert torch.equal(t_fast[1].running_mean, student[1].running_mean)  # buffers copied


def test_mismatched_modules_rejected():
    with pytest.raises(ValueError, match="different parameters"):
        ema_update(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)), 0.9)


SEEDS = seeds()


class _Mixed(nn.Module):
    """Trainable float32 and float64 layers, BatchNorm (float stats + int64 counter), a frozen conv, FrozenBN."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Conv2d(3, 4, 3)
        self.frozen.requires_grad_(False)
        self.fbn = FrozenBatchNorm2d(4)
        self.conv, self.bn = nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 4 * 4, 5).double()

    def forward(self, x):
        x = self.bn(self.conv(self.fbn(self.frozen(x))))
        return self.head(x.flatten(1).double())


def _randomised(net: nn.Module, g: torch.Generator) -> nn.Module:
    with torch.no_grad():
        for t in list(net.parameters()) + [b for b in net.buffers() if b.is_floating_point()]:
            t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype))
    return net


@pytest.mark.parametrize("seed", SEEDS)
def test_plan_groups_by_dtype_and_skips_what_never_changes(seed):
    g = torch.Generator().manual_seed(seed)
    student = _randomised(_Mixed(), g)
    teacher = copy.deepcopy(student)
    _randomised(teacher.conv, g), _randomised(teacher.head, g), _randomised(teacher.bn, g)
    student.train()(torch.rand(2, 3, 8, 8, generator=g))  # BN statistics and counter move
    plan = EmaPlan.build(teacher, student)
    assert sorted(str(t[0].dtype) for t, _ in plan.lerp) == ["torch.float32", "torch.float64"]
    assert sorted(str(t[0].dtype) for t, _ in plan.copy) == ["torch.float32", "torch.int64"]
    assert plan.skipped == 2 + 4  # the frozen conv's weight and bias, FrozenBN's 4 buffers
    ref = copy.deepcopy(teacher)
    ema_update(teacher, student, 0.9)
    ema_update_ref(ref, student, 0.9)  # averages the frozen tensors too: equal, since teacher == student there
    for (name, a), b in zip(teacher.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=lambda m: f"seed {seed} {name}: {m}")
    assert int(teacher.bn.num_batches_tracked) == 1
    with torch.no_grad():
        teacher.frozen.weight.add_(1.0)  # a frozen tensor is never touched by the update
    before = teacher.frozen.weight.clone()
    ema_update(teacher, student, 0.5)
    assert torch.equal(teacher.frozen.weight, before)


@pytest.mark.parametrize("seed", SEEDS)
def test_compute_copy_follows_the_master_and_computes_the_same(seed):
    g = torch.Generator().manual_seed(seed)
    student = _randomised(_net(), g)
    ema = EmaTeacher(student, 0.9, compute_dtype=torch.bfloat16)
    x = torch.rand(2, 3, 8, 8, generator=g)
    for _ in range(3):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        student.train()(x)
        ema.update(student)
    conv, bn = ema.compute[0], ema.compute[1]
    assert conv.weight.dtype == torch.bfloat16 and torch.equal(conv.weight, ema.module[0].weight.bfloat16())
    assert bn.weight is ema.module[1].weight and bn.running_mean is ema.module[1].running_mean  # shared, not copied
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(ema(x), ema.module(x))  # what autocast would compute from the float32 weights
    ema.load_state_dict(_randomised(copy.deepcopy(ema.module), g).state_dict())
    assert torch.equal(ema.compute[-1].weight, ema.module[-1].weight.bfloat16())
    ema.reset(student)
    assert torch.equal(ema.compute[0].bias, student[0].bias.bfloat16())


def test_detector_teacher_compute_copy_predicts_the_same_under_autocast():
    from acrst_fast.config import ModelConfig
    from acrst_fast.models.detector import build_detector

    torch.manual_seed(0)
    student = build_detector(ModelConfig(backbone="mobilenet_v2", fpn_channels=16, representation_size=32,
                                         box_score_thresh=0.0), 3)
    ema = EmaTeacher(student, 0.99, compute_dtype=torch.bfloat16)
    images = [torch.rand(3, 96, 128), torch.rand(3, 128, 96)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, ref = ema(images), ema.module(images)
    assert sum(len(p["boxes"]) for p in ref) > 0
    for a, b in zip(got, ref):
        for k in ("boxes", "scores", "labels"):
            assert torch.equal(a[k], b[k]), k
