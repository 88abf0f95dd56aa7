"""DALI data stage (CPU pipeline here, GPU where one is) against the torch fallback."""
import dataclasses
import shutil

import pytest
import torch

from acrst_fast.config import AugmentConfig
from acrst_fast.data.coco import DataError, load_coco_records
from acrst_fast.data.dali_stage import DaliDataStage
from acrst_fast.data.loader import TorchDataStage
from conftest import cpu_and_cuda

AUG = AugmentConfig(scales=[80, 96, 112], max_size=160, test_scale=96, crop_prob=0.5, flip_prob=0.5)


def _records(root):
    lab, _ = load_coco_records(root / "labeled.json", root / "labeled")
    unl, _ = load_coco_records(root / "unlabeled.json", root / "unlabeled")
    val, _ = load_coco_records(root / "val.json", root / "val")
    return lab, unl, val


def _stages(records, rank=0, world=1, bad_images="fail", device_id=None, aug=AUG):
    kw = dict(batch_labeled=4, batch_unlabeled=3, seed=5, rank=rank, world=world, bad_images=bad_images,
              labeled_views=("weak", "strong"))
    return (TorchDataStage(*records, aug, num_workers=0, **kw),
            DaliDataStage(*records, aug, device_id=device_id, threads=1, **kw))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_dali_defers_the_photometric_ops_like_the_fallback(tiny_demo, device):
    """augment.photometric_after_paste (default): both stages hand over geometry-only strong views (copies of
    the weak pixels, never the same tensor: the paste writes into them) and the same photometric draws."""
    device_id = 0 if device == "cuda" else None
    torch_stage, dali_stage = _stages(_records(tiny_demo), device_id=device_id)
    for stream in ("labeled", "unlabeled"):
        a, b = next(getattr(torch_stage, stream)(1)), next(getattr(dali_stage, stream)(1))
        assert a.pending == b.pending and len(a.pending) == len(a.strong) > 0
        for batch in (a, b):
            for w, st in zip(batch.weak, batch.strong):
                assert torch.equal(w, st) and w.data_ptr() != st.data_ptr()
        from acrst_fast.data.batch import apply_pending

        moved = [(x - w).abs().mean() for x, w in zip(apply_pending(b.strong, b.pending), b.weak)]
        assert torch.stack(moved).mean() > 0.01  # the draws change the pixels when applied


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_dali_views_match_the_fallback(tiny_demo, device):
    """The old order (photometric ops in the data stage): DALI's operators against torchvision's."""
    device_id = 0 if device == "cuda" else None
    aug = dataclasses.replace(AUG, photometric_after_paste=False)
    torch_stage, dali_stage = _stages(_records(tiny_demo), device_id=device_id, aug=aug)
    for stream in ("labeled", "unlabeled"):
        t_iter, d_iter = getattr(torch_stage, stream)(2), getattr(dali_stage, stream)(2)
        for _ in range(3):  # crosses an epoch boundary of the 8-image streams
            a, b = next(t_iter), next(d_iter)
            assert a.image_ids == b.image_ids and a.geometry == b.geometry
            assert all(torch.equal(x, y) for x, y in zip(a.boxes, b.boxes))  # box transforms: exact
            assert all(torch.equal(x, y) for x, y in zip(a.labels, b.labels))
            for x, y in zip(a.weak, b.weak):  # same geometry; DALI rounds to uint8 before converting
                y = y.cpu()
                assert x.shape == y.shape and y.dtype == torch.float32
                assert (x - y).abs().mean() < 2 / 255 and (x - y).abs().max() < 0.1
            # strong views: the same draws through other operators -> statistically similar
            diffs = torch.stack([(x - y.cpu()).abs().mean() for x, y in zip(a.strong, b.strong)])
            moved = torch.stack([(s.cpu() - w.cpu()).abs().mean() for s, w in zip(b.strong, b.weak)])
            assert diffs.mean() < 0.12 and moved.mean() > 0.01
    v1, v2 = next(torch_stage.val()), next(dali_stage.val())
    assert v1.image_ids == v2.image_ids and [x.shape for x in v1.weak] == [y.shape for y in v2.weak]
    assert v2.strong == []


def test_dali_shards_by_rank_and_resumes_by_step(tiny_demo):
    records = _records(tiny_demo)
    seen = []
    for rank in (0, 1):
        _, stage = _stages(records, rank=rank, world=2)
        seen.append([i for b in stage.val() for i in b.image_ids])
    assert set(seen[0]).isdisjoint(seen[1]) and sorted(seen[0] + seen[1]) == sorted(r.image_id for r in records[2])
    _, stage = _stages(records)
    from_zero = stage.labeled(0)
    batches = [next(from_zero) for _ in range(4)]
    resumed = next(stage.labeled(3))
    assert resumed.image_ids == batches[3].image_ids
    assert all(torch.equal(x, y) for x, y in zip(resumed.strong, batches[3].strong))


def _with_bad_file(tiny_demo, tmp_path, how):
    root = tmp_path / "data"
    shutil.copytree(tiny_demo, root)
    lab, unl, val = _records(root)
    bad = lab[1]
    if how == "corrupt":
        with open(bad.path, "wb") as f:
            f.write(b"\x00not an image" * 50)
    else:
        (root / "labeled" / bad.path.split("/")[-1]).unlink()
    return (lab, unl, val), bad


