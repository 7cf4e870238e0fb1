"""
``mailsrv dkim keygen DOMAIN [--selector S] [--type ed25519|rsa] [--force]``:
make a DKIM signing key for a local domain (RFC 6376; ed25519 per RFC 8463,
or RSA-2048 per RFC 8301), write it where C{[dkim] keys} names it (else
C{data_dir/dkim/DOMAIN.SELECTOR.key}, to be added to the config), mode
0600, and print the TXT record to publish at C{SELECTOR._domainkey.DOMAIN}.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from mailsrv.addresses.domains import DomainError, ascii_domain
from mailsrv.config import Config
from mailsrv.dkim.keys import KEY_TYPES, generate, txt_record, write_key

HANDLER = "handler"


class KeygenError(Exception):
    """A key that is not made; the text says why."""


def add_dkim_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``dkim`` subcommand (keygen) to C{subparsers}."""
    p = subparsers.add_parser("dkim", help="DKIM signing keys of the local domains")
    sub = p.add_subparsers(dest="dkim_command", metavar="{keygen}")
    sub.required = True
    keygen = sub.add_parser(
        "keygen", help="make a domain's signing key and print its DNS TXT record"
    )
    keygen.add_argument("domain")
    keygen.add_argument("--selector", help="the s= selector (default: [dkim] selector)")
    # RSA by default: not every receiver verifies ed25519 (RFC 8463) yet.
    keygen.add_argument("--type", choices=KEY_TYPES, default="rsa", dest="key_type")
    keygen.add_argument("--force", action="store_true", help="replace an existing key file")
    keygen.set_defaults(**{HANDLER: keygen_command})
    return p


def keygen_command(args: argparse.Namespace, config: Config) -> int:
    """Make the key; print where it went, what to configure and the TXT record."""
    try:
        domain = ascii_domain(args.domain.strip().rstrip("."))
    except DomainError as e:
        raise KeygenError(f"{args.domain}: {e}")
    if not config.is_local_domain(domain):
        raise KeygenError(f"{domain} is not a local domain of this server ({config.path})")
    selector = args.selector or config.dkim.selector
    configured = config.dkim.keys.get(domain)
    path = Path(os.path.normpath(configured or key_path(config, domain, selector)))
    data, public = generate(args.key_type)
    try:
        write_key(path, data, force=args.force)
    except FileExistsError:
        raise KeygenError(f"{path} exists: its key may be published; --force replaces it")
    print(f"wrote the {args.key_type} DKIM key of {domain} to {path} (mode 0600)")
    if configured is None:
        print(f'add to [dkim] in {config.path}: keys = {{ "{domain}" = "{path}" }}')
    if selector != config.dkim.selector:
        print(f'set [dkim] selector = "{selector}" in {config.path} (one for all domains)')
    record = txt_record(args.key_type, public)
    print("as a line of a zone file (RFC 1035 5.1; strings of at most 255 octets):")
    print(zone_line(f"{selector}._domainkey.{domain}.", record))
    print(f"publish this TXT record at {selector}._domainkey.{domain}:")
    print(record)
    return 0


def zone_line(name: str, record: str) -> str:
    """
    C{record} as a TXT line of a zone file: an RSA key is longer than the
    255 octets one character-string holds (RFC 1035 3.3.14), so it is cut
    into several, which resolvers give back joined (RFC 6376 3.6.2.2).
    """
    strings = " ".join(f'"{record[i : i + 255]}"' for i in range(0, len(record), 255))
    return f"{name} IN TXT ( {strings} )"


def key_path(config: Config, domain: str, selector: str) -> Path:
    """Where a key not named in C{[dkim] keys} is written: C{data_dir/dkim/DOMAIN.SELECTOR.key}."""
    return config.server.data_dir / "dkim" / f"{domain}.{selector}.key"
