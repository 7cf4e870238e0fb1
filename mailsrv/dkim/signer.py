"""
DKIM signing (RFC 6376 5) of mail that leaves from a local domain: a
message submitted by an authenticated user, or a DSN of ours, is signed
once, as it enters the outbound queue, by the key of its C{From:} domain
(the d= domain is the From: domain, or the nearest parent domain with a
key, so that DMARC (RFC 7489 3.1.1) finds them aligned). Mail only relayed or forwarded is never signed here: it
keeps the signatures it came with.

C{dkimpy} needs the whole message in memory: signing reads it, in a pool
thread, and holds it about four times over (the bytes, CRLF lines, the
canonical body). Messages up to L{SMALL} are signed side by side; larger
ones (up to C{[limits] max_message_size}) one at a time, so the memory
signing takes stays below some five times the largest message.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from email.utils import getaddresses
from typing import Any

import dkim
from twisted.internet import defer

from mailsrv.addresses.domains import DomainError, ascii_domain
from mailsrv.dkim.keys import DkimKeyError, SigningKey, load_key
from mailsrv.logsafe import SafeLogger
from mailsrv.returnpath import PrefixSource
from mailsrv.spool import BytesSource
from mailsrv.startup import StartupError

SMALL = 256 * 1024  # the spool's in-memory size: signed without waiting for the others
# RFC 6376 3.4.2 and 3.4.4: relaxed header and body canonicalization.
CANONICALIZE = (b"relaxed", b"relaxed")
_LINE_END = re.compile(rb"\r?\n")


def signature(message: bytes, keys: Mapping[str, SigningKey]) -> bytes | None:
    """
    The C{DKIM-Signature:} field (LF line ends) for C{message} (LF or CRLF
    line ends), by the key of its From: domain; None when the message has
    not exactly one From: field, its addresses are not all of one domain,
    or that domain has no key. Blocking: call it in a pool thread.
    """
    crlf = _LINE_END.sub(b"\r\n", message)
    try:
        signer = dkim.DKIM(crlf, linesep=b"\r\n")
    except dkim.MessageFormatError:
        return None
    key = _key_for(_from_domain(signer.headers), keys)
    if key is None:
        return None
    # RFC 6376 5.4: the header fields 5.4.1 recommends, each as often as it
    # is present, From once more (5.4.2: so that no From: can be added).
    field = signer.sign(
        key.selector.encode("ascii"),
        key.domain.encode("ascii"),
        key.private,
        signature_algorithm=key.algorithm,
        canonicalize=CANONICALIZE,
        include_headers=signer.default_sign_headers(),
    )
    return field.replace(b"\r\n", b"\n")


def _key_for(domain: str | None, keys: Mapping[str, SigningKey]) -> SigningKey | None:
    """
    The key of C{domain}, else of its nearest parent domain with one (mail
    from the host name, as DSNs are, signed as its domain's: DMARC's relaxed
    alignment, RFC 7489 3.1.1).
    """
    while domain:
        if domain in keys:
            return keys[domain]
        domain = domain.partition(".")[2]
    return None


def _from_domain(headers: list[Any]) -> str | None:
    """The one domain of the message's one From: field (RFC 5322 3.6.2), as A-labels."""
    values = [v for name, v in headers if name.lower() == b"from"]
    if len(values) != 1:
        return None  # RFC 5322 3.6: exactly one From:
    text = values[0].decode("utf-8", "replace").replace("\r\n", "")
    domains = set()
    for _, address in getaddresses([text]):
        local, at, domain = address.rpartition("@")
        if not at or not local or not domain:
            return None
        try:
            domains.add(ascii_domain(domain.rstrip(".")))
        except DomainError:
            return None
    return domains.pop() if len(domains) == 1 else None


class DkimSigner:
    """
    Signs messages on their way into the queue (L{sign}) with the keys of
    the local domains. C{in_pool} runs a blocking function in a thread pool
    and returns a Deferred of its result.
    """

    log = SafeLogger()

    def __init__(
        self,
        keys: Mapping[str, SigningKey],
        in_pool: Callable[[Callable[[], Any]], defer.Deferred],
    ) -> None:
        self.keys = dict(keys)
        self._in_pool = in_pool
        self._large = defer.DeferredSemaphore(1)

    def sign(self, source: Any) -> defer.Deferred:
        """
        Fire with the message source to queue: C{source} with its
        C{DKIM-Signature:} field first (RFC 6376 5.6), or C{source} itself
        when it has no key or cannot be signed (the message goes unsigned,
        which is logged, rather than not at all).
        """
        if source.size <= SMALL:
            return self._signed(source)
        return self._large.run(self._signed, source)

    def _signed(self, source: Any) -> defer.Deferred:
        def read_and_sign() -> Any:
            with source.open() as f:
                data = f.read()
            field = signature(data, self.keys)
            if field is None:
                return source
            if len(data) <= SMALL:
                return BytesSource(field + data)  # in memory already: the queue keeps it so
            return PrefixSource(field, source)  # the rest stays in the spool file

        def failed(failure: Any) -> Any:
            self.log.error("DKIM signing failed, queued unsigned: {why}", why=str(failure.value))
            return source

        return self._in_pool(read_and_sign).addErrback(failed)


def load_signer(
    config: Any, in_pool: Callable[[Callable[[], Any]], defer.Deferred]
) -> DkimSigner | None:
    """
    The signer for C{config}'s C{[dkim] keys}, each read now (an unusable
    key stops the start: L{StartupError}); None when no
    domain has a key.
    """
    settings = getattr(config, "dkim", None)
    if settings is None or not settings.keys:
        return None
    keys = {}
    for domain, path in settings.keys.items():
        try:
            keys[domain] = load_key(path, domain, settings.selector)
        except DkimKeyError as e:
            raise StartupError(config.path, f'dkim.keys."{domain}"', path, str(e))
    return DkimSigner(keys, in_pool)
