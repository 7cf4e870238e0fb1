"""The settings as a whole: one frozen L{Config} built by the loader."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailsrv.addresses.aliases import normalise_domain
from mailsrv.config.auth import AuthConfig
from mailsrv.config.mail import AddressesConfig, DkimConfig, FilterConfig
from mailsrv.config.policy import PolicyConfig
from mailsrv.config.server import (
    DNSConfig,
    IMAPConfig,
    LimitsConfig,
    RelayConfig,
    ServerConfig,
    TLSConfig,
)
from mailsrv.metrics.settings import MetricsConfig
from mailsrv.store.quotalimits import QuotaConfig


@dataclass(frozen=True)
class Config:
    path: str
    server: ServerConfig
    listen: Mapping[str, tuple[str, ...]]
    tls: TLSConfig
    limits: LimitsConfig
    auth: AuthConfig
    imap: IMAPConfig
    relay: RelayConfig
    dns: DNSConfig
    addresses: AddressesConfig = field(default=None)  # type: ignore[assignment]
    dkim: DkimConfig = field(default=None)  # type: ignore[assignment]
    filter: FilterConfig | None = None  # None: no spam filter
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    quota: QuotaConfig = field(default_factory=QuotaConfig)  # [quota]: storage limits
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # [metrics]: Prometheus page
    raw: Mapping[str, Any] = field(repr=False, default_factory=dict)
    # The TOML text and the folder relative paths are taken from: what the
    # relay process needs to build the very same settings.
    source: str = field(repr=False, default="")
    base_dir: Path | None = None

    @property
    def mail_dir(self) -> Path:
        return self.server.data_dir / "mail"

    @property
    def index_dir(self) -> Path:
        return self.server.data_dir / "index"

    @property
    def queue_dir(self) -> Path:
        return self.server.data_dir / "queue"

    @property
    def spool_dir(self) -> Path:
        return self.server.data_dir / "tmp"

    def is_local_domain(self, domain: str) -> bool:
        """Whether mail for C{domain} is ours: a domain of ours or an alias of one."""
        d = _local_form(domain)
        return d in self.server.domains or (
            self.addresses is not None and d in self.addresses.domain_aliases
        )

    def is_user_domain(self, domain: str) -> bool:
        """Whether users may have addresses in C{domain} (not a domain alias)."""
        return _local_form(domain) in self.server.domains


def _local_form(domain: str) -> str:
    """A domain as the config keeps it: lower-case A-labels (UTS-46), no final dot."""
    d = domain.lower().rstrip(".")
    if d.isascii() and not d.startswith("xn--") and ".xn--" not in d:
        return d  # the common case, without the idna call
    try:
        return normalise_domain(d)
    except ValueError:
        return d
