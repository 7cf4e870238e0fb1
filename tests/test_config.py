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
