"""
The aliases file (L{mailsrv.addresses.aliases}): aliases(5) syntax, problems
reported with file and line, and expansion to final recipients.
"""

from __future__ import annotations

import os
from pathlib import Path

from mailsrv.addresses import aliases
from mailsrv.addresses.aliases import AliasTable, parse_aliases

DOMAINS = ["example.test", "example.org"]
USERS = {"alice@example.test", "bob@example.test", "carol@example.test", "alice@example.org"}


def is_user(address: str) -> bool:
    local, _, domain = address.rpartition("@")
    return f"{local.lower()}@{domain}" in USERS


def table(tmp_path: Path, text: str, domains: list[str] = DOMAINS) -> AliasTable:
    path = tmp_path / "aliases"
    path.write_text(text, encoding="utf-8")
    return AliasTable(path, domains)


def test_comments_blank_lines_and_continuation(tmp_path):
    t = table(
        tmp_path,
        "# a comment\n"
        "\n"
        "sales: alice,\n"
        "  bob,\n"
        "    # a comment inside does not end the entry\n"
        "\tcarol\n"
        "   \n"
        "team: bob # not a comment: part of the target\n",
    )
    assert t.entries[("sales", None)] == ("alice", "bob", "carol")
    # aliases(5): only a line that starts with "#" is a comment.
    assert t.problems == [
        f"{tmp_path / 'aliases'}:8: bad address 'bob # not a comment: part of the target';"
        " entry skipped"
    ]
    assert ("team", None) not in t.entries


def test_targets_need_commas_between_them(tmp_path):
    t = table(tmp_path, "sales: alice,\n  bob\n  carol\n")
    assert t.entries == {}
    assert t.problems == [f"{tmp_path / 'aliases'}:1: bad address 'bob carol'; entry skipped"]


def test_quoted_names_and_targets(tmp_path):
    t = table(
        tmp_path,
        '"sales": "alice", "x,y"@example.net, "john doe@example.net", bob, "a:b"\n"a:b": carol\n',
    )
    # A quoted target keeps its quotes where RFC 5321 4.1.2 needs them, and only there.
    assert t.entries[("sales", None)] == (
        "alice",
        '"x,y"@example.net',
        '"john doe"@example.net',
        "bob",
        '"a:b"',
    )
    assert t.problems == []
    assert t.expand("sales@example.test", is_user).recipients == (
        "alice@example.test",
        '"x,y"@example.net',
        '"john doe"@example.net',
        "bob@example.test",
        "carol@example.test",
    )


def test_include_relative_to_the_aliases_folder(tmp_path):
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "staff").write_text("# staff\nalice, bob\ncarol@example.test\n")
    t = table(tmp_path, "staff: :include:lists/staff, dave@example.net\n")
    parsed = parse_aliases(tmp_path / "aliases")
    assert list(parsed.files) == [tmp_path / "aliases", tmp_path / "lists" / "staff"]
    assert t.entries[("staff", None)] == ("alice", "bob", "carol@example.test", "dave@example.net")
    assert t.expand("staff@example.test", is_user).recipients == (
        "alice@example.test",
        "bob@example.test",
        "carol@example.test",
        "dave@example.net",
    )


def test_include_nesting_is_bounded(tmp_path):
    (tmp_path / "a").write_text(":include:b\n")
    (tmp_path / "b").write_text(":include:a\n")
    deep = tmp_path / "d0"
    for i in range(aliases.MAX_INCLUDE_DEPTH + 1):
        (tmp_path / f"d{i}").write_text(f":include:d{i + 1}\n")
    (tmp_path / f"d{aliases.MAX_INCLUDE_DEPTH + 1}").write_text("alice\n")
    t = table(tmp_path, f"loop: :include:a\ndeep: :include:{deep.name}\nok: alice\n")
    assert set(t.entries) == {("ok", None)}
    assert len(t.problems) == 2
    assert t.problems[0].startswith(f"{tmp_path / 'aliases'}:1: ")
    assert t.problems[1].startswith(f"{tmp_path / 'aliases'}:2: ")
    assert all("nests too deep" in p for p in t.problems)


