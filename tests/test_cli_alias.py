"""
The ``mailsrv alias add|del|list|show`` admin commands, driven through the
real command-line entry (L{mailsrv.cli.main}, and once as a process),
asserting on the aliases file on disk and on what the command prints.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mailsrv.addresses.aliases import AliasTable
from mailsrv.addresses.srs import SECRET_FILE, SRSRewriter, load_or_create_secret
from mailsrv.cli import main

NOTE = "the running server reads it again within 5 seconds"


@pytest.fixture
def cfg(tmp_path) -> Path:
    p = tmp_path / "etc" / "mailsrv.toml"
    p.parent.mkdir()
    p.write_text(
        textwrap.dedent(
            """\
            [server]
            hostname = "mail.example.test"
            domains = ["example.test", "example.net"]
            data_dir = "../data"

            [addresses]
            postmaster = "alice@example.test"
            domain_aliases = { "example.org" = "example.test" }
            catch_all = { "example.net" = "alice@example.test" }
            lists = { "team@example.test" = "Team <team.example.test>" }
            """
        )
    )
    return p


@pytest.fixture
def aliases(cfg) -> Path:
    return cfg.parent / "aliases"


def run(*argv, stdin=""):
    out, err = io.StringIO(), io.StringIO()
    code = main([str(a) for a in argv], stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def add_users(cfg, *addresses):
    for a in addresses:
        assert run("-c", cfg, "user", "add", a, stdin="pw\n")[0] == 0


# --- add ---------------------------------------------------------------------


def test_add_makes_the_file_0644_beside_the_config(cfg, aliases):
    code, out, err = run("-c", cfg, "alias", "add", "sales", "alice", "bob@remote.test")
    assert (code, err) == (0, "")
    assert out == f"added alias sales: alice, bob@remote.test in {aliases}; {NOTE}\n"
    assert aliases.read_text() == "sales: alice, bob@remote.test\n"
    assert stat.S_IMODE(os.stat(aliases).st_mode) == 0o644
    assert run("-c", cfg, "alias", "list") == (0, "sales: alice, bob@remote.test\n", "")


def test_add_to_an_existing_alias_appends_and_keeps_every_other_line(cfg, aliases):
    before = (
        "# Aliases of example.test\n"
        "\n"
        "sales: alice,\n"
        "  # a comment inside the entry\n"
        "\tbob\n"
        "bad line without colon\n"
        "  \n"
        "info@example.test: carol\n"
        "# the end\n"
    )
    aliases.write_text(before)
    aliases.chmod(0o640)
    code, out, err = run("-c", cfg, "alias", "add", "Sales", "carol", "BOB", "x@remote.test")
    assert code == 0
    assert out == (
        f"Sales already has BOB\nadded to alias Sales: carol, x@remote.test in {aliases}; {NOTE}\n"
    )
    # The problems of the file are reported, the bad line kept as it was.
    assert err == f"mailsrv: warning: {aliases}:6: no ':' after the name; entry skipped\n"
    assert aliases.read_text() == before.replace("\tbob\n", "\tbob, carol, x@remote.test\n")
    assert stat.S_IMODE(os.stat(aliases).st_mode) == 0o640
    table = AliasTable(aliases, ["example.test"])
    assert table.entries[("sales", None)] == ("alice", "bob", "carol", "x@remote.test")


def test_add_only_duplicates_changes_nothing(cfg, aliases):
    aliases.write_text("sales: alice, bob@remote.test\n")
    before = os.stat(aliases)
    code, out, _ = run("-c", cfg, "alias", "add", "sales", "Alice", "bob@REMOTE.test")
    assert (code, out) == (0, "sales already has Alice, bob@REMOTE.test\n")
    assert aliases.read_text() == "sales: alice, bob@remote.test\n"
    assert os.stat(aliases).st_ino == before.st_ino  # not rewritten


def test_add_long_entry_continues_on_a_new_line_and_keeps_crlf(cfg, aliases):
    aliases.write_bytes(
        b"# crlf\r\nstaff: " + b", ".join(b"user%d" % i for i in range(9)) + b"\r\n"
    )
    code, _, _ = run("-c", cfg, "alias", "add", "staff", "someone.with.a.long.name@remote.test")
    assert code == 0
    assert aliases.read_bytes() == (
        b"# crlf\r\nstaff: "
        + b", ".join(b"user%d" % i for i in range(9))
        + b",\r\n\tsomeone.with.a.long.name@remote.test\r\n"
    )
    table = AliasTable(aliases, ["example.test"])
    assert table.entries[("staff", None)][-1] == "someone.with.a.long.name@remote.test"
    assert table.problems == []


def test_add_to_a_file_without_final_newline(cfg, aliases):
    aliases.write_text("a: alice")
    assert run("-c", cfg, "alias", "add", "b", "bob")[0] == 0
    assert aliases.read_text() == "a: alice\nb: bob\n"


def test_add_splits_commas_and_takes_quotes_and_includes(cfg, aliases):
    (aliases.parent / "staff.list").write_text("alice\nbob\n")
    code, _, err = run(
        "-c",
        cfg,
        "alias",
        "add",
        "all",
        "carol,dave",
        '"john doe"@remote.test',
        ":include:staff.list",
    )
    assert (code, err) == (0, "")
    assert aliases.read_text() == 'all: carol, dave, "john doe"@remote.test, :include:staff.list\n'
    table = AliasTable(aliases, ["example.test"])
    assert table.entries[("all", None)] == (
        "carol",
        "dave",
        '"john doe"@remote.test',
        "alice",
        "bob",
    )
    code, out, _ = run("-c", cfg, "alias", "add", "all", ":include:staff.list")
    assert (code, out) == (0, "all already has :include:staff.list\n")


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["sales", "|/usr/bin/prog"], "command and file targets are not supported"),
        (["sales", "/var/mail/x"], "command and file targets are not supported"),
        (["sales", "a b"], "bad address"),
        (["sales", "bob@"], "empty domain"),
        (["sales", ":include:missing.list"], "cannot read :include:missing.list"),
        (["sales", "a\nb: c"], "line break"),
        (["sales", ","], "no targets given"),
        (["info@elsewhere.test", "bob"], "elsewhere.test is not a local domain"),
        (["#sales", "bob"], "bad alias name"),
        (["sa:les", "bob"], "bad alias name"),
        (["sales\u2028x", "bob"], "line break"),
    ],
)
def test_add_refuses_what_the_server_would_skip(cfg, aliases, argv, why):
    aliases.write_text("# kept\n")
    code, out, err = run("-c", cfg, "alias", "add", *argv)
    assert (code, out) == (1, "")
    assert why in err
    assert aliases.read_text() == "# kept\n"


def test_add_names_in_domain_aliases_and_idn(cfg, aliases):
    assert run("-c", cfg, "alias", "add", "info@example.org", "bob")[0] == 0
    assert run("-c", cfg, "alias", "add", "info@EXAMPLE.NET", "bob")[0] == 0
    assert run("-c", cfg, "alias", "add", "info@example.net", "carol")[0] == 0  # same entry
    assert aliases.read_text() == "info@example.org: bob\ninfo@EXAMPLE.NET: bob, carol\n"


def test_add_to_an_entry_with_a_problem_is_refused(cfg, aliases):
    aliases.write_text("sales: alice, |prog\n")
    code, _, err = run("-c", cfg, "alias", "add", "sales", "bob")
    assert code == 1
    assert f"{aliases}:1: the entry for sales has a problem" in err
    assert "fix it with an editor" in err
    assert aliases.read_text() == "sales: alice, |prog\n"


def test_not_utf8_file_is_not_changed(cfg, aliases):
    aliases.write_bytes(b"caf\xe9: alice\n")
    code, _, err = run("-c", cfg, "alias", "add", "x", "bob")
    assert code == 1 and "is not UTF-8" in err
    assert aliases.read_bytes() == b"caf\xe9: alice\n"


def test_running_server_sees_the_change(cfg, aliases):
    aliases.write_text("sales: alice\n")
    server_side = AliasTable(aliases, ["example.test"])
    run("-c", cfg, "alias", "add", "sales", "bob")
    assert server_side.maybe_reload() is True
    assert server_side.entries[("sales", None)] == ("alice", "bob")


# --- del -----------------------------------------------------------------------


def test_del_removes_the_entry_and_its_continuations_only(cfg, aliases):
    aliases.write_text(
        "# head\n"
        "sales: alice,\n"
        "  # inside\n"
        "  bob\n"
        "\n"
        "oops\n"
        "info: carol\n"
        "sales: dave\n"  # a duplicate the server ignores: removed too
        "# tail\n"
    )
    code, out, err = run("-c", cfg, "alias", "del", "SALES")
    assert (code, out) == (0, f"deleted alias SALES from {aliases}; {NOTE}\n")
    assert err == f"mailsrv: warning: {aliases}:3: no ':' after the name; entry skipped\n"
    assert aliases.read_text() == "# head\n\noops\ninfo: carol\n# tail\n"


def test_del_unknown_exits_1_and_names_similar_entries(cfg, aliases):
    aliases.write_text("sales@example.test: alice\n")
    code, out, err = run("-c", cfg, "alias", "del", "sales")
    assert (code, out) == (1, "")
    assert err == (f"mailsrv: no such alias: sales in {aliases} (there is: sales@example.test)\n")
    assert aliases.read_text() == "sales@example.test: alice\n"
    code, _, err = run("-c", cfg, "alias", "del", "nobody")
    assert code == 1 and err == f"mailsrv: no such alias: nobody in {aliases}\n"


def test_del_an_entry_with_a_problem(cfg, aliases):
    aliases.write_text("a: alice\nbad: |prog\n")
    code, _, err = run("-c", cfg, "alias", "del", "bad")
    assert (code, err) == (0, "")
    assert aliases.read_text() == "a: alice\n"


def test_two_admins_at_once_lose_no_edit(cfg, aliases):
    script = textwrap.dedent(
        """\
        import io, sys
        from mailsrv.cli import main
        cfg, who = sys.argv[1], sys.argv[2]
        for i in range(40):
            out = io.StringIO()
            assert main(["-c", cfg, "alias", "add", f"{who}{i}", "alice"], stdout=out) == 0
            assert main(["-c", cfg, "alias", "add", "all", f"{who}{i}"], stdout=out) == 0
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(cfg), who]) for who in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    table = AliasTable(aliases, ["example.test"])
    assert table.problems == []
    names = {f"{who}{i}" for who in "ab" for i in range(40)}
    assert {local for local, _ in table.entries} == names | {"all"}
    assert sorted(table.entries[("all", None)]) == sorted(names)


