"""
Loading: which file, TOML parsing, and every section validated at once into
a L{Config}; every problem is collected and reported together.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from mailsrv.config import auth, mail, operations, policy, server
from mailsrv.config.auth import AuthConfig
from mailsrv.config.errors import ConfigError
from mailsrv.config.mail import AddressesConfig, DkimConfig, _filter_config, _srs_default
from mailsrv.config.model import Config
from mailsrv.config.policy import PolicyConfig, _greylist_errors, _network_file_errors
from mailsrv.config.server import (
    LISTENERS,
    DNSConfig,
    IMAPConfig,
    LimitsConfig,
    RelayConfig,
    ServerConfig,
    TLSConfig,
)
from mailsrv.config.values import _hostport
from mailsrv.metrics.settings import MetricsConfig
from mailsrv.store.quotalimits import QuotaConfig

DEFAULT_CONFIG = """\
# The embedded default: loopback only, unprivileged ports, data in ./data.
[server]
hostname = "localhost"
domains = ["example.test"]
data_dir = "data"

[listen]
smtp = ["tcp:2525:interface=127.0.0.1"]
submission = ["tcp:2587:interface=127.0.0.1"]
submissions = ["tcp:2465:interface=127.0.0.1"]
pop3 = ["tcp:2110:interface=127.0.0.1"]
pop3s = ["tcp:2995:interface=127.0.0.1"]
imap = ["tcp:2143:interface=127.0.0.1"]
imaps = ["tcp:2993:interface=127.0.0.1"]
"""


# section -> key -> (validator, default), in the order sections are listed in errors.
_SCHEMA: dict[str, dict[str, tuple[Callable[[Any], Any], Any]]] = {
    **server.SCHEMA,
    **auth.SCHEMA,
    **server.IMAP_RELAY_DNS_SCHEMA,
    **mail.SCHEMA,
    **policy.SCHEMA,
    **operations.SCHEMA,
}


def _near(name: str, known: Iterable[str]) -> str:
    """The hint ", did you mean X?" for the known name nearest a typo'd one, else ""."""
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f", did you mean {match[0]}?" if match else ""


def schema() -> Mapping[str, Mapping[str, tuple[Callable[[Any], Any], Any]]]:
    """Every section and key: (validator, built-in default; None: not set)."""
    return _SCHEMA


