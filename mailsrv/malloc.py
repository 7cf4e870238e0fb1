"""
glibc's malloc tuned for a long-running process with a thread pool: one
arena for every thread. A module of its own so that the relay process can
tune its malloc without importing the server's protocols.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_ARENA_MAX = -8  # glibc mallopt parameter


def tune_malloc() -> None:
    """
    glibc: one malloc arena for all threads (call before any thread starts).
    By default each thread that mallocs gets its own arena, and memory freed
    there stays in the RSS: the 19 MiB an argon2id check takes (one per login,
    in whichever pool thread runs it) is kept once per thread that ever ran one
    (a 100k INBOX server grew to 110 MB, not 91, after a few logins). Python
    holds the GIL for nearly all its allocations, so one arena costs no speed.
    MALLOC_ARENA_MAX in the environment still wins.
    """
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_ARENA_MAX, 1)
