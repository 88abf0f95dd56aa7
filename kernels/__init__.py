"""Triton kernels of acrst_fast, installed as `acrst_fast.kernels`.

Each kernel lives in its own module with a host wrapper that checks shapes, dtypes and strides
before launch; its pure-PyTorch reference is in `acrst_fast.augment` (`paste_pixels_ref`), and the
op table's columns both share are in `op_table.py`. Kernels import nothing from `augment`. Nothing here touches the GPU at import
time, so tests collect on machines without one (Triton kernels run there under
TRITON_INTERPRET=1).
"""
