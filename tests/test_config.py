"""Tests for mailsrv.config: TOML to typed settings, every error at once."""

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailsrv import config
from mailsrv.config import ConfigError, load, parse

ROOT = Path(__file__).resolve().parent.parent


def test_default_is_safe():
    c = load(None)
    assert c.path == "<default>"
    for name, endpoints in c.listen.items():
        assert endpoints, name
        for e in endpoints:
            assert "interface=127.0.0.1" in e
            port = int(e.split(":")[1])
            assert port > 1024
    assert c.tls.certificate is None and c.tls.key is None
    assert c.server.data_dir == Path.cwd() / "data"
    assert c.limits.max_message_size == 50 * 1024 * 1024
    assert c.auth.cleartext == "loopback"


def test_example_file_loads():
    c = load(ROOT / "etc" / "mailsrv.toml")
    assert c.server.hostname == "mail.example.test"
    assert c.server.domains == ("example.test",)
    # relative to the config file's folder
    assert c.server.data_dir == (ROOT / "etc" / ".." / "data").absolute()
    assert c.auth.passwd_file == c.server.data_dir / "passwd"
    assert c.relay.max_lifetime == 5 * 86400
    assert c.relay.delay_warning == 4 * 3600
    assert c.limits.timeout == 300
    assert c.dns.nameservers == ()


def test_relative_paths_follow_config_file(tmp_path):
    f = tmp_path / "conf" / "m.toml"
    f.parent.mkdir()
    f.write_text('[server]\ndata_dir = "d"\n[tls]\ncertificate = "c.pem"\nkey = "/abs/k.pem"\n')
    c = load(f)
    assert c.server.data_dir == tmp_path / "conf" / "d"
    assert c.tls.certificate == tmp_path / "conf" / "c.pem"
    assert c.tls.key == Path("/abs/k.pem")


def test_every_error_reported_at_once_with_key_and_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text(
        "[server]\n"
        'hostnme = "x"\n'
        'domains = "example.test"\n'
        "[listen]\n"
        'smtp = ["tcpx:25"]\n'
        "[limits]\n"
        'max_message_size = "big"\n'
        'timeout = "5 minutes"\n'
        "[bogus]\n"
        "x = 1\n"
    )
    with pytest.raises(ConfigError) as e:
        load(f)
    msg = str(e.value)
    assert str(f) in msg
    errors = e.value.errors
    assert any(x.startswith("server.hostnme: unknown key") for x in errors)
    assert any(x.startswith("server.domains: must be a list") for x in errors)
    assert any(x.startswith("listen.smtp:") and "tcpx:25" in x for x in errors)
    assert any(x.startswith("limits.max_message_size: must be a size such as") for x in errors)
    assert any(x.startswith("limits.timeout:") for x in errors)
    assert any(x.startswith("[bogus]: unknown section") for x in errors)
    assert len(errors) == 6


def test_not_toml():
    with pytest.raises(ConfigError) as e:
        parse("[server\n", "x.toml")
    assert "not valid TOML" in e.value.errors[0]


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        load(tmp_path / "nope.toml")
    assert "cannot read" in e.value.errors[0]


def test_cross_field_checks():
    with pytest.raises(ConfigError) as e:
        parse(
            '[tls]\ncertificate = "a.pem"\n'
            '[relay]\nsmarthost = "h:x"\nsmarthost_username = "u"\nretry_min = "2h"\nretry_max = "1h"\n'
            "[server]\ndomains = []\n"
        )
    errs = "\n".join(e.value.errors)
    assert "tls: give both" in errs
    assert "relay.smarthost" in errs
    assert "smarthost_password" in errs
    assert "retry_min" in errs
    assert "server.domains" in errs


def test_nameservers_and_policy():
    c = parse(
        '[dns]\nnameservers = ["127.0.0.1:5300", "::1", "[::1]:53"]\n'
        '[relay.tls_policy]\n"Bank.Example" = "verify"\n'
    )
    assert c.dns.nameservers == (("127.0.0.1", 5300), ("::1", 53), ("::1", 53))
    assert c.relay.tls_policy == {"bank.example": "verify"}
    with pytest.raises(ConfigError):
        parse('[dns]\nnameservers = ["ns.example.test"]\n')
    with pytest.raises(ConfigError):
        parse('[relay.tls_policy]\n"x.test" = "sometimes"\n')


