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


def target_of(call: str, where: str, fields: dict, box_key: str, label_key: str) -> tuple[dict, dict[str, type]]:
    """A structure's per-instance fields as an ACRST target ({"boxes", "labels", other fields}: tensors),
    and the box type of each field that had one (keyed by the target's names)."""
    if box_key not in fields or label_key not in fields:
        raise ValueError(f"{call}: {where} needs {box_key} and {label_key} (it has {sorted(fields)})")
    tensors, wrappers = unwrap(call, where, fields, len(fields[label_key]))
    rename = {box_key: "boxes", label_key: "labels"}
    return ({rename.get(k, k): v for k, v in tensors.items()}, {rename.get(k, k): v for k, v in wrappers.items()})


def prediction_of(call: str, where: str, fields: dict, box_names: tuple[str, ...],
                  label_names: tuple[str, ...]) -> dict:
    """A teacher output's fields as an ACRST prediction ({"boxes", "labels", "scores"}), each found under
    the first of its names that is present."""
    boxes = fields[named(call, where, fields, box_names)]
    return {"boxes": boxes.tensor if hasattr(boxes, "tensor") else boxes,
            "labels": fields[named(call, where, fields, label_names)],
            "scores": fields[named(call, where, fields, ("scores",))]}
