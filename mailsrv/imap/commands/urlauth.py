"""
URLAUTH (RFC 4467): RESETKEY, GENURLAUTH and URLFETCH, in the
authenticated and selected states, with URL-PARTIAL (RFC 5550: ;PARTIAL=
in the URLs URLFETCH reads).

GENURLAUTH makes URLs of the user's own messages only (the URL's user is
the login, exactly as spelled, as Dovecot requires); URLFETCH reads a
message part of any user's folder, opened read-only, once the URL's token
verifies under that user's key and the access identifier admits this
session (L{mailsrv.imap.urlauth.permits}); a URL without URLAUTH is read
when it is the session user's own (RFC 4467 3.3 leaves the access to a
plain URL to the server's rules: those of FETCH). A URL that cannot be
read for any reason is C{NIL}, never an error, and nothing says why (RFC
4467 3.3; no answer tells which mailboxes exist). The octets are streamed
from the file as the client reads them. The host and port of a URL are
not checked (Dovecot's C{imap_urlauth_host = *}): the token binds them,
and the server answers to whatever name its clients use.

Not done: the untagged C{OK [URLMECH INTERNAL]} of RFC 4467 3.1 to the
user's other sessions that have the folder selected (Dovecot sends none
either), and URLAUTH=BINARY (RFC 5524).
"""

from __future__ import annotations

import bisect
from typing import Any

from twisted.internet import defer
from twisted.mail import imap4

from mailsrv.imap.commands.base import command
from mailsrv.imap.imapstring import astring
from mailsrv.imap.imapurl import ImapUrl, InvalidURL, parse
from mailsrv.imap.parsing import CommandParser, mailbox_name
from mailsrv.imap.urlauth import (
    MECHANISM,
    KeyTable,
    expired,
    full_url,
    keys_path,
    permits,
    same_user,
    verifies,
)
from mailsrv.imap.urlfetch import BadSection, Octets, locate, section
from mailsrv.interfaces import FolderError
from mailsrv.session import OutputFlow
from mailsrv.store.infos import uids_of
from mailsrv.store.names import canonical_folder

CAPABILITIES = [b"URLAUTH", b"URL-PARTIAL"]  # RFC 4467 1, RFC 5550 5


class _Refused(Exception):
    """GENURLAUTH cannot make this URL: a tagged NO with the text."""


