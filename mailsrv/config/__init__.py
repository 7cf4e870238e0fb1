"""
The configuration: a TOML file turned into frozen, typed settings.

Every error in a file is collected and reported at once, each naming its key
and the file, so that a typo never starts a half-configured server. The
modules: C{loading} (which file, parsing, validation), C{model} (L{Config}),
one module per group of sections (C{server}, C{auth}, C{mail}, C{policy}),
C{values} (the shared validators) and C{errors}; every name is importable
from here.
"""

from mailsrv.config.auth import CLEARTEXT_POLICIES, AuthConfig
from mailsrv.config.errors import ConfigError
from mailsrv.config.loading import (
    CONFIG_ENV,
    DEFAULT_CONFIG,
    SYSTEM_CONFIG,
    find_config,
    load,
    parse,
)
from mailsrv.config.mail import AddressesConfig, DkimConfig, FilterConfig
from mailsrv.config.model import Config
from mailsrv.config.policy import PolicyConfig
from mailsrv.config.server import (
    IMPLICIT_TLS,
    LISTENERS,
    TLS_POLICIES,
    DNSConfig,
    IMAPConfig,
    LimitsConfig,
    RelayConfig,
    ServerConfig,
    TLSConfig,
    endpoint_port,
)
from mailsrv.config.values import _duration

__all__ = [
    "CLEARTEXT_POLICIES",
    "CONFIG_ENV",
    "DEFAULT_CONFIG",
    "IMPLICIT_TLS",
    "LISTENERS",
    "SYSTEM_CONFIG",
    "TLS_POLICIES",
    "AddressesConfig",
    "AuthConfig",
    "Config",
    "ConfigError",
    "DNSConfig",
    "DkimConfig",
    "FilterConfig",
    "IMAPConfig",
    "LimitsConfig",
    "PolicyConfig",
    "RelayConfig",
    "ServerConfig",
    "TLSConfig",
    "_duration",
    "endpoint_port",
    "find_config",
    "load",
    "parse",
]
