"""The IMAP response writers and command-value parsers, as pure functions."""

from __future__ import annotations

import pytest
from twisted.mail import imap4
from zope.interface.verify import verifyObject

from mailsrv.imap.account import FolderInfo
from mailsrv.imap.parsing import SeqSet, mailbox_name, parse_date_time, parse_flags, resolve
from mailsrv.imap.responses import (
    encode_name,
    expunge_lines,
    flag_list,
    list_lines,
    literal,
    literal_head,
    uid_set,
)
from mailsrv.interfaces import FolderError


def test_flag_list_and_literal():
    assert flag_list([]) == b"()"
    assert flag_list(["\\Seen", "$Label"]) == b"(\\Seen $Label)"
    assert literal(b"BODY[]", b"abc") == b"BODY[] {3}\r\nabc"
    assert literal_head(b"BODY[]", 300000) == b"BODY[] {300000}\r\n"


def test_mailbox_names_round_trip_in_modified_utf7():
    assert encode_name("Entwürfe") == b"Entw&APw-rfe"
    assert mailbox_name(b"Entw&APw-rfe") == "Entwürfe"
    assert encode_name("has space") == b'"has space"'
    assert mailbox_name(b"inbox/Sub") == "INBOX/Sub"
    with pytest.raises(FolderError):
        mailbox_name(b"x" * 10_000)


def test_list_lines_and_lsub_filter():
    boxes = [("INBOX", FolderInfo(["\\HasNoChildren"])), ("Old", FolderInfo(["\\Noselect"]))]
    verifyObject(imap4.IMailboxInfo, boxes[0][1])
    assert list(list_lines(b"LIST", boxes, None)) == [
        b'LIST (\\HasNoChildren) "/" INBOX',
        b'LIST (\\Noselect) "/" Old',
    ]
    assert list(list_lines(b"LSUB", boxes, {"INBOX", "Old"})) == [
        b'LSUB () "/" INBOX',
        b'LSUB (\\Noselect) "/" Old',
    ]


def test_expunge_lines_count_earlier_removals():
    # RFC 3501 7.4.1: each EXPUNGE renumbers the messages after it.
    assert expunge_lines([3, 5, 8, 9], [5, 9, 4]) == b"* 2 EXPUNGE\r\n* 3 EXPUNGE\r\n"
    assert expunge_lines([1, 2, 3], [1, 2, 3]) == b"* 1 EXPUNGE\r\n" * 3


def test_uid_set_keeps_order():
    assert uid_set([1, 2, 3, 7, 5, 6]) == b"1:3,7,5:6"


def test_resolve_sequence_numbers_and_uids():
    uids = [2, 4, 6, 8]
    assert resolve(SeqSet(b"2:*"), uids, False) == range(2, 5)
    assert resolve(SeqSet(b"4,1,4"), uids, False) == [1, 4]
    assert resolve(SeqSet(b"3:6"), uids, True) == range(2, 4)
    assert resolve(SeqSet(b"100:*"), uids, True) == range(4, 5)  # RFC 3501 6.4.8
    with pytest.raises(imap4.IllegalClientResponse):
        resolve(SeqSet(b"5"), uids, False)


def test_parse_flags_and_date_time():
    assert parse_flags([b"\\seen", b"\\Recent", b"$Label"]) == {"\\Seen", "$Label"}
    with pytest.raises(imap4.IllegalClientResponse):
        parse_flags([b"\\Bogus"])
    assert parse_date_time(b"17-Jul-1996 02:44:25 -0700") == 837596665
    with pytest.raises(imap4.IllegalClientResponse):
        parse_date_time(b"31-Feb-2024 00:00:00 +0000")