def test_domains_lowercased_and_local_check():
    c = parse('[server]\ndomains = ["Example.TEST."]\n')
    assert c.server.domains == ("example.test",)
    assert c.is_local_domain("EXAMPLE.test")
    assert not c.is_local_domain("other.test")


def test_bool_is_not_int():
    with pytest.raises(ConfigError):
        parse("[limits]\nmax_recipients = true\n")


@given(st.text(max_size=200))
def test_parse_never_crashes_on_garbage(text):
    try:
        parse(text)
    except ConfigError as e:
        assert e.errors


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from("smhdw"))
def test_duration_strings(n, unit):
    mult = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]
    assert config._duration(f"{n}{unit}") == n * mult


def test_listen_ports_between_1_and_65535():
    assert config.endpoint_port("tcp:2525:interface=127.0.0.1") == 2525
    assert config.endpoint_port("tcp6:port=993:interface=\\:\\:1") == 993
    assert config.endpoint_port("unix:/run/mailsrv.sock") is None
    parse('[listen]\nsmtp = ["tcp:65535"]\nimaps = ["tcp:1:interface=127.0.0.1"]\n')
    for bad in ("tcp:99999", "tcp:0:interface=127.0.0.1", "tcp:port=70000"):
        with pytest.raises(ConfigError) as e:
            parse(f'[listen]\nsmtp = ["{bad}"]\n', "m.toml")
        (line,) = str(e.value).splitlines()
        assert line.startswith("m.toml: listen.smtp: ") and bad in line and "65535" in line


def test_find_config_order(tmp_path):
    system = tmp_path / "system.toml"
    env = {"MAILSRV_CONFIG": "/env.toml"}
    assert config.find_config("/opt.toml", env, system) == (Path("/opt.toml"), "--config")
    assert config.find_config(None, env, system) == (Path("/env.toml"), "MAILSRV_CONFIG")
    assert config.find_config(None, {}, system) == (None, "built-in default")
    system.write_text("")
    assert config.find_config(None, {"MAILSRV_CONFIG": ""}, system) == (system, str(system))


# --- [addresses] ----------------------------------------------------------------

_DOMAINS = (
    '[server]\nhostname = "Mail.Example.TEST"\ndomains = ["example.test", "Bücher.example"]\n'
)


def _addresses(text: str, path: str = "m.toml"):
    return parse(_DOMAINS + "[addresses]\n" + text, path, Path("/etc/mailsrv"))


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        _addresses(text)
    (line,) = str(e.value).splitlines()
    assert line.startswith("m.toml: addresses.")
    return line[len("m.toml: ") :]


def test_addresses_defaults():
    a = _addresses("").addresses
    assert a.aliases == Path("/etc/mailsrv/aliases")  # beside the config file
    assert a.recipient_delimiter == "+"
    assert a.postmaster is None
    assert (a.catch_all, a.domain_aliases, a.lists) == ({}, {}, {})
    assert a.srs_domain == "mail.example.test"  # server.hostname, lower-case
    assert load(None).addresses.aliases == Path.cwd() / "aliases"


