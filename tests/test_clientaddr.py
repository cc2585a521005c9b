"""Who a request came from: forwarded headers believed only from listed proxies."""

from __future__ import annotations

import pytest

from wattgate.clientaddr import ClientAddresses
from wattgate.config import load_config
from wattgate.errors import ConfigError


def test_without_trusted_proxies_forwarded_headers_are_ignored():
    c = ClientAddresses().client_of("127.0.0.1", {"X-Forwarded-For": "203.0.113.9",
                                                  "X-Forwarded-Proto": "https"})
    assert (c.address, c.scheme, c.proxied) == ("127.0.0.1", None, False)
    assert c.is_loopback


def test_a_trusted_proxy_names_the_client_and_its_scheme():
    c = ClientAddresses(["127.0.0.1"]).client_of(
        "127.0.0.1", {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"})
    assert (c.address, c.scheme, c.proxied) == ("203.0.113.9", "https", True)
    assert not c.is_loopback


def test_an_untrusted_peer_cannot_pretend_to_be_a_proxy():
    c = ClientAddresses(["10.0.0.0/8"]).client_of("198.51.100.7",
                                                  {"X-Forwarded-For": "127.0.0.1"})
    assert (c.address, c.proxied) == ("198.51.100.7", False)


def test_the_client_is_the_first_untrusted_hop_from_the_right():
    # The client wrote "1.2.3.4" itself; our two proxies appended what they saw.
    trusted = ClientAddresses(["10.0.0.0/8", "127.0.0.1"])
    c = trusted.client_of("127.0.0.1", {"X-Forwarded-For": "1.2.3.4, 198.51.100.7, 10.1.2.3"})
    assert c.address == "198.51.100.7"
    # Only proxies in the chain: the leftmost is as far as we can see.
    assert trusted.client_of("127.0.0.1", {"X-Forwarded-For": "10.0.0.1"}).address == "10.0.0.1"


def test_garbage_in_the_header_is_never_taken_for_an_address():
    trusted = ClientAddresses(["127.0.0.1"])
    c = trusted.client_of("127.0.0.1", {"X-Forwarded-For": "evil\nline, unknown"})
    assert (c.address, c.proxied) == ("127.0.0.1", False)
    c = trusted.client_of("127.0.0.1", {"X-Forwarded-Proto": "gopher"})
    assert c.scheme is None
    # A client's own Proto value before the proxy's does not win.
    c = trusted.client_of("127.0.0.1", {"X-Forwarded-Proto": "https, http",
                                        "X-Forwarded-For": "[2001:db8::1]:443"})
    assert (c.scheme, c.address) == ("http", "2001:db8::1")


def test_ipv4_mapped_peers_and_v6_networks():
    trusted = ClientAddresses(["::1", "192.0.2.0/24"])
    assert trusted.client_of("::ffff:192.0.2.5", {"X-Forwarded-For": "8.8.8.8"}).address == \
        "8.8.8.8"
    assert trusted.client_of("::1", {"X-Forwarded-For": "8.8.4.4"}).proxied


def test_the_setting_reads_toml_lists_and_comma_separated_environment(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[server]\ntrusted_proxies = ["127.0.0.1", "10.0.0.0/8"]\n')
    assert load_config(toml, env={}).server_trusted_proxies == ["127.0.0.1", "10.0.0.0/8"]
    env = {"WATTGATE_SERVER__TRUSTED_PROXIES": "127.0.0.1, ::1"}
    assert load_config(None, env=env).server_trusted_proxies == ["127.0.0.1", "::1"]
    assert load_config(None, env={}).server_trusted_proxies == []
    with pytest.raises(ConfigError, match="TRUSTED_PROXIES.*not-an-ip"):
        load_config(None, env={"WATTGATE_SERVER__TRUSTED_PROXIES": "not-an-ip"})
    toml.write_text('[server]\ntrusted_proxies = "127.0.0.1"\n')
    assert load_config(toml, env={}).server_trusted_proxies == ["127.0.0.1"]
    toml.write_text('[server]\ntrusted_proxies = [1]\n')
    with pytest.raises(ConfigError, match="list of strings"):
        load_config(toml, env={})
