"""Count host-device synchronisations by source line, on any device.

On CUDA, `torch.cuda.set_sync_debug_mode("warn")` reports every synchronising call. On the CPU
nothing synchronises, so `SyncCounter` counts the calls that *would* synchronise on CUDA:

    .item(), .tolist(), .cpu(), .numpy(), bool()/int()/float() of a tensor      (method patches)
    nonzero, unique, masked_select, indexing with a boolean mask, repeat_interleave with
    tensor repeats, index_put_ with a boolean mask, torchvision's nms           (dispatch mode)

Each call is charged to the innermost frame outside torch's own Python: a line of the project
(`acrst_fast/`, `kernels/`) or of a library (torchvision, ...). Conservative on the CPU: a call on
a tensor that would live on the host in a CUDA run counts too, unless the tensor is marked as
host data by design (`acrst_fast.host.mark_host`: random draws, data-loader targets,
collective packets of CPU values); other host bookkeeping is kept in NumPy, which is not counted. Code
that only a CPU run takes, where the CUDA run takes a path without reads (`off_cuda_path()`: the
reference NMS of `kernels/nms.py`), is not counted either. While counting, `torch.inference_mode` runs as
`torch.no_grad` (a dispatch mode sees no op under inference mode, so the teacher's forward went uncounted).

    with SyncCounter() as syncs:
        runner.run_step(step)
    syncs.project_total(), syncs.by_site()
"""
from __future__ import annotations

import os
import sys
import warnings
from collections import Counter
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_PROJECT = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
            os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels") + os.sep)
_TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_WARNINGS = os.path.abspath(warnings.__file__)  # Python 3.12 routes a C++ warning through warnings._showwarnmsg
_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
_aten = torch.ops.aten
_DATA_DEPENDENT = {_aten.nonzero.default, _aten.masked_select.default, _aten._unique2.default,
                   _aten.unique_dim.default, _aten.unique_consecutive.default, _aten.repeat_interleave.Tensor}
_INDEX = {_aten.index.Tensor, _aten.index_put_.default, _aten.index_put.default}
try:  # torchvision's NMS: its output size is read back (on CUDA its kernel copies the mask to the host)
    import torchvision  # noqa: F401 - registers torch.ops.torchvision

    _DATA_DEPENDENT.add(torch.ops.torchvision.nms.default)
except (ImportError, AttributeError, RuntimeError):
    pass


def _site() -> tuple[str, bool]:
    """(file:line function, is project code) of the innermost caller outside torch and this module."""
    frame = sys._getframe(2)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not path.startswith(_TORCH) and path not in (os.path.abspath(__file__), _WARNINGS):
            project = path.startswith(_PROJECT)
            short = "/".join(path.split(os.sep)[-2:])
            return f"{short}:{frame.f_lineno} {frame.f_code.co_name}", project
        frame = frame.f_back
    return "<torch>", False


_OFF_CUDA = [0]  # > 0 inside `off_cuda_path()`


@contextmanager
def off_cuda_path():
    """Code that runs only where the device is the host (the CPU path of a kernel whose CUDA path reads
    nothing, e.g. `kernels.nms.nms_segments`): its reads are not counted, since no CUDA run makes them."""
    _OFF_CUDA[0] += 1
    try:
        yield
    finally:
        _OFF_CUDA[0] -= 1


class SyncCounter(TorchDispatchMode):
    """Counts would-be synchronisations while active (see the module doc)."""

    def __init__(self):
        super().__init__()
        self.sites: Counter = Counter()
        self.project: Counter = Counter()
        self._saved: dict = {}
        self._busy = False

    def _charge(self) -> None:
        if self._busy or _OFF_CUDA[0]:  # a call inside another counted call (e.g. tolist inside numpy); off CUDA
            return
        site, project = _site()
        self.sites[site] += 1
        if project:
            self.project[site] += 1

    def __enter__(self):
        counter = self
        # a dispatch mode sees no op under torch.inference_mode (the teacher's forward): count it as no_grad
        self._inference_mode = torch.inference_mode
        torch.inference_mode = lambda mode=True: torch.no_grad() if mode else torch.enable_grad()
        for name in _METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def patched(self_, *args, __original=original, **kwargs):
                if not getattr(self_, "_acrst_host", False):  # host data by design (acrst_fast.host.mark_host)
                    counter._charge()
                counter._busy = True
                try:
                    return __original(self_, *args, **kwargs)
                finally:
                    counter._busy = False

            setattr(torch.Tensor, name, patched)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.inference_mode = self._inference_mode
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._busy:
            if func in _DATA_DEPENDENT and not (func is _aten.repeat_interleave.Tensor and
                                                (kwargs or {}).get("output_size") is not None):
                self._charge()
            elif func in _INDEX and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                        for i in (args[1] or []) if i is not None):
                self._charge()
        busy, self._busy = self._busy, True
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self._busy = busy

    def project_total(self) -> int:
        return sum(self.project.values())

    def total(self) -> int:
        return sum(self.sites.values())

    def table(self, top: int = 40) -> str:
        lines = [f"{n:6d}  {'project ' if s in self.project else 'library '} {s}" for s, n in self.sites.most_common(top)]
        return "\n".join(lines)