def test_addresses_good_values(tmp_path):
    f = tmp_path / "conf" / "m.toml"
    f.parent.mkdir()
    f.write_text(
        _DOMAINS
        + "[addresses]\n"
        + 'aliases = "maps/aliases"\n'
        + 'recipient_delimiter = "+-"\n'
        + 'postmaster = "Admin@EXAMPLE.test"\n'
        + 'catch_all = { "Example.TEST" = "alice@example.test", "bücher.example" = "b@x.test" }\n'
        + 'domain_aliases = { "Example.ORG" = "example.test", "bücher.org" = "BÜCHER.example" }\n'
        + 'srs_domain = "Fwd.Example.TEST."\n'
        + 'lists = { "Team@Example.TEST" = "  Team <team.example.test> ", "all@example.org" = "" }\n'
    )
    a = load(f).addresses
    assert a.aliases == tmp_path / "conf" / "maps" / "aliases"  # relative to the config's folder
    assert a.recipient_delimiter == "+-"
    assert a.postmaster == "Admin@example.test"  # the domain in one form, the local part kept
    assert a.catch_all == {
        "example.test": "alice@example.test",
        "xn--bcher-kva.example": "b@x.test",
    }
    assert a.domain_aliases == {
        "example.org": "example.test",
        "xn--bcher-kva.org": "xn--bcher-kva.example",
    }
    assert a.srs_domain == "fwd.example.test"
    assert a.lists == {"Team@example.test": "Team <team.example.test>", "all@example.org": ""}
    assert _addresses('recipient_delimiter = ""').addresses.recipient_delimiter == ""  # none
    assert _addresses('aliases = "/var/lib/mailsrv/aliases"').addresses.aliases == Path(
        "/var/lib/mailsrv/aliases"
    )


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('postmaster = "alice"', "addresses.postmaster: 'alice' is not an address (local@domain)"),
        (
            'postmaster = "al ice@example.test"',
            "addresses.postmaster: 'al ice@example.test' is not an address (local@domain)",
        ),
        (
            'postmaster = "a@b@example.test"',
            "addresses.postmaster: 'a@b@example.test' is not an address (local@domain)",
        ),
        (
            'postmaster = "alice@exa mple.test"',
            "addresses.postmaster: 'exa mple.test' is not a domain name",
        ),
        ('postmaster = ""', "addresses.postmaster: must not be empty"),
        (
            'catch_all = { "example.test" = "nobody" }',
            "addresses.catch_all: 'nobody' is not an address (local@domain)",
        ),
        (
            'catch_all = "a@example.test"',
            'addresses.catch_all: must be a table of "domain" = "address"',
        ),
        (
            'catch_all = { "remote.test" = "a@example.test" }',
            "addresses.catch_all: remote.test is not a local domain",
        ),
        (
            'domain_aliases = { "example.org" = "remote.test" }',
            "addresses.domain_aliases: example.org = remote.test: remote.test is not in server.domains",
        ),
        (
            'domain_aliases = { "bücher.example" = "example.test" }',
            "addresses.domain_aliases: xn--bcher-kva.example is a domain of server.domains",
        ),
        (
            'domain_aliases = { "example.org" = "bad domain" }',
            "addresses.domain_aliases: 'bad domain' is not a domain name",
        ),
        (
            'lists = { "team@example.test" = "Team" }',
            "addresses.lists: 'team@example.test': the List-Id must look like "
            "\"Name <id.example.test>\" (RFC 2919), or be empty, not 'Team'",
        ),
        (
            'lists = { "team@example.test" = "<" }',
            "addresses.lists: 'team@example.test': the List-Id must look like "
            "\"Name <id.example.test>\" (RFC 2919), or be empty, not '<'",
        ),
        (
            'lists = { "team@example.test" = "Team <team>" }',
            "addresses.lists: 'team@example.test': the List-Id must look like "
            "\"Name <id.example.test>\" (RFC 2919), or be empty, not 'Team <team>'",
        ),
        (
            'lists = { "team@example.test" = "Team <a.b>\\r\\nBcc: x" }',
            "addresses.lists: 'team@example.test': the List-Id must look like "
            "\"Name <id.example.test>\" (RFC 2919), or be empty, not 'Team <a.b>\\r\\nBcc: x'",
        ),
        (
            'lists = { "team" = "Team <team.example.test>" }',
            "addresses.lists: 'team' is not an address (local@domain)",
        ),
        (
            'lists = { "team@remote.test" = "Team <team.example.test>" }',
            "addresses.lists: team@remote.test is not in a local domain",
        ),
        (
            'recipient_delimiter = " "',
            "addresses.recipient_delimiter: ' ': a delimiter cannot be a space, '@', a quote "
            "or a backslash",
        ),
        (
            'recipient_delimiter = "+@"',
            "addresses.recipient_delimiter: '+@': a delimiter cannot be a space, '@', a quote "
            "or a backslash",
        ),
        (
            "recipient_delimiter = 1",
            "addresses.recipient_delimiter: must be a string, not an integer",
        ),
        ('srs_domain = "bad domain"', "addresses.srs_domain: 'bad domain' is not a domain name"),
        ('aliases = ""', "addresses.aliases: must not be empty"),
    ],
)
def test_addresses_errors(text, error):
    assert _error(text) == error