# --- list ----------------------------------------------------------------------


def test_list_sorted_as_written_with_problems_on_stderr(cfg, aliases):
    aliases.write_text(
        "zed: alice\n"
        'Sales: alice,\n   "john doe"@remote.test\n'
        "bad: |prog\n"
        "info@example.test: :include:staff.list\n"
        "zed: bob\n"
    )
    (aliases.parent / "staff.list").write_text("carol\n")
    code, out, err = run("-c", cfg, "alias", "list")
    assert code == 0
    assert out == (
        'info@example.test: :include:staff.list\nSales: alice, "john doe"@remote.test\nzed: alice\n'
    )
    assert err == (
        f"mailsrv: warning: {aliases}:4: command and file targets are not supported: "
        "'|prog'; entry skipped\n"
        f"mailsrv: warning: {aliases}:6: duplicate alias 'zed'; skipped\n"
    )


def test_list_without_a_file(cfg, aliases):
    code, out, err = run("-c", cfg, "alias", "list")
    assert (code, out) == (0, "")
    assert err == f"mailsrv: no aliases file at {aliases} (mailsrv alias add makes it)\n"


# --- show ----------------------------------------------------------------------


def test_show_final_recipients(cfg, aliases):
    add_users(cfg, "alice@example.test", "bob@example.test")
    aliases.write_text(
        "sales: alice, bob, bob@remote.test, sales2\n"
        "sales2: Alice, ghost\n"
        "team: alice, carol@remote.test\n"
    )
    code, out, err = run("-c", cfg, "alias", "show", "sales@example.test")
    assert code == 0
    assert out == "alice@example.test\nbob@example.test\nbob@remote.test (forwarded)\n"
    assert err == "mailsrv: skipped ghost@example.test: no such user or alias\n"
    code, out, _ = run("-c", cfg, "alias", "show", "team@example.test")
    assert out == (
        "alice@example.test (list team@example.test)\n"
        "carol@remote.test (forwarded, list team@example.test)\n"
    )
    assert run("-c", cfg, "alias", "show", "alice+lists@example.test")[1] == (
        "alice@example.test (filed in folder 'lists' if it exists)\n"
    )
    # domain alias, postmaster/abuse, catch-all
    assert run("-c", cfg, "alias", "show", "Bob@example.org")[1] == "bob@example.test\n"
    assert run("-c", cfg, "alias", "show", "abuse@example.test")[1] == "alice@example.test\n"
    assert run("-c", cfg, "alias", "show", "anything@example.net")[1] == "alice@example.test\n"


