"""Box and pixel operations; each fast path dispatches here with its `_ref` beside it."""
from acrst_fast.ops.boxes import box_iou, box_iou_ref

__all__ = ["box_iou", "box_iou_ref"]
