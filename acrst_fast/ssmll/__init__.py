"""SSMLL: the semi-supervised multi-label classifier whose image-level labels drive two-stage
pseudo-label filtering (paper: "Semi-supervised Multi-label Learning").

- `SSMLLNet` (model.py): CNN feature tokens + learned label embeddings through a small
  transformer encoder, one logit per class (C-Tran style).
- `focal_bce` (losses.py) with its float64 reference.
- `image_labels`, `negative_metrics` (metrics.py): multi-hot targets from boxes; Table 9's
  image-level negative accuracy and recall.
- training: `python -m acrst_fast.train_ssmll CONFIG`.
"""
from acrst_fast.ssmll.losses import focal_bce, focal_bce_ref
from acrst_fast.ssmll.metrics import image_labels, negative_metrics
from acrst_fast.ssmll.model import SSMLLNet, build_ssmll, load_classifier, preprocess

__all__ = ["SSMLLNet", "build_ssmll", "focal_bce", "focal_bce_ref", "image_labels", "load_classifier",
           "negative_metrics", "preprocess"]
