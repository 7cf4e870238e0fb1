"""The C{[metrics]} section: where the Prometheus metrics are served."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricsConfig:
    """
    C{listen}: strports endpoints for the metrics page (empty: not served),
    for example C{tcp:9154:interface=127.0.0.1}. The page tells anyone who
    can reach it the server's traffic: keep it on loopback or a private net.
    """

    listen: tuple[str, ...] = ()
