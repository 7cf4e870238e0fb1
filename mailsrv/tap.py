"""twistd options and service maker for ``twistd mailsrv``."""

from __future__ import annotations

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
            raise usage.UsageError(str(e))


def makeService(options: Options):
    from mailsrv.service import build_service

    return build_service(options["settings"])
