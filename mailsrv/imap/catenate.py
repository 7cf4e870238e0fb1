"""
CATENATE (RFC 4469): one message built from TEXT literals and from sections
of messages in the user's own mailboxes, named by relative IMAP URLs (RFC
5092) resolved against the selected mailbox, as Dovecot takes them. The
result is spooled (on disk once large), each piece copied in the thread
pool in chunks: a URL may name a message of any size, and none is read
whole into memory.

A URL that cannot be used is C{NO [BADURL url] reason} (RFC 4469 5), with
Dovecot's reasons; a message that grows past the APPEND limit is
C{NO [TOOBIG]} (RFC 4469 5, RFC 7889).
"""

from __future__ import annotations

import bisect
from typing import Any

from twisted.internet import defer

from mailsrv.imap import fetch, imapurl, mime
from mailsrv.imap.fetch import FetchSyntaxError, Section, parse_fetch
from mailsrv.imap.parsing import mailbox_name
from mailsrv.interfaces import FolderError
from mailsrv.spool import SpooledSource
from mailsrv.store.infos import uids_of

_CHUNK = 256 * 1024


class BadURL(Exception):
    """A CATENATE URL that names nothing this user can read."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(reason)
        self.url = url
        self.reason = reason

    def response(self) -> bytes:
        """
        RFC 4469 5: ``[BADURL url-resp-text]``, the URL as sent (any "]" would
        end it), and the reason, as Dovecot words it.
        """
        url = self.url.encode("utf-8", "replace").replace(b"]", b"%5D")
        url = bytes(c for c in url if c >= 0x20 and c != 0x7F)
        return b"[BADURL " + url + b"] " + self.reason.encode("utf-8", "replace") + b"."


class TooBig(Exception):
    """The message would be larger than the APPEND limit."""


class LFWriter:
    """Writes CRLF text (as the store serves it) into a spool with LF line ends."""

    def __init__(self, out: SpooledSource) -> None:
        self.out = out
        self._cr = False

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self._cr:
            data = b"\r" + data
            self._cr = False
        if data.endswith(b"\r"):
            data, self._cr = data[:-1], True
        self.out.write(data.replace(b"\r\n", b"\n"))

    def close(self) -> None:
        if self._cr:
            self.out.write(b"\r")
            self._cr = False


def _copy_source(source: SpooledSource, out: SpooledSource) -> None:
    """A spooled TEXT literal (LF already) onto the end of C{out}. Pool thread."""
    with source.open() as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                return
            out.write(chunk)


def _locate(folder: Any, uid: int, size: int, sec: Section, partial: Any) -> Any:
    """
    The octets a URL names, as FETCH would send them (CRLF): (data, None),
    (None, (start, end)) of the message, or None if there is no such
    section. Pool thread.
    """
    root = None
    if sec.path:
        with folder.open_message(uid) as f:
            root = mime.scan(f)
    data, rng = fetch.section_bytes(folder, uid, size, sec, root, None)
    if data is None and rng is None:
        return None
    if partial is not None:  # RFC 5092 5: PARTIAL=offset[.length] of the section
        off, length = partial
        if data is not None:
            data = data[off:] if length is None else data[off : off + length]
        elif rng is not None:
            start = min(rng[0] + off, rng[1])
            rng = (start, rng[1] if length is None else min(start + length, rng[1]))
    return data, rng


def _copy_range(folder: Any, uid: int, start: int, end: int, out: LFWriter) -> int:
    """Octets C{start} to C{end} of a message onto the end of C{out}. Pool thread."""
    left = end - start
    with folder.open_message(uid) as f:
        fetch.skip(f, start)
        while left > 0:
            chunk = f.read(min(left, _CHUNK))
            if not chunk:
                break
            out.write(chunk)
            left -= len(chunk)
    if left > 0:
        raise KeyError(uid)  # the message changed under us
    return end - start


@defer.inlineCallbacks
def build(session: Any, parts: list[Any], limit: int) -> Any:
    """
    The message C{parts} (TextPart and UrlPart of L{mailsrv.imap.commands.append})
    make, spooled: a L{SpooledSource} (finished). Fails with L{BadURL} or L{TooBig};
    C{limit} counts octets as the client would FETCH them (CRLF).
    """
    out = SpooledSource(session.factory.spool_dir)
    writer = LFWriter(out)
    total = 0
    try:
        for part in parts:
            url = getattr(part, "url", None)
            if url is None:
                total += part.wire
                if total > limit:
                    raise TooBig()
                writer.close()  # a CR a URL's octets ended with goes first
                yield session._run(_copy_source, part.source, out)
                continue
            total += yield _copy_url(session, url, writer, limit - total)
        writer.close()
        out.finish()
    except BaseException:
        out.discard()
        raise
    return out


@defer.inlineCallbacks
def _copy_url(session: Any, text: str, writer: LFWriter, room: int) -> Any:
    """Copy what URL C{text} names onto C{writer}; the octets it counts (CRLF)."""
    try:
        url = imapurl.parse(text)
    except imapurl.InvalidURL as e:
        raise BadURL(text, f"Invalid IMAP URL: {e}") from None
    if url.absolute or url.host is not None:
        # As Dovecot: only this server's, so no server named (RFC 4469 5 allows the choice).
        raise BadURL(text, "Invalid IMAP URL: Relative URL required")
    if url.access is not None:
        raise BadURL(text, "Invalid IMAP URL: URLAUTH is not taken here")
    mbox = session.mbox
    if mbox is not None:
        url = url.resolved(mbox.folder.name, mbox.uid_validity())
    if url.mailbox is None:
        raise BadURL(text, "Mailbox-relative IMAP URL, but no mailbox selected")
    if url.uid is None or url.search is not None:
        raise BadURL(text, "Invalid messagepart IMAP URL")
    try:
        sec = parse_fetch(b"BODY.PEEK[" + (url.section or "").encode("utf-8") + b"]").sections[0]
    except (FetchSyntaxError, IndexError):
        raise BadURL(text, "Invalid section") from None
    try:
        name = mailbox_name(url.mailbox_wire or b"")
    except FolderError:
        raise BadURL(text, f"Mailbox doesn't exist: {url.mailbox}") from None
    selected = mbox is not None and mbox.folder.name == name
    if selected:
        folder = mbox.folder
    else:
        try:
            folder = yield session.factory.store.open_folder(session._user, name, True)
        except FolderError:
            raise BadURL(text, f"Mailbox doesn't exist: {url.mailbox}") from None
    try:
        if url.uidvalidity is not None and url.uidvalidity != folder.uid_validity:
            raise BadURL(text, "Invalid UIDVALIDITY")
        infos = folder.messages()
        uids = uids_of(infos)
        i = bisect.bisect_left(uids, url.uid)
        if i >= len(uids) or uids[i] != url.uid:
            raise BadURL(text, "Message not found")
        info = infos[i]
        try:
            found = yield session._run(_locate, folder, info.uid, info.size, sec, url.partial)
        except KeyError:
            raise BadURL(text, "Message not found") from None
        if found is None:
            raise BadURL(text, "Section not found")
        data, rng = found
        size = len(data) if data is not None else rng[1] - rng[0]
        if size > room:
            raise TooBig()
        if data is not None:
            yield session._run(writer.write, data)
            return size
        try:
            yield session._run(_copy_range, folder, info.uid, rng[0], rng[1], writer)
        except KeyError:
            raise BadURL(text, "Message not found") from None
        return size
    finally:
        if not selected:
            folder.close()