def test_show_why_there_are_none(cfg, aliases):
    add_users(cfg, "alice@example.test")
    aliases.write_text("a: b\nb: a\nghosts: nobody1, nobody2\n")
    assert run("-c", cfg, "alias", "show", "nobody@example.test") == (
        1,
        "",
        "mailsrv: nobody@example.test: no such user or alias\n",
    )
    code, out, err = run("-c", cfg, "alias", "show", "a@example.test")
    assert (code, out) == (1, "")
    assert err == "mailsrv: a@example.test: alias loop at a@example.test\n"
    code, _, err = run("-c", cfg, "alias", "show", "ghosts@example.test")
    assert code == 1
    assert err == (
        "mailsrv: ghosts@example.test: no recipients: no such user or alias: "
        "nobody1@example.test, nobody2@example.test\n"
    )
    code, _, err = run("-c", cfg, "alias", "show", "bob@remote.test")
    assert code == 1 and err == "mailsrv: remote.test is not a local domain of this server\n"


def test_show_does_not_make_the_srs_secret_but_uses_it(cfg, tmp_path):
    add_users(cfg, "alice@example.test")
    secret_path = tmp_path / "data" / SECRET_FILE
    assert run("-c", cfg, "alias", "show", "alice@example.test")[0] == 0
    assert not secret_path.exists()
    secret = load_or_create_secret(secret_path)
    srs = SRSRewriter(secret, "mail.example.test", now=time.time)
    bounce_to = srs.forward("sender@remote.test")
    assert run("-c", cfg, "alias", "show", bounce_to) == (
        0,
        "sender@remote.test (forwarded)\n",
        "",
    )
    forged = bounce_to.replace("=", "=x", 1)
    code, _, err = run("-c", cfg, "alias", "show", forged)
    assert code == 1 and "SRS" in err


