"""Who a request came from: the client's address and scheme, behind trusted proxies only.

``server.trusted_proxies`` lists the addresses (or CIDR networks) of the
reverse proxies in front of the gateway. Only a request whose TCP peer is one
of them has its ``X-Forwarded-For`` and ``X-Forwarded-Proto`` believed; from
any other peer those headers are a client's say-so and are ignored.

``X-Forwarded-For`` is read from the right: each proxy appends the address it
saw, so the rightmost entries were written by our proxies and the first entry
from the right that is not a trusted proxy is the client (anything left of it
the client could have written itself). The admin login limiter, ``/metrics``
access and the request log all ask ``client_of``; nothing else reads those
headers. Not here: ``Forwarded`` (RFC 7239), which no listed proxy is assumed
to write; a request carrying it from an untrusted peer still proves nothing.

Pure: no aiohttp. Callers pass the peer address and the headers.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

from .errors import ConfigError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(entries: Iterable[str], origin: str = "server.trusted_proxies"
                   ) -> tuple[Network, ...]:
    """``["127.0.0.1", "10.0.0.0/8", "::1"]`` → networks; a bad entry is a ConfigError."""
    out = []
    for entry in entries:
        try:
            out.append(ipaddress.ip_network(str(entry).strip(), strict=False))
        except ValueError:
            raise ConfigError(f"{origin}: expected an IP address or CIDR network, "
                              f"got {entry!r}") from None
    return tuple(out)


@lru_cache(maxsize=4096)  # peers and clients repeat: parse each once (hot path: every request)
def _address(text: str | None) -> Address | None:
    if not text:
        return None
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1:text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":")[0]
    try:
        address = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True)
class Client:
    """Where a request came from, as far as the gateway can know it."""

    address: str          # the client's IP address, or the raw peer when not an IP ("?")
    scheme: str | None    # "https" / "http" from a trusted proxy, else None (the socket's)
    proxied: bool         # the peer is a trusted proxy that named a client

    @property
    def is_loopback(self) -> bool:
        address = _address(self.address)
        return address is not None and address.is_loopback


class ClientAddresses:
    """Decides a request's client from its peer and headers, trusting only listed proxies."""

    def __init__(self, trusted: Iterable[str] = ()) -> None:
        self.trusted = parse_networks(trusted)
        self._verdicts: dict[Address, bool] = {}  # network membership is slow to test

    def is_trusted(self, address: Address | None) -> bool:
        if address is None:
            return False
        verdict = self._verdicts.get(address)
        if verdict is None:
            if len(self._verdicts) >= 4096:
                self._verdicts.clear()
            verdict = self._verdicts[address] = any(address in n for n in self.trusted)
        return verdict

    def client_of(self, peer: str | None, headers: Mapping[str, str]) -> Client:
        if not self.trusted:  # the default: the socket's peer, as aiohttp reports it
            return Client(peer or "?", None, False)
        peer_address = _address(peer)
        raw_peer = str(peer_address) if peer_address is not None else (peer or "?")
        if not self.is_trusted(peer_address):
            return Client(raw_peer, None, False)
        hops = [h for h in ",".join(_all(headers, "X-Forwarded-For")).split(",") if h.strip()]
        client: Address | None = None
        for hop in reversed(hops):
            address = _address(hop)
            if address is None:  # garbage where an address should be: stop believing
                break
            client = address
            if not self.is_trusted(address):
                break
        proto = _last(_all(headers, "X-Forwarded-Proto"))
        scheme = proto if proto in ("http", "https") else None
        if client is None:
            return Client(raw_peer, scheme, False)
        return Client(str(client), scheme, True)


def _all(headers: Mapping[str, str], name: str) -> list[str]:
    getall = getattr(headers, "getall", None)
    if getall is not None:
        return list(getall(name, []))
    value = headers.get(name)
    return [value] if value is not None else []


def _last(values: list[str]) -> str | None:
    """The proxy's own value: the rightmost of a comma list (a client may send its own first)."""
    items = [v.strip().lower() for v in ",".join(values).split(",") if v.strip()]
    return items[-1] if items else None
