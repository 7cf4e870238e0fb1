"""
A small mailbox for SORT and THREAD tests: the RFC 5256 base-subject cases,
dates missing, invalid and in other zones, addresses with display names,
comments, quoting, groups and encoded-words, and threads with missing
parents, duplicates and reference loops. As an mboxrd file (with its
``From `` lines, which give each message's INTERNALDATE) or as messages.
"""

from __future__ import annotations

import time

# (From, To, Cc, Subject, Date, Message-ID, References, In-Reply-To); None: no such field.
# fmt: off
MESSAGES: list[tuple[str | None, ...]] = [
    ("Ann <ann@a.test>", "bob@b.test", None, "Hello", "Mon, 1 Jan 2024 10:00:00 +0000", "<m1@x>", None, None),
    ("bob@b.test", "Ann <ann@a.test>", "cat@c.test", "Re: Hello", "Mon, 1 Jan 2024 11:00:00 +0000", "<m2@x>", "<m1@x>", "<m1@x>"),
    ('"Zed, Z." <zed@z.test>', "ann@a.test", None, "RE: re: Hello", "Mon, 1 Jan 2024 09:30:00 -0200", "<m3@x>", "<m1@x> <m2@x>", None),
    ("cat@c.test (Cat Comment)", "bob@b.test", "Dan <dan@d.test>", "[list] Fwd: news (fwd)", "Tue, 2 Jan 2024 08:00:00 +0100", "<m4@x>", None, None),
    ("=?utf-8?q?R=C3=A9mi?= <remi@e.test>", "list: ann@a.test, bob@b.test;", None, "=?utf-8?b?UmU6IG5ld3M=?=", "Tue, 2 Jan 2024 09:00:00 +0000", "<m5@x>", None, "<m4@x>"),
    ("dan@d.test", "zed@z.test", None, "[fwd: news]", "not a date", "<m6@x>", None, None),
    ("Bob <bob@b.test>", "Rémi <remi@e.test>", "ann@a.test", "news", None, "<m7@x>", "<m99@x> <m4@x>", None),
    ("<eve@e.test>", "bob@b.test", None, "[PATCH] [v2] thing", "Wed, 3 Jan 2024 10:00:00 +0000", "<m8@x>", None, None),
    ("Eve Q <eve@e.test>", "<cat@c.test>", None, "[PATCH]", "Wed, 3 Jan 2024 10:00:00 +0000", "<m9@x>", None, None),
    ("ann@a.test", "bob@b.test", None, "Re: [PATCH] [v2] thing", "Wed, 3 Jan 2024 11:00:00 +0000", "<m10@x>", "<m8@x>", None),
    ("Fred <fred@f.test>", "ann@a.test", None, "  spaced\t  subject  ", "Thu, 4 Jan 2024 10:00:00 +0000", "<m11@x>", None, None),
    ("fred@f.test", "ann@a.test", None, "Fw: spaced subject", "Thu, 4 Jan 2024 12:00:00 +0000", "<m12@x>", "<m404@x>", None),
    ("gus@g.test", "ann@a.test", None, "Re: spaced subject", "Thu, 4 Jan 2024 11:00:00 +0000", "<m13@x>", "<m404@x>", None),
    ("hal@h.test", "ann@a.test", None, "Loop one", "Fri, 5 Jan 2024 10:00:00 +0000", "<m14@x>", "<m15@x>", None),
    ("ian@i.test", "ann@a.test", None, "Loop two", "Fri, 5 Jan 2024 11:00:00 +0000", "<m15@x>", "<m14@x>", None),
    ("jo@j.test", "ann@a.test", None, "Duplicate", "Sat, 6 Jan 2024 10:00:00 +0000", "<m16@x>", None, None),
    ("jo@j.test", "ann@a.test", None, "Duplicate", "Sat, 6 Jan 2024 10:00:00 +0000", "<m16@x>", None, None),
    ("kim@k.test", None, None, None, "Sun, 7 Jan 2024 10:00:00 +0000", None, None, None),
    ("Lu <lu@l.test>", "mo@m.test", None, "Same subject", "Mon, 8 Jan 2024 10:00:00 +0000", "<m19@x>", None, None),
    ("mo@m.test", "lu@l.test", None, "Same subject", "Mon, 8 Jan 2024 09:00:00 +0000", "<m20@x>", None, None),
    ("Nia <nia@n.test>", "ann@a.test", None, "Re: Same subject", "Mon, 8 Jan 2024 11:00:00 +0000", "<m21@x>", "<m19@x>", None),
    ("_under@u.test", "ann@a.test", None, "_underscore", "Tue, 9 Jan 2024 10:00:00 +0000", "<m22@x>", None, None),
    ("Zoe <zoe@z.test>", "ann@a.test", None, "zebra", "Tue, 9 Jan 2024 10:00:00 +0000", "<m23@x>", "<m1@x> <m3@x>", None),
    ("ann@a.test", "ann@a.test", None, "Re: Re: Hello", "Tue, 9 Jan 2024 12:00:00 +0000", "<m24@x>", None, "<m2@x> <m1@x>"),
]
# fmt: on

# The INTERNALDATE of message i (the mbox From line), an hour apart from 2024-02-01.
BASE_TIME = 1_706_745_600


def message(i: int) -> bytes:
    """Message i (0-based) with LF line ends."""
    frm, to, cc, subject, date, mid, refs, irt = MESSAGES[i]
    lines = []
    for name, value in (
        ("From", frm),
        ("To", to),
        ("Cc", cc),
        ("Subject", subject),
        ("Date", date),
        ("Message-ID", mid),
        ("References", refs),
        ("In-Reply-To", irt),
    ):
        if value is not None:
            lines.append(f"{name}: {value}")
    head = "\n".join(lines).encode("utf-8")
    return head + b"\n\nbody of message %d\n" % (i + 1) + b"x" * (i * 7 % 23) + b"\n"