def test_bad_lines_are_reported_with_file_and_line_and_skipped_whole(tmp_path):
    (tmp_path / "inc").write_text("alice\nbob@bad..domain\n")
    t = table(
        tmp_path,
        "  orphan continuation\n"
        "noseparator alice\n"
        "ok: alice\n"
        "half: bob, carol@exa mple.test\n"
        "pipe: |/usr/bin/prog\n"
        "empty:\n"
        "viainclude: carol, :include:inc\n"
        "missing: :include:nothere\n"
        "ok: bob\n"
        'quote: "alice\n',
    )
    assert t.entries == {("ok", None): ("alice",)}
    where = str(tmp_path / "aliases")
    lines = [p.split(": ", 1)[0] for p in t.problems]
    assert lines == [f"{where}:{n}" for n in (1, 2, 4, 5, 6, 7, 8, 9, 10)]
    assert f"{tmp_path / 'inc'}:2" in t.problems[5]
    assert "duplicate" in t.problems[7]
    assert all(p.endswith("skipped") for p in t.problems)


def test_bare_name_applies_to_every_local_domain_full_address_to_one(tmp_path):
    t = table(
        tmp_path, "sales: alice\ninfo@example.org: bob@example.test\nhelp@example.org: carol\n"
    )
    assert t.expand("sales@example.test", is_user).recipients == ("alice@example.test",)
    # A bare target is a local part of the domain the alias was reached in.
    assert t.expand("sales@example.org", is_user).recipients == ("alice@example.org",)
    assert t.expand("sales@elsewhere.example", is_user).recipients == ("sales@elsewhere.example",)
    assert t.expand("info@example.org", is_user).recipients == ("bob@example.test",)
    assert t.expand("info@example.test", is_user).unknown == ("info@example.test",)
    assert t.expand("help@example.org", is_user).unknown == ("carol@example.org",)


def test_nested_aliases_external_targets_order_and_duplicates(tmp_path):
    t = table(
        tmp_path,
        "all: sales, support, alice, Partner@Remote.Example\n"
        "sales: alice, bob\n"
        "support: bob, carol, partner@remote.example\n",
    )
    e = t.expand("all@example.test", is_user)
    assert e.error is None
    assert e.recipients == (
        "alice@example.test",
        "bob@example.test",
        "carol@example.test",
        # External local parts are kept as they are (RFC 5321 2.4): two recipients.
        "partner@remote.example",
        "Partner@remote.example",
    )


def test_names_compare_case_insensitively(tmp_path):
    t = table(tmp_path, "Sales: ALICE, Bob\nbob: carol\n")
    e = t.expand("SALES@Example.TEST", is_user)
    assert e.recipients == ("ALICE@example.test", "carol@example.test")


def test_self_reference_delivers_to_the_user(tmp_path):
    t = table(tmp_path, "alice: alice, archive@remote.example\n")
    e = t.expand("alice@example.test", is_user)
    assert e.recipients == ("alice@example.test", "archive@remote.example")


def test_loop_gives_an_error_not_a_hang(tmp_path):
    t = table(tmp_path, "a: b\nb: c, alice\nc: a\n")
    e = t.expand("a@example.test", is_user)
    assert e.recipients == ()
    assert e.error is not None and "loop" in e.error


def test_two_paths_to_the_same_alias_are_not_a_loop(tmp_path):
    t = table(tmp_path, "top: x, y\nx: shared\ny: shared\nshared: alice\n")
    assert t.expand("top@example.test", is_user).recipients == ("alice@example.test",)


def test_depth_limit(tmp_path):
    n = aliases.MAX_EXPANSION_DEPTH
    chain = "".join(f"a{i}: a{i + 1}\n" for i in range(n + 1)) + f"a{n + 1}: alice\n"
    t = table(tmp_path, chain)
    e = t.expand("a0@example.test", is_user)
    assert e.recipients == () and e.error is not None and "deeper" in e.error
    assert t.expand(f"a{2}@example.test", is_user).recipients == ("alice@example.test",)


def test_fan_out_without_a_cycle_is_bounded(tmp_path):
    # 10 levels of 10 targets each, all reaching the same alias: no loop, 10**10 paths.
    levels = "".join(f"l{i}: " + ", ".join([f"l{i + 1}"] * 10) + "\n" for i in range(10))
    t = table(tmp_path, levels + "l10: alice\n")
    e = t.expand("l0@example.test", is_user)
    assert e.recipients == () and e.error is not None and "more than" in e.error


def test_quoted_targets_with_specials_expand_through_aliases(tmp_path):
    t = table(tmp_path, 'top: "we ird", "x y"@example.test\n"we ird": bob\n')
    assert t.problems == []
    e = t.expand("top@example.test", is_user)
    assert e.recipients == ("bob@example.test",)
    assert e.unknown == ('"x y"@example.test',)


