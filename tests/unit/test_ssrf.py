"""plugins/upload/ssrf.py: which upload URLs the server may PUT to."""

import pytest

from plugins.upload.ssrf import UnsafeURL, check_url, public


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "169.254.169.254",
        "100.64.0.1",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:169.254.169.254",  # IPv4-mapped
        "::7f00:1",  # IPv4-compatible 127.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 of the metadata address
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
        "64:ff9b:1::a9fe:a9fe",  # local-use NAT64
        "2002:a9fe:a9fe::",  # 6to4 of 169.254.169.254
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo whose client is 192.0.2.45 (documentation)
        "224.0.0.1",
        "ff02::1",
        "0.0.0.0",
        "::",
    ],
)
def test_non_public_addresses_and_their_ipv6_disguises_are_refused(address):
    assert not public(address)


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "64:ff9b::808:808", "2002:808:808::1"]
)
def test_public_addresses_pass(address):
    assert public(address)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://[::1/x", "not a valid URL"),
        ("https://a..b.example/x", "invalid host name"),
        ("https://" + "a" * 64 + ".example/x", "invalid host name"),
        ("https://127.0.0.1\t/x", "whitespace"),
        ("https://exa mple.com/x", "whitespace"),
        ("https://example.com:99999/x", "not a valid URL"),
        ("ftp://example.com/x", "https"),
        ("http://example.com/x", "https"),
        ("https:///x", "https"),
        ("https://[64:ff9b::a9fe:a9fe]/x", "non-public"),
        ("https://[::ffff:127.0.0.1]/x", "non-public"),
        ("https://localhost/x", "non-public"),
    ],
)
def test_urls_that_cannot_be_used_say_why(url, why):
    with pytest.raises(UnsafeURL, match=why):
        check_url(url, ())


def test_trusted_hosts_skip_the_address_check():
    assert check_url("http://127.0.0.1:9000/b/k", ("127.0.0.1:9000",)).address is None
    assert check_url("http://127.0.0.1:9000/b/k", ("127.0.0.1:*",)).address is None
    assert check_url("http://minio.svc.cluster.local/b/k", ("*.cluster.local",)).address is None
    with pytest.raises(UnsafeURL, match="whitespace"):
        check_url("http://127.0.0.1\t:9000/b/k", ("127.0.0.1:*",))


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:9000/b/k", "http://127.0.0.1:9001/b/k", "http://evilcluster.local/b/k"],
)
def test_a_trusted_host_is_trusted_on_its_listed_port_only(url):
    """An entry without a port trusts the scheme's default port: not the host's other services."""
    with pytest.raises(UnsafeURL, match="must use https"):
        check_url(url, ("127.0.0.1", "127.0.0.1:9001x", "minio:9000", "*.cluster.local"))
