"""Pixel pasting: the Triton kernel on CUDA tensors, the PyTorch reference everywhere else.

    images = paste_pixels(images, ops, bank_pixels)

images: a list of Tensor[C, H, W] (sizes may differ) or a batch Tensor[N, C, H, W]; uint8
(0..255) or float (0..1). ops: Tensor[P, 7] int64, the table `plan_paste` emits. Use the
returned images: a batch is pasted in place; a list on CUDA is copied into one zero-padded batch
(so the kernel runs once for the whole batch) and returned as views of it, each image's own size.
"""
from __future__ import annotations

import torch

from acrst_fast.augment.paste import paste_pixels_ref


def triton_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def stack_padded(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of Tensor[C, H_i, W_i] -> (zero-padded Tensor[N, C, max H, max W], image_hw Tensor[N, 2] int64)."""
    sizes = [tuple(im.shape[1:]) for im in images]  # host ints: no read of the device
    hw = torch.tensor(sizes, dtype=torch.int64).reshape(-1, 2)
    h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
    batch = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    for i, im in enumerate(images):
        batch[i, :, :im.shape[1], :im.shape[2]] = im
    return batch, hw


def paste_pixels(images: list[torch.Tensor] | torch.Tensor, ops: torch.Tensor, bank_pixels: torch.Tensor,
                 image_hw: torch.Tensor | None = None, bank_hw=None) -> list[torch.Tensor] | torch.Tensor:
    """Paste the op table into `images` with the fastest path for their device; see the module doc.
    bank_hw: the stored (h, w) of each slot's crop (the CropBank's `stored_hw_host()`; None: whole cells)."""
    if len(images) == 0 or len(ops) == 0:
        return images
    device = images.device if isinstance(images, torch.Tensor) else images[0].device
    if not triton_available(device):
        return paste_pixels_ref(images, ops, bank_pixels, image_hw, bank_hw)
    from acrst_fast.kernels.crop_paste import paste_pixels_triton

    if isinstance(images, torch.Tensor):
        hw = image_hw if image_hw is not None else torch.tensor([images.shape[2:]] * len(images))
        return paste_pixels_triton(images, ops, bank_pixels, hw, bank_hw=bank_hw, check=False)
    batch, hw = stack_padded(images)
    paste_pixels_triton(batch, ops, bank_pixels, hw, bank_hw=bank_hw, check=False)  # the planner's table: no checks
    return [batch[i, :, :im.shape[1], :im.shape[2]] for i, im in enumerate(images)]
