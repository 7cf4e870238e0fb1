"""
The members of Twisted's IMAP4Server the IMAP server relies on beyond its
documented API (mailsrv/imap/twistedcompat.py), checked on Twisted's own
server so that a Twisted release that changes one fails here first.
"""

from __future__ import annotations

import ast
import inspect
import pathlib
import re

from twisted.internet import defer
from twisted.internet.testing import StringTransport
from twisted.mail import imap4

from mailsrv.imap import twistedcompat
from mailsrv.imap.server import IMAPServer


def connected() -> imap4.IMAP4Server:
    proto = imap4.IMAP4Server()
    proto.makeConnection(StringTransport())
    proto.setTimeout(None)
    return proto


def test_command_states_are_twisteds():
    proto = connected()
    assert proto.state == twistedcompat.UNAUTH
    assert twistedcompat.command_entry(proto, twistedcompat.UNAUTH, "LOGIN")[0] == (
        imap4.IMAP4Server.do_LOGIN
    )
    assert twistedcompat.command_entry(proto, twistedcompat.AUTH, "SELECT") is not None
    assert twistedcompat.command_entry(proto, twistedcompat.SELECTED, "FETCH") is not None
    assert twistedcompat.command_entry(proto, twistedcompat.LOGOUT, "LOGOUT") is not None
    assert twistedcompat.command_entry(proto, twistedcompat.AUTH, "FETCH") is None
    assert twistedcompat.STATES == ("unauth", "auth", "select", "logout")


def test_state_names_reach_twisteds_lookup():
    proto = connected()
    proto.state = twistedcompat.SELECTED
    assert proto.lookupCommand(b"fetch") == proto.select_FETCH


def test_parse_states_are_twisteds():
    proto = connected()
    assert proto.parseState == twistedcompat.PARSE_COMMAND
    assert callable(getattr(proto, "parse_" + twistedcompat.PARSE_COMMAND))
    assert callable(getattr(proto, "parse_" + twistedcompat.PARSE_LITERAL))


def test_pending_literal_receives_the_octets_then_the_rest_of_the_line():
    proto = connected()
    d: defer.Deferred = defer.Deferred()
    got = []
    d.addCallback(got.append)
    twistedcompat.set_pending_literal(proto, twistedcompat.LiteralString(5, d))
    proto.setRawMode()
    proto.dataReceived(b"hel")
    assert got == []
    proto.dataReceived(b"lo rest of line\r\n")
    assert got == [(b"hello", b" rest of line")]
    assert proto.parseState == twistedcompat.PARSE_COMMAND


def test_twisteds_argument_parsers():
    proto = connected()
    assert twistedcompat.arg_atom(proto, b"+FLAGS (x)") == (b"+FLAGS", b"(x)")
    assert twistedcompat.arg_line(proto, b"all of it") == (b"all of it", b"")
    assert twistedcompat.arg_plist(proto, b"(MESSAGES UNSEEN)") == (
        [b"MESSAGES", b"UNSEEN"],
        b"",
    )
    assert twistedcompat.opt_plist(proto, b"{3}") == (None, b"{3}")
    date, rest = twistedcompat.opt_datetime(proto, b'"17-Jul-1996 02:44:25 -0700" {3}')
    assert (date, rest) == (b"17-Jul-1996 02:44:25 -0700", b"{3}")
    assert twistedcompat.arg_flaglist(proto, b"(\\Seen $Label)") == (
        [b"\\Seen", b"$Label"],
        b"",
    )


def test_the_server_keeps_only_capability_and_logout_of_twisteds_commands():
    """Every other command of Twisted's is replaced (the logout state's NOOP is never reached)."""
    names = {
        n
        for n in dir(imap4.IMAP4Server)
        if n.split("_", 1)[0] in twistedcompat.STATES and n.split("_", 1)[-1].isupper()
    }
    kept = {n for n in names if getattr(IMAPServer, n) is getattr(imap4.IMAP4Server, n)}
    assert kept == {
        *(f"{state}_{name}" for state in twistedcompat.STATES for name in ("CAPABILITY", "LOGOUT")),
        "logout_NOOP",
    }


