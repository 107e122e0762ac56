"""Keep the keys out of core dumps: a crash of the daemon or of its PKI worker (SIGABRT, SIGSEGV) writes no core,
and no other process of the same user may ptrace or read the process's memory (`PR_SET_DUMPABLE` 0, as ssh-agent
does). The unit sets `LimitCORE=0` too. Side effect: profiling the daemon (py-spy) needs root."""
from __future__ import annotations

import ctypes
import ctypes.util
import resource

from twisted.logger import Logger

log = Logger()
PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


def no_core_dumps() -> bool:
    """RLIMIT_CORE 0 and PR_SET_DUMPABLE 0 for this process (and what it starts); False when prctl is missing."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        return bool(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        log.warn("prctl is not available here: core dumps are off (RLIMIT_CORE 0), but the process stays dumpable")
        return False


def dumpable() -> int:
    """PR_GET_DUMPABLE of this process (1: dumpable; 0: not), -1 when it cannot be read."""
    try:
        return int(ctypes.CDLL(ctypes.util.find_library("c")).prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
    except (OSError, AttributeError):
        return -1
