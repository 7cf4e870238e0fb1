"""The password file: format, atomic replacement, mode, reload, verify off the reactor."""

from __future__ import annotations

import os
import stat

import pytest
from argon2 import PasswordHasher
from argon2.profiles import CHEAPEST
from twisted.internet import defer
from zope.interface.verify import verifyObject

from mailsrv.auth.passwd import PasswordFile, PasswordFileError, parse_lines
from mailsrv.interfaces import IPasswordDatabase


def cheap() -> PasswordHasher:
    return PasswordHasher.from_parameters(CHEAPEST)


def result(d: defer.Deferred):
    out = []
    d.addBoth(out.append)
    assert out, "Deferred did not fire"
    return out[0]


@pytest.fixture
def pf(tmp_path):
    return PasswordFile(tmp_path / "sub" / "passwd", hasher=cheap())


def test_interface(pf):
    verifyObject(IPasswordDatabase, pf)


def test_add_writes_argon2id_line_mode_0600(pf):
    assert pf.add_user("Alice@Example.TEST", "s3cret") == "Alice@example.test"
    text = pf.path.read_text()
    lines = text.splitlines()
    assert len(lines) == 1
    address, h = lines[0].split(":", 1)
    assert address == "Alice@example.test"
    assert h.startswith("$argon2id$")
    assert "s3cret" not in text
    assert stat.S_IMODE(os.stat(pf.path).st_mode) == 0o600
    # no temp files left behind
    assert sorted(p.name for p in pf.path.parent.iterdir()) == ["passwd", "passwd.lock"]


def test_verify_and_has_user(pf):
    pf.add_user("alice@example.test", "s3cret")
    assert pf.has_user("alice@EXAMPLE.test")
    assert pf.has_user("ALICE@example.test")  # local part matched in any case
    assert pf.lookup("ALICE@EXAMPLE.test") == "alice@example.test"
    assert pf.lookup("bob@example.test") is None
    assert result(pf.verify("ALICE@example.test", "s3cret")) is True
    assert not pf.has_user("bob@example.test")
    assert not pf.has_user("not an address")
    assert result(pf.verify("alice@Example.Test", "s3cret")) is True
    assert result(pf.verify("alice@example.test", b"s3cret")) is True
    assert result(pf.verify("alice@example.test", "wrong")) is False
    assert result(pf.verify("bob@example.test", "s3cret")) is False
    assert result(pf.verify("garbage", "s3cret")) is False


def test_unknown_user_is_checked_against_a_dummy_hash(pf):
    calls = []

    class Spy(PasswordHasher):
        def verify(self, h, p):
            calls.append(h)
            return super().verify(h, p)

    pf._hasher = Spy.from_parameters(CHEAPEST)
    assert result(pf.verify("bob@example.test", "x")) is False
    assert len(calls) == 1 and calls[0].startswith("$argon2id$")


def test_add_existing_passwd_del(pf):
    pf.add_user("alice@example.test", "one")
    with pytest.raises(KeyError):
        pf.add_user("alice@example.test", "two")
    pf.set_password("alice@example.test", "two")
    assert result(pf.verify("alice@example.test", "two")) is True
    assert result(pf.verify("alice@example.test", "one")) is False
    with pytest.raises(KeyError):
        pf.set_password("bob@example.test", "x")
    pf.add_user("bob@example.test", "b")
    assert pf.users() == ["alice@example.test", "bob@example.test"]
    pf.delete_user("alice@example.test")
    assert pf.users() == ["bob@example.test"]
    with pytest.raises(KeyError):
        pf.delete_user("alice@example.test")


def test_bad_addresses_refused(pf):
    for bad in [
        "nolocal",
        "@example.test",
        "a:b@example.test",
        "a b@example.test",
        "../x@example.test",
    ]:
        with pytest.raises(ValueError):
            pf.add_user(bad, "x")
    assert not pf.path.exists()


def test_reload_when_file_replaced(pf, tmp_path):
    pf.add_user("alice@example.test", "a")
    assert pf.users() == ["alice@example.test"]
    other = PasswordFile(pf.path, hasher=cheap())  # another process: the CLI
    other.add_user("bob@example.test", "b")
    assert pf.has_user("bob@example.test")
    other.delete_user("alice@example.test")
    assert not pf.has_user("alice@example.test")
    pf.path.unlink()
    assert pf.users() == []


def test_comments_unknown_fields_and_dovecot_scheme_kept(pf):
    h = cheap().hash("pw")
    pf.path.parent.mkdir(parents=True)
    pf.path.write_text(
        f"# users\n\ncarol@example.test:{{ARGON2ID}}{h}:1000:1000::/home/c\nbroken line\n"
    )
    assert pf.users() == ["carol@example.test"]
    assert result(pf.verify("carol@example.test", "pw")) is True
    pf.add_user("dave@example.test", "d")
    lines = pf.path.read_text().splitlines()
    assert lines[0] == "# users"
    assert lines[2] == f"carol@example.test:{{ARGON2ID}}{h}:1000:1000::/home/c"
    assert lines[3] == "broken line"
    assert lines[4].startswith("dave@example.test:$argon2id$")


def test_parse_lines_reports_bad_lines():
    users, bad = parse_lines("a@b.c:$h\nnocolon\nx@y.z:\n:$h\n")
    assert users == {"a@b.c": "$h"}
    assert bad == [2, 3, 4]


def test_crash_during_write_leaves_old_file(pf, monkeypatch):
    pf.add_user("alice@example.test", "a")
    before = pf.path.read_bytes()

    def boom(fd):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        pf.add_user("bob@example.test", "b")
    monkeypatch.undo()
    assert pf.path.read_bytes() == before
    assert sorted(p.name for p in pf.path.parent.iterdir()) == ["passwd", "passwd.lock"]


