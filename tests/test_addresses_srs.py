"""
The Sender Rewriting Scheme (L{mailsrv.addresses.srs}): forward then reverse,
the case of local parts, SRS1 chains over several hops, forged, expired and
malformed addresses refused, and the secret in the data folder.
"""

from __future__ import annotations

import random
import stat
import string

import pytest
import srslib
from twisted.internet.task import Clock

from mailsrv.addresses.srs import (
    HASH_LENGTH,
    MAX_AGE_DAYS,
    SECRET_BYTES,
    ExpiredSRSAddress,
    ForgedSRSAddress,
    MalformedSRSAddress,
    SRSRewriter,
    SRSSecretError,
    load_or_create_secret,
)

DAY = 86400.0
# A fixed moment (2026-05-30 UTC): the time stamps do not depend on today.
T0 = 1_780_100_000.0


def rewriter(secret: bytes = b"k" * 32, domain: str = "srs.example.test", clock=None):
    clock = clock or _clock()
    return SRSRewriter(secret, domain, now=clock.seconds)


def _clock(t: float = T0) -> Clock:
    c = Clock()
    c.advance(t)
    return c


def test_forward_then_reverse_gives_the_original():
    srs = rewriter()
    out = srs.forward("alice@origin.test")
    local, _, domain = out.rpartition("@")
    assert domain == "srs.example.test"
    assert local.startswith("SRS0=")
    assert local.endswith("=origin.test=alice")
    assert srs.is_srs(out)
    assert srs.reverse(out) == "alice@origin.test"


def test_the_null_sender_is_not_rewritten():
    assert rewriter().forward("") == ""


@pytest.mark.parametrize("bad", ["nobody", "@origin.test", "alice@"])
def test_forward_refuses_what_is_not_an_address(bad):
    with pytest.raises(MalformedSRSAddress):
        rewriter().forward(bad)


def test_case_of_the_local_part_is_kept_and_a_changed_case_still_verifies():
    srs = rewriter()
    out = srs.forward("Alice.Smith@Origin.Test")
    assert srs.reverse(out) == "Alice.Smith@Origin.Test"
    # A relay on the way may fold the case of the whole address: the hash
    # still verifies (compared without regard to case, as libsrs2 does).
    assert srs.reverse(out.lower()) == "alice.smith@origin.test"
    assert srs.reverse(out.upper()) == "ALICE.SMITH@ORIGIN.TEST"


def test_srs1_chains_back_through_the_first_hop():
    first = rewriter(b"a" * 32, "a.test")
    second = rewriter(b"b" * 32, "b.test")
    third = rewriter(b"c" * 32, "c.test")

    srs0 = first.forward("alice@origin.test")
    srs1 = second.forward(srs0)
    assert srs1.startswith("SRS1=")
    assert srs1.endswith("=a.test==" + srs0.split("=", 1)[1].split("@")[0] + "@b.test")
    # A further hop makes a new SRS1 that still names the first hop.
    srs1_again = third.forward(srs1)
    assert srs1_again.startswith("SRS1=")
    assert "=a.test==" in srs1_again and srs1_again.endswith("@c.test")

    # Bounces: the last hop sends back to the first hop's SRS0 address, which
    # the first hop reverses to the original sender.
    assert third.reverse(srs1_again) == srs0
    assert second.reverse(srs1) == srs0
    assert first.reverse(srs0) == "alice@origin.test"
    # An SRS1 address made by another hop's secret is not ours.
    with pytest.raises(ForgedSRSAddress):
        second.reverse(srs1_again)


def test_a_forged_hash_is_refused():
    srs = rewriter()
    out = srs.forward("alice@origin.test")
    prefix, hash_, rest = out.split("=", 2)
    other = "A" if hash_[0].upper() != "A" else "B"
    with pytest.raises(ForgedSRSAddress, match="bad hash"):
        srs.reverse(f"{prefix}={other}{hash_[1:]}={rest}")
    # The hash covers the original sender: it cannot be swapped.
    with pytest.raises(ForgedSRSAddress):
        srs.reverse(out.replace("=alice@", "=mallory@"))
    # Made with another secret.
    with pytest.raises(ForgedSRSAddress):
        rewriter(b"x" * 32).reverse(out)