class _Observed(twistedcompat.ResponseHook):
    """Twisted's server with the response hook, recording what it is told."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, bytes | None]] = []

    def responded(self, state: bytes, tag: bytes | None) -> None:
        self.seen.append((state, tag))


def test_response_hook_sees_every_status_response_after_it_is_written():
    """The untagged greeting too; a str message is sent as UTF-8."""
    proto = _Observed()
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.setTimeout(None)
    transport.clear()
    proto.dataReceived(b"a1 NOOP\r\na2 BOGUS\r\n")
    proto.sendPositiveResponse(b"a3", "text as str")
    assert transport.value() == (
        b"a1 OK NOOP No operation performed\r\na2 BAD Unsupported command\r\na3 OK text as str\r\n"
    )
    assert proto.seen == [(b"OK", None), (b"OK", b"a1"), (b"BAD", b"a2"), (b"OK", b"a3")]


def test_set_logout_is_called_by_twisteds_connection_lost():
    proto = connected()
    calls = []
    twistedcompat.set_logout(proto, lambda: calls.append("out"))
    proto.connectionLost(None)
    assert calls == ["out"]


def test_pending_literal_is_the_receiver_twisted_writes_to():
    proto = connected()
    assert twistedcompat.pending_literal(proto) is None
    d: defer.Deferred = defer.Deferred()
    receiver = twistedcompat.LiteralString(3, d)
    twistedcompat.set_pending_literal(proto, receiver)
    assert twistedcompat.pending_literal(proto) is receiver


def test_set_unread_replaces_what_linereceiver_has_not_yet_split():
    proto = connected()
    proto.transport.clear()
    proto.dataReceived(b"a1 NOO")
    assert twistedcompat.set_unread(proto, b"b1 NOOP\r\n") == b"b1 NOOP\r\n"
    proto.dataReceived(b"")
    assert proto.transport.value() == b"b1 OK NOOP No operation performed\r\n"


def _twisted_private_names() -> set[str]:
    """The private members Twisted's IMAP4Server and its bases define or set on self."""
    names: set[str] = set()
    for klass in imap4.IMAP4Server.__mro__:
        if not klass.__module__.startswith("twisted"):
            continue
        names |= {n for n in vars(klass) if n.startswith("_") and not n.startswith("__")}
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        names |= set(re.findall(r"\bself\.(_[A-Za-z]\w*)", source))
    return names


def test_only_twistedcompat_names_twisteds_private_members():
    """
    Outside twistedcompat.py, mailsrv.imap neither reads, sets nor overrides a
    private member of Twisted's server, nor reaches into imap4.IMAP4Server's
    class attributes, nor names Twisted's parse states by their strings.
    """
    private = _twisted_private_names()
    assert {"_respond", "_onLogout", "_pendingLiteral", "_buffer"} <= private
    twisted_parse_states = {twistedcompat.PARSE_COMMAND, twistedcompat.PARSE_LITERAL}
    package = pathlib.Path(twistedcompat.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "twistedcompat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(package)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Attribute) and node.attr in private:
                found.append(f"{where} .{node.attr}")
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in private:
                found.append(f"{where} def {node.name}")
            elif isinstance(node, ast.AnnAssign | ast.Assign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Name) and t.id in private:
                        found.append(f"{where} {t.id} =")
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Attribute)
                and node.value.attr == "IMAP4Server"
            ):
                found.append(f"{where} IMAP4Server.{node.attr}")
            if isinstance(node, ast.Compare | ast.Assign):
                parts = [node.left, *node.comparators] if isinstance(node, ast.Compare) else []
                if isinstance(node, ast.Assign):
                    parts = [*node.targets, node.value]
                names_state = any(
                    isinstance(p, ast.Attribute) and p.attr == "parseState" for p in parts
                )
                literal = any(
                    isinstance(p, ast.Constant) and p.value in twisted_parse_states for p in parts
                )
                if names_state and literal:
                    found.append(f"{where} parseState as a string")
    assert found == []
