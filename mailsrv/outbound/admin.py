"""
``mailsrv queue``: list, show, flush and delete queued outbound mail.

``flush`` leaves a request file (``<queue_dir>/flush``) that the running
relayer picks up at its next scan of the queue folder (every few seconds):
it then retries every queued message at once. ``delete`` removes the
message's files; the running relayer drops it at its next scan (a delivery
already under way finishes, but its result is not written back).
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
    sub = p.add_subparsers(dest="queue_command", metavar="{list,show,flush,delete}")
    sub.required = True
    sub.add_parser("list", help="list queued messages, like mailq")
    show = sub.add_parser("show", help="show one message's envelope and headers")
    show.add_argument("queue_id")
    sub.add_parser("flush", help="make the running server retry every message now")
    delete = sub.add_parser("delete", help="remove messages from the queue")
    delete.add_argument("queue_ids", nargs="+", metavar="ID")
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
        print(f"{'Queue ID':<21} {'Size':>8} {'Arrival (UTC)':<19}  Sender/Recipient", file=out)
        for queue_id in ids:
            try:
                env = store.load_envelope(queue_id)
            except (OSError, ValueError, TypeError, KeyError) as e:
                print(f"{queue_id:<21} (unreadable envelope: {e})", file=out)
                continue
            print(f"{env.id:<21} {env.size:>8} {_when(env.created):<19}  <{env.sender}>", file=out)
            if env.last_error:
                print(f"{'':<52}({env.last_error})", file=out)
            for r in env.recipients:
                if r.state == PENDING:
                    print(f"{'':<52}{r.address}", file=out)
        print(f"-- {len(ids)} message(s)", file=out)
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
    print(f"unknown queue command {cmd!r}", file=sys.stderr)
    return 2
