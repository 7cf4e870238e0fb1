"""The pipes between the server and its relay process: batches, their size limit, the log mode."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from twisted.internet import task
from twisted.logger import FileLogObserver, LogPublisher, textFileLogObserver
from twisted.trial import unittest

from mailsrv.outbound import ipc, process


def _shrink(item):
    name, blob = item
    return None if blob is None else [name, None]


class BatcherTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.sent: list[bytes] = []
        self.batch = ipc.Batcher(self.clock, self.sent.append, _shrink)

    def test_one_turn_one_command(self):
        for i in range(5):
            self.batch.add([f"id{i}", "x" * 10])
        self.assertEqual(self.sent, [])  # not before the end of the reactor turn
        self.clock.advance(0)
        self.assertEqual(len(self.sent), 1)
        self.assertEqual(ipc.decode(self.sent[0]), [[f"id{i}", "x" * 10] for i in range(5)])
        self.clock.advance(1)
        self.assertEqual(len(self.sent), 1)  # nothing more to send

    def test_batches_stay_under_the_amp_value_limit(self):
        items = [[f"id{i}", "é" * 3000] for i in range(100)]  # 6 KB each in UTF-8
        for item in items:
            self.batch.add(item)
        self.clock.advance(0)
        self.assertGreater(len(self.sent), 1)
        for payload in self.sent:
            self.assertLessEqual(len(payload), ipc.MAX_VALUE)
        got = [item for payload in self.sent for item in ipc.decode(payload)]
        self.assertEqual(got, items)  # all of them, in order

    def test_an_item_too_big_alone_is_shrunk_or_dropped(self):
        self.batch.add(["big", "y" * (ipc.MAX_VALUE + 10)])
        self.batch.add(["small", "z"])
        self.clock.advance(0)
        self.assertEqual(ipc.decode(self.sent[0]), [["big", None], ["small", "z"]])

    def test_flush_sends_at_once(self):
        self.batch.add(["a", "b"])
        self.batch.flush()
        self.assertEqual(len(self.sent), 1)
        self.clock.advance(0)
        self.assertEqual(len(self.sent), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_decode_refuses_what_is_not_a_list(self):
        self.assertRaises(ValueError, ipc.decode, json.dumps({"a": 1}).encode())


class QueuedNoticeTests(unittest.TestCase):
    def test_a_notice_loses_the_bytes_then_the_envelope_to_fit(self):
        item = ["ID", "{}", 40, "m" * 10]
        self.assertEqual(process._shrink_queued(item), ["ID", "{}", 40, None])
        self.assertEqual(process._shrink_queued(["ID", "{}", 40, None]), ["ID", None, 40, None])
        self.assertIsNone(process._shrink_queued(["ID", None, 40, None]))


class LogModeTests(unittest.TestCase):
    def _with_observers(self, observers):
        publisher = LogPublisher(*observers)
        self.patch(process, "globalLogPublisher", publisher)
        return process.logs_to_stdout()

    def test_text_log_on_standard_output_is_shared(self):
        stdout = os.fdopen(os.dup(1), "w")
        self.addCleanup(stdout.close)
        # A duplicate of descriptor 1 is not descriptor 1: only fd 1 itself counts.
        self.assertFalse(self._with_observers([textFileLogObserver(stdout)]))
        real = open(1, "w", closefd=False)  # noqa: SIM115 - descriptor 1, left open
        self.assertTrue(self._with_observers([textFileLogObserver(real)]))

    def test_anything_else_is_forwarded(self):
        self.assertFalse(self._with_observers([textFileLogObserver(io.StringIO())]))
        real = open(1, "w", closefd=False)  # noqa: SIM115
        self.assertFalse(self._with_observers([textFileLogObserver(real), lambda event: None]))
        self.assertFalse(self._with_observers([lambda event: None]))
        self.assertFalse(self._with_observers([FileLogObserver(io.BytesIO(), str)]))


class _Writer:
    """The pipe to the relay process, as an IConsumer."""

    producer = None

    def registerProducer(self, producer, streaming):
        self.producer = producer


class _Process:
    def __init__(self) -> None:
        self.pipes = {0: object(), ipc.CHILD_IN: _Writer()}

    def closeStdin(self) -> None:
        pass

    def writeToChild(self, fd, data) -> None:
        pass

    def closeChildFD(self, fd) -> None:
        pass


class BacklogTests(unittest.TestCase):
    def test_notices_shrink_then_stop_while_the_relay_process_lags(self):
        from twisted.internet.testing import MemoryReactorClock

        self.patch(process, "BACKLOG_NOTICES", 2)
        proto = process.RelayProcessProtocol(
            process.ServerSide(None, Path(self.mktemp())), MemoryReactorClock()
        )
        pipe = _Process()
        proto.makeConnection(pipe)
        sent: list = []
        self.patch(proto.notices, "add", sent.append)
        writer = pipe.pipes[ipc.CHILD_IN]
        self.assertIs(writer.producer, proto)
        proto.notice(["A", "{}", 40, "bytes"])
        writer.producer.pauseProducing()  # its pipe is full
        for name in "BCD":
            proto.notice([name, "{}", 40, "bytes"])
        writer.producer.resumeProducing()  # it caught up
        proto.notice(["E", "{}", 40, "bytes"])
        self.assertEqual(
            sent,
            [
                ["A", "{}", 40, "bytes"],
                ["B", "{}", 40, None],  # without the message: it reads the disk
                ["C", "{}", 40, None],
                # D: no notice at all; the relay process finds it in the queue folder
                ["E", "{}", 40, "bytes"],
            ],
        )
