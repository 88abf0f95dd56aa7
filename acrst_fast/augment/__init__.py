"""Drop-in ACRST augmentation for SSOD trainers (no dependency on the acrst_fast trainer).

- `ACRST`: CropBank + FBR + AFFR behind one object (see rebalance.py for the call sequence); what it
  takes and gives back (image dtypes, box formats, label offsets, devices) is in contract.py.
- `enable_box_weights(model)`: makes a torchvision Faster R-CNN honour the `reg_weight` that
  `ACRST.rebalance_targets` adds (selective supervision); imported on first use.
- `CropBank`, `PseudoRecall`, `sampling_probs`: the pieces, for trainers that want them separately.
- `plan_paste` (C++, whole batch in one call), `merge_pastes` (given placements) and
  `paste_pixels` (Triton on CUDA): the fast crop-paste paths.
- `plan_paste_ref`, `merge_pastes_ref`, `paste_pixels_ref`, `merge_boxes`: the pure-PyTorch
  reference they are held equal to.
"""
from acrst_fast.augment.affr import PseudoRecall, class_histogram, sampling_probs
from acrst_fast.augment.contract import BOX_FORMATS, Contract
from acrst_fast.augment.cropbank import LABELED, PSEUDO, CropBank
from acrst_fast.augment.paste import (PasteConfig, PastePlan, draw_uniforms, merge_boxes, merge_pastes_ref,
                                     paste_pixels_ref, plan_paste_ref)
from acrst_fast.augment.pixels import paste_pixels
from acrst_fast.augment.planner import merge_pastes, plan_paste
from acrst_fast.augment.rebalance import ACRST, kl_divergence

__all__ = ["ACRST", "BOX_FORMATS", "Contract", "CropBank", "LABELED", "PSEUDO", "PasteConfig", "PastePlan",
           "PseudoRecall", "class_histogram", "draw_uniforms", "enable_box_weights", "kl_divergence", "merge_boxes",
           "merge_pastes", "merge_pastes_ref", "paste_pixels", "paste_pixels_ref", "plan_paste", "plan_paste_ref",
           "sampling_probs"]


def __getattr__(name: str):
    if name == "enable_box_weights":  # torchvision's detection heads: imported only by who asks for them
        from acrst_fast.models.weighted_heads import enable_box_weights

        return enable_box_weights
    raise AttributeError(f"module 'acrst_fast.augment' has no attribute {name!r}")
