"""
The mbox format in parts (L{mailsrv.store.mboxfmt}): each module does its
one job, and the package still offers every name under its old path.
"""

from __future__ import annotations

import os
import tempfile

from twisted.trial import unittest

from mailsrv.interfaces import DELETED, FLAGGED, SEEN
from mailsrv.store import mboxfmt
from mailsrv.store.mboxfmt import (
    fields,
    flagmerge,
    fromline,
    limits,
    quoting,
    reader,
    scanner,
    writer,
)

PARTS = (fields, flagmerge, fromline, limits, quoting, reader, scanner, writer)


class ReExportTests(unittest.TestCase):
    def test_every_name_is_the_one_of_its_part(self):
        for name in mboxfmt.__all__:
            homes = [part for part in PARTS if name in vars(part)]
            self.assertTrue(homes, name)
            self.assertIs(getattr(mboxfmt, name), getattr(homes[0], name), name)


class PartsTests(unittest.TestCase):
    def test_fromline_date_read_back(self):
        line = fromline.from_line("ann@example.test", 1_700_000_000.0)
        self.assertTrue(line.startswith(b"From ann@example.test "))
        self.assertEqual(fromline.parse_from_date(line), 1_700_000_000.0)

    def test_quoting_round_trip(self):
        lines = b"a\r\nFrom here\r\n>From there\r\n"
        quoted = quoting.quote_lines(lines)
        self.assertEqual(quoted, b"a\n>From here\n>>From there\n")
        self.assertEqual(quoting.to_crlf(quoted), lines)

    def test_fields_flags_written_and_read(self):
        block = b"Subject: x\nStatus: O\n\n"
        written = fields.with_status(block, frozenset({SEEN, FLAGGED}))
        self.assertEqual(written, b"Subject: x\nStatus: RO\nX-Status: F\n\n")
        self.assertEqual(fields.status_flags(b"RO", b"F"), frozenset({SEEN, FLAGGED}))
        self.assertEqual(fields.strip_hidden(written), (b"Subject: x\n\n", 25))
        padded = fields.with_padding(block)
        self.assertEqual(len(fields.with_status_fitted(padded, frozenset({SEEN}))), len(padded))

    def test_flagmerge_keeps_deleted(self):
        merged = flagmerge.merge_file_flags(
            frozenset({DELETED}), frozenset({DELETED, SEEN}), frozenset()
        )
        self.assertEqual(merged, frozenset({DELETED}))

    def test_writer_scanner_reader_round_trip(self):
        body = b"Subject: hi\r\nStatus: RO\r\n\r\nFrom me\r\nbye\r\n"
        want = b"Subject: hi\r\n\r\nFrom me\r\nbye\r\n"
        pieces = b"".join(writer.mbox_pieces(_BytesFile(body)))
        data = fromline.from_line("a@b", 0.0) + pieces + b"\n"
        self.assertLessEqual(limits.HEADER_LIMIT, limits.CHUNK)
        with tempfile.TemporaryFile() as f:
            f.write(data)
            f.flush()
            fd = f.fileno()
            res = scanner.scan(fd, 0, len(data))
            self.assertEqual(len(res.starts), 1)
            self.assertEqual(res.size(0, mboxfmt.READ_MBOXRD | mboxfmt.HIDE_FIELDS), len(want))
            src = _Pread(fd)
            got = reader.MessageReader(src, res.starts[0], res.ends[0], hide=True).read()
        self.assertEqual(got, want)


class _BytesFile:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def read(self, n: int) -> bytes:
        data, self._data = self._data[:n], self._data[n:]
        return data


class _Pread:
    def __init__(self, fd: int) -> None:
        self._fd = fd

    def pread(self, n: int, off: int) -> bytes:
        return os.pread(self._fd, n, off)
