"""The settings for operating the server: [log] (syslog) and [metrics] (Prometheus)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mailsrv import syslogobserver
from mailsrv.config.server import _endpoints
from mailsrv.config.values import _bool, _choice, _nonempty_str

SCHEMA: dict[str, dict[str, tuple[Callable[[Any], Any], Any]]] = {
    # Logging to the local syslog socket too (mailsrv.syslogobserver).
    "log": {
        "syslog": (_bool, False),
        "syslog_socket": (_nonempty_str, syslogobserver.DEFAULT_SOCKET),
        "facility": (_choice(*syslogobserver.FACILITIES), syslogobserver.DEFAULT_FACILITY),
    },
    # The Prometheus metrics page (mailsrv.metrics); no endpoint: not served.
    "metrics": {
        "listen": (_endpoints, []),
    },
}
