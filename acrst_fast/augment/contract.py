"""What the drop-in module takes and gives back, checked at every entry point of `ACRST`.

- images: Tensor[3, H, W] (CHW; a batch Tensor[N, 3, H, W] is taken as its N images), uint8 0..255
  (detectron2, mmdet before normalisation) or float in [0, 1] (torchvision). uint8 images are pasted
  as floats and given back as uint8. HWC images, other channel counts and other dtypes are refused.
  The range of float images is read once per entry point by default (`range_check="first"`): that
  catches floats in 0..255 and mean/std-normalised images, which would otherwise paste white crops.
- boxes: Tensor[N, 4] in pixels, in `box_format` ("xyxy" x1 y1 x2 y2, "xywh" x1 y1 w h, "cxcywh";
  torchvision's names). A `tv_tensors.BoundingBoxes` carries its own format, which is honoured; boxes
  are given back in the format, and as the type, they came in.
- labels: Tensor[N] integer, 1..K (`label_offset=1`, torchvision: 0 is background) or 0..K-1
  (`label_offset=0`, detectron2 and mmdet). Given back with the same offset.
- devices: the images a call pastes into are on the ACRST's device; boxes, labels, scores and images
  only read (the banks' sources) may be there or on the CPU. A mismatch is named once per call.

Every refusal is one `ValueError` line that names the call, the argument and the element.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision import tv_tensors
from torchvision.ops import box_convert

BOX_FORMATS = ("xyxy", "xywh", "cxcywh")
RANGE_CHECKS = ("first", "always", "never")
_TV_FORMATS = {"XYXY": "xyxy", "XYWH": "xywh", "CXCYWH": "cxcywh"}
_TOL = 1e-4  # float images may exceed [0, 1] by this much (resampling round-off)


@dataclass(frozen=True)
class BoxesIn:
    """How one image's boxes came in: their format and, for a tv_tensors.BoundingBoxes, the original
    (to give the result back as one)."""
    fmt: str
    like: tv_tensors.BoundingBoxes | None = None


@dataclass(frozen=True)
class Contract:
    """The conventions one `ACRST` takes; see the module doc."""
    num_classes: int
    device: torch.device
    box_format: str = "xyxy"
    label_offset: int = 1
    range_check: str = "first"

    def __post_init__(self):
        if self.box_format not in BOX_FORMATS:
            raise ValueError(f"ACRST: box_format must be one of {BOX_FORMATS}, got {self.box_format!r}")
        if self.label_offset not in (0, 1):
            raise ValueError(f"ACRST: label_offset must be 0 (labels 0..K-1) or 1 (labels 1..K), "
                             f"got {self.label_offset!r}")
        if self.range_check not in RANGE_CHECKS:
            raise ValueError(f"ACRST: range_check must be one of {RANGE_CHECKS}, got {self.range_check!r}")

    # images ------------------------------------------------------------------------------------
    def images_in(self, call: str, name: str, images, paste_target: bool) -> tuple[list[torch.Tensor], bool]:
        """(float Tensor[3, H, W] images in [0, 1], were they uint8). Paste targets must be on the
        ACRST's device; the dtype is one per call."""
        if isinstance(images, torch.Tensor):
            if images.dim() != 4:
                raise ValueError(f"{call}: {name} is a Tensor of shape {tuple(images.shape)}; pass a list of "
                                 "Tensor[3, H, W] or a batch Tensor[N, 3, H, W]")
            images = list(images.unbind(0))
        if not isinstance(images, (list, tuple)):
            raise ValueError(f"{call}: {name} must be a list of Tensor[3, H, W], got {type(images).__name__}")
        dtypes = set()
        for i, im in enumerate(images):
            _check_image(call, f"{name}[{i}]", im)
            dtypes.add(im.dtype)
        if len(dtypes) > 1:
            raise ValueError(f"{call}: {name} mix dtypes {sorted(map(str, dtypes))}; pass one dtype per call")
        self.on_device(call, name, images, allow_cpu=not paste_target)
        was_uint8 = dtypes == {torch.uint8}
        if was_uint8:
            images = [im.float().div_(255) for im in images]
        return list(images), was_uint8

    def check_values(self, call: str, named_images: dict[str, list[torch.Tensor]],
                     named_labels: dict[str, list[torch.Tensor]] | None = None) -> None:
        """Refuse float images outside [0, 1] and labels (already shifted to 1..K) outside 1..K: one host
        read of their minima and maxima, for every argument together."""
        named_labels = {k: [t for t in v if t.numel()] for k, v in (named_labels or {}).items()}
        named_images = {k: [t for t in v if t.numel() and t.is_floating_point()] for k, v in named_images.items()}
        parts = [(name, t) for d in (named_images, named_labels) for name, ts in d.items() if ts
                 for t in [torch.cat([x.reshape(-1).float().to(self.device) for x in ts])]]
        if not parts:
            return
        read = torch.stack([v for _, t in parts for v in (t.min(), t.max())]).cpu().tolist()  # the one read
        for j, (name, _) in enumerate(parts):
            lo, hi = read[2 * j], read[2 * j + 1]
            if name in named_images:
                _check_image_range(call, name, lo, hi)
            elif lo < 1 or hi > self.num_classes:
                shown = [int(v) - 1 + self.label_offset for v in (lo, hi)]
                raise ValueError(f"{call}: {name} hold classes {shown[0]}..{shown[1]}, outside {self._classes()}")

    @staticmethod
    def images_out(images: list[torch.Tensor], was_uint8: bool) -> list[torch.Tensor]:
        if not was_uint8:
            return images
        return [im.mul(255).round_().clamp_(0, 255).to(torch.uint8) for im in images]

    # boxes and labels --------------------------------------------------------------------------
    def boxes_in(self, call: str, name: str, boxes, n_images: int) -> tuple[list[torch.Tensor], list[BoxesIn]]:
        """xyxy float Tensor[N, 4] per image, and how each came in."""
        _check_list(call, name, boxes, n_images)
        out, how = [], []
        for i, b in enumerate(boxes):
            where = f"{name}[{i}]"
            if not isinstance(b, torch.Tensor):
                raise ValueError(f"{call}: {where} must be a Tensor[N, 4], got {type(b).__name__}")
            fmt, like = self.box_format, None
            if isinstance(b, tv_tensors.BoundingBoxes):
                fmt = _TV_FORMATS.get(b.format.name)
                if fmt is None:
                    raise ValueError(f"{call}: {where} is BoundingBoxes in format {b.format.name}; ACRST takes "
                                     f"{sorted(_TV_FORMATS)}")
                like = b
                b = b.as_subclass(torch.Tensor)
            if b.numel() == 0:
                b = b.reshape(0, 4)
            if b.dim() != 2 or b.shape[1] != 4:
                raise ValueError(f"{call}: {where} has shape {tuple(b.shape)}; boxes are Tensor[N, 4] ({fmt})")
            if b.is_complex() or b.dtype == torch.bool:
                raise ValueError(f"{call}: {where} has dtype {b.dtype}; boxes are real numbers")
            b = b.float()
            out.append(b if fmt == "xyxy" else box_convert(b, fmt, "xyxy"))
            how.append(BoxesIn(fmt, like))
        self.on_device(call, name, out)
        return out, how

    @staticmethod
    def boxes_out(boxes: list[torch.Tensor], how: list[BoxesIn]) -> list[torch.Tensor]:
        out = []
        for b, h in zip(boxes, how):
            b = b if h.fmt == "xyxy" else box_convert(b, "xyxy", h.fmt)
            out.append(tv_tensors.wrap(b, like=h.like) if h.like is not None else b)
        return out

    def labels_in(self, call: str, name: str, labels, boxes: list[torch.Tensor]) -> list[torch.Tensor]:
        """int64 Tensor[N] per image in 1..K (shifted from `label_offset`), N matching the boxes. Their
        values are checked where they are read (`check_label_values`)."""
        _check_list(call, name, labels, len(boxes))
        out = []
        for i, (lab, b) in enumerate(zip(labels, boxes)):
            where = f"{name}[{i}]"
            if not isinstance(lab, torch.Tensor) or lab.is_floating_point() or lab.is_complex() \
                    or lab.dtype == torch.bool:
                kind = lab.dtype if isinstance(lab, torch.Tensor) else type(lab).__name__
                raise ValueError(f"{call}: {where} must be an integer Tensor[N] (class ids), got {kind}")
            if lab.dim() > 1 or lab.numel() != len(b):
                raise ValueError(f"{call}: {where} has shape {tuple(lab.shape)} for {len(b)} boxes; labels are "
                                 "Tensor[N], one per box")
            lab = lab.reshape(-1).long()
            out.append(lab + 1 if self.label_offset == 0 else lab)
        self.on_device(call, name, out)
        return out

    def labels_out(self, labels: list[torch.Tensor]) -> list[torch.Tensor]:
        return [lab - 1 for lab in labels] if self.label_offset == 0 else labels

    def check_label_values(self, call: str, name: str, host_labels: list) -> None:
        """Refuse labels (host arrays, already shifted to 1..K) outside 1..K, naming the image."""
        for i, lab in enumerate(host_labels):
            bad = (lab < 1) | (lab > self.num_classes)
            if bad.any():
                hint = " (0-based labels: label_offset=0)" if self.label_offset == 1 and (lab == 0).any() else ""
                raise ValueError(f"{call}: {name}[{i}] holds class {int(lab[bad][0]) - 1 + self.label_offset}, "
                                 f"outside {self._classes()}{hint}")

    def _classes(self) -> str:
        """The class ids this contract takes, as the caller numbers them."""
        return f"{self.label_offset}..{self.num_classes - 1 + self.label_offset} (label_offset={self.label_offset})"

    def predictions_in(self, call: str, name: str, preds, n_images: int) -> list[dict[str, torch.Tensor]]:
        """Teacher outputs (dicts with boxes, labels, scores) as xyxy boxes, 1..K labels, float scores."""
        _check_list(call, name, preds, n_images)
        for i, p in enumerate(preds):
            if not isinstance(p, dict):
                raise ValueError(f"{call}: {name}[{i}] must be a dict with boxes, labels, scores; got "
                                 f"{type(p).__name__}")
            for key in ("boxes", "labels", "scores"):
                if key not in p:
                    raise ValueError(f"{call}: {name}[{i}] has no {key!r} key (it has {sorted(p)})")
        boxes, _ = self.boxes_in(call, f"{name}[*]['boxes']", [p["boxes"] for p in preds], len(preds))
        labels = self.labels_in(call, f"{name}[*]['labels']", [p["labels"] for p in preds], boxes)
        scores = []
        for i, (p, b) in enumerate(zip(preds, boxes)):
            s = p["scores"]
            if not isinstance(s, torch.Tensor) or s.numel() != len(b):
                shape = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                raise ValueError(f"{call}: {name}[{i}]['scores'] is {shape} for {len(b)} boxes; scores are "
                                 "Tensor[N], one per box")
            scores.append(s.reshape(-1).float())
        self.on_device(call, f"{name}[*]['scores']", scores)
        return [{"boxes": b, "labels": lab, "scores": s} for b, lab, s in zip(boxes, labels, scores)]

    # devices -----------------------------------------------------------------------------------
    def on_device(self, call: str, name: str, tensors: list[torch.Tensor], allow_cpu: bool = True) -> None:
        """One error for the first tensor neither on the ACRST's device nor (when allowed) on the CPU."""
        for i, t in enumerate(tensors):
            d = t.device
            if d == self.device or (d.type == self.device.type and self.device.index is None) \
                    or (allow_cpu and d.type == "cpu"):
                continue
            where = "the ACRST's device" + (" or the CPU" if allow_cpu else "")
            raise ValueError(f"{call}: {name}[{i}] is on {d}, but must be on {where} ({self.device}); "
                             f"move it with .to({str(self.device)!r})")


