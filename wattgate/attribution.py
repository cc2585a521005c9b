"""App attribution upstream: the ``HTTP-Referer`` and ``X-Title`` a call carries.

OpenRouter shows usage per app by these two headers (``HTTP-Referer`` names the
app by URL; ``X-Title``, or its newer spelling ``X-OpenRouter-Title``, gives it
a display name). Every call through the gateway is made with the user's own
funding key, so without them the user's OpenRouter activity page lists one
anonymous stream; with them it names the app that spent. The gateway adds them
for the app (its registered origin and name) unless the client set its own,
which always win, and ``upstream.attribution = false`` adds none.

Header values must be safe whatever an app was named: no control character
(CR/LF would split the header), at most ``MAX_VALUE`` characters, and only
visible ASCII. OpenRouter's documentation does not say how it reads non-ASCII
titles; HTTP only promises ASCII, so other characters are percent-encoded as
UTF-8 (RFC 3986, what ``encodeURIComponent`` does), the form a browser uses
for a URL and that reads back losslessly. Nothing here imports aiohttp.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import quote

from .store import App

REFERER = "HTTP-Referer"
TITLE = "X-Title"
# Names a client may have set the title by: any of them means the client chose.
TITLE_NAMES = ("X-Title", "X-OpenRouter-Title")
MAX_VALUE = 200
# Printable ASCII stays as it is (a title reads as typed); the rest is encoded.
_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def safe_value(value: str) -> str:
    """``value`` as one header line: visible ASCII, percent-encoded past it, bounded.

    Control characters (CR, LF, tab, NUL, DEL) are dropped, never encoded, and a
    value is cut on a whole character before it is encoded, then on a whole
    escape after.
    """
    text = "".join(c for c in value if c.isprintable()).strip()
    encoded = quote(text[:MAX_VALUE], safe=_SAFE)
    if len(encoded) > MAX_VALUE:
        encoded = encoded[:MAX_VALUE]
        cut = encoded.rfind("%", MAX_VALUE - 2)
        if cut != -1:
            encoded = encoded[:cut]
    return encoded.strip()


def referer_of(app: App) -> str | None:
    """The app's URL: its first https origin, else its first origin, else none."""
    https = [o for o in app.origins if o.startswith("https://")]
    chosen = https or list(app.origins)
    return safe_value(chosen[0]) if chosen else None


def attribution_headers(app: App, client: Mapping[str, str], *,
                        enabled: bool) -> dict[str, str]:
    """The attribution headers to send upstream, besides the client's own (forwarded as
    they came). ``client``: the request's headers (case-insensitive mapping)."""
    if not enabled:
        return {}
    headers: dict[str, str] = {}
    referer = referer_of(app)
    if referer and REFERER not in client:
        headers[REFERER] = referer
    title = safe_value(app.name)
    if title and not any(name in client for name in TITLE_NAMES):
        headers[TITLE] = title
    return headers
