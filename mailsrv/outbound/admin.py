"""
``mailsrv queue``: list, show, flush, delete, hold, release and requeue
queued outbound mail.

``flush`` leaves a request file (``<queue_dir>/flush``) that the running
relayer picks up at its next scan of the queue folder (every few seconds):
it then retries every queued message at once. ``delete`` removes the
message's files; the running relayer drops it at its next scan (a delivery
already under way finishes, but its result is not written back).

``hold``, ``release`` and ``requeue`` leave marks beside the queue file
(L{mailsrv.outbound.marks}), each one atomic change on disk, that the
relayer follows whether it runs now or starts later, as Postfix's
``postsuper -h``, ``-H`` and ``-r``. A message on hold is never attempted,
so never expires or bounces, while held (``list`` marks it with ``!`` after
its id, as mailq does); the relayer reads the mark right before each
retry, so an attempt under way when the hold is made finishes (what it
delivered is recorded) and no other starts. ``release`` gives the message
back its retry schedule (past its lifetime: one more attempt, then the
bounce); ``requeue`` makes the next attempt now with the back-off from the
start, and releases a hold.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Any, TextIO

from mailsrv.outbound.dsn import read_headers
from mailsrv.outbound.envelope import PENDING
from mailsrv.outbound.queue import QueueStore

HANDLER = "handler"


def add_queue_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``queue`` subcommand (list | show ID | flush | delete ID...) to C{subparsers}."""
    p = subparsers.add_parser("queue", help="manage the outbound mail queue")
    sub = p.add_subparsers(
        dest="queue_command", metavar="{list,show,flush,delete,hold,release,requeue}"
    )
    sub.required = True
    sub.add_parser("list", help="list queued messages, like mailq")
    show = sub.add_parser("show", help="show one message's envelope and headers")
    show.add_argument("queue_id")
    sub.add_parser("flush", help="make the running server retry every message now")
    delete = sub.add_parser("delete", help="remove messages from the queue")
    delete.add_argument("queue_ids", nargs="+", metavar="ID")
    hold = sub.add_parser("hold", help="put messages on hold: never attempted until released")
    hold.add_argument("queue_ids", nargs="+", metavar="ID")
    release = sub.add_parser("release", help="release held messages to their retry schedule")
    release.add_argument("queue_ids", nargs="+", metavar="ID")
    requeue = sub.add_parser(
        "requeue", help="try messages now, the back-off from the start (releases a hold)"
    )
    group = requeue.add_mutually_exclusive_group(required=True)
    group.add_argument("queue_ids", nargs="*", metavar="ID", default=[])
    group.add_argument("--all", action="store_true", help="every queued message")
    p.set_defaults(**{HANDLER: handle})
    return p


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def handle(args: argparse.Namespace, config: Any, out: TextIO | None = None) -> int:
    """Run one ``queue`` command; returns the exit code."""
    out = out or sys.stdout
    store = QueueStore(config.queue_dir)
    cmd = args.queue_command
    if cmd == "list":
        ids = store.ids()
        if not ids:
            print("Mail queue is empty", file=out)
            return 0
        held = store.marks.held()
        print(f"{'Queue ID':<21} {'Size':>8} {'Arrival (UTC)':<19}  Sender/Recipient", file=out)
        for queue_id in ids:
            try:
                env = store.load_envelope(queue_id)
            except (OSError, ValueError, TypeError, KeyError) as e:
                print(f"{queue_id:<21} (unreadable envelope: {e})", file=out)
                continue
            name = env.id + ("!" if queue_id in held else "")  # mailq's mark of held mail
            print(f"{name:<21} {env.size:>8} {_when(env.created):<19}  <{env.sender}>", file=out)
            if env.last_error:
                print(f"{'':<52}({env.last_error})", file=out)
            for r in env.recipients:
                if r.state == PENDING:
                    print(f"{'':<52}{r.address}", file=out)
        on_hold = f", {len(held & set(ids))} on hold (!)" if held & set(ids) else ""
        print(f"-- {len(ids)} message(s){on_hold}", file=out)
        return 0
    if cmd == "show":
        try:
            env = store.load_envelope(args.queue_id.upper())
        except FileNotFoundError:
            print(f"{args.queue_id}: no such message in the queue", file=sys.stderr)
            return 1
        except (OSError, ValueError, TypeError, KeyError) as e:
            print(f"{args.queue_id}: unreadable envelope: {e}", file=sys.stderr)
            return 1
        print(json.dumps(json.loads(env.to_json()), indent=2, sort_keys=True), file=out)
        try:
            with store.open_message(env) as f:
                headers = read_headers(f)
        except OSError:
            headers = b""
        print("", file=out)
        print(headers.decode("utf-8", "replace"), end="", file=out)
        return 0
    if cmd == "flush":
        store.request_flush()
        print(
            "flush requested: a running server retries every queued message within seconds",
            file=out,
        )
        return 0
    if cmd == "delete":
        status = 0
        for queue_id in args.queue_ids:
            if store.remove(queue_id.upper()):
                print(f"{queue_id}: deleted", file=out)
            else:
                print(f"{queue_id}: no such message in the queue", file=sys.stderr)
                status = 1
        return status
    if cmd in ("hold", "release", "requeue"):
        return _mark(store, cmd, args, out)
    print(f"unknown queue command {cmd!r}", file=sys.stderr)
    return 2


_MARKED = {"hold": "on hold", "release": "released", "requeue": "requeued"}


def _mark(store: QueueStore, cmd: str, args: argparse.Namespace, out: TextIO) -> int:
    """``hold``, ``release`` or ``requeue`` each message named; 1 if one is not queued."""
    marks = store.marks
    change = {"hold": marks.hold, "release": marks.release, "requeue": marks.request_requeue}[cmd]
    queued = set(store.ids())
    ids = sorted(queued) if getattr(args, "all", False) else [i.upper() for i in args.queue_ids]
    status = 0
    for queue_id in ids:
        if change(queue_id):
            print(f"{queue_id}: {_MARKED[cmd]}", file=out)
        elif queue_id in queued:
            print(f"{queue_id}: not on hold", file=out)  # release only: the others succeed
        else:
            print(f"{queue_id}: no such message in the queue", file=sys.stderr)
            status = 1
    return status
