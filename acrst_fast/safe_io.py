"""Writing files without losing anything: atomic writes, and folders the engine may write into.

Rule: the engine never deletes or overwrites what it did not create. A folder it writes into is
new, empty, or holds only entries it writes itself (`claim_dir`); a file is written to a unique
temporary name beside its target, flushed to disk and renamed over it (`atomic_write`), and a
failed write (disk full, permissions) removes the temporary file, leaves the target as it was
and says so with the path and the free space.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import BinaryIO, Callable

from acrst_fast.errors import UserError, one_line


class OutputError(UserError):
    """An output path cannot be written, or holds something the engine did not create."""


def free_space(path: str | Path) -> str:
    """Free space on the filesystem holding `path` (or its nearest existing parent), e.g. '1.2 GiB'."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        free = shutil.disk_usage(p).free
    except OSError:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024
    return "unknown"  # unreachable


def _reason(exc: BaseException) -> str:
    for e in (exc, exc.__cause__, exc.__context__):
        if isinstance(e, OSError) and e.errno:
            return os.strerror(e.errno)
    return one_line(str(exc))[:200] or type(exc).__name__


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write `path` through `write(file)`: temporary file, fsync, rename. On failure, no temporary
    file is left, the old `path` (if any) is intact, and an `OutputError` names the path and the
    free space."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(exc, (OSError, RuntimeError)):
            raise OutputError(f"{path}: cannot write ({_reason(exc)}); {free_space(path.parent)} free on its "
                              "filesystem; the previous file, if any, is unchanged") from None
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def claim_dir(path: str | Path, owned: Callable[[str], bool], what: str) -> Path:
    """Make `path` a folder the engine may write into, or raise `OutputError`.

    It may be new (created here), empty, or hold only entries whose names `owned(name)` accepts
    (what the engine writes there). A file at `path`, or any other entry in it, is an error.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: {what} names a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create {what} ({_reason(exc)})") from None
    foreign = sorted(n for n in os.listdir(path) if not owned(n))
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise OutputError(f"{path}: {what} holds entries this engine did not write ({', '.join(foreign[:3])}{more}); "
                          "choose a new or empty folder")
    return path


def new_output_file(path: str | Path, what: str) -> Path:
    """A tool's output file: its folder is created; an existing file is never overwritten."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: {what} names a folder, not a file")
    if path.exists():
        raise OutputError(f"{path}: {what} already exists; remove it or choose another path (it is never overwritten)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{path.parent}: cannot create the folder for {what} ({_reason(exc)})") from None
    return path
