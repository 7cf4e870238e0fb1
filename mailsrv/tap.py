"""twistd options and service maker for ``twistd mailsrv``."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from twisted.logger import Logger
from twisted.python import usage

from mailsrv.config import SYSTEM_CONFIG, ConfigError, find_config, load
from mailsrv.journal import journal_service
from mailsrv.loglines import QuietLogService
from mailsrv.privileges import UMASK, acting_as, switch_to, unreadable_config
from mailsrv.service import build_service
from mailsrv.startup import StartupError, StartupGuard, report_startup_errors
from mailsrv.syslogobserver import syslog_service

log = Logger()


class Options(usage.Options):
    """Command line of ``twistd mailsrv``."""

    optParameters = [
        [
            "config",
            "c",
            None,
            "The TOML configuration file (default: $MAILSRV_CONFIG, else "
            "/etc/mailsrv/mailsrv.toml when it exists, else the built-in default).",
        ],
    ]

    def __init__(
        self, environ: Mapping[str, str] | None = None, system_config: Path = SYSTEM_CONFIG
    ) -> None:
        super().__init__()
        self.environ = environ
        self.system_config = system_config

    def postOptions(self) -> None:
        path, origin = find_config(self["config"], self.environ, self.system_config)
        self["config_origin"] = origin
        try:
            self["settings"] = load(path)
        except ConfigError as e:
            # One line per problem, and not after twistd's usage text: the
            # command line is fine, the file is not.
            for line in str(e).splitlines():
                print(f"mailsrv: {line}", file=sys.stderr)
            raise SystemExit(2)


def makeService(options: Options) -> StartupGuard:
    """The server for twistd: the services L{build_service} builds, under a L{StartupGuard}."""
    config = options["settings"]
    log.info(
        "configuration: {path} (from {origin}); data in {data_dir}",
        path=config.path,
        origin=options["config_origin"],
        data_dir=str(config.server.data_dir),
    )
    environ = os.environ if options.environ is None else options.environ
    twistd = getattr(options, "parent", None) or {}  # twistd's own options: --uid, --gid
    try:
        run_as = switch_to(config, twistd.get("uid"), twistd.get("gid"), environ)
        os.umask(UMASK)
        with acting_as(run_as):  # what it creates is the account's from the start
            server = build_service(config)
            unreadable = unreadable_config(config) if run_as is not None else None
        if unreadable is not None:
            assert run_as is not None
            log.warn(
                "{path} cannot be read by {user} ({why}), who the server runs as: a SIGHUP "
                "will not reload it; fix with: chgrp {group} {path} && chmod g+r {path}",
                path=config.path,
                user=run_as.user,
                group=run_as.group,
                why=unreadable,
            )
    except StartupError as e:
        print(f"mailsrv: cannot start: {e}", file=sys.stderr)
        raise SystemExit(1)
    guard = StartupGuard(config, run_as=(run_as.uid, run_as.gid) if run_as else None)
    QuietLogService().setServiceParent(guard)  # first: no noise lines from the others
    from twisted.internet import reactor  # twistd installed its reactor before this

    syslog = syslog_service(config, reactor)  # [log] syslog = true: the lines to syslog too
    if syslog is not None:
        syslog.setServiceParent(guard)
    journal = journal_service(config, reactor, environ)  # under systemd: native journal entries
    if journal is not None:
        journal.setServiceParent(guard)
    server.setServiceParent(guard)
    report_startup_errors()
    return guard
