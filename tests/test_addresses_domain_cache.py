"""An IDN recipient is mapped with UTS-46 once, not at each RCPT."""

from __future__ import annotations

from pathlib import Path

import idna
import pytest
from twisted.internet.task import Clock

from mailsrv.addresses import aliases
from mailsrv.addresses.resolver import address_rules
from mailsrv.auth.passwd import PasswordFile
from mailsrv.config import parse
from mailsrv.routing import Mailbox, Router


def test_an_idn_domain_is_mapped_once_for_many_recipients(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "aliases").write_text("kontakt@bücher.example: anna\n")
    config = parse(
        '[server]\ndomains = ["example.test", "bücher.example"]\ndata_dir = "data"\n',
        base_dir=tmp_path,
    )
    config.server.data_dir.mkdir()
    config.auth.passwd_file.write_text("anna@xn--bcher-kva.example:{PLAIN}x\n")
    router = Router(
        is_local_domain=config.is_local_domain,
        passwords=PasswordFile(config.auth.passwd_file),
        queue=None,
        addresses=address_rules(config, Clock()),
    )
    mapped: list[str] = []
    real_encode = idna.encode

    def encode(s: str, *args: object, **kwargs: object) -> bytes:
        mapped.append(s)
        return real_encode(s, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(idna, "encode", encode)
    getattr(aliases.normalise_domain, "cache_clear", lambda: None)()  # none remembered yet
    for _ in range(3):
        for address in ("anna@BÜCHER.example", "kontakt@bücher.example"):
            assert router.resolve(address, may_relay=False) == (
                Mailbox("anna@xn--bcher-kva.example"),
            )
    assert mapped.count("bücher.example") <= 1