def _check_image(call: str, where: str, im) -> None:
    if not isinstance(im, torch.Tensor):
        raise ValueError(f"{call}: {where} must be a Tensor[3, H, W], got {type(im).__name__}")
    if im.dim() == 3 and im.shape[0] != 3 and im.shape[-1] == 3:
        raise ValueError(f"{call}: {where} has shape {tuple(im.shape)}, channels last (HWC); ACRST takes CHW "
                         "Tensor[3, H, W]: pass image.permute(2, 0, 1)")
    if im.dim() != 3 or im.shape[0] != 3:
        raise ValueError(f"{call}: {where} has shape {tuple(im.shape)}; ACRST takes Tensor[3, H, W] (CHW, 3 channels)")
    if im.dtype != torch.uint8 and not im.is_floating_point():
        raise ValueError(f"{call}: {where} has dtype {im.dtype}; ACRST takes uint8 (0..255) or float in [0, 1]")


def _check_image_range(call: str, name: str, lo: float, hi: float) -> None:
    if lo >= -_TOL and hi <= 1 + _TOL:
        return
    if lo >= 0 and hi <= 255 + _TOL:
        hint = "they look like 0..255 floats: divide by 255, or pass uint8"
    else:
        hint = "they look mean/std-normalised: pass them before normalisation"
    raise ValueError(f"{call}: {name} hold values in [{lo:.3g}, {hi:.3g}], but float images must be in [0, 1]; "
                     f"{hint} (range_check='never' skips this check)")


def _check_list(call: str, name: str, values, n: int) -> None:
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{call}: {name} must be a list with one entry per image, got {type(values).__name__}")
    if len(values) != n:
        raise ValueError(f"{call}: {name} has {len(values)} entries for {n} images")
