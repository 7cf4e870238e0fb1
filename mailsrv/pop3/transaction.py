"""
The TRANSACTION state of a POP3 session (RFC 1939 5): the commands on a
logged-in maildrop (STAT, LIST, UIDL, DELE, RSET, RETR, TOP, QUIT), and
sending messages: each reply one write, a large message streamed chunk by
chunk as the client reads it, and a sequential download finding its next
messages already read (off the reactor thread).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer, threads
from twisted.python.failure import Failure

from mailsrv.eager import send_now
from mailsrv.interfaces import MessageInfo
from mailsrv.pop3.maildrop import uidl
from mailsrv.pop3.replies import GONE, SYS_TEMP
from mailsrv.session import OutputFlow

WHOLE_MESSAGE = 256 * 1024  # messages up to this size are read and sent in one piece
CHUNK = 64 * 1024
READ_AHEAD = 48  # messages held ready ahead of a sequential RETR download
READ_AHEAD_MAX_SIZE = 64 * 1024  # larger ones are read when asked for (<= 3 MB ahead)
LISTING_PIECE = 2048  # LIST/UIDL lines per write (~50 KB)
OPEN_PER_RETR = 2  # messages chosen to read ahead after each RETR
READ_BATCH = 16  # messages read per trip to the pool


def dot_stuff(data: bytes, at_line_start: bool = True) -> bytes:
    """RFC 1939 3: double a leading '.' on each line of CRLF text."""
    if at_line_start and data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..")


def terminator(last: bytes) -> bytes:
    """The end of a multi-line reply after data ending in C{last}."""
    return b".\r\n" if last.endswith(b"\r\n") else b"\r\n.\r\n"


def top_of(data: bytes, lines: int) -> bytes:
    """The header block and the first C{lines} body lines of a CRLF message (RFC 1939 7 TOP)."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data
    pos = end + 4
    for _ in range(lines):
        nl = data.find(b"\r\n", pos)
        if nl < 0:
            return data
        pos = nl + 2
    return data[:pos]


