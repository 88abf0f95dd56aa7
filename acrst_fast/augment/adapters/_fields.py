"""Per-instance fields of a framework's structure to plain tensors and back (shared by the adapters).

A field is a tensor with one row per instance, or a box structure with a `.tensor` (detectron2's `Boxes`,
mmdet's `HorizontalBoxes`), re-wrapped as `type(value)(tensor)` on the way out. Anything else (polygon
masks, lists, NumPy arrays) cannot be re-aligned to pasted boxes and is refused with its name.
"""
from __future__ import annotations

import torch


def unwrap(call: str, where: str, fields: dict, n: int) -> tuple[dict[str, torch.Tensor], dict[str, type]]:
    """(tensors by field name, the box type of each field that had one)."""
    tensors, wrappers = {}, {}
    for key, value in fields.items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        elif isinstance(getattr(value, "tensor", None), torch.Tensor):
            tensors[key], wrappers[key] = value.tensor, type(value)
        else:
            raise ValueError(f"{call}: {where}.{key} is a {type(value).__name__}, which ACRST cannot re-align to "
                             "pasted boxes (tensors and box structures only): remove the field before the call")
        if len(tensors[key]) != n:
            raise ValueError(f"{call}: {where}.{key} has {len(tensors[key])} rows for {n} instances")
    return tensors, wrappers


def rewrap(key: str, value: torch.Tensor, wrappers: dict[str, type]):
    return wrappers[key](value) if key in wrappers else value


def named(call: str, where: str, fields: dict, names: tuple[str, ...]):
    """The first of `names` present in `fields`, or an error listing what is there."""
    for name in names:
        if name in fields:
            return name
    raise ValueError(f"{call}: {where} has no field {' or '.join(repr(n) for n in names)} "
                     f"(it has {sorted(fields)})")
