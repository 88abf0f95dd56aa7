"""What the mutual-learning step feeds where: the teacher sees the weak views and the student the strong
ones; with selective supervision, pasted boxes carry regression weight 1 and pseudo-label boxes 0."""
import torch

from acrst_fast.config import load_config
from acrst_fast.data.build import load_datasets
from acrst_fast.data.batch import apply_pending
from acrst_fast.dist import DistInfo
from acrst_fast.engine.build import build_runner
from conftest import tiny_config_dict, write_config

ACRST_SS = {"fbr": True, "selective_supervision": True, "n_range": [2, 4], "capacity_per_class": 8,
            "crop_size": 16, "pr_window": 5}


def _runner(tmp_path, tiny_demo, acrst: dict | None, augment: dict | None = None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    raw = tiny_config_dict(tiny_demo, tmp_path / "run", total_steps=4, pretrain_steps=1)
    raw["augment"].update({"jitter_prob": 1.0, "cutout": [[1.0, 0.05, 0.2]], **(augment or {})})  # strong != weak
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


def _observed(runner) -> dict[str, list]:
    """What the runner hands its observers, by stage (`MeanTeacher.observers`), as lists in step order."""
    seen: dict[str, list] = {}
    runner.observers.append(lambda stage, step, value: seen.setdefault(stage, []).append(value))
    return seen


def test_teacher_sees_weak_views_and_student_strong_views(tmp_path, tiny_demo):
    runner = _runner(tmp_path, tiny_demo, acrst=None)
    seen = _observed(runner)
    runner.start(0)
    runner.run_step(0)  # pre-training
    runner.run_step(1)  # mutual learning: the teacher is copied from the student, then predicts
    teacher = Spy(runner.ema.module)
    runner.ema.module = teacher
    runner.run_step(2)
    _, unl = seen["batches"][-1]
    (seen_by_teacher,), = teacher.calls
    unl_images = seen["student_inputs"][-1].unl_images
    strong = apply_pending(unl.strong, unl.pending)  # the strong photometric ops run in the step
    assert any(not torch.equal(w, s) for w, s in zip(unl.weak, strong))  # the views differ
    assert all(torch.equal(a, b) for a, b in zip(seen_by_teacher, unl.weak))
    assert all(torch.equal(a, b) for a, b in zip(unl_images, strong))


def _pasted_then_seen(tmp_path, tiny_demo, after_paste: bool):
    """(images right after the paste, the student's unlabeled inputs, the batch) of a mutual step with FBR."""
    runner = _runner(tmp_path, tiny_demo, acrst=ACRST_SS, augment={"photometric_after_paste": after_paste,
                                                                   "cutout": [], "blur_prob": 0.0})
    runner.start(0)
    runner.run_step(0)
    pasted = []
    seen = _observed(runner)
    runner.observers.append(lambda stage, step, v: stage == "rebalanced" and pasted.append([im.clone() for im in
                                                                                          v.unl_images]))
    runner.run_step(1)
    return pasted[-1], seen["student_inputs"][-1].unl_images, seen["batches"][-1][1]


def test_pasted_pixels_receive_the_photometric_ops(tmp_path, tiny_demo):
    """Geometry, crop-paste, then colour jitter etc. (paper): the student's strong view is the pasted image
    through the photometric ops, so pasted instances are augmented with the image they land in. The old
    order (augment.photometric_after_paste=false) pastes into finished strong views."""
    pasted, seen, unl = _pasted_then_seen(tmp_path / "new", tiny_demo, after_paste=True)
    assert any(not torch.equal(p, w) for p, w in zip(pasted, unl.weak))  # instances were pasted
    expected = apply_pending(pasted, unl.pending)
    assert all(torch.equal(a, b) for a, b in zip(seen, expected))
    assert any(not torch.equal(a, p) for a, p in zip(seen, pasted))  # the ops changed pasted pixels too
    pasted, seen, unl = _pasted_then_seen(tmp_path / "old", tiny_demo, after_paste=False)
    assert unl.pending == [] and all(torch.equal(a, b) for a, b in zip(seen, pasted))  # nothing after the paste


def test_selective_supervision_weights_reach_the_losses(tmp_path, tiny_demo):
    runner = _runner(tmp_path, tiny_demo, acrst=ACRST_SS)
    runner.start(0)
    runner.run_step(0)  # the Labeled bank fills
    seen = _observed(runner)
    student = Spy(runner.student_losses)  # what the loss module itself is called with
    runner.student_losses = student
    out = runner.run_step(1)
    pseudo = seen["pseudo_labels"]
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


def test_every_ablation_row_shares_the_burn_in(tmp_path, tiny_demo):
    """Burn-in is burn-in: with FBR waiting for mutual learning, plain Mean Teacher and the full method
    (ACRST, selective supervision, two-stage filtering with a classifier built at start-up) train the same
    student, bit for bit, until mutual learning starts."""
    from acrst_fast.config import load_config as load
    from acrst_fast.ssmll.model import build_ssmll, save_classifier

    ssmll = {"backbone": "resnet18", "input_size": 64, "dim": 16, "layers": 1, "heads": 2}
    cfg = load(write_config(tmp_path / "s.yaml", {**tiny_config_dict(tiny_demo, tmp_path / "s"), "ssmll": ssmll}))
    data = load_datasets(cfg.data)
    save_classifier(tmp_path / "cls.pt", build_ssmll(cfg.ssmll, 4), cfg.ssmll, data.categories.names)
    students = []
    for name, extra in (("mt", {}), ("full", {"acrst": ACRST_SS, "ssmll": {**ssmll, "filter": "two_stage",
                                                                          "checkpoint": str(tmp_path / "cls.pt")}})):
        raw = tiny_config_dict(tiny_demo, tmp_path / name, total_steps=6, pretrain_steps=3) | extra
        c = load(write_config(tmp_path / f"{name}.yaml", raw))
        runner, _ = build_runner(c, data, DistInfo(0, 1, 0, torch.device("cpu")), "test")
        runner.start(0)
        for step in range(3):
            runner.run_step(step)
        students.append(runner.student.state_dict())
    assert all(torch.equal(students[0][k], students[1][k]) for k in students[0])


def test_batched_photometric_step_equals_per_image_step(tmp_path, tiny_demo):
    """augment.batched_photometric=batch (the CUDA default) feeds the student what per_image feeds it, to float
    rounding, with ACRST pasting into both groups."""
    seen = {}
    for mode in ("per_image", "batch"):
        torch.manual_seed(0)  # the same weights and sampler draws in both runs
        runner = _runner(tmp_path / mode, tiny_demo, acrst=ACRST_SS,
                         augment={"batched_photometric": mode, "blur_prob": 1.0, "grayscale_prob": 0.5})
        runner.pretrain_steps = 0  # the first step is mutual: nothing before it differs between the two runs
        observed = _observed(runner)
        runner.start(0)
        runner.run_step(0)
        inputs = observed["student_inputs"][0]
        seen[mode] = list(inputs.lab_images) + list(inputs.unl_images)
    assert len(seen["batch"]) == len(seen["per_image"]) > 2
    for a, b in zip(seen["batch"], seen["per_image"]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