def test_addresses_unknown_key_and_every_error_at_once():
    with pytest.raises(ConfigError) as e:
        _addresses('alias = "x"\npostmaster = "x"\ncatch_all = { "remote.test" = "a@b.test" }\n')
    assert e.value.errors == [
        "addresses.alias: unknown key, did you mean aliases? (known: aliases, recipient_delimiter, postmaster, "
        "catch_all, domain_aliases, srs_domain, lists)",
        "addresses.postmaster: 'x' is not an address (local@domain)",
        "addresses.catch_all: remote.test is not a local domain",
    ]


def test_idn_domains_in_one_form():
    c = _addresses('domain_aliases = { "Bücher.org" = "xn--bcher-kva.example" }')
    assert c.server.domains == ("example.test", "xn--bcher-kva.example")  # A-labels
    for form in (
        "bücher.example",
        "BÜCHER.example.",
        "xn--bcher-kva.example",
        "XN--BCHER-KVA.EXAMPLE",
    ):
        assert c.is_local_domain(form), form
        assert c.is_user_domain(form), form
    assert c.is_local_domain("bücher.org") and not c.is_user_domain("bücher.org")
    assert not c.is_local_domain("bucher.example")


def test_an_ascii_domain_that_idna2008_refuses_still_works():
    # Names such as mail_1.lan or ab--cd.test (not valid IDNA2008) were taken
    # before domains were compared as A-labels; they are only lower-cased.
    c = parse('[server]\nhostname = "mail_1.lan"\ndomains = ["Mail_1.lan", "ab--cd.test"]\n')
    assert c.server.domains == ("mail_1.lan", "ab--cd.test")
    assert c.addresses.srs_domain == "mail_1.lan"
    assert c.is_local_domain("MAIL_1.LAN.")


def test_the_special_use_folders_are_closed_to_sub_addresses():
    from mailsrv.addresses.resolver import AddressSettings

    settings = AddressSettings.from_config(parse(""))
    assert {"sent", "drafts", "trash", "junk"} <= settings.protected_folders


# --- [policy] mass duplicate mail ------------------------------------------------------


def test_duplicate_recipients_defaults_to_50_and_0_turns_it_off():
    assert parse("").policy.duplicate_recipients == 50
    assert parse("[policy]\nduplicate_recipients = 0\n").policy.duplicate_recipients == 0
    assert parse("[policy]\nduplicate_recipients = 200\n").policy.duplicate_recipients == 200
    for bad in ("-1", '"50"', "true"):
        with pytest.raises(ConfigError, match=r"policy\.duplicate_recipients: must be"):
            parse(f"[policy]\nduplicate_recipients = {bad}\n")


def test_duplicate_window_is_a_duration_longer_than_0():
    assert parse("").policy.duplicate_window == 3600
    assert parse('[policy]\nduplicate_window = "30m"\n').policy.duplicate_window == 1800
    assert parse("[policy]\nduplicate_window = 7200\n").policy.duplicate_window == 7200
    for bad in ('"0s"', "0", '"soon"', "[]"):
        with pytest.raises(ConfigError, match=r"policy\.duplicate_window: must be"):
            parse(f"[policy]\nduplicate_window = {bad}\n")


def test_mailing_lists_take_senders_networks_and_list_ids_and_name_every_bad_entry():
    entries = [
        "news@lists.example.org",
        "@bounces.example.net",
        "198.51.100.0/24",
        "2001:db8::/32",
        "Staff <staff.example.org>",
        "announce.example.com",
    ]
    text = "[policy]\nmailing_lists = [" + ", ".join(f'"{e}"' for e in entries) + "]\n"
    assert parse(text).policy.mailing_lists == tuple(entries)
    assert parse("").policy.mailing_lists == ()
    with pytest.raises(ConfigError) as e:
        parse('[policy]\nmailing_lists = ["nolist", "10.0.0.1/8", "a b@c.d", "<x>"]\n')
    [error] = e.value.errors
    assert error.startswith("policy.mailing_lists: 'nolist' is not an address, a network")
    assert "10.0.0.1/8 has host bits set" in error
    assert "'a b@c.d' is not an address" in error
    assert "'<x>' is not a List-Id" in error
    with pytest.raises(ConfigError, match="policy.mailing_lists: must be a list of strings"):
        parse('[policy]\nmailing_lists = "news@lists.example.org"\n')


# --- [policy] greylisting -----------------------------------------------------------------


