"""The names a config may choose among, on the package's bottom floor: the config checks them, the modules
that act on them import them from here, so the config imports nothing above itself."""
from __future__ import annotations

AMP_MODES = ("auto", "off", "bf16", "fp16")  # solver.amp (engine/amp.py)
FILTER_MODES = ("single", "two_stage", "mining")  # ssmll.filter (pseudo_labels.py)
BANK_SOURCES = ("labeled", "pseudo")  # acrst.banks, in the CropBank's sub-bank order (augment/cropbank.py)
PHOTOMETRIC_MODES = ("auto", "batch", "per_image")  # augment.batched_photometric
EVAL_BACKENDS = ("pycocotools", "faster_coco_eval")  # eval.backend (evaluation/coco_eval.py)
BACKBONES = ("resnet50", "resnet18", "mobilenet_v2")  # model.backbone, ssmll.backbone (models/ build them)
