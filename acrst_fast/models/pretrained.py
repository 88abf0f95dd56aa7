"""ImageNet backbone weights the way torchvision users expect them.

`model.backbone_weights` (and `ssmll.backbone_weights`):
- `imagenet`: torchvision's ImageNet-1k classifier weights of the backbone (resnet50, resnet18:
  IMAGENET1K_V1; mobilenet_v2: IMAGENET1K_V1). The file is taken from the torch hub cache
  (`torch.hub.get_dir()/checkpoints`, i.e. $TORCH_HOME/hub/checkpoints) when it is there, else
  downloaded into it (hash checked). Offline, the error names the file and where to put it.
- `random`, or empty: random initialisation (a paper config says `random` explicitly).
- anything else: the path of a local state dict (torchvision layout).
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import torch

from acrst_fast.errors import one_line

RANDOM, IMAGENET = "random", "imagenet"


class PretrainedError(Exception):
    """Raised as the detector's WeightsError (models.detector wraps it)."""


def imagenet_url(backbone: str) -> str:
    from torchvision.models import MobileNet_V2_Weights, ResNet18_Weights, ResNet50_Weights

    weights = {"resnet50": ResNet50_Weights.IMAGENET1K_V1, "resnet18": ResNet18_Weights.IMAGENET1K_V1,
               "mobilenet_v2": MobileNet_V2_Weights.IMAGENET1K_V1}
    if backbone not in weights:
        raise PretrainedError(f"no ImageNet weights known for backbone '{backbone}'")
    return weights[backbone].url


def hub_path(backbone: str) -> Path:
    """Where torchvision keeps (and looks for) the backbone's ImageNet file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(imagenet_url(backbone)).path).name


def resolve(spec: str, backbone: str, key: str = "model.backbone_weights", download: bool = True) -> str:
    """`spec` -> the local file to load ("" for random init). `imagenet` is fetched into the hub cache
    when it is not there yet (`download`), or is a PretrainedError saying where to put the file."""
    if spec in ("", RANDOM):
        return ""
    if spec != IMAGENET:
        return spec
    path = hub_path(backbone)
    if path.is_file():
        return str(path)
    url = imagenet_url(backbone)
    if download:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), hash_prefix=path.stem.rsplit("-", 1)[-1], progress=False)
            return str(path)
        except Exception as exc:  # noqa: BLE001 - no network, a proxy, a read-only cache: all end the same way
            reason = one_line(str(exc))[:160]
    else:
        reason = "not downloaded here"
    raise PretrainedError(f"{key}=imagenet: {path.name} is not in the torch hub cache and could not be downloaded "
                          f"from {url} ({reason}); put the file at {path} (or set TORCH_HOME), or name a local "
                          f"file in {key}")