def test_idn_domains_compare_in_one_form(tmp_path):
    t = table(
        tmp_path,
        "info@Bücher.example: bob@xn--bcher-kva.example\nwho@xn--bcher-kva.example: alice\n",
        ["bücher.example"],
    )
    assert t.local_domains == {"xn--bcher-kva.example"}
    assert t.expand("info@xn--bcher-kva.example", is_user).unknown == ("bob@xn--bcher-kva.example",)
    assert t.expand("who@BÜCHER.example", is_user).unknown == ("alice@xn--bcher-kva.example",)


def test_utf8_local_parts(tmp_path):
    t = table(tmp_path, "jürgen: alice, δοκιμή@example.net\n")
    assert t.expand("JÜRGEN@example.test", is_user).recipients == (
        "alice@example.test",
        "δοκιμή@example.net",
    )


def _bump(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_reload_only_when_a_file_changed(tmp_path):
    inc = tmp_path / "inc"
    inc.write_text("alice\n")
    t = table(tmp_path, "staff: :include:inc\n")
    assert t.maybe_reload() is False
    _bump(inc, "bob\n")
    assert t.maybe_reload() is True
    assert t.entries[("staff", None)] == ("bob",)
    assert t.maybe_reload() is False
    _bump(tmp_path / "aliases", "staff: carol\n")
    assert t.maybe_reload() is True
    assert t.entries[("staff", None)] == ("carol",)
    # A file replaced by another (new inode) of the same size and time counts as changed.
    other = tmp_path / "aliases.new"
    other.write_text("staff: dave\n")
    st = (tmp_path / "aliases").stat()
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, tmp_path / "aliases")
    assert t.maybe_reload() is True
    assert t.entries[("staff", None)] == ("dave",)


def test_an_aliases_file_that_vanishes_keeps_the_aliases_read_before(tmp_path):
    t = table(tmp_path, "sales: alice\n")
    (tmp_path / "aliases").unlink()
    assert t.maybe_reload() is True
    assert t.entries == {("sales", None): ("alice",)}
    assert t.problems[-1].endswith("keeping the aliases read before")
    (tmp_path / "aliases").write_text("sales: bob\n")
    assert t.maybe_reload() is True
    assert t.entries == {("sales", None): ("bob",)} and t.problems == []


def test_missing_file_means_no_aliases_and_appearing_file_is_read(tmp_path):
    # The default config names an aliases file that a new installation has not
    # written yet: no aliases, no problem; the file is read once it appears.
    t = AliasTable(tmp_path / "aliases", DOMAINS)
    assert t.entries == {} and t.problems == []
    assert t.maybe_reload() is False
    (tmp_path / "aliases").write_text("sales: alice\n")
    assert t.maybe_reload() is True
    assert t.problems == [] and t.expand("sales@example.test", is_user).recipients == (
        "alice@example.test",
    )


def test_ten_thousand_aliases_are_one_dict_lookup_per_hop(tmp_path):
    lines = [f"alias{i}: user{i % 100}, list{i % 7}\n" for i in range(10_000)]
    lines += [f"list{i}: alice, remote{i}@remote.example\n" for i in range(7)]
    t = table(tmp_path, "".join(lines))
    assert t.problems == [] and len(t.entries) == 10_007

    class CountingDict(dict):
        gets = 0

        def get(self, *args):
            CountingDict.gets += 1
            return super().get(*args)

    t.entries = CountingDict(t.entries)
    e = t.expand("alias9999@example.test", is_user)
    assert e.unknown == ("user99@example.test",)
    assert e.recipients == ("alice@example.test", "remote3@remote.example")
    # alias9999, user99, list3, alice: a full and a bare-name lookup each; remote3: one.
    assert CountingDict.gets <= 9


def test_format_address_quotes_only_when_needed_and_round_trips():
    assert aliases.format_address("alice", "example.test") == "alice@example.test"
    assert aliases.format_address("a.b+c", None) == "a.b+c"
    for local in ['we"ird', "x y", "back\\slash", ".dot", "a..b", "a:b"]:
        formatted = aliases.format_address(local, "example.net")
        assert formatted.startswith('"')
        assert aliases._split_parsed(formatted) == (local, "example.net")
        assert aliases.split_address(formatted) == (local, "example.net")
