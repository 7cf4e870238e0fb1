"""
A verifier process: the end-of-DATA verification (DKIM, ARC, DMARC:
L{mailsrv.authres.verify}) for the server that started it
(L{mailsrv.authres.workers.VerifierPool}), one job at a time.

    python -m mailsrv.authres.worker_main [HOST PORT]...

The arguments are the C{[dns] nameservers}, a host and a port each; the
process builds its L{Resolver} (with its cache) and L{Dmarc} evaluator
once. Jobs come on standard input and results go out on standard output,
each a frame: a 4-byte big-endian length, then a pickle. A job is
C{(job_id, octets, spf, max_verify, timeout)}; its answer is
C{(job_id, True, results)} or C{(job_id, False, error)}. Both ends are
our own code (the server and the child it spawned, over a pipe no one else
holds), so the pickles are trusted; nothing else is ever unpickled.

The process ends at the end of its input: when the server closes the pipe
to stop it, or dies (the kernel closes the pipe), so no process outlives
its server and none has to watch for it.
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import sys
from typing import BinaryIO

from mailsrv.authres import rsaverify
from mailsrv.authres.dmarc import Dmarc
from mailsrv.authres.resolver import Resolver
from mailsrv.authres.verify import verify_message

FRAME = struct.Struct(">I")  # the length of the pickle that follows


def read_frame(stream: BinaryIO) -> bytes | None:
    """The next frame's payload from C{stream}; None at its end."""
    head = stream.read(FRAME.size)
    if len(head) < FRAME.size:
        return None
    (size,) = FRAME.unpack(head)
    payload = stream.read(size)
    return payload if len(payload) == size else None


def frame(payload: bytes) -> bytes:
    """C{payload} as a frame."""
    return FRAME.pack(len(payload)) + payload


def parse_nameservers(args: list[str]) -> tuple[tuple[str, int], ...]:
    """C{[HOST, PORT, ...]} as the resolver's nameservers."""
    if len(args) % 2:
        raise SystemExit("usage: worker_main [HOST PORT]...")
    return tuple((args[i], int(args[i + 1])) for i in range(0, len(args), 2))


def serve(jobs: BinaryIO, answers: BinaryIO, resolver: Resolver, dmarc: Dmarc) -> None:
    """Verify the jobs from C{jobs} until its end, each answer written to C{answers}."""
    while (payload := read_frame(jobs)) is not None:
        job_id, data, spf, max_verify, timeout = pickle.loads(payload)
        try:
            answer = (job_id, True, verify_message(data, spf, resolver, dmarc, max_verify, timeout))
            out = pickle.dumps(answer, pickle.HIGHEST_PROTOCOL)
        except Exception as e:
            try:
                out = pickle.dumps((job_id, False, e), pickle.HIGHEST_PROTOCOL)
            except Exception:
                out = pickle.dumps((job_id, False, RuntimeError(repr(e))), pickle.HIGHEST_PROTOCOL)
        answers.write(frame(out))
        answers.flush()


def main(argv: list[str]) -> None:
    # The server's own signal handlers stop it; a ^C on its terminal must not
    # end its verifiers under it (the process group gets the SIGINT too).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Standard output carries the frames only: whatever else prints goes to stderr.
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    rsaverify.install()  # RSA by OpenSSL: this process verifies and does nothing else
    resolver = Resolver(parse_nameservers(argv))
    try:
        serve(sys.stdin.buffer, answers, resolver, Dmarc())
    except BrokenPipeError:
        pass  # the server is gone
    os._exit(0)  # no interpreter teardown: nothing is left to flush


if __name__ == "__main__":
    main(sys.argv[1:])
