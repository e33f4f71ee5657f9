"""Child processes that never outlive their parent.

A service that is SIGKILLed (or OOM-killed) cannot stop its children: the local fleet's
broker and services, a tokenizer's pool processes. Each child asks the kernel for SIGTERM
when its parent dies (Linux prctl PR_SET_PDEATHSIG; elsewhere a no-op), instead of running on
unowned with its parent's credentials in its environment.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int) -> None:
    """Call in the child (a Popen preexec_fn, a pool initializer) with the parent's pid:
    SIGTERM when the parent dies. A parent that died before this ran (a child still starting
    up) is noticed here, and the child exits at once. Where prctl is missing, children
    outlive a killed parent, as without this."""
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except OSError:
        return
    if os.getppid() != parent:  # orphaned already: the signal will never come
        os._exit(1)
