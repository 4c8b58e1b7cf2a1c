"""Which upload URLs the server may PUT to: public https hosts, or hosts the operator trusts.

An address is public when it is globally routable. IPv6 addresses that carry an IPv4 address inside them
(IPv4-mapped and -compatible, NAT64, 6to4, Teredo) are judged by that IPv4 address: `64:ff9b::a9fe:a9fe`
reaches the cloud metadata service through a NAT64 gateway, though Python calls it global. These checks are
written out rather than left to `ipaddress.is_global`, whose answers for such ranges differ between Python
versions.
"""

import asyncio
import ipaddress
import logging
import socket
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

import httpx

from server.config import host_allowed

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the IPv4 address in the last 32 bits
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: local-use, translated to private space
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d


class UnsafeURL(ValueError):
    """Why a URL is refused, in words about the URL alone (the caller sees it; resolver errors and addresses
    do not belong in it)."""


@dataclass(frozen=True)
class Target:
    url: str  # as given, pre-signed query included
    host: str
    port: int
    address: str | None  # the checked IP to connect to; None for trusted hosts (resolved normally)


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries, if it is one of the forms that carry one."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]  # the client; Teredo's own server address is checked by the caller's rules too
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(ip.packed[12:])
    return None


def is_public(ip: IPAddress) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _LOCAL_NAT64 or ip.scope_id:
            return False
        inner = embedded_ipv4(ip)
        if inner is not None:
            return is_public(inner) and (ip.teredo is None or is_public(ip.teredo[0]))
    return ip.is_global and not ip.is_multicast


def public(address: str) -> bool:
    try:
        return is_public(ipaddress.ip_address(address))
    except ValueError:  # a scoped or odd form getaddrinfo may give: not something to connect to
        return False


def _parts(url: str):
    """The URL's scheme, host and port, or UnsafeURL naming what is wrong with it."""
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise UnsafeURL("contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
        httpx.URL(url)
    except (ValueError, httpx.InvalidURL):
        raise UnsafeURL("is not a valid URL") from None
    if not host or parts.scheme not in ("http", "https"):
        raise UnsafeURL("must be an https URL")
    try:
        host.encode("idna")
    except UnicodeError:
        raise UnsafeURL(f"has an invalid host name {host!r}") from None
    return parts.scheme, host, port or (443 if parts.scheme == "https" else 80)


def check_url(url: str, allowed: tuple[str, ...]) -> Target:
    """Refuse what an SSRF would use; returns where to connect (blocking: it resolves the host)."""
    scheme, host, port = _parts(url)
    if host_allowed(allowed, scheme, host, port):
        return Target(url, host, port, None)
    if scheme != "https":
        raise UnsafeURL(f"must use https ({host}:{port} is not in UPLOAD_ALLOWED_HOSTS)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError):
        raise UnsafeURL(f"host {host} does not resolve") from None
    return _checked(Target(url, host, port, None), [info[4][0] for info in infos])


async def resolve_checked(target: Target) -> Target:
    """The same check on the event loop, before each attempt: the name may point elsewhere by now."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError):
        raise UnsafeURL(f"host {target.host} does not resolve") from None
    return _checked(target, [info[4][0] for info in infos])


def _checked(target: Target, addresses: list[str]) -> Target:
    if not addresses:
        raise UnsafeURL(f"host {target.host} has no address")
    private = [a for a in addresses if not public(a)]
    if private:
        log.info("upload host %s resolves to %s: refused", target.host, private[0])
        raise UnsafeURL(f"host {target.host} resolves to a non-public address; refused")  # which: our DNS's business
    return replace(target, address=addresses[0])
