#!/usr/bin/env bash
# Install mailsrv with its test dependencies into .venv, check lint and types, and run the
# whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/pip install -q -e '.[test]' --config-settings editable_mode=compat
.venv/bin/ruff check --quiet .
.venv/bin/mypy --no-error-summary mailsrv
.venv/bin/python -m pytest -q "$@"
