"""Tests for mailsrv.config: TOML to typed settings, every error at once."""

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
    assert any(x.startswith("limits.max_message_size: must be an integer") for x in errors)
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
        "addresses.alias: unknown key (known: aliases, recipient_delimiter, postmaster, "
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
