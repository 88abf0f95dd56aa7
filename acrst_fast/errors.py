"""The user-facing error type and the command-line convention every tool follows.

`UserError` is bad input or a refused action (config, data, weights, output folders). Its
message names the file, the record and the problem in one line. Command-line tools run their
body through `cli_main`: a `UserError` prints `error: MESSAGE` on stderr and exits 2.
"""
from __future__ import annotations

import sys
from typing import Callable


class UserError(ValueError):
    """Bad input or a refused action; the message is one line naming the file, record and problem."""


def one_line(text: str) -> str:
    """`text` with its line breaks folded, so an error stays one line."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def report_error(exc: BaseException) -> int:
    """Print `error: ...` (one line) on stderr; return the exit code 2."""
    print(f"error: {one_line(str(exc))}", file=sys.stderr, flush=True)
    return 2


def cli_main(body: Callable[[], int | None]) -> int:
    """Run a tool's body: 0 (or its return value) on success, 2 with one line on a `UserError`."""
    try:
        code = body()
    except UserError as exc:
        return report_error(exc)
    return 0 if code is None else int(code)
