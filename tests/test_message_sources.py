"""
Every L{IMessageSource} in the package, checked with C{verifyObject} and
run through one contract: C{open()} gives a new file at the start each time,
the same bytes every time, and C{size} is the number of bytes it gives.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from zope.interface.verify import verifyObject

import mailsrv
from mailsrv.interfaces import IMessageSource
from mailsrv.outbound.queue import FileSource
from mailsrv.returnpath import PrefixSource, ReturnPathSource
from mailsrv.spool import BytesSource, SpooledSource

MESSAGE = b"Subject: contract\nFrom: a@r.test\n\n" + b"line of the body\n" * 500  # 8.5 kB


def _spooled(tmp_path: Path, spill_at: int) -> SpooledSource:
    source = SpooledSource(tmp_path / "spool", spill_at=spill_at)
    for i in range(0, len(MESSAGE), 1000):
        source.write(MESSAGE[i : i + 1000])
    source.finish()
    return source


def _file(tmp_path: Path) -> FileSource:
    path = tmp_path / "queued"
    path.write_bytes(b"envelope lines before the message\n" + MESSAGE)
    offset = len(b"envelope lines before the message\n")
    return FileSource(path, len(MESSAGE), offset)


SOURCES: dict[str, Callable[[Path], Any]] = {
    "BytesSource": lambda tmp: BytesSource(MESSAGE),
    "SpooledSource in memory": lambda tmp: _spooled(tmp, spill_at=1 << 20),
    "SpooledSource on disk": lambda tmp: _spooled(tmp, spill_at=1024),
    "FileSource at an offset": _file,
    "ReturnPathSource": lambda tmp: ReturnPathSource("a@r.test", BytesSource(MESSAGE)),
    "PrefixSource": lambda tmp: PrefixSource(LIST_ID, _spooled(tmp, spill_at=1024)),
}
LIST_ID = b"List-Id: Staff <staff.example.test>\n"


def _read(source: Any) -> bytes:
    with source.open() as f:
        return f.read()


@pytest.fixture(params=sorted(SOURCES))
def source(request, tmp_path):
    made = SOURCES[request.param](tmp_path)
    yield made
    discard = getattr(made, "discard", None)
    if discard is not None:
        discard()


def test_it_provides_the_interface(source):
    assert verifyObject(IMessageSource, source)


def test_open_twice_gives_the_same_bytes(source):
    first = _read(source)
    with source.open() as a, source.open() as b:  # two readers at once
        assert a.read(100) == first[:100]
        assert b.read() == first
        assert a.read() == first[100:]
    assert _read(source) == first


def test_size_is_the_number_of_bytes_open_gives(source):
    assert source.size == len(_read(source))


def test_the_bytes_are_the_message(source):
    data = _read(source)
    if isinstance(source, ReturnPathSource):
        assert data == b"Return-Path: <a@r.test>\n" + MESSAGE
    elif isinstance(source, PrefixSource):
        assert data == LIST_ID + MESSAGE
    else:
        assert data == MESSAGE


def test_spooled_on_disk_is_on_disk_and_in_memory_is_not(tmp_path):
    assert not _spooled(tmp_path, spill_at=1024).in_memory
    assert _spooled(tmp_path, spill_at=1 << 20).in_memory


def test_every_implementation_in_the_package_is_checked():
    """A new IMessageSource in the package gets a place in SOURCES."""
    declared = set()
    for path in Path(mailsrv.__file__).parent.rglob("*.py"):
        text = path.read_text()
        at = 0
        while (at := text.find("@implementer(IMessageSource)\nclass ", at)) >= 0:
            at += len("@implementer(IMessageSource)\nclass ")
            declared.add(text[at:].split(":", 1)[0].split("(", 1)[0])
    assert declared == {name.split(" ", 1)[0] for name in SOURCES}
