"""One host read for many tensors: the parts that need values on the host (slot assignment, paste
planning) gather everything they need in a single device-to-host copy. The package's bottom floor: the
augmentation module, the models, the engine, the loader and SSMLL import it; it imports nothing of the package.

    boxes, labels, mu = to_host(boxes_dev, labels_dev, mu_dev)   # NumPy arrays, original shapes

Each tensor comes back as a float64 NumPy array of its shape (int64 values up to 2**53 are exact),
through one `torch.cat` and one `.numpy()`: one synchronisation on CUDA, however many tensors.
"""
from __future__ import annotations

import numpy as np
import torch


def mark_host(t: torch.Tensor) -> torch.Tensor:
    """Mark a CPU tensor as host data by design (a random draw, a data-loader target): reading it
    never waits for a device, and `to_host` and `acrst_fast.syncs.SyncCounter` treat it so."""
    t._acrst_host = True
    return t


def is_host(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and getattr(t, "_acrst_host", False)


def upload(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t` on `device` without a host wait: a host tensor bound for a GPU goes through page-locked memory
    (PyTorch's caching host allocator) with a non-blocking copy. A plain `.to("cuda")` of pageable memory
    waits for the stream to drain first, which the GPU's sync debug mode reports (bench/syncs.py)."""
    device = torch.device(device)
    if t.device.type != "cpu" or device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def to_host(*tensors: torch.Tensor) -> list[np.ndarray]:
    """float64 NumPy copies of `tensors` (any devices), read with one device-to-host copy for all
    the tensors that are not host data by design (`mark_host`), and none for those."""
    device_side = [t for t in tensors if not is_host(t)]
    host = np.zeros(0)
    if device_side:
        device = next((t.device for t in device_side if t.device.type != "cpu"), torch.device("cpu"))
        flat = torch.cat([t.detach().reshape(-1).to(device, torch.float64) for t in device_side])
        host = (flat if flat.device.type == "cpu" else flat.cpu()).numpy()  # the one read
    out, at = [], 0
    for t in tensors:
        if is_host(t):
            out.append(t.numpy().astype(np.float64))
            continue
        n = t.numel()
        out.append(host[at:at + n].reshape(tuple(t.shape)))
        at += n
    return out
