"""
Merging a message's flags with a change another program (mutt) made to its
Status:/X-Status: fields in the file.
"""

from __future__ import annotations

from mailsrv.interfaces import DELETED, DRAFT

# Flags a change of the file never takes away: mutt writes no D or T into
# X-Status: when it rewrites a message, so their going is no sign of a user's wish.
STICKY_FLAGS = frozenset({DELETED, DRAFT})


def merge_file_flags(
    ours: frozenset[str], old_disk: frozenset[str], new_disk: frozenset[str]
) -> frozenset[str]:
    """
    A message's flags after another program (mutt) changed its Status:/X-Status:
    from C{old_disk} (what the file said when we last read or wrote it) to
    C{new_disk}: C{ours} with what the file gained added and what it lost taken
    away, flag by flag, so changes sessions made since the last write stay.

    \\Deleted and \\Draft are only ever added this way, never taken away: mutt
    does not carry X-Status: D or T through its own rewrite of a message (it
    drops a D another program wrote when it syncs an older view of the
    folder, and purges what it deletes), so a lost D is not an undelete, and
    a message must not come back for a client's EXPUNGE on that account
    either way; a user undeletes over IMAP.
    """
    added = new_disk - old_disk
    removed = old_disk - new_disk - STICKY_FLAGS
    return (ours - removed) | added
