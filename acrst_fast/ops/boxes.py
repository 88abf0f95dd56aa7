"""Box operations on (x1, y1, x2, y2) boxes in absolute pixels.

`box_iou` runs the C++ extension on CPU tensors and falls back to `box_iou_ref` (pure PyTorch)
when the extension is not built or the tensors live on a GPU.
"""
import torch

from acrst_fast import _ext


def box_iou_ref(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU. boxes1 (Tensor[N, 4]), boxes2 (Tensor[M, 4]): (x1, y1, x2, y2). Returns Tensor[N, M].

    A pair whose union is empty (two degenerate boxes) has IoU 0, not NaN.
    """
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    lt = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(inter))


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of float32 boxes, Tensor[N, 4] x Tensor[M, 4] (x1, y1, x2, y2) -> Tensor[N, M].

    Raises ValueError naming the box index if a box is non-finite or inverted.
    """
    if boxes1.device.type != "cpu" or boxes2.device.type != "cpu":
        return box_iou_ref(boxes1, boxes2)
    if not _ext.HAS_EXT:
        _ext.warn_fallback()
        for name, b in (("boxes1", boxes1), ("boxes2", boxes2)):
            bad = (~torch.isfinite(b).all(dim=1)) | (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
            if bad.any():
                raise ValueError(f"{name}: box {int(bad.nonzero()[0])} is non-finite or inverted (x2 < x1 or y2 < y1)")
        return box_iou_ref(boxes1, boxes2)
    a = boxes1.detach().to(torch.float32).contiguous().numpy()
    b = boxes2.detach().to(torch.float32).contiguous().numpy()
    return torch.from_numpy(_ext._C.box_iou(a, b))
