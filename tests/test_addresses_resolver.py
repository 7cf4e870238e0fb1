"""
The address rules of the routing step (L{mailsrv.addresses.resolver}): each
rule alone and in the documented order, with a real aliases file and a real
password file; SRS forward and reverse; send-as (L{AddressRules.owned_by});
the aliases file watched and re-read off the reactor.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from mailsrv.addresses.aliases import MAX_EXPANSION_DEPTH, AliasTable
from mailsrv.addresses.resolver import (
    SETTLE_TIME,
    AddressRules,
    AddressSettings,
    AliasWatcher,
    Final,
    Resolved,
)
from mailsrv.addresses.srs import SRSRewriter
from mailsrv.auth.passwd import PasswordFile

DAY = 86400.0
T0 = 1_780_100_000.0  # a fixed moment: SRS time stamps do not depend on today
SRS_DOMAIN = "mx.example.test"
# bücher.example, as the config keeps it (A-labels, UTS-46).
IDN = "xn--bcher-kva.example"
DOMAINS = frozenset({"example.test", "other.test", IDN})
USERS = (
    "alice@example.test",
    "bob@example.test",
    "Dave.Smith@example.test",
    "archive@example.test",
    "admin@example.test",
    "first-last@example.test",
    "carol@other.test",
    "alice@other.test",
    f"erik@{IDN}",
    "frida@bücher.example",  # the domain as its U-labels
    "straße@example.test",  # two users, told apart as the password file does
    "strasse@example.test",
)


def user(address: str, detail: str | None = None, mailing_list: str | None = None) -> Final:
    return Final(address, True, detail, False, mailing_list)


def remote(address: str, forwarded: bool = True) -> Final:
    return Final(address, False, None, forwarded)


class Setup:
    """Address rules on files in a temporary folder; C{clock} drives SRS time stamps."""

    def __init__(self, tmp_path: Path, aliases: str = "", **settings: Any) -> None:
        self.tmp_path = tmp_path
        passwd = tmp_path / "passwd"
        passwd.write_text("".join(f"{u}:{{PLAIN}}x\n" for u in USERS))
        self.passwords = PasswordFile(passwd)
        self.aliases_path = tmp_path / "aliases"
        self.aliases_path.write_text(aliases, encoding="utf-8")
        self.table = AliasTable(self.aliases_path, DOMAINS)
        assert self.table.problems == []
        self.clock = Clock()
        self.clock.advance(T0)
        settings.setdefault("domains", DOMAINS)
        settings.setdefault("srs_domain", SRS_DOMAIN)
        self.srs = SRSRewriter(b"s" * 32, settings["srs_domain"], now=self.clock.seconds)
        self.rules = AddressRules(AddressSettings(**settings), aliases=self.table, srs=self.srs)

    def resolve(self, address: str) -> Resolved:
        return self.rules.resolve(address, self.passwords)

    def finals(self, address: str) -> tuple[Final, ...]:
        result = self.resolve(address)
        assert result.error is None and result.temporary is None, result
        return result.finals

    def owned_by(self, address: str, login: str = "alice@example.test") -> bool:
        return self.rules.owned_by(address, login, self.passwords)


# --- the aliases file ------------------------------------------------------------------


def test_an_alias_reaches_a_user_several_users_or_an_external_address(tmp_path):
    s = Setup(tmp_path, "sales: alice\nteam: alice, bob\nfriend: x.y@Remote.test\n")
    assert s.finals("sales@example.test") == (user("alice@example.test"),)
    assert s.finals("team@example.test") == (
        user("alice@example.test"),
        user("bob@example.test"),
    )
    # Forwarded to another server: the copy is to get an SRS sender.
    assert s.finals("friend@example.test") == (remote("x.y@remote.test"),)
    assert s.finals("SALES@Example.Test") == (user("alice@example.test"),)


def test_a_bare_name_is_in_every_local_domain_and_a_bare_target_in_the_same_domain(tmp_path):
    s = Setup(tmp_path, "sales: alice\n")
    assert s.finals("sales@example.test") == (user("alice@example.test"),)
    assert s.finals("sales@other.test") == (user("alice@other.test"),)
    # A bare name in a domain with no such user: nobody there.
    result = Setup(tmp_path, "help: carol\n").resolve("help@example.test")
    assert result.finals == () and result.unknown == ("carol@example.test",)


def test_a_quoted_local_part_is_the_local_part_it_quotes(tmp_path):
    # RFC 5321 4.1.2: RCPT TO:<"john doe"@example.test> names the alias "john doe".
    s = Setup(tmp_path, '"john doe": alice\n')
    assert s.finals('"john doe"@example.test') == (user("alice@example.test"),)
    assert s.finals('"john\\ doe"@example.test') == (user("alice@example.test"),)
    assert s.finals('"alice"@example.test') == (user("alice@example.test"),)
    assert s.resolve('""@example.test').error_kind == "syntax"


def test_a_full_address_applies_to_its_domain_only(tmp_path):
    s = Setup(tmp_path, "info@other.test: bob@example.test\n")
    assert s.finals("info@other.test") == (user("bob@example.test"),)
    assert s.resolve("info@example.test").finals == ()


def test_a_domain_alias_is_the_same_local_part_in_the_domain_it_stands_for(tmp_path):
    s = Setup(
        tmp_path,
        "sales: bob\nalice@example.org: bob\n",
        domain_aliases={"example.org": "example.test"},
    )
    assert s.rules.is_local_domain("EXAMPLE.org")
    assert s.finals("dave.smith@example.org") == (user("Dave.Smith@example.test"),)
    assert s.finals("sales@example.org") == (user("bob@example.test"),)
    # An alias of the alias domain itself wins over the rewrite.
    assert s.finals("alice@example.org") == (user("bob@example.test"),)
    assert s.resolve("nobody@example.org") == Resolved(unknown=("nobody@example.test",))


def test_the_aliases_file_comes_before_the_users(tmp_path):
    # As Postfix's virtual_alias_maps: an alias of a user's address takes its mail.
    s = Setup(tmp_path, "alice: bob\n")
    assert s.finals("alice@example.test") == (user("bob@example.test"),)
    assert s.finals("bob@example.test") == (user("bob@example.test"),)


def test_a_user_comes_before_sub_addressing_roles_and_the_catch_all(tmp_path):
    s = Setup(
        tmp_path,
        postmaster="admin@example.test",
        catch_all={"example.test": "archive@example.test"},
    )
    # first-last is a user, not first with the detail "last".
    s2 = Setup(tmp_path, recipient_delimiter="+-")
    assert s2.finals("first-last@example.test") == (user("first-last@example.test"),)
    assert s.finals("alice@example.test") == (user("alice@example.test"),)
    assert s.finals("alice+x@example.test") == (user("alice@example.test", "x"),)
    assert s.finals("abuse@example.test") == (user("admin@example.test"),)
    assert s.finals("whoever@example.test") == (user("archive@example.test"),)


def test_sub_addressing_with_several_delimiters(tmp_path):
    s = Setup(tmp_path, "my-list: bob\nsales: carol@other.test\n", recipient_delimiter="+-")
    assert s.finals("alice+lists@example.test") == (user("alice@example.test", "lists"),)
    assert s.finals("alice-lists@example.test") == (user("alice@example.test", "lists"),)
    # Cut at the first delimiter; what follows is the detail, delimiters and all.
    assert s.finals("alice+a-b@example.test") == (user("alice@example.test", "a-b"),)
    # An empty detail is the INBOX.
    assert s.finals("alice+@example.test") == (user("alice@example.test"),)
    # An alias whose name holds a delimiter is that alias, not "my" with a detail.
    assert s.finals("my-list@example.test") == (user("bob@example.test"),)
    # An alias with a detail is the alias.
    assert s.finals("sales+promo@example.test") == (user("carol@other.test"),)
    assert s.resolve("nobody+x@example.test").finals == ()
    assert s.resolve("+x@example.test").finals == ()


def test_no_delimiter_means_no_sub_addressing(tmp_path):
    s = Setup(tmp_path, recipient_delimiter="")
    assert s.resolve("alice+lists@example.test").finals == ()


def test_postmaster_and_abuse_exist_in_every_local_domain(tmp_path):
    s = Setup(
        tmp_path,
        postmaster="admin@example.test",
        domain_aliases={"example.org": "example.test"},
    )
    for address in (
        "postmaster@example.test",
        "Postmaster@other.test",
        "POSTMASTER@example.org",
        "abuse@other.test",
        "abuse@example.org",
        f"postmaster@{IDN}",
        "postmaster+x@other.test",
    ):
        assert s.finals(address) == (user("admin@example.test"),), address
    # Not configured: nobody (unless an alias or a user takes it).
    assert Setup(tmp_path).resolve("postmaster@other.test").finals == ()
    aliased = Setup(tmp_path, "abuse: bob@example.test\n", postmaster="admin@example.test")
    assert aliased.finals("abuse@other.test") == (user("bob@example.test"),)


def test_the_catch_all_takes_unknown_addresses_of_its_domain_only(tmp_path):
    s = Setup(tmp_path, "sales: bob\n", catch_all={"other.test": "carol@other.test"})
    assert s.finals("whoever@other.test") == (user("carol@other.test"),)
    assert s.finals("alice@other.test") == (user("alice@other.test"),)
    # An alias member that is nobody in that domain is the catch-all's too.
    assert s.finals("sales@other.test") == (user("carol@other.test"),)
    assert s.resolve("whoever@example.test").finals == ()
    # Off by default.
    assert Setup(tmp_path).resolve("whoever@other.test").finals == ()


def test_the_catch_all_of_an_alias_domain_takes_what_the_rewrite_does_not(tmp_path):
    # The config accepts a catch-all for a domain alias: the addresses of
    # example.org that are nobody in example.test are its.
    s = Setup(
        tmp_path,
        "sales: bob\n",
        domain_aliases={"example.org": "example.test", "example.net": "example.test"},
        catch_all={"example.org": "archive@example.test", "example.test": "admin@example.test"},
    )
    assert s.finals("alice@example.org") == (user("alice@example.test"),)
    assert s.finals("sales@example.org") == (user("bob@example.test"),)
    assert s.finals("alice+x@example.org") == (user("alice@example.test", "x"),)
    assert s.finals("whoever@example.org") == (user("archive@example.test"),)
    assert s.finals("whoever+x@example.org") == (user("archive@example.test"),)
    # Without its own, the catch-all of the domain it stands for.
    assert s.finals("whoever@example.net") == (user("admin@example.test"),)
    assert s.finals("whoever@example.test") == (user("admin@example.test"),)


# --- expansion: duplicates, loops, depth, unknown members ------------------------------


def test_a_user_reached_twice_is_listed_once_in_order(tmp_path):
    s = Setup(
        tmp_path, "team: bob, sales, alice, ALICE, x@remote.test, X@remote.test\nsales: alice\n"
    )
    assert s.finals("team@example.test") == (
        user("bob@example.test"),
        user("alice@example.test"),
        remote("x@remote.test"),
        # RFC 5321 2.4: another server's local parts may be case-sensitive.
        remote("X@remote.test"),
    )


def test_a_loop_is_an_error_not_a_hang(tmp_path):
    s = Setup(tmp_path, "a: b\nb: c\nc: a\n")
    result = s.resolve("a@example.test")
    assert result.finals == () and result.error_kind == "loop"
    assert "loop" in (result.error or "")


def test_an_alias_naming_itself_delivers_to_the_user(tmp_path):
    # local(8): "alice: alice, archive" keeps a copy for alice.
    s = Setup(tmp_path, "alice: alice, archive\n")
    assert s.finals("alice@example.test") == (
        user("alice@example.test"),
        user("archive@example.test"),
    )


def test_aliases_nested_too_deep_are_refused(tmp_path):
    n = MAX_EXPANSION_DEPTH + 2
    text = "".join(f"a{i}: a{i + 1}\n" for i in range(n)) + f"a{n}: alice\n"
    s = Setup(tmp_path, text)
    result = s.resolve("a0@example.test")
    assert result.finals == () and result.error_kind == "loop"
    assert "deeper" in (result.error or "")
    # Within the limit: fine.
    assert s.finals(f"a{n - MAX_EXPANSION_DEPTH + 1}@example.test") == (user("alice@example.test"),)


def test_unknown_members_are_reported_and_the_others_delivered(tmp_path):
    s = Setup(tmp_path, "team: ghost, alice, x@remote.test\n")
    result = s.resolve("team@example.test")
    assert result.finals == (user("alice@example.test"), remote("x@remote.test"))
    assert result.unknown == ("ghost@example.test",)
    assert result.error is None


def test_a_list_alias_marks_its_members(tmp_path):
    s = Setup(
        tmp_path,
        "staff: alice, x@remote.test, team\nteam: bob\n",
        lists={"staff@example.test": "Staff <staff.example.test>"},
    )
    assert s.finals("staff@example.test") == (
        user("alice@example.test", mailing_list="staff@example.test"),
        Final("x@remote.test", False, None, True, "staff@example.test"),
        user("bob@example.test", mailing_list="staff@example.test"),
    )
    assert s.rules.list_id("staff@example.test") == "Staff <staff.example.test>"
    assert s.finals("team@example.test") == (user("bob@example.test"),)
    assert s.rules.list_id(None) is None


# --- SRS -------------------------------------------------------------------------------


def test_forward_sender_rewrites_remote_senders_only(tmp_path):
    s = Setup(tmp_path, domain_aliases={"example.org": "example.test"})
    out = s.rules.forward_sender("carol@origin.test")
    assert out.startswith("SRS0=") and out.endswith(f"=origin.test=carol@{SRS_DOMAIN}")
    assert s.rules.forward_sender("") == ""  # RFC 5321 4.5.5: a bounce stays a bounce
    assert s.rules.forward_sender("alice@example.test") == "alice@example.test"
    assert s.rules.forward_sender("alice@example.org") == "alice@example.org"
    assert s.rules.forward_sender(out) == out  # one of ours already


def test_a_genuine_srs_address_goes_back_to_the_original_sender(tmp_path):
    s = Setup(tmp_path)
    srs = s.rules.forward_sender("Carol@origin.test")
    s.clock.advance(3 * DAY)
    assert s.finals(srs) == (remote("Carol@origin.test"),)


def test_a_forged_or_expired_srs_address_is_refused(tmp_path):
    s = Setup(tmp_path)
    srs = s.rules.forward_sender("carol@origin.test")
    local, _, domain = srs.partition("@")
    parts = local.split("=")
    parts[1] = "AAAA" if parts[1] != "AAAA" else "BBBB"
    forged = "=".join(parts) + "@" + domain
    result = s.resolve(forged)
    assert result.finals == () and result.error_kind == "srs"
    s.clock.advance(22 * DAY)
    result = s.resolve(srs)
    assert result.finals == () and result.error_kind == "srs"


def test_an_srs_domain_that_is_a_local_domain_still_reverses(tmp_path):
    # postsrsd's usual set-up: SRS addresses in the main mail domain.
    s = Setup(
        tmp_path,
        srs_domain="example.test",
        catch_all={"example.test": "archive@example.test"},
    )
    srs = s.rules.forward_sender("carol@origin.test")
    assert srs.endswith("@example.test")
    assert s.finals(srs) == (remote("carol@origin.test"),)
    # A forged one is refused, not taken by the catch-all.
    forged = srs.replace("SRS0=", "SRS0=x", 1)
    assert s.resolve(forged).error_kind == "srs"


# --- send-as ---------------------------------------------------------------------------


def test_owned_by(tmp_path):
    s = Setup(
        tmp_path,
        "me: alice\nshared: alice, bob\nhalf: alice, ghost\nmine: me\n",
        domain_aliases={"example.org": "example.test"},
    )
    assert s.owned_by("alice@example.test")
    assert s.owned_by("ALICE@Example.Test")
    assert s.owned_by("me@example.test")
    assert s.owned_by("mine@other.test") is False  # "me" there is alice@other.test
    assert s.owned_by("mine@example.test")
    assert s.owned_by("alice+lists@example.test")
    assert s.owned_by("alice@example.org")
    assert not s.owned_by("shared@example.test")
    assert not s.owned_by("half@example.test")
    assert not s.owned_by("bob@example.test")
    assert not s.owned_by("alice@remote.test")
    assert not s.owned_by(s.rules.forward_sender("alice@origin.test"))
    assert not s.owned_by("")


# --- international domains -------------------------------------------------------------


def test_idn_domains_compare_in_one_form(tmp_path):
    s = Setup(tmp_path, "info@bücher.example: erik\n")
    assert s.rules.is_local_domain("Bücher.example") and s.rules.is_local_domain(IDN)
    for domain in ("bücher.example", "BÜCHER.example", IDN, IDN.upper()):
        assert s.finals(f"erik@{domain}") == (user(f"erik@{IDN}"),), domain
        assert s.finals(f"info@{domain}") == (user(f"erik@{IDN}"),), domain


def test_a_user_stored_with_the_u_labels_of_its_domain_is_found(tmp_path):
    s = Setup(tmp_path, "books@bücher.example: frida\n")
    # The password file keeps the domain as A-labels, its one form.
    for domain in ("bücher.example", IDN, "BÜCHER.example"):
        assert s.finals(f"Frida@{domain}") == (user(f"frida@{IDN}"),), domain
        assert s.finals(f"books@{domain}") == (user(f"frida@{IDN}"),), domain
    assert s.owned_by("frida@bücher.example", f"frida@{IDN}")


# --- the aliases file is watched -------------------------------------------------------


class HeldPool:
    """A thread pool whose work runs when the test says (in the test's thread)."""

    def __init__(self) -> None:
        self.work: list[Any] = []

    def callInThreadWithCallback(self, on_result, func, *args, **kwargs):
        self.work.append((on_result, func, args, kwargs))

    def run(self) -> None:
        on_result, func, args, kwargs = self.work.pop(0)
        try:
            result = func(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class HeldReactor(Clock):
    """A clock whose callFromThread waits until the test runs it (the reactor's turn)."""

    def __init__(self) -> None:
        super().__init__()
        self.from_threads: list[Any] = []

    def callFromThread(self, f, *args, **kwargs):
        self.from_threads.append((f, args, kwargs))

    def run(self) -> None:
        while self.from_threads:
            f, args, kwargs = self.from_threads.pop(0)
            f(*args, **kwargs)


def written_earlier(path: Path, text: str, ago: float = 10.0) -> None:
    """Write C{path} as an editor did C{ago} seconds ago (it is whole by now)."""
    path.write_text(text)
    then = time.time() - ago
    os.utime(path, (then, then))


def test_a_file_being_written_is_taken_only_once_left_alone(tmp_path):
    # An editor that rewrites in place: the first look may see half the file,
    # whose missing aliases would be refused (550) until the next look.
    s = Setup(tmp_path, "sales: alice\nsupport: bob\n")
    reactor, pool = HeldReactor(), HeldPool()
    watcher = AliasWatcher(s.table, reactor, pool, interval=5.0)
    watcher.startService()
    pool.run()
    reactor.run()
    s.aliases_path.write_text("sales: alice\n")  # half way: support not written yet
    reactor.advance(5.0)
    pool.run()
    reactor.run()
    assert s.finals("support@example.test") == (user("bob@example.test"),)  # not taken
    written_earlier(s.aliases_path, "sales: alice\nsupport: carol@other.test\n")
    reactor.advance(SETTLE_TIME)  # looked at again shortly, not at the next interval
    pool.run()
    reactor.run()
    assert s.finals("support@example.test") == (user("carol@other.test"),)
    watcher.stopService()
    assert not reactor.getDelayedCalls()


def test_the_aliases_file_is_re_read_on_the_pool_and_swapped_on_the_reactor(tmp_path):
    s = Setup(tmp_path, "sales: alice\n")
    reactor, pool = HeldReactor(), HeldPool()
    watcher = AliasWatcher(s.table, reactor, pool, interval=5.0)
    watcher.startService()
    pool.run()  # the first look: nothing changed
    reactor.run()
    assert s.finals("sales@example.test") == (user("alice@example.test"),)

    written_earlier(s.aliases_path, "sales: bob\n# a longer file\n")
    reactor.advance(5.0)
    assert len(pool.work) == 1  # the read is the pool's work...
    assert s.finals("sales@example.test") == (user("alice@example.test"),)
    reactor.advance(5.0)
    assert len(pool.work) == 1  # ...one look at a time
    pool.run()
    assert s.finals("sales@example.test") == (user("alice@example.test"),)
    reactor.run()  # ...the new table is the reactor's
    assert s.finals("sales@example.test") == (user("bob@example.test"),)

    # A file that goes away keeps the aliases read before.
    s.aliases_path.unlink()
    reactor.advance(5.0)
    pool.run()
    reactor.run()
    assert s.finals("sales@example.test") == (user("bob@example.test"),)
    watcher.stopService()
    assert not reactor.getDelayedCalls()


@pytest.mark.parametrize("problem", ["bad line here\n", "x: |/bin/sh\n"])
def test_a_bad_line_in_a_changed_file_is_skipped_and_the_rest_applied(tmp_path, problem):
    s = Setup(tmp_path, "sales: alice\n")
    reactor, pool = HeldReactor(), HeldPool()
    watcher = AliasWatcher(s.table, reactor, pool, interval=5.0)
    watcher.startService()
    pool.run()
    reactor.run()
    written_earlier(s.aliases_path, "sales: bob\n" + problem)
    reactor.advance(5.0)
    pool.run()
    reactor.run()
    assert s.finals("sales@example.test") == (user("bob@example.test"),)
    assert len(s.table.problems) == 1 and ":2:" in s.table.problems[0]
    watcher.stopService()


def test_users_the_password_file_tells_apart_stay_apart(tmp_path):
    # casefold() would make straße and strasse one: the password file does not.
    s = Setup(tmp_path, "two: straße, strasse\n")
    assert s.finals("two@example.test") == (
        user("straße@example.test"),
        user("strasse@example.test"),
    )
    assert s.finals("STRASSE@example.test") == (user("strasse@example.test"),)
    assert not s.owned_by("strasse@example.test", "straße@example.test")
    assert not s.owned_by("straße@example.test", "strasse@example.test")
    assert s.owned_by("Straße@example.test", "straße@example.test")


def test_a_sub_address_never_files_into_a_special_use_folder(tmp_path):
    # No sender may put mail in the user's Sent, Drafts or Trash (RFC 6154 roles).
    s = Setup(tmp_path, protected_folders=frozenset({"sent", "drafts", "trash"}))
    assert s.finals("alice+Sent@example.test") == (user("alice@example.test"),)
    assert s.finals("alice+TRASH@example.test") == (user("alice@example.test"),)
    assert s.finals("alice+lists@example.test") == (user("alice@example.test", "lists"),)