@pytest.mark.parametrize("how", ["corrupt", "missing"])
def test_bad_image_fails_with_its_path(tiny_demo, tmp_path, how):
    records, bad = _with_bad_file(tiny_demo, tmp_path, how)
    for stage in _stages(records):
        with pytest.raises(DataError, match=bad.path.split("/")[-1]):
            for _ in range(3):
                next(stage.labeled(0))


@pytest.mark.parametrize("how", ["corrupt", "missing"])
def test_bad_image_skipped_and_counted(tiny_demo, tmp_path, how, caplog):
    records, bad = _with_bad_file(tiny_demo, tmp_path, how)
    for stage in _stages(records, bad_images="skip"):
        it = stage.labeled(0)
        ids = [i for _ in range(2) for i in next(it).image_ids]  # one epoch of 8 images
        assert bad.image_id not in ids and len(ids) == 7
        assert stage.policy.skipped == 1
    assert "skipped" in caplog.text and bad.path.split("/")[-1] in caplog.text


@pytest.mark.slow
def test_training_runs_on_the_dali_stage(tmp_path, tiny_demo, cpu_env):
    import json
    import subprocess
    import sys

    from conftest import REPO, tiny_config_dict, write_config
    from test_train import ACRST_ON

    raw = tiny_config_dict(tiny_demo, tmp_path / "run", total_steps=4, pretrain_steps=2)
    raw["data"]["pipeline"] = "dali"
    raw["acrst"] = ACRST_ON
    raw["mean_teacher"]["tau_cls"] = 0.0
    raw["eval"]["period"] = 2
    cfg = write_config(tmp_path / "dali.yaml", raw)
    proc = subprocess.run([sys.executable, "-m", "acrst_fast.train", str(cfg)], env=cpu_env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert summary["teacher"]["step"] == 4
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("unsup/loss_classifier") is not None for r in records if r["kind"] == "train")


def test_ssmll_square_views_from_dali_match_torch(tiny_demo):
    from acrst_fast.ssmll.data import SquareViews, dali_step_batches, step_loader

    lab, _, _ = _records(tiny_demo)
    views = SquareViews(lab, 4, 64, AUG, seed=3, stream=11)
    torch_batches = iter(step_loader(views, 4, 1, 4, 0))
    for a, b in zip(torch_batches, dali_step_batches(views, 4, 1, 4, None, 1, "fail")):
        assert torch.equal(a["labels"], b["labels"]) and a["weak"].shape == b["weak"].shape == (4, 3, 64, 64)
        assert (a["weak"] - b["weak"]).abs().mean() < 2 / 255  # same resize and flip, uint8 rounding
        assert (a["strong"] - b["strong"]).abs().mean() < 0.12 and (b["strong"] - b["weak"]).abs().mean() > 0.01


def test_run_ahead_keeps_order_runs_ahead_and_raises_in_the_consumer():
    import threading
    import time

    from acrst_fast.data.dali_stage import run_ahead

    produced = []

    def source(n, fail_at=None):
        for i in range(n):
            if i == fail_at:
                raise DataError(f"bad image {i}")
            produced.append(i)
            yield i

    it = run_ahead(source(6), depth=2)
    assert next(it) == 0
    deadline = time.time() + 5
    while len(produced) < 3 and time.time() < deadline:  # the producer works ahead: the next two are made
        time.sleep(0.01)
    assert produced[:3] == [0, 1, 2]
    assert list(it) == [1, 2, 3, 4, 5]
    with pytest.raises(DataError, match="bad image 2"):
        list(run_ahead(source(5, fail_at=2)))
    before = threading.active_count()
    abandoned = run_ahead(source(100))
    next(abandoned)
    abandoned.close()  # the consumer leaves early: the producer thread stops
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.01)
    assert threading.active_count() <= before


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_views_made_on_the_device_equal_the_workers_views(tiny_demo, device):
    """view_device: uint8 images cross the process boundary and the views are made on the device, from
    the same draws. On the CPU the result is bit-identical to views made in the workers."""
    records = _records(tiny_demo)
    kw = dict(batch_labeled=3, batch_unlabeled=3, seed=5, rank=0, world=1, num_workers=1,
              labeled_views=("weak", "strong"))
    workers = TorchDataStage(*records, AUG, **kw)
    on_device = TorchDataStage(*records, AUG, view_device=torch.device(device), **kw)
    for stream in ("labeled", "unlabeled", "val"):
        a_it = getattr(workers, stream)(*(() if stream == "val" else (1,)))
        b_it = getattr(on_device, stream)(*(() if stream == "val" else (1,)))
        for _ in range(2):
            a, b = next(a_it), next(b_it)
            assert a.image_ids == b.image_ids and not b.raw
            assert all(torch.equal(x, y) for x, y in zip(a.boxes, b.boxes))
            for x, y in zip(a.weak + a.strong, b.weak + b.strong):
                assert y.device.type == device
                if device == "cpu":
                    assert torch.equal(x, y)
                else:
                    assert (x - y.cpu()).abs().max() < 2e-2
            assert len(a.weak) == len(b.weak) and len(a.strong) == len(b.strong)


def test_two_open_iterators_of_one_stream(tiny_demo):
    """Iterators run ahead in threads: two open at once (a resume beside a first pass) must not share a
    pipeline, and each gives its own positions."""
    _, stage = _stages(_records(tiny_demo))
    a, b = stage.labeled(0), stage.labeled(3)
    first = [next(a) for _ in range(4)]
    again = next(b)
    assert again.image_ids == first[3].image_ids
    assert all(torch.equal(x, y) for x, y in zip(again.boxes, first[3].boxes))
