"""
The Return-Path field of a finally delivered copy (L{mailsrv.returnpath}),
and the in-process relayer's local copies (L{mailsrv.localdelivery}), which
get it from the store's delivery target.
"""

from __future__ import annotations

from twisted.trial import unittest

from mailsrv.localdelivery import LocalDelivery
from mailsrv.returnpath import ReturnPathSource
from mailsrv.spool import BytesSource
from mailsrv.store.memory import MemoryMailStore


def _read(source) -> bytes:
    with source.open() as f:
        return f.read()


class ReturnPathSourceTests(unittest.TestCase):
    def test_the_field_goes_first(self):
        source = ReturnPathSource("a@r.test", BytesSource(b"Subject: s\n\nbody\n"))
        self.assertEqual(_read(source), b"Return-Path: <a@r.test>\nSubject: s\n\nbody\n")

    def test_the_null_sender(self):
        self.assertEqual(_read(ReturnPathSource("", BytesSource(b"\n"))), b"Return-Path: <>\n\n")

    def test_a_return_path_of_its_own_at_the_top_is_replaced(self):
        inner = BytesSource(
            b"Return-Path: <old@r.test>\nreturn-path:\n <folded@r.test>\nS: s\n\nb\n"
        )
        self.assertEqual(
            _read(ReturnPathSource("new@r.test", inner)), b"Return-Path: <new@r.test>\nS: s\n\nb\n"
        )

    def test_one_further_down_is_kept(self):
        inner = BytesSource(b"Subject: s\nReturn-Path: <kept@r.test>\n\nb\n")
        self.assertEqual(
            _read(ReturnPathSource("a@r.test", inner)),
            b"Return-Path: <a@r.test>\nSubject: s\nReturn-Path: <kept@r.test>\n\nb\n",
        )


class LocalDeliveryTests(unittest.TestCase):
    def setUp(self):
        self.store = MemoryMailStore()
        self.local = LocalDelivery(self.store)

    def inbox(self, user):
        folder = self.successResultOf(self.store.open_folder(user, "INBOX"))
        return [folder.open_message(i.uid).read() for i in folder.messages()]

    def test_a_copy_lands_with_its_return_path(self):
        source = BytesSource(b"Subject: queued\n\nhi\n")
        self.assertIsNone(
            self.successResultOf(self.local.deliver("alice@example.test", source, ""))
        )
        self.assertEqual(
            self.inbox("alice@example.test"),
            [b"Return-Path: <>\r\nSubject: queued\r\n\r\nhi\r\n"],
        )

    def test_a_name_no_mailbox_can_have_fails_in_the_stores_words(self):
        f = self.failureResultOf(
            self.local.deliver("../x@example.test", BytesSource(b"\n"), "a@r.test"), ValueError
        )
        self.assertEqual(str(f.value), "not a usable mailbox address: '../x@example.test'")
