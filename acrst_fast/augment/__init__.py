"""Drop-in ACRST augmentation for SSOD trainers (no dependency on the acrst_fast trainer).

- `ACRST`: CropBank + FBR + AFFR behind one object (see rebalance.py for the call sequence).
- `CropBank`, `PseudoRecall`, `sampling_probs`: the pieces, for trainers that want them separately.
- `plan_paste_ref`, `paste_pixels_ref`, `merge_boxes`: the pure-PyTorch crop-paste reference.
"""
from acrst_fast.augment.affr import PseudoRecall, class_histogram, sampling_probs
from acrst_fast.augment.cropbank import LABELED, PSEUDO, CropBank
from acrst_fast.augment.paste import PasteConfig, PastePlan, merge_boxes, paste_pixels_ref, plan_paste_ref
from acrst_fast.augment.rebalance import ACRST, kl_divergence

__all__ = ["ACRST", "CropBank", "LABELED", "PSEUDO", "PasteConfig", "PastePlan", "PseudoRecall", "class_histogram", "kl_divergence",
           "merge_boxes", "paste_pixels_ref", "plan_paste_ref", "sampling_probs"]
