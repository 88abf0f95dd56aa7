"""Triton kernels of acrst_fast, installed as `acrst_fast.kernels`.

Each kernel's module holds, in this order, what its inputs mean (the op table's columns), its
pure-PyTorch reference (`crop_paste.paste_pixels_ref`, re-exported by `acrst_fast.augment`), the
Triton kernel with every argument commented, and a host wrapper that checks shapes, dtypes and
strides before launch. Kernels import nothing from `augment`. Nothing here touches the GPU at import
time, so tests collect on machines without one (Triton kernels run there under
TRITON_INTERPRET=1).
"""
