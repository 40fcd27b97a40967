"""Child processes that end with their parent: a trainer's augmentation workers must not outlive it.

nnU-Net's augmenters fork worker processes. They are daemonic, so Python stops them when the trainer exits
normally or on Ctrl-C, but not when the trainer is ended by SIGTERM (Python's default handler exits without
cleaning up) or SIGKILL (nothing runs at all): the workers are left orphaned, holding memory. Two remedies, each
installed once per process:

- `exit_on_sigterm`: SIGTERM raises SystemExit, so the trainer unwinds as on Ctrl-C and its workers stop;
- `end_children_with_parent`: every child forked from now on asks Linux to send it SIGTERM when its parent dies
  (prctl PR_SET_PDEATHSIG), which covers SIGKILL. Elsewhere than Linux this is a no-op.
"""
import ctypes
import os
import signal
import sys
import threading

_PR_SET_PDEATHSIG = 1
_installed = {"fork_hook": False}


def _die_with_parent() -> None:
    if signal.getsignal(signal.SIGTERM) is _raise_exit:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a worker ends at once, it has nothing to unwind
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    # the parent may have died between fork and prctl
    if os.getppid() == 1:
        os._exit(0)


def end_children_with_parent() -> None:
    """From now on, processes forked by this one receive SIGTERM when it dies (Linux)."""
    if _installed["fork_hook"] or not sys.platform.startswith("linux"):
        return
    os.register_at_fork(after_in_child=_die_with_parent)
    _installed["fork_hook"] = True


def _raise_exit(signum, _frame):
    raise SystemExit(128 + signum)


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit(143) in the main thread, unless someone installed a handler of their own."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_exit)
