"""Box geometry in float32 whatever the autocast dtype: anchors, box encoding and decoding.

Under bf16 autocast torchvision's detector computes box coordinates in the dtype of the features:
- `AnchorGenerator.forward` takes `feature_maps[0].dtype`, so anchors are bf16 numbers (4 px steps
  above 512 px, 8 px above 1024) and its cell anchors are cast in place, for later calls too;
- `BoxCoder.decode_single` casts anchors and proposals to the regression output's dtype;
- `BoxCoder.encode_single` computes the regression targets in the reference boxes' dtype.
The RPN's targets and its decoded proposals then disagree by a few pixels. Here every box is in float32
(x1, y1, x2, y2 pixels) while the convolutions and linear layers keep the autocast dtype.

`Float32AnchorGenerator` also keeps the anchors of the last few canvas sizes (the data stage's scale
buckets), so a step builds them once per size instead of once per forward.
"""
from __future__ import annotations

import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

_CACHE_SIZE = 8  # canvas sizes kept (the multi-scale training views have a handful)


class Float32BoxCoder(BoxCoder):
    """torchvision's `BoxCoder`, encoding and decoding in float32 whatever the input dtypes."""

    def decode_single(self, rel_codes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return super().decode_single(rel_codes.float(), boxes.float())

    def encode_single(self, reference_boxes: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
        return super().encode_single(reference_boxes.float(), proposals.float())


class Float32AnchorGenerator(AnchorGenerator):
    """torchvision's `AnchorGenerator` with anchors always in float32 (Tensor[A, 4] per image, x1y1x2y2
    pixels of the padded canvas, the same A for every image of a batch), cached per (canvas size, feature
    sizes, device)."""

    def _anchors(self, image_size: tuple[int, int], grid_sizes: list[tuple[int, int]],
                 device: torch.device) -> torch.Tensor:
        key = (image_size, tuple(grid_sizes), str(device))
        cache = self.__dict__.setdefault("_float32_cache", {})
        if key not in cache:
            strides = [[torch.empty((), dtype=torch.int64, device=device).fill_(image_size[0] // g[0]),
                        torch.empty((), dtype=torch.int64, device=device).fill_(image_size[1] // g[1])]
                       for g in grid_sizes]
            self.set_cell_anchors(torch.float32, device)
            if len(cache) >= _CACHE_SIZE:
                cache.pop(next(iter(cache)))
            cache[key] = torch.cat(self.grid_anchors([list(g) for g in grid_sizes], strides))
        return cache[key]

    def forward(self, image_list: ImageList, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        grid_sizes = [tuple(int(s) for s in f.shape[-2:]) for f in feature_maps]
        image_size = tuple(int(s) for s in image_list.tensors.shape[-2:])
        anchors = self._anchors(image_size, grid_sizes, feature_maps[0].device)
        return [anchors for _ in image_list.image_sizes]
