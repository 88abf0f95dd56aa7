"""The paste op table's columns: one row per paste, Tensor[P, 7] int64.

    (image, slot, x0, y0, h, w, flip): the image index in the batch, the CropBank slot, the top-left
    corner of the resized crop in the image (may be negative: clipped), its size, and 1 to mirror it.

The planner (`acrst_fast.augment`) writes the table and the kernel (`crop_paste.py`) reads it; the
columns live here, below both, so the kernels import nothing from `augment`.
"""
OP_IMAGE, OP_SLOT, OP_X0, OP_Y0, OP_H, OP_W, OP_FLIP = range(7)
