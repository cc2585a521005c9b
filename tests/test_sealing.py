"""Sealing funding keys: round trip, binding to a row, key rotation, tampering."""

from __future__ import annotations

import pytest

from wattgate.sealing import Sealer, SealError, connection_aad, grant_aad, key_id_of

K1, K2 = b"1" * 32, b"2" * 32
SECRET = "sk-or-v1-" + "a" * 48


def test_round_trip_and_no_plaintext():
    sealer = Sealer({"k1": K1}, "k1")
    sealed = sealer.seal(SECRET, connection_aad(7))
    assert SECRET not in sealed and "aaaa" not in sealed
    assert sealed.startswith("v1.k1.")
    assert sealer.unseal(sealed, connection_aad(7)) == SECRET


def test_same_key_seals_differently_each_time():
    sealer = Sealer({"k1": K1}, "k1")
    assert sealer.seal(SECRET, "x") != sealer.seal(SECRET, "x")


def test_copied_onto_another_row_does_not_open():
    sealer = Sealer({"k1": K1}, "k1")
    sealed = sealer.seal(SECRET, connection_aad(7))
    for aad in (connection_aad(8), grant_aad(7)):
        with pytest.raises(SealError):
            sealer.unseal(sealed, aad)


def test_rotation_keeps_old_values_readable():
    old = Sealer({"k1": K1}, "k1").seal(SECRET, "a")
    both = Sealer({"k1": K1, "k2": K2}, "k2")
    new = both.seal(SECRET, "a")
    assert key_id_of(old) == "k1" and key_id_of(new) == "k2"
    assert both.unseal(old, "a") == both.unseal(new, "a") == SECRET
    with pytest.raises(SealError, match="k2"):
        Sealer({"k1": K1}, "k1").unseal(new, "a")


@pytest.mark.parametrize("mangle", [
    lambda s: s[:-2] + ("AA" if not s.endswith("AA") else "BB"),  # flipped ciphertext
    lambda s: "v1.k1.",                                               # empty blob
    lambda s: "v1.k1.!!!!",                                           # not base64
    lambda s: "garbage",                                              # no structure
    lambda s: "v9" + s[2:],                                           # unknown version
])
def test_tampered_or_malformed_values_raise_seal_error(mangle):
    sealer = Sealer({"k1": K1}, "k1")
    with pytest.raises(SealError):
        sealer.unseal(mangle(sealer.seal(SECRET, "a")), "a")


def test_wrong_master_key_does_not_open():
    sealed = Sealer({"k1": K1}, "k1").seal(SECRET, "a")
    with pytest.raises(SealError):
        Sealer({"k1": K2}, "k1").unseal(sealed, "a")


def test_key_id_of_malformed_is_empty():
    assert key_id_of("nonsense") == ""


def test_unknown_key_id_is_loaded_once_on_demand():
    asked = []

    def load(kid: str) -> bytes | None:
        asked.append(kid)
        return K2 if kid == "k2" else None
    new = Sealer({"k1": K1, "k2": K2}, "k2").seal(SECRET, "a")
    sealer = Sealer({"k1": K1}, "k1", load_key=load)
    assert sealer.unseal(new, "a") == sealer.unseal(new, "a") == SECRET
    assert asked == ["k2"]
    with pytest.raises(SealError):
        sealer.unseal(new.replace("v1.k2.", "v1.k9."), "a")
