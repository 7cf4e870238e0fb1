"""The settings for operating the server: [log] (syslog, the journal) and [metrics] (Prometheus)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mailsrv import journal, syslogobserver
from mailsrv.config.server import _endpoints
from mailsrv.config.values import _bool, _choice, _nonempty_str

SCHEMA: dict[str, dict[str, tuple[Callable[[Any], Any], Any]]] = {
    # Logging to the local syslog socket too (mailsrv.syslogobserver).
    "log": {
        "syslog": (_bool, False),
        "syslog_socket": (_nonempty_str, syslogobserver.DEFAULT_SOCKET),
        "facility": (_choice(*syslogobserver.FACILITIES), syslogobserver.DEFAULT_FACILITY),
        # Entries to the journal's native socket (mailsrv.journal): true, false or
        # "auto" (when standard output is the journal's stream, as under systemd).
        "journal": (journal.journal_mode, "auto"),
        "journal_socket": (_nonempty_str, journal.DEFAULT_SOCKET),
    },
    # The Prometheus metrics page (mailsrv.metrics); no endpoint: not served.
    "metrics": {
        "listen": (_endpoints, []),
    },
}
