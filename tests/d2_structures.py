"""Stand-ins for detectron2's `Boxes` and `Instances` (detectron2/structures), with their behaviour:
fields set as attributes, one length for all fields (asserted on `set`), indexing applied to every field,
`len()` of an empty Instances raising, `Boxes` holding a float Tensor[N, 4] xyxy (reshaped from empty)."""
from __future__ import annotations

import torch


class Boxes:
    def __init__(self, tensor: torch.Tensor):
        tensor = torch.as_tensor(tensor, dtype=torch.float32)
        if tensor.numel() == 0:
            tensor = tensor.reshape((-1, 4)).to(dtype=torch.float32)
        assert tensor.dim() == 2 and tensor.size(-1) == 4, tensor.size()
        self.tensor = tensor

    def __len__(self) -> int:
        return self.tensor.shape[0]

    def __getitem__(self, item) -> "Boxes":
        if isinstance(item, int):
            return Boxes(self.tensor[item].view(1, -1))
        return Boxes(self.tensor[item])

    def clone(self) -> "Boxes":
        return Boxes(self.tensor.clone())

    def to(self, device) -> "Boxes":
        return Boxes(self.tensor.to(device=device))

    @property
    def device(self) -> torch.device:
        return self.tensor.device


class Instances:
    def __init__(self, image_size: tuple[int, int], **kwargs):
        self._image_size = image_size
        self._fields: dict = {}
        for k, v in kwargs.items():
            self.set(k, v)

    @property
    def image_size(self) -> tuple[int, int]:
        return self._image_size

    def __setattr__(self, name, val) -> None:
        if name.startswith("_"):
            super().__setattr__(name, val)
        else:
            self.set(name, val)

    def __getattr__(self, name):
        if name == "_fields" or name not in self._fields:
            raise AttributeError(f"Cannot find field '{name}' in the given Instances!")
        return self._fields[name]

    def set(self, name: str, value) -> None:
        if len(self._fields):
            assert len(self) == len(value), f"Adding a field of length {len(value)} to a Instances of length {len(self)}"
        self._fields[name] = value

    def has(self, name: str) -> bool:
        return name in self._fields

    def get(self, name: str):
        return self._fields[name]

    def get_fields(self) -> dict:
        return self._fields

    def __getitem__(self, item) -> "Instances":
        ret = Instances(self._image_size)
        for k, v in self._fields.items():
            ret.set(k, v[item])
        return ret

    def __len__(self) -> int:
        for v in self._fields.values():
            return len(v)
        raise NotImplementedError("Empty Instances does not support __len__!")


class PolygonMasks:
    """A non-tensor per-instance field (detectron2's polygon masks are lists of arrays)."""

    def __init__(self, polygons: list):
        self.polygons = polygons

    def __len__(self) -> int:
        return len(self.polygons)
