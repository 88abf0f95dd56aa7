"""Multi-level RoIAlign with one host read per call: torchvision's `MultiScaleRoIAlign` selects each level's
boxes with a `torch.where` (a read per level on CUDA); here the boxes are ordered by level on the device and
the per-level counts are read once, then each level's RoIAlign runs on its contiguous chunk. The same
numbers (tests/test_roi_pool.py).

    pooler = CountedMultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    pooler(features, boxes, image_shapes) -> Tensor[R, C, 7, 7]

features: {name: Tensor[N, C, H_l, W_l]}; boxes: list of Tensor[R_i, 4] (x1, y1, x2, y2, canvas pixels).
"""
from __future__ import annotations

import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales


class CountedMultiScaleRoIAlign(MultiScaleRoIAlign):
    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        feats = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(feats, image_shapes, self.canonical_scale, self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        if len(feats) == 1:
            return roi_align(feats[0], rois, self.output_size, self.scales[0], self.sampling_ratio)
        levels = self.map_levels(boxes)
        order = torch.argsort(levels, stable=True)
        counts = (levels[None, :] == torch.arange(len(feats), device=levels.device)[:, None]).sum(dim=1).tolist()
        result = feats[0].new_zeros((len(rois), feats[0].shape[1], *self.output_size))
        for feat, scale, idx in zip(feats, self.scales, order.split(counts)):
            if idx.numel():
                pooled = roi_align(feat, rois[idx], self.output_size, scale, self.sampling_ratio)
                result.index_copy_(0, idx, pooled.to(result.dtype))
        return result