def test_an_expired_time_stamp_is_refused():
    clock = _clock()
    srs = rewriter(clock=clock)
    out = srs.forward("alice@origin.test")
    # Good on the day it is made and the MAX_AGE_DAYS - 1 days after.
    clock.advance((MAX_AGE_DAYS - 1) * DAY)
    assert srs.reverse(out) == "alice@origin.test"
    clock.advance(DAY)
    with pytest.raises(ExpiredSRSAddress, match=f"older than {MAX_AGE_DAYS} days"):
        srs.reverse(out)


def test_a_time_stamp_from_the_future_is_refused():
    clock = _clock()
    srs = rewriter(clock=clock)
    late = SRSRewriter(b"k" * 32, "srs.example.test", now=lambda: T0 + 2 * DAY)
    with pytest.raises(ExpiredSRSAddress):
        srs.reverse(late.forward("alice@origin.test"))


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "garbage",
        "alice@origin.test",
        "SRS0=nope@srs.example.test",
        "SRS1=a=b=c@srs.example.test",
        "SRS0=====@srs.example.test",
    ],
)
def test_garbage_is_refused(garbage):
    with pytest.raises(MalformedSRSAddress):
        rewriter().reverse(garbage)


def _hash(address: str) -> str:
    """The hash field of an SRS0 or SRS1 address."""
    return address.split("=")[1]


def _with_hash(address: str, new: str) -> str:
    tag, _, rest = address.split("=", 2)
    return f"{tag}={new}={rest}"


def test_the_hash_is_eight_characters_and_only_that_length_is_accepted():
    srs = rewriter()
    out = srs.forward("alice@origin.test")
    full = _hash(out)
    assert len(full) == HASH_LENGTH == 8
    # A prefix of our hash (a forger's one-character guess is right 1 time in
    # 32) or a longer one is not our hash.
    for n in range(1, HASH_LENGTH):
        with pytest.raises(ForgedSRSAddress, match="bad hash"):
            srs.reverse(_with_hash(out, full[:n]))
    with pytest.raises(ForgedSRSAddress, match="bad hash"):
        srs.reverse(_with_hash(out, full + "A"))
    assert srs.reverse(_with_hash(out, full.swapcase())) == "alice@origin.test"


def test_a_one_character_hash_is_never_accepted():
    # Every base64 character: one of them is our hash's first character.
    srs = rewriter()
    stamp = _stamp()
    for c in string.ascii_letters + string.digits + "+/":
        with pytest.raises(ForgedSRSAddress):
            srs.reverse(f"SRS0={c}={stamp}=victim.example=anyone@srs.example.test")
        with pytest.raises(ForgedSRSAddress):
            srs.reverse(
                f"SRS1={c}=victim.example==abcd={stamp}=victim.example=anyone@srs.example.test"
            )


def test_four_character_hashes_of_earlier_builds_are_refused():
    old = srslib.SRS(b"k" * 32, hash_length=4)
    old._time_fn = lambda: T0
    with pytest.raises(ForgedSRSAddress):
        rewriter().reverse(old.forward("alice@origin.test", "srs.example.test"))


def test_random_guesses_of_a_hash_are_all_refused():
    # Only our full length counts, and at that length a guess is right once in
    # 2**40 (module docstring): 10,000 guesses of 1 to 12 characters find nothing.
    srs = rewriter()
    stamp = _stamp()
    guess = random.Random(10)
    alphabet = string.ascii_letters + string.digits + "+/"
    for _ in range(10_000):
        h = "".join(guess.choices(alphabet, k=guess.randint(1, 12)))
        with pytest.raises(ForgedSRSAddress):
            srs.reverse(f"SRS0={h}={stamp}=victim.example=anyone@srs.example.test")


def _stamp(t: float = T0) -> str:
    return srslib.SRS(b"x").generate_ts(t)


def test_srs1_expires_with_the_first_hops_time_stamp():
    clock = _clock()
    first = rewriter(b"a" * 32, "a.test", clock=clock)
    ours = rewriter(b"b" * 32, "b.test", clock=clock)
    srs1 = ours.forward(first.forward("alice@origin.test"))
    clock.advance((MAX_AGE_DAYS - 1) * DAY)
    assert ours.reverse(srs1).startswith("SRS0=")
    clock.advance(DAY)
    with pytest.raises(ExpiredSRSAddress, match=f"older than {MAX_AGE_DAYS} days"):
        ours.reverse(srs1)


