"""One error policy for every command line of memfit (fmdelta, neuzip, consolidate, transfer).

A user's mistake or environment (a missing, unreadable or wrong-kind path, a corrupt input, no permission, a full disk,
Ctrl-C, SIGTERM) ends in one line on stderr and a non-zero exit code: 1 for errors, 128 + signal for interruptions
(partial output removed by the writers, see safe_io). Anything else is our bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import pickle
import sys
from collections.abc import Callable

from memfit.compression.safe_io import Interrupted, terminate_cleanly

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, EOFError, pickle.UnpicklingError)


def describe(e: BaseException) -> str:
    """A one-line message for a user error (OSErrors as 'what: path', ENOSPC called a full disk)."""
    if isinstance(e, OSError):
        msg = e.strerror or str(e)
        if e.filename is not None:
            msg = f"{msg}: {e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            msg += " (disk full)"
    else:
        msg = str(e) or type(e).__name__
    return " ".join(msg.split())


def run_cli(fn: Callable[[], int | None], prog: str) -> int:
    """fn() under the policy above; its return value (None: 0) or 1 / 128 + signal as the exit code."""
    with terminate_cleanly(handlers_too=True):
        try:
            return fn() or 0
        except Interrupted as e:
            print(f"{prog}: {e}; partial output removed", file=sys.stderr)
            return 128 + e.signum
        except KeyboardInterrupt:
            print(f"{prog}: interrupted; partial output removed", file=sys.stderr)
            return 130
        except USER_ERRORS as e:
            print(f"error: {describe(e)}", file=sys.stderr)
            return 1
