"""
Read sizes and search limits of the mbox format code: how much the scanner
and the readers read at a time, how far a header block is searched for its
end, and which messages are read or set aside whole in memory.
"""

from __future__ import annotations

CHUNK = 1 * 1024 * 1024  # scanner read size
READ_CHUNK = 64 * 1024  # message reader read size
SMALL_MESSAGE = 256 * 1024  # open_message reads these whole
HEADER_LIMIT = 256 * 1024  # bytes searched for the end of a header block
SPILL_IN_MEMORY = 4 * 1024 * 1024  # a reader's rest set aside in memory up to this size
