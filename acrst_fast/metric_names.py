"""The names of the logged metrics: one contract between the runners that produce them, the logging
hook that writes them to metrics.jsonl, and the report and benches that read them back.

Per-class names end in the class name: `class_key(PR, "person")` is "acrst/pr/person"; `class_prefix(PR)`
is "acrst/pr/" (what the report selects by).
"""
from __future__ import annotations

# losses of a step: "sup/<term>" and "unsup/<term>"
SUP, UNSUP = "sup", "unsup"
TOTAL = "total"
IMAGES_PER_S = "images_per_s"
PSEUDO_PER_IMAGE = "pseudo_per_image"
TIME = "time"  # "time/<part>": seconds of one part of the step

# pseudo-label quality against the hidden ground truth of the unlabeled split (sums over a step)
PSEUDO_TP, PSEUDO_NUM, PSEUDO_NUM_GT = "pseudo/tp", "pseudo/num_pseudo", "pseudo/num_hidden_gt"
STAGE1_TP, STAGE1_NUM = "pseudo/stage1/tp", "pseudo/stage1/num_pseudo"
PSEUDO_COUNT = "pseudo/count"  # per class: pseudo-labels of the step
SSMLL_NEGATIVES = ("true_negative", "neg_predicted", "absent")  # "ssmll/<name>": the classifier's stage-2 negatives

# ACRST state (per class unless said): Pseudo Recall; mu of Eq. 9 (raw) and the distribution the planner
# samples from (classes without a crop in the banks dropped, renormalised); bank fill; pseudo-label histogram
PR, MU, MU_SAMPLED = "acrst/pr", "acrst/mu", "acrst/mu_sampled"
BANK_LABELED, BANK_PSEUDO, PL_HIST = "acrst/bank_labeled", "acrst/bank_pseudo", "acrst/pl_hist"
KL_GT_PL = "acrst/kl_gt_pl"
# instances pasted from each bank, per class, since the run (or branch) started: did AFFR reach the rare classes?
PASTED_LABELED, PASTED_PSEUDO = "acrst/pasted_labeled", "acrst/pasted_pseudo"
PASTED_PER_IMAGE = "acrst/pasted_per_image"  # "acrst/pasted_per_image_<labeled|unlabeled>"


def key(group: str, name: str) -> str:
    """`group/name`, e.g. key(SUP, "loss_classifier") -> "sup/loss_classifier"."""
    return f"{group}/{name}"


def class_key(group: str, class_name: str) -> str:
    return f"{group}/{class_name}"


def class_prefix(group: str) -> str:
    return f"{group}/"


def ssmll_key(name: str) -> str:
    return f"ssmll/{name}"


def pasted_key(split: str) -> str:
    return f"{PASTED_PER_IMAGE}_{split}"
