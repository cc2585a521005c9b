"""Sealing of funding keys with AES-256-GCM under a rotatable master key.

A sealed key is ``v1.<key id>.<base64url(nonce ‖ ciphertext ‖ tag)>``; the
associated data binds it to its connection or grant (``aad``), so a sealed key
copied onto another row does not open. Unsealing happens per request and the
plaintext is never stored, returned by an API or logged.
"""

from __future__ import annotations

import base64
import os
from typing import Callable, Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM


class SealError(Exception):
    """A sealed value could not be opened (unknown key id, tampering, bad format)."""


class Sealer:
    """Seals under the active master key; opens under any key it knows.

    ``load_key``, when given, is asked for a key id this sealer does not know
    (``wattgate keys rotate`` ran in another process and re-sealed the stored
    keys under a new master key): rotation then needs no restart.
    """

    def __init__(self, keys: Mapping[str, bytes], active_key_id: str, *,
                 load_key: Callable[[str], bytes | None] | None = None) -> None:
        self._aead = {kid: AESGCM(key) for kid, key in keys.items()}
        self.active_key_id = active_key_id
        self._load_key = load_key

    def seal(self, plaintext: str, aad: str) -> str:
        nonce = os.urandom(12)
        ct = self._aead[self.active_key_id].encrypt(nonce, plaintext.encode(), aad.encode())
        blob = base64.urlsafe_b64encode(nonce + ct).decode().rstrip("=")
        return f"v1.{self.active_key_id}.{blob}"

    def unseal(self, sealed: str, aad: str) -> str:
        try:
            version, kid, blob = sealed.split(".", 2)
        except ValueError:
            raise SealError("malformed sealed value") from None
        aead = self._aead.get(kid)
        if aead is None and version == "v1" and self._load_key is not None:
            key = self._load_key(kid)
            if key is not None:
                aead = self._aead[kid] = AESGCM(key)
        if version != "v1" or aead is None:
            raise SealError(f"no master key {kid!r} to open this value")
        try:
            raw = base64.urlsafe_b64decode(blob + "=" * (-len(blob) % 4))
            return aead.decrypt(raw[:12], raw[12:], aad.encode()).decode()
        except (InvalidTag, ValueError):
            raise SealError("sealed value does not open under its key") from None


def key_id_of(sealed: str) -> str:
    """The master key id a sealed value names ('' if it is malformed)."""
    parts = sealed.split(".", 2)
    return parts[1] if len(parts) == 3 else ""


def connection_aad(connection_id: int) -> str:
    """The associated data binding a sealed key to its connection row."""
    return f"connection:{connection_id}"


def grant_aad(grant_id: int) -> str:
    return f"grant:{grant_id}"


def webhook_aad(app_id: str) -> str:
    """Binds a sealed webhook signing secret to its app."""
    return f"webhook:{app_id}"
