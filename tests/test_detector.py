"""Detector construction and real loading of weight files written by the test."""
import hashlib
import logging

import pytest
import torch
import torchvision

from acrst_fast.config import ModelConfig
from acrst_fast.models.detector import build_detector
from acrst_fast.models.weights import WeightsError

SMALL = dict(fpn_channels=16, representation_size=32)


def test_backbone_imagenet_weights_loaded(tmp_path):
    torch.manual_seed(1)
    net = torchvision.models.resnet18()
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(net.state_dict(), path)
    det = build_detector(ModelConfig(backbone="resnet18", backbone_weights=str(path), **SMALL), num_classes=3)
    body = det.backbone.body
    torch.testing.assert_close(body.conv1.weight, net.conv1.weight)
    torch.testing.assert_close(body.layer4[1].conv2.weight, net.layer4[1].conv2.weight)
    torch.testing.assert_close(body.layer2[0].bn1.running_var, net.layer2[0].bn1.running_var)
    assert isinstance(body.bn1, torchvision.ops.FrozenBatchNorm2d)  # pretrained -> frozen BN
    assert not body.layer1[0].conv1.weight.requires_grad and body.layer4[0].conv1.weight.requires_grad


def test_imagenet_weights_come_from_the_torch_hub_cache(tmp_path, monkeypatch):
    """`backbone_weights: imagenet` loads torchvision's file from the hub cache (no download when it is
    there); offline without it, one error names the file and where to put it; `random` is random init."""
    from acrst_fast.models import pretrained

    assert pretrained.imagenet_url("mobilenet_v2").endswith("/mobilenet_v2-b0353104.pth")  # the offline file
    assert pretrained.imagenet_url("resnet50").endswith("/resnet50-0676ba61.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, dst, hash_prefix=None, progress=True):
        raise OSError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(WeightsError, match=rf"model.backbone_weights=imagenet: .*Network is unreachable.*put the file "
                                           rf"at {expected}"):
        build_detector(ModelConfig(backbone="resnet18", backbone_weights="imagenet", **SMALL), num_classes=3)
    torch.manual_seed(2)
    net = torchvision.models.resnet18()
    tmp_file = tmp_path / "r18.pth"
    torch.save(net.state_dict(), tmp_file)
    name = f"resnet18-{hashlib.sha256(tmp_file.read_bytes()).hexdigest()[:8]}.pth"
    monkeypatch.setattr(pretrained, "imagenet_url", lambda backbone: f"https://download.pytorch.org/models/{name}")
    cached = tmp_path / "torch" / "hub" / "checkpoints" / name
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp_file.rename(cached)
    det = build_detector(ModelConfig(backbone="resnet18", backbone_weights="imagenet", **SMALL), num_classes=3)
    torch.testing.assert_close(det.backbone.body.layer3[0].conv1.weight, net.layer3[0].conv1.weight)
    assert isinstance(det.backbone.body.bn1, torchvision.ops.FrozenBatchNorm2d)
    rand = build_detector(ModelConfig(backbone="resnet18", backbone_weights="random", **SMALL), num_classes=3)
    assert isinstance(rand.backbone.body.bn1, torch.nn.BatchNorm2d)


def test_mobilenet_weights_and_hash_check(tmp_path):
    net = torchvision.models.mobilenet_v2()
    data_path = tmp_path / "tmp.pth"
    torch.save(net.state_dict(), data_path)
    digest = hashlib.sha256(data_path.read_bytes()).hexdigest()
    good = tmp_path / f"mobilenet_v2-{digest[:8]}.pth"
    data_path.rename(good)
    det = build_detector(ModelConfig(backbone="mobilenet_v2", backbone_weights=str(good), **SMALL), num_classes=2)
    torch.testing.assert_close(det.backbone.body["18"][0].weight, net.features[18][0].weight)
    bad = tmp_path / "mobilenet_v2-deadbeef.pth"
    bad.write_bytes(good.read_bytes())
    with pytest.raises(WeightsError, match=r"mobilenet_v2-deadbeef\.pth: sha256 .* does not start with deadbeef"):
        build_detector(ModelConfig(backbone="mobilenet_v2", backbone_weights=str(bad), **SMALL), num_classes=2)


def test_detector_checkpoint_round_trip_and_class_mismatch(tmp_path, caplog):
    cfg = ModelConfig(backbone="mobilenet_v2", **SMALL)
    torch.manual_seed(0)
    src = build_detector(cfg, num_classes=4)
    path = tmp_path / "ckpt.pt"
    torch.save({"step": 10, "teacher": src.state_dict(), "student": {}}, path)
    torch.manual_seed(1)
    dst = build_detector(ModelConfig(backbone="mobilenet_v2", weights=str(path), **SMALL), num_classes=4)
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k
    with caplog.at_level(logging.WARNING):  # other class count: the predictor is skipped, with a warning
        other = build_detector(ModelConfig(backbone="mobilenet_v2", weights=str(path), **SMALL), num_classes=7)
    assert "shape mismatch" in caplog.text
    assert torch.equal(other.backbone.body["0"][0].weight, src.backbone.body["0"][0].weight)


def test_bad_weight_files(tmp_path):
    with pytest.raises(WeightsError, match="weights file not found"):
        build_detector(ModelConfig(backbone="resnet18", backbone_weights=str(tmp_path / "x.pth"), **SMALL), 2)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pth: cannot read weights"):
        build_detector(ModelConfig(backbone="resnet18", weights=str(junk), **SMALL), 2)
    unrelated = tmp_path / "unrelated.pth"
    torch.save({"foo.weight": torch.zeros(3)}, unrelated)
    with pytest.raises(WeightsError, match="no tensor matches the model"):
        build_detector(ModelConfig(backbone="resnet18", weights=str(unrelated), **SMALL), 2)


def test_geometry_left_to_data_stage():
    det = build_detector(ModelConfig(backbone="mobilenet_v2", **SMALL), num_classes=2).eval()
    with torch.no_grad():
        out = det([torch.rand(3, 70, 90)])
    images, _ = det.transform([torch.rand(3, 70, 90)])
    assert images.image_sizes == [(70, 90)]  # not resized
    assert out[0]["boxes"].shape[1] == 4


def test_transform_constants_and_postprocess_equal_torchvision():
    """Normalising with cached device constants and skipping the ratio-1 box rescale give torchvision's numbers."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    det = build_detector(ModelConfig(backbone="mobilenet_v2", **SMALL), num_classes=2).eval()
    ref = GeneralizedRCNNTransform(1, 1, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        image = torch.rand(3, 37, 51, generator=g, dtype=dtype)
        assert torch.equal(det.transform.normalize(image), ref.normalize(image))
    boxes = torch.rand(7, 4, generator=g) * 60
    out = det.transform.postprocess([{"boxes": boxes.clone()}], [(70, 90)], [(70, 90)])
    assert torch.equal(out[0]["boxes"], ref.postprocess([{"boxes": boxes.clone()}], [(70, 90)], [(70, 90)])[0]["boxes"])
    scaled = det.transform.postprocess([{"boxes": boxes.clone()}], [(70, 90)], [(140, 90)])  # another size: rescaled
    assert torch.equal(scaled[0]["boxes"][:, 1], boxes[:, 1] * 2)
    with pytest.raises(TypeError, match="floating type"):
        det.transform.normalize(torch.zeros(3, 4, 4, dtype=torch.uint8))


def test_degenerate_target_boxes_refused_as_torchvision_does():
    det = build_detector(ModelConfig(backbone="mobilenet_v2", **SMALL), num_classes=2).train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    good = {"boxes": torch.tensor([[1.0, 1, 30, 30]]), "labels": torch.tensor([1])}
    bad = {"boxes": torch.tensor([[1.0, 1, 30, 30], [5.0, 5, 5, 20]]), "labels": torch.tensor([1, 2])}
    with pytest.raises(AssertionError, match=r"positive height and width. Found invalid box \[5.0, 5.0, 5.0, 20.0\] "
                                             r"for target at index 1"):
        det(images, [good, bad])
    losses = det(images, [good, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}])
    assert all(torch.isfinite(v) for v in losses.values())
