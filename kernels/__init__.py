"""Triton kernels of acrst_fast, installed as `acrst_fast.kernels`.

Each kernel lives in its own module with a host wrapper that checks shapes, dtypes and strides
before launch, and a pure-PyTorch reference beside it. Nothing here touches the GPU at import
time, so tests collect on machines without one (Triton kernels run there under
TRITON_INTERPRET=1).
"""
