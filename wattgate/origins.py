"""Web origins as apps register them: ``scheme://host[:port]``, normalised.

The consent popup compares the browser-set ``event.origin`` with an app's
registered origins by exact string, so every origin is stored in the form a
browser writes it: lower-case host, no default port, no path.
"""

from __future__ import annotations

from urllib.parse import urlsplit


def normalize_origin(value: str) -> str:
    """The browser's spelling of an origin; ValueError for anything that is not one."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        raise ValueError(f"not an origin (scheme://host[:port]): {value!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname \
            or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"not an origin (scheme://host[:port]): {value!r}")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    default = {"http": 80, "https": 443}[parts.scheme]
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != default else "")