def test_greylisting_is_off_by_default_with_postgreys_times():
    p = parse("").policy
    assert p.greylist is False
    assert (p.greylist_delay, p.greylist_retry_window, p.greylist_max_age) == (
        300,
        2 * 86400,
        35 * 86400,
    )
    assert p.greylist_auto_allow == 5
    assert not p.greylist_allow.networks and not p.greylist_allow.recipients


def test_the_example_file_documents_every_greylist_key():
    text = (ROOT / "etc" / "mailsrv.toml").read_text()
    for key in (
        "greylist",
        "greylist_delay",
        "greylist_retry_window",
        "greylist_max_age",
        "greylist_auto_allow",
        "greylist_allow",
    ):
        assert f"# {key} = " in text, key
    # Uncommented, the example's values load.
    block = [
        line.lstrip("# ")
        for line in text.splitlines()
        if line.startswith("# greylist") or line.startswith('#   "')
    ]
    p = parse("[policy]\n" + "\n".join(block) + "\n]\n").policy
    assert p.greylist is True and p.greylist_allow.recipients == {
        "sales@example.test",
        "hostmaster@",
    }


@pytest.mark.parametrize(
    ("line", "field", "value"),
    [
        ("greylist = true", "greylist", True),
        ('greylist_delay = "1s"', "greylist_delay", 1),
        ("greylist_delay = 90", "greylist_delay", 90),
        ('greylist_retry_window = "12h"', "greylist_retry_window", 12 * 3600),
        ('greylist_max_age = "7d"', "greylist_max_age", 7 * 86400),
        ("greylist_auto_allow = 0", "greylist_auto_allow", 0),
    ],
)
def test_each_greylist_key_is_read(line, field, value):
    assert getattr(parse(f"[policy]\n{line}\n").policy, field) == value


def test_greylist_allow_is_parsed_by_kind():
    allow = parse(
        '[policy]\ngreylist_allow = ["192.0.2.0/24", "2001:db8::1", "MX.Partner.test", '
        '"from:News@Shop.test", "from:bank.test", "to:@example.test", "to:sales@"]\n'
    ).policy.greylist_allow
    assert [str(n) for n in allow.networks] == ["192.0.2.0/24", "2001:db8::1/128"]
    assert allow.names == {"mx.partner.test"}
    assert allow.senders == {"news@shop.test", "@bank.test"}
    assert allow.recipients == {"@example.test", "sales@"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("greylist = 1", "policy.greylist: must be true or false"),
        ('greylist_delay = "soon"', "policy.greylist_delay: must be a duration"),
        ("greylist_delay = 0", "policy.greylist_delay: must be at least 1 second"),
        (
            'greylist_delay = "3d"',
            "policy.greylist_retry_window: must be longer than policy.greylist_delay",
        ),
        ('greylist_retry_window = "1m"', "policy.greylist_retry_window: must be longer"),
        ("greylist_max_age = 0", "policy.greylist_max_age: must be at least 1 second"),
        ("greylist_max_age = -5", "policy.greylist_max_age: must not be negative"),
        ("greylist_auto_allow = -1", "policy.greylist_auto_allow: must be at least 0"),
        ('greylist_allow = "10.0.0.0/8"', "policy.greylist_allow: must be a list of strings"),
        ('greylist_allow = ["10.0.0.0/33"]', "policy.greylist_allow: bad entries: '10.0.0.0/33'"),
        ('greylist_allow = ["from:a b@x.test"]', "policy.greylist_allow: bad entries: 'from:a b"),
        ('greylist_allow = ["localhost"]', "policy.greylist_allow: bad entries: 'localhost'"),
    ],
)
def test_a_bad_greylist_key_is_refused_naming_it(text, message):
    with pytest.raises(ConfigError) as e:
        parse(f"[policy]\n{text}\n", "m.toml")
    assert message in str(e.value), str(e.value)
    assert "m.toml" in str(e.value)


# [policy] DNS lists and reverse DNS


def test_dns_lists_default_off():
    p = parse("").policy
    assert p.dnsbl == () and p.dnswl == ()
    assert p.dnsbl_threshold == 1 and p.dnsbl_timeout == 5.0
    assert p.reject_unknown_client is False


