"""ACRST on mmdetection's structures (SemiBaseDetector / SoftTeacher).

Data is what mmdet's `DetDataPreprocessor` hands the detector: `inputs`, a float Tensor[B, 3, H_pad, W_pad]
normalised by the preprocessor's `mean` and `std` (0..255 units, in the batch's channel order) and padded
at the bottom and right, and `data_samples`, one `DetDataSample` per image with `metainfo["img_shape"]`
(h, w: the image inside the padding) and `gt_instances`, an `InstanceData` with `bboxes` (Tensor[N, 4] or
`HorizontalBoxes`, xyxy pixels) and `labels` (int64 Tensor[N], 0-based). Teacher outputs are
`InstanceData` with `bboxes`, `labels`, `scores` (`pred_instances`, or SoftTeacher's pseudo instances).

`rebalance` returns a new batch (the padding and unpasted pixels as they were) and new data samples
(`sample.new()`: the caller's are not modified) whose `gt_instances` holds the merged `bboxes` and `labels`,
every other per-instance field re-aligned (`scores`, SoftTeacher's `reg_uncs`, ...), `reg_weight` (float
Tensor[M]) and `source_index` (int64 Tensor[M], -1 pasted). Selective supervision in SoftTeacher's
`rcnn_reg_loss_by_pseudo_instances`: keep `gt_instances[gt_instances.reg_weight > 0]` (README).
"""
from __future__ import annotations

import torch

from acrst_fast.augment.adapters._fields import prediction_of, rewrap, target_of
from acrst_fast.augment.rebalance import ACRST

IMAGENET_MEAN, IMAGENET_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)  # mmdet's configs


class MMDetACRST:
    """ACRST for mmdet batches. `mean`, `std`: the data preprocessor's (0..255 units); `acrst_kwargs` are
    ACRST's. Labels are 0-based and boxes xyxy, as mmdet has them. `self.acrst` is the ACRST object."""

    def __init__(self, num_classes: int, *, mean=IMAGENET_MEAN, std=IMAGENET_STD, **acrst_kwargs):
        for fixed in ("label_offset", "box_format"):
            if fixed in acrst_kwargs:
                raise TypeError(f"MMDetACRST sets {fixed} itself (mmdet: 0-based labels, xyxy boxes)")
        self.acrst = ACRST(num_classes, label_offset=0, box_format="xyxy", **acrst_kwargs)
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(3, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(3, 1, 1)

    def add_ground_truth(self, inputs: torch.Tensor, data_samples: list) -> None:
        """Labeled weak views into the Labeled bank (first pass over the labeled data)."""
        call = "MMDetACRST.add_ground_truth"
        targets = [self._target(call, i, s)[0] for i, s in enumerate(data_samples)]
        self.acrst.add_ground_truth(self.unpack(call, inputs, data_samples), [t["boxes"] for t in targets],
                                    [t["labels"] for t in targets])

    def observe_teacher(self, inputs: torch.Tensor, data_samples: list, predictions: list, pseudo_labels: list) -> None:
        """Every unlabeled step, on every rank (collective): the teacher's `pred_instances` on the weak view,
        and the pseudo instances kept from them."""
        call = "MMDetACRST.observe_teacher"
        self.acrst.observe_teacher(self.unpack(call, inputs, data_samples),
                                   [self._prediction(call, f"predictions[{i}]", p) for i, p in enumerate(predictions)],
                                   [self._prediction(call, f"pseudo_labels[{i}]", p) for i, p in enumerate(pseudo_labels)])

    def share_labeled_bank(self, generator: torch.Generator) -> None:
        self.acrst.share_labeled_bank(generator)

    def rebalance(self, inputs: torch.Tensor, data_samples: list, generator: torch.Generator, *,
                  selective_supervision: bool = True, fill: dict | None = None) -> tuple[torch.Tensor, list]:
        """Paste into the strong view's batch (geometry only) and re-align each sample's gt_instances."""
        call = "MMDetACRST.rebalance"
        targets = [self._target(call, i, s) for i, s in enumerate(data_samples)]
        images, out = self.acrst.rebalance_targets(self.unpack(call, inputs, data_samples), [t for t, _ in targets],
                                                   generator, selective_supervision=selective_supervision, fill=fill)
        samples = []
        for sample, (_, wrappers), t in zip(data_samples, targets, out):
            old = sample.gt_instances
            new = type(old)(metainfo=dict(old.metainfo_items()))
            new.bboxes = rewrap("boxes", t.pop("boxes"), wrappers)
            new.labels = t.pop("labels")
            for key, value in t.items():
                setattr(new, key, rewrap(key, value, wrappers))
            copy = sample.new()
            copy.gt_instances = new
            samples.append(copy)
        return self.pack(inputs, images, data_samples), samples

    def state_dict(self) -> dict:
        return self.acrst.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.acrst.load_state_dict(state)

    def unpack(self, call: str, inputs: torch.Tensor, data_samples: list) -> list[torch.Tensor]:
        """The batch's images as float Tensor[3, h, w] in [0, 1] (de-normalised, padding cut off)."""
        if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4 or inputs.shape[1] != 3:
            got = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise ValueError(f"{call}: inputs must be the preprocessed batch, a Tensor[B, 3, H, W], got {got}")
        if len(data_samples) != len(inputs):
            raise ValueError(f"{call}: {len(data_samples)} data_samples for a batch of {len(inputs)} images")
        mean, std = self.mean.to(inputs.device), self.std.to(inputs.device)
        out = []
        for i, (image, sample) in enumerate(zip(inputs, data_samples)):
            h, w = self._shape(call, i, sample, inputs.shape[2:])
            out.append((image[:, :h, :w].float() * std + mean) / 255)
        return out

    def pack(self, inputs: torch.Tensor, images: list[torch.Tensor], data_samples: list) -> torch.Tensor:
        """A copy of `inputs` with `images` (float [0, 1]) normalised back into each image's region."""
        batch = inputs.clone()
        mean, std = self.mean.to(inputs.device), self.std.to(inputs.device)
        for i, image in enumerate(images):
            h, w = image.shape[1:]
            batch[i, :, :h, :w] = ((image * 255 - mean) / std).to(inputs.dtype)
        return batch

    @staticmethod
    def _shape(call: str, i: int, sample, padded) -> tuple[int, int]:
        shape = sample.metainfo.get("img_shape") if hasattr(sample, "metainfo") else None
        if shape is None:
            raise ValueError(f"{call}: data_samples[{i}] has no metainfo 'img_shape' (the image inside the padding)")
        h, w = int(shape[0]), int(shape[1])
        if h > padded[0] or w > padded[1]:
            raise ValueError(f"{call}: data_samples[{i}] img_shape {(h, w)} exceeds the batch's {tuple(padded)}")
        return h, w

    @staticmethod
    def _target(call: str, i: int, sample) -> tuple[dict, dict]:
        where = f"data_samples[{i}].gt_instances"
        inst = getattr(sample, "gt_instances", None)
        if inst is None or not hasattr(inst, "keys"):
            raise ValueError(f"{call}: {where} is missing or not an InstanceData")
        return target_of(call, where, {k: inst.get(k) for k in inst.keys()}, "bboxes", "labels")

    @staticmethod
    def _prediction(call: str, where: str, inst) -> dict:
        if not hasattr(inst, "keys"):
            raise ValueError(f"{call}: {where} must be an InstanceData, got {type(inst).__name__}")
        return prediction_of(call, where, {k: inst.get(k) for k in inst.keys()}, ("bboxes",), ("labels",))
