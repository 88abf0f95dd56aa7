"""The sync budget: one mutual step (ACRST, selective supervision, pseudo-label metrics, the detector) reads the
device a fixed number of times in all (project code and torchvision's), whatever the batch size or the number
of pseudo-labels."""
import os
import random
import sys

import pytest
import torch

from acrst_fast.augment.affr import class_histogram
from acrst_fast.host import mark_host, to_host, upload
from acrst_fast.syncs import SyncCounter
from conftest import REPO, cpu_and_cuda, tiny_config_dict, write_config

sys.path.insert(0, str(REPO / "bench"))
BUDGET = 16  # the whole step: project code and libraries (torchvision 0.29's stock heads: 384 at batch 8 + 8)


def test_counter_sees_what_would_synchronise():
    x = torch.arange(10.0)
    with SyncCounter() as c:
        x.sum().item()
        float(x[0])
        x.tolist()
        torch.nonzero(x > 3)
        x[x > 3]
        x.unique()
        mark_host(torch.ones(3)).tolist()  # host data by design: not counted
        to_host(x, x * 2, mark_host(torch.ones(2)))  # one read for the two device-side tensors
        x + 1  # no read
    assert c.project_total() == 1 and c.total() == 7, c.table()  # six here, one in to_host


def _runner(tmp_path, tiny_demo, batch: int):
    from syncs import build

    raw = tiny_config_dict(tiny_demo, tmp_path / f"run{batch}")
    raw["acrst"] = {"fbr": True, "selective_supervision": True, "n_range": [1, 6], "capacity_per_class": 8,
                    "crop_size": 16, "pr_window": 5}
    raw["mean_teacher"]["tau_cls"] = 0.0  # every detection is a pseudo-label: P grows with the batch
    raw["model"]["box_detections_per_img"] = 20
    raw["data"]["num_workers"] = 1  # views are made in a worker, as in training (host work, not counted)
    cfg = write_config(tmp_path / f"c{batch}.yaml", raw)
    return build(str(cfg), batch, [])


@pytest.mark.slow
def test_mutual_step_sync_budget_does_not_grow(tmp_path, tiny_demo):
    from syncs import count

    counts = {}
    for batch in (2, 8):
        runner, step = _runner(tmp_path, tiny_demo, batch)
        project, library = count(runner, step, torch.device("cpu"))
        counts[batch] = sum(project.values()) + sum(library.values())
        assert counts[batch] <= BUDGET, f"batch {batch}: {dict(project + library)}"
        assert runner.last_pseudo_count > 10 * batch  # many pseudo-labels, yet the count does not grow
    assert counts[2] == counts[8], counts


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_upload_and_histogram_stay_off_the_host(device):
    """`upload` (pinned, non-blocking) gives the same tensor as `.to`; the histogram that replaced bincount
    (which reads max() back on CUDA) counts like it, for seeded random labels."""
    seeds = [0, 1, 2] + ([random.SystemRandom().randrange(2**31)] if os.environ.get("ACRST_FRESH_SEEDS") else [])
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(1, 8, (int(torch.randint(0, 40, (), generator=g)),), generator=g)  # 6, 7: past K
        moved = upload(labels, device)
        assert moved.device.type == device and torch.equal(moved.cpu(), labels)
        expect = torch.bincount(labels - 1, minlength=5)[:5].double()
        assert torch.equal(class_histogram(moved, 5).cpu(), expect), f"seed {seed}"
        assert class_histogram(moved, 0).shape == (0,)


def test_counter_sees_inside_inference_mode():
    """The teacher's forward runs under torch.inference_mode, where a dispatch mode sees no op."""
    x = torch.rand(10)
    with SyncCounter() as c:
        with torch.inference_mode():
            torch.where(x > 0.5)
    assert c.total() == 1 and torch.inference_mode().__class__.__name__ == "inference_mode"