def test_dns_list_keys():
    p = parse(
        "[policy]\n"
        'dnsbl = ["zen.example=127.0.0.[2..11]*3", "Bl.Example."]\n'
        'dnswl = ["list.dnswl.example=127.0.[0..255].[1..3]"]\n'
        "dnsbl_threshold = 3\n"
        'dnsbl_timeout = "300ms"\n'
        "reject_unknown_client = true\n"
    ).policy
    assert [(e.zone, e.weight) for e in p.dnsbl] == [("zen.example", 3), ("bl.example", 1)]
    assert p.dnsbl[0].counts("127.0.0.11") and not p.dnsbl[0].counts("127.0.0.12")
    assert p.dnswl[0].zone == "list.dnswl.example" and p.dnswl[0].counts("127.0.9.2")
    assert p.dnsbl_threshold == 3 and p.dnsbl_timeout == 0.3
    assert p.reject_unknown_client is True
    assert parse('[policy]\ndnsbl_timeout = "2s"\n').policy.dnsbl_timeout == 2.0


def test_dns_list_key_errors_name_the_key_and_the_entry():
    with pytest.raises(ConfigError) as e:
        parse(
            "[policy]\n"
            'dnsbl = ["bl..example"]\n'
            'dnswl = ["wl.example=127.0.0"]\n'
            "dnsbl_threshold = 0\n"
            'dnsbl_timeout = "soon"\n'
            'reject_unknown_client = "yes"\n'
        )
    errs = "\n".join(e.value.errors)
    assert "policy.dnsbl: 'bl..example' is not a DNS zone name" in errs
    assert "policy.dnswl: 'wl.example=127.0.0': the answer must be an IPv4 address" in errs
    assert "policy.dnsbl_threshold: must be at least 1" in errs
    assert "policy.dnsbl_timeout: must be seconds" in errs
    assert "policy.reject_unknown_client: must be true or false" in errs
    for bad in ['dnsbl = ["bl.example*heavy"]', 'dnsbl = "bl.example"', "dnsbl_timeout = 0"]:
        with pytest.raises(ConfigError) as e:
            parse(f"[policy]\n{bad}\n")
        assert e.value.errors[0].startswith("policy.dnsbl"), bad


def test_sender_authentication_keys():
    # [policy] authentication_checks, spf_reject, dmarc_reject (mailsrv.authres).
    p = parse("").policy
    assert (p.authentication_checks, p.spf_reject, p.dmarc_reject) == (True, False, True)
    p = parse(
        "[policy]\nauthentication_checks = false\nspf_reject = true\ndmarc_reject = false\n"
    ).policy
    assert (p.authentication_checks, p.spf_reject, p.dmarc_reject) == (False, True, False)
    with pytest.raises(ConfigError) as e:
        parse('[policy]\nspf_reject = "yes"\ndmarc_reject = 1\n', "m.toml")
    assert "m.toml: policy.spf_reject" in str(e.value)
    assert "m.toml: policy.dmarc_reject" in str(e.value)
    c = load(ROOT / "etc" / "mailsrv.toml")
    assert (c.policy.spf_reject, c.policy.dmarc_reject) == (False, True)


def test_authentication_workers():
    # [policy] authentication_workers: one process per core but one, at least one; 0: threads.
    assert parse("").policy.authentication_workers == max(1, (os.cpu_count() or 1) - 1)
    assert parse("[policy]\nauthentication_workers = 0\n").policy.authentication_workers == 0
    assert parse("[policy]\nauthentication_workers = 3\n").policy.authentication_workers == 3
    for bad in ("-1", '"2"', "1.5", "true"):
        with pytest.raises(ConfigError) as e:
            parse(f"[policy]\nauthentication_workers = {bad}\n", "m.toml")
        assert "m.toml: policy.authentication_workers" in str(e.value), bad


def test_message_and_literal_sizes_take_units_as_quota_sizes_do(tmp_path):
    f = tmp_path / "sizes.toml"
    f.write_text('[limits]\nmax_message_size = "10M"\n[imap]\nmax_literal_size = "1.5G"\n')
    c = load(f)
    assert c.limits.max_message_size == 10 * 1024 * 1024
    assert c.imap.max_literal_size == 1536 * 1024 * 1024
    f.write_text("[limits]\nmax_message_size = 100\n")
    with pytest.raises(ConfigError) as e:
        load(f)
    assert e.value.errors == ["limits.max_message_size: must be at least 1024, not 100"]
