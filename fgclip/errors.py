"""The error the CLI reports as one clear line (exit 1) instead of a traceback.

Subclass it for every failure a user can act on: bad input, a stale checkpoint,
a wrong temperature, a failed health gate.
"""


class FGClipError(Exception):
    """A failure caused by input, configuration or state the user controls."""
