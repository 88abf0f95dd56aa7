"""ACRST on detectron2's structures (Unbiased Teacher's trainer).

Data is detectron2's `DatasetMapper` output: a list of dicts, each with `image` (uint8 Tensor[3, H, W],
BGR: crops are stored and pasted in the caller's channel order) and `instances` (`Instances` of image size
(H, W) with `gt_boxes`: `Boxes` (Tensor[N, 4] xyxy pixels) and `gt_classes`: int64 Tensor[N], 0-based).
Teacher outputs are `Instances` with `pred_boxes`, `pred_classes`, `scores` (Unbiased Teacher's
`proposals_roih`); its pseudo-labels may use either those names or `gt_boxes`, `gt_classes`, `scores`
(`process_pseudo_label`).

`rebalance` returns new dicts and new `Instances` (the caller's are not modified): `gt_boxes`, `gt_classes`,
every other per-instance field re-aligned, `gt_reg_weight` (float Tensor[M]) and `gt_source_index` (int64
Tensor[M], -1 pasted). The `gt_` prefix makes detectron2's `ROIHeads.label_and_sample_proposals` copy both
onto each sampled proposal, so a box-regression loss can weight by `proposals.gt_reg_weight` (README).
"""
from __future__ import annotations

import torch

from acrst_fast.augment.adapters._fields import prediction_of, rewrap, target_of
from acrst_fast.augment.rebalance import ACRST

BOX_NAMES, CLASS_NAMES = ("gt_boxes", "pred_boxes"), ("gt_classes", "pred_classes")


class Detectron2ACRST:
    """ACRST for detectron2 dataset dicts. `acrst_kwargs` are ACRST's (capacity, crop_size, paste, beta, ...);
    labels are 0-based and boxes xyxy, as detectron2 has them. `self.acrst` is the ACRST object
    (`state_dict`, `diagnostics`)."""

    def __init__(self, num_classes: int, **acrst_kwargs):
        for fixed in ("label_offset", "box_format"):
            if fixed in acrst_kwargs:
                raise TypeError(f"Detectron2ACRST sets {fixed} itself (detectron2: 0-based classes, xyxy boxes)")
        self.acrst = ACRST(num_classes, label_offset=0, box_format="xyxy", **acrst_kwargs)

    def add_ground_truth(self, batched_inputs: list[dict]) -> None:
        """Labeled weak views into the Labeled bank (first pass over the labeled data)."""
        call = "Detectron2ACRST.add_ground_truth"
        targets = [self._target(call, f"batched_inputs[{i}]['instances']", d) for i, d in enumerate(batched_inputs)]
        self.acrst.add_ground_truth(self._images(call, batched_inputs), [t["boxes"] for t, _ in targets],
                                    [t["labels"] for t, _ in targets])

    def observe_teacher(self, weak_inputs: list[dict], predictions: list, pseudo_labels: list) -> None:
        """Every unlabeled step, on every rank (collective): all teacher predictions, and the kept ones."""
        call = "Detectron2ACRST.observe_teacher"
        self.acrst.observe_teacher(self._images(call, weak_inputs),
                                   [self._prediction(call, f"predictions[{i}]", p) for i, p in enumerate(predictions)],
                                   [self._prediction(call, f"pseudo_labels[{i}]", p) for i, p in enumerate(pseudo_labels)])

    def share_labeled_bank(self, generator: torch.Generator) -> None:
        self.acrst.share_labeled_bank(generator)

    def rebalance(self, batched_inputs: list[dict], generator: torch.Generator, *, selective_supervision: bool = True,
                  fill: dict | None = None) -> list[dict]:
        """Paste into the strong views (geometry only: photometric ops after) and re-align their instances."""
        call = "Detectron2ACRST.rebalance"
        targets = [self._target(call, f"batched_inputs[{i}]['instances']", d) for i, d in enumerate(batched_inputs)]
        images, out = self.acrst.rebalance_targets(self._images(call, batched_inputs), [t for t, _ in targets],
                                                   generator, selective_supervision=selective_supervision, fill=fill)
        result = []
        for d, (_, wrappers), image, t in zip(batched_inputs, targets, images, out):
            old = d["instances"]
            new = type(old)(old.image_size)
            new.gt_boxes = rewrap("boxes", t.pop("boxes"), wrappers)
            new.gt_classes = t.pop("labels")
            new.gt_reg_weight, new.gt_source_index = t.pop("reg_weight"), t.pop("source_index")
            for key, value in t.items():
                new.set(key, rewrap(key, value, wrappers))
            result.append(dict(d, image=image, instances=new))
        return result

    def state_dict(self) -> dict:
        return self.acrst.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.acrst.load_state_dict(state)

    @staticmethod
    def _images(call: str, batched_inputs: list[dict]) -> list[torch.Tensor]:
        if not isinstance(batched_inputs, (list, tuple)):
            raise ValueError(f"{call}: batched_inputs must be a list of dataset dicts, got {type(batched_inputs).__name__}")
        for i, d in enumerate(batched_inputs):
            if not isinstance(d, dict) or "image" not in d:
                raise ValueError(f"{call}: batched_inputs[{i}] has no 'image' (detectron2's DatasetMapper output)")
        return [d["image"] for d in batched_inputs]

    @staticmethod
    def _target(call: str, where: str, d: dict) -> tuple[dict, dict]:
        """({"boxes", "labels", other per-instance fields as tensors}, box types to re-wrap)."""
        inst = d.get("instances") if isinstance(d, dict) else None
        if inst is None or not hasattr(inst, "get_fields"):
            raise ValueError(f"{call}: {where} is missing or not an Instances")
        return target_of(call, where, dict(inst.get_fields()), "gt_boxes", "gt_classes")

    @staticmethod
    def _prediction(call: str, where: str, inst) -> dict:
        if not hasattr(inst, "get_fields"):
            raise ValueError(f"{call}: {where} must be an Instances, got {type(inst).__name__}")
        return prediction_of(call, where, inst.get_fields(), BOX_NAMES, CLASS_NAMES)
