"""
A non-editable install (``pip install .``, the README's run command on a
fresh machine) ships only the packages pyproject.toml lists: every package
under mailsrv/ must be there.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_is_listed_in_pyproject():
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "mailsrv").rglob("__init__.py")
    }
    assert found - listed == set()