def validate(raw: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Each section's keys checked and converted, defaults filled in; and the problems."""
    errors: list[str] = []
    return _validate(raw, errors), errors


def _validate(raw: Mapping[str, Any], errors: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for section in raw:
        if section not in _SCHEMA:
            hint = _near(section, _SCHEMA)
            errors.append(f"[{section}]: unknown section{hint} (known: {', '.join(_SCHEMA)})")
        elif not isinstance(raw[section], dict):
            errors.append(f"[{section}]: must be a table")
    for section, keys in _SCHEMA.items():
        given = raw.get(section, {})
        if not isinstance(given, dict):
            given = {}
        values: dict[str, Any] = {}
        for key in given:
            if key not in keys:
                hint = _near(key, keys)
                errors.append(f"{section}.{key}: unknown key{hint} (known: {', '.join(keys)})")
        for key, (check, default) in keys.items():
            if key in given:
                try:
                    values[key] = check(given[key])
                except ValueError as e:
                    errors.append(f"{section}.{key}: {e}")
                    values[key] = None if default is None else check(default)
            else:
                values[key] = None if default is None else check(default)
        out[section] = values
    return out


def parse(text: str, path: str = "<config>", base_dir: Path | None = None) -> Config:
    """Parse TOML text into a L{Config}; raise L{ConfigError} listing every problem."""
    errors: list[str] = []
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, [f"not valid TOML: {e}"])
    v = _validate(raw, errors)
    base = base_dir if base_dir is not None else Path.cwd()

    def rel(p: str | None, under: Path) -> Path | None:
        if p is None:
            return None
        q = Path(os.path.expanduser(p))
        return q if q.is_absolute() else (under / q)

    data_dir = rel(v["server"]["data_dir"], base)
    assert data_dir is not None
    data_dir = data_dir.absolute()
    tls = v["tls"]
    if (tls["certificate"] is None) != (tls["key"] is None):
        errors.append("tls: give both certificate and key, or neither for a self-signed one")
    if not v["server"]["domains"]:
        errors.append("server.domains: at least one local domain is needed")
    relay = v["relay"]
    if relay["smarthost"] is not None:
        try:
            _hostport(25)(relay["smarthost"])
        except ValueError as e:
            errors.append(f"relay.smarthost: {e}")
    if (relay["smarthost_username"] is None) != (relay["smarthost_password"] is None):
        errors.append("relay: give both smarthost_username and smarthost_password, or neither")
    if relay["retry_min"] > relay["retry_max"]:
        errors.append("relay.retry_min: must not exceed relay.retry_max")
    addresses = v["addresses"]
    domains = v["server"]["domains"]
    for alias, target in addresses["domain_aliases"].items():
        if alias in domains:
            errors.append(f"addresses.domain_aliases: {alias} is a domain of server.domains")
        elif target not in domains:
            errors.append(
                f"addresses.domain_aliases: {alias} = {target}: {target} is not in server.domains"
            )
    for domain in addresses["catch_all"]:
        # A domain alias may have its own catch-all: it takes the addresses
        # that are nobody in the domain the alias stands for.
        if domain not in domains and domain not in addresses["domain_aliases"]:
            errors.append(f"addresses.catch_all: {domain} is not a local domain")
    local_domains = set(domains) | set(addresses["domain_aliases"])
    for address in addresses["lists"]:
        if address.rpartition("@")[2] not in local_domains:
            errors.append(f"addresses.lists: {address} is not in a local domain")
    filter_config = _filter_config(v["filter"], errors)
    policy = v["policy"]
    for key in ("deny_file", "allow_file"):
        policy[key] = rel(policy[key], base)
        if policy[key] is not None:
            errors.extend(_network_file_errors(f"policy.{key}", policy[key]))
    errors.extend(_greylist_errors(policy))
    if policy["reject_unknown_client"] and not policy["reverse_dns"]:
        errors.append(
            "policy.reject_unknown_client: needs reverse_dns = true (without the lookup every"
            " client is unknown)"
        )
    if errors:
        raise ConfigError(path, errors)

    return Config(
        path=path,
        server=ServerConfig(
            hostname=v["server"]["hostname"],
            domains=v["server"]["domains"],
            data_dir=data_dir,
            user=v["server"]["user"],
            group=v["server"]["group"],
        ),
        listen={name: v["listen"][name] for name in LISTENERS},
        tls=TLSConfig(
            certificate=rel(tls["certificate"], base),
            key=rel(tls["key"], base),
        ),
        limits=LimitsConfig(**v["limits"]),
        auth=AuthConfig(
            passwd_file=rel(v["auth"]["passwd_file"], data_dir),  # type: ignore[arg-type]
            cleartext=v["auth"]["cleartext"],
            failure_delay=v["auth"]["failure_delay"],
            max_failures=v["auth"]["max_failures"],
            failure_window=v["auth"]["failure_window"],
            account_slow_after=v["auth"]["account_slow_after"],
            account_max_delay=v["auth"]["account_max_delay"],
            account_max_failures=v["auth"]["account_max_failures"],
            account_known_clients=v["auth"]["account_known_clients"],
            account_known_time=v["auth"]["account_known_time"],
        ),
        imap=IMAPConfig(
            max_literal_size=v["imap"]["max_literal_size"],
            idle_timeout=v["imap"]["idle_timeout"],
            special_folders=v["imap"]["special_folders"],
        ),
        relay=RelayConfig(**relay),
        dns=DNSConfig(nameservers=v["dns"]["nameservers"]),
        addresses=AddressesConfig(
            aliases=rel(addresses["aliases"], base),  # type: ignore[arg-type]
            recipient_delimiter=addresses["recipient_delimiter"],
            postmaster=addresses["postmaster"],
            catch_all=addresses["catch_all"],
            domain_aliases=addresses["domain_aliases"],
            srs_domain=addresses["srs_domain"] or _srs_default(v["server"]["hostname"]),
            lists=addresses["lists"],
        ),
        dkim=DkimConfig(
            keys={d: rel(f, base) for d, f in v["dkim"]["keys"].items()},  # type: ignore[misc]
            selector=v["dkim"]["selector"],
        ),
        filter=filter_config,
        policy=PolicyConfig(**policy),
        quota=QuotaConfig(**v["quota"]),
        metrics=MetricsConfig(listen=v["metrics"]["listen"]),
        raw=raw,
        source=text,
        base_dir=base,
    )


SYSTEM_CONFIG = Path("/etc/mailsrv/mailsrv.toml")
CONFIG_ENV = "MAILSRV_CONFIG"


def find_config(
    option: str | os.PathLike[str] | None,
    environ: Mapping[str, str] | None = None,
    system: Path = SYSTEM_CONFIG,
) -> tuple[Path | None, str]:
    """
    The config file both ``twistd mailsrv`` and ``mailsrv`` use, and where
    that choice came from: the C{--config} option, else the C{MAILSRV_CONFIG}
    environment variable, else C{/etc/mailsrv/mailsrv.toml} when it exists,
    else None for the built-in default (its relative paths are relative to
    the current folder).
    """
    if option is not None:
        return Path(option), "--config"
    env = (os.environ if environ is None else environ).get(CONFIG_ENV)
    if env:
        return Path(env), CONFIG_ENV
    if system.exists():
        return system, str(system)
    return None, "built-in default"


def load(path: str | os.PathLike[str] | None) -> Config:
    """Load the config file at C{path}, or the embedded default when None."""
    if path is None:
        return parse(DEFAULT_CONFIG, "<default>", Path.cwd())
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(str(p), [f"cannot read: {e.strerror}"])
    except UnicodeDecodeError as e:
        raise ConfigError(str(p), [f"not UTF-8: {e}"])
    return parse(text, str(p), p.absolute().parent)