def test_verify_runs_in_threadpool(tmp_path):
    from twisted.internet.testing import MemoryReactor

    class Pool:
        def __init__(self):
            self.calls = []

        def callInThreadWithCallback(self, onResult, f, *a, **kw):
            self.calls.append(f)
            onResult(True, f(*a, **kw))

    class R(MemoryReactor):
        def callFromThread(self, f, *a, **kw):
            f(*a, **kw)

    pool = Pool()
    pf = PasswordFile(tmp_path / "passwd", R(), pool, hasher=cheap())
    pf.add_user("alice@example.test", "a")
    assert result(pf.verify("alice@example.test", "a")) is True
    assert len(pool.calls) == 1


def test_at_most_two_checks_at_once(tmp_path):
    from twisted.internet.testing import MemoryReactor

    class Pool:
        def __init__(self):
            self.held = []

        def callInThreadWithCallback(self, onResult, f, *a, **kw):
            self.held.append(lambda: onResult(True, f(*a, **kw)))

    class R(MemoryReactor):
        def callFromThread(self, f, *a, **kw):
            f(*a, **kw)

    pool = Pool()
    pf = PasswordFile(tmp_path / "passwd", R(), pool, hasher=cheap())
    pf.add_user("alice@example.test", "a")
    results = [pf.verify("alice@example.test", "a" if i % 2 else "b") for i in range(5)]
    assert len(pool.held) == 2
    while pool.held:
        pool.held.pop(0)()
    assert [result(d) for d in results] == [False, True, False, True, False]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give files away")
def test_root_keeps_the_servers_ownership(pf):
    pf.add_user("alice@example.test", "a")
    os.chown(pf.path, 5000, 5001)
    pf.add_user("bob@example.test", "b")
    st = os.stat(pf.path)
    assert (st.st_uid, st.st_gid) == (5000, 5001)
    assert stat.S_IMODE(st.st_mode) == 0o600
    other = pf.path.parent.parent / "fresh"
    other.mkdir()
    os.chown(other, 5002, 5003)
    fresh = PasswordFile(other / "passwd", hasher=cheap())
    fresh.add_user("carol@example.test", "c")
    st = os.stat(fresh.path)
    assert (st.st_uid, st.st_gid) == (5002, 5003)


def test_one_user_whatever_the_case(pf):
    assert pf.add_user("Bob@example.test", "one") == "Bob@example.test"
    with pytest.raises(KeyError) as e:
        pf.add_user("bob@EXAMPLE.test", "two")
    assert e.value.args == ("Bob@example.test",)
    assert pf.users() == ["Bob@example.test"]
    assert pf.set_password("BOB@example.test", "three") == "Bob@example.test"
    assert result(pf.verify("bob@example.test", "three")) is True
    assert pf.delete_user("bOB@example.test") == "Bob@example.test"
    assert pf.users() == []


def test_two_spellings_in_the_file_resolve_to_the_first(pf):
    h = pf.hash_password("pw")
    pf.path.parent.mkdir(parents=True, exist_ok=True)
    pf.path.write_text(f"Carol@example.test:{h}\ncarol@example.test:{h}\n")
    assert pf.lookup("CAROL@example.test") == "Carol@example.test"
    assert pf.lookup("carol@example.test") == "Carol@example.test"


def test_unreadable_file_is_an_error_not_an_empty_table(pf):
    pf.path.parent.mkdir(parents=True)
    pf.path.mkdir()  # the server cannot read it (root is not stopped by chmod 000)
    with pytest.raises(PasswordFileError):
        pf.lookup("alice@example.test")
    with pytest.raises(PasswordFileError):
        pf.has_user("alice@example.test")
    assert isinstance(result(pf.verify("alice@example.test", "s3cret")).value, PasswordFileError)


def test_a_missing_file_is_no_users(pf):
    assert pf.lookup("alice@example.test") is None


def test_unreadable_later_keeps_the_last_good_copy(pf):
    pf.add_user("alice@example.test", "s3cret")
    assert pf.lookup("alice@example.test") == "alice@example.test"
    os.rename(pf.path, pf.path.with_name("moved"))
    pf.path.mkdir()
    assert pf.lookup("alice@example.test") == "alice@example.test"


def test_utf8_local_parts_and_idn_domains_are_one_user(pf):
    import unicodedata

    from mailsrv.store.names import user_dir

    # RFC 6531: a UTF-8 local part; the IDN domain is stored as A-labels (RFC 5890).
    assert pf.add_user("jösé@Bücher.example", "pw") == "jösé@xn--bcher-kva.example"
    assert "jösé@xn--bcher-kva.example:" in pf.path.read_text(encoding="utf-8")
    for spelling in (
        "jösé@bücher.example",
        "JÖSÉ@xn--bcher-kva.example",
        unicodedata.normalize("NFD", "jösé@bücher.example"),  # decomposed: the same name (NFC)
    ):
        assert pf.lookup(spelling) == "jösé@xn--bcher-kva.example"
    assert result(pf.verify("Jösé@BÜCHER.example", "pw")) is True
    with pytest.raises(KeyError):
        pf.add_user("JÖSÉ@bücher.example", "again")
    # One folder on disk, named by the stored spelling.
    assert user_dir(pf.path.parent, "JÖSÉ@bücher.example".lower()) == (
        pf.path.parent / "xn--bcher-kva.example" / "jösé"
    )
    for bad in ("a@bü_cher.example", "a\udcff@example.test", "jö sé@example.test"):
        with pytest.raises(ValueError):
            pf.add_user(bad, "pw")
