"""The envelope of a queued message: its JSON form, its pending recipients, its id."""

from __future__ import annotations

import json

from twisted.trial import unittest

from mailsrv.outbound import queue
from mailsrv.outbound.envelope import FAILED, PENDING, SENT, Envelope, Recipient, new_queue_id


class EnvelopeTests(unittest.TestCase):
    def test_json_round_trip_keeps_everything_but_the_offset(self):
        env = Envelope(
            "0ABC",
            "a@example.test",
            [Recipient("b@x.test", state=SENT, attempts=2, status="2.0.0"), Recipient("c@x.test")],
            100.5,
            160.0,
            attempts=2,
            last_error="451 4.3.0 later",
            size=42,
            offset=77,
        )
        raw = json.loads(env.to_json())
        self.assertEqual(raw["version"], 1)
        self.assertNotIn("offset", raw)
        again = Envelope.from_json(env.to_json(), offset=77)
        self.assertEqual(again, env)
        self.assertEqual(again.offset, 77)
        self.assertEqual([r.address for r in again.pending()], ["c@x.test"])
        self.assertRaises(ValueError, Envelope.from_dict, ["not", "an", "object"])

    def test_pending_recipients(self):
        env = Envelope("0A", "", [Recipient("a", state=s) for s in (PENDING, SENT, FAILED)], 1, 1)
        self.assertEqual([r.address for r in env.pending()], ["a"])
        self.assertEqual(env.pending()[0].state, PENDING)

    def test_ids_are_hex_and_sort_by_arrival(self):
        ids = [new_queue_id(t) for t in (1.0, 1.000001, 2.0)]
        self.assertEqual(ids, sorted(ids))
        self.assertEqual(len(set(ids)), 3)
        self.assertTrue(all(len(i) == 20 and set(i) <= set("0123456789ABCDEF") for i in ids))

    def test_the_queue_module_still_offers_the_envelope(self):
        self.assertIs(queue.Envelope, Envelope)
        self.assertIs(queue.Recipient, Recipient)
        self.assertIs(queue.new_queue_id, new_queue_id)


class SMTPUTF8FlagTests(unittest.TestCase):
    def test_the_flag_is_stored_and_old_envelopes_without_it_load(self):
        env = Envelope("0ABC", "jösé@example.test", [Recipient("b@x.test")], 1.0, 1.0)
        env.smtputf8 = True
        raw = json.loads(env.to_json())
        self.assertIs(raw["smtputf8"], True)
        self.assertEqual(Envelope.from_json(env.to_json()), env)
        del raw["smtputf8"]  # a queue file written before the field existed
        self.assertIs(Envelope.from_dict(raw).smtputf8, False)


class CompatibilityTests(unittest.TestCase):
    # The keys the version before SMTPUTF8 wrote, and all it can read back
    # (it builds its Envelope from the keys as they are).
    BEFORE = {
        "id",
        "sender",
        "recipients",
        "created",
        "next_attempt",
        "attempts",
        "last_error",
        "warned",
        "size",
        "version",
    }

    def test_an_ordinary_envelope_is_what_the_version_before_can_read(self):
        env = Envelope("0ABC", "a@example.test", [Recipient("b@x.test")], 1.0, 1.0)
        self.assertEqual(set(json.loads(env.to_json())), self.BEFORE)

    def test_keys_of_a_later_version_are_kept_when_the_envelope_is_written_again(self):
        env = Envelope("0ABC", "a@example.test", [Recipient("b@x.test")], 1.0, 1.0)
        raw = json.loads(env.to_json())
        raw["held"] = True  # a later version's key
        again = Envelope.from_dict(raw)
        again.attempts = 2
        written = json.loads(again.to_json())
        self.assertEqual((written["held"], written["attempts"]), (True, 2))
