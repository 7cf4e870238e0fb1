"""NOTIFY's arguments (mailsrv/imap/notify.py): what a NOTIFY command asks for, and matching."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailsrv.imap.notify import (
    FLAG_CHANGE,
    MAILBOX_NAME,
    MESSAGE_EXPUNGE,
    MESSAGE_NEW,
    SUBSCRIPTION_CHANGE,
    BadEvent,
    NotifySyntaxError,
    bad_event_code,
    parse_notify,
)


def name(raw: bytes) -> str:
    return raw.decode()


def test_none():
    assert parse_notify(b"NONE", name) is None


def test_groups_read():
    spec = parse_notify(
        b"SET STATUS (selected-delayed (MessageNew (UID BODY.PEEK[HEADER.FIELDS (FROM)]) "
        b'MessageExpunge)) (subtree ("Lists" Work) (MessageNew MessageExpunge FlagChange)) '
        b"(subscribed (SubscriptionChange)) (inboxes NONE)",
        name,
    )
    assert spec is not None and spec.status and spec.selected_delayed
    assert spec.selected_events == {MESSAGE_NEW, MESSAGE_EXPUNGE}
    assert spec.fetch == b"(UID BODY.PEEK[HEADER.FIELDS (FROM)])"
    assert len(spec.filters) == 2  # a group with NONE adds nothing
    subs = {"Play"}
    assert spec.events_for("Lists/a", subs) == {MESSAGE_NEW, MESSAGE_EXPUNGE, FLAG_CHANGE}
    assert spec.events_for("Listsx", subs) == frozenset()
    assert spec.events_for("Work", subs) == {MESSAGE_NEW, MESSAGE_EXPUNGE, FLAG_CHANGE}
    assert spec.wants(SUBSCRIPTION_CHANGE, "Play", subs)
    assert not spec.wants(SUBSCRIPTION_CHANGE, "Work", subs)
    assert not spec.wants(MAILBOX_NAME, "Work", subs)
    assert spec.uses_subscriptions and spec.watches_mailboxes


def test_mailboxes_exact_without_wildcards():
    spec = parse_notify(b"SET (mailboxes (Work* %) (MailboxName))", name)
    assert spec is not None
    assert spec.wants(MAILBOX_NAME, "Work*", set())
    assert not spec.wants(MAILBOX_NAME, "Workshop", set())  # RFC 5465 6.6: no wildcards


def test_bad_event_lists_what_is_supported():
    with pytest.raises(BadEvent):
        parse_notify(b"SET (personal (MessageNew MessageExpunge AnnotationChange))", name)
    assert bad_event_code() == (
        b"BADEVENT (MessageNew MessageExpunge FlagChange MailboxName SubscriptionChange)"
    )


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"SET",
        b"SET (personal (MessageNew))",
        b"SET (personal (FlagChange MessageExpunge))",
        b"SET (selected (SubscriptionChange))",
        b"SET (selected NONE) (selected NONE)",
        b"SET (personal (MessageNew (UID) MessageExpunge))",
        b"SET (personal (MailboxName)) extra",
        b'SET (mailboxes "unterminated (MailboxName))',
        b"SET (mailboxes {3}",
        b"SET (personal (MailboxName)))",
    ],
)
def test_syntax_errors(line):
    with pytest.raises(NotifySyntaxError):
        parse_notify(line, name)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_are_read_or_refused(line):
    try:
        parse_notify(line, lambda raw: raw.decode("utf-8", "replace"))
    except (NotifySyntaxError, BadEvent):
        pass


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                b"(",
                b")",
                b" ",
                b"SET",
                b"NONE",
                b"STATUS",
                b"selected",
                b"personal",
                b"subtree",
                b"MessageNew",
                b"MessageExpunge",
                b"FlagChange",
                b"MailboxName",
                b'"x y"',
                b"UID",
            ]
        ),
        max_size=30,
    )
)
def test_token_soup_is_read_or_refused(parts):
    try:
        parse_notify(b"".join(parts), name)
    except (NotifySyntaxError, BadEvent):
        pass
