"""
IMAP4rev2 (RFC 9051) for a session that enables it: the server offers both
IMAP4rev1 and IMAP4rev2, and a session follows rev2 only after
C{ENABLE IMAP4rev2} (RFC 9051 Appendix E; the switch is L{CommandBase.rev2}).
What rev2 changes in what the session sees is decided here:

- no \\Recent flag and no RECENT response (RFC 9051 2.3.2, 7.4: obsolete);
  such a session takes no message as \\Recent, so they stay recent for the
  IMAP4rev1 sessions that come after it;
- SELECT and EXAMINE answer with the mailbox's LIST response and without
  the UNSEEN response code (RFC 9051 6.3.2);
- SEARCH answers with ESEARCH, as if it had C{RETURN (ALL)} (RFC 9051 6.4.4,
  7.3.4: the SEARCH response is obsolete);
- mailbox names in UTF-8 both ways (RFC 9051 5.1; modified UTF-7 is for
  IMAP4rev1 only, Appendix A), without the other rules of UTF8=ACCEPT
  (a rev2 SEARCH may still name a CHARSET, RFC 9051 6.4.4); a new name must
  be Net-Unicode (RFC 9051 6.3.4);
- LIST shows \\HasChildren / \\HasNoChildren whatever its return options
  (RFC 9051 7.3.1; RFC 5258 4 lets the server add them unasked);
- NO answers carry the response codes of RFC 9051 7.1 (from RFC 5530).

The rest of rev2 holds in every session (STATUS DELETED and SIZE, UID
EXPUNGE, the mandatory extensions); what rev2 dropped (CHECK, LSUB, the
RFC822.* FETCH items, SEARCH NEW/OLD/RECENT) is still answered, as
IMAP4rev1 is also offered.
"""

from __future__ import annotations

import dataclasses
import unicodedata
from typing import TYPE_CHECKING, Any

from twisted.internet import defer

from mailsrv.imap.responses import list_lines

if TYPE_CHECKING:  # listext imports the command parsers, which import this module
    from mailsrv.imap.listext import ListRequest

CHILDREN = "CHILDREN"  # the LIST return option (RFC 5258 4, listext.CHILDREN)

IMAP4REV2 = b"IMAP4rev2"
# RFC 9051 7.2.2 (IMAP4rev2 must be listed), RFC 8438 (STATUS SIZE, in rev2's STATUS)
CAPABILITIES = [IMAP4REV2, b"STATUS=SIZE"]

# The refusals (L{FolderError} texts and the commands' own) and the codes of
# RFC 9051 7.1 they are answered with in a rev2 session: Dovecot's where it
# sends one (tests/test_imap_rev2.py compares), else the RFC's.
_CODES = {
    "Folder already exists": b"ALREADYEXISTS",
    "Target folder exists": b"ALREADYEXISTS",
    "No such folder": b"NONEXISTENT",
    "Folder was renamed or deleted": b"NONEXISTENT",
    "Mailbox has children, delete them first": b"HASCHILDREN",
    "INBOX cannot be deleted": b"CANNOT",
    "INBOX cannot have sub-folders": b"CANNOT",
    "A mailbox cannot have sub-folders here": b"CANNOT",
    "Folder names must not end with .lock": b"CANNOT",
    "Cannot rename to INBOX": b"ALREADYEXISTS",  # INBOX always exists
    "Folder is read-only": b"NOPERM",
    "Mailbox isn't selectable": b"CANNOT",
    "Not subscribed": b"NONEXISTENT",
    "Quota root doesn't exist": b"NONEXISTENT",
}


def refused_name(proto: Any, name: str) -> bytes | None:
    """
    The NO text for a name a rev2 session may not CREATE or RENAME to, or
    None: one that is not Net-Unicode (RFC 9051 5.1, 6.3.4; RFC 5198 2: in
    normalization form C, no control characters). Refused, not normalized.
    """
    if not proto.rev2:
        return None
    if unicodedata.normalize("NFC", name) != name or any(
        unicodedata.category(c) == "Cc" for c in name
    ):
        return b"[CANNOT] Mailbox name is not Net-Unicode (NFC, no control characters)"
    return None


def enable(proto: Any) -> None:
    """
    C{ENABLE IMAP4rev2}: the session follows rev2 from now on; messages it
    holds as \\Recent stop being shown as such.
    """
    proto.rev2 = True
    proto.utf8_names = True
    if proto.mbox is not None:
        proto.mbox.recent.clear()


def refusal(proto: Any, text: bytes) -> bytes:
    """
    A tagged NO's text: in a rev2 session, with the response code of the
    refusal (RFC 9051 7.1) when C{text} has none; else as it is.
    """
    if not proto.rev2 or text.startswith(b"["):
        return text
    code = _CODES.get(text.decode("utf-8", "replace"))
    if code is None and text.startswith(b"Cannot "):
        code = b"NOPERM"  # the file system refused (mailsrv.store.mbox.files)
    return text if code is None else b"[" + code + b"] " + text


@defer.inlineCallbacks
def select_list(proto: Any, name: str) -> Any:
    """
    The untagged LIST response of a rev2 SELECT/EXAMINE (RFC 9051 6.3.2:
    required, with the mailbox's attributes as LIST gives them); fires with
    the line (b"" if LIST does not show the name).
    """
    boxes = yield proto.account.listMailboxes("", name)
    lines = list_lines(b"LIST", [b for b in boxes if b[0] == name], None, proto.encode_name)
    return b"".join(b"* " + line + b"\r\n" for line in lines)


def search_options(proto: Any, options: frozenset[str] | None) -> frozenset[str] | None:
    """SEARCH's return options: in a rev2 session none means ALL (RFC 9051 6.4.4)."""
    if options is None and proto.rev2:
        return frozenset({"ALL"})
    return options


def list_request(proto: Any, request: ListRequest) -> ListRequest:
    """The LIST request as a rev2 session has it: the CHILDREN return option always."""
    if not proto.rev2 or not request.extended or CHILDREN in request.returns:
        return request
    return dataclasses.replace(request, returns=request.returns | {CHILDREN})
