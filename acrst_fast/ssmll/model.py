"""The SSMLL classifier: CNN feature tokens + label tokens -> transformer encoder -> K logits.

C-Tran (Lanchantin et al. 2021): the backbone's last feature map (stride 32) is projected to `dim`
channels and flattened into h*w tokens; K label tokens are appended, each its class's learned
embedding plus a state embedding (unknown, negative or positive: `STATE_*`); a pre-norm
transformer encoder mixes them; logit_k = <w_k, label token k> + b_k. With `states` left out every
label is unknown (inference). Label-mask training (`known_label_states`) reveals a random part of
an image's labels as states and trains on the rest, so the encoder learns label dependencies.

Inputs: Tensor[B, 3, S, S] normalised with the ImageNet mean/std (`preprocess` does it from
images in [0, 1] of any size). Output: Tensor[B, K] logits, class k = label k + 1 of the detector.
"""
from __future__ import annotations

from acrst_fast.errors import one_line

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import mobilenet_v2, resnet18, resnet50

from acrst_fast.host import upload
from acrst_fast.safe_io import atomic_write
from acrst_fast.config import SSMLLConfig
from acrst_fast.models.weights import WeightsError, backbone_file, load_matching, load_state_dict_file

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
STATE_UNKNOWN, STATE_NEGATIVE, STATE_POSITIVE = 0, 1, 2


