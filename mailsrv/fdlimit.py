"""
The open files limit (RLIMIT_NOFILE) the server runs with.

Every connection is a file descriptor, and many systems start a daemon with
a soft limit of 1024 however high the hard limit is. At start-up the server
raises its soft limit to the hard one (the relay process inherits it), and
warns when even that is below what the connection limit
(C{[policy] max_connections}) may need, as Dovecot warns "fd limit (ulimit -n)
is lower than required under max. load".
"""

from __future__ import annotations

import resource
from typing import Any

from twisted.logger import Logger

# A connection's socket, and the files of the mailbox its session may hold
# open (the mbox file, and the index's database, -wal and -shm files).
PER_CONNECTION = 5
# Descriptors besides: listeners, the log, locks, the relay process's and the
# verifiers' pipes, DNS sockets.
RESERVED = 128

log = Logger()


def needed(max_connections: int) -> int:
    """The descriptors C{max_connections} open connections need (0: no limit, nothing known)."""
    return max_connections * PER_CONNECTION + RESERVED if max_connections > 0 else 0


def raise_open_files_limit(max_connections: int, logger: Any = log) -> int:
    """
    Raise the soft RLIMIT_NOFILE to the hard limit; log a warning when the
    limit stays below what C{max_connections} need. Returns the soft limit
    in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        # Linux refuses an infinite RLIMIT_NOFILE: its ceiling is fs.nr_open.
        target = _nr_open(soft) if hard == resource.RLIM_INFINITY else hard
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError) as e:
                logger.warn(
                    "cannot raise the open files limit to {limit}: {error}", limit=target, error=e
                )
    want = needed(max_connections)
    if want and soft != resource.RLIM_INFINITY and soft < want:
        logger.warn(
            "open files limit (ulimit -n) is {limit}, lower than the {want} needed under"
            " [policy] max_connections = {max_connections}: raise it (systemd: LimitNOFILE=)",
            limit=soft,
            want=want,
            max_connections=max_connections,
        )
    return soft


def _nr_open(default: int) -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return default