def test_srs1_with_our_hash_over_an_old_first_hop_address_is_refused():
    # Made with our secret (a hop forwarded it), but its first hop's address
    # was 30 days old: a bounce to it is refused like an old SRS0 one.
    first = rewriter(b"a" * 32, "a.test", clock=_clock(T0 - 30 * DAY))
    ours = rewriter()
    with pytest.raises(ExpiredSRSAddress):
        ours.reverse(ours.forward(first.forward("alice@origin.test")))


def test_srs1_with_our_hash_but_no_first_hop_time_stamp_is_refused():
    maker = srslib.SRS(b"k" * 32, hash_length=HASH_LENGTH)
    address = maker.generate_srs1_address("victim.example", "=x", "srs.example.test")
    assert address.startswith("SRS1=") and address.endswith("=victim.example==x@srs.example.test")
    with pytest.raises(MalformedSRSAddress):
        rewriter().reverse(address)


def test_the_tag_takes_any_case_and_each_separator():
    srs = rewriter()
    out = srs.forward("alice@origin.test")
    for tag in ("SRS0=", "srs0+", "Srs0-"):
        assert srs.reverse(tag + out[5:]) == "alice@origin.test"
    # Another host's SRS0 with "-" keeps it through our SRS1 and back.
    theirs = "SRS0-" + rewriter(b"a" * 32, "a.test").forward("bob@origin.test")[5:]
    srs1 = srs.forward(theirs)
    assert srs1.startswith("SRS1=") and "=a.test=-" in srs1
    assert srs.reverse(srs1) == theirs
    assert srs.reverse(srs1.replace("SRS1=", "srs1+", 1)) == theirs


def test_an_address_that_only_looks_like_srs_is_forwarded_as_srs0():
    srs = rewriter()
    out = srs.forward("SRS0+nothing@other.test")
    assert out.startswith("SRS0=")
    assert srs.reverse(out) == "SRS0+nothing@other.test"


def test_is_srs():
    srs = rewriter()
    out = srs.forward("alice@origin.test")
    assert srs.is_srs(out)
    assert srs.is_srs(out.lower())
    assert srs.is_srs(rewriter(b"z" * 32, "b.test").forward(out))
    # Genuine or not is for reverse to say.
    assert srs.is_srs("SRS0=xxxx=AB=origin.test=alice@srs.example.test")
    assert srs.is_srs("srs1+anything@srs.example.test")
    for address in ("alice@origin.test", "srs0@origin.test", "SRS0x@a.test", "garbage", ""):
        assert not srs.is_srs(address)


def test_an_empty_secret_is_refused_by_the_rewriter():
    with pytest.raises(SRSSecretError):
        SRSRewriter(b"", "srs.example.test")


def test_secret_is_created_0600_and_reused(tmp_path):
    path = tmp_path / "srs.secret"
    secret = load_or_create_secret(path)
    assert len(secret) == SECRET_BYTES
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == secret
    mtime = path.stat().st_mtime_ns
    assert load_or_create_secret(path) == secret
    assert path.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == ["srs.secret"]
    # Another data folder gets another secret.
    assert load_or_create_secret(tmp_path / "other.secret") != secret


def test_an_existing_secret_is_read_as_it_is(tmp_path):
    path = tmp_path / "srs.secret"
    path.write_bytes(b"an administrator's own secret")
    assert load_or_create_secret(path) == b"an administrator's own secret"


def test_an_empty_secret_file_is_an_error(tmp_path):
    path = tmp_path / "srs.secret"
    path.write_bytes(b"")
    with pytest.raises(SRSSecretError, match="is empty"):
        load_or_create_secret(path)
    assert path.read_bytes() == b""


def test_an_unreadable_secret_is_an_error(tmp_path):
    path = tmp_path / "srs.secret"
    path.mkdir()
    with pytest.raises(SRSSecretError, match="cannot read"):
        load_or_create_secret(path)


def test_a_secret_that_cannot_be_created_is_an_error(tmp_path):
    with pytest.raises(SRSSecretError, match="cannot create"):
        load_or_create_secret(tmp_path / "no-such-folder" / "srs.secret")
