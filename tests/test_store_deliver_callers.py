"""
Mail reaches a mailbox through the store's delivery target only: no module
of the package but L{mailsrv.store.target} calls (or hands on) a store's
C{deliver} (L{IMailStore.deliver}), so the Return-Path field, the name
checks and whatever is added there next apply to every local copy.
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial import unittest

import mailsrv

PACKAGE = Path(mailsrv.__file__).parent
THE_CALLER = PACKAGE / "store" / "target.py"
# Stores around the store (IMailStore themselves, reached through the target
# like any store): the metrics' TimedStore times each delivery.
STORE_DECORATORS = {PACKAGE / "metrics" / "service.py"}


def store_deliver_uses(path: Path) -> list[str]:
    """Each C{<something store>.deliver} in C{path}, called or passed on, as C{line: text}."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not (isinstance(node, ast.Attribute) and node.attr == "deliver"):
            continue
        receiver = node.value
        name = receiver.attr if isinstance(receiver, ast.Attribute) else getattr(receiver, "id", "")
        if "store" in name.lower():
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


class StoreDeliverCallersTests(unittest.TestCase):
    def test_only_the_store_target_calls_the_stores_deliver(self):
        others = {
            str(path.relative_to(PACKAGE)): uses
            for path in sorted(PACKAGE.rglob("*.py"))
            if path != THE_CALLER
            and path not in STORE_DECORATORS
            and (uses := store_deliver_uses(path))
        }
        self.assertEqual(others, {})

    def test_the_check_sees_the_store_target_itself(self):
        uses = [use.split(": ", 1)[1] for use in store_deliver_uses(THE_CALLER)]
        self.assertEqual(uses, ["self.store.deliver", "self.store.deliver"])

    def test_a_store_decorator_only_passes_deliver_on(self):
        for path in STORE_DECORATORS:
            uses = [use.split(": ", 1)[1] for use in store_deliver_uses(path)]
            self.assertEqual(uses, ["self._store.deliver"])