class TransactionCommands:
    """
    The TRANSACTION state commands of L{mailsrv.pop3.server.POP3Server}, a
    mixin over Twisted's L{pop3.POP3}: the session supplies the maildrop, the
    replies and the turn-taking of pipelined commands.
    """

    log: Any
    ctx: Any
    transport: Any
    peer: str
    mbox: Any  # the Maildrop
    _closed: bool
    _cache: dict[int, bytes]
    _opened: list[tuple[int, int, int]]
    _batch: set[int]
    _ahead_until: int
    _batch_waiters: list[tuple[int, defer.Deferred]]
    send: Callable[..., None]
    ok: Callable[..., None]
    error: Callable[[bytes], None]
    bad: Callable[[bytes], None]
    resetTimeout: Callable[[], None]
    _long: Callable[[defer.Deferred], defer.Deferred]
    _message_number: Callable[[bytes], int | None]

    def pop3_STAT(self, rest: bytes) -> None:
        count = total = 0
        for _n, size in self.mbox.numbered("size"):
            count += 1
            total += size
        self.ok(b"%d %d" % (count, total))

    def _send_listing(self, first: bytes, lines: Any) -> None:
        """
        A multi-line reply of C{lines} (an iterator), written a piece at a time as
        the client reads (a 100,000-message UIDL is not built in memory at once);
        later pipelined commands wait for it.
        """
        d = self._write_listing(first, lines)
        if not d.called:
            self._long(d)

    @defer.inlineCallbacks
    def _write_listing(self, first: bytes, lines: Any) -> Any:
        producer = OutputFlow()
        self.transport.registerProducer(producer, True)
        try:
            piece = [first]
            for line in lines:
                piece.append(line)
                if len(piece) >= LISTING_PIECE:
                    self.send(*piece)
                    piece = []
                    if producer.paused:
                        yield producer.wait()
                    if producer.stopped or self._closed:
                        return
            piece.append(b".")
            self.send(*piece)
        finally:
            if not self._closed:
                self.transport.unregisterProducer()

    def pop3_LIST(self, rest: bytes) -> None:
        if rest.strip():
            i = self._message_number(rest)
            if i is not None:
                self.ok(b"%d %d" % (i + 1, self.mbox.infos[i].size))
            return
        count = len(self.mbox.infos) - len(self.mbox.deleted)
        self._send_listing(
            b"+OK %d messages:" % count, (b"%d %d" % nv for nv in self.mbox.numbered("size"))
        )

    def pop3_UIDL(self, rest: bytes) -> None:
        v = self.mbox.uid_validity
        if rest.strip():
            i = self._message_number(rest)
            if i is not None:
                self.ok(b"%d %s" % (i + 1, uidl(self.mbox.infos[i], v)))
            return
        self._send_listing(
            b"+OK", (b"%d %08X%08X" % (n, uid, v) for n, uid in self.mbox.numbered("uid"))
        )

    def pop3_DELE(self, rest: bytes) -> None:
        i = self._message_number(rest)
        if i is not None:
            self.mbox.deleteMessage(i)
            self.ok(b"Marked to be deleted.")

    def pop3_RSET(self, rest: bytes) -> None:
        self.mbox.undeleteMessages()
        self.ok()

    def pop3_RETR(self, rest: bytes) -> Any:
        i = self._message_number(rest)
        if i is None:
            return None
        info = self.mbox.infos[i]
        self.mbox.retrieved.add(i)
        if info.size > WHOLE_MESSAGE:
            return self._long(self._stream(info))
        first = b"+OK %d octets" % info.size
        data = self._cache.pop(i, None)
        if data is not None:  # read ahead: answer at once
            self._send_whole(data, first)
            self._read_ahead(i)
            return None
        d = self._read(i)
        d.addCallback(self._send_whole, first)
        d.addCallback(lambda _: self._read_ahead(i))
        return self._long(d)

    def pop3_TOP(self, rest: bytes) -> Any:
        number, _, count = rest.strip().partition(b" ")
        try:
            lines = int(count)
            if lines < 0:
                raise ValueError
        except ValueError:
            return self.bad(b"Invalid number of lines: " + count[:40])
        i = self._message_number(number)
        if i is None:
            return None
        d = self._read_now([i], lines).addCallback(lambda got: got.get(i))
        d.addCallback(self._send_whole, b"+OK")
        return self._long(d)

    def pop3_QUIT(self, rest: bytes) -> Any:
        if self.mbox is None:
            self.ok(b"Logging out.")
            self.transport.loseConnection()
            return None
        deleting = len(self.mbox.deleted)
        d = self.mbox.commit()

        def done(removed: list[int]) -> None:
            self.log.info(
                "pop3 logout {user} from {client}: {count} deleted",
                user=self.mbox.user,
                client=self.peer,
                count=len(removed),
            )
            self.ok(b"Logging out, messages deleted." if deleting else b"Logging out.")
            self.transport.loseConnection()

        def failed(f: Failure) -> None:
            # RFC 1939 6: -ERR when some deleted messages were not removed.
            self.log.failure("pop3 expunge for {user} failed", f, user=self.mbox.user)
            self.send(SYS_TEMP)
            self.transport.loseConnection()

        d.addCallbacks(done, failed)
        return self._long(d)

    # --- sending messages ---------------------------------------------------------

    def _in_thread(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        return threads.deferToThreadPool(self.ctx.reactor, self.ctx.threadpool, f, *args)

    def _read(self, index: int) -> defer.Deferred:
        """Fire with message C{index}'s CRLF bytes, or None if it is gone."""
        data = self._cache.pop(index, None)
        if data is not None:
            return defer.succeed(data)
        if any(i == index for i, _, _ in self._opened):
            self._submit()
        if index in self._batch:
            d: defer.Deferred = defer.Deferred()
            self._batch_waiters.append((index, d))
            return d
        return self._read_now([index], None).addCallback(lambda got: got.get(index))

    def _read_now(self, indexes: list[int], top: int | None) -> defer.Deferred:
        """Read messages in one trip to the pool; fire with index -> bytes (gone ones left out)."""
        infos = self.mbox.infos
        wanted = [(i, infos[i].uid, infos[i].size) for i in indexes]
        return self._in_thread(_read_files, self.mbox.folder, wanted, top)

    def _read_ahead(self, index: int) -> None:
        """
        After RETR C{index}, get the messages a sequential download asks for
        next: choose a couple per RETR and read them in batches, one trip to
        the pool per batch (the message bytes are never read on the reactor
        thread), so that most RETRs find their message in memory.
        """
        mbox = self.mbox
        if self._closed or mbox is None:
            return
        if self._ahead_until <= index:  # the first RETR, or the client jumped ahead
            self._ahead_until = index + 1
        if len(self._cache) > READ_AHEAD:  # the client skipped around: drop what it passed
            for i in [i for i in self._cache if i <= index]:
                del self._cache[i]
        limit = min(len(mbox.infos), index + 1 + READ_AHEAD)
        opened = 0
        while opened < OPEN_PER_RETR and self._ahead_until < limit:
            i = self._ahead_until
            info = mbox.infos[i]
            if info.size > READ_AHEAD_MAX_SIZE:
                break  # read when asked for
            self._ahead_until += 1
            if i in mbox.deleted or i in self._cache:
                continue
            self._opened.append((i, info.uid, info.size))
            opened += 1
        if self._opened and (
            len(self._opened) >= READ_BATCH
            or self._opened[0][0] <= index + READ_BATCH  # needed soon
        ):
            self._submit()

    def _submit(self) -> None:
        """Read the messages chosen to read ahead in one trip to the pool."""
        wanted, self._opened = self._opened, []
        indexes = {i for i, _, _ in wanted}
        self._batch |= indexes
        d = self._in_thread(_read_files, self.mbox.folder, wanted, None)
        d.addBoth(self._batch_done, indexes)

    def _batch_done(self, result: dict[int, bytes] | Failure, indexes: set[int]) -> None:
        self._batch -= indexes
        waiters = [(i, d) for i, d in self._batch_waiters if i in indexes]
        self._batch_waiters = [(i, d) for i, d in self._batch_waiters if i not in indexes]
        if isinstance(result, Failure):
            # Read each again on its own, so that its RETR reports the error.
            for i, d in waiters:
                self._read(i).chainDeferred(d)
            return
        if not self._closed:
            self._cache.update(result)
        for i, d in waiters:
            d.callback(self._cache.pop(i, None))

    def _send_whole(self, data: bytes | None, first: bytes) -> None:
        """The status line, the stuffed message and the terminator, in one write."""
        if data is None:
            return self.error(GONE)
        if not self._closed:
            send_now(self.transport, first + b"\r\n" + dot_stuff(data) + terminator(data))
        return None

    @defer.inlineCallbacks
    def _stream(self, info: MessageInfo) -> Any:
        """Send a large message chunk by chunk, reading each off the reactor thread."""
        try:
            fp = yield self._in_thread(self.mbox.folder.open_message, info.uid)
        except KeyError:
            self.error(GONE)
            return
        if self._closed:
            yield self._in_thread(fp.close)
            return
        producer = OutputFlow()
        self.transport.registerProducer(producer, True)
        try:
            head = b"+OK %d octets\r\n" % info.size
            tail = b"\r\n"
            left = info.size
            while left > 0:
                try:
                    chunk = yield self._in_thread(fp.read, min(CHUNK, left))
                except Exception:
                    if head:  # nothing sent yet: the client gets an -ERR
                        raise
                    # Half a message is out: only closing tells the client it is incomplete.
                    self.log.failure(
                        "pop3 {user}: reading message {uid} failed",
                        user=self.mbox.user,
                        uid=info.uid,
                    )
                    self.transport.loseConnection()
                    return
                if not chunk or producer.stopped or self._closed:
                    break
                left -= len(chunk)
                out = dot_stuff(tail + chunk, at_line_start=False)[len(tail) :]
                tail = (tail + chunk)[-2:]
                self.transport.write(head + out)
                head = b""
                self.resetTimeout()
                yield producer.wait()
            if left > 0 and not self._closed:
                # The message shrank under us: the client cannot trust what it got.
                self.log.error(
                    "pop3 {user}: message {uid} truncated on disk",
                    user=self.mbox.user,
                    uid=info.uid,
                )
                self.transport.loseConnection()
                return
            if not self._closed:
                self.transport.write(terminator(tail))
        finally:
            if not self._closed:
                self.transport.unregisterProducer()
            yield self._in_thread(fp.close)


def _read_files(
    folder: Any, wanted: list[tuple[int, int, int]], top: int | None
) -> dict[int, bytes]:
    """
    Open and read messages (in a pool thread: opening reads message bytes too):
    index -> bytes, messages gone left out; for TOP, only enough lines.
    """
    out = {}
    for index, uid, size in wanted:
        try:
            fp = folder.open_message(uid)
        except KeyError:
            continue
        try:
            out[index] = fp.read(size) if top is None else _read_top(fp, top)
        finally:
            fp.close()
    return out


def _read_top(fp: Any, top: int) -> bytes:
    data = b""
    while True:
        chunk = fp.read(CHUNK)
        data += chunk
        if not chunk:
            return top_of(data, top)
        cut = top_of(data, top)
        if len(cut) < len(data):
            return cut
