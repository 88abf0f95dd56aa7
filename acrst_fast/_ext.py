"""The one place that decides whether the compiled extension `acrst_fast._C` is available.

Callers check `HAS_EXT` and use `_C`; when the build is missing they fall back to the
pure-PyTorch reference, and `warn_fallback()` says so once per process.
"""
import warnings

try:
    from acrst_fast import _C  # noqa: F401

    HAS_EXT = True
    _IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # not built (e.g. a source checkout without `pip install -e .`)
    _C = None
    HAS_EXT = False
    _IMPORT_ERROR = exc

_warned = False


def warn_fallback() -> None:
    global _warned
    if not _warned:
        warnings.warn(
            f"acrst_fast._C is not built ({_IMPORT_ERROR}); using the pure-PyTorch reference. "
            "Run `pip install -e .` to build it.",
            RuntimeWarning,
            stacklevel=3,
        )
        _warned = True
