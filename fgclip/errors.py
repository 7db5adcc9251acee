"""The error the CLI reports as one clear line (exit 1) instead of a traceback.

Subclass it for every failure a user can act on: bad input, a stale checkpoint,
a wrong temperature, a failed health gate.
"""

import re


class FGClipError(Exception):
    """A failure caused by input, configuration or state the user controls."""


def user_error_line(command: str, exc: BaseException) -> str:
    """The one line ``fgclip <command>`` prints for such an error (then it exits 1)."""
    return f"fgclip {command}: error: {exc}"


# user_error_line's output at the start of a line: how an orchestrator reading a stage's
# output tells "the user must fix this" (a retry gives the same error) from a crash.
USER_ERROR_LINE = re.compile(r"^fgclip [\w-]+: error: ", re.MULTILINE)