def known_label_states(labels: torch.Tensor, max_known: float, generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """C-Tran's label-mask training: for each image floor(r * K) of its K labels, r ~ U[0, max_known], are
    revealed, chosen at random. labels: Tensor[B, K] in {0, 1}. Returns (states Tensor[B, K] int64: STATE_POSITIVE /
    STATE_NEGATIVE where revealed, STATE_UNKNOWN elsewhere; unknown Tensor[B, K] bool: the labels the
    loss is computed on)."""
    b, k = labels.shape
    n_known = (torch.rand((b, 1), generator=generator) * max_known * k).floor()  # floor(r * K) of them
    order = torch.rand((b, k), generator=generator).argsort(dim=1).argsort(dim=1)  # a random rank per label
    known = (order < n_known).to(labels.device)
    states = torch.where(labels >= 0.5, STATE_POSITIVE, STATE_NEGATIVE) * known
    return states.long(), ~known


def _trunk(backbone: str, weights: str) -> tuple[nn.Module, int]:
    weights = backbone_file(weights, backbone, "ssmll.backbone_weights")
    if backbone == "mobilenet_v2":
        net = mobilenet_v2(weights=None)
        if weights:
            load_matching(net, load_state_dict_file(weights), weights, ignore=("classifier.",))
        return net.features, 1280
    net = (resnet50 if backbone == "resnet50" else resnet18)(weights=None)
    if weights:
        load_matching(net, load_state_dict_file(weights), weights, ignore=("fc.",))
    trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
    return trunk, 2048 if backbone == "resnet50" else 512


class SSMLLNet(nn.Module):
    def __init__(self, backbone: str, num_classes: int, dim: int = 256, layers: int = 2, heads: int = 4,
                 backbone_weights: str = ""):
        super().__init__()
        self.num_classes = num_classes
        self.trunk, channels = _trunk(backbone, backbone_weights)
        self.proj = nn.Conv2d(channels, dim, kernel_size=1)
        self.label_embed = nn.Parameter(torch.randn(num_classes, dim) * 0.02)
        self.state_embed = nn.Embedding(3, dim)  # unknown / negative / positive (C-Tran)
        nn.init.normal_(self.state_embed.weight, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.1, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head_weight = nn.Parameter(torch.randn(num_classes, dim) * dim ** -0.5)
        self.head_bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, images: torch.Tensor, states: torch.Tensor | None = None) -> torch.Tensor:
        """images: Tensor[B, 3, S, S] normalised; states: Tensor[B, K] int64 (STATE_*; None: all unknown)
        -> logits Tensor[B, K]."""
        feats = self.proj(self.trunk(images))  # [B, D, h, w]
        tokens = feats.flatten(2).transpose(1, 2)  # [B, h*w, D]
        if states is None:
            states = torch.zeros((len(images), self.num_classes), dtype=torch.int64, device=images.device)
        labels = self.label_embed.unsqueeze(0) + self.state_embed(states)  # [B, K, D]
        out = self.norm(self.encoder(torch.cat([tokens, labels], dim=1))[:, -self.num_classes:])  # [B, K, D]
        return (out * self.head_weight).sum(-1) + self.head_bias


def preprocess(images: list[torch.Tensor] | torch.Tensor, size: int) -> torch.Tensor:
    """Images in [0, 1] (list of Tensor[3, H, W], any sizes, or a batch) -> Tensor[B, 3, size, size],
    resized (bilinear, antialiased; images already size x size are taken as they are) and normalised."""
    if isinstance(images, torch.Tensor) and tuple(images.shape[-2:]) == (size, size):
        batch = images.float()  # the training views: made at this size by the data stage
    else:
        batch = torch.stack([im.float() if tuple(im.shape[-2:]) == (size, size) else
                             F.interpolate(im[None].float(), size=(size, size), mode="bilinear",
                                           align_corners=False, antialias=True)[0] for im in images])
    mean = upload(torch.tensor(MEAN), batch.device)[:, None, None]
    std = upload(torch.tensor(STD), batch.device)[:, None, None]
    return (batch - mean) / std


def build_ssmll(cfg: SSMLLConfig, num_classes: int) -> SSMLLNet:
    return SSMLLNet(cfg.backbone, num_classes, cfg.dim, cfg.layers, cfg.heads, cfg.backbone_weights)


def save_classifier(path: Path, model: nn.Module, cfg: SSMLLConfig, class_names: tuple[str, ...]) -> None:
    """The file the detector's two-stage filter reads: weights plus what rebuilds the network."""
    state = {"kind": "ssmll_classifier", "state": model.state_dict(), "ssmll": dataclasses.asdict(cfg),
             "class_names": list(class_names)}
    atomic_write(path, lambda f: torch.save(state, f))  # what engine.checkpoint.atomic_save does


def load_classifier(path: str | Path, class_names: tuple[str, ...],
                    device: torch.device | str = "cpu") -> tuple[SSMLLNet, int]:
    """Load `save_classifier`'s file -> (network in eval mode on `device`, its input size).

    Raises WeightsError naming the file when it is not an SSMLL classifier or was trained on
    other classes than `class_names`.
    """
    if not str(path):
        raise WeightsError("ssmll.filter is two_stage but no ssmll.checkpoint is named: train one with "
                           "python -m acrst_fast.train_ssmll, or let python -m acrst_fast.train run that stage first")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a foreign or truncated file raises many kinds
        raise WeightsError(f"{path}: not an SSMLL classifier file (cannot read it: {one_line(str(exc))[:160]})") from None
    if not isinstance(blob, dict) or blob.get("kind") != "ssmll_classifier":
        raise WeightsError(f"{path}: not an SSMLL classifier file (train one with python -m acrst_fast.train_ssmll)")
    if tuple(blob["class_names"]) != tuple(class_names):
        raise WeightsError(f"{path}: classifier classes {blob['class_names']} differ from the dataset's {list(class_names)}")
    fields = {f.name for f in dataclasses.fields(SSMLLConfig)}
    cfg = SSMLLConfig(**{k: v for k, v in blob["ssmll"].items() if k in fields} | {"backbone_weights": ""})
    model = build_ssmll(cfg, len(class_names))
    try:
        model.load_state_dict(blob["state"])
    except RuntimeError as exc:
        raise WeightsError(f"{path}: the classifier does not fit this version's network ({one_line(str(exc))[:120]}); "
                           "train it again with python -m acrst_fast.train_ssmll") from None
    return model.to(device).eval(), cfg.input_size
