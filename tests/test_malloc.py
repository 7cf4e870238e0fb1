"""
mailsrv.malloc: after tune_malloc, threads that allocate share one glibc
arena (counted with glibc's own malloc_info), and MALLOC_ARENA_MAX in the
environment still wins. Each case runs in a fresh interpreter: arenas, once
made, stay for the life of a process.
"""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc's malloc arenas only",
)

PROGRAM = textwrap.dedent(
    """
    import ctypes, sys, tempfile, threading
    if sys.argv[1] == "tune":
        from mailsrv.malloc import tune_malloc
        tune_malloc()
    together = threading.Barrier(5)
    kept = []

    def allocate():
        kept.append([bytearray(2000) for _ in range(100)])  # below the mmap threshold
        together.wait()

    threads = [threading.Thread(target=allocate) for _ in range(4)]
    for t in threads:
        t.start()
    together.wait()  # every thread is alive and has allocated
    libc = ctypes.CDLL(None)
    libc.fopen.restype = ctypes.c_void_p
    with tempfile.NamedTemporaryFile(mode="r") as out:
        f = libc.fopen(out.name.encode(), b"w")
        libc.malloc_info(0, ctypes.c_void_p(f))
        libc.fclose(ctypes.c_void_p(f))
        print(out.read().count("<heap nr="))
    for t in threads:
        t.join()
    """
)


def arenas(mode: str, **env: str) -> int:
    """The number of malloc arenas once four threads have allocated."""
    environ = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM, mode],
        env={**environ, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return int(out.stdout)


def test_threads_get_arenas_of_their_own_by_default():
    assert hasattr(ctypes.CDLL(None), "malloc_info")
    assert arenas("plain") > 1


def test_one_arena_for_every_thread_once_tuned():
    assert arenas("tune") == 1


def test_the_environment_still_wins():
    assert arenas("tune", MALLOC_ARENA_MAX="3") == 3