class UrlauthCommands(CommandParser):
    """RESETKEY, GENURLAUTH and URLFETCH (RFC 4467 3)."""

    # --- arguments ----------------------------------------------------------

    def arg_astrings(self, line: bytes | None) -> Any:
        """
        The rest of the line as astrings (URLs, mechanisms), each taken as
        sent: URLs are ASCII, never mailbox names, so UTF8=ACCEPT's renaming
        does not apply. Literals are waited for as any astring's.
        """
        return self._more_astrings(line, [])

    def _more_astrings(self, line: bytes | None, out: list[bytes]) -> Any:
        while (line or b"").strip(b" "):
            parsed = self._astring(line)
            if isinstance(parsed, defer.Deferred):

                def got(result: tuple[bytes, bytes]) -> Any:
                    out.append(result[0])
                    return self._more_astrings(result[1], out)

                return parsed.addCallback(got)
            out.append(parsed[0])
            line = parsed[1]
        return out, b""

    def opt_mailbox(self, line: bytes | None) -> Any:
        """RESETKEY's optional mailbox: None when the line ends."""
        if not (line or b"").strip(b" "):
            return None, b""
        return self.arg_astring(line)

    def _urlauth_keys(self, user: str) -> KeyTable:
        return KeyTable(keys_path(self.factory.config.server.data_dir, user))

    def _urlauth_now(self) -> float:
        return float(self.factory.reactor.seconds())

    # --- RESETKEY -------------------------------------------------------------

    @command
    def do_RESETKEY(self, tag: bytes, mailbox: bytes | None, mechanisms: list[bytes]) -> Any:
        table = self._urlauth_keys(self._user or "")
        if mailbox is None:
            if mechanisms:
                raise imap4.IllegalClientResponse("Mechanisms without a mailbox")
            yield self._run(table.reset_all)
            self.log.info("imap {user}: URLAUTH keys removed", user=self._user)
            self.sendPositiveResponse(tag, b"All keys removed")
            return
        if any(m.upper() != MECHANISM.encode() for m in mechanisms):
            self.sendNegativeResponse(tag, b"Unsupported URLAUTH mechanism")
            return
        folder = yield self.factory.store.open_folder(self._user, mailbox_name(mailbox), True)
        try:
            yield self._run(table.reset, folder.name, folder.uid_validity)
        finally:
            folder.close()
        self.log.info(
            "imap {user}: URLAUTH key of {folder} reset", user=self._user, folder=folder.name
        )
        # RFC 4467 3.1: the mechanisms the mailbox now has keys for.
        self.sendPositiveResponse(tag, b"[URLMECH INTERNAL] Key removed")

    auth_RESETKEY = select_RESETKEY = (do_RESETKEY, opt_mailbox, arg_astrings)

    # --- GENURLAUTH -----------------------------------------------------------

    @command
    def do_GENURLAUTH(self, tag: bytes, args: list[bytes]) -> Any:
        if not args or len(args) % 2:
            raise imap4.IllegalClientResponse("GENURLAUTH takes pairs of URL and mechanism")
        urls = []
        for rump, mechanism in zip(args[::2], args[1::2], strict=True):
            try:
                url = parse(rump, relative=False)
            except InvalidURL as e:
                raise imap4.IllegalClientResponse(f"Invalid URL: {e}") from None
            if not url.is_message_part or url.access is None or url.mechanism is not None:
                raise imap4.IllegalClientResponse("Invalid URL: Must be a URLAUTH rump URL")
            if mechanism.upper() != MECHANISM.encode():
                self.sendNegativeResponse(tag, b"Unsupported URLAUTH mechanism")
                return
            try:
                urls.append((yield self._genurlauth_one(url)))
            except _Refused as e:
                self.sendNegativeResponse(tag, str(e).encode("utf-8", "replace"))
                return
        self.sendUntaggedResponse(b"GENURLAUTH " + b" ".join(astring(u) for u in urls))
        self.sendPositiveResponse(tag, b"GENURLAUTH completed")

    auth_GENURLAUTH = select_GENURLAUTH = (do_GENURLAUTH, arg_astrings)

    @defer.inlineCallbacks
    def _genurlauth_one(self, url: ImapUrl) -> Any:
        """The URL with its INTERNAL token (RFC 4467 3.2), or L{_Refused}."""
        if expired(url.expire, self._urlauth_now()):
            raise _Refused("URLAUTH has already expired")
        if url.user != self._user:
            raise _Refused(f"Not permitted to generate URLAUTH for user {url.user or ''}")
        try:
            folder = yield self.factory.store.open_folder(self._user, url.mailbox, True)
        except FolderError as e:
            raise _Refused(f"Invalid URL: {e}") from None
        try:
            if url.uidvalidity is not None and url.uidvalidity != folder.uid_validity:
                raise _Refused("Invalid URL: UIDVALIDITY does not match")
            if _info(folder, url.uid) is None:
                raise _Refused("Invalid URL: Message does not exist")
            try:
                section(url.section)
            except BadSection:
                raise _Refused("Invalid URL: Bad section") from None
            table = self._urlauth_keys(self._user or "")
            key = yield self._run(table.key_or_new, folder.name, folder.uid_validity)
        finally:
            folder.close()
        self.log.info(
            "imap {user}: GENURLAUTH {folder} UID {uid} for {access}",
            user=self._user,
            folder=folder.name,
            uid=url.uid,
            access=url.access,
        )
        assert url.rump is not None
        return full_url(url.rump, key)

    # --- URLFETCH -------------------------------------------------------------

    @command
    def do_URLFETCH(self, tag: bytes, urls: list[bytes]) -> Any:
        if not urls:
            raise imap4.IllegalClientResponse("URLFETCH needs a URL")
        flow = OutputFlow()
        self.transport.registerProducer(flow, True)
        try:
            for text in urls:
                try:
                    ok = yield self._urlfetch_one(text, flow)
                except Exception:
                    # Part of a literal may be on the wire: the session cannot go on.
                    self.log.failure("URLFETCH failed mid-response; closing the connection")
                    if not self._lost:
                        self.sendLine(b"* BYE Internal error")
                        self.transport.loseConnection()
                    return
                if not ok or self._lost or flow.stopped:
                    return
        finally:
            if not self._lost:
                self.transport.unregisterProducer()
        self.sendPositiveResponse(tag, b"URLFETCH completed")

    auth_URLFETCH = select_URLFETCH = (do_URLFETCH, arg_astrings)

    @defer.inlineCallbacks
    def _urlfetch_one(self, text: bytes, flow: OutputFlow) -> Any:
        """One URL's C{* URLFETCH url data} (RFC 4467 3.3); False if the session went."""
        opened = yield self._urlfetch_open(text)
        head = b"* URLFETCH " + astring(text)
        if opened is None:
            self.transport.write(head + b" NIL\r\n")
            return True
        folder, octets = opened
        try:
            self.transport.write(head + b" {%d}\r\n" % octets.size)
            if octets.data is not None:
                self.transport.write(octets.data)
            else:
                yield self._urlfetch_stream(folder, octets, flow)
            if self._lost or flow.stopped:
                return False
            self.transport.write(b"\r\n")
            yield flow.wait()
            return not (self._lost or flow.stopped)
        finally:
            folder.close()

    @defer.inlineCallbacks
    def _urlfetch_open(self, text: bytes) -> Any:
        """(folder, L{Octets}) of a URL this session may read, else None."""
        try:
            url = parse(text, relative=False)
            sec = section(url.section)
        except (InvalidURL, BadSection):
            return None
        if not url.is_message_part or self._user is None:
            return None
        validity = None
        if url.access is None:
            # A plain URL: the session user's own folders, as FETCH reads them.
            if url.user is not None and not same_user(url.user, self._user):
                return None
            owner = self._user
        else:
            if (
                url.user is None
                or url.mechanism != MECHANISM
                or url.token is None
                or url.rump is None
                or expired(url.expire, self._urlauth_now())
                or not permits(url.access, self._user)
            ):
                return None
            owner = self._user if url.user == self._user else url.user
            # The token is checked before any folder is opened: only a URL
            # made here opens one (opening a folder of a name that is no
            # user's would make it on disk).
            try:
                table = self._urlauth_keys(owner)
                name = canonical_folder(url.mailbox or "")
            except (ValueError, FolderError):
                found = None
            else:
                found = yield self._run(table.entry, name)
            if not verifies(None if found is None else found[1], url.rump, url.token):
                return None
            assert found is not None
            validity = found[0]
        try:
            folder = yield self.factory.store.open_folder(owner, url.mailbox, True)
        except (FolderError, ValueError):
            return None
        try:
            info = _info(folder, url.uid)
            if (
                info is None
                or (validity is not None and validity != folder.uid_validity)
                or (url.uidvalidity is not None and url.uidvalidity != folder.uid_validity)
            ):
                octets = None
            else:
                octets = yield self._run(locate, folder, info.uid, info.size, sec, url.partial)
        except KeyError:  # expunged meanwhile
            octets = None
        except BaseException:
            folder.close()
            raise
        if octets is None:
            folder.close()
            return None
        if url.access is not None:
            self.log.info(
                "imap {user}: URLFETCH {owner} {folder} UID {uid} by URLAUTH {access}",
                user=self._user,
                owner=owner,
                folder=folder.name,
                uid=info.uid,
                access=url.access,
            )
        return folder, octets

    def _urlfetch_stream(self, folder: Any, octets: Octets, flow: OutputFlow) -> defer.Deferred:
        """Send C{octets}' range of the message file as the client reads it."""
        return self._send_file_range(  # type: ignore[no-any-return]
            lambda: folder.open_message(octets.uid), octets.start, octets.size, flow
        )


def _info(folder: Any, uid: int | None) -> Any:
    """The folder's L{MessageInfo} of C{uid}, or None."""
    infos = folder.messages()
    uids = uids_of(infos)
    i = bisect.bisect_left(uids, uid or 0)
    return infos[i] if i < len(uids) and uids[i] == uid else None
