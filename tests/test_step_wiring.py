"""What the mutual-learning step feeds where: the teacher sees the weak views and the student the strong
ones; with selective supervision, pasted boxes carry regression weight 1 and pseudo-label boxes 0."""
import torch

from acrst_fast.config import load_config
from acrst_fast.data.build import load_datasets
from acrst_fast.dist import DistInfo
from acrst_fast.engine.build import build_runner
from conftest import tiny_config_dict, write_config

ACRST_SS = {"fbr": True, "selective_supervision": True, "n_range": [2, 4], "capacity_per_class": 8,
            "crop_size": 16, "pr_window": 5}


def _runner(tmp_path, tiny_demo, acrst: dict | None):
    raw = tiny_config_dict(tiny_demo, tmp_path / "run", total_steps=4, pretrain_steps=1)
    raw["augment"].update({"jitter_prob": 1.0, "cutout": [[1.0, 0.05, 0.2]]})  # strong differs from weak
    raw["mean_teacher"]["tau_cls"] = 0.0  # a barely trained teacher still gives pseudo-labels
    if acrst:
        raw["acrst"] = acrst
    cfg = load_config(write_config(tmp_path / "c.yaml", raw))
    runner, _ = build_runner(cfg, load_datasets(cfg.data), DistInfo(0, 1, 0, torch.device("cpu")), "test")
    return runner


class Spy(torch.nn.Module):
    """Wraps a module; records the arguments of each call."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, *args):
        self.calls.append(args)
        return self.inner(*args)


def test_teacher_sees_weak_views_and_student_strong_views(tmp_path, tiny_demo):
    runner = _runner(tmp_path, tiny_demo, acrst=None)
    batches = []
    take = runner._batches
    runner._batches = lambda step: batches.append(take(step)) or batches[-1]
    runner.start(0)
    runner.run_step(0)  # pre-training
    runner.run_step(1)  # mutual learning: the teacher is copied from the student, then predicts
    teacher, student = Spy(runner.ema.module), Spy(runner.student_losses)
    runner.ema.module, runner.student_losses = teacher, student
    runner.run_step(2)
    _, unl = batches[-1]
    (seen_by_teacher,), = teacher.calls
    _, _, unl_images, _ = student.calls[0]
    assert any(not torch.equal(w, s) for w, s in zip(unl.weak, unl.strong))  # the views differ
    assert all(torch.equal(a, b) for a, b in zip(seen_by_teacher, unl.weak))
    assert all(torch.equal(a, b) for a, b in zip(unl_images, unl.strong))


def test_selective_supervision_weights_reach_the_losses(tmp_path, tiny_demo):
    runner = _runner(tmp_path, tiny_demo, acrst=ACRST_SS)
    runner.start(0)
    runner.run_step(0)  # the Labeled bank fills
    pseudo = []
    label = runner.pseudo_labels
    runner.pseudo_labels = lambda step, unl: pseudo.append(label(step, unl)) or pseudo[-1]
    student = Spy(runner.student_losses)
    runner.student_losses = student
    out = runner.run_step(1)
    _, lab_targets, _, unl_targets = student.calls[0]
    assert all("reg_weight" not in t for t in lab_targets)  # labeled boxes: full supervision
    pasted = 0
    for t, kept in zip(unl_targets, pseudo[-1].kept):
        w = t["reg_weight"]
        assert w.shape == t["labels"].shape and set(w.unique().tolist()) <= {0.0, 1.0}
        from_teacher = torch.tensor([bool((kept["boxes"] == b).all(1).any()) for b in t["boxes"]], dtype=torch.bool)
        assert torch.equal(w == 0, from_teacher)  # pseudo-label boxes weight 0, pasted boxes weight 1
        pasted += int(w.sum())
    assert pasted > 0 and sum(len(k["boxes"]) for k in pseudo[-1].kept) > 0
    assert {"loss_box_reg", "loss_rpn_box_reg"} <= set(out.unsup)  # the weighted terms enter the loss (Eq. 10)