def from_line(i: int) -> bytes:
    t = time.gmtime(BASE_TIME + 3600 * i)
    return b"From sender@example.test " + time.strftime("%a %b %d %H:%M:%S %Y", t).encode()


def mbox() -> bytes:
    """The mailbox as an mbox file."""
    return b"".join(from_line(i) + b"\n" + message(i) + b"\n" for i in range(len(MESSAGES)))


_FIRST = ["Ann", "Bob", "Cat", "Dan", "Eve", "Fred", "Gus", "Hal", "Ian", "Jo", "Kim", "Lu"]
_LAST = ["Smith", "Jones", "Brown", "Müller", "Østergaard", "Ng", "O'Hara", "van Dijk"]
# fmt: off
_TOPICS = [
    "build failure", "release plan", "meeting notes", "disk quota", "lunch",
    "invoice 2024", "Überweisung", "café opening", "patch review", "server move",
    "holiday", "bug in parser", "new intern", "budget", "security update",
    "update",
]
# fmt: on
_ZONES = ["+0000", "+0100", "-0500", "+0530", "-0800", "+1000"]
_DAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


def _encoded(text: str) -> str:
    import base64

    return "=?utf-8?b?" + base64.b64encode(text.encode("utf-8")).decode() + "?="


def _address(rng, i: int) -> str:
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    mailbox = f"{first.lower()}.{i % 37}@{rng.choice(['a.test', 'b.test', 'lists.test'])}"
    form = rng.random()
    name = f"{first} {last}"
    if form < 0.25:
        return mailbox
    if form < 0.35:
        return f'"{last}, {first}" <{mailbox}>'
    if not name.isascii() or form < 0.45:
        return f"{_encoded(name)} <{mailbox}>"
    return f"{name} <{mailbox}>"


def _date(rng, t: float) -> str | None:
    r = rng.random()
    if r < 0.01:
        return None
    if r < 0.02:
        return "someday soon"
    zone = rng.choice(_ZONES)
    offset = (int(zone[1:3]) * 3600 + int(zone[3:]) * 60) * (1 if zone[0] == "+" else -1)
    g = time.gmtime(t + offset)
    return (
        f"{_DAYS[g.tm_wday]}, {g.tm_mday} {_MONTHS[g.tm_mon - 1]} {g.tm_year} "
        f"{g.tm_hour:02d}:{g.tm_min:02d}:{g.tm_sec:02d} {zone}"
    )


def generate(n: int, seed: int = 5256) -> list[tuple[float, bytes]]:
    """
    C{n} realistic messages (LF line ends) with their INTERNALDATEs: about a
    third start a thread, the rest reply to a recent message (References and
    In-Reply-To, sometimes only one of them, sometimes to a message not in
    the mailbox), subjects with Re:/Fwd:/[list] markers and encoded-words,
    dates in several zones (a few missing or invalid), some Cc.
    """
    import random

    rng = random.Random(seed)
    sent: list[tuple[str, str, list[str]]] = []  # (message-id, base subject, references)
    out = []
    t = 1_700_000_000.0
    i = -1
    while len(out) < n:
        i += 1
        t += rng.choice([0, 30, 60, 120, 600, 3600])
        mid = f"<{i}.{seed}@gen.test>" if rng.random() > 0.003 or not sent else sent[-1][0]
        headers = [("From", _address(rng, i)), ("To", _address(rng, i + 1))]
        if rng.random() < 0.2:
            headers.append(("Cc", _address(rng, i + 2)))
        refs: list[str] = []
        if sent and rng.random() < 0.65:
            parent = sent[max(0, len(sent) - 1 - int(rng.expovariate(0.05)))]
            base = parent[1]
            refs = (parent[2] + [parent[0]])[-12:]
            marker = rng.choice(["Re: ", "Re: ", "RE: ", "Re[2]: ", "Fwd: ", "[list] Re: "])
            subject = marker + base
            if rng.random() < 0.1:
                subject = "Re: " + subject
        else:
            base = rng.choice(_TOPICS) + (f" #{rng.randint(1, 50)}" if rng.random() < 0.5 else "")
            subject = ("[list] " if rng.random() < 0.2 else "") + base
        if not subject.isascii() and rng.random() < 0.7:
            subject = _encoded(subject)
        headers.append(("Subject", subject))
        date = _date(rng, t - rng.randint(0, 300))
        if date is not None:
            headers.append(("Date", date))
        headers.append(("Message-ID", mid))
        if refs:
            r = rng.random()
            if r < 0.8:
                headers.append(("References", " ".join(refs)))
            if r > 0.1:
                headers.append(("In-Reply-To", refs[-1]))
        sent.append((mid, base, refs))
        if rng.random() < 0.03:
            continue  # referenced later, never stored: a missing parent
        head = "\n".join(f"{k}: {v}" for k, v in headers).encode("utf-8")
        body = b"line of text for the body\n" * rng.randint(5, 120)
        out.append((t, head + b"\n\n" + body))
    return out


def generated_mbox(n: int, seed: int = 5256) -> bytes:
    """L{generate}'s messages as an mbox file (no body line starts with "From ")."""
    parts = []
    for t, msg in generate(n, seed):
        stamp = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(t)).encode()
        parts.append(b"From sender@example.test " + stamp + b"\n" + msg + b"\n")
    return b"".join(parts)
