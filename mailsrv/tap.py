"""twistd options and service maker for ``twistd mailsrv``."""

from __future__ import annotations

import sys

from twisted.python import usage

from mailsrv.config import ConfigError, load


class Options(usage.Options):
    """Command line of ``twistd mailsrv``."""

    optParameters = [
        ["config", "c", None, "The TOML configuration file (default: the embedded safe default)."],
    ]

    def postOptions(self) -> None:
        try:
            self["settings"] = load(self["config"])
        except ConfigError as e:
            # One line per problem, and not after twistd's usage text: the
            # command line is fine, the file is not.
            for line in str(e).splitlines():
                print(f"mailsrv: {line}", file=sys.stderr)
            raise SystemExit(2)


def makeService(options: Options):
    from mailsrv.service import build_service
    from mailsrv.startup import StartupError, StartupGuard, report_startup_errors

    config = options["settings"]
    try:
        server = build_service(config)
    except StartupError as e:
        print(f"mailsrv: cannot start: {e}", file=sys.stderr)
        raise SystemExit(1)
    guard = StartupGuard(config)
    server.setServiceParent(guard)
    report_startup_errors()
    return guard
