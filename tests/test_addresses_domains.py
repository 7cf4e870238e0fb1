"""Domains in one form (IDNA2008 with UTS-46, A-labels) and what of an address needs SMTPUTF8."""

from __future__ import annotations

import pytest

from mailsrv.addresses import aliases
from mailsrv.addresses.domains import (
    DomainError,
    ascii_address,
    ascii_domain,
    needs_smtputf8,
    normalise_domain,
)


def test_one_form_for_u_labels_and_a_labels():
    for spelling in ("Bücher.example", "bücher.example.", "XN--BCHER-KVA.example"):
        assert normalise_domain(spelling) == "xn--bcher-kva.example"
    assert normalise_domain("ｅｘａｍｐｌｅ.test") == "example.test"  # UTS-46 mapping
    for bad in ("", "bü_cher.example", "xn--zz.example"):
        with pytest.raises(DomainError):
            normalise_domain(bad)


def test_aliases_keeps_the_name_and_its_error():
    assert aliases.normalise_domain is normalise_domain
    with pytest.raises(aliases.AliasSyntaxError):
        aliases.split_address("a@bü_cher.example")


def test_ascii_forms():
    assert ascii_domain("Host_1.LAN") == "host_1.lan"  # ASCII names pass as they always have
    assert ascii_domain("Bücher.example") == "xn--bcher-kva.example"
    assert ascii_address("müller@bücher.example") == "müller@xn--bcher-kva.example"
    assert ascii_address("") == ""
    with pytest.raises(DomainError):
        ascii_domain("bü_cher.example")


def test_only_a_non_ascii_local_part_needs_smtputf8():
    # RFC 6531 3.2: an A-label domain is always acceptable.
    assert needs_smtputf8("jösé@example.test")
    assert not needs_smtputf8("a@bücher.example")
    assert not needs_smtputf8("")
