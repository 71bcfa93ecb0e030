"""Ctrl-C that is never lost.

Python turns SIGINT into a ``KeyboardInterrupt`` raised wherever the main thread happens to be. When
that is a finalizer or a weakref callback (matplotlib's transform tree drops its children that way,
and the garbage collector runs them at any allocation), Python prints "Exception ignored in ..." and
carries on: a training run would shrug the interrupt off and finish 50 epochs with exit 0.

``install`` replaces the handler with one that also records the interrupt, and keeps the swallowed
one's "Exception ignored" traceback off stderr (the contract is one line). Long loops call ``check``
(the training and prediction callbacks do, once a batch) to raise it again, and the CLI exits 130
when one was recorded, whoever swallowed it.
"""

from __future__ import annotations

import signal
import sys

_pending = False
_previous_hook = sys.unraisablehook


def _on_sigint(signum, frame) -> None:
    global _pending
    _pending = True
    raise KeyboardInterrupt


def _on_unraisable(info) -> None:
    global _pending
    if isinstance(info.exc_value, KeyboardInterrupt):
        _pending = True  # check() raises it again where it can propagate
        return
    _previous_hook(info)


def install() -> None:
    """Record every Ctrl-C (SIGINT is left alone where it is ignored, a background job, or handled by someone
    else) and every KeyboardInterrupt a finalizer swallowed."""
    global _previous_hook
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
    if sys.unraisablehook is not _on_unraisable:
        _previous_hook, sys.unraisablehook = sys.unraisablehook, _on_unraisable


def pending() -> bool:
    """Whether a Ctrl-C arrived since ``install``."""
    return _pending


def check() -> None:
    """Raise ``KeyboardInterrupt`` again if one arrived and was swallowed on the way."""
    if _pending:
        raise KeyboardInterrupt