# --- the console command --------------------------------------------------------


def test_alias_commands_in_a_subprocess(cfg, aliases):
    cmd = [sys.executable, "-m", "mailsrv", "--config", str(cfg), "alias"]
    r = subprocess.run(
        cmd + ["add", "sales", "bob@remote.test"], capture_output=True, text=True, timeout=60
    )
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout == f"added alias sales: bob@remote.test in {aliases}; {NOTE}\n"
    r = subprocess.run(
        cmd + ["show", "sales@example.test"], capture_output=True, text=True, timeout=60
    )
    assert (r.returncode, r.stdout) == (0, "bob@remote.test (forwarded)\n")
    r = subprocess.run(cmd + ["del", "nobody"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "no such alias: nobody" in r.stderr
    r = subprocess.run(cmd + ["add", "sales"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "TARGET" in r.stderr
    assert aliases.read_text() == "sales: bob@remote.test\n"


def test_example_files_work_together():
    root = Path(__file__).resolve().parent.parent
    assert run("-c", root / "etc" / "mailsrv.toml", "alias", "list") == (
        0,
        "hostmaster: postmaster\n"
        "info@example.test: alice, bob@partner.example\n"
        "sales: alice, bob\n"
        "team@example.test: alice, bob, carol@partner.example, dave@elsewhere.example\n"
        "webmaster: postmaster\n",
        "",
    )


def test_show_idn_address_without_a_user_says_no_such_user(tmp_path):
    p = tmp_path / "m.toml"
    p.write_text('[server]\ndomains = ["bücher.example"]\ndata_dir = "data"\n')
    for form in ("nobody@bücher.example", "nobody@XN--BCHER-KVA.example"):
        assert run("-c", p, "alias", "show", form) == (
            1,
            "",
            f"mailsrv: {form}: no such user or alias\n",
        )
    code, _, err = run("-c", p, "alias", "show", "a b@bücher.example")
    assert code == 1 and "is not an address" in err


# The password file keeps IDN domains as A-labels (UTS-46), as the address
# rules compare them: a user added with the U-label is found from either form.
def test_show_user_of_an_idn_domain_added_with_its_u_label(tmp_path):
    p = tmp_path / "m.toml"
    p.write_text('[server]\ndomains = ["bücher.example"]\ndata_dir = "data"\n')
    assert run("-c", p, "user", "add", "jöhn@bücher.example", stdin="pw\n")[0] == 0
    for spelling in ("jöhn@bücher.example", "jöhn@xn--bcher-kva.example"):
        assert run("-c", p, "alias", "show", spelling) == (0, "jöhn@xn--bcher-kva.example\n", "")


def test_add_through_a_symbolic_link_keeps_the_link(cfg, aliases, tmp_path):
    real = tmp_path / "shared" / "aliases"
    real.parent.mkdir()
    real.write_text("a: alice\n")
    aliases.symlink_to(real)
    assert run("-c", cfg, "alias", "add", "b", "bob")[0] == 0
    assert aliases.is_symlink()
    assert real.read_text() == "a: alice\nb: bob\n"
    assert (real.parent / "aliases.lock").exists()


def test_show_with_an_unusable_srs_secret_warns_and_goes_on(cfg, tmp_path):
    add_users(cfg, "alice@example.test")
    (tmp_path / "data" / SECRET_FILE).write_bytes(b"")
    code, out, err = run("-c", cfg, "alias", "show", "alice@example.test")
    assert (code, out) == (0, "alice@example.test\n")
    assert err.startswith("mailsrv: warning: the SRS secret ")
    assert err.endswith(": SRS addresses are not checked\n")


def test_add_says_when_an_alias_hides_a_user(cfg, aliases):
    add_users(cfg, "alice@example.test")
    code, _, err = run("-c", cfg, "alias", "add", "Alice", "bob@remote.test")
    assert code == 0
    assert err == (
        "mailsrv: note: mail for the user alice@example.test now follows this alias "
        "(name Alice among the targets to keep it delivering to the user too)\n"
    )
    assert run("-c", cfg, "alias", "add", "alice", "alice")[2] == ""  # not a new alias
    assert run("-c", cfg, "alias", "show", "alice@example.test")[1] == (
        "bob@remote.test (forwarded)\nalice@example.test\n"
    )
