"""
The mbox file format, one job per module:

  - L{limits}: read sizes and search limits;
  - L{fromline}: the ``From `` separator line, written and its date read;
  - L{quoting}: mboxrd quoting of ``From `` lines, and CRLF line ends;
  - L{fields}: the bookkeeping header fields (Status:, X-Status:,
    X-Keywords: padding, ...): hidden from sessions, flags read and written;
  - L{flagmerge}: flags merged with another program's change to the file;
  - L{writer}: a message written into an mbox file in mbox form;
  - L{reader}: one message read back with CRLF line ends;
  - L{scanner}: the messages of a file found (L{ScanResult}).

Pure functions over file descriptors; no Twisted, no locking (see
L{mailsrv.store.locking}), so they run on the disk threads. The names are
re-exported here, where the store and the tests use them.
"""

from mailsrv.store.mboxfmt.fields import (
    HIDDEN_FIELDS,
    NO_FLAGS,
    PADDING,
    STATUS_FLAGS,
    header_end,
    hide_fields,
    may_hide,
    status_flags,
    strip_hidden,
    with_padding,
    with_status,
    with_status_fitted,
)
from mailsrv.store.mboxfmt.flagmerge import STICKY_FLAGS, merge_file_flags
from mailsrv.store.mboxfmt.fromline import from_line, parse_from_date
from mailsrv.store.mboxfmt.limits import (
    CHUNK,
    HEADER_LIMIT,
    READ_CHUNK,
    SMALL_MESSAGE,
    SPILL_IN_MEMORY,
)
from mailsrv.store.mboxfmt.quoting import quote_lines, to_crlf
from mailsrv.store.mboxfmt.reader import MessageReader, read_range
from mailsrv.store.mboxfmt.scanner import (
    HIDE_FIELDS,
    READ_MBOXRD,
    ScanResult,
    fingerprint,
    scan,
)
from mailsrv.store.mboxfmt.writer import (
    iter_lines_chunks,
    mbox_pieces,
    quoted_message,
    write_all,
    write_quoted,
)

__all__ = [
    "CHUNK",
    "HEADER_LIMIT",
    "HIDDEN_FIELDS",
    "HIDE_FIELDS",
    "NO_FLAGS",
    "PADDING",
    "READ_CHUNK",
    "READ_MBOXRD",
    "SMALL_MESSAGE",
    "SPILL_IN_MEMORY",
    "STATUS_FLAGS",
    "STICKY_FLAGS",
    "MessageReader",
    "ScanResult",
    "fingerprint",
    "from_line",
    "header_end",
    "hide_fields",
    "iter_lines_chunks",
    "may_hide",
    "mbox_pieces",
    "merge_file_flags",
    "parse_from_date",
    "quote_lines",
    "quoted_message",
    "read_range",
    "scan",
    "status_flags",
    "strip_hidden",
    "to_crlf",
    "with_padding",
    "with_status",
    "with_status_fitted",
    "write_all",
    "write_quoted",
]
