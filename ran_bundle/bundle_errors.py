"""Imported by the bundle configs (``"imports": ["$import ran_bundle.bundle_errors", ...]``): the last line of a
failed ``python -m monai.bundle run`` names the problem.

MONAI wraps an error raised while building a component in ``RuntimeError: Failed to instantiate component ...``,
so the traceback of, say, a label map with non-integer values ends with that wrapper and the real message sits
60 lines up. Importing this module installs a ``sys.excepthook`` that prints the traceback as usual and then one
more line, ``ran-bundle: error: <the innermost cause>``. Importing it twice installs it once; nothing else changes.
"""

from __future__ import annotations

import sys
from types import TracebackType

__all__ = ["root_cause", "one_line"]


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception of ``error``'s chain (``__cause__``, else ``__context__``)."""
    seen = {id(error)}
    while True:
        nxt = error.__cause__ or error.__context__
        if nxt is None or id(nxt) in seen:
            return error
        seen.add(id(nxt))
        error = nxt


def one_line(error: BaseException) -> str:
    """``ran-bundle: error: <type>: <first line of the message>`` of the root cause of ``error``."""
    cause = root_cause(error)
    text = str(cause).strip().splitlines()
    return f"ran-bundle: error: {type(cause).__name__}: {text[0] if text else ''}".rstrip(": ")


def _hook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    _previous(kind, error, tb)
    if not isinstance(error, KeyboardInterrupt):
        print(one_line(error), file=sys.stderr)


if getattr(sys.excepthook, "__module__", None) != __name__:
    _previous = sys.excepthook
    sys.excepthook = _hook
